"""Identical layers are traced once: a model of N layers of one class (same structure, same non-tensor
attributes, other weights) pays for one layer's torch.export and lowering, not N.

How (frontend/trace.py drives it, through ``Plan``):

1. ``groups``: submodules are grouped by a *signature* that fixes what the Python of their ``forward`` can
   branch on while torch.export traces it: the class, every submodule's class and training flag, the names,
   shapes, dtypes, devices and ``requires_grad`` of parameters and buffers (their values are fake while
   exporting, so they cannot steer the Python), and the names of every other attribute. Their values count where
   a layer's trace reads them (``_Reads``, ``LayerTrace.same_reads``): by value (numbers, strings, dtypes, tuples
   of them), by content (plain tensor attributes, which export keeps real), by identity and what they hold
   (config objects) or by identity (functions). Modules with hooks are left alone. The outermost groups of two or
   more are used.
2. The model is exported with each grouped layer's ``forward`` replaced by the custom op
   ``sessa_compiler::shared_layer``. The first time a group meets a kind of call (``_call_key``: the arguments'
   structure, dtypes, ranks, sizes past the batch and sequence dims, constant keywords), the export stops
   (``NeedTrace``), one layer of the group is traced on its own (``trace_layer``: torch.export with batch and
   sequence symbolic, lowered to the IR; where a dim past those two is a size of the model's export, such as a
   [B, 1, T, T] mask's, every symbolic dim of the call is a named dim, one per symbol: ``_call_dims``) on zeros
   of the sizes met, and the model's export starts again. A layer
   whose trace carries size guards, uses other symbols, or returns anything but a tensor or a tuple of tensors is
   traced inline instead, as is any call under autocast or of a layer whose signature, or a global its code
   reads (``_global_reads``), changed by then.
3. The op's fake returns the traced layer's output types; lowering the op (``_inline``) copies the layer's IR with
   its parameters renamed to this instance's and its dims rewritten in the model's symbols (a static size that
   differs, or a symbol bound to two sizes, fails the lowering, and the model is then exported in full). The
   recognisers then see the graph a full trace would give.
"""
from __future__ import annotations

import argparse
import dis
import enum
import functools
import hashlib
import itertools
import sys
import threading
import types
from dataclasses import dataclass, field

import sympy
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from ..ir.graph import Graph, Value
from ..ir.types import TensorType
from ..persistent_cache import object_fields, tensor_digest, users_file
from .lower import CONSTANT_TYPES, LOWERINGS, PAIR_SUFFIX, as_pairs

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict, torch.nn.ParameterList,
               torch.nn.ParameterDict)
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
               "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_is_full_backward_hook", "_compiled_call_impl"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


class _Opaque(Exception):
    """An attribute whose value the signature cannot describe."""


def _attr_key(x, depth: int = 0, by_content: bool = True):
    """A comparable description of a value the Python of a layer can read: plain values and containers by value,
    tensors by content (``by_content``; else by identity and version, for a value compared with itself over
    time), plain objects by identity and their attributes (a config object one layer's forward sets), functions,
    classes and modules by identity. Raises _Opaque for what cannot be described."""
    if isinstance(x, _PLAIN):
        return (type(x).__name__, x)
    if isinstance(x, (tuple, list, frozenset, set)) and depth < _DEPTH:
        items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
        return (type(x).__name__, tuple(_attr_key(y, depth + 1, by_content) for y in items))
    if isinstance(x, dict) and depth < _DEPTH and all(isinstance(k, _PLAIN) for k in x):
        return ("dict", tuple((repr(k), _attr_key(v, depth + 1, by_content)) for k, v in x.items()))
    if isinstance(x, torch.Tensor):   # a plain tensor attribute: export keeps it real, so its values count
        if x.device.type == "meta" or isinstance(x, FakeTensor):
            raise _Opaque
        if not by_content and not x.is_inference():   # (an inference tensor has no version counter: by content)
            return ("tensor", id(x), x._version)
        if x.numel() > (1 << 22):
            raise _Opaque
        try:
            return ("tensor", tensor_digest(x))
        except Exception:  # noqa: BLE001 - a tensor subclass or dtype without bytes: not described
            raise _Opaque from None
    if isinstance(x, torch.nn.Module):
        raise _Opaque   # a module held outside _modules (shared with others): left alone
    if type(x).__module__ == "numpy" and hasattr(x, "tobytes") and hasattr(x, "dtype"):
        # a numpy array or scalar (torch.from_numpy(self.table) in forward): by content, as it has no version
        # counter; held by identity only, an in-place edit after a trace from the compile cache (whose constant is
        # a copy) was not seen. Past 1 MB: not described (hashing it at every call would cost more than a call)
        if getattr(x, "nbytes", 0) > (1 << 20):
            raise _Opaque
        return ("ndarray", str(x.dtype), tuple(getattr(x, "shape", ())), hashlib.sha256(x.tobytes()).hexdigest())
    if isinstance(x, types.FunctionType):   # by identity, and what its closure cells, defaults and attributes hold now
        own = vars(x)   # (``act.scale`` read inside ``act``)
        if depth >= _DEPTH or not (x.__closure__ or x.__defaults__ or x.__kwdefaults__ or own):
            return ("id", id(x))
        return ("fn", id(x), tuple(_cell_key(c, depth + 1, by_content) for c in x.__closure__ or ()),
                _attr_key(x.__defaults__, depth + 1, by_content), _attr_key(x.__kwdefaults__, depth + 1, by_content),
                tuple((k, _lenient_key(v, depth + 1, by_content)) for k, v in own.items()))
    if isinstance(x, types.MethodType):     # a bound method: its function and what its object holds
        try:
            return ("method", id(x.__func__), _attr_key(x.__self__, depth + 1, by_content))
        except _Opaque:   # a module's method
            return ("method", id(x.__func__), id(x.__self__))
    if isinstance(x, type) and depth < _DEPTH and _config_like(x) and not issubclass(x, (torch.nn.Module, torch.Tensor,
                                                                                        enum.Enum)):
        # a settings class of the user's read in forward (``Opts.scales[0]``): its identity and its data attributes
        return ("class", id(x), tuple((k, _lenient_key(v, depth + 1, by_content)) for k, v in list(vars(x).items())
                                      if not k.startswith("__") and not _functions_in(v)))
    if isinstance(x, (types.BuiltinFunctionType, types.ModuleType, type)) or not _config_like(type(x)):
        return ("id", id(x))
    fields = object_fields(x) if depth < _DEPTH else None
    if fields is not None:   # a config object: its identity and what it holds now
        return ("obj", id(x), tuple((k, _attr_key(v, depth + 1, by_content)) for k, v in fields.items()
                                    if isinstance(k, str)))
    return ("id", id(x))


