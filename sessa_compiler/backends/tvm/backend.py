"""The TVM backend for compile(): generated TVM kernels for the core ops, torch for the rest.

Core ops (feedback, attention, scan) run as TVM kernels built once per static shape at prepare
time (batch and sequence length stay symbolic: no rebuild for a new T). Every other op runs
through the eager interpreter's torch implementation, so matmuls use torch's BLAS. Tensors cross
into TVM zero-copy through DLPack; an operand that is not contiguous or not 64-byte aligned (the
generated code assumes both and nothing checks it: a misaligned view would crash the process) is
first copied into a fresh aligned buffer, and the copy is counted.
"""
from __future__ import annotations

import collections
import warnings
import dataclasses

import torch

from ...errors import InputError, UnsupportedError
from ...ir.dtypes import HALF
from ...ir.graph import Graph, Node, Value
from ...ir.ops import view_root
from ...progress import stage
from ..base import Backend, CompileContext
from ..eager import bind_symbols, eager_when_empty, empty_operand_sizes, half_model, resolve, run_graph, run_node
from .build import ALIGN, aligned_empty, build, kernel_source, lanes_for
from .lowering import lower_graph
from .schedule_choice import tuning_kernel, tuning_source, tunable_nodes, tvm_schedule, tvm_schedules, tvm_space

_TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}


def _computed_outputs(graph) -> frozenset:
    """Positions of the outputs the graph computes (not an input, a parameter or a view of one)."""
    return frozenset(i for i, v in enumerate(graph.outputs) if view_root(v).kind == "node")


def _unshared(res: list, args: list, fresh: frozenset) -> list:
    """TVM's VM may hand back an argument's or another output's buffer for a computed output where its passes
    reduced the computation to an identity (x + 0, cat([x]), y and y * 1): an in-place edit of that output would
    reach the user's input, a weight or the other output. Such outputs are copied."""
    arg_ptrs, seen = None, set()
    for i, r in enumerate(res):
        ptr = r.data_ptr() if r.numel() else None
        if ptr is not None and i in fresh:
            if arg_ptrs is None:
                arg_ptrs = {a.data_ptr() for a in args if a.numel()}
            if ptr in arg_ptrs or ptr in seen:
                res[i] = r = r.clone()
                ptr = r.data_ptr()
        if ptr is not None:
            seen.add(ptr)
    return res


