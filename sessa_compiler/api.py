"""The public entry point: ``sessa_compiler.compile(module, ...)`` -> a CompiledModule."""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import functools
import importlib.util
import inspect
import operator
import re
import sys
import threading
import time
import warnings

import torch
import torch.utils._pytree as pytree

from . import progress
from .backends import get_backend
from .backends.base import Backend, CompileContext
from .backends.eager import bind_symbols
from .backends.shapes import sequence_length
from .ir.dtypes import from_torch, to_torch
from .errors import (ConfigError, DataDependentBranch, InputError, SessaCompilerError, TraceError, UnsupportedError,
                     ValidationError)
from .frontend.guards import ModuleGuard
from .frontend.lower import as_pairs, pair_source
from .frontend.trace import (Traced, autocast_state, batch_of, broadcasts, casts_float_inputs, check_keywords,
                             export_autocast, grad_state, other_integer_dtypes, tensor_leaves, trace_with_report,
                             warn_folded_trainables)
from .ir.ops import CORE, OPS
from .persistent_cache import collecting, values_unchanged
from .serving import SERVING_METHODS as _SERVING_METHODS
from .tolerance import TOLERANCE, graph_tolerance, relative_error  # noqa: F401  (re-exported: sessa_compiler.api.TOLERANCE)


_OTHER_FLOAT = "another float dtype"


def _why_not(traced: Traced, args, kwargs) -> str | None:
    """Why this traced graph does not equal the module for this call (its keyword structure and constants,
    its sizes), or None when it does, or when the inputs are wrong in a way no other trace fixes (the
    normal input checks then report it)."""
    graph = traced.graph
    if any(not isinstance(a, torch.Tensor) for a in args):
        return None
    mismatch = traced.call_mismatch(args, kwargs)
    if mismatch is not None:
        return mismatch
    args = traced.tensor_inputs(args, kwargs)
    mode = getattr(traced, "grad_mode", None)
    if mode is not None:
        now = grad_state((mode[0] is not None, mode[2] is not None), args)
        if now[:2] != mode[:2]:
            say = lambda m: "torch.inference_mode()" if m[1] else "gradients on" if m[0] else "torch.no_grad()"  # noqa: E731
            return (f"the forward asks torch's grad mode (or reads requires_grad): traced with {say(mode)}, called "
                    f"with {say(now)}")
        if now[2] != mode[2]:
            return "the forward reads requires_grad, and which inputs require grad differs from the trace"
    try:
        binding = bind_symbols(graph, list(args))
    except InputError as e:
        if _only_sizes_differ(graph, args):
            return f"the traced graph fixed a batch or sequence size ({e})"
        other = other_integer_dtypes(graph, args)
        if other:
            return f"input {other} has another integer or bool dtype than traced"
        other = other_integer_dtypes(graph, args, floats=True)
        if other:
            return f"input {other} has {_OTHER_FLOAT} than traced"
        batch = batch_of(args)
        spread = [v.name for x, v in zip(args, graph.inputs) if broadcasts(x, batch) and v.type.rank == x.dim()
                  and not isinstance(v.type.shape[0], int)]
        return (f"input(s) {', '.join('%' + n for n in spread)} have batch 1 beside batch {batch} (they broadcast "
                "over the batch)") if spread else None
    broken = traced.violated(binding)
    if not broken:
        return None
    sizes = ", ".join(f"{k}={v}" for k, v in sorted(binding.items()))
    return (f"the traced graph equals the module only where {' and '.join(map(str, broken))} "
            f"(guards from size-dependent code in the module); got {sizes}")


def _only_sizes_differ(graph, args) -> bool:
    """Inputs that match the graph except in batch/sequence dims (0, 1) that the trace made static."""
    if len(args) != len(graph.inputs):
        return False
    for v, x in zip(graph.inputs, args):
        if not isinstance(x, torch.Tensor) or x.dim() != v.type.rank or from_torch(x.dtype) != v.type.dtype:
            return False
        for i, (d, n) in enumerate(zip(v.type.shape, x.shape)):
            if isinstance(d, int) and d != n and i >= 2:
                return False
    return True


def cached_trace(module: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, stacklevel: int = 3):
    """trace_with_report of ``module`` on this call, through the persistent compile cache (compile_cache.py): an
    entry is used only when its manifest (what the trace ran) still holds in this process and the entry's graph
    equals the module for these inputs. compile() and the exports share it, so a module exported after it was
    compiled (or exported twice) is traced once. Returns (traced, "hit" | "miss" | "off", why or None)."""
    from . import compile_cache

    why: list = []
    amp = autocast_state(tensor_leaves(args, kwargs))
    with _autocast_off(amp), export_autocast(amp):
        progress.stage("looking up the compile cache")
        modes = _modes(module) + ((amp,) if amp else ())   # a graph traced under autocast holds its casts
        key = compile_cache.module_key(module, args, kwargs, modes, why) if compile_cache.enabled() else None
        traced = compile_cache.load(key, module, why) if key else None
        if traced is not None and _why_not(traced, args, kwargs) is not None:
            traced = None  # cached from sizes on another path through size-dependent code: trace this one
            why.append("the entry was traced on another path through size-dependent code")
        if traced is not None:   # what a fresh trace of this module would have said
            state = dict(module.named_parameters(remove_duplicate=False))
            warn_folded_trainables(module, [n for n, _ in traced.assumed if n in state and state[n].requires_grad],
                                   stacklevel=stacklevel)
            return traced, "hit", "; ".join(why) or None
        progress.stage("torch.export")
        traced = compile_cache.recorded_trace(lambda: trace_with_report(module, args, kwargs), module, key, why)
    return traced, "miss" if key else "off", "; ".join(why) or None


class _NotAccepted(Exception):
    """A new trace that does not fit the call it was made for (CompiledModule._trace's ``accept``)."""


class _RecomputeGrad(torch.autograd.Function):
    """Autograd for forward-only backends (Triton, TVM): the forward runs their kernels; the backward
    re-runs the same graph on the eager interpreter (differentiable torch ops) from the saved inputs and
    parameters and differentiates that, as activation checkpointing does. Gradients are therefore the
    eager backend's, to the spec's tolerance of the fast forward."""

    @staticmethod
    def forward(ctx, fast, eager, n_inputs, names, fixed, *tensors):
        inputs, params = list(tensors[:n_inputs]), {**fixed, **dict(zip(names, tensors[n_inputs:]))}
        outs = list(fast(inputs, params))
        ctx.eager, ctx.n_inputs, ctx.names, ctx.fixed = eager, n_inputs, names, fixed
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*[o for o in outs if not (o.is_floating_point() or o.is_complex())])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[5:]
        # grad mode is on inside a backward only under create_graph=True: then the gradients must themselves be
        # differentiable (a gradient penalty), so the eager graph is re-run on the saved tensors as they are
        # (connected to their own graph) and differentiated with create_graph
        higher = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = list(ctx.saved_tensors) if higher else \
                [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
            n = ctx.n_inputs
            outs = ctx.eager(leaves[:n], {**ctx.fixed, **dict(zip(ctx.names, leaves[n:]))})
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wanted = [t for t, need in zip(leaves, needs) if need]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                                      create_graph=higher) if pairs and wanted else [None] * len(wanted)
        it = iter(got)
        return (None,) * 5 + tuple(next(it) if need else None for need in needs)


class _ZeroGrads(torch.autograd.Function):
    """The identity on an output, giving each of ``params`` a zero gradient (Traced.zero_grads)."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.like = [(p.shape, p.dtype, p.device) for p in params]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like))


def _with_zero_grads(module, names: tuple, outs):
    """Parameters the module reads but its output does not depend on at these sizes get a zero gradient, as the
    module's own autograd gives them (not None, which makes an optimiser skip them, weight decay included): an
    edge to them from the smallest output that carries a gradient (a copy of that output, a loss usually)."""
    params = []
    for n in names:   # (by path: a whole named_parameters() walk at every training call is not needed)
        try:
            p = module.get_parameter(n)
        except AttributeError:
            continue
        if p.requires_grad:
            params.append(p)
    carrying = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not params or not carrying:
        return outs
    i = min(carrying, key=lambda k: outs[k].numel())
    outs = list(outs)
    outs[i] = _ZeroGrads.apply(outs[i], *params)
    return outs


def run_with_autograd(backend, runner, graph, args: list, params: dict, eager_runners: dict) -> tuple:
    """(outputs, whether autograd will recompute on eager) of a prepared graph. When autograd must see this call,
    a backend with a training runner (Backend.prepare_training: its forward and backward kernels for the core
    ops, torch autograd for the rest; backends/training.py) runs it; a forward-only backend's call is wrapped so
    that the backward recomputes on the eager interpreter (_RecomputeGrad). eager_runners caches the eager and
    training runners per graph."""
    if torch._C._are_functorch_transforms_active() and backend.name != "eager":
        # torch.func.grad / vmap / jacrev wrap tensors that kernels cannot read (no storage) and need autograd
        # Functions written for them: the interpreter's torch ops go through every transform
        return _eager_runner(graph, eager_runners)(args, params), False
    autocast = _autocast_on(args)
    if not torch.is_grad_enabled() and not autocast:
        return runner(args, params), False
    resolved = backend.resolve(args)
    if resolved.differentiable:
        return runner(args, params), False
    grad_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    names = [k for k, p in params.items() if isinstance(p, torch.Tensor) and p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (grad_args or names)
    if not needs_grad and not autocast:
        return runner(args, params), False
    key = ("training", resolved.name, id(graph))
    if key not in eager_runners:
        eager_runners[key] = resolved.prepare_training(graph)
    if eager_runners[key] is not None:   # under autocast its torch ops cast as the module's would
        return eager_runners[key](args, params), False
    if not needs_grad:
        return runner(args, params), False
    fixed = {k: p for k, p in params.items() if k not in set(names)}
    return list(_RecomputeGrad.apply(runner, _eager_runner(graph, eager_runners), len(args), names, fixed,
                                     *args, *(params[k] for k in names))), True


def _eager_runner(graph, eager_runners: dict):
    """The eager interpreter's runner of ``graph`` (made once, kept in eager_runners)."""
    if id(graph) not in eager_runners:
        from .backends.eager import EagerBackend

        eager_runners[id(graph)] = EagerBackend().prepare(graph)
    return eager_runners[id(graph)]


