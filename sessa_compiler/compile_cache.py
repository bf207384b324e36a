"""The persistent compile cache: traced, recognised graphs (and, in backends/tvm, built TVM libraries) on
disk under ``$SESSA_COMPILER_CACHE_DIR`` (default: the user's cache directory), so a new process skips
torch.export, the recognisers and the TVM build.

An entry is found by a primary key and then validated against a manifest recorded while tracing:

- primary key (``module_key``): the module's structure (each submodule's name, class and ``extra_repr()``),
  the files that define its submodules' classes, every submodule's non-tensor attributes (fingerprinted
  recursively: config objects, functions by their code, defaults and closures; hooks; an instance-level
  ``forward``), each submodule's resolved ``forward``, the global module hooks, the names, shapes, dtypes (and, for parameters, requires_grad)
  of its parameters and buffers, its train/eval modes, the call's structure (ranks, dtypes, devices, static
  sizes, keyword constants) and the versions of Python, torch, triton, tvm, onnx and this package's source.
- manifest (``Recorder``): every Python function that ran while tracing outside torch, the standard library
  and this package (those are keyed by version and package hash): its code (bytecode, constants incl. nested
  code, names, file, qualified name), the file it came from (content hash), where it can be found again
  (module + qualified name, or module-level names bound to it) with its defaults and closure, and the value
  of every module global it read; code from other installed libraries is keyed by the library's version.

On lookup every manifest item is re-resolved in the current process and compared: an edited helper in
another file, a monkeypatched function, a changed global constant or an upgraded library misses (the module
is traced again and the entry replaced). A value that cannot be fingerprinted (a lock, an open file, ...)
makes the trace uncacheable: no entry rather than a possibly stale one. An entry that does not load or
validate is a miss; a corrupt one is moved aside. ``SESSA_COMPILER_COMPILE_CACHE=0`` turns the cache off.

Entries are pickles: they are read only from a directory owned by the current user and not writable by
others (persistent_cache.trusted). See docs/caching.md.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import os
import pickle
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

import torch

from .persistent_cache import STDLIB as _STDLIB
from .persistent_cache import (cache_dir, make_private_dir, object_fields, package_hash, stable_hash, tensor_digest,
                               torch_flags, trusted, users_file)
from .persistent_cache import site_dirs as _site_dirs
from .persistent_cache import compile_cache_enabled as enabled  # noqa: F401  (compile_cache.enabled())

ENTRY_FORMAT = 10  # 3: Traced.assumed (tensors a recognised op was built from); 4: the graph's source lines;
#                    5: the digests of the module's buffers the graph reads (what recognisers decided from);
#                    6: detach nodes (no-gradient regions) and Traced.custom_backward;
#                    7: the files and directories the forward read (manifest "data"); 8: Traced.hook_effects;
#                    9: Traced.zero_grads; 10: Traced.contiguous_outputs, size guards at 0 and 1
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
# code from these top-level packages is keyed by their versions / this package's hash, not recorded
# (a standard library name counts only where the module imported under it is the standard library's: a user's
# package named ``code``, ``trace`` or ``profile`` is the user's code)
_KEYED_ELSEWHERE = frozenset({"torch", "torchgen", "functorch", "sessa_compiler", "builtins", "__future__"})
_STDLIB_NAMES = frozenset(sys.stdlib_module_names)
_MAX_DEPTH = 12
_MAX_TENSOR_BYTES = 1 << 26  # plain tensor attributes / globals hashed by content up to 64 MiB


class NotKeyable(Exception):
    """A value the cache cannot fingerprint: whatever depends on it is not cached."""


# what a forward's environment reads run (os.environ's item lookup): their keys and values join the manifest;
# this package's own settings are keyed elsewhere (the options) or do not change a graph
_ENV_GETITEM = type(os.environ).__getitem__.__code__
_OWN_ENV = ("SESSA_COMPILER_",)
# files a forward opens for reading, and directories it lists, join the manifest by content (a table loaded with
# np.load / torch.load / open() inside forward is baked into the graph as a constant); seen through Python's
# audit events ("open", "os.listdir", "os.scandir"), which every such read raises, while a Recorder of this thread
# is reading. Not: the interpreter's own files, code imported (keyed by its source), the kernel's pseudo-files.
_NOT_DATA = ("/proc/", "/sys/", "/dev/")
_AUDITING = threading.local()     # .recorder: the Recorder reading on this thread (None: none)
_AUDIT_LOCK = threading.Lock()
_AUDIT_INSTALLED = False


def _audit(event, args):
    if event not in ("open", "os.listdir", "os.scandir"):   # the fast path: every audited event of the process
        return
    recorder = getattr(_AUDITING, "recorder", None)
    if recorder is not None:
        recorder._read(event, args)


def _install_audit_hook() -> None:
    global _AUDIT_INSTALLED
    with _AUDIT_LOCK:
        if not _AUDIT_INSTALLED:   # an audit hook cannot be removed: one for the process, idle unless recording
            sys.addaudithook(_audit)
            _AUDIT_INSTALLED = True


def data_digest(kind: str, path: str) -> str | None:
    """A file's content hash (kind "file") or a directory's sorted entry names, hashed (kind "dir"); None when it
    cannot be read."""
    if kind == "file":
        return file_hash(path)
    try:
        return stable_hash(sorted(os.listdir(path)))
    except OSError:
        return None


def _keyed_elsewhere(module_name) -> bool:
    """Whether code of this module is keyed by a version (torch's, Python's, this package's), not recorded."""
    if not isinstance(module_name, str):
        return True
    top = module_name.partition(".")[0]
    if top in _KEYED_ELSEWHERE:
        return True
    if top not in _STDLIB_NAMES:
        return False
    path = getattr(sys.modules.get(top), "__file__", None)   # (None: a builtin module, or not imported)
    return not isinstance(path, str) or os.path.abspath(path).startswith(_STDLIB)


def _user_module(v: types.ModuleType) -> str | None:
    """The source file of a module of the user's (not a library's, the standard library's or torch's), else None."""
    path = getattr(v, "__file__", None)
    return path if not _keyed_elsewhere(v.__name__) and isinstance(path, str) and users_file(path) else None


def _lenient(items, depth: int, active: set) -> tuple:
    """(name, fingerprint) of each item, a value that cannot be keyed by its type's name (a logger, a lock, a
    typing alias a user module imports: what a forward reads from it is keyed where it can be)."""
    out = []
    for k, x in items:
        if _library_object(x):   # (not walked: a logger reaches every logger of the process)
            out.append((k, ("unkeyed", _name(type(x)))))
            continue
        try:
            out.append((k, _fp(x, depth, active)))
        except NotKeyable:
            out.append((k, ("unkeyed", _name(type(x)))))
    return tuple(out)


_WALKED = _PLAIN + (tuple, list, dict, set, frozenset, types.FunctionType, types.BuiltinFunctionType,
                    types.BuiltinMethodType, types.ModuleType, type, functools.partial,
                    types.MethodType, types.SimpleNamespace, enum.Enum, torch.Tensor, torch.dtype, torch.device)


def _library_object(x) -> bool:
    """An object of a class of the standard library's or torch's (a logger, a lock, a parser), not a value or a
    container: it stands for its type."""
    return not isinstance(x, _WALKED) and not dataclasses.is_dataclass(x) and _keyed_elsewhere(type(x).__module__)


# -- fingerprints ---------------------------------------------------------------------------------------------
_CODE_FP: dict = {}
_CODE_LOCK = threading.Lock()


def code_fingerprint(code: types.CodeType) -> str:
    """sha256 of what a code object does: bytecode, constants (nested code recursively), names, variables,
    file and qualified name (line numbers are left out)."""
    fp = _CODE_FP.get(code)
    if fp is not None:
        return fp
    h = hashlib.sha256()
    for part in (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                 code.co_filename, code.co_qualname, code.co_argcount, code.co_posonlyargcount,
                 code.co_kwonlyargcount, code.co_flags):
        h.update(repr(part).encode())
        h.update(b"\0")
    for c in code.co_consts:
        h.update(code_fingerprint(c).encode() if isinstance(c, types.CodeType) else _const_repr(c).encode())
        h.update(b"\0")
    fp = h.hexdigest()
    with _CODE_LOCK:
        if len(_CODE_FP) > 100_000:
            _CODE_FP.clear()
        _CODE_FP[code] = fp
    return fp


def _const_repr(c) -> str:
    if isinstance(c, frozenset):  # iteration order depends on the process's string hashing
        return "frozenset(" + ",".join(sorted(_const_repr(x) for x in c)) + ")"
    if isinstance(c, tuple):
        return "(" + ",".join(_const_repr(x) for x in c) + ")"
    return f"{type(c).__name__}:{c!r}"


def fingerprint(value) -> str:
    """sha256 of a value as far as a trace could depend on it; raises NotKeyable for what it cannot see
    into (then the caller does not cache)."""
    try:
        return hashlib.sha256(repr(_fp(value, 0, set())).encode()).hexdigest()
    except NotKeyable:
        raise
    except Exception as e:  # noqa: BLE001 - a value that cannot be read (a property raising, a sparse tensor...)
        raise NotKeyable(f"a {_name(type(value))} that cannot be read ({type(e).__name__}: {e})") from None


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _fp(v, depth: int, active: set):
    if isinstance(v, _PLAIN):
        return (type(v).__name__, repr(v))
    if depth > _MAX_DEPTH:
        raise NotKeyable(f"a value nested more than {_MAX_DEPTH} levels deep ({type(v).__name__})")
    if isinstance(v, enum.Enum):
        return ("enum", _name(type(v)), v.name)
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size)):
        return ("torch", repr(v))
    if isinstance(v, types.ModuleType):
        path = _user_module(v)
        if path is None or id(v) in active:
            return ("module", v.__name__)
        # a module of the user's (settings.CFG["scale"], helpers.act rebound to a lambda): its file and what it
        # holds now, a value set at import from the environment or changed since the import included
        active.add(id(v))
        try:
            return ("module", v.__name__, file_hash(path),
                    _lenient(((k, x) for k, x in list(vars(v).items()) if not k.startswith("__")), depth + 1, active))
        finally:
            active.discard(id(v))
    if isinstance(v, type):
        return ("class", _name(v))
    if isinstance(v, (types.MemberDescriptorType, types.GetSetDescriptorType)):
        return ("descriptor", _name(v))
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        owner = getattr(v, "__self__", None)
        return ("builtin", getattr(v, "__module__", None), getattr(v, "__qualname__", None),
                None if owner is None or isinstance(owner, types.ModuleType) else _fp(owner, depth + 1, active))
    if isinstance(v, torch.Tensor):
        if type(v) not in (torch.Tensor, torch.nn.Parameter) or v.is_meta or v.layout != torch.strided:
            raise NotKeyable(f"a {type(v).__name__} tensor")
        nbytes = v.numel() * v.element_size()
        if nbytes > _MAX_TENSOR_BYTES:
            raise NotKeyable(f"a tensor of {nbytes} bytes outside the module's parameters and buffers")
        return ("tensor", str(v.dtype), tuple(v.shape), v.device.type, tensor_digest(v))
    key = id(v)
    if key in active:
        return ("cycle", type(v).__name__)
    active.add(key)
    try:
        return _fp_container(v, depth + 1, active)
    finally:
        active.discard(key)


