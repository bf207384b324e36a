"""Built whole-graph TVM libraries in the persistent compile cache (``$SESSA_COMPILER_CACHE_DIR/tvm``).

Keyed by the IR text, the schedules, the target, the vector width, the versions of torch, tvm and
sessa_compiler and this package's source; a library that does not load is moved aside and rebuilt.
A library is loaded (and written) only where the cache directory and the file are the current user's and
not writable by others (persistent_cache.trusted); each load or build is noted for explain().
See sessa_compiler/persistent_cache.py and docs/caching.md.
"""
from __future__ import annotations

import os
import tempfile
import warnings

from ...persistent_cache import (cache_dir, compile_cache_enabled, library_versions, make_private_dir, note,
                                 package_hash, stable_hash, trusted)
from ...progress import stage
from .target import configure_threads


def load_or_build(graph, schedules: dict, target, lanes: int, build):
    """A runtime module for ``relax.VirtualMachine``: the cached library, else ``build()`` (an executable),
    written to the cache for the next process."""
    configure_threads()
    if not compile_cache_enabled("libraries"):
        note("TVM library", "built (cache off)")
        return build()
    import tvm

    key = stable_hash({"format": 1, "ir": str(graph), "schedules": repr(sorted(schedules.items())),
                       "target": str(target), "lanes": lanes, "versions": library_versions("tvm"),
                       "code": package_hash()})  # a changed kernel generator misses
    path = cache_dir() / "tvm" / f"{key}.so"
    if not trusted(cache_dir(), path):
        note("TVM library", "built (cache not trusted)")
        return build()
    if path.exists():
        try:
            lib = tvm.runtime.load_module(str(path))
            note("TVM library", "from the cache")
            return lib
        except Exception as e:  # noqa: BLE001 - a bad library is a miss, never a crash
            warnings.warn(f"sessa_compiler compile cache: {path} does not load ({type(e).__name__}); rebuilding it",
                          stacklevel=2)
            try:
                os.replace(path, path.with_suffix(".corrupt"))
            except OSError:
                pass
    stage("building the TVM library")
    executable = build()
    note("TVM library", "built")
    try:
        make_private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".so")
        os.close(fd)
        executable.export_library(tmp)
        os.chmod(tmp, 0o700)  # the linker creates it with the umask's mode: keep it the user's alone
        os.replace(tmp, path)  # atomic: a concurrent reader sees no half-written library
    except Exception as e:  # noqa: BLE001 - no C++ compiler, read-only cache: the next process builds again
        warnings.warn(f"sessa_compiler compile cache: could not write {path} ({type(e).__name__}: {e})", stacklevel=2)
        return executable
    try:   # the library just linked: a VM over the in-memory executable would generate its code again (~0.75 s
        return tvm.runtime.load_module(str(path))   # for a 4-layer decoder), as the written one is already
    except Exception:  # noqa: BLE001 - then the executable itself
        return executable
