"""``trace(module, example_inputs) -> Graph``: torch.export with dynamic batch and sequence length,
lowered to the IR, then the recognisers."""
from __future__ import annotations

import collections
import contextlib
import inspect
import io
import os
import sys
import threading
import warnings
import dataclasses
from dataclasses import dataclass

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from ..errors import DataDependentBranch, IRError, TraceError
from ..ir.dtypes import to_torch
from ..ir.graph import Graph
from ..ir.ops import view_root
from ..passes.simplify import hand_written_softmax, simplify
from ..persistent_cache import tensor_digest
from ..progress import stage
from . import repeated
from .lower import CONSTANT_TYPES, Lowerer, register_custom_lowerings
from .recognise import B as BATCH, T as SEQUENCE, Report, recognise


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise TraceError("trace needs example inputs (a tensor or a tuple of tensors)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TraceError(f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    return example_inputs


def _dynamic_dims(x: torch.Tensor, batch: int = 0) -> dict:
    # dim 0 is the batch, dim 1 the sequence: the two sizes a Sessa model is used at many values of; a tensor
    # of batch 1 beside others of batch > 1 broadcasts over the batch (position_ids [1, T]): its dim 0 stays 1
    first = 1 if broadcasts(x, batch) else 0
    return {d: Dim.AUTO for d in range(first, min(x.dim(), 2))}


def broadcasts(x, batch: int) -> bool:
    """A tensor of batch 1 beside inputs of a larger batch (position_ids [1, T] beside ids [B, T])."""
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1 and batch > 1


def batch_of(args, kwargs: dict | None = None) -> int:
    """The largest dim 0 of the call's tensors (0 when none has one)."""
    tensors = [x for x in [*args, *(kwargs or {}).values()] if isinstance(x, torch.Tensor) and x.dim()]
    return max((int(x.shape[0]) for x in tensors), default=0)


# torch.export (non-strict) swaps a module's parameters for fake tensors in place while it traces, and the shared
# layer plans (repeated.Plan) set an instance forward on the layers they trace: two exports at once over modules
# that share a submodule (two task heads on one backbone, compiled twice, first calls from a thread pool) saw each
# other's fakes ("fake_mode.in_kernel_invocation must be False") and could leave a plan's stand-in forward on the
# user's layers. Exports in one process run one at a time (re-entrant: an export that traces a compiled module
# inside it goes on).
EXPORT_LOCK = threading.RLock()


def _grow(x: torch.Tensor, batch: int = 0) -> torch.Tensor:
    """torch.export specialises dims of size 0 or 1: trace on a copy grown to size >= 2 there. The copy is
    contiguous: the example's strides (a slice of a longer sequence, a transposed view) must not become
    symbols of the graph, which serves inputs of any layout."""
    x = x.contiguous()
    for d in range(1 if broadcasts(x, batch) else 0, min(x.dim(), 2)):
        x = _grown(x, d)
    return x


def _grown(x: torch.Tensor, d: int) -> torch.Tensor:
    """x grown to size 2 along dim d where it is 0 (zeros: the call runs empty) or 1 (repeated)."""
    if x.shape[d] == 0:
        return x.new_zeros(x.shape[:d] + (2,) + x.shape[d + 1:])
    if x.shape[d] == 1:
        reps = [1] * x.dim()
        reps[d] = 2
        return x.repeat(*reps)
    return x


def _unaliased(args: tuple, kwargs: dict) -> tuple:
    """The examples with every tensor on its own storage. Given one tensor twice (``model(ids, labels=ids)``, the
    usual causal-LM call), torch.export makes one graph input of the two and the lowering read it under either
    name: the graph then used labels where the module used input_ids, wrong for any later call whose two
    tensors differ. A tensor sharing storage with an earlier one is traced on a copy: the graph takes them as
    the independent inputs every later call may give."""
    seen: set = set()

    def own(x):
        if not isinstance(x, torch.Tensor):
            return x
        try:
            key = x.untyped_storage().data_ptr() if x.untyped_storage().nbytes() else None
        except RuntimeError:   # a fake example (a layer traced inside the model's export): by identity
            key = ("id", id(x))
        if key is not None and key in seen:
            try:
                return x.clone()
            except RuntimeError:
                return x
        if key is not None:
            seen.add(key)
        return x
    args = tuple(pytree.tree_map(own, a) for a in args)
    return args, {k: pytree.tree_map(own, v) for k, v in kwargs.items()}


def _mutates(ep) -> bool:
    """The program mutates tensors, or runs a region under autocast (whose casts are implicit in the pre-dispatch
    graph: its ops keep their operands' dtypes and say another); run_decompositions writes both out as ops."""
    for n in ep.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            return True
        if n.op == "call_function" and getattr(n.target, "_name", "") == "wrap_with_autocast":
            return True
    return False


def call_leaves(args: tuple, kwargs: dict | None) -> tuple:
    """(leaves, spec) of a call: the positional tensors, then the keyword values by sorted name. The
    tensor leaves, in this order, are the traced graph's inputs; the others are baked-in constants."""
    return pytree.tree_flatten((tuple(args), dict(sorted((kwargs or {}).items()))))


def tensor_leaves(args: tuple, kwargs: dict | None) -> list:
    """The graph's inputs for a call: the positional tensors, then the keyword tensors by sorted name
    (the tensor leaves of call_leaves, in its order)."""
    return list(args) + [v for _, v in sorted((kwargs or {}).items()) if isinstance(v, torch.Tensor)]


def check_keywords(kwargs: dict, error=TraceError, prefix: str = "") -> None:
    """Keyword values must be tensors or constants (CONSTANT_TYPES)."""
    for k, v in kwargs.items():
        if not isinstance(v, (torch.Tensor, *CONSTANT_TYPES)):
            raise error(f"{prefix}keyword argument {k!r} must be a tensor or a constant "
                        f"(None, bool, int, float, str), got {type(v).__name__}")


def _check_call(args: tuple, kwargs: dict) -> None:
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TraceError(f"example input {i} must be a tensor, got {type(a).__name__}")
    check_keywords(kwargs)


def _register_output_types(out, seen=None) -> None:
    """Output dataclasses (registered as pytree nodes or not; an OrderedDict subclass like transformers'
    ModelOutput included) become pytree nodes over their fields, so torch.export can flatten the output and a
    compiled module rebuild it: fields set to None stay None (no graph output)."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(out) in seen:
        return
    seen.add(id(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        _register_dataclass(type(out))
        children = [getattr(out, n.name) for n in dataclasses.fields(out)]
    elif isinstance(out, (list, tuple)):
        children = list(out)
    elif isinstance(out, dict):
        children = list(out.values())
    else:
        return
    for c in children:
        _register_output_types(c, seen)


def _register_dataclass(cls) -> None:
    """A dataclass as a pytree node over its fields (a field set to None is no leaf: the context names the
    present fields), unless it is one already."""
    import dataclasses

    if cls in pytree.SUPPORTED_NODES:
        return
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten(obj, names=names):
        present = [n for n in names if getattr(obj, n) is not None]
        return [getattr(obj, n) for n in present], present

    def flatten_with_keys(obj, names=names):
        values, present = flatten(obj)
        return [(pytree.GetAttrKey(n), v) for n, v in zip(present, values)], present

    def unflatten(values, context, cls=cls):
        return cls(**dict(zip(context, values)))

    try:
        pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                    serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    except ValueError:  # registered meanwhile (another thread or a C++ registration)
        pass


def register_spec_types(spec) -> None:
    """Register the output dataclasses a pytree spec names (a Traced read back from the compile cache in a
    process that has not traced the module: its outputs are rebuilt through this spec)."""
    import dataclasses

    stack = [spec]
    while stack:
        node = stack.pop()
        cls = getattr(node, "type", None)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            _register_dataclass(cls)
        stack.extend(getattr(node, "children_specs", ()) or ())


def _output_hook(module, args, output):
    _register_output_types(output)


def export_program(module: torch.nn.Module, example_inputs, example_kwargs: dict | None = None,
                   dynamic_shapes: tuple | dict | None = None) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of module(*example_inputs, **example_kwargs). By default dims 0 and 1 of every
    tensor argument are dynamic (B and T); `dynamic_shapes` (positional arguments only) says which dims are instead,
    and the examples are then traced at their own sizes."""
    args = _as_tuple(example_inputs)
    kwargs = dict(sorted((example_kwargs or {}).items()))
    _check_call(args, kwargs)
    with _named_keywords(module, kwargs, list(example_kwargs or {})):
        return _export_program(module, args, kwargs, dynamic_shapes)


def extra_keywords(module, kwargs: dict) -> tuple:
    """The keywords of a call that reach a ``**kwargs`` of the module's forward (not named by it), in the call's
    order, where there are two or more: the forward may read them in that order (``torch.cat(list(
    features.values()))``), so the order is part of the call's signature (Traced.keyword_order). () otherwise."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return ()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ()
    extra = tuple(k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.VAR_KEYWORD)
    return extra if len(extra) > 1 else ()


@contextlib.contextmanager
def _named_keywords(module, kwargs: dict, order: list | None = None):
    """A forward taking ``**kwargs`` called with keywords it does not name: torch.export cannot give those
    dynamic shapes (its spec nests them under the ``**`` parameter and then fails an internal assertion), so
    while exporting, the instance's forward is one with the same code and a signature naming each keyword. It
    passes them on in the call's ``order`` (export gives them sorted by name), which the forward may read."""
    sig = inspect.signature(module.forward)
    params = list(sig.parameters.values())
    extra = [k for k in kwargs if k not in sig.parameters]
    if not extra or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        yield
        return
    bound = module.forward
    had = "forward" in vars(module)

    rank = {name: i for i, name in enumerate(order or ())}

    def forward(*a, **k):
        return bound(*a, **dict(sorted(k.items(), key=lambda item: rank.get(item[0], len(rank)))))

    named = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    named += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]
    forward.__signature__ = sig.replace(parameters=named)
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        if had:
            module.__dict__["forward"] = bound
        else:
            del module.__dict__["forward"]