def _fp_container(v, depth: int, active: set):
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_fp(x, depth, active) for x in v))
    if isinstance(v, (set, frozenset)):
        return (type(v).__name__, tuple(sorted(repr(_fp(x, depth, active)) for x in v)))
    if isinstance(v, types.MappingProxyType):
        v = dict(v)
    if isinstance(v, dict):  # in order: code may iterate it; a subclass's own attributes too
        extra = vars(v) if type(v) is not dict and isinstance(getattr(v, "__dict__", None), dict) else {}
        return (type(v).__name__, tuple((_fp(k, depth, active), _fp(x, depth, active)) for k, x in v.items()),
                _fp(dict(extra), depth, active) if extra else ())
    if isinstance(v, types.FunctionType):
        if _keyed_elsewhere(v.__module__):
            return ("fn", _name(v))
        cells = []
        for c in v.__closure__ or ():
            try:
                cells.append(_fp(c.cell_contents, depth, active))
            except ValueError:  # an empty cell
                cells.append(("empty",))
        # (its own attributes too: ``act.scale`` read inside ``act``)
        return ("fn", _name(v), code_fingerprint(v.__code__), _fp(v.__defaults__, depth, active),
                _fp(v.__kwdefaults__, depth, active), tuple(cells),
                _lenient(sorted(vars(v).items()), depth, active) if vars(v) else ())
    if isinstance(v, types.MethodType):
        return ("method", _fp(v.__func__, depth, active), _name(type(v.__self__)))
    if isinstance(v, functools.partial):
        return ("partial", _fp(v.func, depth, active), _fp(v.args, depth, active), _fp(v.keywords, depth, active))
    if isinstance(v, (property, staticmethod, classmethod)):
        return (type(v).__name__, _fp(getattr(v, "fget", None) or v.__func__, depth, active))
    if isinstance(v, torch.nn.Module):
        raise NotKeyable(f"a {type(v).__name__} module held outside the module tree")
    if dataclasses.is_dataclass(v):   # its fields, and what __post_init__ or a later assignment set beside them
        names = {f.name for f in dataclasses.fields(v)}
        extra = {k: x for k, x in (object_fields(v) or {}).items() if k not in names}
        return ("dataclass", _name(type(v)),
                tuple((f.name, _fp(getattr(v, f.name), depth, active)) for f in dataclasses.fields(v)),
                _fp(extra, depth, active) if extra else ())
    if type(v).__module__.partition(".")[0] == "numpy" and hasattr(v, "tobytes"):
        return ("numpy", type(v).__name__, str(getattr(v, "dtype", "")), getattr(v, "shape", ()),
                hashlib.sha256(v.tobytes()).hexdigest())
    fields = object_fields(v)
    if fields is not None:  # a config object: by class and fields
        return ("object", _name(type(v)), _fp(fields, depth, active))
    raise NotKeyable(f"a {_name(type(v))} object")