def _autocast_on(args) -> bool:
    """Whether torch.autocast is on for the device of these inputs."""
    return autocast_state(args) is not None


def _autocast_mismatch(traced: Traced, args, kwargs) -> str | None:
    """Why this call's autocast state is not the one ``traced`` was traced under (its graph holds autocast's casts,
    or none), or None."""
    amp = autocast_state(traced.tensor_inputs(args, kwargs))
    was = getattr(traced, "autocast", None)
    if amp == was:
        return None
    say = lambda a: f"torch.autocast({a[0]!r}, dtype=torch.{a[1]})" if a else "no autocast"   # noqa: E731
    return f"called under {say(amp)}, traced under {say(was)}"


def _autocast_off(amp: tuple | None):
    """Autocast off for the device of ``amp`` (autocast_state), where it is on: recognisers and their probes see
    the graph's own dtypes; a call under autocast is exported under it (frontend.trace.export_autocast: the graph
    then holds autocast's casts as ops) and runs with autocast off."""
    return torch.autocast(amp[0], enabled=False) if amp is not None else contextlib.nullcontext()


# Triton's interpreter (CPU tensors) patches module-level state while a kernel runs: one at a time per process
_INTERPRETER_LOCK = threading.Lock()
# per-call state, rebuilt after unpickling (see CompiledModule.__getstate__)
_RUNTIME = ("_backend", "_traced", "_runner", "_eager_runners", "_contexts", "_variants", "_lock", "_fresh", "_live",
            "grad_recomputes", "trace_seconds", "trace_cache", "tune_results", "tune_seconds", "retraces", "_serving",
            "trace_cache_why", "cache_notes", "uncompiled_calls", "_said", "_refused_dtypes", "_branching")
ORIGINAL = "_orig_mod"  # the original module's attribute name (as torch.compile's OptimizedModule names it)


@contextlib.contextmanager
def _python_rng_kept():
    """Python's and numpy's global random states as they were before the trace (which runs the forward, and a
    forward that draws from them would move them: the call after the trace would draw another number than the
    uncompiled module's)."""
    import random
    import sys as _sys
    state = random.getstate()
    np_random = getattr(_sys.modules.get("numpy"), "random", None)
    np_state = np_random.get_state() if np_random is not None else None
    try:
        yield
    finally:
        random.setstate(state)
        if np_state is not None:
            np_random.set_state(np_state)


