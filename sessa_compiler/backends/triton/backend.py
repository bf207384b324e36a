"""The Triton backend: the triton pass pipeline, then generated kernels for the core ops and torch
(the eager backend's implementations) for every other op.

Kernels are generated per node and per input dtypes on first use and loaded through the shared
compile cache; neither depends on B or T, so a new sequence length reuses them. CPU tensors run
the same kernels in Triton's interpreter (that is how CI tests them); CUDA tensors run compiled.
float64 graphs run the blocked ops with their torch implementations (Triton's fp64 dot has no
tensor-core path and the interpreter is the only place it would matter).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys

import torch

from ...ir.dtypes import from_torch
from ...errors import UnsupportedError
from ...ir.graph import Graph, Node, Value
from ...ir.ops import CORE, OPS
from ...passes.pipeline import run_pipeline
from ..base import Backend, CompileContext
from ..eager import bind_symbols, call_widened, run_node, widen, widened
from .attention import generate_attention, launch_attention
from .codegen import KERNEL_CACHE, KERNEL_DTYPES, KernelSource
from .feedback import generate_diag_inverse, generate_lse, generate_solve, launch_diag_inverse, launch_lse, launch_solve
from .feedback_online import generate_online, launch_online
from .fused import fused_layout, generate_fused, launch_fused
from .prepare import triton_runner, triton_space, tunable_nodes, tuning_kernel, tuning_source
from .scan import generate_scan, launch_scan
from .tri_solve import generate_tri_solve, launch_tri_solve

GENERATOR_KNOBS = {"attention": ("block_m", "block_n"), "feedback_chunked": ("outer_chunk",)}   # tunable tiles


def _operand_names(node: Node) -> list:
    if node.op == "fused":
        return [f"in{i}" for i in range(len(node.inputs))]
    return {"attention": ["q", "k", "v", "inv_freq", "mask"], "feedback_lse": ["q_b", "k_b"],
            "feedback_diag_inverse": ["q_b", "k_b", "gamma", "lse"],
            "feedback_chunked": ["f", "q_b", "k_b", "gamma", "lse", "dinv"],
            "scan_chunked": ["u", "delta", "A", "B", "C", "D"], "tri_solve": ["A", "b"]}[node.op]


def _generator(node: Node):
    if node.op == "attention":
        return generate_attention if node.attrs["causal"] else None
    return {"feedback_lse": generate_lse, "feedback_diag_inverse": generate_diag_inverse,
            "feedback_chunked": generate_online, "scan_chunked": generate_scan, "fused": generate_fused,
            "tri_solve": generate_tri_solve}.get(node.op)


def _unit_stride(x):
    return x if not isinstance(x, torch.Tensor) or x.stride(-1) == 1 else x.contiguous()


def _launch(node: Node, kernel, args: list):
    if node.op == "fused":  # reads row-strided views (split, reshape) in place
        return launch_fused(kernel, node, args)
    args = [_unit_stride(a) for a in args]
    if node.op == "attention":
        return launch_attention(kernel, *args[:3], args[3] if node.attrs.get("rope") else None,
                                mask=args[4] if node.attrs.get("key_padding") else None)
    if node.op == "feedback_lse":
        return launch_lse(kernel, *args)
    if node.op == "feedback_diag_inverse":
        return launch_diag_inverse(kernel, *args, chunk_size=node.attrs["chunk_size"])
    if node.op == "feedback_chunked":
        if kernel.source.name == "feedback_solve_online":
            return launch_online(kernel, *args[:4])
        return launch_solve(kernel, *args)
    if node.op == "tri_solve":
        return launch_tri_solve(kernel, *args)
    return launch_scan(kernel, *args)


def one_pass_feedback(graph: Graph) -> dict:
    """feedback_chunked node -> (feedback_lse node, feedback_diag_inverse node) where the lse is read only by those
    two and the inverses only by the solve, and the lse is not a graph output: the one-pass kernels
    (feedback_online.py) then make the lse themselves and need no inverse pass."""
    users: dict = collections.defaultdict(list)
    for n in graph.nodes:
        for x in n.inputs:
            users[x].append(n)
    outs = set(graph.outputs)
    found = {}
    for n in graph.nodes:
        if n.op != "feedback_chunked":
            continue
        lse_v, dinv_v = n.inputs[4], n.inputs[5]
        lse_n, dinv_n = lse_v.producer, dinv_v.producer
        if (lse_n is None or dinv_n is None or lse_n.op != "feedback_lse" or dinv_n.op != "feedback_diag_inverse"
                or lse_v in outs or dinv_v in outs or set(users[lse_v]) != {dinv_n, n} or users[dinv_v] != [n]):
            continue
        found[n] = (lse_n, dinv_n)
    return found


class TritonProgram:
    """One prepared graph: the rewritten IR, the pass records, and its kernels per (node, dtypes, mode)."""

    def __init__(self, graph: Graph, passes, interpret: bool | None, scan_strategy: str = "sequential",
                 feedback_one_pass: bool = True):
        self.graph = graph
        self.scan_strategy = scan_strategy
        self.passes = passes
        self.interpret = interpret
        self.kernels: dict = {}
        # feedback_chunked -> (its feedback_lse, feedback_diag_inverse) when nothing else reads them: the one-pass
        # kernels compute both on the way (one_pass_feedback), so those two nodes launch nothing
        self.one_pass = one_pass_feedback(graph) if feedback_one_pass else {}
        folded = {n for pair in self.one_pass.values() for n in pair}
        self.kernel_nodes = [n for n in graph.nodes if _generator(n) is not None and n not in folded]
        self.node_configs: dict = {}    # node -> {num_warps, num_stages, tiles}: tuned, shipped default, or none
        self.config_report: list = []   # where each op's config came from (for describe / explain)

    def source_for(self, node: Node, dtypes: dict, interpret: bool) -> KernelSource:
        config = self.node_configs.get(node) or {}
        knobs = {k: v for k, v in config.items() if k in GENERATOR_KNOBS.get(node.op, ())}   # tiles: in the source
        launch = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
        if node.op == "scan_chunked":
            src = generate_scan(node, dtypes, interpret, strategy=self.scan_strategy)
        elif node.op == "feedback_chunked" and node not in self.one_pass:   # lse / inverses from their own kernels
            src = generate_solve(node, dtypes, interpret, **knobs)
        else:
            src = _generator(node)(node, dtypes, interpret, **knobs)
        return dataclasses.replace(src, **launch) if launch else src

    def kernel(self, node: Node, dtypes: dict, interpret: bool):
        key = (id(node), tuple(sorted(dtypes.items())), interpret)
        k = self.kernels.get(key)
        if k is None:
            k = KERNEL_CACHE.load(self.source_for(node, dtypes, interpret), interpret)
            self.kernels[key] = k
        return k

    def declared_dtypes(self, node: Node) -> dict:
        return {name: v.type.dtype.name for name, v in zip(_operand_names(node), node.inputs)
                if isinstance(v, Value) and name != "mask"}

    def run(self, inputs, params):
        graph = self.graph
        binding = bind_symbols(graph, inputs)
        device = inputs[0].device if inputs else torch.device("cpu")
        interpret = self.interpret if self.interpret is not None else device.type != "cuda"
        if interpret and not interpreter_ready():
            raise UnsupportedError(
                f"backend 'triton' got {device.type} tensors, which run in Triton's interpreter, but triton was "
                "imported with the interpreter off: set TRITON_INTERPRET=1 before triton is first imported, "
                "move the model and inputs to a CUDA device, or use backend='eager'")
        env: dict = {}
        for v, x in zip(graph.inputs, inputs):
            env[v] = x
        for name, v in graph.param_values.items():
            env[v] = params[name]
        kernel_nodes = set(self.kernel_nodes)
        folded = {n: chunked for chunked, pair in self.one_pass.items() for n in pair}
        for node in graph.nodes:
            if node in folded:   # run with its feedback_chunked node (below)
                continue
            if node in self.one_pass:
                args = [env[x] for x in node.inputs[:4]]
                dtypes = {name: from_torch(a.dtype).name for name, a in zip(_operand_names(node), args)}
                lse_node, dinv_node = self.one_pass[node]
                if all(dt in KERNEL_DTYPES for dt in dtypes.values()):
                    s, lse = _launch(node, self.kernel(node, dtypes, interpret), args)
                    env[node.output] = s
                    env[lse_node.output] = lse
                else:
                    for n in (lse_node, dinv_node, node):
                        run_node(n, env, binding, device)
                continue
            dtypes = None
            if node in kernel_nodes:
                args = [env[x] if isinstance(x, Value) else x for x in node.inputs]
                dtypes = {name: from_torch(a.dtype).name for name, a in zip(_operand_names(node), args)
                          if a is not None and name != "mask"}   # the mask is read as int32 (any dtype)
            if dtypes and all(dt in KERNEL_DTYPES for dt in dtypes.values()):
                out = _launch(node, self.kernel(node, dtypes, interpret), args)
                env.update(zip(node.outputs, out if len(node.outputs) > 1 else (out,)))
            else:
                run_node(node, env, binding, device)
        return [env[v] for v in graph.outputs]


class TritonBackend(Backend):
    """``get_backend("triton", print_ir=..., feedback_chunk_size=..., scan_chunk_size=..., scan_strategy=...,
    interpret=..., feedback_one_pass=...)``: chunk sizes default to the passes' cost models; ``interpret``
    defaults to "interpret CPU tensors, compile for CUDA tensors"."""

    name = "triton"
    differentiable = False  # autograd through its kernels: prepare_training (backends/training.py)
    training_lse_from_forward = True

    def __init__(self, *, print_ir: bool | None = None, feedback_chunk_size: int | None = None,
                 scan_chunk_size: int | None = None, scan_strategy: str = "sequential",
                 interpret: bool | None = None, fuse: bool = True, half_in_float32: bool = False,
                 cuda_graphs: bool = True, feedback_one_pass: bool = True):
        self.print_ir = print_ir
        # the feedback forward in one pass per outer chunk (feedback_online.py); False: the lse-first kernels
        # (an lse pass, an inverse pass, then the solve; feedback.py)
        self.feedback_one_pass = feedback_one_pass
        # CUDA tensors without autograd: the second call at a shape records its launches into a CUDA graph and
        # later calls replay it (cuda_graphs.py); False launches every kernel from Python on every call
        self.cuda_graphs = cuda_graphs
        # bf16/fp16 graphs: False keeps half storage between kernels (speed); True computes the graph in
        # float32 and rounds the outputs once, as the eager backend does (docs/spec.md, half precision)
        self.half_in_float32 = half_in_float32
        self.widened: dict = {}   # id(graph) -> its float32 copy, when half_in_float32 widened it
        self.options = {"feedback_chunk_size": feedback_chunk_size, "scan_chunk_size": scan_chunk_size, "fuse": fuse}
        self.interpret = interpret
        self.scan_strategy = scan_strategy
        self.programs: dict = {}
        self.stats: collections.Counter = collections.Counter()   # training steps (backends/training.py)
        from . import training  # noqa: F401  (registers the backward kernels: explain() lists them)

    def prepare(self, graph: Graph, ctx: CompileContext | None = None):
        """One program per shape class and device, configured from the tuning cache, then the shipped
        defaults, then the cost model (prepare.py); each calls build_program below. With half_in_float32
        a bf16/fp16 graph runs as its float32 copy, its outputs rounded once."""
        ctx = ctx or CompileContext()
        wide = widened(graph) if self.half_in_float32 else None
        if wide is None:
            return triton_runner(self, graph, ctx)
        self.widened[id(graph)] = wide
        wide_ctx = dataclasses.replace(ctx, example_inputs=tuple(widen(x) for x in ctx.example_inputs))
        run_wide = triton_runner(self, wide, wide_ctx)

        def run(inputs, params):
            return call_widened(graph, run_wide, inputs, params)
        run.programs = run_wide.programs
        return run

    def prepare_training(self, graph: Graph, ctx: CompileContext | None = None):
        """The runner for calls that need gradients (backends/training.py): each core op's forward is its Triton
        kernel (attention's returns its row log-sum-exps, the feedback's its lse, both saved for the backward),
        its backward the Triton backward kernels (backends/triton/training.py registers them); the ordinary ops
        run through torch, which differentiates them. Cases without kernels (float64, non-causal attention)
        take the blocked torch forward and semantics.backward's blocked backward, never a dense reference.
        The graph runs as traced (the triton pipeline's rewrites are for the forward-only program)."""
        from ...passes.manager import show_ir
        from ..training import training_runner
        from .training import FORWARDS

        stats = self.stats
        wide = widened(graph) if self.half_in_float32 else None
        target = wide if wide is not None else graph
        show_ir(target, "run by the triton backend for calls that need gradients (as traced; core ops: forward and "
                "backward kernels)", self.print_ir)
        constant = (bool, int, float, str, type(None))   # symbolic attributes: the runner's torch forward
        kernels = {node: FORWARDS[node.op](node.attrs, stats) for node in target.nodes if node.op in FORWARDS
                   and all(isinstance(a, constant) for a in node.attrs.values())}
        runner = training_runner(target, kernels, self.name, stats)
        interpret_option = self.interpret

        def run(inputs, params):
            device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
            interpret = interpret_option if interpret_option is not None else device.type != "cuda"
            if interpret and not interpreter_ready():
                raise UnsupportedError(
                    f"backend 'triton' got {device.type} tensors, which run in Triton's interpreter, but triton was "
                    "imported with the interpreter off: set TRITON_INTERPRET=1 before triton is first imported, "
                    "move the model and inputs to a CUDA device, or use backend='eager'")
            if wide is not None:
                return call_widened(graph, runner, inputs, params)
            return runner(inputs, params)
        return run

    # -- autotune.search.Tunable --------------------------------------------------------------------
    def tunable_nodes(self, graph: Graph) -> list:
        return tunable_nodes(graph)

    def tuning_space(self, node: Node, device) -> list:
        return triton_space(node, device)

    def tuning_source(self, node: Node, device) -> str:
        return tuning_source(self, node, device)

    def accepts_config(self, node: Node, config: dict) -> bool:
        return True  # the shipped table is validated against the knobs' values (autotune/defaults.py)

    def tuning_kernel(self, node: Node, operands: list, seq_len: int):
        return tuning_kernel(self, node, operands, seq_len)

    def build_program(self, graph: Graph, options: dict | None = None) -> TritonProgram:
        """One program; ``options`` (pipeline chunk sizes, scan_strategy) replace the backend's own."""
        opts = {**self.options, **(options or {})}
        strategy = opts.pop("scan_strategy", self.scan_strategy)
        rewritten = graph.clone()
        pm = run_pipeline(rewritten, "triton", print_ir=self.print_ir, **opts)
        program = TritonProgram(rewritten, pm, self.interpret, strategy, feedback_one_pass=self.feedback_one_pass)
        self.programs[id(graph)] = program
        return program

    def program(self, graph: Graph) -> TritonProgram:
        graph = self.widened.get(id(graph), graph)
        if id(graph) not in self.programs:
            self.prepare(graph)
        return self.programs[id(graph)]

    def kernel_sources(self, graph: Graph, interpret: bool = False) -> dict:
        """The generated source of every kernel (at the graph's declared dtypes), by IR value name."""
        prog = self.program(graph)
        out = {}
        for n in prog.kernel_nodes:
            dtypes = prog.declared_dtypes(n)
            if n.op != "fused" and all(dt in KERNEL_DTYPES for dt in dtypes.values()):
                out[n.output.name] = prog.source_for(n, dtypes, interpret).full_source
        return out

    def fused_kernel_sources(self, graph: Graph, interpret: bool = False) -> dict:
        """The generated source of every fusion group's kernel, by ``group<k>``."""
        prog = self.program(graph)
        return {f"group{n.attrs['group']}": prog.source_for(n, prog.declared_dtypes(n), interpret).source
                for n in prog.kernel_nodes if n.op == "fused" and _fused_has_kernel(n)}

    def dump_kernels(self, graph: Graph, directory: str) -> list:
        os.makedirs(directory, exist_ok=True)
        paths = []
        for name, src in {**self.kernel_sources(graph), **self.fused_kernel_sources(graph)}.items():
            path = os.path.join(directory, f"{name}.py")
            with open(path, "w") as fh:
                fh.write(src)
            paths.append(path)
        return paths

    def describe(self, graph: Graph) -> str:
        prog = self.program(graph)
        g = prog.graph
        lines = ["backend triton: pipeline " + " -> ".join(r.pass_ for r in prog.passes.records)]
        if id(graph) in self.widened:
            lines.append("  half_in_float32: bf16/fp16 values are computed in float32 and the outputs rounded once")
        for r in prog.passes.records:
            lines += [f"    {r.name}: {d}" for d in r.decisions]
        lines.append(f"  kernels ({len(prog.kernel_nodes)}; generated per dtype on first call, cached per "
                     "specialisation, not per B or T):")
        for n in prog.kernel_nodes:
            if n.op == "fused":
                continue  # listed with the fusion groups below
            dtypes = prog.declared_dtypes(n)
            if not all(dt in KERNEL_DTYPES for dt in dtypes.values()):
                lines.append(f"    %{n.output.name} = {n.op}: runs in torch ({dtypes} has no kernel)")
                continue
            src = prog.source_for(n, dtypes, interpret=False)
            spec = ", ".join(f"{k}={v}" for k, v in src.specialisation.items() if k != "scale")
            tun = ", ".join(f"{k}={v}" for k, v in src.tunables.items() if not k.startswith("dot_"))
            lines.append(f"    {src.name:<22} <- %{n.output.name} = {n.op}  [{spec}] {{{tun}}}")
            if n.op == "attention" and n.attrs.get("key_padding", False):
                if n.attrs.get("empty_rows", "mean") == "mean":
                    lines.append("      (with a key-padding mask: a call that needs gradients runs this kernel with its "
                                 "lse and the masked backward kernels attention_bwd_dkdv / attention_bwd_dq, which "
                                 "read the mask)")
                else:
                    lines.append("      (with a key-padding mask whose rows without a visible key are NaN: this kernel "
                                 "without gradients; a call that needs gradients runs the blocked torch forward and "
                                 "backward of semantics/backward.py)")
        for chunked, pair in prog.one_pass.items():
            lines.append(f"    (%{pair[0].output.name} = feedback_lse and %{pair[1].output.name} = feedback_diag_inverse: "
                         f"made on the way by the one-pass kernels of %{chunked.output.name})")
        lines.extend(prog.config_report)
        folded = {n for pair in prog.one_pass.values() for n in pair}
        torch_ops = collections.Counter(n.op for n in g.nodes if n not in set(prog.kernel_nodes) and n not in folded)
        core_left = [op for op in torch_ops if OPS[op].kind == CORE]
        lines += describe_fusion(prog)
        lines.append("  torch ops between kernels: " +
                     ", ".join(f"{op} x{c}" for op, c in sorted(torch_ops.items())))
        if core_left:
            lines.append("  core ops without a kernel here (torch): " + ", ".join(sorted(core_left)))
        return "\n".join(lines)


def check_triton() -> None:
    """Import triton, turning its interpreter on first when this machine has no GPU.

    Triton reads TRITON_INTERPRET when triton.language is imported (its library functions are
    decorated then), so the choice must be made before the first import: without CUDA the
    interpreter is the only way to run a Triton kernel at all.
    """
    if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UnsupportedError("backend 'triton' needs the triton package: pip install 'sessa-compiler[triton]' "
                               f"(import failed: {e})") from e


def interpreter_ready() -> bool:
    """True when triton.language was imported with the interpreter on (needed for CPU tensors)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


def _fused_has_kernel(node: Node) -> bool:
    body = fused_layout(node)[0]
    return all(v.type.dtype.name in KERNEL_DTYPES for v in list(body.inputs) + list(body.outputs))


def describe_fusion(prog: TritonProgram) -> list:
    """The fusion groups: member ops, kernel, bytes saved (symbolic, per call)."""
    fused = [n for n in prog.graph.nodes if n.op == "fused"]
    if not fused:
        return ["  fusion groups: none"]
    lines = [f"  fusion groups ({len(fused)}; one kernel each, bytes saved per call vs one torch op at a time):"]
    for n in fused:
        body = fused_layout(n)[0]
        members = ", ".join(f"{m.op} %{m.outputs[0].name}" for m in body.nodes)
        outs = ", ".join("%" + v.name for v in n.outputs)
        if _fused_has_kernel(n):
            src = prog.source_for(n, prog.declared_dtypes(n), interpret=False)
            kernel = f"{src.name} {{BLOCK_R={src.tunables['BLOCK_R']}, BLOCK_N={src.tunables['BLOCK_N']}}}"
        else:
            kernel = "torch (no fused kernel for these dtypes)"
        lines.append(f"    group {n.attrs['group']} ({n.attrs['kernel']}) -> {outs}: {members}; "
                     f"saves {n.attrs.get('bytes_saved', '?')} bytes; kernel {kernel}")
    return lines