# -- the primary key ------------------------------------------------------------------------------------------
_FILE_HASHES: dict = {}


def file_hash(path: str) -> str | None:
    """sha256 of a file's content (memoised by its stat), or None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _FILE_HASHES.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    _FILE_HASHES[path] = (stamp, digest)
    return digest


def _class_files(cls, seen: dict) -> None:
    """The content hash of each class in cls's MRO outside torch, by file (None: no source file)."""
    for klass in cls.__mro__:
        if klass is object or _keyed_elsewhere(klass.__module__):
            continue
        try:
            path = inspect.getsourcefile(klass)
        except (TypeError, OSError):   # a builtin; a class defined in `python -c` (no source)
            path = None
        if path is None or not os.path.exists(path):
            seen[klass.__qualname__] = None
        elif path not in seen:
            seen[path] = file_hash(path)


_SKIPPED_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "training"})


def _attrs_fingerprint(sub: torch.nn.Module) -> str:
    """Every non-tensor attribute of a submodule (its registered tensors and children are keyed apart);
    hook dictionaries by their hooks in order (their keys are per-process handle ids)."""
    attrs = {k: list(v.values()) if "hooks" in k and isinstance(v, dict) else v
             for k, v in vars(sub).items() if k not in _SKIPPED_ATTRS}
    try:
        return fingerprint(attrs)
    except NotKeyable:
        for k, v in attrs.items():  # name the attribute
            try:
                fingerprint(v)
            except NotKeyable as e:
                raise NotKeyable(f"attribute '{k}' of {type(sub).__name__} holds {e}") from None
        raise


_CLASS_SKIPPED = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "_abc_impl"})


def _classes_fingerprint(cls, seen: dict) -> None:
    """The attributes of each class in cls's MRO outside torch (methods by their code): a method or class
    attribute replaced at run time misses, as an edit of the class's file does."""
    for klass in cls.__mro__:
        name = _name(klass)
        if klass is object or _keyed_elsewhere(klass.__module__) or name in seen:
            continue
        try:
            seen[name] = fingerprint({k: v for k, v in vars(klass).items() if k not in _CLASS_SKIPPED})
        except NotKeyable as e:
            raise NotKeyable(f"class {name} holds {e}") from None


