"""Where the persistent caches live and what keys them, shared by the tuning cache (autotune/cache.py),
the trace cache (compile_cache.py) and the TVM library cache (backends/tvm/lib_cache.py)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

try:  # a convenience: the GPU machines have only torch, triton and numpy
    import platformdirs
except ImportError:  # pragma: no cover - exercised by tests/test_triton_minimal_env.py
    platformdirs = None


def cache_dir() -> Path:
    """``$SESSA_COMPILER_CACHE_DIR``, else the user's cache directory."""
    env = os.environ.get("SESSA_COMPILER_CACHE_DIR")
    if env:
        return Path(env)
    if platformdirs is not None:
        return Path(platformdirs.user_cache_dir("sessa_compiler"))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sessa_compiler"


def stable_hash(obj) -> str:
    """sha256 of a JSON rendering with sorted keys (strings are hashed as their text)."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def library_versions(backend: str) -> dict:
    import torch

    from ._version import __version__

    versions = {"torch": torch.__version__, "sessa_compiler": __version__}
    module = {"triton": "triton", "tvm": "tvm"}.get(backend)
    if module is not None:
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a backend that is not installed simply has no version
            versions[module] = "missing"
    return versions


def compile_cache_enabled() -> bool:
    """SESSA_COMPILER_COMPILE_CACHE=0 (or false, off) turns off the caches of traces and built TVM libraries."""
    return os.environ.get("SESSA_COMPILER_COMPILE_CACHE", "1") not in ("0", "false", "off")


@functools.lru_cache(maxsize=1)
def package_hash() -> str:
    """sha256 of this package's own source: a changed frontend or backend misses every entry."""
    h = hashlib.sha256()
    root = Path(__file__).parent  # the package directory
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