def _named_constants(forward, args: tuple, kwargs: dict) -> tuple:
    """(args, kwargs) of the same call with the positional arguments from the first one that is not a tensor on
    passed by name (``model(ids, None, labels)`` as ``model(ids, attention_mask=None, labels=labels)``): constants
    are keyword arguments to the trace (baked in; another value traces again), and the graph's inputs stay the
    tensors. Unchanged where the signature does not name those positions (``*args``)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return args, kwargs
    first = next(i for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
    if not all(isinstance(a, (torch.Tensor, type(None), bool, int, float, str)) for a in args[first:]):
        return args, kwargs   # (a list or another object: the input checks say what is expected)
    named = params[first:len(args)]
    if len(named) != len(args) - first or any(
            p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or p.name in kwargs for p in named):
        return args, kwargs
    return args[:first], {**kwargs, **{p.name: a for p, a in zip(named, args[first:])}}


class _Uncompiled(Exception):
    """Raised inside a forward call that no traced graph fits once max_traces graphs are traced: the call runs
    the original module (CompiledModule._beyond_limit)."""


_NOT_THERE = object()
_TRAINING = operator.attrgetter("training")


def _own_saved_tensors():
    try:
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    except RuntimeError:   # saved-tensor hooks disabled here: nobody else's hooks to keep the trace from either
        return contextlib.nullcontext()


def _wrapped_by_data_parallel(module) -> bool:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return isinstance(module, (DataParallel, DistributedDataParallel))


def unregistered_tensors(module: torch.nn.Module) -> list:
    """(path, tensor) of each tensor the module and its submodules hold as a plain attribute, or inside a list,
    tuple or dict attribute (two levels), that is not one of their registered parameters or buffers."""
    out, seen = [], set()

    def visit(path, v, depth):
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                out.append((path, v))
        elif depth < 2 and isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                visit(f"{path}[{i}]", x, depth + 1)
        elif depth < 2 and isinstance(v, dict):
            for k, x in list(v.items()):
                visit(f"{path}[{k!r}]", x, depth + 1)

    for name, m in module.named_modules():
        if type(m).__module__ == __name__:   # a compiled module inside (its original is a child, visited)
            continue
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules") and not k.startswith("_forward") \
                    and not k.startswith("_backward") and not k.startswith("_state_dict"):
                visit(f"{name}.{k}" if name else k, v, 0)
    registered = {id(t) for t in (*module.parameters(), *module.buffers())}
    return [(p, t) for p, t in out if id(t) not in registered]


def _cache_object_in_output(e: Exception) -> bool:
    """Whether a trace failed because the forward returns a key/value cache object (torch.export: "Found <class
    '...DynamicCache'> in output, which is not a known type")."""
    return bool(re.search(r"Found <class '[\w.]*Cache'> in output", str(e)))


class _Live:
    """Where each of a graph's parameters lives in the module: read at every call, so reassigned parameters
    and buffers, load_state_dict(assign=True) and .to()/.double() are seen. Names that are not the module's
    parameters or buffers (tensor constants the trace lifted, a default RoPE table a recogniser added) keep
    the traced data. A complex parameter or buffer X is the graph's "X.as_real" (frontend/lower.py PAIR_SUFFIX):
    read as a view of the live X as real pairs, like any other."""

    def __init__(self, module: torch.nn.Module, graph, assumed: tuple = (), skip_hooks: tuple = ()):
        tensors = dict(module.named_parameters(remove_duplicate=False))
        tensors.update(module.named_buffers(remove_duplicate=False))
        known = set(tensors)
        # tensors a recogniser built the graph from (Traced.assumed): (graph name, attribute path, digest); each
        # checked by its identity, storage and version counter at every call, and hashed again when those change;
        # and by requires_grad (one frozen when folded, trainable now, would get no gradient)
        self.assumed = []
        for name, digest in assumed:
            source = name if name in known else pair_source(name, known)
            if source is not None:
                self.assumed.append((name, source.split("."), source != name, (digest, tensors[source].requires_grad)))
        self._verified: dict = {}
        # (graph name, the module's name, attribute path, whether the graph holds it as real pairs)
        self.paths = []
        for name in graph.param_values:
            source = name if name in known else pair_source(name, known)
            if source is not None:
                self.paths.append((name, source, source.split("."), source != name))
        self.types = {name: graph.param_values[name].type for name, *_ in self.paths}
        # with requires_grad as traced: a forward may branch on it
        self.expected = [(name, to_torch(self.types[name].dtype), torch.Size(self.types[name].shape),
                          tensors[source].requires_grad) for name, source, *_ in self.paths]
        live = {name for name, *_ in self.paths}
        self.fixed = {k: v for k, v in graph.params.items() if k not in live}
        # a tensor the module holds under several names (tied weights, one Parameter registered twice) is one
        # graph parameter read through one name: the others must still hold that same tensor
        names_of: dict = {}
        for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
            names_of.setdefault(id(t), []).append(n)
        # each tensor's owning submodule, found once: while the guard holds (no submodule replaced), a call
        # reads the owner's _parameters/_buffers entry instead of walking the path through nn.Module.__getattr__
        # (a 12-layer decoder: about 1000 getattr calls, 0.7 ms a call)
        self.aliases, self.owned = [], []
        for name, source, parts, pairs in self.paths:
            try:
                owner = functools.reduce(getattr, parts[:-1], module)
                obj = getattr(owner, parts[-1])
            except AttributeError:
                self.owned = None
                continue
            if self.owned is not None:
                self.owned.append((name, owner.__dict__, parts[-1], pairs))
            others = [n for n in names_of.get(id(obj), []) if n != source]
            if others:
                self.aliases.append((source, parts, [(n, n.split(".")) for n in others]))
        # the module's Python state the trace baked in (attributes, hooks, forward methods): frontend/guards.py
        self.guard = ModuleGuard(module, skip_hooks)
        # tensors the module holds outside its parameters and buffers (a plain attribute trained by hand, a
        # Parameter in a Python list): the trace lifted them as constants, so a graph gives them no gradient
        self.unregistered = unregistered_tensors(module)

    def unregistered_trainable(self) -> list:
        """The paths of those tensors that require grad now."""
        return [path for path, t in self.unregistered if t.requires_grad]

    def read_fast(self) -> dict | None:
        """The live tensors through their owners (valid while the guard holds), or None when one is not found
        there (deleted, or now a plain attribute): read() then says what happened."""
        if self.owned is None:
            return None
        params = dict(self.fixed)
        for name, d, leaf, pairs in self.owned:
            t = d["_parameters"].get(leaf, _NOT_THERE)
            if t is _NOT_THERE or t is None:
                t = d["_buffers"].get(leaf, _NOT_THERE)
                if t is _NOT_THERE or t is None or leaf in d:
                    return None
            elif leaf in d:   # shadowed by an instance attribute: getattr would find that one
                return None
            params[name] = as_pairs(t) if pairs else t
        return params

    def read(self, module: torch.nn.Module) -> dict:
        params = dict(self.fixed)
        for name, source, parts, pairs in self.paths:
            obj = module
            try:
                for part in parts:
                    obj = getattr(obj, part)
            except AttributeError:
                raise InputError(f"compiled {type(module).__name__}: parameter or buffer '{source}' of the traced "
                                 "graph is no longer in the module (it was deleted or its submodule replaced by one "
                                 "without it); compile the changed module again") from None
            params[name] = as_pairs(obj) if pairs else obj
        return params

    def assumption_changed(self, module: torch.nn.Module) -> str | None:
        """Why the graph no longer holds for the module's current tensors: a parameter or buffer a recognised op
        was built from (a causal mask, stored RoPE tables) changed its values since the trace; or None."""
        for name, parts, pairs, digest in self.assumed:
            obj = module
            try:
                for part in parts:
                    obj = getattr(obj, part)
            except AttributeError:
                return f"'{'.'.join(parts)}', which a recognised op was built from, is no longer in the module"
            if not isinstance(obj, torch.Tensor):
                return f"'{'.'.join(parts)}', which a recognised op was built from, is no longer a tensor"
            digest, trainable = digest
            if obj.requires_grad != trainable:
                return (f"'{'.'.join(parts)}', which a recognised op was built from, "
                        f"{'requires' if obj.requires_grad else 'no longer requires'} grad")
            if not values_unchanged(obj, digest, self._verified, name):
                return (f"the values of '{'.'.join(parts)}' changed since the trace, and a recognised op was built "
                        "from them")
        return None

    def python_changed(self, module: torch.nn.Module) -> str | None:
        """Why the graph no longer holds for the module's Python state (an attribute, a hook, a forward method,
        tied tensors untied) since the trace; or None."""
        for source, parts, others in self.aliases:
            try:
                obj = functools.reduce(getattr, parts, module)
                for name, alias in others:
                    if functools.reduce(getattr, alias, module) is not obj:
                        return f"'{name}' no longer holds the same tensor as '{source}' (tied when traced)"
            except AttributeError:
                return f"'{source}' or a name tied to it is no longer in the module"
        return self.guard.changed(module)

    def mismatch(self, params: dict, requires_grad: bool = True) -> str | None:
        """Why these live tensors do not fit the traced graph's parameter types (dtype or shape; with
        ``requires_grad``, their requires_grad as traced: not while torch.export or AOT autograd records a call,
        whose fake parameters need not carry it), or None."""
        for name, dtype, shape, trainable in self.expected:
            t = params[name]
            if not isinstance(t, torch.Tensor):
                return f"'{name}' is now a {type(t).__name__}, not a tensor"
            if t.dtype != dtype or t.shape != shape:
                return f"parameter '{name}' is now {t.dtype} {tuple(t.shape)}, traced as {self.types[name]}"
            if requires_grad and t.requires_grad != trainable:
                return f"parameter '{name}' {'requires' if t.requires_grad else 'no longer requires'} grad"
        return None


def _progress(what: str, show: bool | None = True):
    """What a long step is doing (sessa_compiler/progress.py): on a terminal, after 2 s, unless turned off."""
    return progress.shown(what, show)


def _library_attention(q, k, v, inv_freq=None, mask=None, *, scale, causal, rope=False, key_padding=False,
                       empty_rows="mean", empty_grad=True):
    if key_padding:   # no custom op takes the mask: the op's meaning in plain torch ops (semantics)
        from .semantics import SEMANTICS

        return SEMANTICS["attention"](q, k, v, inv_freq, mask, scale=scale, causal=causal, rope=rope,
                                      key_padding=True, empty_rows=empty_rows, empty_grad=empty_grad)
    return torch.ops.sessa_compiler.attention(q, k, v, inv_freq if rope else None, scale, causal)


# The IR's core ops as the torch.library custom ops (library.py, models/scan_op.py): what an exported program of a
# compiled module calls (CompiledModule._export_call); same operands and attributes as semantics.SEMANTICS.
LIBRARY_OPS = {
    "attention": _library_attention,
    "feedback": lambda f, q_b, k_b, gamma, *, scale: torch.ops.sessa_compiler.feedback(f, q_b, k_b, gamma, scale),
    "scan": lambda u, delta, A, B, C, D: torch.ops.sessa_compiler.selective_scan(u, delta, A, B, C, D),
}


def _core_op_impls(module: "CompiledModule", inputs) -> dict:
    """How torch.compile records a compiled module's core ops: on CUDA tensors, for the triton (or auto)
    backend with triton installed, as the triton_ops torch.ops.sessa_compiler.*_triton, whose kernel launches
    Inductor sees; otherwise as the portable custom ops (LIBRARY_OPS), as torch.export always does."""
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    if on_cuda and module.backend_name in ("triton", "auto") and importlib.util.find_spec("triton") is not None:
        from .backends.triton.ops import CORE_OP_IMPLS

        return CORE_OP_IMPLS
    return LIBRARY_OPS


def _being_traced(args, kwargs) -> bool:
    """Whether torch.compile (dynamo) or torch.export is tracing this call (fake or symbolic inputs)."""
    # is_dynamo_compiling() is True only while dynamo traces this code (it folds the call) and False when the code
    # runs, so it is thread-safe; torch.compiler.is_compiling()/is_exporting() are process-wide flags that an export
    # in another thread (the first call tracing this module) sets, and would send this thread's call to the
    # original module in the middle of that export. torch.export hands forward fake tensors: detect_fake_mode finds
    # them (it looks at the inputs and at this thread's state only).
    if torch.compiler.is_dynamo_compiling():
        return True
    from torch._guards import detect_fake_mode

    return detect_fake_mode(pytree.tree_leaves((args, kwargs))) is not None


def _traced_call(module: "CompiledModule", args: tuple, kwargs: dict):
    """A compiled module's call as torch.compile records it: dynamo does not trace into this function (it is
    nonstrict_trace'd: _dynamo_call), AOT autograd does (fake tensors: the traced graph with
    torch.ops.sessa_compiler.* as torch.export records it, or the original's code when no traced graph fits).
    Where the function runs as it is (backend="eager"), the inputs are real and the compiled module runs them."""
    if not _being_traced(args, kwargs):
        return module(*args, **kwargs)
    return module._export_call(args, kwargs, _core_op_impls(module, pytree.tree_leaves((args, kwargs))))


_DYNAMO_CALL: list = []  # [nonstrict_trace(_traced_call)], made at the first trace (torch.export loads dynamo;
# importing dynamo with the package would cost a second)


_DYNAMO_WANTED: list = []  # [True] once a module was traced without dynamo loaded (from the compile cache)


def _dynamo_call():
    if not _DYNAMO_CALL:
        import torch._dynamo

        _DYNAMO_CALL.append(torch._dynamo.nonstrict_trace(_traced_call))
    return _DYNAMO_CALL[0]


def _modes(module: torch.nn.Module) -> tuple:
    return tuple(m.training for m in module.modules())


def _backward_hook(name: str) -> bool:
    return name.startswith("backward")


# the module whose swap_tensor sets a parameter on the module torch.func.functional_call was given (CompiledModule.
# __setattr__)
_SWAPPER = "torch.nn.utils._named_member_accessor"


class CompiledModule(torch.nn.Module):
    """A compiled module: same call signature and outputs as the original.

    The original is a real submodule (``_orig_mod``, also ``.original``): ``parameters()``, ``buffers()``,
    ``train()``/``eval()``, ``.to()``/``.double()`` reach it, and ``state_dict()``/``load_state_dict`` use
    the original's keys unchanged. Weights are read from it at every call. ``.graph`` is the IR
    (printable); ``.explain()`` says what was recognised, what fell back and which backend runs it.
    """

    def __init__(self, module: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
                 backend: str = "auto",
                 validate: bool = False, print_ir: bool | None = None, options: dict | None = None,
                 autotune: bool | dict = False, progress: bool | None = None, max_traces: int | None = 8):
        super().__init__()
        if max_traces is not None and (isinstance(max_traces, bool) or not isinstance(max_traces, int)
                                       or max_traces < 1):
            raise ConfigError(f"compile: max_traces must be a positive int or None (no limit), got {max_traces!r}")
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"compile expects a torch.nn.Module, got {type(module).__name__}")
        if _wrapped_by_data_parallel(module):
            raise UnsupportedError(
                f"compile got a {type(module).__name__}: its forward synchronises gradients across processes and "
                "cannot be traced; compile the inner module and wrap the compiled one instead: "
                "DistributedDataParallel(sessa_compiler.compile(model))")
        if isinstance(module, CompiledModule):
            raise UnsupportedError("compile got a module that is already compiled; compile its .original instead")
        self._orig_mod = module  # a registered submodule: its parameters are this module's, read at every call
        self.backend_name = backend
        self.validate = validate
        options = dict(options or {})
        if print_ir is not None:
            options["print_ir"] = print_ir
        self._options = options
        self.autotune = autotune  # True, or tune settings: {"budget": ..., "progress": ..., "cache": ...}
        self.progress = progress  # False: never show what a long compile is doing (progress.py)
        self.max_traces = max_traces  # traced graphs at most; calls none fits then run the original (_Uncompiled)
        self._init_runtime()
        if example_inputs is not None:
            inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            try:
                with collecting(self.cache_notes):
                    self._trace(inputs, example_kwargs)
            except DataDependentBranch as e:   # calls in this mode run the module (_branching_call); said then
                self._branching[_modes(module)] = str(e)
        self.__dict__["_ready"] = True   # from now on, attributes set on the wrapper land on the original

    def _init_runtime(self) -> None:
        self._backend = get_backend(self.backend_name, **self._options)
        self._traced: Traced | None = None
        self._runner = None
        self._live: _Live | None = None
        self._eager_runners: dict = {}  # graph id -> eager runner, for forward-only backends' backward
        self._contexts: dict = {}       # graph id -> the CompileContext its runner was prepared with
        # (Traced, runner, _Live, modes): one per keyword signature, path through size-dependent code, train/eval
        # modes of the submodules and parameter dtypes seen so far
        self._variants: list = []
        self._refused_dtypes: set = set()   # input dtypes a float-dtype retrace showed the module does not take
        self._lock = threading.RLock()
        self._fresh: set = set()     # runners not called yet (their first call may build kernels)
        self.grad_recomputes = 0    # calls whose backward recomputes on eager
        self.retraces: list = []    # why each trace after the first was made
        self.uncompiled_calls = 0   # forward calls run on the original module: no trace fits, max_traces reached
        self._said: set = set()       # reasons for uncompiled calls warned of already (_say_once)
        # train/eval modes (_modes) in which the forward branches on a tensor's value (DataDependentBranch) -> why:
        # such calls run the original module (_branching_call)
        self._branching: dict = {}
        self._copies: dict = {}     # id(Traced) -> (it, Traced.copied_outputs())
        self.trace_seconds = None
        self.trace_cache = None     # "hit", "miss" or "off": whether the last trace came from the compile cache
        self.trace_cache_why = None  # why not (a miss's reason, or why the trace is not cacheable)
        self.cache_notes = collections.Counter()  # (cache, outcome) -> count, for explain()
        self.tune_results: list = []
        self.tune_seconds = 0.0

    # -- pickling, state_dict: the original's ----------------------------------------------------------
    def __getstate__(self):
        """Pickle the original module and the compile settings; the traced graphs and built kernels are
        rebuilt at the first call after loading."""
        state = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME}
        return state

    def __setstate__(self, state):
        state = {k: v for k, v in state.items() if k != "_ready"}
        super().__setstate__(state)
        self._init_runtime()
        self.__dict__["_ready"] = True

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The original module's state_dict, with its own keys (no prefix for the wrapper)."""
        if args:
            raise TypeError("CompiledModule.state_dict takes keyword arguments only (destination, prefix, keep_vars)")
        return self._orig_mod.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # keys as state_dict() writes them (the original's own) are routed to the original submodule; keys
        # already prefixed with _orig_mod. (from named_parameters()) are taken as they are
        inner = prefix + ORIGINAL + "."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata.setdefault(inner[:-1], metadata[prefix[:-1]])

    def extra_repr(self) -> str:
        backend = self.backend_name
        if backend == "auto" and self._traced is not None:
            backend = f"auto, last call on {self._backend.name}"
        state = ("not traced yet (traces at the first call)" if self._traced is None else
                 f"traced: {len(self._variants)} graph(s), {len(self._traced.graph.nodes)} ops in the current one")
        return f"backend={backend!r}, {state}" + (", validate=True" if self.validate else "")

    # -- tracing ---------------------------------------------------------------------------------------
    def _trace(self, args: tuple, kwargs: dict | None = None, accept=None) -> None:
        # tracing, the recognisers' probes and a backend's preparation may run ops that draw random numbers (a
        # dropout in a probed region): torch's generators are given back as they were, so the call that traces
        # draws the same dropout masks as the module would, and leaves the generators where it would
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and \
            torch.cuda.is_initialized() else []
        # a trace inside torch.utils.checkpoint (non-reentrant) must not reach its saved-tensor hooks: tensors the
        # trace and the probes save are not the call's, and the recomputation (which does not trace) would
        # count fewer; an innermost pair of hooks that keep tensors as they are takes them
        with torch.random.fork_rng(devices=devices), _own_saved_tensors(), _python_rng_kept():
            self._trace_unseeded(args, kwargs, accept)

    def _trace_unseeded(self, args: tuple, kwargs: dict | None = None, accept=None) -> None:
        """``accept(traced) -> bool``: whether the new trace fits (else nothing is prepared or kept, and
        _NotAccepted is raised)."""
        start = time.perf_counter()
        with _progress(f"sessa_compiler: tracing {type(self._orig_mod).__name__}", self.progress):
            traced = self._cached_trace(args, kwargs)
        if accept is not None and not accept(traced):
            raise _NotAccepted
        before = (self._traced, self._live, self._runner)
        try:
            self._prepare_traced(traced, args, kwargs)
        except BaseException:   # the module stays as it was (its earlier graphs serve it), not half set up
            self._traced, self._live, self._runner = before
            raise
        if "torch._dynamo" in sys.modules:   # torch.export loaded it (a cold trace): make torch.compile's wrapper now
            _dynamo_call()                   # (a trace from the compile cache does not import dynamo: ~1 s)
        else:
            _DYNAMO_WANTED.append(True)
        self.trace_seconds = time.perf_counter() - start

    def _prepare_traced(self, traced, args: tuple, kwargs: dict | None) -> None:
        """Make ``traced`` the current graph: its live tensors, the backend's runner, a new variant."""
        self._traced = traced
        args = tuple(self._traced.tensor_inputs(args, kwargs or {}))  # the graph's inputs
        graph = self._traced.graph
        self._live = _Live(self._orig_mod, graph, self._traced.assumed,
                           tuple(h for h in getattr(self._traced, "hook_effects", ()) if not _backward_hook(h)))
        graph.params.update(self._live.read(self._orig_mod))
        # backends pick configs per shape class and device from the example inputs; their pipelines record here
        ctx = self._contexts[id(graph)] = CompileContext(example_inputs=args, options=dict(self._options))
        if self.autotune:
            settings = self.autotune if isinstance(self.autotune, dict) else {}
            tune_start = time.perf_counter()
            if self.backend_name == "auto":  # tune the backend the example inputs will run on
                self._backend.prepare(graph, ctx)
            self.tune_results = _tune_graph(self._backend.resolve(list(args)), graph, args, **settings)
            self.tune_seconds = time.perf_counter() - tune_start
        with _progress(f"sessa_compiler: preparing {type(self._orig_mod).__name__} for {self.backend_name}",
                       self.progress):
            self._runner = self._backend.prepare(graph, ctx)
        self._fresh.add(id(self._runner))
        self._backend.resolve(list(args))  # auto: say now which backend the example inputs pick
        self._variants.append((self._traced, self._runner, self._live, _modes(self._orig_mod)))

    def _cached_trace(self, args: tuple, kwargs: dict | None) -> Traced:
        traced, self.trace_cache, self.trace_cache_why = cached_trace(self._orig_mod, args, kwargs, stacklevel=7)
        return traced

    def __getattr__(self, name):
        # serving (sessa_compiler/serving.py): init_cache/prefill/decode_step/generate, compiled
        if name in _SERVING_METHODS:
            from .serving import serving_method

            return serving_method(self, name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_orig_mod" or "_orig_mod" not in self.__dict__.get("_modules", {}):
                raise
        # the original's attributes and submodules by their own names (as torch.compile's wrapper gives them), so
        # torch.func.functional_call with the original's parameter names reaches the parameters compiled calls read
        return getattr(self._modules["_orig_mod"], name)

    def __setattr__(self, name, value):
        # an attribute set on the compiled module lands on the original (as torch.compile's wrapper does): a
        # submodule replaced (LoRA injected through the compiled handle, model.layers[i].mlp = ... on a regionally
        # compiled layer), a flag or a scale its forward reads. It used to land on the wrapper, where calls never
        # read it: the old graph kept answering. The wrapper's own state (private names, the settings made in
        # __init__, class attributes) stays on it.
        if self._own(name):
            return super().__setattr__(name, value)
        orig = self.__dict__["_modules"]["_orig_mod"]
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                and name in orig._parameters and sys._getframe(1).f_globals.get("__name__") == _SWAPPER:
            # torch.func.functional_call swaps a top-level parameter by setattr on the module it was given (the
            # name is not in the wrapper's own _parameters): on the original it swaps the slot, as it would there
            orig._parameters[name] = value
            return
        setattr(orig, name, value)

    def __delattr__(self, name):
        if self._own(name):
            return super().__delattr__(name)
        delattr(self.__dict__["_modules"]["_orig_mod"], name)

    def _own(self, name: str) -> bool:
        """Whether an attribute set or deleted by this name is the wrapper's (else the original's)."""
        d = self.__dict__
        return name.startswith("_") or name in d or not d.get("_ready") or hasattr(type(self), name)

    def __len__(self) -> int:
        """The original's length (an nn.Sequential, an nn.ModuleList), as torch.compile's wrapper gives it."""
        if isinstance(self._orig_mod, collections.abc.Sized):
            return len(self._orig_mod)
        raise TypeError(f"{type(self._orig_mod).__name__} does not support len()")

    def __bool__(self) -> bool:
        return bool(self._orig_mod)

    @property
    def graph(self):
        if self._traced is None:
            raise TraceError("this module has not been traced yet: call it once, or pass example_inputs to compile()")
        return self._traced.graph

    @property
    def backend(self) -> str:
        """The backend that runs this module ("auto" resolved)."""
        return self._backend.name

    @property
    def original(self) -> torch.nn.Module:
        return self._orig_mod

    def kernel_sources(self) -> dict:
        """Generated kernel source by IR value name (backends that generate code; {} for eager)."""
        return self._backend.kernel_sources(self.graph)

    # -- calling -------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if _being_traced(args, kwargs):
            # torch.export (non-strict: the Python runs on fake tensors) records the traced graph, its core ops
            # as the torch.library ops torch.ops.sessa_compiler.*; so does torch.compile, whose dynamo sees one
            # nonstrict_trace call that AOT autograd traces the same way (dynamo itself would have to trace the
            # IR interpreter's sympy). A call no traced graph fits records the original's code. Either way there
            # is no graph break and nothing of this compiler's runtime (locks, variant selection, TVM/Triton
            # launches) ends up in their graph.
            if torch.compiler.is_dynamo_compiling():
                # the wrapper exists once anything was traced (before, no traced graph fits anyway)
                if not _DYNAMO_CALL and _DYNAMO_WANTED:
                    _dynamo_call()
                return _DYNAMO_CALL[0](self, args, kwargs) if _DYNAMO_CALL else self._orig_mod(*args, **kwargs)
            return self._export_call(args, kwargs)
        if any(not isinstance(a, torch.Tensor) for a in args):
            args, kwargs = _named_constants(self._orig_mod.forward, args, kwargs)
        if getattr(self, "_cacheless", False) and "use_cache" not in kwargs:
            kwargs = {**kwargs, "use_cache": False}
        check_keywords(kwargs, InputError, f"compiled {type(self._orig_mod).__name__}: ")
        why = self._branching.get(_modes(self._orig_mod)) if self._branching else None
        if why is not None:
            return self._branching_call(why, args, kwargs)
        try:
            if self.backend_name == "eager":  # torch ops only: calls run concurrently once the graph is chosen
                with self._lock:
                    traced, runner, params = self._prepare_call(args, kwargs, limited=True)
                return self._call(traced, runner, params, args, kwargs)
            # a TVM VM and Triton's interpreter are not re-entrant: one call at a time per compiled module
            with self._lock:
                traced, runner, params = self._prepare_call(args, kwargs, limited=True)
                return self._call(traced, runner, params, args, kwargs)
        except _Uncompiled:
            return self._orig_mod(*args, **kwargs)
        except DataDependentBranch as e:
            if self._may_go_cacheless(kwargs):   # (Hugging Face Mamba2 branches on its cache's position)
                return self._cacheless_call(args, kwargs)
            self._branching[_modes(self._orig_mod)] = str(e)
            return self._branching_call(str(e), args, kwargs)
        except TraceError as e:
            if not _cache_object_in_output(e) or not self._may_go_cacheless(kwargs):
                raise
            return self._cacheless_call(args, kwargs)

    def _may_go_cacheless(self, kwargs) -> bool:
        """Whether a trace that failed (a cache object in the output, a branch on a cache's position) may be tried
        again with use_cache=False: the forward takes use_cache, the caller did not pass it, not tried yet."""
        return "use_cache" not in kwargs and not getattr(self, "_cacheless", False) \
            and "use_cache" in inspect.signature(self._orig_mod.forward).parameters

    def _cacheless_call(self, args, kwargs):
        """The call again with use_cache=False, and every later one that does not pass use_cache: a Hugging Face
        model called as model(ids), whose use_cache defaults to True, returns a cache object (DynamicCache) no traced
        graph can return, or branches on the cache's position (Mamba2)."""
        self._cacheless = True
        out = self.forward(*args, **kwargs)
        if _modes(self._orig_mod) in self._branching:   # it branches on data without a cache too (LayerDrop in
            self._cacheless = False                      # training): that mode runs the module, nothing else changes
            return out
        warnings.warn(f"compiled {type(self._orig_mod).__name__}: its forward builds a key/value cache by default "
                      "(use_cache=True), which a traced graph cannot return or branch on: calls that do not pass "
                      "use_cache run with use_cache=False (past_key_values is None; the logits and loss are "
                      "the module's). Pass use_cache=False to say so; serve with prefill/decode_step "
                      "(docs/serving.md)", stacklevel=5)
        return out

    def _branching_call(self, why: str, args, kwargs):
        """A call in a train/eval mode whose forward branches on a tensor's value (Hugging Face's LayerDrop,
        ``if torch.rand([]) < self.layerdrop:``, taken in training mode even at layerdrop 0): no one traced graph
        is the module, so the module itself runs (drawing as it does). Calls in other modes (eval, where the branch
        is not reached) are traced as usual. Running such calls through torch.compile was tried: its graph breaks
        compile little of such a model here, and in torch 2.13 its backends got OPT's gradients wrong under
        gradient checkpointing with dropout ("eager") or failed in Whisper's backward ("aot_eager")."""
        self._say_once("data_dependent", f"{why.rstrip('.')}. Calls in this train/eval mode run the original "
                       "module uncompiled (calls in a mode that does not reach the branch, such as eval, are "
                       "compiled); torch.compile(model, backend='sessa') compiles around such branches", stacklevel=5)
        return self._orig_mod(*args, **kwargs)

    def _export_call(self, args, kwargs, impls: dict = LIBRARY_OPS):
        """The call as torch.export (or torch.compile) should record it: a traced graph whose train/eval modes,
        inputs (count, ranks, dtypes) and parameter types fit, run by the IR interpreter with symbolic sizes,
        attention, feedback and scan as ``impls`` gives them (LIBRARY_OPS:
        torch.ops.sessa_compiler.attention/.feedback/.selective_scan), every other op as torch; the original's
        code when no traced graph fits."""
        from .semantics import run_graph, symbolic_binding

        for traced, _runner, live, traced_modes in list(self._variants):
            graph = traced.graph
            inputs = traced.tensor_inputs(args, kwargs)
            if len(inputs) != len(graph.inputs) or any(
                    not isinstance(x, torch.Tensor) or x.dim() != v.type.rank or x.dtype != to_torch(v.type.dtype)
                    for x, v in zip(inputs, graph.inputs)) or _autocast_mismatch(traced, args, kwargs) is not None:
                continue
            why, params = self._state_mismatch(live, traced_modes, requires_grad=False)
            if why is not None:
                continue
            outs = run_graph(graph, inputs, params, binding=symbolic_binding(graph, inputs), impls=impls)
            return traced.unflatten(outs)
        return self._orig_mod(*args, **kwargs)

    def _prepare_call(self, args, kwargs, limited: bool = False):
        """(traced graph, runner, live parameters) for this call: traces on the first call, and again when
        no earlier trace fits (keyword signature, size guards, train/eval modes, parameter dtypes/shapes).
        ``limited`` (forward calls): with max_traces graphs traced already, _Uncompiled instead of a new trace."""
        params = None
        with collecting(self.cache_notes):
            if self._traced is None:
                if limited:
                    self._no_trace_in_a_transform()
                self._trace(args, kwargs)
            else:
                params = self._select_variant(args, kwargs, limited)
        if params is None:
            params = self._live.read(self._orig_mod)
        self._traced.graph.params.update(params)  # .graph shows the weights the last call used
        return self._traced, self._runner, params

    def _call(self, traced, runner, params, args, kwargs):
        graph = traced.graph
        inputs = traced.tensor_inputs(args, kwargs)
        if traced.python_random:
            return self._with_python_random(traced, args, kwargs)
        hooks = getattr(traced, "hook_effects", ())
        forward_hooks = [h for h in hooks if not _backward_hook(h)]
        if forward_hooks:
            return self._with_hooks(forward_hooks, "their results are None: they are there for what they do besides "
                                    "(storing or counting a submodule's output), which a traced graph never does "
                                    "again", args, kwargs)
        if (traced.custom_backward or hooks) and torch.is_grad_enabled() and (
                any(x.requires_grad for x in inputs)
                or any(isinstance(p, torch.Tensor) and p.requires_grad for p in params.values())):
            if hooks:
                return self._with_hooks(hooks, "the traced graph's gradients never call them (calls under "
                                        "torch.no_grad(), or with nothing requiring grad, run compiled)", args, kwargs)
            return self._with_custom_backward(traced, args, kwargs)
        if torch.is_grad_enabled() and self._live is not None and self._live.unregistered:
            trainable = self._live.unregistered_trainable()
            if trainable:
                return self._with_unregistered(trainable, args, kwargs)
        bind_symbols(graph, inputs)  # rank, dtype and shape checks before anything runs
        self._check_devices(inputs, params)
        first = id(runner) in self._fresh  # a lazy backend (auto) builds its kernels at the first call
        self._fresh.discard(id(runner))
        with _progress(f"sessa_compiler: first call of {type(self._orig_mod).__name__} (builds kernels)",
                       first and self.progress is not False), \
                (collecting(self.cache_notes) if first else contextlib.nullcontext()):
            if self._interpreted(inputs):
                with _INTERPRETER_LOCK:
                    outs = self._run(inputs, graph, runner, params, traced)
            else:
                outs = self._run(inputs, graph, runner, params, traced)
        copies = self._copies.get(id(traced))
        if copies is None or copies[0] is not traced:
            copies = self._copies[id(traced)] = (traced, traced.copied_outputs())
        if copies[1]:   # the module returns new tensors there, the graph an input, weight or other output
            outs = list(outs)
            for i in copies[1]:
                outs[i] = outs[i].clone()
        if getattr(traced, "contiguous_outputs", ()):   # x.contiguous(): a copy exactly where the module makes one
            outs = list(outs)
            for i in traced.contiguous_outputs:
                outs[i] = outs[i].contiguous()
        if getattr(traced, "zero_grads", ()) and torch.is_grad_enabled():
            outs = _with_zero_grads(self._orig_mod, traced.zero_grads, outs)
        result = traced.unflatten(outs)
        if self.validate:
            self._validate(args, kwargs, outs, graph)
        return result

    def _interpreted(self, inputs) -> bool:
        """Whether this call runs Triton's interpreter (Triton on CPU tensors)."""
        # auto sends CPU tensors to tvm or eager, never to the interpreter
        return self.backend_name == "triton" and (bool(self._options.get("interpret"))
                                                  or not any(x.is_cuda for x in inputs))

    # -- which traced graph fits this call ----------------------------------------------------------------
    def _state_mismatch(self, live: _Live, modes: tuple, requires_grad: bool = True) -> tuple:
        """(why, live tensors): why a traced graph does not fit the module as it is now (None when it does): its
        Python state (frontend/guards.py, checked first: while it holds, the submodules are those of the trace),
        train/eval modes, parameter dtypes/shapes and the tensors recognised ops were built from."""
        module = self._orig_mod
        why = live.python_changed(module)
        if why is not None:
            return f"the module changed since the trace: {why}", None
        if tuple(map(_TRAINING, live.guard.modules)) != modes:
            return "the module's train/eval mode changed since the trace (train-mode ops such as dropout differ)", None
        params = live.read_fast()
        if params is None:
            params = live.read(module)
        why = live.mismatch(params, requires_grad) or live.assumption_changed(module)
        return (f"the module changed since the trace: {why}" if why else None), params

    def _state_for(self, graph) -> tuple:
        """(why, live tensors) for the traced graph ``graph`` (the serving methods run it without a forward call):
        why the module no longer fits it (None when it does), as _select_variant decides for a forward call."""
        for traced, _runner, live, traced_modes in self._variants:
            if traced.graph is graph:
                return self._state_mismatch(live, traced_modes)
        return "the graph is not one of this module's traces", None

    def _no_trace_in_a_transform(self) -> None:
        """A call inside a torch.func transform (grad, vjp, jacrev, vmap) that needs a new trace: torch.export
        cannot trace there (it uses saved-tensor hooks, which those transforms refuse), so the module itself runs
        this call (_Uncompiled). Once a plain call has traced these sizes, calls inside transforms run the graph."""
        if torch._C._functorch.peek_interpreter_stack() is None:
            return
        self._say_once("functorch", "a call inside a torch.func transform (grad, vmap, jacrev) needs a new trace, "
                       "which torch.export cannot make inside one: such calls run the original module uncompiled; "
                       "call the compiled module once outside the transform, at these sizes, to compile it",
                       stacklevel=6)
        raise _Uncompiled

    def _select_variant(self, args, kwargs, limited: bool = False) -> dict | None:
        """Make current the traced graph that equals the module at these sizes and in its current state.
        torch.export follows one path through the module's Python code; where that code branches on B or T,
        the graph holds only under its guards (Traced.guards). Other sizes get their own trace, once per path,
        as torch.compile recompiles; so do other train/eval modes and parameter dtypes (after .double(), ...)."""
        current = next(v for v in self._variants if v[0] is self._traced)
        state, params = self._state_mismatch(self._live, current[3])
        reason = _why_not(self._traced, args, kwargs)
        amp = _autocast_mismatch(self._traced, args, kwargs)
        if reason is None and state is None and amp is None:
            return params  # the live tensors, read once per call
        if reason is not None and _OTHER_FLOAT in reason and state is not None:
            reason = None   # the module's own dtype moved (.double()): its state says why, as before (no warning)
        signature = inspect.signature(self._orig_mod.forward)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"compiled {type(self._orig_mod).__name__}: forward{signature} cannot take this call: "
                             f"{e}") from None
        for traced, runner, live, traced_modes in self._variants:
            if traced is not self._traced and _why_not(traced, args, kwargs) is None \
                    and _autocast_mismatch(traced, args, kwargs) is None:
                why, params = self._state_mismatch(live, traced_modes)
                if why is None:
                    self._traced, self._runner, self._live = traced, runner, live
                    return params
        if limited and self.max_traces is not None and len(self._variants) >= self.max_traces:
            self._beyond_limit(reason or state or amp)
        if reason is not None and _OTHER_FLOAT in reason:   # (after .double() reason is None: a new trace)
            return self._trace_float_dtype(current, args, kwargs, reason)
        if reason is not None:
            warnings.warn(f"compiled {type(self._orig_mod).__name__}: {reason}; tracing it again for this call "
                          f"(traced graph {len(self._variants) + 1}: each keyword-argument signature and each path "
                          "through the module's size-dependent code is traced once)",
                          stacklevel=6)  # past nn.Module.__call__ to the caller
        if limited:
            self._no_trace_in_a_transform()
        self.retraces.append(reason or state or amp)   # (autocast: a graph of its own, traced without a warning)
        try:
            self._trace(args, kwargs)
        except DataDependentBranch:
            raise   # (forward runs such calls on the original module)
        except SessaCompilerError as e:
            if reason is None:  # the module's state changed and the module cannot run this call
                raise InputError(f"compiled {type(self._orig_mod).__name__}: {state}, and tracing it again for "
                                 f"this call failed: {e}") from e
            raise
        return None

    def _trace_float_dtype(self, current, args, kwargs, reason: str):
        """A float input of another dtype than traced: its own trace when the module casts it (``x.to(w.dtype)``:
        the new graph reads it through casts only), else the input check's InputError, as before (the module
        raises on it, or would compute in another dtype than any graph traced). No warning: a trace per dtype."""
        old = current[0]
        inputs = list(old.tensor_inputs(args, kwargs))
        dtypes = tuple(x.dtype for x in inputs)
        if dtypes not in self._refused_dtypes:
            try:
                self._trace(args, kwargs, accept=lambda new: casts_float_inputs(new.graph, old.graph))
                self.retraces.append(reason)
                return None
            except (SessaCompilerError, _NotAccepted):
                pass
        self._refused_dtypes.add(dtypes)   # (traced once: later calls in these dtypes raise at once)
        bind_symbols(old.graph, inputs)   # raises the input check's InputError
        raise InputError(f"compiled {type(self._orig_mod).__name__}: {reason}")

    def _say_once(self, kind: str, message: str, stacklevel: int) -> None:
        """Count a call that runs the original module, and warn of its reason the first time it is ``kind``."""
        self.uncompiled_calls += 1
        if kind not in self._said:
            self._said.add(kind)
            warnings.warn(f"compiled {type(self._orig_mod).__name__}: {message}", stacklevel=stacklevel + 1)

    def _with_custom_backward(self, traced, args, kwargs):
        """A call that needs gradients of a module whose forward applies the user's torch.autograd.Functions:
        the traced graph holds their forward's ops, not their backward (a gradient reversal would get the
        identity's gradient), so it runs the module itself; calls without gradients stay compiled."""
        self._say_once("custom_backward", f"its forward applies {', '.join(traced.custom_backward)} "
                       "(a torch.autograd.Function with its own backward, or a hook on a tensor's gradient), which "
                       "the traced graph cannot differentiate as the module does; calls that need gradients run the "
                       "original module uncompiled, calls under torch.no_grad() (or with nothing requiring grad) run "
                       "compiled. torch.compile(model, backend='sessa') keeps such Functions and hooks in its graph",
                       stacklevel=6)
        return self._orig_mod(*args, **kwargs)

    def _with_unregistered(self, paths, args, kwargs):
        """A call that needs gradients while the module holds tensors that require grad outside its parameters
        (a plain attribute trained by hand, a Parameter in a Python list): the trace lifted them as constants, so
        they would get no gradient; the module itself runs."""
        self._say_once("unregistered", f"it holds tensors that require grad but are not registered parameters "
                       f"({', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}); a traced graph takes them as "
                       "constants and would give them no gradient, so calls that need gradients run the original "
                       "module uncompiled (register them: nn.Parameter attributes, nn.ParameterList or "
                       "register_parameter; calls under torch.no_grad() run compiled)", stacklevel=6)
        return self._orig_mod(*args, **kwargs)

    def _with_hooks(self, hooks, why, args, kwargs):
        """A module with hooks whose work a traced graph cannot do (forward hooks kept for their side effects,
        backward hooks): the module itself runs, with its hooks."""
        self._say_once("hooks", f"it has hooks the compiled graph cannot run ({', '.join(hooks)}): {why}. Such "
                       "calls run the original module uncompiled, hooks included; remove the hooks (handle.remove()) "
                       "to run compiled (a forward hook that returns a new output is compiled into the graph)",
                       stacklevel=6)
        return self._orig_mod(*args, **kwargs)

    def _with_python_random(self, traced, args, kwargs):
        """A module whose forward (in this mode) draws from Python's random (Hugging Face's LayerDrop): the trace
        baked one draw into the graph, which would repeat it at every call, so the module itself runs."""
        self._say_once("python_random", f"its forward calls {', '.join(traced.python_random)}; a traced graph would "
                       "repeat the one draw made while tracing at every call, so calls in this mode run the original "
                       "module uncompiled (draw with torch's generator and select with tensor ops to compile it, "
                       "x = torch.where(torch.rand(()) < p, x, layer(x)); an eval-mode forward that does not draw is "
                       "compiled)", stacklevel=6)
        return self._orig_mod(*args, **kwargs)

    def _beyond_limit(self, why: str):
        """A forward call no traced graph fits, with max_traces graphs traced: it runs on the original module
        (as torch.compile runs a frame past its recompile limit eagerly), said once in a warning and in explain().
        A module that traces a graph per sequence length (a Python loop over time steps) or per value of a
        constant keyword would otherwise spend seconds tracing, and keep a built program, at every new value."""
        self._say_once("max_traces", f"{why}; {len(self._variants)} graphs are traced already "
                       f"(max_traces={self.max_traces}), so this call and later ones that no traced graph fits run the "
                       "original module uncompiled (eager PyTorch); calls the traced graphs fit stay compiled. Pass "
                       "max_traces=<n> (or None) to compile() to trace more", stacklevel=7)
        raise _Uncompiled

    def _run(self, args: list, graph, runner, params, traced=None) -> list:
        with _autocast_off(getattr(traced, "autocast", None)):   # a graph traced under autocast holds its casts
            outs, recomputed = run_with_autograd(self._backend, runner, graph, args, params, self._eager_runners)
        self.grad_recomputes += recomputed
        return outs

    def _check_devices(self, args, params) -> None:
        devices = {a.device for a in args}
        params = [p for p in params.values() if isinstance(p, torch.Tensor)]
        if params:
            devices.add(params[0].device)
        if len(devices) > 1:
            raise InputError(f"compiled {type(self._orig_mod).__name__}: inputs and parameters are on different devices "
                             f"({', '.join(sorted(map(str, devices)))}); move them to one device")

    def _validate(self, args, kwargs, outs, graph) -> None:
        with torch.no_grad():
            ref = [r for r in pytree.tree_leaves(self._orig_mod(*args, **kwargs)) if isinstance(r, torch.Tensor)]
        worst = 0.0  # the largest error over the allowed, for explain()
        for i, (o, r) in enumerate(zip(outs, ref)):
            err = relative_error(o, r)
            tol = graph_tolerance(r.dtype, graph)
            worst = max(worst, err / tol if tol else 0.0)
            if err > tol:
                v = graph.outputs[i]
                producer = v.producer.op if v.producer is not None else "input"
                core = [n.op for n in graph.nodes if OPS[n.op].kind == CORE]
                raise ValidationError(
                    f"output {i} (%{v.name}, produced by op '{producer}') differs from the original module: "
                    f"max abs error / max abs reference = {err:.3e} > {tol:.0e} allowed for {r.dtype} "
                    f"(backend {self._backend.name}; core ops in the graph: {', '.join(core) or 'none'})")
        calls, before = self.__dict__.get("_validated", (0, 0.0))  # for explain(): the checks that passed
        self._validated = (calls + 1, max(before, worst))

    # -- reporting -------------------------------------------------------------------------------------
    def _cache_report(self) -> str:
        """Which stages came from the persistent caches (docs/caching.md)."""
        trace = {"hit": "traced graph from the compile cache",
                 "miss": "traced graph not in the compile cache (traced)",
                 "off": "compile cache off or not usable (traced)"}.get(self.trace_cache, "traced")
        if self.trace_cache_why and self.trace_cache != "hit":
            trace += f": {self.trace_cache_why}"
        parts = [trace]
        for cache, label in (("TVM library", "TVM libraries"), ("TVM kernel", "TVM kernels"),
                             ("tuned config", "tuned configs")):
            counts = {o: c for (k, o), c in self.cache_notes.items() if k == cache}
            if counts:
                parts.append(f"{label}: " + ", ".join(f"{c} {o}" for o, c in sorted(counts.items())))
        return "caches: " + "; ".join(parts)

    def explain(self) -> str:
        """A readable report: recognised ops, rejected candidates, fallbacks, backend and kernels."""
        if self._traced is None:
            if self._branching:
                return (f"compiled {type(self._orig_mod).__name__}: no traced graph; {self.uncompiled_calls} call(s) "
                        "ran the original module (the forward branches on a tensor's value: "
                        f"{'; '.join(sorted(set(self._branching.values())))})")
            return f"{type(self._orig_mod).__name__}: not traced yet (call it once or pass example_inputs)"
        g, rep = self._traced.graph, self._traced.report
        counts = collections.Counter(n.op for n in g.nodes)
        lines = [f"compiled {type(self._orig_mod).__name__} with backend '{self._backend.name}'",
                 f"  inputs: {', '.join(f'%{v.name}: {v.type}' for v in g.inputs)}",
                 f"  {len(g.nodes)} ops, {len(g.param_values)} parameters"
                 + (f", traced in {self.trace_seconds:.2f} s" if self.trace_seconds else "")]
        lines.append("  " + self._cache_report())
        if self._traced.constants:
            names = self._traced.leaf_names
            lines.append("  keyword constants baked into this graph (a call with others traces again): " +
                         ", ".join(f"{names[i]}={v!r}" for i, v in self._traced.constants))
        if self._traced.guards:
            lines.append("  guards (size-dependent code in the module; this graph equals it only where they hold, "
                         "other sizes are traced again): " + ", ".join(map(str, self._traced.guards)))
        if len(self._variants) > 1:
            lines.append(f"  traced graphs: {len(self._variants)}, one per keyword-argument signature and path through "
                         "size-dependent code; this report describes the one used last")
        if self.uncompiled_calls:
            lines.append(f"  uncompiled calls: {self.uncompiled_calls} call(s) ran the original module (no traced graph "
                         f"fits past max_traces={self.max_traces}, gradients through a torch.autograd.Function, "
                         "Python random draws, a branch on a tensor's value, or hooks a graph cannot run)")
        if self._branching:
            lines.append("  forward branches on a tensor's value in another train/eval mode, whose calls run the "
                         f"original module: {'; '.join(sorted(set(self._branching.values())))}")
        if getattr(self._traced, "python_random", ()):
            lines.append(f"  Python random draws in forward: {', '.join(self._traced.python_random)}; calls run the "
                         "original module")
        if getattr(self._traced, "custom_backward", ()):
            lines.append("  torch.autograd.Functions with their own backward, hooks on tensors' gradients: "
                         f"{', '.join(self._traced.custom_backward)}; calls that need gradients run the original "
                         "module")
        if getattr(self._traced, "hook_effects", ()):
            lines.append(f"  hooks a graph cannot run: {', '.join(self._traced.hook_effects)}; calls run the original "
                         "module (backward hooks: calls that need gradients)")
        core = {op: c for op, c in counts.items() if OPS[op].kind == CORE}
        lines.append("  core ops: " + (", ".join(f"{op} x{c}" for op, c in sorted(core.items())) or "none"))
        for a in getattr(rep, "shared", ()):   # (a report from before the field has none)
            lines.append(f"    identical layers traced once: {a}")
        for a in rep.accepted:
            lines.append(f"    recognised {a}")
        for r in rep.rejected:
            lines.append(f"    not recognised: {r}")
        probes = getattr(rep, "probes", None)   # None in a report traced before probes were counted
        if probes is not None and probes.reused:
            lines.append(f"    recognition probes: {probes.run} run, {probes.reused} answered by an earlier probe of a "
                         "structurally identical region (same ops, shapes and constants: identical layers are probed once)")
        side = getattr(self._traced, "side_effects", ())
        if side:
            lines.append(f"  side effects not repeated by compiled calls: the forward sets {', '.join(side)}")
        fallbacks = collections.Counter(n.attrs["target"] for n in g.nodes if n.op == "fallback")
        lines.append("  fallbacks (run as torch ops): " +
                     (", ".join(f"{t} x{c}" for t, c in sorted(fallbacks.items())) or "none"))
        others = {op: c for op, c in counts.items() if OPS[op].kind != CORE and op != "fallback"}
        lines.append("  other ops: " + ", ".join(f"{op} x{c}" for op, c in sorted(others.items())))
        lines.append("  " + self._backend.describe(g))
        if self.validate:
            calls, worst = self.__dict__.get("_validated", (0, 0.0))
            lines.append(f"  validate=True: {calls} call(s) checked against the original module, all within the "
                         f"spec's tolerance (worst error {worst:.2g} of the allowed)" if calls else
                         "  validate=True: no call checked yet (each call is compared with the original module)")
        current = getattr(self._backend, "current", self._backend)  # auto: the backend it resolved last
        if not self._backend.differentiable and type(current).prepare_training is not Backend.prepare_training:
            from .backends.training import describe_backward

            name = current.name
            lse_note = ("returned by the forward kernel" if current.training_lse_from_forward else
                        "computed by a blocked pass beside the forward kernel, which does not return them")
            fb_lse = current.training_feedback_lse_from_forward
            fb_note = " and its row log-sum-exps [B, T]" if (current.training_lse_from_forward if fb_lse is None
                                                              else fb_lse) else ""
            lines.append(f"  autograd: a call that needs gradients runs the graph with each core op (attention, feedback, "
                         f"scan, tri_solve) as one autograd.Function: forward = the {name} kernel, backward = backward "
                         f"kernels ({describe_backward(name)}); ordinary ops are torch ops differentiated by torch "
                         f"autograd. Saved: attention's q, k, v, output and row log-sum-exps [B, H, T] ({lse_note}), and "
                         "its key-padding mask when it has one (the masked backward kernels read it); "
                         f"feedback's q_b, k_b, gamma and solved output s (not f){fb_note}; scan's operands (its "
                         "states are recomputed by chunks in the backward); tri_solve's A and solution. Recomputed in the backward: attention "
                         "probabilities per query block from the lse, feedback weights per chunk "
                         "(once). No tensor with two sequence dims (the T x T weights) is formed, except tri_solve's "
                         "own operand. The eager interpreter is not used")
        elif not self._backend.differentiable:
            lines.append(f"  autograd: the {self._backend.name} kernels run the forward; when a call needs gradients "
                         "(grad enabled and an input or parameter requires grad), the backward re-runs the graph on "
                         "the eager interpreter and differentiates that (recomputation); under torch.no_grad() "
                         "nothing extra is saved or run")
        return "\n".join(lines)