def _helper_class_fingerprint(klass, seen: dict) -> None:
    """A helper object's class (or a settings class the module holds): each attribute fingerprinted where it can
    be, else by its type's name. Lenient, unlike the module's own classes: a library config class holding a
    typing alias (Hugging Face's PretrainedConfig) would otherwise make every model that holds one uncacheable."""
    name = _name(klass)
    if klass is object or name in seen:
        return
    out = {}
    for k, v in vars(klass).items():
        if k in _CLASS_SKIPPED:
            continue
        try:
            out[k] = fingerprint(v)
        except NotKeyable:
            out[k] = ("unkeyed", _name(type(v)))
    seen[name] = fingerprint(out)


def _global_hooks() -> list:
    """The global module hooks the user installed. torch's own are left out: torch.export installs one
    (a buffer-registration hook) for the length of an export, so a key computed while another thread
    exports would otherwise differ from the same module's key at any other moment; they are keyed by torch's
    version like the rest of torch."""
    from torch.nn.modules import module as nn_module

    def torchs(hook) -> bool:
        while isinstance(hook, (functools.partial, types.MethodType)):
            hook = hook.func if isinstance(hook, functools.partial) else hook.__func__
        return isinstance(hook, types.FunctionType) and _torch_module(hook.__module__)

    def users(hooks):
        hooks = list(hooks.values()) if isinstance(hooks, dict) else hooks
        return [h for h in hooks if not torchs(h)] if isinstance(hooks, list) else hooks

    names = [n for n in dir(nn_module) if n.startswith("_global_") and "hook" in n]
    return [(n, fingerprint(users(getattr(nn_module, n)))) for n in names]


def module_key(module: torch.nn.Module, args: tuple, kwargs: dict | None, modes: tuple,
               why: list | None = None) -> str | None:
    """The primary cache key of tracing ``module(*args, **kwargs)``, or None when the module cannot be keyed
    (a class without a source file, e.g. defined in a REPL; an attribute that cannot be fingerprinted); the
    reason is appended to ``why``. The manifest recorded while tracing is checked on top (load)."""
    try:
        return _module_key(module, args, kwargs, modes)
    except NotKeyable as e:
        if why is not None:
            why.append(str(e))
        return None


def _module_key(module, args, kwargs, modes) -> str:
    sources: dict = {}
    classes: dict = {}
    config = []
    for name, sub in module.named_modules(remove_duplicate=False):
        _class_files(type(sub), sources)
        _classes_fingerprint(type(sub), classes)
        config.append((name, _name(type(sub)), sub.extra_repr(), _attrs_fingerprint(sub),
                       fingerprint(type(sub).forward)))
    from .frontend.repeated import helper_classes
    from .frontend.trace import extra_keywords

    for klass in helper_classes(module):   # plain objects' classes (a scaling helper): their attributes and methods
        _helper_class_fingerprint(klass, classes)
    missing = [k for k, src in sources.items() if src is None]
    if missing:
        raise NotKeyable(f"class {missing[0]} has no source file (defined interactively?)")
    code = sorted(sources.values()) + [package_hash()]
    # a parameter's requires_grad too: the recognisers fold only what they may (trainable ones get a warning)
    # and which names hold one tensor (tied weights): the graph reads a tied tensor through one name
    tensors, first = [], {}
    for n, t, is_param in [*((n, t, True) for n, t in module.named_parameters(remove_duplicate=False)),
                           *((n, t, False) for n, t in module.named_buffers(remove_duplicate=False))]:
        tensors.append((n, tuple(t.shape), str(t.dtype), t.requires_grad) if is_param else
                       (n, tuple(t.shape), str(t.dtype)))
        if first.setdefault(id(t), n) != n:
            tensors.append(("tied", n, first[id(t)]))
    leaves, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(sorted((kwargs or {}).items()))))
    call = [(x.dim(), str(x.dtype), x.device.type, tuple(x.shape[2:])) if isinstance(x, torch.Tensor)
            else repr(x) for x in leaves]
    return stable_hash({"format": ENTRY_FORMAT, "code": code, "classes": classes, "config": config,
                        "tensors": tensors, "modes": list(modes), "call": call, "spec": str(spec),
                        "keyword_order": list(extra_keywords(module, kwargs or {})),
                        "versions": _versions(), "hooks": _global_hooks(),
                        # the dtype of the floats the forward makes (torch.arange(T) / 10.0)
                        "default_dtype": str(torch.get_default_dtype()),
                        # torch's global switches a forward may branch on (deterministic algorithms, ...)
                        "torch_flags": torch_flags()})


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple:
    from importlib import metadata

    out = []
    for dist in ("triton", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime"):
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, "missing"))
    return tuple(out)


def _versions() -> dict:
    """Python, torch, triton, tvm, onnx and sessa_compiler versions, read from the installed distributions'
    metadata (so that a cache lookup does not import triton or tvm)."""
    from ._version import __version__

    return {"python": sys.version, "torch": torch.__version__, "sessa_compiler": __version__,
            **dict(_installed_versions())}


