"""Where the persistent caches live, what keys them and whether they may be read, shared by the tuning cache
(autotune/cache.py), the trace cache (compile_cache.py) and the TVM library cache (backends/tvm/lib_cache.py).

Trust: the caches hold pickles and shared libraries, so whoever can write the cache directory can run code in
this process. ``trusted(root, path)`` accepts an entry only when the cache directory, every directory below it
on the way to the entry, and the entry itself are owned by the current user and not writable by group or others
(as ssh requires of its keys); otherwise it warns once per directory, naming it and the fix, and the caller
compiles without the cache. ``note(cache, outcome)`` records a cache's hit or miss for ``explain()``.
See docs/caching.md.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import stat
import threading
import warnings
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
    module = {"triton": "triton", "tvm": "tvm", "tvm_ffi": "tvm_ffi"}.get(backend)
    if module is not None:
        versions[module] = _module_version(module)
    return versions


_DISTRIBUTIONS = {"tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi", "triton": "triton"}


@functools.lru_cache(maxsize=None)
def _module_version(module: str) -> str:
    """``module.__version__`` without importing it (``import tvm`` costs about a second, most of a warm compile):
    the version in the metadata of the distribution that installs it, when that distribution's copy is the
    one ``import module`` would load (the same value as ``__version__`` for the pinned wheels). A copy from
    elsewhere (a source build on sys.path shadowing the wheel) is imported for its ``__version__``."""
    import importlib.util
    from importlib import metadata

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return "missing"
    try:
        dist = metadata.distribution(_DISTRIBUTIONS[module])
        installed = os.path.realpath(str(dist.locate_file(os.path.join(module, "__init__.py"))))
        if installed == os.path.realpath(spec.origin) and dist.version:
            return dist.version
    except (metadata.PackageNotFoundError, KeyError, OSError, ValueError):
        pass
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - a backend that is not installed simply has no version
        return "missing"


def tensor_digest(t) -> str:
    """sha256 of a tensor's dtype, shape and values (on any device; complex as its real pairs): what the caches and
    the recognition probes key tensors by."""
    import torch

    # inside a torch.func transform (grad, vmap) of a compiled module, functorch would wrap these ops' results
    # (a wrapper has no storage to read): the digest is of the values themselves
    with torch._C._DisableFuncTorch():
        x = t.detach()
        h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
        if x.is_complex():
            x = torch.view_as_real(x)
        x = x.to("cpu").contiguous()
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


STDLIB = os.path.dirname(os.__file__)   # the standard library's directory


@functools.lru_cache(maxsize=1)
def site_dirs() -> tuple:
    """The directories installed packages live in (site-packages, the user's site-packages)."""
    import site
    import sysconfig

    dirs = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        dirs.add(site.getusersitepackages())
    except AttributeError:
        pass
    return tuple(os.path.join(d, "") for d in dirs if d)


def users_file(path: str) -> bool:
    """Whether a source file is the user's: not an installed library's (keyed by its version) or the standard
    library's."""
    path = os.path.abspath(path)
    return not path.startswith(site_dirs()) and not path.startswith(STDLIB)


def torch_flags() -> tuple:
    """torch's process-wide switches a forward can branch on (``if torch.are_deterministic_algorithms_enabled()``)
    and that change what some ops compute: part of the compile cache's key and of a compiled module's guards."""
    import torch

    C = torch._C   # (the getters behind torch.backends.cudnn.deterministic, ...: a tenth of their cost, at every call)
    # (not whether cuDNN is enabled: torch.export turns it off while it traces, and a compiled module called inside
    # an export must find its traced graph)
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.mha.get_fastpath_enabled(), torch.get_float32_matmul_precision(),
            C._get_cudnn_deterministic(), C._get_cudnn_allow_tf32(), C._get_cublas_allow_tf32())


def object_fields(v) -> dict | None:
    """What a plain object holds, by attribute name: its ``__dict__`` and its ``__slots__`` that are set (a config
    object); None for an object with neither."""
    state = getattr(v, "__dict__", None)
    slots = [s for k in type(v).__mro__ for s in _slot_names(k) if s not in ("__dict__", "__weakref__")]
    if not (isinstance(state, dict) or slots):
        return None
    fields = dict(state or {})
    fields.update((s, getattr(v, s)) for s in slots if hasattr(v, s))
    return fields


