"""Built whole-graph TVM libraries in the persistent compile cache (``$SESSA_COMPILER_CACHE_DIR/tvm``).

Keyed by the IR text, the schedules, the target, the vector width, the versions of torch, tvm, tvm_ffi and
sessa_compiler and this package's source; a library that does not load is moved aside and rebuilt.
A library is loaded (and written) only where the cache directory and the file are the current user's and
not writable by others (persistent_cache.trusted); each load or build is noted for explain().

Single kernels (build.build: the training and hybrid-mode kernels; decode.py: serving's decode kernels) are cached the same way in
``$SESSA_COMPILER_CACHE_DIR/tvm-kernels``, keyed by their spec, the target, the versions and the source of the
package and of the kernel's generator (load_or_build_kernel).

A library from the cache is loaded without ``import tvm`` (about a second, most of a warm compile): the TVM
runtime library (libtvm_runtime, which the Relax VM and the kernels' thread pool live in) is loaded as
``import tvm`` loads it, and the Relax VM is created over the library through tvm_ffi, as
``relax.VirtualMachine(lib, tvm.cpu())`` does (load_vm). A later ``import tvm`` in the same process loads the
same runtime library (the dynamic loader shares it).
See sessa_compiler/persistent_cache.py and docs/caching.md.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

from ...persistent_cache import (cache_dir, compile_cache_enabled, library_versions, make_private_dir, note,
                                 package_hash, stable_hash, trusted)
from ...progress import stage
from .target import configure_threads

KDL_CPU = 1            # DLPack's device type of the CPU
POOLED_ALLOCATOR = 2   # relax.VirtualMachine's default allocator
_RUNTIME: list = []    # the loaded libtvm_runtime (kept referenced)


def _load_tvm_runtime() -> None:
    """Load libtvm_runtime (RTLD_GLOBAL) from where ``import tvm`` loads it (tvm/base.py: TVM_LIBRARY_PATH,
    the wheel's tvm/lib, a source tree's build/lib and lib), unless tvm already did. Without it the Relax VM
    executable has no loader, and kernels with parallel loops crash (no thread pool)."""
    if _RUNTIME or "tvm" in sys.modules:
        return
    import importlib.util

    from tvm_ffi.libinfo import load_lib_ctypes

    spec = importlib.util.find_spec("tvm")
    pkg = Path(list(spec.submodule_search_locations)[0])
    paths = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    paths += [pkg / "lib", pkg / ".." / ".." / "build" / "lib", pkg / ".." / ".." / "lib"]
    _RUNTIME.append(load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=paths))


def _load_lib(path: Path):
    """The library at ``path`` through tvm_ffi (without ``import tvm``), over the TVM runtime library."""
    import tvm_ffi

    from .omp_launch import adopt

    _load_tvm_runtime()
    real = os.path.realpath(path)
    lib = tvm_ffi.load_module(real)
    adopt(real)   # its parallel loops on torch's OpenMP threads (omp_launch.py), where that applies
    return lib


def load_vm(path):
    """The Relax VM over the library at ``path`` on the CPU: ``relax.VirtualMachine(tvm.runtime.load_module(path),
    tvm.cpu())`` (the same module calls: vm_load_executable, vm_initialization(cpu, 0, pooled)) without
    importing tvm. Index it by function name (``vm["main"]``)."""
    vm = _load_lib(path)["vm_load_executable"]()
    vm["vm_initialization"](KDL_CPU, 0, POOLED_ALLOCATOR)
    return vm


def _vm_of(executable):
    """The Relax VM over an executable built in this process."""
    import tvm
    from tvm import relax

    return relax.VirtualMachine(executable, tvm.cpu())


def _key_path(graph, schedules: dict, target, lanes: int) -> Path:
    key = stable_hash({"format": 2, "ir": str(graph), "schedules": repr(sorted(schedules.items())),
                       "target": str(target), "lanes": lanes, "versions": library_versions("tvm"),
                       "ffi": library_versions("tvm_ffi")["tvm_ffi"],
                       "code": package_hash()})  # a changed kernel generator misses
    return cache_dir() / "tvm" / f"{key}.so"


def _load_cached(path: Path, load, what: str):
    """``load(path)`` of a cached library, or None where there is none; one that does not load is a miss, never a
    crash: it is moved aside (``.corrupt``) to be rebuilt."""
    if not path.exists():
        return None
    if not _intact(path):
        # a library cut short (a full disk, a copy interrupted) is mapped by the loader and faults the process
        # (SIGBUS) on first touch: its digest, written beside it, is checked before it is loaded
        warnings.warn(f"sessa_compiler compile cache: {path} does not match the digest written with it (truncated "
                      "or changed since); rebuilding it", stacklevel=3)
        _set_aside(path)
        return None
    try:
        loaded = load(path)
        note(what, "from the cache")
        return loaded
    except Exception as e:  # noqa: BLE001 - a bad library is a miss, never a crash
        warnings.warn(f"sessa_compiler compile cache: {path} does not load ({type(e).__name__}); rebuilding it",
                      stacklevel=3)
        _set_aside(path)
        return None


def _set_aside(path: Path) -> None:
    """A cached library that must not be loaded, and its digest, moved aside (``.corrupt``) to be rebuilt."""
    for p, aside in ((path, path.with_suffix(".corrupt")), (_digest_path(path), path.with_suffix(".sha256.corrupt"))):
        try:
            os.replace(p, aside)
        except OSError:
            pass


def _digest_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _intact(path: Path) -> bool:
    """Whether the library's bytes are those written (its digest beside it); a library without one is not
    trusted to be whole."""
    try:
        return _digest_path(path).read_text().strip() == _digest(path)
    except OSError:
        return False


def _write_cached(executable, path: Path) -> bool:
    """Write a built executable's library to ``path`` atomically, readable by the user alone; False (with a
    warning) where it cannot be written: no C++ compiler, a read-only cache. The next process builds again."""
    try:
        make_private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".so")
        os.close(fd)
        executable.export_library(tmp)
        os.chmod(tmp, 0o700)  # the linker creates it with the umask's mode: keep it the user's alone
        digest = _digest(Path(tmp))
        fd, tmp_digest = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".sha256")
        with os.fdopen(fd, "w") as f:
            f.write(digest)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no half-written library
        os.replace(tmp_digest, _digest_path(path))
        return True
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"sessa_compiler compile cache: could not write {path} ({type(e).__name__}: {e})", stacklevel=3)
        return False


def load_or_build(graph, schedules: dict, target, lanes: int, build):
    """A Relax VM (index it by function name) for the graph on the CPU: over the cached library, else over
    ``build()`` (an executable: it may use ``backend.target``), which is written to the cache for the next
    process. ``target``: the backend's key target (a recorded HostTarget or a Target): its text keys the
    library."""
    configure_threads()
    if not compile_cache_enabled("libraries"):
        note("TVM library", "built (cache off)")
        return _vm_of(build())
    path = _key_path(graph, schedules, target, lanes)
    if not trusted(cache_dir(), path):
        note("TVM library", "built (cache not trusted)")
        return _vm_of(build())
    vm = _load_cached(path, load_vm, "TVM library")
    if vm is not None:
        return vm
    stage("building the TVM library")
    executable = build()
    note("TVM library", "built")
    from .target import HostTarget

    if isinstance(target, HostTarget):  # the build resolved the real target: key the file by its text
        from .target import resolve_target

        path = _key_path(graph, schedules, resolve_target(target), lanes)
    if not _write_cached(executable, path):
        return _vm_of(executable)
    try:   # the library just linked: a VM over the in-memory executable would generate its code again (~0.75 s
        return load_vm(path)   # for a 4-layer decoder), as the written one is already
    except Exception:  # noqa: BLE001 - then the executable itself
        return _vm_of(executable)


def load_or_build_kernel(fields: dict, symbol: str, build):
    """(what keeps the code alive, the function ``symbol``) of one kernel: from the library cached under ``fields``
    (what the kernel is: its spec and target), else ``build()`` (an executable holding ``symbol``), written to the
    cache for the next process. The cache is on where whole-graph libraries are cached."""
    path = None
    if compile_cache_enabled("libraries"):
        key = stable_hash({"format": 1, **fields, "versions": library_versions("tvm"),
                           "ffi": library_versions("tvm_ffi")["tvm_ffi"], "code": package_hash()})
        path = cache_dir() / "tvm-kernels" / f"{key}.so"
        path = path if trusted(cache_dir(), path) else None
    def with_function(lib):
        return lib, lib[symbol]

    if path is not None:
        loaded = _load_cached(path, lambda p: with_function(_load_lib(p)), "TVM kernel")
        if loaded is not None:
            return loaded
    ex = build()
    if path is not None:
        note("TVM kernel", "built")
        if _write_cached(ex, path):
            try:   # the written library, as load_or_build does: its code is generated already, and its parallel
                return with_function(_load_lib(path))   # loops can run on torch's threads (omp_launch.py)
            except Exception:  # noqa: BLE001 - then the executable itself
                pass
    return with_function(ex)