# -- the manifest: what the trace ran -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def library_version(top: str) -> str | None:
    """The installed version of the distribution that provides top-level package ``top`` (None: unknown)."""
    from importlib import metadata

    try:   # a distribution named as its package (sympy, numpy): the imported package is that distribution's
        dist = metadata.distribution(top)   # files (a path comparison), else one RECORD read; not a scan of all
        if _imported_from(dist, top) or any(f.parts and f.parts[0] in (top, f"{top}.py") for f in dist.files or ()):
            return f"{dist.metadata['Name']}=={dist.version}"
    except (metadata.PackageNotFoundError, ValueError):
        pass
    dists = _packages_distributions().get(top) or []
    for dist in dists:
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _imported_from(dist, top: str) -> bool:
    """Whether the imported module ``top`` is the file that ``dist`` installs (``top/__init__.py`` or ``top.py``
    at the distribution's location): reading a RECORD costs up to ~0.1 s (sympy's, numpy's) on a warm compile."""
    origin = getattr(sys.modules.get(top), "__file__", None)
    if not origin:
        return False
    origin = os.path.realpath(origin)
    return any(os.path.realpath(str(dist.locate_file(rel))) == origin for rel in (f"{top}/__init__.py", f"{top}.py"))


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict:
    from importlib import metadata

    return metadata.packages_distributions()


def _resolve(module_name: str, path: str):
    """The object at ``module.path`` in this process (nothing imported), or raise LookupError."""
    mod = sys.modules.get(module_name)
    if mod is None:
        raise LookupError(f"module {module_name} is not imported")
    obj = mod
    for part in path.split("."):
        if part.startswith("<"):
            raise LookupError(f"{module_name}.{path} is a nested function")
        try:
            obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
        except AttributeError:
            raise LookupError(f"{module_name}.{path} no longer exists") from None
    return obj


def _code_of(obj):
    """The code object of a function, method or property (None for anything else)."""
    if isinstance(obj, (staticmethod, classmethod, types.MethodType)):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = obj.fget
    return obj.__code__ if isinstance(obj, types.FunctionType) else None


def _torch_module(name) -> bool:
    return isinstance(name, str) and name.partition(".")[0] == "torch"


def _torchs(cls) -> bool:
    return isinstance(cls, type) and _torch_module(cls.__module__)


_PLAIN_ARG = _PLAIN + (type(Ellipsis), torch.dtype, torch.device, torch.layout, torch.memory_format,
                       torch.SymInt, torch.SymFloat, torch.SymBool)
# third-party libraries torch's tracing itself runs (symbolic sizes, graph passes): keyed by their versions when
# the hook was off inside torch's functions (it would have seen them run)
_TORCH_RUNS = ("sympy", "mpmath", "networkx", "numpy", "typing_extensions")
_OWN_NAMESPACES = frozenset({"aten", "prims", "sessa_compiler"})   # the ops whose Python is torch's or this package's


def _plain(x, depth: int = 0) -> bool:
    """Whether torch can run no user code through ``x``: torch's own tensors, numbers, strings, dtypes,
    symbolic sizes, and lists/tuples/dicts/slices of those (a user object could be called back: its
    ``__index__``, ``__len__``, ``__torch_function__``, a callable)."""
    t = type(x)
    if t in _PLAIN_ARG:
        return True
    if isinstance(x, torch.Tensor):
        return _torchs(t)
    if depth > 8:
        return False
    if t in (list, tuple) or (isinstance(x, tuple) and _torchs(t)):   # torch.Size, torch.return_types
        return all(_plain(v, depth + 1) for v in x)
    if t is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in x.items())
    if t is slice:
        return _plain(x.start, depth + 1) and _plain(x.stop, depth + 1) and _plain(x.step, depth + 1)
    return False


def _modes_are_torchs() -> bool:
    """Whether every active torch function mode is torch's (one of the user's sits below _OffInTorch: its
    ``__torch_function__`` would run inside a call the hook is off for)."""
    return all(_torchs(type(m)) for m in torch.overrides._get_current_function_mode_stack())


def _torch_own(func, args, kwargs) -> bool:
    """Whether calling ``func(*args, **kwargs)`` runs only torch's code (and this package's): torch's function
    or tensor method, or an operator of aten/prims/this package, on plain arguments, with no torch dispatch
    mode of anyone else's active (its ``__torch_dispatch__`` would run inside)."""
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        if str(getattr(func, "__module__", "")).rpartition(".")[2] not in _OWN_NAMESPACES:   # torch._ops.<ns>
            return False
    elif isinstance(func, torch._ops.HigherOrderOperator):   # cond, map, ...: they call the user's functions
        return False
    else:
        owner = getattr(func, "__objclass__", None) or getattr(getattr(func, "__self__", None), "__objclass__", None)
        if owner is not None:
            if not _torchs(owner):
                return False
        elif not _torch_module(getattr(func, "__module__", None)):
            return False
    if not (_plain(args) and _plain(kwargs or {})):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return all(_torchs(type(m)) for m in _get_current_dispatch_mode_stack())


def _loaded_globals(code) -> frozenset:
    from .frontend.repeated import loaded_globals

    return loaded_globals(code)