_DEPTH = 4   # how deep containers, config objects (a sub-config of a config) and closures are described


def _config_like(klass) -> bool:
    """Whether a value held inside another is described by what it holds: the user's classes, dataclasses and
    namespaces, not the standard library's or torch's other objects (a logger's manager, a lock), which are
    held by identity: their state changes without changing what a forward computes."""
    top = str(klass.__module__).partition(".")[0]
    return klass in (types.SimpleNamespace, argparse.Namespace) or "__dataclass_fields__" in vars(klass) or not (
        top in sys.stdlib_module_names or top in ("torch", "builtins", "numpy"))


def _cell_key(cell, depth: int, by_content: bool):
    """A closure cell by what it holds (a list a hook multiplies by, a tensor it adds); what cannot be described
    by its identity."""
    try:
        v = cell.cell_contents
    except ValueError:   # an empty cell
        return ("empty",)
    return _lenient_key(v, depth, by_content)


def _lenient_key(v, depth: int, by_content: bool):
    """_attr_key, or the value's identity where it cannot be described."""
    try:
        return _attr_key(v, depth, by_content)
    except _Opaque:
        return ("id", id(v))


def hook_name(kind: str, fn, where: str) -> str:
    """How a hook is named in messages and in Traced.hook_effects: "forward hook save of 'layers.0'"."""
    what = kind.strip("_").replace("global_", "").replace("_", " ").removesuffix("s")
    return f"{what} {getattr(fn, '__qualname__', type(fn).__qualname__)} of {where}"


GLOBAL_HOOKS_WHERE = "torch's global module hooks"


def _code_of(fn):
    """The Python function a callable runs (a hook: a function, a bound method, a partial, a callable object)."""
    for _ in range(4):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif not isinstance(fn, types.FunctionType) and isinstance(getattr(type(fn), "__call__", None), types.FunctionType):
            fn = type(fn).__call__
    return fn


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:   # an empty cell
        return None


def _functions_in(v) -> list:
    """The plain functions behind a class attribute or callable: a function, a bound method's, a staticmethod's
    or classmethod's, a property's getter, setter and deleter, a functools.partial's."""
    if isinstance(v, types.FunctionType):
        return [v]
    if isinstance(v, (staticmethod, classmethod, types.MethodType)):
        return _functions_in(v.__func__)
    if isinstance(v, property):
        return [f for x in (v.fget, v.fset, v.fdel) for f in _functions_in(x)]
    if isinstance(v, functools.partial):
        return _functions_in(v.func)
    return []


# The compiled module's own class (sc.compile of a submodule, inside a module compiled again): its state (the
# trace it holds, its lock, its statistics) and its code are the compiler's, not what the outer trace ran; its
# original is its child ``_orig_mod``, guarded as any module. Guarding them made every call of the outer module
# after the inner one's first trace again (the inner '_traced' and a global of sessa_compiler.api changed).
WRAPPER_MODULE = "sessa_compiler.api"


def compiler_wrapper(m) -> bool:
    return type(m).__module__ == WRAPPER_MODULE


