"""What a traced graph assumed about the module's Python, checked at every call of the compiled module.

torch.export runs the module's Python once and keeps only the tensor ops: every non-tensor attribute it read
(``Dropout.p``, ``LayerNorm.eps``, a config flag, a gain bound) is baked into the graph as a constant, and
hooks, an instance's ``forward`` and its class's ``forward`` decide which code ran at all. When any of these
change after the trace, the old graph no longer computes what the module computes; the compiled module must
then trace again (as it does after ``.train()``/``.eval()`` or ``.double()``), never run the old graph.

``ModuleGuard(module)`` records, right after a trace, every submodule (by identity, in order), every
instance attribute of each (what ``vars(m)`` holds besides torch's own bookkeeping: values by
``repeated._attr_key``, plain tensors by identity and version counter, config objects by what they hold),
each module's hooks, each class's ``forward``, torch's global module hooks, and every module global the
classes' code reads (a helper function rebound by monkeypatching, a constant). ``changed(module)`` says
what differs now, or None. It checks all attributes, not only those the trace read: an attribute that
changes without mattering costs a retrace, never a wrong answer.

Per call this is a walk over the submodules and their attribute dicts with identity tests first (a value
object that is still the same immutable object is equal); only mutable values (lists, config objects,
tensors) are described again.
"""
from __future__ import annotations

import operator
import types

import torch
from torch.nn.modules import module as _nn_module

from ..persistent_cache import torch_flags
from .repeated import (GLOBAL_HOOKS_WHERE, _HOOKS, _SKIP_ATTRS, _Opaque, _attr_key, _global_reads, _vars,
                       compiler_wrapper, helper_classes, hook_name, others_code)

_MISSING = object()

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, type,
              types.FunctionType, types.BuiltinFunctionType, types.ModuleType)
# the global hooks that run around a module's call (registration hooks, which torch.export sets while it
# exports, change no call)
_GLOBAL_HOOKS = tuple(sorted(n for n in dir(_nn_module) if n.startswith("_global_") and "hook" in n
                             and ("forward" in n or "backward" in n) and isinstance(getattr(_nn_module, n), dict)))


def _describe(v):
    """(key, whether it must be described again at each call); key None: compared by identity only."""
    try:
        key = _attr_key(v, by_content=False)
    except _Opaque:
        return None, False
    immutable = isinstance(v, _IMMUTABLE) or (isinstance(v, (tuple, frozenset))
                                              and all(isinstance(y, _IMMUTABLE) for y in v))
    if key[0] in ("fn", "class"):   # a function described by its closure, defaults and attributes, a settings class
        immutable = False           # by its data: what they hold can change in place
    return key, not immutable


def _hook_state(d: dict) -> tuple:
    # hook handles take ids from a counter that only grows: (count, newest id) tells any add or removal apart
    return len(d), next(reversed(d)) if d else None