class _OffInTorch(torch.overrides.TorchFunctionMode):
    """While the recorder is on, turns its profile hook off for the length of each call of one of torch's own
    functions on plain arguments (``_torch_own``): inside, torch.export's tracing machinery (fake tensors,
    proxies, symbolic shapes: nearly all of a trace's Python) runs, and no user code can. A profile hook slows
    every Python instruction while it is set (about 2x for torch.export of a 12-layer decoder, even a hook that
    does nothing); with it off inside torch's functions, recording costs little. Any other call (a higher-order
    op, a callable or user object among the arguments, a user's operator or tensor subclass, a user's dispatch
    mode) runs with the hook on, so everything of the user's that runs is still recorded."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_dynamo_compiling():   # dynamo tracing (torch.cond's branches): the hook stays as it is
            return func(*args, **kwargs)
        if sys.getprofile() != self.hook or not _torch_own(func, args, kwargs):
            return func(*args, **kwargs)
        sys.setprofile(None)
        try:
            return func(*args, **kwargs)
        finally:
            if sys.getprofile() is None:
                sys.setprofile(self.hook)


class Recorder:
    """A profile hook (sys.setprofile, this thread only, while the module's forward runs; not installed, and the
    trace not cached, where a profiler is already active) that records, while a module is traced, the manifest of everything the trace ran outside torch, the standard library
    and this package. Use as a context manager; ``manifest()`` afterwards (None when it is not cacheable,
    with the reason in ``.why``)."""

    def __init__(self, module: torch.nn.Module | None = None):
        self._module = module
        self._handles: list = []
        self._started = module is None
        self._thread = threading.get_ident()
        self._seen: dict = {}          # id(code) -> code, once looked at
        self._user: dict = {}          # code -> (module name, qualname, filename)
        self._libraries: dict = {}     # top-level package -> a file of it (for an unversioned library)
        self._globals: dict = {}       # (module name, global name) -> fingerprint
        self._environ: dict = {}       # environment variable -> its value (None: unset) when the trace read it
        self._data: dict = {}          # (kind "file" | "dir", path as the forward named it) -> None until manifest()
        self._reading = False          # inside the module's forward (audit events of this thread are recorded)
        self.why: str | None = None
        self._sites = _site_dirs()
        self._off_in_torch = None      # _OffInTorch while recording
        self.off_in_torch = False      # whether the hook was off inside torch's functions

    def __enter__(self):
        """Record while the module's forward runs in this thread (torch.export calls it once; the rest of the
        trace is torch and this package), or, without a module, until exit."""
        if sys.getprofile() is not None:  # a profiler of the user's: leave it alone, and do not cache this trace
            self.why = "another profiler (sys.setprofile) was active while tracing"
            return self
        _install_audit_hook()
        _AUDITING.recorder = self
        if self._module is None:
            self._reading = True
            sys.setprofile(self._hook)
            return self

        hook = self._hook   # one bound method: the profile function, compared by identity below
        if _modes_are_torchs():   # below the modes torch.export enters: they hand each call on to it
            self._off_in_torch = _OffInTorch(hook)
            self._off_in_torch.__enter__()
            self.off_in_torch = True

        def start(*_):
            if threading.get_ident() == self._thread and sys.getprofile() is None:
                self._started = True
                self._reading = True
                sys.setprofile(hook)

        def stop(*_):
            if threading.get_ident() == self._thread and sys.getprofile() is hook:
                self._reading = False
                sys.setprofile(None)
        self._handles = [self._module.register_forward_pre_hook(start, prepend=True),
                         self._module.register_forward_hook(stop, always_call=True)]
        return self

    def _leave_torch_mode(self):
        if self._off_in_torch is not None:
            mode, self._off_in_torch = self._off_in_torch, None
            stack = torch.overrides._get_current_function_mode_stack()
            if stack and stack[-1] is mode:   # (else a mode entered since was left on the stack: ours stays
                mode.__exit__(None, None, None)   # below it, passing every call through)

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        if sys.getprofile() == self._hook:
            sys.setprofile(None)
        self._reading = False
        if getattr(_AUDITING, "recorder", None) is self:
            _AUDITING.recorder = None
        self._leave_torch_mode()
        return False

    def _read(self, event, args):
        """An audit event of this thread: a file opened for reading or a directory listed by the forward."""
        if not self._reading:
            return
        try:
            path = args[0]
            if event == "open":
                mode, flags = args[1], args[2]
                reads = ("r" in mode or "+" in mode) if isinstance(mode, str) else \
                    (flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)
                if not reads:
                    return
            if path is None or isinstance(path, int):   # an open descriptor: its file was named when opened
                return
            path = os.fsdecode(os.fspath(path))
            full = os.path.abspath(path)
            if full.startswith(_NOT_DATA) or full.startswith(self._sites) or full.startswith(_STDLIB) \
                    or f"{os.sep}__pycache__{os.sep}" in full or full.endswith((".py", ".pyc", ".so")):
                return   # (code is keyed by its source: a .py a lazy import opens is recorded when it runs)
            self._data.setdefault(("file" if event == "open" else "dir", path), None)
        except Exception as e:  # noqa: BLE001 - never break the trace: then it is not cached
            self.why = self.why or f"recording a file the forward read failed ({type(e).__name__}: {e})"

    def _hook(self, frame, event, arg):
        if event != "call" or id(frame.f_code) in self._seen:  # the fast path: ~2.4 M events for a 12-layer
            return  # decoder (by id: hashing a code object hashes its bytecode)
        reading, self._reading = self._reading, False   # (the files fingerprinting opens are not the forward's)
        try:
            self._record(frame)
        except Exception as e:  # noqa: BLE001 - recording must never break the trace: then it is not cached
            self.why = self.why or f"recording what the trace ran failed ({type(e).__name__}: {e})"
        finally:
            self._reading = reading

    def _record(self, frame):
        code = frame.f_code
        if code is _ENV_GETITEM:   # os.environ[...] / .get / getenv / `in`: every read (never marked seen)
            key = frame.f_locals.get("key")
            if isinstance(key, str) and not key.startswith(_OWN_ENV):
                self._environ.setdefault(key, os.environ.get(key))
            return
        self._seen[id(code)] = code  # held, so that its id is not reused by another code object
        g = frame.f_globals
        name = g.get("__name__")
        if _keyed_elsewhere(name) or name.startswith("namedtuple_") or code.co_name == "<module>":
            return  # keyed elsewhere; collections.namedtuple's generated code; an import (what it defined is read)
        top = name.partition(".")[0]
        if top in self._libraries or code.co_filename.startswith(self._sites) or self._installed(top):
            self._libraries.setdefault(top, code.co_filename)
            return
        self._user[code] = (name, code.co_qualname, code.co_filename)
        for n in _loaded_globals(code):   # (not every name in co_names: self.out does not read a global 'out')
            if n in g and (name, n) not in self._globals:
                try:
                    self._globals[(name, n)] = global_fingerprint(g[n])
                except NotKeyable as e:
                    self._globals[(name, n)] = None
                    self.why = self.why or f"global {name}.{n} holds {e}"

    def _installed(self, top: str) -> bool:
        """Whether package ``top`` lives in site-packages (its generated code, e.g. '<decorator-gen>', too)."""
        path = getattr(sys.modules.get(top), "__file__", None)
        return isinstance(path, str) and path.startswith(self._sites)

    def manifest(self) -> dict | None:
        """{"files", "functions", "globals", "libraries"} to check on lookup, or None (not cacheable)."""
        if self.why is None and not self._started:  # never a manifest that saw nothing of the module's code
            self.why = "the module's forward did not run through its hooks while tracing"
        if self.why is not None:
            return None
        files, functions, libraries = {}, {}, {}
        if self.off_in_torch:   # the libraries torch's tracing runs inside its functions, unseen by the hook
            for top in _TORCH_RUNS:
                if top in sys.modules and library_version(top) is not None:
                    libraries[top] = library_version(top)
        for top, path in self._libraries.items():
            version = library_version(top)
            if version is not None:
                libraries[top] = version
            else:
                files[path] = file_hash(path)
        for code, (mod, qualname, filename) in self._user.items():
            if not os.path.exists(filename):  # generated code (a dataclass's __init__): its module's file made it
                filename = getattr(sys.modules.get(mod), "__file__", None) or filename
            digest = file_hash(filename)
            if digest is None:
                self.why = f"{mod}.{qualname} has no source file ({filename})"
                return None
            files[filename] = digest
            for path in self._names_of(code, mod, qualname):
                try:
                    functions[(mod, path)] = fingerprint(_resolve(mod, path))
                except (LookupError, NotKeyable):
                    continue
        data = {}
        for kind, path in self._data:   # (None: it did not exist; a file made since is a miss too)
            data[f"{kind}:{path}"] = data_digest(kind, path)
        return {"files": files, "functions": functions, "globals": dict(self._globals), "libraries": libraries,
                "environ": dict(self._environ), "data": data}

    @staticmethod
    def _names_of(code, mod: str, qualname: str) -> list:
        """Where code can be found again: its qualified name, else module-level names bound to it."""
        try:
            if _code_of(_resolve(mod, qualname)) is code:
                return [qualname]
        except LookupError:
            pass
        module = sys.modules.get(mod)
        return [k for k, v in list(vars(module).items()) if _code_of(v) is code] if module is not None else []


def global_fingerprint(v):
    """A global's fingerprint for the manifest. A user module read as a global (``consts.K``, ``settings.CFG``) is
    keyed by its file's content and everything it holds now (``fingerprint``). A user class (``Cfg.scale``,
    ``Opts.scales[0]``) read as a global stands for its file's content and its attributes: the name alone missed
    an edited constant there, or one computed from the environment at import. A library's module or class is keyed
    by the library's version (elsewhere)."""
    if isinstance(v, type):
        module = sys.modules.get(getattr(v, "__module__", None))
        path = _user_module(module) if isinstance(module, types.ModuleType) else None
        if path is not None:
            attrs = _lenient(((k, x) for k, x in list(vars(v).items()) if k not in _CLASS_SKIPPED), 1, {id(v)})
            return (fingerprint(v), file_hash(path), hashlib.sha256(repr(attrs).encode()).hexdigest())
    return fingerprint(v)