def compile(module: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
            backend: str = "auto", validate: bool = False,
            print_ir: bool | None = None, options: dict | None = None, autotune: bool | dict = False,
            progress: bool | None = None, max_traces: int | None = 8):
    """Compile a module. Traces now when ``example_inputs`` (and ``example_kwargs``) are given, else on the
    first call. Positional arguments are tensors; keyword arguments may be tensors or constants (None,
    bool, int, float, str), which the trace bakes in: a call with other constants traces again.

    backend: "eager" (the IR interpreter, the reference), "triton" (generated kernels; CUDA tensors, or
    CPU tensors under Triton's interpreter), "tvm" (CPU), or "auto" (decided at each call: triton for
    CUDA inputs when triton is installed; tvm for CPU inputs when tvm is installed and the graph computes
    in float32/float64; else eager; explain() says which and why). Every backend supports autograd (the
    forward-only ones recompute the backward on eager). validate=True also runs the original
    module on every call and raises ValidationError when outputs differ beyond the spec's tolerance.
    print_ir=True prints the IR after each pass of the backend's pipeline (also SESSA_COMPILER_PRINT_IR=1);
    options go to the backend (triton: feedback_chunk_size, scan_chunk_size, scan_strategy, interpret;
    tvm: schedules, whole_graph, ...; auto passes each backend the options it accepts).
    autotune=True tunes each kernel for this device and the example's sequence-length class before the
    backend is prepared (verified against eager, stored in the persistent cache; a dict passes settings
    such as {"budget": 60} to sessa_compiler.tune). Without it the backend still reads earlier results.
    progress=False (or SESSA_COMPILER_PROGRESS=0) never shows what a long compile is doing; otherwise a step
    that runs over 2 s shows its stage on a terminal (tracing, recognising, building). The persistent caches
    and what invalidates them: docs/caching.md.
    max_traces: at most this many traced graphs (calls at sizes where the module's Python takes another path,
    other keyword constants, train/eval modes, dtypes); past it a forward call that none fits runs the original
    module uncompiled, with one warning (as torch.compile's recompile limit). None: no limit.
    """
    return CompiledModule(module, example_inputs, example_kwargs=example_kwargs, backend=backend, validate=validate, print_ir=print_ir,
                          options=options, autotune=autotune, progress=progress, max_traces=max_traces)


