"""``torch.compile(module, backend="sessa")``: a dynamo backend that compiles each captured graph with this compiler.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the name also works in a process
that never imports this package itself, and by ``import sessa_compiler`` as soon as dynamo is loaded (register()).

How a captured graph is compiled:

1. dynamo hands over an FX graph of torch calls and its example inputs. The module's parameters and buffers are
   inputs too (dynamo inlines nn.Modules), and after a recompile for new sizes the sizes dynamo made dynamic come
   as SymInt inputs.
2. The graph is wrapped in a module (_GraphAsModule) whose buffers are the example parameter tensors, so that the
   recognisers' probes see real weights, and whose forward computes the size inputs from the data inputs' shapes.
   torch.export traces it non-strict (it does not re-enter dynamo), with the dims dynamo made dynamic dynamic and
   the others static, and the frontend lowers it to the IR and recognises attention, feedback and scans.
3. dynamo's first graph of a module has static sizes: the recognisers then match layouts at those integers and
   probe there (the graph runs at those sizes only; dynamo guards them). After a call at another sequence length
   dynamo recompiles with a dynamic sequence dim, and that graph is recognised at symbolic B and T.
4. A graph whose IR holds a core op (attention, feedback, tri_solve, scan, rope) runs on a sessa backend ("auto"
   unless options={"backend": ...} says otherwise). Parameters are read from each call's inputs, so an optimiser's
   updates are seen. Any other graph, and any graph the frontend cannot take, goes to the fallback backend
   (Inductor unless options={"fallback": ...}); ``reports`` says which way each graph went and why.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .errors import ConfigError, SessaCompilerError, TraceError
from .persistent_cache import values_unchanged

NAME = "sessa"
# The backend graphs without Sessa ops go to (a name torch._dynamo.lookup_backend knows). Inductor, as
# torch.compile's default; tests on a small CPU machine set options={"fallback": "aot_eager"} instead.
DEFAULT_FALLBACK = "inductor"
_OWN_OPTIONS = ("backend", "fallback")


@dataclass
class GraphReport:
    """What the sessa backend did with one graph dynamo captured."""

    compile_id: str           # dynamo's id of the frame's compile ("0/1": frame 0, its second compile)
    compiled: bool            # True: a sessa backend runs it; False: the fallback does
    backend: str              # the sessa backend, or the fallback's name
    core_ops: dict = field(default_factory=dict)   # op -> count in the IR (empty when it fell back)
    reason: str = ""          # why it fell back
    dynamic_dims: tuple = ()  # (input index, dim) of the data inputs that are dynamic in this graph
    explain: str = ""         # the IR report (recognised, not recognised, fallbacks)


# The last graphs the backend compiled, newest last (a bounded log for explain-style inspection and tests).
class ReportLog(collections.deque):
    """A bounded deque that also takes slices: ``reports[-2:]`` is a list of the last two reports."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self)[index]
        return super().__getitem__(index)


reports: ReportLog = ReportLog(maxlen=64)
_REPORTS_LOCK = threading.Lock()


def _record(report: GraphReport) -> None:
    with _REPORTS_LOCK:
        reports.append(report)


# -- the graph's inputs: data tensors, parameters and buffers, sizes -------------------------------------------------
def _source_path(source) -> str | None:
    """'mixer.q_proj.weight' for dynamo's source of a module parameter or buffer, None for any other source."""
    from torch._dynamo.source import (AttrSource, ChainedSource, DictGetItemSource, ParamBufferSource,
                                      is_from_unspecialized_param_buffer_source)

    if source is None:
        return None
    if not (is_from_unspecialized_param_buffer_source(source) or _chain_has(source, ParamBufferSource)):
        return None
    parts = []
    s = source
    while isinstance(s, ChainedSource):
        if isinstance(s, DictGetItemSource) and isinstance(s.index, str):
            parts.append(s.index)
        elif isinstance(s, AttrSource) and s.member not in ("_modules", "_parameters", "_buffers", "__dict__"):
            parts.append(s.member)
        s = s.base
    parts = [p for p in reversed(parts) if p.isidentifier() or p.isdigit()]
    return ".".join(parts) or None


def _chain_has(source, kind) -> bool:
    from torch._dynamo.source import ChainedSource

    while source is not None:
        if isinstance(source, kind):
            return True
        source = source.base if isinstance(source, ChainedSource) else None
    return False


@dataclass
class _Layout:
    """Where each of the graph's placeholders comes from at a call."""

    # per placeholder: ("data", k) | ("weight", name) | ("size", k, dim) | ("number", value, dtype)
    kinds: list
    data: list             # placeholder index of each data input
    weights: list          # (name, placeholder index)
    dynamic: list          # per data input: {dim: Dim.AUTO} for the dims dynamo made dynamic