_EXPORT_AUTOCAST = threading.local()   # .state: the autocast the export runs under (autocast_state), or None


def autocast_state(tensors) -> tuple | None:
    """(device type, dtype name) of the torch.autocast on for the device of these tensors, or None."""
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    try:
        if not torch.is_autocast_enabled(device):
            return None
        return device, str(torch.get_autocast_dtype(device)).removeprefix("torch.")
    except (RuntimeError, TypeError):   # a device type autocast does not know
        return None


@contextlib.contextmanager
def export_autocast(state: tuple | None):
    """Export under the autocast ``state`` (autocast_state) while the rest of the trace (lowering, recognisers'
    probes) runs with autocast off: torch.export records ops above autocast, so the program is then decomposed
    under it, which writes autocast's casts out as ops, keeps the module's explicit casts (``logits.float()`` of
    a bf16 tensor) and runs its ``autocast(enabled=False)`` regions in their own dtype, as the module does."""
    before = getattr(_EXPORT_AUTOCAST, "state", None)
    _EXPORT_AUTOCAST.state = state
    try:
        yield
    finally:
        _EXPORT_AUTOCAST.state = before


def exporting_autocast() -> tuple | None:
    return getattr(_EXPORT_AUTOCAST, "state", None)


def _amp(state):
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=getattr(torch, state[1]))


def _export_program(module, args: tuple, kwargs: dict, dynamic_shapes):
    if dynamic_shapes is not None:
        if kwargs and not isinstance(dynamic_shapes, dict):
            raise TraceError("export_program: dynamic_shapes covers positional arguments only")
        # (a dict: by parameter name, keyword arguments included: _static_dims)
        traced_args, dynamic = tuple(a.contiguous() for a in args), dynamic_shapes
        traced_kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in (kwargs or {}).items()}
    else:
        batch = batch_of(args, kwargs)
        traced_args = tuple(_grow(a, batch) for a in args)
        traced_kwargs = {k: _grow(v, batch) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL
                       for p in inspect.signature(module.forward).parameters.values())
        # dynamic shapes by parameter name, so keyword arguments (and *args) get theirs too
        if traced_kwargs or variadic:
            try:
                bound = inspect.signature(module.forward).bind(*traced_args, **traced_kwargs).arguments
            except TypeError as e:
                raise TraceError(f"{type(module).__name__}.forward does not take these arguments: {e}") from e
            dynamic = {name: pytree.tree_map(lambda v: _dynamic_dims(v, batch) if isinstance(v, torch.Tensor) else None, value)
                       for name, value in bound.items()}
        else:
            dynamic = tuple(_dynamic_dims(a, batch) for a in traced_args)
    traced_args, traced_kwargs = _unaliased(traced_args, traced_kwargs)
    try:
        # torch.export keeps process-wide state (its exporting flag, the swapped-in fake parameters of the module,
        # the warning filters and the stderr redirection here): one export at a time in this process
        amp = exporting_autocast()
        with EXPORT_LOCK, warnings.catch_warnings(), _quiet_torch_logs(), _hooked(module), _as_parameters(module), \
                _no_fake_cache(), _attribute_writes(module), _autograd_functions(), _python_draws(), _hook_effects(module), \
                _float_sizes(), _symbolic_take_along_dim(), _amp(amp):
            warnings.simplefilter("ignore")
            # guards on sizes become runtime assertions in the graph (or ranges), not silent specialisations:
            # they are recorded as the traced graph's guards (see Guard)
            ep = torch.export.export(module, traced_args, kwargs=traced_kwargs or None, dynamic_shapes=dynamic,
                                     strict=False,
                                     prefer_deferred_runtime_asserts_over_guards=True)
            if amp is not None or _mutates(ep):  # functionalise only when needed: it costs as much as the export
                ep = ep.run_decompositions({})
    except Exception as e:
        data_dependent = _data_dependent_branch(e)
        if data_dependent is not None:
            raise DataDependentBranch(f"cannot trace {type(module).__name__}: {data_dependent}") from e
        raise TraceError(f"torch.export could not trace {type(module).__name__}: {type(e).__name__}: {e}") from e
    return ep


def _no_fake_cache():
    """FakeTensor's dispatch cache off for the export: with symbolic B and T, building its entries (the outputs'
    symbolic sizes and strides) costs more than the hits save within one export; without it an export takes
    0.55-0.7x the time (torch 2.13: SessaLayer 0.81 -> 0.43 s, a 4-layer Decoder 2.0 -> 1.37 s), the same
    graph. Only a cache: what the export computes does not change."""
    import torch._dynamo.config as config

    if not hasattr(config, "fake_tensor_cache_enabled"):
        return contextlib.nullcontext()
    return config.patch(fake_tensor_cache_enabled=False)


# What the current trace's exports saw on this thread, by kind (several exports make one trace: identical layers,
# frontend/repeated.py; their findings add up): "writes" (_attribute_writes), "functions" (_autograd_functions),
# "draws" (_python_draws). trace_with_report starts a record and reads it.
_FINDINGS = threading.local()


def _add_findings(kind: str, names) -> None:
    found = getattr(_FINDINGS, "found", None)
    if found is None:
        found = _FINDINGS.found = {}
    found.setdefault(kind, []).extend(names)


def _findings(kind: str) -> tuple:
    """The names of ``kind`` the current trace recorded, each once, in order."""
    return tuple(dict.fromkeys(getattr(_FINDINGS, "found", {}).get(kind, ())))


_OWN_STATE = frozenset({"_parameters", "_buffers", "_modules", "training", "forward"})


class _attribute_writes:
    """While exporting, on this thread: which attributes of the module's submodules (other than parameters,
    buffers, submodules and torch's bookkeeping) the forward sets. The compiled module runs the traced graph,
    which has no Python side effects, so such writes do not happen at compiled calls (torch.compile replays
    them; this compiler says so instead: Traced.side_effects)."""

    def __init__(self, module):
        # torch's own modules (an fx GraphModule torch.compile hands over sets its generated code when it runs)
        # are not the user's code
        self.paths = {id(m): (p or type(module).__name__) for p, m in module.named_modules()
                      if not str(type(m).__module__).startswith("torch.")}
        self.modules = [m for m in module.modules() if id(m) in self.paths]
        self.root = module
        self.found: dict = {}

    def __enter__(self):
        self.saved = torch.nn.Module.__setattr__
        self.thread = threading.get_ident()
        paths, found, saved, thread = self.paths, self.found, self.saved, self.thread

        def __setattr__(m, name, value):
            if threading.get_ident() == thread and id(m) in paths and name not in _OWN_STATE \
                    and not name.startswith("_forward_") and name not in m._parameters \
                    and name not in m._buffers and name not in m._modules:
                found.setdefault(f"{paths[id(m)]}.{name}" if paths[id(m)] != type(m).__name__ else name, None)
            return saved(m, name, value)

        torch.nn.Module.__setattr__ = __setattr__
        self.containers = self._containers()
        # compared when the module's forward returns: torch.export puts the module's attributes back afterwards
        self.handle = self.root.register_forward_hook(self._compare_containers, always_call=True) \
            if self.containers else None
        return self

    def _containers(self) -> dict:
        """The lists, dicts, sets and deques the submodules hold, described (a forward that appends to one, or
        stores into one, changes it in place: no setattr)."""
        from .repeated import _Opaque, _attr_key

        out = {}
        for m in self.modules:
            for name, v in vars(m).items():
                if isinstance(v, (list, dict, set, collections.deque)) and not name.startswith("_"):
                    try:
                        out[(id(m), name)] = (m, _attr_key(v, by_content=False))
                    except _Opaque:
                        pass
        return out

    def _compare_containers(self, *_):
        from .repeated import _Opaque, _attr_key

        if threading.get_ident() != self.thread:
            return None
        for (i, name), (m, key) in self.containers.items():
            try:
                now = _attr_key(vars(m).get(name), by_content=False)
            except _Opaque:
                now = None
            if now != key:
                path = self.paths[i]
                self.found.setdefault(f"{path}.{name}" if path != type(m).__name__ else name, None)
        return None

    def __exit__(self, *exc):
        torch.nn.Module.__setattr__ = self.saved
        if self.handle is not None:
            self.handle.remove()
        _add_findings("writes", self.found)
        return False