def _tune_graph(backend, graph, inputs, **settings) -> list:
    """autotune.search.tune_graph for a backend that has tunables (eager has none: nothing to tune)."""
    from .autotune.search import Tunable, tune_graph
    from .backends.eager import run_graph

    if not isinstance(backend, Tunable):
        return []
    inputs = list(inputs)
    return tune_graph(backend, graph, inputs, seq_len=sequence_length(graph, inputs),
                      evaluate=lambda targets: run_graph(graph, inputs, graph.params, targets=targets), **settings)


TUNABLE_BACKENDS = ("triton", "tvm")


def tune(module: torch.nn.Module, example_inputs, backend: str = "triton", budget=None, *,
         options: dict | None = None, progress: bool = True, repeats: int | None = None, kernel_hook=None) -> list:
    """Autotune every kernel of ``module`` for these inputs' device and sequence-length class.

    backend: "triton" (CUDA tensors, or CPU tensors in Triton's interpreter), "tvm" (CPU tensors: the
    generated TVM kernels' schedules); "auto" means triton.
    budget: None (the whole candidate space), seconds (60, "60s", "2m") shared among the kernels, or
    trials per kernel ("20 trials"). Results go to the persistent cache (SESSA_COMPILER_CACHE_DIR, else
    the user's cache directory), which later compiles on this device read; tuned kernels are cache hits.
    Returns one TuneResult per distinct kernel (config, from_cache, median_ms, tried, rejected).
    kernel_hook(TunableKernel, node) -> TunableKernel lets tests alter a kernel's space or runner.
    """
    if backend == "auto":
        backend = "triton"
    if backend not in TUNABLE_BACKENDS:
        raise SessaCompilerError(f"tune: backend '{backend}' has no tunable kernels here; "
                                 f"tunable: {', '.join(TUNABLE_BACKENDS)}")
    settings = {"budget": budget, "progress": progress, "repeats": repeats, "kernel_hook": kernel_hook}
    if backend == "tvm":  # the compile below only prepares: hybrid mode reuses the tuned kernels' builds
        options = {"whole_graph": False, **(options or {})}
    compiled = compile(module, example_inputs, backend=backend, options=options, autotune=settings)
    return compiled.tune_results
