"""The public entry point: ``sessa_compiler.compile(module, ...)`` -> a CompiledModule."""
from __future__ import annotations

import collections
import inspect
import time
import warnings

import torch
import torch.utils._pytree as pytree

from .backends import get_backend
from .backends.eager import bind_symbols
from .dtypes import from_torch
from .errors import InputError, TraceError, ValidationError
from .frontend.trace import Traced, check_keywords, trace_with_report
from .ir.ops import CORE, OPS
from .serving import SERVING_METHODS as _SERVING_METHODS
from .tolerance import TOLERANCE, relative_error  # noqa: F401  (re-exported: sessa_compiler.api.TOLERANCE)


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
    try:
        binding = bind_symbols(graph, list(args))
    except InputError as e:
        return f"the traced graph fixed a batch or sequence size ({e})" if _only_sizes_differ(graph, args) else None
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
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
            n = ctx.n_inputs
            outs = ctx.eager(leaves[:n], {**ctx.fixed, **dict(zip(ctx.names, leaves[n:]))})
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wanted = [t for t in leaves if t.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                      allow_unused=True) if pairs and wanted else [None] * len(wanted)
        it = iter(got)
        return (None,) * 5 + tuple(next(it) if t.requires_grad else None for t in leaves)


class CompiledModule(torch.nn.Module):
    """A compiled module: same call signature and outputs as the original.

    ``.graph`` is the IR (printable); ``.explain()`` says what was recognised, what fell back and
    which backend runs it.
    """

    def __init__(self, module: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
                 backend: str = "auto",
                 validate: bool = False, print_ir: bool | None = None, options: dict | None = None,
                 autotune: bool | dict = False):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"compile expects a torch.nn.Module, got {type(module).__name__}")
        self.__dict__["_original"] = module  # not a submodule: its parameters are read, never copied
        self.backend_name = backend
        self.validate = validate
        options = dict(options or {})
        if print_ir is not None:
            options["print_ir"] = print_ir
        self._backend = get_backend(backend, **options)
        self._traced: Traced | None = None
        self._runner = None
        self._eager_runners: dict = {}  # graph id -> eager runner, for forward-only backends' backward
        self._variants: list = []  # (Traced, runner): one per path through size-dependent code seen so far
        self.grad_recomputes = 0    # calls whose backward recomputes on eager
        self.trace_seconds = None
        self.autotune = autotune  # True, or tune settings: {"budget": ..., "progress": ..., "cache": ...}
        self.tune_results: list = []
        self.tune_seconds = 0.0
        if example_inputs is not None:
            self._trace(tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,),
                        example_kwargs)

    # -- tracing ---------------------------------------------------------------------------------------
    def _trace(self, args: tuple, kwargs: dict | None = None) -> None:
        start = time.perf_counter()
        self._traced = trace_with_report(self._original, args, kwargs)
        args = tuple(self._traced.tensor_inputs(args, kwargs or {}))  # the graph's inputs
        graph = self._traced.graph
        # parameters are read from the live module, so later weight updates are seen
        live = dict(self._original.state_dict(keep_vars=True))
        for name in graph.param_values:
            if name in live:
                graph.params[name] = live[name]
        graph.example_inputs = args  # backends pick configs per shape class and device from these
        if self.autotune:
            from .tune.api import tune_graph

            settings = self.autotune if isinstance(self.autotune, dict) else {}
            tune_start = time.perf_counter()
            backend = self._backend
            if hasattr(backend, "resolve"):  # auto: tune the backend the example inputs will run on
                backend.prepare(graph)
                backend = backend.resolve(list(args))
            self.tune_results = tune_graph(backend, graph, args, **settings)
            self.tune_seconds = time.perf_counter() - tune_start
        self._runner = self._backend.prepare(graph)
        if hasattr(self._backend, "resolve"):  # auto: say now which backend the example inputs pick
            self._backend.resolve(list(args))
        self._variants.append((self._traced, self._runner))
        self.trace_seconds = time.perf_counter() - start

    def __getattr__(self, name):
        # serving (sessa_compiler/serving.py): init_cache/prefill/decode_step/generate, compiled
        if name in _SERVING_METHODS:
            from .serving import serving_method

            return serving_method(self, name)
        return super().__getattr__(name)

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
        return self._original

    def kernel_sources(self) -> dict:
        """Generated kernel source by IR value name (backends that generate code; {} for eager)."""
        fn = getattr(self._backend, "kernel_sources", None)
        return fn(self.graph) if fn is not None else {}

    # -- calling -------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        check_keywords(kwargs, InputError, f"compiled {type(self._original).__name__}: ")
        if self._traced is None:
            self._trace(args, kwargs)
        else:
            self._select_variant(args, kwargs)
        graph = self._traced.graph
        inputs = self._traced.tensor_inputs(args, kwargs)
        bind_symbols(graph, inputs)  # rank, dtype and shape checks before anything runs
        self._check_devices(inputs)
        outs = self._run(inputs, graph)
        result = pytree.tree_unflatten(list(outs), self._traced.out_spec)
        if self.validate:
            self._validate(args, kwargs, outs)
        return result

    # -- size-dependent paths through the module's code -------------------------------------------------
    def _select_variant(self, args, kwargs) -> None:
        """Make current the traced graph that equals the module at these sizes. torch.export follows one
        path through the module's Python code; where that code branches on B or T, the graph holds only
        under its guards (Traced.guards). Other sizes get their own trace, once per path, as torch.compile
        recompiles."""
        reason = _why_not(self._traced, args, kwargs)
        if reason is None:
            return
        signature = inspect.signature(self._original.forward)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"compiled {type(self._original).__name__}: forward{signature} cannot take this call: "
                             f"{e}") from None
        for traced, runner in self._variants:
            if traced is not self._traced and _why_not(traced, args, kwargs) is None:
                self._traced, self._runner = traced, runner
                return
        warnings.warn(f"compiled {type(self._original).__name__}: {reason}; tracing it again for this call "
                      f"(traced graph {len(self._variants) + 1}: each keyword-argument signature and each path through "
                      "the module's size-dependent code is traced once)", stacklevel=5)  # past nn.Module.__call__ to the caller
        self._trace(args, kwargs)

    def _run(self, args: list, graph) -> list:
        """Run the backend; when autograd must see this call and the backend is forward-only, wrap it so
        the backward recomputes on the eager interpreter."""
        params = graph.params
        if not torch.is_grad_enabled():
            return self._runner(args, params)
        resolve = getattr(self._backend, "resolve", None)
        backend = resolve(args) if resolve is not None else self._backend
        if getattr(backend, "differentiable", False):
            return self._runner(args, params)
        grad_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        names = [k for k, p in params.items() if isinstance(p, torch.Tensor) and p.requires_grad]
        if not grad_args and not names:
            return self._runner(args, params)
        if id(graph) not in self._eager_runners:
            from .backends.eager import EagerBackend

            self._eager_runners[id(graph)] = EagerBackend().prepare(graph)
        fixed = {k: p for k, p in params.items() if k not in set(names)}
        self.grad_recomputes += 1
        return list(_RecomputeGrad.apply(self._runner, self._eager_runners[id(graph)], len(args), names, fixed,
                                         *args, *(params[k] for k in names)))

    def _check_devices(self, args) -> None:
        devices = {a.device for a in args}
        params = [p for p in self._traced.graph.params.values() if isinstance(p, torch.Tensor)]
        if params:
            devices.add(params[0].device)
        if len(devices) > 1:
            raise InputError(f"compiled {type(self._original).__name__}: inputs and parameters are on different devices "
                             f"({', '.join(sorted(map(str, devices)))}); move them to one device")

    def _validate(self, args, kwargs, outs) -> None:
        with torch.no_grad():
            ref = pytree.tree_leaves(self._original(*args, **kwargs))
        graph = self._traced.graph
        for i, (o, r) in enumerate(zip(outs, ref)):
            err = relative_error(o, r)
            tol = TOLERANCE.get(r.dtype, 0.0)
            if err > tol:
                v = graph.outputs[i]
                producer = v.producer.op if v.producer is not None else "input"
                core = [n.op for n in graph.nodes if OPS[n.op].kind == CORE]
                raise ValidationError(
                    f"output {i} (%{v.name}, produced by op '{producer}') differs from the original module: "
                    f"max abs error / max abs reference = {err:.3e} > {tol:.0e} allowed for {r.dtype} "
                    f"(backend {self._backend.name}; core ops in the graph: {', '.join(core) or 'none'})")

    # -- reporting -------------------------------------------------------------------------------------
    def explain(self) -> str:
        """A readable report: recognised ops, rejected candidates, fallbacks, backend and kernels."""
        if self._traced is None:
            return f"{type(self._original).__name__}: not traced yet (call it once or pass example_inputs)"
        g, rep = self._traced.graph, self._traced.report
        counts = collections.Counter(n.op for n in g.nodes)
        lines = [f"compiled {type(self._original).__name__} with backend '{self._backend.name}'",
                 f"  inputs: {', '.join(f'%{v.name}: {v.type}' for v in g.inputs)}",
                 f"  {len(g.nodes)} ops, {len(g.param_values)} parameters"
                 + (f", traced in {self.trace_seconds:.2f} s" if self.trace_seconds else "")]
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
        core = {op: c for op, c in counts.items() if OPS[op].kind == CORE}
        lines.append("  core ops: " + (", ".join(f"{op} x{c}" for op, c in sorted(core.items())) or "none"))
        for a in rep.accepted:
            lines.append(f"    recognised {a}")
        for r in rep.rejected:
            lines.append(f"    not recognised: {r}")
        fallbacks = collections.Counter(n.attrs["target"] for n in g.nodes if n.op == "fallback")
        lines.append("  fallbacks (run as torch ops): " +
                     (", ".join(f"{t} x{c}" for t, c in sorted(fallbacks.items())) or "none"))
        others = {op: c for op, c in counts.items() if OPS[op].kind != CORE and op != "fallback"}
        lines.append("  other ops: " + ", ".join(f"{op} x{c}" for op, c in sorted(others.items())))
        lines.append("  " + self._backend.describe(g))
        if not getattr(self._backend, "differentiable", False):
            lines.append(f"  autograd: the {self._backend.name} kernels run the forward; when a call needs gradients "
                         "(grad enabled and an input or parameter requires grad), the backward re-runs the graph on "
                         "the eager interpreter and differentiates that (recomputation); under torch.no_grad() "
                         "nothing extra is saved or run")
        return "\n".join(lines)


def compile(module: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
            backend: str = "auto", validate: bool = False,
            print_ir: bool | None = None, options: dict | None = None, autotune: bool | dict = False):
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
    """
    return CompiledModule(module, example_inputs, example_kwargs=example_kwargs, backend=backend, validate=validate, print_ir=print_ir,
                          options=options, autotune=autotune)