def others_code(klass) -> bool:
    """A class whose code and attributes are not the user's: torch's, Python's builtins, the compiled module's."""
    return str(klass.__module__).startswith(("torch", "builtins")) or klass.__module__ == WRAPPER_MODULE


def helper_classes(module: torch.nn.Module) -> list:
    """The classes of the plain objects the module and its submodules hold (not modules, tensors, functions or
    builtin values: a scaling helper, a config object), outside torch and the standard library: their methods run
    in forward as the module's do, and their class attributes are read as its are."""
    out = {}
    for m in module.modules():
        if compiler_wrapper(m):
            continue
        for v in _vars(m).values():
            # a class held itself (self.cfg = CFG, a settings class whose attributes come from the environment)
            k = v if isinstance(v, type) and not issubclass(v, (torch.nn.Module, torch.Tensor)) else type(v)
            if (k is type(v) and (isinstance(v, (torch.nn.Module, torch.Tensor, type, types.FunctionType,
                                                 types.MethodType, types.ModuleType, types.BuiltinFunctionType))
                                  or not hasattr(v, "__dict__"))) or not _config_like(k):
                continue
            out[k] = None
    return [c for k in out for c in k.__mro__ if c is not object and _config_like(c)]


def _global_reads(module: torch.nn.Module, skip_hooks=(), names: set | None = None) -> list:
    """(globals dict, name, by identity) of every global the code of module's classes reads, and of the functions
    defined outside torch that this code reaches through globals (a helper in another file), transitively; the
    code of its forward hooks too, but for those named in ``skip_hooks`` (hooks the graph does not depend on).
    Attributes of imported modules the code may read (``ops.act``) are there with the module's namespace as the
    dict, to be compared by identity (by identity: True)."""
    from torch.nn.modules import module as nn_module

    # the helper objects' methods first: popped last, after the module's own code and what it reaches
    funcs = [f for k in helper_classes(module) for v in vars(k).values() for f in _functions_in(v)]
    for path, m in module.named_modules():
        for klass in type(m).__mro__:
            if others_code(klass):
                continue
            funcs.extend(f for v in vars(klass).values() for f in _functions_in(v)
                         if not getattr(f, "_sessa_reads", False))
        funcs.extend(_functions_in(vars(m).get("forward")))   # a forward set on the instance
        where = f"'{path or type(module).__name__}'"
        for h in ("_forward_hooks", "_forward_pre_hooks"):   # what the hooks' code reads (a steering coefficient)
            funcs.extend(_code_of(f) for f in (getattr(m, h, None) or {}).values()
                         if hook_name(h, f, where) not in skip_hooks)
    for h in ("_forward_hooks", "_forward_pre_hooks"):
        funcs.extend(_code_of(f) for f in getattr(nn_module, f"_global{h}", {}).values()
                     if hook_name(h, f, GLOBAL_HOOKS_WHERE) not in skip_hooks)
    funcs = [f for f in funcs if isinstance(f, types.FunctionType)]
    reads, seen = {}, set()
    while funcs and len(seen) < 512:
        f = funcs.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        # what a decorator wraps (functools.wraps' __wrapped__, a closure's functions), before the decorator's own
        # module is skipped: torch.no_grad() around a forward (HF's rotary embeddings) is torch's code, the
        # function inside it the user's
        funcs.extend(_functions_in(getattr(f, "__wrapped__", None)))
        funcs.extend(x for c in (f.__closure__ or ()) for x in _functions_in(_cell(c)))
        g = f.__globals__
        if str(g.get("__name__", "")).partition(".")[0] in ("torch", "typing", "functools", "builtins"):
            continue
        codes = [f.__code__]
        while codes:
            code = codes.pop()
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
            code_names = set(code.co_names)
            if names is not None:   # every name the code reads (the caller looks for some: is_grad_enabled)
                names |= code_names
            spaces = [g]   # the globals, then the imported modules the code reaches through them (ops.act,
            for _ in range(3):   # F.scaled_dot_product_attention, torch.nn.functional.gelu): a helper rebound there
                more = []
                for d in spaces:
                    # in the function's globals, the names it loads as globals (co_names also holds the attributes
                    # it reads: a script's global ``out`` is not read by ``self.out``); in a module reached through
                    # them, the attribute names
                    for n in (loaded_globals(code) if d is g else code_names).intersection(d):
                        v = d[n]
                        if (id(d), n) not in reads or (d is g and reads[(id(d), n)][2]):
                            # (a namespace met as a module's attributes first and as a function's globals later
                            # is described: a dict there changed in place counts)
                            # (a user's module's attributes by what they hold: settings.CFG["scale"] = 2.0)
                            reads[(id(d), n)] = (d, n, d is not g and not _users_namespace(d))
                            if isinstance(v, types.FunctionType):
                                funcs.append(v)
                        if isinstance(v, types.ModuleType) and isinstance(getattr(v, "__dict__", None), dict):
                            more.append(v.__dict__)
                spaces = list({id(d): d for d in more}.values())
    return list(reads.values())


