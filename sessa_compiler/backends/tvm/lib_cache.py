"""Built whole-graph TVM libraries in the persistent compile cache (``$SESSA_COMPILER_CACHE_DIR/tvm``).

Keyed by the IR text, the schedules, the target, the vector width, the versions of torch, tvm and
sessa_compiler and this package's source; a library that does not load is moved aside and rebuilt.
See sessa_compiler/persistent_cache.py.
"""
from __future__ import annotations

import os
import tempfile
import warnings

from ...persistent_cache import cache_dir, compile_cache_enabled, library_versions, package_hash, stable_hash
from .target import configure_threads


def load_or_build(graph, schedules: dict, target, lanes: int, build):
    """A runtime module for ``relax.VirtualMachine``: the cached library, else ``build()`` (an executable),
    written to the cache for the next process."""
    configure_threads()
    if not compile_cache_enabled():
        return build()
    import tvm

    key = stable_hash({"format": 1, "ir": str(graph), "schedules": repr(sorted(schedules.items())),
                       "target": str(target), "lanes": lanes, "versions": library_versions("tvm"),
                       "code": package_hash()})  # a changed kernel generator misses
    path = cache_dir() / "tvm" / f"{key}.so"
    if path.exists():
        try:
            return tvm.runtime.load_module(str(path))
        except Exception as e:  # noqa: BLE001 - a bad library is a miss, never a crash
            warnings.warn(f"sessa_compiler compile cache: {path} does not load ({type(e).__name__}); rebuilding it",
                          stacklevel=2)
            try:
                os.replace(path, path.with_suffix(".corrupt"))
            except OSError:
                pass
    executable = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".so")
        os.close(fd)
        executable.export_library(tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no half-written library
    except Exception as e:  # noqa: BLE001 - no C++ compiler, read-only cache: the next process builds again
        warnings.warn(f"sessa_compiler compile cache: could not write {path} ({type(e).__name__}: {e})", stacklevel=2)
    return executable