def _layout(gm: fx.GraphModule, example_inputs) -> _Layout:
    from torch.export import Dim

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise TraceError(f"the graph has {len(placeholders)} inputs, dynamo gave {len(example_inputs)} examples")
    kinds: list = [None] * len(placeholders)
    data, weights, used = [], [], set()
    from torch._subclasses.fake_tensor import is_fake

    for i, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(example, torch.Tensor):
            continue
        if is_fake(example):  # the recognisers' probes need real weights
            raise TraceError(f"input {node.name} is a fake tensor: the sessa backend needs real example inputs")
        grapharg = node.meta.get("grapharg")
        if grapharg is not None and getattr(grapharg, "pass_arg_as_tensor", False) and example.dim() == 0:
            # a Python number dynamo passes as a tensor (dynamic=True does this to float attributes such as a
            # layer norm's eps): traced as the constant it is now; a call with another value runs dynamo's graph
            kinds[i] = ("number", example.item(), example.dtype)
            continue
        fake = node.meta.get("example_value", example)
        static = all(isinstance(d, int) for d in fake.shape)
        path = _source_path(getattr(grapharg, "source", None)) if grapharg is not None else None
        if path is None and isinstance(example, torch.nn.Parameter):
            path = node.name
        if path is not None and static:
            name = path if path not in used else f"{path}_{i}"
            used.add(name)
            kinds[i] = ("weight", name)
            weights.append((name, i))
        else:
            kinds[i] = ("data", len(data))
            data.append(i)
    dynamic = []
    symbols = {}
    for k, i in enumerate(data):
        fake = placeholders[i].meta.get("example_value", example_inputs[i])
        dims = {}
        for d, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt):
                symbols.setdefault(size.node.expr, (k, d))
                if d < 2:  # B and T; a dim after them is traced static (a feature dim a weight fixes anyway)
                    dims[d] = Dim.AUTO
        dynamic.append(dims)
    for i, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if kinds[i] is not None:
            continue
        value = node.meta.get("example_value", example)
        expr = value.node.expr if isinstance(value, torch.SymInt) else None
        if expr is None or expr not in symbols:
            raise TraceError(f"input {node.name} ({type(example).__name__}) is neither a tensor nor a size of one "
                             "of the graph's tensors")
        kinds[i] = ("size",) + symbols[expr]
    return _Layout(kinds, data, weights, dynamic)


class _GraphAsModule(torch.nn.Module):
    """dynamo's graph as a module of its data inputs: parameters and buffers are its buffers (the examples'
    tensors, under their dotted names), sizes are read from the data inputs."""

    def __init__(self, gm: fx.GraphModule, layout: _Layout, example_inputs):
        super().__init__()
        self.gm = gm
        self.layout = layout
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        for w, (name, i) in enumerate(layout.weights):
            if not self._place(name, example_inputs[i].detach()):
                name = f"_input_{placeholders[i]}"  # a path that clashes with another: the graph input's name
                self.register_buffer(name, example_inputs[i].detach())
                layout.weights[w] = (name, i)
                layout.kinds[i] = ("weight", name)

    def _place(self, name: str, tensor: torch.Tensor) -> bool:
        """Register tensor as a buffer at its dotted path (parameter names in the IR read as in the module)."""
        *path, leaf = name.split(".")
        owner = self
        for part in path:
            if part not in owner._modules:
                if hasattr(owner, part):
                    return False
                owner.add_module(part, torch.nn.Module())
            owner = owner._modules[part]
        if hasattr(owner, leaf):
            return False
        owner.register_buffer(leaf, tensor)
        return True

    def weight(self, name: str) -> torch.Tensor:
        obj = self
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def forward(self, *inputs):
        args = []
        for kind in self.layout.kinds:
            if kind[0] == "data":
                args.append(inputs[kind[1]])
            elif kind[0] == "weight":
                args.append(self.weight(kind[1]))
            elif kind[0] == "number":  # a constant tensor: export folds its .item()
                args.append(torch.tensor(kind[1], dtype=kind[2]))
            else:
                args.append(inputs[kind[1]].shape[kind[2]])
        return self.gm(*args)