def _users_namespace(d: dict) -> bool:
    """Whether a module's namespace is the user's code: not torch's, numpy's, this package's, the standard
    library's or an installed library's (those are read by identity: their contents change with their version)."""
    path = d.get("__file__")
    return isinstance(path, str) and str(d.get("__name__", "")).partition(".")[0] not in (
        "torch", "numpy", "sessa_compiler") and users_file(path)


@functools.lru_cache(maxsize=8192)
def loaded_globals(code: types.CodeType) -> frozenset:
    """The names ``code`` itself loads as globals (LOAD_GLOBAL; LOAD_NAME in a class body or at module level;
    Python 3.12's LOAD_FROM_DICT_OR_GLOBALS in a class body)."""
    return frozenset(ins.argval for ins in dis.get_instructions(code)
                     if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"))


def _globals_key(reads: list):
    """The values of those globals now (None: one cannot be described)."""
    try:
        return tuple((g.get("__name__"), n, ("id", id(g.get(n))) if by_id else _attr_key(g.get(n), by_content=False))
                     for g, n, by_id in reads)
    except _Opaque:
        return None


def _vars(m) -> dict:
    """A module's instance attributes, read without its class's __getattribute__ (not counted as a read by _Reads)."""
    return object.__getattribute__(m, "__dict__")


def _signature(module: torch.nn.Module, installed=None):
    """The structure of module that its Python can branch on while torch.export traces it, with its other
    attributes by name (their values are compared where a layer's trace read them: LayerTrace.same_reads), or
    None when that is not known (hooks, an attribute a read could not be compared by). ``installed``: the forward
    this file set on the module, which is not part of it."""
    parts = []
    try:
        for name, m in module.named_modules(remove_duplicate=False):
            if any(getattr(m, h, None) for h in _HOOKS) or getattr(m, "_forward_hooks_with_kwargs", None):
                return None
            attrs = []
            for k, v in sorted(_vars(m).items()):
                if k in _SKIP_ATTRS or (m is module and k == "forward" and v is installed):
                    continue
                _attr_key(v)   # raises _Opaque for a value a read could not be compared by
                attrs.append(k)
            attrs = tuple(attrs)
            params = tuple((k, tuple(p.shape), str(p.dtype), str(p.device), p.requires_grad)
                           for k, p in m._parameters.items() if p is not None)
            bufs = tuple((k, tuple(b.shape), str(b.dtype), str(b.device), k in m._non_persistent_buffers_set)
                         for k, b in m._buffers.items() if b is not None)
            parts.append((name, type(m), m.training, attrs, params, bufs,
                          tuple(k for k, v in m._parameters.items() if v is None),
                          tuple(k for k, v in m._buffers.items() if v is None)))
    except _Opaque:
        return None
    return tuple(parts)


def _worth_sharing(m: torch.nn.Module) -> bool:
    """A layer whose own trace saves more than it costs (one more export of the model's start, one of the layer):
    a module of the user's with parameters and two or more submodules; torch's own modules (a Linear, a
    LayerNorm) are single ops."""
    if isinstance(m, _CONTAINERS) or type(m).__module__.startswith("torch.") or "forward" in _vars(m):
        return False   # (a forward set on the instance is left as it is)
    return sum(1 for _ in itertools.islice(m.modules(), 3)) >= 3 and any(True for _ in m.parameters())


def groups(module: torch.nn.Module) -> list:
    """The outermost groups of two or more submodules with one signature: (signature, [(qualified name, module)])."""
    if any(getattr(torch.nn.modules.module, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return []
    by_sig: dict = {}
    names: dict = {}
    for name, m in module.named_modules():
        if not name or not _worth_sharing(m):
            continue
        sig = _signature(m)
        if sig is not None:
            by_sig.setdefault(sig, []).append(name)
            names[name] = m
    repeated = {name for members in by_sig.values() if len(members) > 1 for name in members}
    chosen = [name for name in repeated
              if not any(name.startswith(other + ".") for other in repeated if other != name)]
    out = []
    for sig, members in by_sig.items():
        kept = [n for n in members if n in chosen]
        if len(kept) > 1:
            out.append((sig, [(n, names[n]) for n in kept]))
    return out


def _call_key(leaves: list, spec):
    """What a layer's trace depends on in one call (its flattened arguments and their pytree spec): the structure,
    the constants, and every tensor's dtype, rank and dims past the batch and sequence ones (those two are
    symbolic in the layer's trace). Where a dim past those two is a size of the model's export (a Hugging Face
    style [B, 1, T, T] mask), every tensor's dims are keyed, each symbol by its first place in the call: the layer
    is then traced with those dims symbolic, equal where the call's are (_call_dims)."""
    key, canon, explicit = [], {}, False
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if x.is_complex() or x.layout != torch.strided:
                return None
            dims = []
            for d in x.shape:
                if isinstance(d, torch.SymInt):
                    e = d.node.expr
                    if not isinstance(e, sympy.Symbol):
                        if len(dims) >= 2:
                            return None
                        dims.append(None)   # (dims 0 and 1 are symbolic in the layer's own trace anyway)
                        continue
                    explicit = explicit or len(dims) >= 2
                    dims.append(("s", canon.setdefault(e, len(canon))))
                else:
                    dims.append(int(d))
            key.append(("T", x.dtype, x.dim(), tuple(dims), x.device.type))
        elif isinstance(x, CONSTANT_TYPES):
            key.append(("C", type(x).__name__, x))
        else:
            return None
    if not explicit:   # dims past the second all static: dims 0 and 1 AUTO in the layer's trace, as any call
        key = [(k[0], k[1], k[2], k[3][2:], k[4]) if k[0] == "T" else k for k in key]
        if any(k[0] == "T" and not all(isinstance(d, int) for d in k[3]) for k in key):
            return None
    elif any(k[0] == "T" and None in k[3] for k in key):
        return None
    return (spec, tuple(key), explicit)


def _call_dims(leaves: list) -> dict:
    """torch.export dynamic shapes for a layer's own trace where a dim past the second is symbolic in the call
    (_call_key): every symbolic dim a named Dim, one per symbol of the model's export, so dims equal in the call
    (a mask's two T dims and the hidden states' sequence dim) are one symbol of the layer's graph."""
    from torch.export import Dim

    named: dict = {}
    spec = []
    for x in leaves:
        entry = {}
        for d, s in enumerate(x.shape):
            if isinstance(s, torch.SymInt):
                entry[d] = named.setdefault(s.node.expr, Dim(f"shared_{len(named)}"))
        spec.append(entry or None)
    return {"tensors": tuple(spec)}   # by the name of _Flat.forward's *tensors


@dataclass
class LayerTrace:
    """One layer's lowered IR for one kind of call, and how its outputs' dims follow from its inputs'."""

    graph: Graph
    single: bool                  # the layer returns one tensor (else a tuple of them)
    out_dims: list                # per output: per dim an int or (input index, dim) it equals
    notes: list = field(default_factory=list)
    reads: list = field(default_factory=list)    # (submodule path, attribute, _attr_key of the value) the trace read

    def same_reads(self, module) -> bool:
        """Whether module holds the values the layer's trace read (its other attributes cannot steer the trace)."""
        try:
            subs = dict(module.named_modules(remove_duplicate=False))
            return all(path in subs and name in _vars(subs[path]) and _attr_key(_vars(subs[path])[name]) == key
                       for path, name, key in self.reads)
        except _Opaque:
            return False

    def fits(self, xs: list) -> bool:
        """Whether the sizes of this call (in the model's export) can be ones the layer's graph holds for: its
        static dims equal, and none of its symbols bound to a number and to another size (compared as
        expressions: no guard is added). Two symbols of the export bound to one of the layer's are judged when the
        op is lowered, where the model's input dims have their names (every input's dim 0 is B, dim 1 is T)."""
        bound: dict = {}
        for x, v in zip(xs, self.graph.inputs):
            if x.dim() != v.type.rank:
                return False
            for d, want in zip(x.shape, v.type.shape):
                got = d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))
                if isinstance(want, int):
                    if got != sympy.Integer(want):
                        return False
                    continue
                seen = bound.setdefault(want, got)
                if seen != got and (seen.is_Integer or got.is_Integer):
                    return False
        return len(xs) == len(self.graph.inputs)


@dataclass
class Group:
    signature: tuple              # the members' structure and attribute names (_signature)
    members: list                 # (qualified name, module)
    traces: dict = field(default_factory=dict)   # call key -> LayerTrace, or None: traced inline
    reads: list = field(default_factory=list)    # the globals their code reads (_global_reads)
    values: tuple | None = None                  # and their values when the group was made
    used: int = 0                                # calls the model's export took from a shared trace

    def __post_init__(self):
        self.reads = _global_reads(self.members[0][1])
        self.values = _globals_key(self.reads)

    def holds(self, module, installed=None) -> bool:
        """Whether module's Python can take the path the group's traces took: the same structure and attribute
        names, and the same values of the globals its code reads (a model's forward may set one between its
        layers); the attributes a trace read are compared by LayerTrace.same_reads."""
        return (self.values is not None and _signature(module, installed) == self.signature
                and _globals_key(self.reads) == self.values)


_PLANS: dict = {}
_IDS = itertools.count(1)
_LOCK = threading.Lock()


class Plan:
    """The shared layers of one trace (see the module's docstring). Use as a context manager around the model's
    export: inside, the grouped layers' forward is the custom op."""

    def __init__(self, module, groups_: list, trace_layer):
        self.module = module
        self.groups = [Group(sig, members) for sig, members in groups_]
        self.trace_layer = trace_layer
        self.sites: list = []    # (qualified name, module, group)
        for g in self.groups:
            self.sites.extend((name, m, g) for name, m in g.members)
        self.used = 0            # layer calls the export took from a shared trace
        _register_op()
        with _LOCK:
            self.id = next(_IDS)
            _PLANS[self.id] = self
        # the model's own names of its parameters and buffers (the exported program's), by tensor
        self.names = {}
        for name, t in list(module.named_buffers()) + list(module.named_parameters()):
            self.names.setdefault(id(t), name)

    def close(self) -> None:
        with _LOCK:
            _PLANS.pop(self.id, None)

    # -- step 2 and 3: trace one layer per group and kind of call, when the export first meets it ----------
    def trace(self, need: "NeedTrace") -> None:
        """Trace the layer the aborted export asked for (NeedTrace): its example inputs are zeros of the sizes the
        export met (values do not matter to a trace)."""
        rep = need.group.members[0][1]
        same = need.group.holds(rep)   # the model's forward may have set attributes of its layers, or globals
        need.group.traces[need.key] = self._trace(need.flat, need.examples, need.dims) if same else None

    def _trace(self, flat: "_Flat", examples: list, dims=None):
        try:
            with _Reads(flat.layer) as reads:
                graph, guards, notes, out_spec = self.trace_layer(flat, tuple(examples), {}, dims)
            read = reads.values()
        except Exception:  # noqa: BLE001 - traced inline instead, where its error (if any) is reported
            return None
        leaf = pytree.tree_flatten(0)[1]
        if out_spec == leaf:
            single = True
        elif out_spec.type is tuple and out_spec.num_children > 0 and all(c == leaf for c in out_spec.children()):
            single = False
        else:
            return None
        if guards or len(graph.outputs) != out_spec.num_leaves:
            return None
        symbols = {}
        for j, v in enumerate(graph.inputs):
            for d, s in enumerate(v.type.shape):
                if isinstance(s, sympy.Symbol):
                    symbols.setdefault(s, (j, d))
                elif not isinstance(s, int):
                    return None
        out_dims = []
        for v in graph.outputs:
            if v.type.dtype.name in ("c64", "c128"):
                return None
            dims = []
            for s in v.type.shape:
                if isinstance(s, int):
                    dims.append(s)
                elif s in symbols:
                    dims.append(symbols[s])
                else:
                    return None
            out_dims.append(dims)
        for n in graph.nodes:   # every symbol the layer's graph uses is one of its input dims
            for o in n.outputs:
                for s in o.type.shape:
                    if not isinstance(s, int) and not s.free_symbols <= set(symbols):
                        return None
        return LayerTrace(graph, single, out_dims, notes, read)

    # -- step 4: the export sees the custom op --------------------------------------------------------
    def __enter__(self):
        self.thread = threading.get_ident()   # another thread calling the model meanwhile runs it as it is
        self._saved = []
        try:
            for i, (_, m, _) in enumerate(self.sites):
                saved = (m, "forward" in _vars(m), _vars(m).get("forward"))
                m.forward = types.MethodType(_opaque_forward(self, i, type(m).forward), m)
                self._saved.append(saved)
        except BaseException:   # (a module whose __setattr__ refuses): the user's modules are left as they were
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        saved, self._saved = self._saved, []
        for m, had, old in saved:
            if had:
                m.forward = old
            else:
                _vars(m).pop("forward", None)
        return False


_MODULE_PY = torch.nn.modules.module.__name__
_READING = threading.local()


def _recording_getattribute(cls, own=None):
    """A __getattribute__ for ``cls`` that records (object id, name) while a layer's call is traced (_Reads), then
    looks the name up as ``cls`` did: through its own ``__getattribute__`` where it has one, else its base's."""
    def __getattribute__(self, name):
        seen = getattr(_READING, "reads", None)
        if seen is not None and getattr(_READING, "in_forward", False) and (
                name != "__dict__" or sys._getframe(1).f_globals.get("__name__") != _MODULE_PY):
            seen.add((id(self), name))   # (nn.Module's own __getattr__ reads __dict__ to find a submodule)
        return own(self, name) if own is not None else super(cls, self).__getattribute__(name)

    __getattribute__._sessa_reads = True
    return __getattribute__


_PATCHED: dict = {}   # class -> [users, whether it had its own __getattribute__, that one] (under _LOCK)


def _patch(klass) -> None:
    entry = _PATCHED.get(klass)
    if entry is not None:   # another trace (a nested layer, another thread) is recording through it already
        entry[0] += 1
        return
    own = vars(klass).get("__getattribute__")
    klass.__getattribute__ = _recording_getattribute(klass, own)
    _PATCHED[klass] = [1, own is not None, own]


def _unpatch(klass) -> None:
    entry = _PATCHED[klass]
    entry[0] -= 1
    if entry[0] == 0:
        del _PATCHED[klass]
        if entry[1]:
            klass.__getattribute__ = entry[2]
        else:
            del klass.__getattribute__


class _Reads:
    """While a layer is traced on its own: which attributes of its modules its Python reads during its call. Each of
    their classes gets a recording ``__getattribute__`` for the while (the instances keep their classes, so
    ``type(self) is C`` still holds; a class's own ``__getattribute__`` is kept and restored); torch.export's own
    scan of every module's ``__dict__`` before the call, for tensor constants, is not the layer's Python.
    ``values()``: (path, name, value key) of every instance attribute read; reading ``__dict__`` counts as reading
    them all."""

    def __init__(self, layer: torch.nn.Module):
        self.modules = list(layer.named_modules(remove_duplicate=False))
        self.patched: list = []
        self.seen: set = set()

    def __enter__(self):
        classes = []
        for _, m in self.modules:
            for klass in type(m).__mro__:
                if klass is torch.nn.Module or klass is object:
                    break
                if klass not in classes:
                    classes.append(klass)
        with _LOCK:
            try:
                for klass in classes:
                    _patch(klass)
                    self.patched.append(klass)
            except BaseException:
                self._restore()
                raise
        self.outer = getattr(_READING, "reads", None)   # a layer traced inside another's trace reads for both
        _READING.reads = self.seen
        return self

    def _restore(self):
        for klass in reversed(self.patched):
            _unpatch(klass)
        self.patched = []

    def __exit__(self, *exc):
        _READING.reads = self.outer
        if self.outer is not None:
            self.outer.update(self.seen)
        with _LOCK:
            self._restore()
        return False

    def values(self) -> list:
        out = []
        for path, m in self.modules:
            every = (id(m), "__dict__") in self.seen
            for name, v in _vars(m).items():
                if name in _SKIP_ATTRS or name == "forward":
                    continue
                if every or (id(m), name) in self.seen:
                    out.append((path, name, _attr_key(v)))
        return out


class NeedTrace(Exception):
    """Raised inside the model's export when a grouped layer is first called with a kind of call not yet traced:
    the driver traces that layer (Plan.trace: ``flat`` called on ``examples``) and exports again."""

    def __init__(self, group: Group, key, flat: "_Flat", examples: list, dims=None):
        super().__init__("a shared layer needs its trace")
        self.group, self.key, self.flat, self.examples, self.dims = group, key, flat, examples, dims


_TENSOR = object()   # in a _Flat template: "the next tensor argument"


class _Flat(torch.nn.Module):
    """A layer called with its call's tensors as positional arguments, the rest of the call (its structure, keyword
    names, constants) fixed: what the layer's own trace exports, so nested and keyword tensors (a (cos, sin)
    pair) become graph inputs in the order the custom op passes them. Its parameters are the layer's, under
    ``layer.``."""

    def __init__(self, layer: torch.nn.Module, spec, template: list):
        super().__init__()
        self.layer = layer
        self._call = (spec, template)

    def forward(self, *tensors):
        spec, template = self._call
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if x is _TENSOR else x for x in template], spec)
        outer = getattr(_READING, "in_forward", False)
        _READING.in_forward = True   # _Reads counts what the layer's call reads, not what the export's setup reads
        try:
            return self.layer(*args, **kwargs)
        finally:
            _READING.in_forward = outer