class _autograd_functions:
    """While exporting, on this thread: which torch.autograd.Function subclasses of the user's the forward
    applies. torch.export records their forward's ops, not their backward (a gradient reversal, a
    straight-through estimator): the traced graph's gradients are autograd's of those ops, so a call that needs
    gradients must run the module itself (Traced.custom_backward). torch's own Functions compute the gradients
    of their forward and are not counted. Reentrant checkpointing (``checkpoint(f, x, use_reentrant=True)``,
    Hugging Face's gradient checkpointing) runs ``f`` under no_grad inside its Function, which the export records
    as a no-gradient region (every parameter read through it got no gradient, and the ones after it a wrong one):
    while exporting, it calls ``f`` directly, whose gradients are what the checkpoint computes."""

    def __init__(self):
        self.found: dict = {}

    def __enter__(self):
        base = torch.autograd.function.Function
        self.saved = base.__dict__["apply"]
        thread, found, apply = threading.get_ident(), self.found, self.saved.__func__

        from torch.utils.checkpoint import CheckpointFunction

        def recording(cls, *args, **kwargs):
            if threading.get_ident() == thread:
                if cls is CheckpointFunction:   # (function, preserve_rng_state, *args)
                    return args[0](*args[2:])
                if not str(cls.__module__).startswith(("torch.", "sessa_compiler.")):
                    found.setdefault(f"{cls.__module__}.{cls.__qualname__}", None)
            return apply(cls, *args, **kwargs)

        base.apply = classmethod(recording)
        # a hook on an intermediate tensor's gradient (``h.register_hook(lambda g: g * 3)``, a multi-grad hook): the
        # exported graph has no hooks, so its gradients would be the plain ones
        self.saved_hook = torch.Tensor.register_hook
        self.saved_multi = torch.autograd.graph.register_multi_grad_hook
        saved_hook, saved_multi = self.saved_hook, self.saved_multi

        def register_hook(tensor, hook):
            if threading.get_ident() == thread and _users_call():
                found.setdefault(f"a hook on a tensor's gradient ({_callable_name(hook)}, Tensor.register_hook)", None)
            return saved_hook(tensor, hook)

        def register_multi_grad_hook(tensors, fn, *args, **kwargs):
            if threading.get_ident() == thread and _users_call():
                found.setdefault(f"a hook on tensors' gradients ({_callable_name(fn)}, register_multi_grad_hook)",
                                 None)
            return saved_multi(tensors, fn, *args, **kwargs)

        torch.Tensor.register_hook = register_hook
        torch.autograd.graph.register_multi_grad_hook = register_multi_grad_hook
        return self

    def __exit__(self, *exc):
        torch.autograd.function.Function.apply = self.saved
        torch.Tensor.register_hook = self.saved_hook
        torch.autograd.graph.register_multi_grad_hook = self.saved_multi
        _add_findings("functions", self.found)
        return False