def _short(v) -> str:
    text = repr(v) if isinstance(v, _IMMUTABLE[:9]) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class ModuleGuard:
    def __init__(self, module: torch.nn.Module, skip_hooks=()):
        """``skip_hooks``: names (repeated.hook_name) of forward hooks the graph does not depend on (they returned
        None while tracing: the compiled module runs the module itself while they are there), whose own state
        (what they store, a counter) is not compared."""
        named = list(module.named_modules())
        self.modules = [m for _, m in named]
        self.types = tuple(type(m) for m in self.modules)   # a module's __class__ swapped for another
        self.children = []  # (path, the module's _modules dict, its values): a submodule replaced or added
        self.sizes = []     # (path, attribute dict, its size)
        self.entries = []   # (path, attribute dict, name, value, key, describe again at each call)
        self.hooks = []     # (path, hook dict name, hook dict, state): non-empty ones, and all by their sizes
        self.hook_dicts = []
        self.hook_fns = []  # (path, hook dict name, hook dict, handle id, key): what each hook holds (a steering
        # vector, a coefficient in its closure), which the trace baked in
        for path, m in named:
            d = _vars(m)
            self.children.append((path, d["_modules"], tuple(d["_modules"].values())))
            wrapper = compiler_wrapper(m)   # (its state is the compiler's; its original, a child, is guarded)
            if not wrapper:
                self.sizes.append((path, d, len(d)))
            for name, v in d.items():
                if name in _SKIP_ATTRS or wrapper:
                    continue
                key, mutable = _describe(v)
                self.entries.append((path, d, name, v, key, mutable))
            for h in _HOOKS:
                hd = d.get(h)
                if isinstance(hd, dict):
                    self.hook_dicts.append((hd, len(hd), path, h))
                    if hd:
                        self.hooks.append((path, h, hd, _hook_state(hd)))
                        where = f"'{path or type(module).__name__}'"
                        self.hook_fns.extend((path, h, hd, i, _describe(fn)[0]) for i, fn in hd.items()
                                             if hook_name(h, fn, where) not in skip_hooks)
        # parameters and buffers registered or removed (their values are the compiled module's live reads, which
        # follow only the names of the trace), and slots holding None (a buffer registered as None, set later)
        self.slots = []     # (path, "_parameters" | "_buffers", dict, size)
        self.nones = []     # (path, dict, name): slots that held None
        for path, m in named:
            d = _vars(m)
            for kind in ("_parameters", "_buffers"):
                self.slots.append((path, kind, d[kind], len(d[kind])))
                self.nones.extend((path, d[kind], n) for n, v in d[kind].items() if v is None)
        classes = list(dict.fromkeys(type(m) for m in self.modules))
        self.classes = [(k, getattr(k, "forward", None)) for k in classes]
        # everything the module classes (and their bases outside torch) define: a class constant, a method the
        # forward calls, replaced on the class after the trace
        owners = list(dict.fromkeys([k for c in classes for k in c.__mro__ if not others_code(k)]
                                    + helper_classes(module)))
        self.class_sizes = [(k, len(vars(k))) for k in owners]
        self.class_entries = [(k, n, v) for k in owners for n, v in vars(k).items()
                              if n not in ("__dict__", "__weakref__", "__doc__")]
        self.global_hooks = [(n, _hook_state(getattr(_nn_module, n))) for n in _GLOBAL_HOOKS]
        self.hook_fns.extend((GLOBAL_HOOKS_WHERE, n, getattr(_nn_module, n), i, _describe(fn)[0])
                             for n in _GLOBAL_HOOKS for i, fn in getattr(_nn_module, n).items()
                             if hook_name(n, fn, GLOBAL_HOOKS_WHERE) not in skip_hooks)
        # torch's default dtype: the dtype of the floats the forward makes (torch.arange(T) / 10.0, torch.zeros(...))
        self.default_dtype = torch.get_default_dtype()
        # torch's global switches (deterministic algorithms, matmul precision, ...): a forward may branch on them
        self.torch_flags = torch_flags()
        # the same facts laid out for a check in C loops (map, tuple comparison; identity first): _same
        self._kid_dicts = [d for _, d, _ in self.children]
        self._kids = [k for _, _, k in self.children]
        self._sized = [d for _, d, _ in self.sizes] + [hd for hd, *_ in self.hook_dicts] + [d for _, _, d, _ in self.slots]
        self._sizes = tuple(n for *_, n in self.sizes) + tuple(n for _, n, *_ in self.hook_dicts) + \
            tuple(n for *_, n in self.slots)
        fixed = [e for e in self.entries if not e[5] and e[4] is not None]
        self._fixed_dicts = [e[1] for e in fixed]
        self._fixed_names = [e[2] for e in fixed]
        self._fixed_values = tuple(e[3] for e in fixed)
        self._fixed_types = tuple(type(v) for v in self._fixed_values)   # (0 == 0.0 == False: the type counts)
        self._others = [e for e in self.entries if e[5] or e[4] is None]
        self.globals = []   # (globals dict, name, value, key, described again at each call)
        for g, n, by_id in _global_reads(module, skip_hooks):
            v = g.get(n, _MISSING)
            key, mutable = _describe(v) if v is not _MISSING and not by_id else (None, False)
            self.globals.append((g, n, v, key, mutable and key is not None))
        # identity checks in C loops (operator.is_ over map): a 12-layer model's class attributes and globals
        self._identity = ([vars(k) for k, _, _ in self.class_entries] + [g for g, *_ in self.globals],
                          [n for _, n, _ in self.class_entries] + [n for _, n, *_ in self.globals],
                          [v for _, _, v in self.class_entries] + [v for _, _, v, *_ in self.globals])
        self._described = [(v, key) for _, _, v, key, mutable in self.globals if mutable]

    def _same(self, module: torch.nn.Module) -> bool:
        """True when nothing ``changed`` looks at differs (the common case, checked fast); False: look closer."""
        if _vars(module)["_modules"] is not self._kid_dicts[0]:
            return False
        try:
            if list(map(tuple, map(dict.values, self._kid_dicts))) != self._kids \
                    or tuple(map(len, self._sized)) != self._sizes \
                    or tuple(map(type, self.modules)) != self.types:
                return False
            fixed = tuple(map(dict.get, self._fixed_dicts, self._fixed_names))
            if fixed != self._fixed_values or tuple(map(type, fixed)) != self._fixed_types:
                return False
        except Exception:  # noqa: BLE001 - a value whose == does not give a bool (a tensor): look closer
            return False
        described: dict = {}   # one description per object (a config object every layer holds)
        for _, d, name, v, key, _ in self._others:
            cur = d.get(name, _MISSING)
            if cur is not v:
                return False
            if key is not None:
                now = described.get(id(cur))
                if now is None:
                    now = described[id(cur)] = _describe(cur)[0]
                if now != key:
                    return False
        try:
            return self._same_rest()
        except KeyError:   # a class attribute or a global deleted
            return False

    def _same_rest(self) -> bool:
        return not self.hooks and torch.get_default_dtype() is self.default_dtype and \
            torch_flags() == self.torch_flags and all(
            d.get(n) is None for _, d, n in self.nones) and all(
            len(vars(k)) == n for k, n in self.class_sizes) and all(
            map(operator.is_, map(operator.getitem, *self._identity[:2]), self._identity[2])) and all(
            getattr(k, "forward", None) is f for k, f in self.classes) and all(
            _hook_state(getattr(_nn_module, n)) == st for n, st in self.global_hooks) and all(
            _describe(v)[0] == key for v, key in self._described)

    def changed(self, module: torch.nn.Module) -> str | None:
        """What differs from the trace in the module's Python state, or None."""
        if self._same(module):
            return None
        if _vars(module)["_modules"] is not self.children[0][1]:
            return "the module's submodules were replaced"
        for path, d, kids in self.children:
            if len(d) != len(kids) or any(a is not b for a, b in zip(d.values(), kids)):
                return f"a submodule of '{path or type(module).__name__}' was added, removed or replaced"
        for (path, _, _), m, k in zip(self.children, self.modules, self.types):
            if type(m) is not k:
                return f"the class of '{path or k.__name__}' was changed ({k.__name__} -> {type(m).__name__})"
        for hd, size, path, h in self.hook_dicts:
            if len(hd) != size:
                return f"{h.strip('_').replace('_', ' ')} of '{path or type(module).__name__}' were added or removed"
        for path, d, size in self.sizes:
            if len(d) != size:
                new = sorted(set(d) - {name for p, _, name, *_ in self.entries if p == path} - _SKIP_ATTRS)
                where = f"'{path}'" if path else "the module"
                if new == ["forward"]:
                    return f"a forward method was set on the instance {where}"
                return (f"attribute '{new[0]}' was set on {where}" if new else
                        f"an attribute of {where} was deleted (its forward, if one was set on the instance)")
        for path, d, name, v, key, mutable in self.entries:
            cur = d.get(name, _MISSING)
            if cur is v and not mutable:
                continue
            full = f"{path}.{name}" if path else name
            if cur is _MISSING:
                return f"attribute '{full}' was deleted"
            if key is None:
                if cur is not v:
                    return f"attribute '{full}' was given another object"
                continue
            if _describe(cur)[0] != key:
                if name == "forward":
                    return f"the instance's forward of '{path or type(module).__name__}' was replaced"
                return f"attribute '{full}' changed ({_short(v)} -> {_short(cur)})"
        for path, h, hd, state in self.hooks:
            if _hook_state(hd) != state:
                return f"{h.strip('_').replace('_', ' ')} of '{path or type(module).__name__}' were added or removed"
        for path, h, hd, i, key in self.hook_fns:
            if key is not None and _describe(hd.get(i))[0] != key:
                what = h.strip("_").replace("_", " ").removesuffix("s")
                return f"what a {what} of '{path or type(module).__name__}' holds changed"
        for path, kind, d, size in self.slots:
            if len(d) != size:
                what = "a parameter" if kind == "_parameters" else "a buffer"
                return f"{what} of '{path or type(module).__name__}' was registered or removed"
        for path, d, name in self.nones:
            if d.get(name) is not None:
                return f"'{f'{path}.{name}' if path else name}', None when traced, was set"
        for klass, fwd in self.classes:
            if getattr(klass, "forward", None) is not fwd:
                return f"{klass.__name__}.forward was replaced"
        for klass, size in self.class_sizes:
            if len(vars(klass)) != size:
                return f"an attribute of class {klass.__name__} was added or deleted"
        for klass, name, v in self.class_entries:
            if vars(klass).get(name, _MISSING) is not v:
                return f"{klass.__name__}.{name} was changed on the class"
        if torch.get_default_dtype() is not self.default_dtype:
            return f"torch's default dtype changed ({self.default_dtype} -> {torch.get_default_dtype()})"
        if torch_flags() != self.torch_flags:
            return ("one of torch's global switches changed (deterministic algorithms, the MHA fast path, matmul "
                    "precision, TF32)")
        for n, state in self.global_hooks:
            if _hook_state(getattr(_nn_module, n)) != state:
                return f"torch's global module hooks ({n.strip('_')}) were added or removed"
        for g, n, v, key, mutable in self.globals:
            cur = g.get(n, _MISSING)
            if cur is v and not mutable:
                continue
            if cur is _MISSING or key is None or _describe(cur)[0] != key:
                what = "changed" if cur is v else "was rebound"
                return f"the global '{n}' of {g.get('__name__', '?')}, which the module's code reads, {what}"
        return None