def _example(x):
    """A real tensor of the sizes a fake one has in this trace (its hints), or None."""
    if not isinstance(x, torch.Tensor):
        return x
    shape = []
    for d in x.shape:
        if isinstance(d, torch.SymInt):
            d = d.node.hint
            if d is None:
                return None
        shape.append(int(d))
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def _opaque_forward(plan: Plan, site: int, original):
    def forward(self, *args, **kwargs):
        group = plan.sites[site][2]
        flat, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
        key = None if (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
                       or threading.get_ident() != plan.thread) else _call_key(flat, spec)
        if key is None or not group.holds(self, _vars(self).get("forward")):   # e.g. an attribute the forward just set
            return original(self, *args, **kwargs)
        leaves = [x for x in flat if isinstance(x, torch.Tensor)]
        if key not in group.traces:
            examples = [_example(x) for x in leaves]
            if any(x is None for x in examples):
                group.traces[key] = None
            else:
                template = [_TENSOR if isinstance(x, torch.Tensor) else x for x in flat]
                raise NeedTrace(group, key, _Flat(group.members[0][1], spec, template), examples,
                                _call_dims(leaves) if key[2] else None)
        trace = group.traces[key]
        if trace is None or not trace.fits(leaves) or not trace.same_reads(self):
            return original(self, *args, **kwargs)
        index = list(group.traces).index(key)
        plan.used += 1
        group.used += 1
        outs = torch.ops.sessa_compiler.shared_layer(leaves, plan.id, site, index)
        return outs[0] if trace.single else tuple(outs)
    return forward