class KernelCall:
    """Calls one built kernel on torch tensors: dtype, layout and alignment handled here."""

    def __init__(self, kernel, stats: collections.Counter):
        self.kernel = kernel
        self.dtype = _TORCH_DTYPE[kernel.spec.dtype]
        self.stats = stats

    def prepare_arg(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        if not t.is_contiguous() or t.data_ptr() % ALIGN:
            self.stats["aligned_copies"] += 1
            out = aligned_empty(tuple(t.shape), self.dtype)
            out.copy_(t)
            t = out
        return t

    def _tri_solve(self, A, b, upper: bool) -> torch.Tensor:
        """The kernel solves lower systems over [nb, T, T]: leading dims flattened, an upper system
        solved as the lower one of the reversed sequence."""
        T_, N = b.shape[-2], b.shape[-1]
        A3, b3 = A.reshape(-1, T_, T_), b.reshape(-1, T_, N)
        if upper:
            A3, b3 = A3.flip(-2, -1), b3.flip(-2)
        A3, b3 = self.prepare_arg(A3), self.prepare_arg(b3)
        out = aligned_empty(tuple(b3.shape), self.dtype)
        self.kernel(A3, b3, out)
        self.stats["kernel_calls"] += 1
        return (out.flip(-2) if upper else out).reshape(b.shape)

    def __call__(self, *args, upper: bool = False) -> torch.Tensor:
        spec = self.kernel.spec
        out_dtype = args[-1].dtype if spec.op == "tri_solve" else args[0].dtype
        args = [self.prepare_arg(a) for a in args]
        if spec.op == "attention" and not spec.params["rope"]:   # rope off: inv_freq is not read
            args.insert(3, torch.zeros(max(spec.params["head_dim"] // 2, 1), dtype=self.dtype))
        if spec.op == "tri_solve":
            return self._tri_solve(*args, upper=upper).to(out_dtype)
        out = aligned_empty(tuple(args[0].shape), self.dtype)
        self.kernel(*args, out)
        self.stats["kernel_calls"] += 1
        return out if out.dtype == out_dtype else out.to(out_dtype)


class TVMBackend(Backend):
    """compile(module, backend="tvm"): CPU tensors, generated TVM kernels for the core ops."""

    name = "tvm"
    differentiable = False  # autograd through its kernels: prepare_training (backends/training.py)
    training_lse_from_forward = True            # the attention forward kernel writes its lse (training.py here)
    training_feedback_lse_from_forward = False  # the feedback backward recomputes its weights' softmax

    def __init__(self, target=None, schedules: dict | None = None, feedback_chunk_size: int | None = None,
                 print_ir: bool | None = None, whole_graph: bool | None = None, decode_kernels: bool | None = None):
        """target: None = this machine's CPU; schedules: {op: Schedule} overriding the defaults;
        feedback_chunk_size: shorthand for the feedback schedule's chunk; print_ir: print the IR the
        backend lowers (the graph is lowered as traced: no pass rewrites it); whole_graph: run the
        whole graph as one TVM (Relax VM) program when every op lowers (default: yes), else only the
        core ops in TVM and the rest through torch ("hybrid"); decode_kernels: one-position serving steps on
        CPU read the caches with the TVM split-K kernels and run their linear layers as TVM matrix-vector
        kernels (backends/tvm/decode.py) instead of torch ops (default: yes; False runs the derived step
        through torch, as the eager backend does)."""
        import importlib.util

        if importlib.util.find_spec("tvm") is None:
            raise UnsupportedError("backend 'tvm' needs Apache TVM: pip install apache-tvm==0.27.0.post1 "
                                   "apache-tvm-ffi==0.1.14.post1")
        from .target import cached_host_target, resolve_target

        self.print_ir = print_ir  # None: SESSA_COMPILER_PRINT_IR decides
        self.whole_graph = True if whole_graph is None else bool(whole_graph)
        self.decode_kernels = True if decode_kernels is None else bool(decode_kernels)
        self.modes: dict = {}   # id(graph) -> ("whole graph" | "hybrid", reason)
        self._widened: dict = {}   # id(graph) -> (graph, its copy with 16-bit core ops on float32 kernels)
        # this host's target as an earlier process recorded it (no `import tvm`: a warm compile loads its library
        # through tvm_ffi alone, lib_cache.py), else resolved now (and recorded)
        self._target = (cached_host_target() if target is None else None) or resolve_target(target)
        self.lanes = lanes_for(self._target)
        self.schedules = dict(schedules or {})
        if feedback_chunk_size is not None:
            from .schedules import default_feedback

            base = self.schedules.get("feedback") or default_feedback(16 * self.lanes, self.lanes)
            self.schedules["feedback"] = dataclasses.replace(base, chunk=int(feedback_chunk_size))
        self.stats: collections.Counter = collections.Counter()
        self.resolved: dict = {}  # id(graph) -> (schedules by op, report lines): tuned / shipped / own default

    @property
    def target(self):
        """The tvm.target.Target (a recorded host target is resolved on first use, which imports tvm)."""
        from .target import HostTarget, resolve_target

        if isinstance(self._target, HostTarget):
            self._target = resolve_target(self._target)
        return self._target

    @property
    def key_target(self):
        """What cache keys and schedule lookups read of the target (its text and lanes): a recorded HostTarget
        or the Target, without importing tvm."""
        return self._target

    def schedules_for(self, graph: Graph) -> dict:
        """The schedules this graph was prepared with (the tuning hook's choice), else the given ones."""
        got = self.resolved.get(id(graph))
        return got[0] if got else self.schedules

    def resolve_schedules(self, graph: Graph, ctx: CompileContext | None = None) -> dict:
        """Per op, schedules given to the backend win, then the tuning cache, the shipped defaults and the
        backend's own rule (schedule_choice.py). A failing lookup never fails the compile: the given
        schedules and the rule-based defaults are used."""
        try:
            self.resolved[id(graph)] = tvm_schedules(self, graph, ctx or CompileContext())
        except Exception as e:  # noqa: BLE001 - tuning results are an optimisation, never a requirement
            why = f"    schedules: tuning lookup failed ({type(e).__name__}: {e}); the backend's defaults are used"
            self.resolved[id(graph)] = (self.schedules, [why])
        return self.resolved[id(graph)][0]

    # -- autotune.search.Tunable --------------------------------------------------------------------
    def tunable_nodes(self, graph: Graph) -> list:
        return tunable_nodes(graph, self.key_target)

    def tuning_space(self, node: Node, device) -> list:
        return tvm_space(node, device, self.key_target)

    def tuning_source(self, node: Node, device) -> str:
        return tuning_source(node, self.key_target)

    def accepts_config(self, node: Node, config: dict) -> bool:
        return tvm_schedule(node, config, self.key_target) is not None

    def tuning_kernel(self, node: Node, operands: list, seq_len: int):
        return tuning_kernel(self, node, operands, seq_len)

    def plan(self, graph: Graph) -> list:
        return lower_graph(graph, self.lanes, self.schedules_for(graph))

    def kernel_sources(self, graph: Graph) -> dict:
        """TVMScript of each generated kernel, by the IR value it computes."""
        return {item.node.outputs[0].name: kernel_source(item.spec) for item in self.plan(graph) if item.spec}

    def _hybrid(self, graph: Graph, why: str) -> None:
        """Hybrid mode instead of the whole graph: recorded for explain() and said once, with the reason."""
        self.modes[id(graph)] = ("hybrid", why)
        warnings.warn(f"backend 'tvm': {graph.name} runs in hybrid mode (TVM kernels for the core ops, torch for the "
                      f"rest) because the whole graph cannot be built in TVM: {why}; explain() shows the plan",
                      stacklevel=2)

    def _whole_graph_runner(self, graph: Graph, plan):
        """One Relax VM program for the whole graph (same generated kernels, plus scheduled TVM matmuls);
        None when some op does not lower. Measured on the shared 2-core znver3 host (Sessa layer, D=512,
        H=8, T=2048): under load (load average ~2.5) 208 ms whole-graph vs 374 ms hybrid (alternating
        between torch's and TVM's thread pools is costly when cores are contended); nearly idle, 212 vs
        197 ms (torch's sgemm is faster than the generated matmul). Whole-graph is the default because it
        is the program export_tvm ships, so compile() tests what users deploy."""
        from .relax_lower import graph_to_relax, unsupported_ops

        if not half_model(graph) and any(v.type.dtype.name in HALF for n in graph.nodes for v in n.outputs):
            # mixed precision (torch.autocast: float32 weights cast to bf16 at each linear): torch's bf16 matmuls
            # run the ordinary ops, TVM's float32 kernels the core ops (the Relax program's legalised bf16
            # matmuls were 2-3x slower than the module itself at D = 256, T = 512)
            self.modes[id(graph)] = ("hybrid", "16-bit values inside a float32 graph (mixed precision): torch runs "
                                     "the ordinary ops")
            return None
        schedules = self.schedules_for(graph)
        missing = unsupported_ops(graph, self.lanes, schedules)
        dtypes = {v.type.dtype.name for v in list(graph.inputs) + list(graph.param_values.values())}
        if missing or not dtypes <= {"f32", "f64", "i64", "i32"}:
            why = f"ops without a TVM lowering: {', '.join(missing)}" if missing else f"dtypes {sorted(dtypes)}"
            if missing:
                from .relax_lower import unsupported_nodes

                why = "ops without a TVM lowering: " + "; ".join(unsupported_nodes(graph, self.lanes, schedules))
            self._hybrid(graph, why)
            return None
        import tvm_ffi

        try:
            from .lib_cache import load_or_build

            def compiled():
                import tvm

                stage(f"lowering {graph.name} to Relax")
                mod = graph_to_relax(graph, self.lanes, schedules)[0]
                kernels = len({item.spec for item in plan if item.spec is not None})
                stage(f"building the TVM library: {kernels} distinct generated kernels, {len(mod.functions)} "
                      "functions before legalisation (tvm.compile)")
                try:
                    return tvm.compile(mod, target=self.target)
                except Exception as e:  # noqa: BLE001 - TVM's message names its functions: find our op
                    from .relax_lower import locate_build_failure

                    where = locate_build_failure(graph, lambda m: tvm.compile(m, target=self.target), self.lanes,
                                                 schedules)
                    raise UnsupportedError(f"{'at ' + where + ': ' if where else ''}{type(e).__name__}: "
                                           f"{str(e).strip().splitlines()[-1][:400] if str(e).strip() else ''}") from e

            # a cached library is loaded without `import tvm` (lib_cache.load_vm)
            vm = load_or_build(graph, schedules, self.key_target, self.lanes, compiled)
        except Exception as e:  # a TVM lowering/build limitation: keep running, in hybrid mode, and say why
            if isinstance(e, UnsupportedError) and str(e).startswith("at op "):   # the op found by bisection
                self._hybrid(graph, f"whole-graph TVM build failed {str(e)[:900]}")
                return None
            self._hybrid(graph, f"whole-graph TVM build failed: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[-1][:400] if str(e).strip() else ''}")
            return None
        main = vm["main"]
        names = list(graph.param_values)

        def from_dlpack(t):   # tvm.runtime.from_dlpack, without importing tvm
            return tvm_ffi.from_dlpack(t, require_alignment=ALIGN, require_contiguous=True)

        n_core = sum(1 for item in plan if item.spec is not None)
        stats = self.stats

        def aligned(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if not t.is_contiguous() or t.data_ptr() % ALIGN:
                stats["aligned_copies"] += 1
                out = aligned_empty(tuple(t.shape), t.dtype)
                out.copy_(t)
                t = out
            return t

        # token ids that index an embedding straight from a graph input are range-checked here (inside
        # TVM an out-of-range id is clamped, never read out of bounds; torch would raise)
        position = {v: i for i, v in enumerate(graph.inputs)}
        id_checks = [(position[n.inputs[1]], int(n.inputs[0].type.shape[0])) for n in graph.nodes
                     if n.op == "embedding" and n.inputs[1] in position and isinstance(n.inputs[0].type.shape[0], int)]

        fresh = _computed_outputs(graph)

        def run(inputs, params):
            for x in inputs:
                if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                    raise UnsupportedError(f"backend 'tvm' runs on CPU tensors; got a tensor on {x.device}: "
                                           "move the module and inputs to the CPU, or use backend 'eager'")
            bind_symbols(graph, inputs)
            for i, vocab in id_checks:
                ids = inputs[i]
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                    raise InputError(f"input %{graph.inputs[i].name}: token ids must lie in [0, {vocab}), "
                                     f"got [{int(ids.min())}, {int(ids.max())}]")
            held = [aligned(x) for x in inputs] + [aligned(params[n]) for n in names]
            out = main(*[from_dlpack(t) for t in held])
            outs = [out] if len(graph.outputs) == 1 else list(out)
            stats["kernel_calls"] += n_core
            stats["runs"] += 1
            res = [torch.from_dlpack(o) for o in outs]
            return _unshared(res, held, fresh) if fresh else res

        self.modes[id(graph)] = ("whole graph", "every op lowers to TVM")
        return run

    def _build_kernels(self, plan) -> dict:
        """The built kernel of each distinct spec in the plan, built once each (N identical layers: one layer's
        kernels), counted on a terminal (progress.py: building TVM kernels: i of m)."""
        specs = list(dict.fromkeys(item.spec for item in plan if item.spec is not None))
        built = {}
        for i, spec in enumerate(specs, 1):
            stage("building TVM kernels", i, len(specs))
            built[spec] = build(spec, self.target)
        return built

    def prepare(self, graph: Graph, ctx: CompileContext | None = None):
        empty = empty_operand_sizes(graph)
        if 0 in empty:   # a graph traced at sizes where an operand is empty (T = 1 static, logits[:, :-1]): every
            # call runs on the interpreter, nothing to build
            self.modes[id(graph)] = ("interpreter", "an operand is empty at every size of this trace")
            return lambda inputs, params: run_graph(graph, inputs, params)
        return eager_when_empty(graph, self._prepare(self._kernel_graph(graph), ctx or CompileContext()), empty)

    def _kernel_graph(self, graph: Graph) -> Graph:
        """The graph this backend builds: ``graph``, or where a core op reads bf16/fp16 operands (mixed precision,
        torch.autocast), a copy where it reads them upcast to float32 (passes/widen_core.py: TVM's core kernels
        are float32 and float64)."""
        from ...passes.widen_core import widen_core_ops

        hit = self._widened.get(id(graph))
        if hit is None or hit[0] is not graph:
            hit = self._widened[id(graph)] = (graph, widen_core_ops(graph))
        return hit[1]

    def _prepare(self, graph: Graph, ctx: CompileContext):
        from ...passes.manager import show_ir

        show_ir(graph, "run by the tvm backend (no pass rewrites it: lowered as traced)", self.print_ir)
        self.resolve_schedules(graph, ctx)
        plan = self.plan(graph)
        if self.whole_graph:
            run = self._whole_graph_runner(graph, plan)
            if run is not None:
                run.plan = plan
                run.stats = self.stats
                return run
        else:
            self.modes[id(graph)] = ("hybrid", "whole_graph=False")
        kernels = self._build_kernels(plan)
        calls = {item.node: KernelCall(kernels[item.spec], self.stats) for item in plan if item.spec is not None}
        stats = self.stats

        def run(inputs, params):
            for x in inputs:
                if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                    raise UnsupportedError(f"backend 'tvm' runs on CPU tensors; got a tensor on {x.device}: "
                                           "move the module and inputs to the CPU, or use backend 'eager'")
            binding = bind_symbols(graph, inputs)
            env: dict = {}
            for v, x in zip(graph.inputs, inputs):
                env[v] = x
            for name, v in graph.param_values.items():
                env[v] = params[name]
            with torch.no_grad():
                for node in graph.nodes:
                    call = calls.get(node)
                    if call is None:
                        run_node(node, env, binding, torch.device("cpu"))
                        continue
                    operands = [env[x] if isinstance(x, Value) else resolve(x, binding) for x in node.inputs]
                    if node.op == "attention" and not node.attrs.get("rope", False):
                        operands = operands[:3] + operands[4:5]   # q, k, v (and the key-padding mask)
                    extra = {"upper": node.attrs["upper"]} if node.op == "tri_solve" else {}
                    env[node.outputs[0]] = call(*operands, **extra)
            stats["runs"] += 1
            return [env[v] for v in graph.outputs]

        run.plan = plan
        run.stats = stats
        return run

    def prepare_training(self, graph: Graph, ctx: CompileContext | None = None):
        """The runner for calls that need gradients (backends/training.py): each core op's forward is its TVM
        kernel (the same generated kernel as the forward-only runner), its backward a generated TVM backward
        kernel where there is one (attention, training.py here), else the blocked torch of
        semantics/backward.py; the ordinary ops run through torch, which differentiates them."""
        from ...passes.manager import show_ir
        from ..training import training_runner
        from . import training as tvm_training   # also registers the backward kernels

        graph = self._kernel_graph(graph)
        show_ir(graph, "run by the tvm backend for calls that need gradients (core ops: forward and backward kernels)",
                self.print_ir)
        if id(graph) not in self.resolved:
            self.resolve_schedules(graph, ctx)
        kernels = {}
        plan = self.plan(graph)
        built = self._build_kernels([item for item in plan if item.spec is not None and item.node.op != "attention"])
        for item in plan:
            if item.spec is None:
                continue
            node = item.node
            if node.op == "attention":
                # the forward that also returns its lse for the backward kernel (with a key-padding mask: the
                # masked variants of both, which read the mask)
                kernels[node] = tvm_training.attention_forward_kernel(item.spec, self.target, self.stats)
                continue
            call = KernelCall(built[item.spec], self.stats)
            if node.op == "tri_solve":
                kernels[node] = lambda A, b, call=call, upper=node.attrs["upper"]: call(A, b, upper=upper)
            else:
                kernels[node] = call
        with_kernels = training_runner(graph, kernels, self.name, self.stats, contiguous=True)
        on_torch = training_runner(graph, {}, self.name, self.stats)  # empty inputs: TVM needs one row

        def run(inputs, params):
            for x in inputs:
                if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                    raise UnsupportedError(f"backend 'tvm' runs on CPU tensors; got a tensor on {x.device}: "
                                           "move the module and inputs to the CPU, or use backend 'eager'")
            empty = any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in inputs)
            return (on_torch if empty else with_kernels)(inputs, params)
        return run

    def describe(self, graph: Graph) -> str:
        graph = self._kernel_graph(graph)
        plan = self.plan(graph)
        tvm_ops = collections.Counter(item.node.op for item in plan if item.spec is not None)
        torch_ops = collections.Counter(item.node.op for item in plan if item.spec is None)
        lines = [f"backend tvm: target {self.target.attrs.get('mcpu', '?')} "
                 f"({self.target.attrs.get('mtriple', '')}), {self._threads()} runtime threads, CPU tensors only "
                 "(gradients: see autograd below)"]
        from .omp_launch import status as pool_status
        lines.append(f"    {pool_status()}")
        lines.append("    TVM kernels (generated schedules; batch and sequence length symbolic, built once): " +
                     (", ".join(f"{op} x{c}" for op, c in sorted(tvm_ops.items())) or "none"))
        for item in plan:
            if item.spec is not None:
                lines.append(f"      {item.node.outputs[0].name}: {item.spec.describe()}")
                if item.node.op == "attention" and item.spec.params.get("key_padding", False):
                    lines.append("        with a key-padding mask: a call that needs gradients runs its masked "
                                 "forward with lse (attention_lse) and the masked backward kernel (attention_bwd), "
                                 "both reading the mask")
            elif item.reason:
                lines.append(f"      {item.node.op} %{item.node.outputs[0].name} runs through torch: {item.reason}")
        lines += self.resolved.get(id(graph), (None, []))[1]
        mode, why = self.modes.get(id(graph), ("hybrid" if not self.whole_graph else "not prepared yet", ""))
        if mode == "whole graph":
            lines.append(f"    mode: whole graph in TVM (one Relax VM program; {why}): the other ops "
                         f"({', '.join(f'{op} x{c}' for op, c in sorted(torch_ops.items()))}) are Relax ops "
                         "legalised to TIR; linear layers are generated TVM matmul kernels (kernels/linear.py), "
                         "not BLAS")
            return "\n".join(lines)
        lines.append(f"    mode: {mode}" + (f" ({why})" if why else ""))
        matmuls = sum(torch_ops[o] for o in ("linear", "matmul", "einsum"))
        lines.append("    torch (eager interpreter): " +
                     (", ".join(f"{op} x{c}" for op, c in sorted(torch_ops.items())) or "none"))
        lines.append(f"    matmuls: {matmuls} linear/matmul/einsum ops run through torch (its BLAS), not TVM; "
                     "the feedback and attention kernels do their own tile products in TVM")
        lines.append("    operands reach TVM zero-copy via DLPack; non-contiguous or misaligned ones are copied to "
                     "64-byte aligned buffers first (counted in the runner's stats['aligned_copies'])")
        return "\n".join(lines)

    @staticmethod
    def _threads() -> int:
        from .target import configure_threads
        return configure_threads()