def check_manifest(manifest: dict) -> str | None:
    """Why this process no longer runs what the trace ran (a changed file, function, global or library), or
    None when everything recorded still holds."""
    for top, version in manifest["libraries"].items():
        if library_version(top) != version:
            return f"library {top} is now {library_version(top)}, traced with {version}"
    for path, digest in manifest["files"].items():
        if file_hash(path) != digest:
            return f"{path} changed"
    for (mod, path), fp in manifest["functions"].items():
        try:
            now = fingerprint(_resolve(mod, path))
        except (LookupError, NotKeyable) as e:
            return f"{mod}.{path} cannot be checked ({e})"
        if now != fp:
            return f"{mod}.{path} is not the function that was traced (edited or replaced)"
    for key, value in manifest.get("environ", {}).items():
        if os.environ.get(key) != value:
            return f"environment variable {key} is now {os.environ.get(key)!r}, traced with {value!r}"
    for key, digest in manifest.get("data", {}).items():
        kind, _, path = key.partition(":")
        if data_digest(kind, path) != digest:
            return f"{'file' if kind == 'file' else 'directory'} {path} (read by the forward) changed"
    for (mod, name), fp in manifest["globals"].items():
        module = sys.modules.get(mod)
        if module is None or name not in vars(module):
            return f"global {mod}.{name} no longer exists"
        try:
            if global_fingerprint(vars(module)[name]) != fp:
                return f"global {mod}.{name} changed"
        except NotKeyable as e:
            return f"global {mod}.{name} holds {e}"
    return None