# -- the compiled graph ------------------------------------------------------------------------------------------
class SessaGraph:
    """The callable dynamo runs for a compiled graph: the call's data inputs and live parameters into the
    prepared sessa backend. A call the traced graph does not cover (its size guards) runs dynamo's graph as
    torch code instead, with a warning."""

    def __init__(self, gm, layout: _Layout, traced, backend, runner):
        self.gm = gm
        self.layout = layout
        self.traced = traced
        self.backend = backend
        self.runner = runner
        graph = traced.graph
        weight_names = {name for name, _ in layout.weights}
        self.weight_args = [(name, i) for name, i in layout.weights if name in graph.param_values]
        # parameters of the IR that are not inputs of dynamo's graph: constants the trace lifted, tables a
        # recogniser added, attributes of the graph module itself
        self.fixed = {k: v for k, v in graph.params.items() if k not in weight_names}
        self.eager_runners: dict = {}
        # dynamo's inputs a recognised op was built from (a mask or RoPE table buffer): (input index, name, digest),
        # checked at every call by identity, storage and version, and hashed again when those change
        position = dict(layout.weights)
        self.assumed = [(position[n], n, digest) for n, digest in traced.assumed if n in position]
        self._verified: dict = {}
        self.grad_recomputes = 0
        self.eager_calls = 0
        self._lock = threading.RLock()
        self._warned = False

    def __call__(self, *args):
        from .api import _INTERPRETER_LOCK, run_with_autograd
        from .backends.eager import bind_symbols

        graph = self.traced.graph
        inputs = [args[i] for i in self.layout.data]
        why = self._numbers_changed(args) or self._assumed_changed(args)
        try:
            binding = bind_symbols(graph, inputs)
            broken = self.traced.violated(binding)
            if broken:
                why = f"the traced graph equals dynamo's only where {' and '.join(map(str, broken))}"
        except SessaCompilerError as e:
            why = why or str(e)
        if why is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"sessa backend: {why}; this call runs dynamo's graph as torch code", stacklevel=2)
            self.eager_calls += 1
            return self.gm(*args)
        params = dict(self.fixed)
        params.update({name: args[i] for name, i in self.weight_args})
        interpreted = self.backend.name == "triton" and not any(x.is_cuda for x in inputs)
        with self._lock, (_INTERPRETER_LOCK if interpreted else contextlib.nullcontext()):
            outs, recomputed = run_with_autograd(self.backend, self.runner, graph, inputs, params, self.eager_runners)
        self.grad_recomputes += recomputed
        return self.traced.unflatten(outs)

    def _assumed_changed(self, args) -> str | None:
        for i, name, digest in self.assumed:
            if not values_unchanged(args[i], digest, self._verified, i):
                return f"the values of '{name}' changed since the trace, and a recognised op was built from them"
        return None

    def _numbers_changed(self, args) -> str | None:
        for i, kind in enumerate(self.layout.kinds):
            if kind[0] == "number" and args[i].item() != kind[1]:
                return f"input {i} (a Python number dynamo passes as a tensor) was traced as {kind[1]}, is now " \
                       f"{args[i].item()}"
        return None


def _outside_dynamo():
    """A context in which torch.export runs as it does outside torch.compile. Inside dynamo's call to a backend,
    torch.export would find dynamo's tracing context and fake mode and trace in dynamo's shape environment: the
    guards it adds there (sizes export specialises or constrains) then fail on the frame dynamo is compiling
    ("Guard failed on the same frame it was created")."""
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    stack = contextlib.ExitStack()
    stack.enter_context(tracing(None))
    stack.enter_context(unset_fake_temporarily())
    return stack


# -- the backend -------------------------------------------------------------------------------------------------
def _core_ops(graph) -> dict:
    from .ir.ops import CORE, OPS

    return dict(collections.Counter(n.op for n in graph.nodes if OPS[n.op].kind == CORE))


def _explain(traced, backend_name: str) -> str:
    g, rep = traced.graph, traced.report
    lines = [f"inputs: {', '.join(f'%{v.name}: {v.type}' for v in g.inputs)}; {len(g.nodes)} ops; "
             f"backend {backend_name}"]
    lines += [f"recognised {a}" for a in rep.accepted] + [f"not recognised: {r}" for r in rep.rejected]
    return "\n".join(lines)


def _lookup_backend(name: str):
    from torch._dynamo import lookup_backend

    return lookup_backend(name)


def _fallback(gm, example_inputs, name: str):
    try:
        compiler = _lookup_backend(name)
    except Exception as e:  # noqa: BLE001 - an unknown name: say which option holds it
        raise ConfigError(f"sessa backend: unknown fallback backend {name!r} (options={{'fallback': ...}}): {e}") from e
    if name != "inductor":
        return compiler(gm, example_inputs)
    try:
        return compiler(gm, example_inputs)
    except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler on this machine: the graph still runs
        warnings.warn(f"sessa backend: Inductor could not compile a graph without Sessa ops ({type(e).__name__}: "
                      f"{e}); it runs as torch code", stacklevel=2)
        return gm.forward


