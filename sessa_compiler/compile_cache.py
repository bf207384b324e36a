"""The persistent compile cache: traced, recognised graphs (and, in backends/tvm, built TVM libraries) on
disk under ``$SESSA_COMPILER_CACHE_DIR`` (default: the user's cache directory), so a new process skips
torch.export, the recognisers and the TVM build.

A traced graph is keyed by the module's code (the files that define its submodules' classes, and this
package's own source; helpers imported from other files are not in the key), its configuration
(each submodule's type, ``extra_repr()`` and plain attributes), the names, shapes and dtypes of its
parameters and buffers, its train/eval modes, the call's structure (ranks, dtypes, devices and static
sizes of the tensors, keyword constants) and the versions of torch, triton, tvm and this package. A
changed module or version misses; an entry that does not load (truncated, corrupt, foreign) is moved
aside and the module is traced again. ``SESSA_COMPILER_COMPILE_CACHE=0`` turns the cache off.

Entries are pickles: load them only from a cache directory you trust (as with torch.compile's cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from .persistent_cache import cache_dir, package_hash, stable_hash
from .persistent_cache import compile_cache_enabled as enabled  # noqa: F401  (compile_cache.enabled())

ENTRY_FORMAT = 1
_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def _class_files(cls, seen: dict) -> None:
    """The source file of each class in cls's MRO outside torch, by file (None: no source file)."""
    for klass in cls.__mro__:
        if klass is object or klass.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        try:
            path = inspect.getsourcefile(klass)
        except TypeError:
            path = None
        if path is None or not os.path.exists(path):
            seen[klass.__qualname__] = None
        elif path not in seen:
            with open(path, "rb") as f:
                seen[path] = hashlib.sha256(f.read()).hexdigest()


def module_key(module: torch.nn.Module, args: tuple, kwargs: dict | None, modes: tuple) -> str | None:
    """The cache key of tracing ``module(*args, **kwargs)``, or None when the module cannot be keyed (a
    class without a source file, e.g. defined in a REPL: its behaviour could change without the key
    changing). The code part is the content of the files that define the submodules' classes and of this
    package; helpers imported from other files are not in it."""
    sources: dict = {}
    config = []
    for name, sub in module.named_modules(remove_duplicate=False):
        _class_files(type(sub), sources)
        attrs = {k: v for k, v in vars(sub).items()
                 if not k.startswith("_") and k != "training" and _plain(v)}
        config.append((name, f"{type(sub).__module__}.{type(sub).__qualname__}", sub.extra_repr(),
                       sorted(attrs.items())))
    if any(src is None for src in sources.values()):
        return None
    code = sorted(sources.values()) + [package_hash()]
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_parameters(remove_duplicate=False)]
    tensors += [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_buffers(remove_duplicate=False)]
    leaves, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(sorted((kwargs or {}).items()))))
    call = [(x.dim(), str(x.dtype), x.device.type, tuple(x.shape[2:])) if isinstance(x, torch.Tensor)
            else repr(x) for x in leaves]
    versions = _versions()
    return stable_hash({"format": ENTRY_FORMAT, "code": code, "config": config, "tensors": tensors,
                        "modes": list(modes), "call": call, "spec": str(spec), "versions": versions})


def _versions() -> dict:
    """torch, triton, tvm and sessa_compiler versions, read from the installed distributions' metadata (so
    that a cache lookup does not import triton or tvm)."""
    from importlib import metadata

    from ._version import __version__

    out = {"torch": torch.__version__, "sessa_compiler": __version__}
    for dist in ("triton", "apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _path(key: str) -> Path:
    return cache_dir() / "traced" / f"{key}.pkl"


def load(key: str, module: torch.nn.Module):
    """The cached Traced for this key with its graph parsed back from the IR text and its parameters
    bound (the module's own tensors, plus the cached constants), or None."""
    from .frontend.trace import Traced
    from .ir import parse

    p = _path(key)
    if not p.exists():
        return None
    try:
        with open(p, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec deprecation, raised on unpickling
            entry = pickle.load(f)
        if entry.get("format") != ENTRY_FORMAT or entry.get("key") != key:
            raise ValueError("foreign or stale entry")
        graph = parse(entry["ir"])
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(module.named_buffers(remove_duplicate=False))
        for name in graph.param_values:
            graph.params[name] = state[name] if name in state else entry["constants"][name]
        traced = entry["traced"]
        if not isinstance(traced, Traced):
            raise ValueError("not a traced graph")
        return dataclasses.replace(traced, graph=graph)
    except Exception as e:  # noqa: BLE001 - a bad entry is a miss, never a crash
        warnings.warn(f"sessa_compiler compile cache: entry {p} does not load ({type(e).__name__}: {e}); "
                      "tracing again and replacing it", stacklevel=4)
        try:
            os.replace(p, p.with_suffix(".corrupt"))
        except OSError:
            pass
        return None


def store(key: str, traced, module: torch.nn.Module) -> None:
    """Write the traced graph (IR text, metadata, and the tensors that are not the module's) atomically.
    A failure to write only costs the next process a trace."""
    state = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    state |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
    graph = traced.graph
    entry = {"format": ENTRY_FORMAT, "key": key, "ir": str(graph),
             "constants": {n: t for n, t in graph.params.items() if n in graph.param_values and n not in state},
             "traced": dataclasses.replace(traced, graph=None)}
    p = _path(key)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(entry, f)
        os.replace(tmp, p)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"sessa_compiler compile cache: could not write {p} ({type(e).__name__}: {e})", stacklevel=4)