def _callable_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _users_call() -> bool:
    """Whether the function calling the patched one (two frames up) is not torch's own code."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return not (caller == "torch" or caller.startswith("torch."))


# the opcodes of a hook that can only load its arguments and constants, call a method of one, and return
_PLAIN_OPS = {"RESUME", "NOP", "CACHE", "LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_CONST", "LOAD_ATTR", "LOAD_METHOD",
              "PRECALL", "CALL", "CALL_METHOD", "CALL_FUNCTION", "KW_NAMES", "PUSH_NULL", "POP_TOP", "RETURN_VALUE",
              "RETURN_CONST", "COPY_FREE_VARS"}


def _sets_requires_grad_only(fn) -> bool:
    """Whether a hook's code can do nothing but call ``requires_grad_`` on its arguments (Hugging Face's
    ``enable_input_require_grads``: ``output.requires_grad_(True)``, which PEFT and gradient checkpointing of frozen
    layers set up): no global, closure cell or attribute read but ``requires_grad_``, no store, no subscript. Its
    one effect, that an activation requires grad, the compiled graph's gradients do not need: it is not a side
    effect that makes calls run the module."""
    import dis

    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None or code.co_freevars or code.co_cellvars or set(code.co_names) != {"requires_grad_"}:
        return False
    return all(ins.opname in _PLAIN_OPS for ins in dis.get_instructions(code))


class _hook_effects:
    """While exporting, on this thread: the module's forward hooks and pre-hooks (a submodule's, its own,
    torch's global module hooks) that return None, and its backward hooks. A hook that returns None changes
    nothing the graph computes: it is there for what it does besides (storing a submodule's output, counting
    calls), which a traced graph never does again; backward hooks are not part of the exported graph at all.
    Calls run the module itself (Traced.hook_effects; backward hooks only for calls that need gradients)."""

    KINDS = ("_forward_hooks", "_forward_pre_hooks")

    def __init__(self, module):
        self.module = module
        self.found: dict = {}
        self.saved: list = []

    @staticmethod
    def _ours(fn) -> bool:
        code = getattr(fn, "__func__", fn)
        return str(getattr(code, "__module__", "")).startswith(("sessa_compiler", "torch"))

    def __enter__(self):
        from torch.nn.modules import module as nn_module

        thread, found = threading.get_ident(), self.found
        places = [(f"'{path or type(self.module).__name__}'", m) for path, m in self.module.named_modules()]
        dicts = [(where, kind, getattr(m, kind, None)) for where, m in places for kind in self.KINDS]
        dicts += [(repeated.GLOBAL_HOOKS_WHERE, kind, getattr(nn_module, f"_global{kind}", None))
                  for kind in self.KINDS]
        for where, kind, d in dicts:
            for i, fn in list((d or {}).items()):
                if self._ours(fn):
                    continue
                name = repeated.hook_name(kind, fn, where)

                def watching(*args, _fn=fn, _name=name, **kwargs):
                    out = _fn(*args, **kwargs)
                    if out is None and threading.get_ident() == thread and not _sets_requires_grad_only(_fn):
                        found.setdefault(_name, None)
                    return out

                self.saved.append((d, i, fn))
                d[i] = watching
        backward = [(where, kind, getattr(m, kind, None)) for where, m in places
                    for kind in ("_backward_hooks", "_backward_pre_hooks")]
        backward += [(repeated.GLOBAL_HOOKS_WHERE, kind, getattr(nn_module, kind, None))
                     for kind in ("_global_backward_hooks", "_global_backward_pre_hooks")]
        for where, kind, d in backward:
            for fn in (d or {}).values():
                if not self._ours(fn):
                    found.setdefault(repeated.hook_name(kind, fn, where), None)
        return self

    def __exit__(self, *exc):
        for d, i, fn in reversed(self.saved):
            if i in d:
                d[i] = fn
        _add_findings("hooks", self.found)
        return False


def _take_along_dim(input, indices, dim=None):
    """torch.take_along_dim as its broadcast and a gather (the same values and gradients): torch's own kernel
    computes the broadcast shape with guards that fix every size (torch 2.13), so each batch and length traced
    again."""
    if dim is None:
        return input.reshape(-1).gather(0, indices.reshape(-1))
    dim = dim % input.dim()
    a, b = list(input.shape), list(indices.shape)
    shape = list(torch.broadcast_shapes(a[:dim] + [1] + a[dim + 1:], b[:dim] + [1] + b[dim + 1:]))
    return torch.gather(input.expand(shape[:dim] + [a[dim]] + shape[dim + 1:]), dim,
                        indices.expand(shape[:dim] + [b[dim]] + shape[dim + 1:]))


class _symbolic_take_along_dim:
    """While exporting, on this thread: ``torch.take_along_dim`` (and the method) as _take_along_dim."""

    def __enter__(self):
        self.saved = torch.take_along_dim, torch.Tensor.take_along_dim
        thread, function = threading.get_ident(), self.saved[0]

        def take_along_dim(input, indices, dim=None):
            if threading.get_ident() == thread and input.dim() == indices.dim():
                return _take_along_dim(input, indices, dim)
            return function(input, indices, dim)

        def tensor_take_along_dim(self, indices, dim=None):
            return take_along_dim(self, indices, dim)

        torch.take_along_dim, torch.Tensor.take_along_dim = take_along_dim, tensor_take_along_dim
        return self

    def __exit__(self, *exc):
        torch.take_along_dim, torch.Tensor.take_along_dim = self.saved
        return False


class _float_sizes:
    """While exporting, on this thread: the sizes a Python float of the forward was computed from (SDPA's
    ``scale=1 / T``, a rotary base stretched by the length). torch.export writes such a float into the graph as a
    constant and keeps no guard for it (torch 2.13, non-strict), so the graph holds only at the sizes traced:
    each becomes a guard (the size equals its traced value) and other sizes trace again."""

    def __init__(self):
        self.found: dict = {}

    def __enter__(self):
        from torch.fx.experimental.sym_node import SymNode

        self.saved = SymNode.__dict__["guard_float"]
        thread, found, guard_float = threading.get_ident(), self.found, self.saved

        def recording(node, *args, **kwargs):
            value = guard_float(node, *args, **kwargs)
            if threading.get_ident() == thread:
                hints = getattr(node.shape_env, "var_to_val", {})
                for sym in getattr(node.expr, "free_symbols", ()):
                    if sym in hints:
                        found.setdefault((sym, int(hints[sym])), None)
            return value

        SymNode.guard_float = recording
        return self

    def __exit__(self, *exc):
        from torch.fx.experimental.sym_node import SymNode

        SymNode.guard_float = self.saved
        _add_findings("float_sizes", self.found)
        return False


class _python_draws:
    """While exporting, on this thread: which functions of Python's ``random`` module (and numpy's global
    ``numpy.random``) the forward calls (Hugging Face's LayerDrop: ``random.uniform(0, 1) < self.layerdrop``).
    Their results are Python numbers the trace bakes in: the graph would repeat that one draw at every call
    (Traced.python_random), so such a module's calls run the module itself."""

    RANDOM = ("random", "uniform", "randint", "randrange", "choice", "choices", "shuffle", "sample", "gauss",
              "normalvariate", "betavariate", "expovariate", "triangular", "getrandbits", "lognormvariate",
              "vonmisesvariate", "gammavariate", "paretovariate", "weibullvariate")
    NUMPY = ("rand", "randn", "random", "random_sample", "uniform", "randint", "choice", "normal", "permutation",
             "shuffle", "binomial", "poisson", "beta", "exponential")

    def __init__(self):
        self.found: dict = {}
        self.saved: list = []

    def __enter__(self):
        import random
        import sys as _sys
        thread, found = threading.get_ident(), self.found
        targets = [(random, "random", self.RANDOM)]
        np_random = getattr(_sys.modules.get("numpy"), "random", None)
        if np_random is not None:
            targets.append((np_random, "numpy.random", self.NUMPY))
        for mod, prefix, names in targets:
            for name in names:
                fn = getattr(mod, name, None)
                if not callable(fn):
                    continue

                def recording(*args, _fn=fn, _name=f"{prefix}.{name}", **kwargs):
                    if threading.get_ident() == thread:
                        found.setdefault(_name, None)
                    return _fn(*args, **kwargs)

                self.saved.append((mod, name, fn))
                setattr(mod, name, recording)
        return self

    def __exit__(self, *exc):
        for mod, name, fn in reversed(self.saved):
            setattr(mod, name, fn)
        _add_findings("draws", self.found)
        return False


class _as_parameters:
    """While exporting: a parameter slot holding a plain tensor (inside torch.func.functional_call, which swaps
    the tensors it is given into the module) holds a Parameter over the same data, as torch.export requires;
    the graph only takes its shape and dtype, and calls read the live tensor."""

    def __init__(self, module):
        self.module = module
        self.swapped = []

    def __enter__(self):
        for m in self.module.modules():
            for name, t in list(m._parameters.items()):
                if t is not None and not isinstance(t, torch.nn.Parameter):
                    m._parameters[name] = torch.nn.Parameter(t.detach(), requires_grad=t.requires_grad)
                    self.swapped.append((m, name, t))
        return self

    def __exit__(self, *exc):
        for m, name, t in reversed(self.swapped):
            m._parameters[name] = t
        return False


class _hooked:
    """While exporting: output dataclasses of the module become pytree nodes (see _register_output_types)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.handle = self.module.register_forward_hook(_output_hook)

    def __exit__(self, *exc):
        self.handle.remove()
        return False


class _quiet_torch_logs:
    """torch.export logs warnings and prints graph dumps to stderr on the way to an error that we report
    ourselves in one message: hold them back, and pass them on only when the export succeeds."""

    NAMES = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")

    def __enter__(self):
        import io
        import logging

        self.saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in self.NAMES]
        for logger, _ in self.saved:
            logger.setLevel(logging.CRITICAL)
        self.buffer = io.StringIO()
        self.redirect = contextlib.redirect_stderr(self.buffer)
        self.redirect.__enter__()

    def __exit__(self, exc_type, *exc):
        import sys

        self.redirect.__exit__(exc_type, *exc)
        for logger, level in self.saved:
            logger.setLevel(level)
        if exc_type is None and self.buffer.getvalue():
            sys.stderr.write(self.buffer.getvalue())
        return False


def _data_dependent_branch(e: Exception) -> str | None:
    """A short, actionable sentence when torch.export failed on Python control flow that depends on tensor
    values (``if x.sum() > 0``), naming the user's line; None for other failures."""
    import re

    text = f"{type(e).__name__}: {e}"
    if "data-dependent" not in text and "GuardOnDataDependentSymNode" not in text:
        return None
    where = re.search(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    at = f" at {where.group(1)}:{where.group(2)} in {where.group(3)} (`{where.group(4).strip()}`)" if where else ""
    return (f"its code branches on the value of a tensor{at}. The compiler traces one path through the module with "
            "symbolic sizes and cannot decide a branch on data. Write the choice with tensor ops (torch.where, "
            "masking) or torch.cond, or move the branch out of the module you compile.")


def grad_questions(module) -> tuple:
    """(asks torch's grad or inference mode, reads some tensor's requires_grad): whether the code of the module's
    classes, or a function it reaches (frontend/repeated.py _global_reads), may take another path under
    torch.no_grad() or for an input that requires grad. Read from the code, not by watching the trace: replacing
    torch.is_grad_enabled while exporting would leave torch.compile, which keys its handling of the function by
    identity, with the replacement if it was first imported then."""
    names: set = set()
    repeated._global_reads(module, names=names)
    return bool(names & {"is_grad_enabled", "is_inference_mode_enabled"}), "requires_grad" in names


def grad_state(questions: tuple, inputs) -> tuple | None:
    """What a forward asking ``questions`` (grad_questions) may branch on: (grad enabled, inference mode) where it
    asks the mode or reads requires_grad (an activation's requires_grad follows the grad mode: ``if h.requires_grad:
    h.register_hook(...)`` under torch.no_grad() traces no hook), then the inputs' requires_grad where it reads
    requires_grad; None where it asks neither."""
    mode, flags = questions
    if not (mode or flags):
        return None
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) + \
        ((tuple(bool(x.requires_grad) for x in inputs),) if flags else (None,))


@dataclass(frozen=True)
class Guard:
    """A condition on the batch/sequence sizes under which the traced graph equals the module.

    torch.export follows one path through the module's Python code; a branch on a size (``if T > 4``,
    ``if T == 6``) makes the graph hold only where that branch is taken. export reports these as
    ranges of the size symbols and as runtime assertions; each becomes a Guard over our symbols.
    """

    expr: sympy.Basic   # a relational/boolean over our dim symbols (B, T, ...)
    origin: str         # "range" or "assertion"

    def holds(self, binding: dict) -> bool:
        """False only when the bound sizes definitely violate it (unbound symbols: not judged)."""
        values = {x: binding[x.name] for x in self.expr.free_symbols if x.name in binding}
        if len(values) != len(self.expr.free_symbols):
            return True
        try:
            return bool(self.expr.xreplace({k: sympy.Integer(v) for k, v in values.items()}))
        except (ZeroDivisionError, TypeError):
            # undefined at these sizes (``Mod(B, B*(T - 1))`` at T = 1, from a shifted loss's view(-1)): the trace
            # says nothing there, so it is not taken to hold (a trace of its own)
            return False

    def __str__(self) -> str:
        return _pretty(self.expr)


def _pretty(e) -> str:
    if isinstance(e, sympy.Ne):
        return f"{_pretty(e.lhs)} != {_pretty(e.rhs)}"
    if isinstance(e, sympy.Eq):
        return f"{_pretty(e.lhs)} == {_pretty(e.rhs)}"
    return str(e)


_NO_LIMIT = 2 ** 62   # an upper bound at or past this is torch's int64 ceiling, not a limit of the module's


def _range_guards(ep, sym_map: dict) -> list:
    """Ranges export inferred for our dim symbols, as guards. export's floor of 2 on every dynamic size
    is its 0/1-specialisation assumption (we trace on inputs grown to >= 2, see _grow), not the module's
    code: it is read as 1."""
    out = []
    for s, vr in ep.range_constraints.items():
        ours = sym_map.get(s)
        if not isinstance(ours, sympy.Symbol):
            continue
        lo = int(vr.lower) if isinstance(vr.lower, sympy.Integer) else None   # +-int_oo are not Integers
        hi = int(vr.upper) if isinstance(vr.upper, sympy.Integer) else None
        if lo is not None and lo > 2:
            out.append(Guard(sympy.Ge(ours, lo), "range"))
        if hi is not None and hi < _NO_LIMIT:   # torch's int64 ceiling on an unbacked size (x[mask]) is no limit
            out.append(Guard(sympy.Le(ours, hi), "range"))
    return out


def other_integer_dtypes(graph, args, floats: bool = False) -> str | None:
    """Which inputs differ from the graph's types only in an integer or bool dtype (int32 token ids where int64
    were traced, a bool mask where a long one was): the module takes them, so they get their own trace. With
    ``floats``, which differ only in a float dtype: a module that casts its input (``x.to(self.w.dtype)``) takes a
    float64 input after a float32 call (the new trace must show the cast: casts_float_inputs)."""
    if len(args) != len(graph.inputs):
        return None
    names = []
    for x, v in zip(args, graph.inputs):
        want = to_torch(v.type.dtype)
        if not isinstance(x, torch.Tensor) or x.dim() != v.type.rank:
            return None
        if x.dtype != want:
            if (x.dtype.is_floating_point and want.is_floating_point) != floats:
                return None
            names.append(f"%{v.name} ({x.dtype}, traced {want})")
    return ", ".join(names) or None


def casts_float_inputs(graph, before) -> bool:
    """Whether every float input of ``graph`` whose dtype differs from ``before``'s (an earlier trace) is read only
    through casts: the module casts it (to its weights' dtype), so the graph holds for it. A module that computes
    with it directly (a float64 input into float32 weights: the module raises, or promotes) does not fit."""
    users = graph.users()
    for v, w in zip(graph.inputs, before.inputs):
        if v.type.dtype != w.type.dtype and v.type.dtype.is_float:
            if any(n.op != "cast" for n in users.get(v, [])):
                return False
    return True


def warn_folded_trainables(module, names, stacklevel: int = 3) -> None:
    """Say which trainable parameters a recognised op was built from (from a fresh trace, and again on every
    compile-cache hit of that trace: compile_cache.folded_trainables)."""
    for name in names:
        warnings.warn(f"compiling {type(module).__name__}: the trainable parameter '{name}' was folded into a "
                      "recognised op from its current values, so it gets no gradient through the compiled "
                      "module (and any change to it traces the module again); freeze it with "
                      "requires_grad_(False), or compile with recognisers off for this module", stacklevel=stacklevel)


def warn_side_effects(module, names, stacklevel: int = 3) -> None:
    """Say which attributes the module's forward sets, which compiled calls (the traced graph) do not set."""
    if names:
        shown = ", ".join(f"'{n}'" for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        warnings.warn(f"compiling {type(module).__name__}: its forward sets (or changes in place) {shown} when it "
                      "runs; compiled calls run "
                      "the traced tensor graph and do not repeat Python side effects, so they leave these attributes "
                      "as they are (compute such values outside forward, or return them)", stacklevel=stacklevel)


def warn_guards(traced, what: str, module) -> None:
    """Exports serve every size from one traced graph: say where that graph stops equalling the module."""
    guards = [g for g in traced.guards if g.origin != "size-error"]
    if guards:
        warnings.warn(f"{what}: {type(module).__name__}'s code branches on its input sizes, so the exported program "
                      f"equals the module only where {', '.join(map(str, guards))}; export again from "
                      "inputs on the other side for those sizes", stacklevel=3)


@dataclass
class Traced:
    graph: Graph
    report: Report
    out_spec: object  # pytree spec of the module's outputs
    guards: tuple = ()  # Guard: where the graph equals the module (beyond the inputs' static dims)
    call_spec: object = None  # pytree spec of call_leaves(args, kwargs) at trace time
    constants: tuple = ()     # (leaf position, value) of the non-tensor leaves, baked into the graph
    leaf_names: tuple = ()    # a name per call leaf: args[0], args[1], ..., then the keyword names
    none_outputs: tuple = ()  # positions among out_spec's leaves of the module's None outputs (no graph output)
    # (name, digest) of each parameter or buffer the lowered graph read and the recognisers replaced by what
    # they built from its values (a causal mask buffer, stored RoPE tables): the graph holds only while these
    # tensors keep those values (checked at every call and on a compile-cache lookup)
    assumed: tuple = ()
    # attributes the module's forward sets when it runs ("layers.0.calls"): compiled calls do not set them
    side_effects: tuple = ()
    # per graph output: (the export node it was, the input/parameter it is a view of in the module, or None for
    # a new tensor); None for a trace from before the field: see copied_outputs
    output_sources: tuple | None = None
    # the user's torch.autograd.Function classes the forward applies: the graph holds their forward's ops, not
    # their backward, so calls that need gradients run the module itself
    custom_backward: tuple = ()
    # Python random functions the forward called (LayerDrop): the graph holds one draw, so calls run the module
    python_random: tuple = ()
    constant_outputs: tuple = ()   # (position among out_spec's leaves, value): Python constants the module returns
    # (device type, dtype name) of the torch.autocast the call ran under, whose casts the graph holds as ops (the
    # module's explicit .float() and autocast(enabled=False) regions too): its calls run with autocast off; None:
    # traced without autocast (a call under autocast traces its own graph)
    autocast: tuple | None = None
    # forward hooks that return None (kept for what they do besides: storing a submodule's output) and backward
    # hooks, by name: the graph does neither, so calls run the module itself (backward hooks: calls with gradients)
    hook_effects: tuple = ()
    # grad_state() when traced, where the forward asks torch's grad mode or reads requires_grad (it may branch on
    # them): (grad enabled, inference mode, the inputs' requires_grad), None where not asked; None: asks neither
    grad_mode: tuple | None = None
    # trainable parameters the module reads but its output does not depend on at the traced sizes (T5's relative
    # position bias at T = 1, where each softmax has one key): the recognised graph dropped them, and the module's
    # autograd gives them a zero gradient, not None (an optimiser's weight decay then still applies)
    zero_grads: tuple = ()
    # positions of outputs the module returns as x.contiguous(): a copy where x is not contiguous, x itself where it
    # is, which only the call's strides say; the IR drops the op, so the compiled call applies it to those outputs
    contiguous_outputs: tuple = ()
    # the keywords the call passed to the forward's **kwargs, in the call's order (extra_keywords): the graph holds
    # for calls that pass them in this order
    keyword_order: tuple = ()

    def copied_outputs(self) -> tuple:
        """Positions of graph outputs that must be copied after a run: the module returns a new tensor there
        (x.clone(), x + 0, h twice as h and h.clone()), but the graph's value is an input or parameter, a view of
        one, or the value of an earlier output from another node of the module (the simplifier removes copies
        and identities). Without the copy, editing that output in place would edit the user's input, a weight,
        or another output."""
        sources = self.output_sources
        if sources is None or len(sources) != len(self.graph.outputs):
            return ()
        out, first = [], {}
        for i, (v, (node, root)) in enumerate(zip(self.graph.outputs, sources)):
            base = view_root(v)
            earlier = first.get(base)
            if root is None and (base.kind in ("input", "param") or (earlier is not None and earlier != node)):
                out.append(i)
                continue
            first.setdefault(base, node)
        return tuple(out)

    def __setstate__(self, state):
        """Unpickled (the compile cache): the output dataclasses its spec names become pytree nodes here too."""
        self.__dict__.update(state)
        register_spec_types(self.out_spec)

    def unflatten(self, outs) -> object:
        """The module's output structure from the graph's outputs (None where the module returned None)."""
        outs = list(outs)
        for i, value in sorted([(i, None) for i in self.none_outputs] + list(self.constant_outputs)):
            outs.insert(i, value)
        return pytree.tree_unflatten(outs, self.out_spec)

    def violated(self, binding: dict) -> list:
        """The guards these bound sizes violate (the module would take another path there)."""
        return [g for g in self.guards if not g.holds(binding)]

    def call_mismatch(self, args: tuple, kwargs: dict) -> str | None:
        """Why a call's keyword structure or constants differ from the traced call's, or None."""
        order = getattr(self, "keyword_order", ())
        if order and tuple(k for k in kwargs if k in order) != order:
            return (f"the keywords the forward takes as **kwargs come in another order ({', '.join(k for k in kwargs if k in order)}) "
                    f"than traced ({', '.join(order)}), and the forward may read them in order")
        leaves, spec = call_leaves(args, kwargs)
        if self.call_spec is not None and spec != self.call_spec:
            pos = sum(1 for n in self.leaf_names if n.startswith("args["))
            keys = [n for n in self.leaf_names[pos:]]
            return (f"the module was traced for a call with {pos} positional tensor(s) and keyword arguments "
                    f"{keys}, this call has {len(args)} and {sorted(kwargs)}")
        if {i for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)} != {i for i, _ in self.constants}:
            return "a keyword argument traced as a tensor is a constant in this call, or the other way round"
        for i, value in self.constants:
            if not (type(leaves[i]) is type(value) and leaves[i] == value):
                return f"a keyword argument was traced as the constant {value!r}, called with {leaves[i]!r}"
        return None

    def tensor_inputs(self, args: tuple, kwargs: dict) -> list:
        """The graph's inputs for a call (its tensor leaves, in the traced order)."""
        return tensor_leaves(args, kwargs)


def _dim_names(tensors) -> dict:
    """(index among the graph's tensor inputs, dim) -> symbol name: dim 0 is B, dim 1 is T."""
    names = {}
    for i, a in enumerate(tensors):
        if a.dim() >= 1:
            names[(i, 0)] = "B"
        if a.dim() >= 2:
            names[(i, 1)] = "T"
    return names


def _pinned_dims(ep, args: tuple, kwargs: dict | None = None) -> dict:
    """(input index, dim) -> size, for the batch/sequence dims export kept as a symbol of one-point range:
    code that needs the size as a Python int (a loop over range(T)) pins it, and the graph's shapes then
    hold that number where the input holds the symbol."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        return {}   # (tensor positional arguments only)
    leaves = tensor_leaves(args, kwargs)
    sig = ep.graph_signature
    kinds = {s.arg.name: s.kind for s in sig.input_specs if hasattr(s.arg, "name")}
    user = [n for n in ep.graph.nodes if n.op == "placeholder"
            and kinds.get(n.name) == torch.export.graph_signature.InputKind.USER_INPUT
            and isinstance(n.meta.get("val"), torch.Tensor)]   # the lowering's order: tensor_leaves'
    if len(user) != len(leaves):
        return {}
    out = {}
    for i, node in enumerate(user):
        fake = node.meta.get("val")
        for d, s in enumerate(getattr(fake, "shape", ())[:2]):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                vr = ep.range_constraints.get(s.node.expr)
                if vr is not None and vr.lower == vr.upper and isinstance(vr.lower, sympy.Integer):
                    out[(i, d)] = int(vr.lower)
    return out


def _trace_layer(layer, args, kwargs, dynamic_shapes=None):
    """One layer of a group of identical layers, traced on its own (frontend/repeated.py): its lowered graph, the
    guards its trace carries, its lowering notes and its output spec. ``dynamic_shapes``: named dims where the
    call has symbolic dims past the second (repeated._call_dims); by default dims 0 and 1 of every tensor."""
    ep, lowerer, graph = _lower(layer, args, kwargs, dynamic_shapes)
    guards = [_simplified(g.expr) for g in _range_guards(ep, lowerer.sym_map)]
    guards += [_simplified(e) for e in lowerer.assertions]
    return graph, [g for g in guards if g is not sympy.true], list(lowerer.notes), ep.call_spec.out_spec


_MAX_SHARED_TRACES = 16   # distinct layer calls traced apart in one model before the rest are traced inline


def _lower_shared(module, args, kwargs):
    """_lower with identical layers traced once (frontend/repeated.py), or None where the model has none, or
    where sharing does not apply (the model is then traced in full)."""
    found = repeated.groups(module)
    if not found:
        return None
    plan = repeated.Plan(module, found, _trace_layer)
    try:
        for _ in range(_MAX_SHARED_TRACES + 1):
            try:
                with plan:
                    ep = export_program(module, args, kwargs)
                break
            except TraceError as e:
                need = _cause(e, repeated.NeedTrace)
                if need is None:
                    return None   # the full trace reports the error
                plan.trace(need)
        else:
            return None
        if _pinned_dims(ep, args, kwargs):
            return None
        lowerer = Lowerer(ep, _dim_names(tensor_leaves(args, kwargs)), name=type(module).__name__)
        graph = lowerer.run()
        for g in plan.groups:
            if g.used:
                traced = sum(t is not None for t in g.traces.values())
                lowerer.shared.append(f"{len(g.members)} x {type(g.members[0][1]).__name__} "
                                      f"({g.members[0][0]} ... {g.members[-1][0]}), {traced} layer trace(s), "
                                      f"{g.used} call(s) from them")
        return ep, lowerer, graph
    except Exception:  # noqa: BLE001 - a layer's graph that does not fit here: the model is traced in full
        return None
    finally:
        plan.close()


def _cause(e: BaseException, kind):
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _lower(module, args, kwargs=None, dynamic_shapes=None, again: bool = False):
    if dynamic_shapes is None and os.environ.get("SESSA_COMPILER_SHARE_LAYERS", "1") != "0":
        shared = _lower_shared(module, args, kwargs)
        if shared is not None:
            return shared
    ep = export_program(module, args, kwargs, dynamic_shapes)
    # (again: the re-export below at the call's own sizes, in which export may pin a size it was not given pinned:
    # a length the shifted labels of a loss share with the pinned ids)
    pinned = _pinned_dims(ep, args, kwargs) if dynamic_shapes is None or again else {}
    # a pinned size that is not the example's own (the example was grown to >= 2, see _grow) would serve the
    # example's size with the grown one's graph
    leaves = tensor_leaves(args, kwargs)
    elsewhere = any(leaves[i].shape[d] != n for (i, d), n in pinned.items())
    names = _dim_names(leaves)
    lowerer = Lowerer(ep, names, name=type(module).__name__)
    graph = None
    try:
        graph = None if elsewhere else lowerer.run()
    except IRError:   # the graph's shapes say the pinned number where the input says the symbol
        if not pinned:
            # a size the graph's shapes hold as one number only under a runtime assertion of the trace (Mamba2's
            # chunk count, 1 where padded T <= chunk size), which the IR's shapes cannot carry: the trace at the
            # call's own sequence sizes below (another length traces again)
            if again or dynamic_shapes is not None:
                raise
        else:
            # the pinned dims lowered as their numbers (the input then holds them too, so another size traces
            # again): the graph a trace with those dims static gives, without exporting the module a second time
            lowerer = Lowerer(ep, {**names, **pinned}, name=type(module).__name__)
            try:
                graph = lowerer.run()
            except IRError:
                graph = None
    if graph is not None:
        return ep, lowerer, graph
    if again:
        return ep, lowerer, Lowerer(ep, names, name=type(module).__name__).run()   # (its IRError, as it is)
    # trace again at the example's own sizes, the pinned dims static (another size traces again)
    return _lower(module, args, kwargs, _static_dims(module, args, kwargs, pinned), again=True)


def _static_dims(module, args: tuple, kwargs: dict | None, pinned: dict):
    """torch.export's dynamic_shapes for a trace at the call's own sizes: the batch dim of every tensor input
    dynamic unless pinned, the sequence dims static (a length the code pins is shared by the other sequence inputs,
    the labels of a shifted loss: export keeps theirs a symbol of their own, which the pinned graph's shapes
    contradict); a tuple for positional calls, by parameter name where keywords are given."""
    batch_pinned = {i for (i, d) in pinned if d == 0}
    index = {id(t): i for i, t in enumerate(tensor_leaves(args, kwargs))}

    def dims(t):
        return {0: Dim.AUTO} if t.dim() >= 1 and index.get(id(t)) not in batch_pinned else {}

    return _dims_by_parameter(module, args, kwargs, dims)


def _dims_by_parameter(module, args: tuple, kwargs: dict | None, dims):
    """torch.export's dynamic_shapes from ``dims(tensor) -> {dim: Dim}``: a tuple for a positional call, by
    parameter name where keywords are given or the forward takes ``*args`` (torch.export nests those under it)."""
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL
                   for p in inspect.signature(module.forward).parameters.values())
    if not kwargs and not variadic:
        return tuple(dims(a) for a in args)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise TraceError(f"{type(module).__name__}.forward does not take these arguments: {e}") from e
    return {name: pytree.tree_map(lambda v: dims(v) if isinstance(v, torch.Tensor) else None, value)
            for name, value in bound.items()}


# An exclusion `X != c` with c above this is kept unchecked (the check runs the module at X = c)
_MAX_CHECKED_SIZE = 4096


def _needless(module, args, guard: Guard, graph: Graph) -> bool:
    """An exclusion `X != c` is needless when the traced graph equals the module at X = c anyway: e.g.
    slicing a buffer of c rows with [:T] makes export assert T != c, yet T = c computes the same thing.
    Checked like the recognisers' probes: module and graph on fresh random inputs at X = c, within the
    spec's tolerance of the dtype (a different path shows as an O(1) difference)."""
    from ..semantics import run_graph
    from ..tolerance import TOLERANCE, relative_error

    e = guard.expr
    if not (isinstance(e, sympy.Ne) and isinstance(e.lhs, sympy.Symbol) and isinstance(e.rhs, sympy.Integer)):
        return False
    name, size = e.lhs.name, int(e.rhs)
    if not 1 <= size <= _MAX_CHECKED_SIZE:
        return False
    gen = torch.Generator().manual_seed(size)
    if len(graph.inputs) == len(args):   # the dims the graph gives that symbol (a state input's dim 1 may not be T)
        dim_names = {(i, d): str(s) for i, v in enumerate(graph.inputs) for d, s in enumerate(v.type.shape)
                     if isinstance(s, sympy.Symbol)}
    else:
        dim_names = _dim_names(args)
    inputs = []
    for i, x in enumerate(args):
        shape = [size if dim_names.get((i, d)) == name else n for d, n in enumerate(x.shape)]
        if x.is_floating_point():
            inputs.append(torch.randn(shape, generator=gen, dtype=x.dtype).to(x.device))
        else:  # token ids and the like: reuse the example's values
            reps = [-(-n // m) for n, m in zip(shape, x.shape)]
            inputs.append(x.repeat(*reps)[tuple(slice(0, n) for n in shape)].contiguous())
    try:
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(module(*inputs))
            got = run_graph(graph, inputs, graph.params)
    except Exception:  # the module or graph refuses that size: the exclusion stands
        return False
    return len(want) == len(got) and all(
        relative_error(g, w) <= TOLERANCE.get(w.dtype, 0.0) for g, w in zip(got, want))


def _export_guards(ep, lowerer) -> list:
    """The guards an export's ranges, runtime assertions and float sizes give (the always-true ones dropped)."""
    guards = _range_guards(ep, lowerer.sym_map) + [Guard(_simplified(e), "assertion") for e in lowerer.assertions]
    guards += [Guard(sympy.Eq(lowerer.sym_map[s], v), "float") for s, v in _findings("float_sizes")
               if isinstance(lowerer.sym_map.get(s), sympy.Symbol)]
    return [g for g in guards if g.expr is not sympy.true]


def _symbol_dims(graph: Graph) -> dict:
    """symbol -> the (graph input, dim) positions whose size it is."""
    out: dict = {}
    for i, v in enumerate(graph.inputs):
        for d, s in enumerate(v.type.shape):
            if isinstance(s, sympy.Symbol):
                out.setdefault(s, []).append((i, d))
    return out


def _size_floors(module, args: tuple, kwargs: dict, graph: Graph, guards=()) -> tuple:
    """({symbol: the smallest size (0, 1 or 2) from which on the traced graph equals the module}, {the symbols
    below whose floor the module or the graph raises, rather than giving other values}). torch.export
    assumes every dynamic size is at least 2 (it specialises 0 and 1), and we trace on inputs grown to 2 there
    (_grow): a branch on ``T > 1`` or ``B == 1``, or ``max(T, 1)``, is decided without a guard. So the module and
    the graph are run at each symbol = 1 and = 0 (the call's own data cut to that size along the symbol's dims;
    the same random seed for both): where they differ, calls below that size are traced on their own. A size
    the trace's own ``guards`` already exclude (``T >= 5``) is not checked."""
    leaves = tensor_leaves(args, kwargs)
    if len(leaves) != len(graph.inputs):
        return {}, set()
    floors, raising = {}, set()
    where = _symbol_dims(graph)
    for sym, dims in where.items():
        floors[sym] = 0
        # the other symbols' dims cut to at most _FLOOR_CHECK_OTHERS where the guards allow it (a long example:
        # the check runs the module twice per symbol)
        others = []
        for other, odims in where.items():
            n = min(leaves[i].shape[d] for i, d in odims)
            if other is not sym and n > _FLOOR_CHECK_OTHERS and all(
                    g.holds({other.name: _FLOOR_CHECK_OTHERS}) for g in guards):
                others.append((odims, _FLOOR_CHECK_OTHERS))
        for size in (1, 0):
            if any(g.expr.free_symbols and {x.name for x in g.expr.free_symbols} == {sym.name}
                   and not g.holds({sym.name: size}) for g in guards):
                break   # excluded already
            agrees = _agrees_at(module, args, kwargs, graph, others + [(dims, size)])
            if agrees is not True:
                floors[sym] = size + 1
                if agrees == "raises":
                    raising.add(sym)
                break
    return floors, raising


_FLOOR_CHECK_OTHERS = 16


def _cut(leaves: list, cuts) -> list:
    """The leaves with each of the dims of each (dims, size) of ``cuts`` cut to that size (zeros where the leaf is
    shorter there)."""
    out = list(leaves)
    for dims, size in cuts:
        for i, d in dims:
            x = out[i]
            out[i] = x.narrow(d, 0, size) if x.shape[d] >= size else \
                x.new_zeros(x.shape[:d] + (size,) + x.shape[d + 1:])
    return out


def _agrees_at(module, args: tuple, kwargs: dict, graph: Graph, cuts):
    """Whether module and graph give the same outputs on the call's data cut (_cut): True, False, or "raises"
    where one of them raises and the other does not (both raising agree)."""
    from ..semantics import run_graph
    from ..tolerance import TOLERANCE, relative_error

    leaves = _cut(tensor_leaves(args, kwargs), cuts)
    a, kw = _call_with(args, kwargs, leaves)
    want = got = None
    # (an fx GraphModule torch.compile hands over prints the traceback of an error in its code to stderr before
    # raising it: at a size the module refuses, that is expected here, not the user's to see)
    quiet = contextlib.redirect_stderr(io.StringIO()) if any(
        isinstance(m, torch.fx.GraphModule) for m in module.modules()) else contextlib.nullcontext()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), quiet:
        try:
            torch.manual_seed(1234)
            want = [x for x in pytree.tree_leaves(module(*a, **kw)) if isinstance(x, torch.Tensor)]
        except Exception:  # noqa: BLE001 - the module refuses that size: the graph must not answer there
            pass
        try:
            torch.manual_seed(1234)
            got = run_graph(graph, leaves, graph.params)
        except Exception:  # noqa: BLE001
            pass
    if want is None or got is None:
        return True if want is None and got is None else "raises"
    return len(want) == len(got) and all(
        tuple(g.shape) == tuple(w.shape) and relative_error(g, w) <= TOLERANCE.get(w.dtype, 0.0)
        for g, w in zip(got, want))


def _call_with(args: tuple, kwargs: dict, leaves: list) -> tuple:
    """(args, kwargs) of the call with its tensors replaced by ``leaves`` (in tensor_leaves' order)."""
    keyed = iter(leaves[len(args):])
    tensors = {k: next(keyed) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)}
    return tuple(leaves[:len(args)]), {k: tensors.get(k, v) for k, v in kwargs.items()}


def _below(args: tuple, kwargs: dict, where: dict, floors: dict) -> set:
    """The symbols (``where``: _symbol_dims) the call is below the floor of (_size_floors)."""
    leaves = tensor_leaves(args, kwargs)
    return {sym for sym, dims in where.items() if any(leaves[i].shape[d] < floors.get(sym, 0) for i, d in dims)}


def _at_own_sizes(module, args: tuple, kwargs: dict, where: dict, below: set) -> tuple:
    """(args, kwargs, dynamic_shapes, {(input, dim): size}) for a trace where the dims of the symbols ``below``
    (_below) are static at the call's sizes (the last item), and the other symbolic dims dynamic, their examples
    grown to 2 (_grow)."""
    leaves = tensor_leaves(args, kwargs)
    static = {(i, d): int(leaves[i].shape[d]) for sym in below for i, d in where[sym]}
    dyn: dict = {}
    grown = [x.contiguous() for x in leaves]
    for sym, dims in where.items():
        if sym not in below:
            for i, d in dims:
                grown[i] = _grown(grown[i], d)
                dyn.setdefault(i, {})[d] = Dim.AUTO
    a, kw = _call_with(args, kwargs, grown)
    index = {id(x): i for i, x in enumerate(grown)}
    return a, kw, _dims_by_parameter(module, a, kw, lambda t: dyn.get(index.get(id(t)), {})), static


def _layout_sizes(graph: Graph) -> tuple | None:
    """The (batch, sequence) sizes the recognisers match layouts against: None (the symbols B and T) unless the
    first input of rank >= 2 has a static batch or sequence dim; that integer then (see recognise)."""
    for v in graph.inputs:
        if v.type.rank >= 2:
            b, t = v.type.shape[:2]
            if not isinstance(b, int) and not isinstance(t, int):
                return None
            return (b if isinstance(b, int) else BATCH, t if isinstance(t, int) else SEQUENCE)
    return None


def _simplified(e):
    """sympy.simplify, or the expression as it is where sympy cannot (torch's FloorDiv / Mod have no numeric
    evaluation, which simplify's equality test may try). An equality of sizes with Mod/floor (padding to a
    chunk multiple) is proved by residues (ir.types.is_zero) or kept as it is: sympy.simplify spent ~0.25 s on
    each of them and rarely shortened one."""
    from ..ir.types import is_zero

    try:
        if any(isinstance(f, (sympy.Mod, sympy.floor, sympy.ceiling)) or not type(f).__module__.startswith("sympy")
               for f in sympy.preorder_traversal(e)):
            if isinstance(e, (sympy.Eq, sympy.Ne)) and is_zero(e.lhs - e.rhs):
                return sympy.true if isinstance(e, sympy.Eq) else sympy.false
            return e
        return sympy.simplify(e)
    except Exception:  # noqa: BLE001 - a guard left unsimplified is still exact
        return e


def _idle_parameters(lowered: Graph | None, inputs: list, names: list) -> tuple:
    """Of the trainable parameters ``names`` that the recognised graph no longer reads, those the output does not
    depend on at these inputs: the graph as lowered (before the recognisers), run with them moved far from their
    values, gives exactly the same outputs (same seed). They were dropped, not folded (a softmax over one key
    ignores the bias added to it): nothing to check at each call, and a zero gradient. A parameter the output does
    depend on stays folded (warn_folded_trainables). The lowered graph is a pure function of its inputs and
    parameters: the module's tensors and state are not touched."""
    from ..semantics import run_graph

    names = [n for n in names if lowered is not None and isinstance(lowered.params.get(n), torch.Tensor)]
    if not names or len(inputs) != len(lowered.inputs):
        return ()
    gen = torch.Generator().manual_seed(1)

    def outputs(params):
        torch.manual_seed(0)
        return run_graph(lowered, inputs, params)

    def unmoved(group) -> bool:
        moved = dict(lowered.params)
        for n in group:
            p = moved[n].detach()
            moved[n] = p + torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * (p.abs().max() + 1)
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(outputs(moved), before))

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            before = outputs(lowered.params)
            idle = names if unmoved(names) else [n for n in names if len(names) > 1 and unmoved([n])]
    except Exception:   # noqa: BLE001 - a graph that does not run here: its parameters stay folded, as before
        return ()
    return tuple(idle)