def _lookup(plan_id: int, site: int, index: int):
    plan = _PLANS.get(plan_id)
    if plan is None:
        raise RuntimeError("sessa_compiler::shared_layer called outside the trace that made it")
    name, module, group = plan.sites[site]
    return plan, name, module, list(group.traces.values())[index]


_REGISTERED = []


def _register_op() -> None:
    """Define sessa_compiler::shared_layer and its lowering, once per process (on the first model with a group, so
    that importing the frontend costs nothing for it)."""
    with _LOCK:
        if _REGISTERED:
            return

        @torch.library.custom_op("sessa_compiler::shared_layer", mutates_args=())
        def shared_layer(xs: list[torch.Tensor], plan_id: int, site: int, index: int) -> list[torch.Tensor]:
            """A layer of a group of identical layers while the model is exported (frontend/repeated.py)."""
            raise RuntimeError("sessa_compiler::shared_layer runs only inside torch.export of the model that made it")

        @shared_layer.register_fake
        def _(xs, plan_id, site, index):
            from ..ir.dtypes import to_torch

            trace = _lookup(plan_id, site, index)[3]
            outs = []
            for v, dims in zip(trace.graph.outputs, trace.out_dims):
                shape = [d if isinstance(d, int) else xs[d[0]].shape[d[1]] for d in dims]
                outs.append(xs[0].new_empty(shape, dtype=to_torch(v.type.dtype)))
            return outs

        LOWERINGS[torch.ops.sessa_compiler.shared_layer.default] = _inline
        _REGISTERED.append(shared_layer)