def sessa_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The dynamo backend: ``torch.compile(module, backend="sessa", options={...})``.

    options: "backend" (the sessa backend for graphs with Sessa ops: "auto", "eager", "tvm", "triton"; default
    "auto"), "fallback" (a dynamo backend name for the other graphs, default "inductor"; "eager" runs them as torch
    code), and any option sessa_compiler.compile takes (feedback_chunk_size, interpret, ...).
    """
    from .backends import get_backend
    from .frontend.trace import trace_with_report

    if mode is not None:
        raise ConfigError(f"torch.compile(backend='sessa', mode={mode!r}): modes are Inductor's; the sessa backend "
                          "takes options={'backend': ..., 'fallback': ...} instead")
    options = dict(options or {})
    backend_name = options.pop("backend", "auto")
    fallback = options.pop("fallback", DEFAULT_FALLBACK)
    backend = get_backend(backend_name, **options)  # a ConfigError for unknown options, before anything is traced
    from torch._guards import CompileContext

    name = str(CompileContext.current_compile_id() or "")
    try:
        layout = _layout(gm, example_inputs)
        module = _GraphAsModule(gm, layout, example_inputs)
        data = [example_inputs[i] for i in layout.data]
        if not data:
            raise TraceError("the graph has no tensor inputs besides parameters")
        if any(isinstance(d, torch.Tensor) and d.numel() == 0 for d in data):
            # dynamo specialises a size 0 (an empty batch or sequence): nothing for a kernel to do, and the
            # recognisers' probes cannot run at size 0 (sc.compile traces on a grown example instead)
            raise TraceError("an input is empty (dynamo specialises size 0)")
        dynamic = {"inputs": tuple(dims or None for dims in layout.dynamic)}  # forward(*inputs)
        with torch.no_grad(), _outside_dynamo():
            traced = trace_with_report(module, tuple(d.detach() for d in data), dynamic_shapes=dynamic)
    except SessaCompilerError as e:
        reason = f"the sessa frontend cannot take this graph: {e}"
        _record(GraphReport(name, False, fallback, reason=reason))
        return _fallback(gm, example_inputs, fallback)
    dynamic_dims = tuple((k, d) for k, dims in enumerate(layout.dynamic) for d in dims)
    core = _core_ops(traced.graph)
    if not core:
        reason = "no attention, feedback or scan in the graph"
        _record(GraphReport(name, False, fallback, reason=reason, dynamic_dims=dynamic_dims,
                            explain=_explain(traced, fallback)))
        return _fallback(gm, example_inputs, fallback)
    examples = {name: example_inputs[i] for name, i in layout.weights}
    folded = [n for n, _ in traced.assumed if getattr(examples.get(n), "requires_grad", False)]
    idle = [n for n in traced.zero_grads if getattr(examples.get(n), "requires_grad", False)]
    if folded or idle:   # its value became a constant of the op, or no op reads it: it would get no gradient
        reason = "; ".join(
            ([f"a recognised op was built from the values of the trainable parameter(s) {', '.join(folded)}, "
              "which would get no gradient through it"] if folded else []) +
            ([f"the recognised graph no longer reads the trainable parameter(s) {', '.join(idle)} (the output "
              "does not depend on them at these sizes), which would get no gradient, not the module's zeros"]
             if idle else []))
        _record(GraphReport(name, False, fallback, reason=reason, dynamic_dims=dynamic_dims,
                            explain=_explain(traced, fallback)))
        return _fallback(gm, example_inputs, fallback)
    graph = traced.graph
    graph.example_inputs = tuple(data)
    runner = backend.prepare(graph)
    if hasattr(backend, "resolve"):
        backend.resolve(list(data))
    _record(GraphReport(name, True, backend.name, core_ops=core, dynamic_dims=dynamic_dims,
                        explain=_explain(traced, backend.name)))
    return SessaGraph(gm, layout, traced, backend, runner)


_REGISTRY = "torch._dynamo.backends.registry"


def _register_into(registry) -> None:
    """Add "sessa" to dynamo's backend registry, as the entry point pyproject.toml declares: torch loads it the
    same way whether or not the package metadata is installed, and its later entry-point discovery finds the
    same name again (a second register_backend would be a duplicate-name error)."""
    from importlib.metadata import EntryPoint

    if NAME in registry._COMPILER_FNS or registry._BACKENDS.get(NAME) is not None:
        return
    registry._BACKENDS[NAME] = EntryPoint(name=NAME, value=f"{__name__}:sessa_backend", group="torch_dynamo_backends")


class _AfterRegistryImport(importlib.abc.MetaPathFinder):
    """Registers the backend once dynamo's registry module has been imported: importing torch._dynamo here
    would add more than a second (and triton) to ``import sessa_compiler``."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _register_into(module)
        spec.loader.exec_module = exec_module
        return spec


def register() -> None:
    """Make "sessa" a torch.compile backend name in this process (idempotent): now when dynamo is loaded,
    else as soon as it is."""
    registry = sys.modules.get(_REGISTRY)
    if registry is not None:
        _register_into(registry)
    elif not any(isinstance(f, _AfterRegistryImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryImport())