# -- entries --------------------------------------------------------------------------------------------------
def _path(key: str) -> Path:
    return cache_dir() / "traced" / f"{key}.pkl"


def load(key: str, module: torch.nn.Module, why: list | None = None):
    """The cached Traced for this key with its graph parsed back from the IR text and its parameters
    bound (the module's own tensors, plus the cached constants), or None (why a miss: appended to ``why``).
    Read only from a trusted directory; an entry whose manifest does not hold in this process is a miss."""
    from .frontend.lower import as_pairs, pair_source
    from .frontend.trace import Traced
    from .ir import parse

    why = why if why is not None else []
    p = _path(key)
    if not p.exists():
        why.append("no entry")
        return None
    if not trusted(cache_dir(), p):
        why.append("the cache directory or entry is not trusted")
        return None
    try:
        with open(p, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec deprecation, raised on unpickling
            entry = pickle.load(f)
        if entry.get("format") != ENTRY_FORMAT or entry.get("key") != key:
            raise ValueError("foreign or stale entry")
        stale = check_manifest(entry["manifest"])
        if stale is not None:
            why.append(stale)
            return None
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(module.named_buffers(remove_duplicate=False))
        for name, digest in entry["buffers"].items():   # what the recognisers looked at and left as it was
            if name not in state or tensor_digest(state[name]) != digest:
                why.append(f"the module's buffer '{name}' differs from the traced module's (recognition may differ)")
                return None
        graph = parse(entry["ir"])
        graph.sources = dict(entry["sources"])   # the user's lines the values came from (errors, explain, warnings)
        for name in graph.param_values:   # the module's state (a complex X as "X.as_real": a view of it), else constants
            source = pair_source(name, state)
            graph.params[name] = state[name] if name in state else as_pairs(state[source]) if source is not None \
                else entry["constants"][name]
        traced = entry["traced"]
        if not isinstance(traced, Traced):
            raise ValueError("not a traced graph")
        for name, digest in traced.assumed:   # what the recognisers built from the traced module's values
            source = name if name in state else pair_source(name, state)
            if source is None:
                continue   # a constant the trace lifted from the code (the manifest covers the code)
            if tensor_digest(state[source]) != digest:
                why.append(f"the module's '{source}' differs from the traced module's, and a recognised op was built "
                           "from its values")
                return None
        return dataclasses.replace(traced, graph=graph)
    except Exception as e:  # noqa: BLE001 - a bad entry is a miss, never a crash
        warnings.warn(f"sessa_compiler compile cache: entry {p} does not load ({type(e).__name__}: {e}); "
                      "tracing again and replacing it", stacklevel=4)
        why.append("the entry does not load")
        try:
            os.replace(p, p.with_suffix(".corrupt"))
        except OSError:
            pass
        return None


def _buffer_digests(graph, module: torch.nn.Module) -> dict:
    """{buffer name: digest} of the module's buffers the graph still reads. A recogniser that looked at a buffer's
    values and left the ops as they were (a table that is not a rotary embedding, a mask that is not causal) decided
    from those values as much as one that folded them (Traced.assumed): an entry traced from other values is not
    this module's graph. (Parameters are left out: they change at every training step, and no recogniser declines
    on a parameter's values without folding it.)"""
    from .frontend.lower import pair_source

    buffers = dict(module.named_buffers(remove_duplicate=False))
    out = {}
    for name in graph.param_values:
        source = name if name in buffers else pair_source(name, buffers)
        if source is not None and source not in out:
            out[source] = tensor_digest(buffers[source])
    return out


def store(key: str, traced, module: torch.nn.Module, manifest: dict) -> None:
    """Write the traced graph (IR text, metadata, the tensors that are not the module's, and the manifest of
    what the trace ran) atomically. A failure to write only costs the next process a trace."""
    from .frontend.lower import pair_source

    state = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    state |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
    graph = traced.graph
    entry = {"format": ENTRY_FORMAT, "key": key, "ir": str(graph), "sources": dict(graph.sources), "manifest": manifest,
             "buffers": _buffer_digests(graph, module),
             "constants": {n: t for n, t in graph.params.items()   # the module's own state is not stored
                           if n in graph.param_values and n not in state and pair_source(n, state) is None},
             "traced": dataclasses.replace(traced, graph=None)}
    p = _path(key)
    try:
        make_private_dir(p.parent)
        if not trusted(cache_dir(), p.parent):
            return
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(entry, f)
        os.replace(tmp, p)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"sessa_compiler compile cache: could not write {p} ({type(e).__name__}: {e})", stacklevel=4)


def recorded_trace(trace, module: torch.nn.Module, key: str | None, why: list):
    """``trace()`` under a Recorder; the result is stored under ``key`` when the manifest is complete (else
    the reason goes to ``why``). The profile hook is removed however the trace ends."""
    if key is None:
        return trace()
    with Recorder(module) as recorder:
        traced = trace()
    manifest = recorder.manifest()
    if manifest is None:
        why.append(f"not cacheable: {recorder.why}")
        return traced
    store(key, traced, module, manifest)
    return traced