def _slot_names(klass) -> tuple:
    slots = vars(klass).get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def values_unchanged(t, digest: str, verified: dict, key) -> bool:
    """Whether tensor ``t`` still holds the values ``digest`` (tensor_digest) was taken of: hashed again only when
    its identity, storage, version counter, dtype or shape moved since the last check that passed (``verified``,
    by ``key``). In-place edits through ``.data`` keep the version counter and are not seen."""
    seen = (id(t), t._version, t.data_ptr(), t.dtype, tuple(t.shape))
    if verified.get(key) == seen:
        return True
    if tensor_digest(t) != digest:
        return False
    verified[key] = seen
    return True


def compile_cache_enabled(what: str = "traces") -> bool:
    """Whether the persistent cache of ``what`` ("traces": traced graphs; "libraries": built TVM libraries) is on.
    SESSA_COMPILER_COMPILE_CACHE=0 (or false, off) turns off both; =libraries keeps only the built libraries
    (every compile traces and recognises again, and reuses a library built for the same IR, schedules and target)."""
    mode = os.environ.get("SESSA_COMPILER_COMPILE_CACHE", "1").lower()
    if mode in ("0", "false", "off"):
        return False
    return what == "libraries" if mode == "libraries" else True


@functools.lru_cache(maxsize=1)
def package_hash() -> str:
    """sha256 of this package's own source: a changed frontend or backend misses every entry."""
    h = hashlib.sha256()
    root = Path(__file__).parent  # the package directory
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# -- trust ------------------------------------------------------------------------------------------------
_WARNED: set = set()
_WARN_LOCK = threading.Lock()


def _current_uid() -> int | None:
    """The user whose files the caches trust (None where there are no Unix owners: no check)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _problem(p: Path, uid: int) -> str | None:
    """Why p may not be trusted (owner or mode), or None."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None  # nothing there to load (a directory is created by this user, 0700)
    except OSError as e:
        return f"cannot be inspected ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by the current user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit)
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trusted(root: Path, path: Path | None = None) -> bool:
    """Whether entries under ``root`` (and ``path``, a directory or file below it) may be loaded: each of root,
    the directories between, and path, where they exist, is owned by this user and not group/other-writable.
    Warns once per offending path, naming it and what to change."""
    uid = _current_uid()
    if uid is None:
        return True
    root = Path(root)
    chain = [root]
    if path is not None:
        path = Path(path)
        try:
            rel = path.relative_to(root)
        except ValueError:
            rel = None
        if rel is None:
            chain.append(path)
        else:
            for part in rel.parts:
                chain.append(chain[-1] / part)
    for p in chain:
        why = _problem(p, uid)
        if why is not None:
            _warn_untrusted(p, why)
            return False
    return True


def _warn_untrusted(p: Path, why: str) -> None:
    with _WARN_LOCK:
        if str(p) in _WARNED:
            return
        _WARNED.add(str(p))
    fix = (f"chown $USER {str(p)!r}" if "owned" in why else f"chmod go-w {str(p)!r}" if "writable" in why
           else f"remove {str(p)!r}")
    warnings.warn(f"sessa_compiler cache: {str(p)!r} {why}: whoever can write it could run code in this process, "
                  f"so the persistent cache is not used (compiling without it); {fix}, or point "
                  "SESSA_COMPILER_CACHE_DIR at a directory only you can write (see docs/caching.md)", stacklevel=3)


def make_private_dir(d: Path) -> None:
    """mkdir -p with mode 0700 for the directories it creates (whatever the umask)."""
    d = Path(d)
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass


# -- what came from the caches, for explain() -----------------------------------------------------------------
_NOTES = threading.local()


@contextlib.contextmanager
def collecting(into: collections.Counter):
    """Count ``note(cache, outcome)`` calls made by this thread inside the block into ``into``."""
    stack = _NOTES.__dict__.setdefault("stack", [])
    stack.append(into)
    try:
        yield into
    finally:
        stack.pop()


def note(cache: str, outcome: str) -> None:
    """Record that ``cache`` ("traced graph", "TVM library", "tuned config") had ``outcome`` ("from the cache",
    "built", ...) for the compile this thread is running (nothing outside collecting())."""
    for counter in getattr(_NOTES, "stack", ()):
        counter[(cache, outcome)] += 1
