import pathlib
import sys

import pytest
import torch

# tests/styles holds modules written in deliberately different styles; make them importable as `styles`.
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are much slower with more than one intra-op thread on 2-core machines under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
