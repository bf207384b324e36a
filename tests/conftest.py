import pathlib
import sys

# tests/ holds helper modules (triton_env) and modules written in deliberately different styles
# (styles/): make them importable.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Before anything imports triton: its interpreter must be on for the kernel tests on CPU tensors.
import triton_env  # noqa: E402,F401

import os  # noqa: E402

# The persistent compile cache (traced graphs, built TVM libraries) would let one test's trace serve
# another's; tests that check it turn it on with their own cache directory (tests/test_compile_cache.py).
os.environ.setdefault("SESSA_COMPILER_COMPILE_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are much slower with more than one intra-op thread on 2-core machines under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh persistent tuning cache for one test (SESSA_COMPILER_CACHE_DIR)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(d))
    return d