def _param_readers(graph) -> dict:
    """node -> the names of the parameters and buffers it reads."""
    return {n: frozenset(v.name for v in n.value_inputs if v.kind == "param") for n in graph.nodes}


def trace_with_report(module: torch.nn.Module, example_inputs, example_kwargs: dict | None = None, *,
                      recognisers: bool = True, dynamic_shapes: tuple | dict | None = None) -> Traced:
    """Trace `module(*example_inputs, **example_kwargs)`. Tensor arguments become graph inputs (dims 0 and
    1 symbolic: B and T); keyword arguments may also be None/bool/int/float/str, baked in as constants.
    `dynamic_shapes` (torch.export's, positional arguments only) makes other dims dynamic instead; a static
    batch or sequence dim is then recognised at its size."""
    register_custom_lowerings()
    args = _as_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    _FINDINGS.found = {}
    with EXPORT_LOCK:   # one export at a time in the process (EXPORT_LOCK, above)
        ep, lowerer, graph = _lower(module, args, kwargs, dynamic_shapes)
    side_effects, custom_backward, python_random, hooks = (_findings(k) for k in ("writes", "functions", "draws",
                                                                                   "hooks"))
    warn_side_effects(module, side_effects, stacklevel=4)
    guards = _export_guards(ep, lowerer)
    # checked on the graph as lowered, before recognisers rewrite it
    guards = [g for g in guards if g.origin != "assertion" or kwargs or not _needless(module, args, g, graph)]
    floors, raising = _size_floors(module, args, kwargs, graph, guards)
    below = _below(args, kwargs, _symbol_dims(graph), floors)
    if below:
        # the call itself is at a size the grown trace does not hold at: traced again with those dims at the
        # call's own sizes (static), the others grown and symbolic as before (their floors are checked again on
        # that graph: the checks above ran at the call's sizes of the others, where the grown graph is wrong)
        a, kw, dyn, static = _at_own_sizes(module, args, kwargs, _symbol_dims(graph), below)
        with EXPORT_LOCK:
            ep = export_program(module, a, kw, dyn)
            # the static dims lowered as their numbers, the others as before
            lowerer = Lowerer(ep, {**_dim_names(tensor_leaves(a, kw)), **static}, name=type(module).__name__)
            graph = lowerer.run()
        guards = _export_guards(ep, lowerer)
        floors, raising = _size_floors(module, args, kwargs, graph, guards)
    symbols = {s for v in graph.inputs for s in v.type.shape if isinstance(s, sympy.Symbol)}
    # (over a plain integer symbol of the same name, which Guard.holds binds by name: our dim symbols are positive,
    # so sympy takes T >= 1 over them for true, also when unpickled from the compile cache)
    # (where the module or the graph raises below the floor: "size-error", which exports do not warn of: there the
    # exported program raises where the module answers, or the reverse, but gives no wrong value)
    guards += [Guard(sympy.Ge(sympy.Symbol(sym.name, integer=True), lo), "size-error" if sym in raising else "size")
               for sym, lo in floors.items() if lo and sym in symbols]
    stage("recognising")
    used = {v.name for n in graph.nodes for v in n.value_inputs if v.kind == "param"}
    read = {name: graph.params[name] for name in graph.param_values
            if name in used and isinstance(graph.params.get(name), torch.Tensor)}   # not the unused placeholders
    lowered = graph.clone() if recognisers and any(t.requires_grad for t in read.values()) else None
    if recognisers:
        hand_written_softmax(graph)   # a softmax spelled exp(x - max) / sum is the recognisers' softmax
    before = _param_readers(graph)
    report = recognise(graph, _layout_sizes(graph)) if recognisers else Report()
    report.accepted[:0] = lowerer.notes
    report.shared = list(lowerer.shared)
    # read, then replaced: a tensor a recogniser stopped reading somewhere and no op it made reads (the value was
    # proved and built in: a mask buffer become the causal flag, also where a running mean still reads it), not
    # one the new op reads itself (RoPE's inv_freq, read by the attention op)
    after = _param_readers(graph)
    dropped = set().union(*(r - after.get(n, frozenset()) for n, r in before.items()))
    fresh = set().union(*(r - before.get(n, frozenset()) for n, r in after.items()))
    consumed = {name: t for name, t in read.items() if name in dropped - fresh}
    simplify(graph)
    idle = _idle_parameters(lowered, tensor_leaves(args, kwargs),
                            [name for name, t in consumed.items() if t.requires_grad])
    assumed = tuple((name, tensor_digest(t)) for name, t in consumed.items() if name not in idle)
    warn_folded_trainables(module, [name for name, t in consumed.items() if t.requires_grad and name not in idle],
                           stacklevel=4)
    out_spec = ep.call_spec.out_spec
    leaves, spec = call_leaves(args, kwargs)
    constants = tuple((i, v) for i, v in enumerate(leaves) if isinstance(v, CONSTANT_TYPES))
    names = tuple(f"args[{i}]" for i in range(len(args))) + tuple(sorted(kwargs))
    traced = Traced(graph, report, out_spec, tuple(guards), spec, constants, names, tuple(lowerer.none_outputs),
                    assumed, side_effects, tuple(lowerer.output_sources), custom_backward, python_random,
                    tuple(lowerer.constant_outputs), exporting_autocast(), hooks, zero_grads=idle,
                    contiguous_outputs=tuple(lowerer.contiguous_outputs),
                    keyword_order=extra_keywords(module, kwargs))
    questions = grad_questions(module)
    if any(questions):
        traced = dataclasses.replace(traced, grad_mode=grad_state(questions, traced.tensor_inputs(args, kwargs)))
    return traced



def trace(module: torch.nn.Module, example_inputs) -> Graph:
    """Trace a module into the IR with dynamic batch (``B``) and sequence length (``T``)."""
    return trace_with_report(module, example_inputs).graph