def _subst(x, mapping: dict):
    """An operand, attribute or type with the layer's dim symbols replaced by the model's expressions."""
    def leaf(y):
        if isinstance(y, sympy.Basic):
            y = y.xreplace(mapping)
            return int(y) if y.is_Integer else y
        if isinstance(y, TensorType):
            return TensorType(y.dtype, tuple(leaf(d) for d in y.shape))
        return y

    return pytree.tree_map(leaf, x)


class NotShareable(Exception):
    """The layer's graph does not fit this call in the model (a dim the layer's trace took as symbolic is bound
    to two different sizes here, or a static size differs): the model is traced in full."""


def _inline(L, node):
    """Lower sessa_compiler::shared_layer: the shared layer's IR, its parameters this instance's, its dims the
    model's."""
    xs = L.arg(node.args[0])
    plan, name, module, trace = _lookup(*node.args[1:4])
    layer = trace.graph
    mapping: dict = {}
    for v, x in zip(layer.inputs, xs):
        if v.type.dtype != x.type.dtype or v.type.rank != x.type.rank:
            raise NotShareable(f"{name}: input {v.name} is {x.type} here, {v.type} in the layer's trace")
        for d, e in zip(v.type.shape, x.type.shape):
            if isinstance(d, int):
                if d != e:
                    raise NotShareable(f"{name}: a static dim {d} is {e} here")
            elif d in mapping and sympy.simplify(mapping[d] - e) != 0:
                raise NotShareable(f"{name}: dim {d} is both {mapping[d]} and {e} here")
            else:
                mapping.setdefault(d, sympy.Integer(e) if isinstance(e, int) else e)
    g = L.graph
    env: dict = dict(zip(layer.inputs, xs))
    tensors = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    for pname, v in layer.param_values.items():
        local = pname[len("layer."):] if pname.startswith("layer.") else pname   # (_Flat's name for the layer)
        base, suffix = (local[:-len(PAIR_SUFFIX)], PAIR_SUFFIX) if local.endswith(PAIR_SUFFIX) else (local, "")
        t = tensors.get(base)
        own = plan.names.get(id(t)) if t is not None else None
        target = (own + suffix) if own is not None else f"{name}.{local}"
        if target in g.param_values:
            if g.param_values[target].type != v.type:
                raise NotShareable(f"{name}: parameter {target} is {g.param_values[target].type} here, {v.type}")
            env[v] = g.param_values[target]
        else:   # a tensor constant the layer's trace lifted (equal in every member: part of the signature)
            data = layer.params.get(pname) if t is None else (as_pairs(t.detach()) if suffix else t)
            env[v] = g.add_param(g.fresh_name(target) if target in g._names else target, v.type, data)
    for n in layer.nodes:
        inputs = [env[x] if isinstance(x, Value) else _subst(x, mapping) for x in n.inputs]
        names = [g.fresh_name(f"{name}.{o.name}".replace(".", "_")) for o in n.outputs]
        new = g.make_node(n.op, inputs, _subst(n.attrs, mapping), [_subst(o.type, mapping) for o in n.outputs],
                          names=names)
        for o, o2 in zip(n.outputs, new.outputs):
            env[o] = o2
            if o.name in layer.sources:
                g.sources[o2.name] = layer.sources[o.name]
    L.notes.extend(f"{name}: {note}" for note in trace.notes)
    return [env[v] for v in layer.outputs]

