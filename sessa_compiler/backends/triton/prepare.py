"""The Triton backend's preparation: which config each kernel runs with, and its tuning space.

At compile time the backend resolves each op's config per *shape class* (sequence length bucket) and
device: the tuning cache first, then the shipped defaults (defaults.json, per device class), then its
cost model; options given explicitly to ``compile`` win over all three (``autotune.search.resolve_node``
does the lookup). The resolution is a few file reads: a warm compile in a new process runs no tuning.
``triton_runner`` is ``TritonBackend.prepare``: one program per distinct resolved config.

Triton knobs per op: ``chunk_size`` (feedback: the chunked solve's block; scan: the associative
strategy's chunk), ``strategy`` (scan: sequential or associative), ``num_warps``, ``num_stages``.
The generators fix block sizes from the IR shapes (not searched yet). On CPU the kernels run in
Triton's interpreter, timed with a CPU timer, over a reduced space (num_warps/num_stages do not
change what the interpreter does, and the associative scan is too slow to time there).

The tuning cache key hashes the op's generated kernel source (``tuning_source``): the kernels the
backend generates for the op alone, at its cost-model config and declared dtypes.
"""
from __future__ import annotations

import collections
import json
import threading
import time

import torch

from ...autotune.cache import shape_class
from ...autotune.search import core_tunable_nodes, device_label, kernel_name, op_signature, resolve_node, single_op_graph
from ...autotune.tuner import TunableKernel
from ...errors import SessaCompilerError
from ...ir.graph import Graph, Value
from ..base import CompileContext
from ..shapes import sequence_length
from .codegen import KERNEL_DTYPES


def tunable_nodes(graph: Graph) -> list:
    return core_tunable_nodes(graph)


def triton_space(node, device: torch.device) -> list:
    """Candidate configs for one op, the cost-model-like choice first (so a tiny budget still verifies it)."""
    gpu = torch.device(device).type == "cuda"
    warps = ((4, 8), (3, 2)) if gpu else ((4,), (2,))
    if node.op == "feedback":
        chunks = (32, 64, 16) if gpu else (16, 32, 64)
        space = [{"chunk_size": c, "num_warps": w, "num_stages": s} for c in chunks for w in warps[0] for s in warps[1]]
        if gpu:  # rows per outer chunk of the two-level solve (the interpreter uses two inner blocks)
            space = [{**c, "outer_chunk": o} for o in (256, 128, 512) for c in space]
        return space
    if node.op == "scan":
        space = [{"strategy": "sequential", "num_warps": w, "num_stages": s} for w in warps[0] for s in warps[1]]
        if gpu:  # the associative scan runs element by element in the interpreter: GPU only
            space += [{"strategy": "associative", "chunk_size": c, "num_warps": w, "num_stages": 2}
                      for c in (16, 32, 64) for w in warps[0]]
        return space
    if node.op == "attention":
        space = [{"num_warps": w, "num_stages": s} for w in (8, 4) for s in warps[1]]  # two on CPU too: a real search
        if gpu:  # query and key tile rows
            space = [{**c, "block_m": m, "block_n": n} for m in (128, 64) for n in (64, 128) for c in space]
        return space
    raise SessaCompilerError(f"op '{node.op}' has no tunables")


def tuning_source(backend, node, device) -> str:
    """The generated source of every kernel the backend runs for this op alone (its cost-model config, the
    declared dtypes; interpreter or compiled source as the device runs it)."""
    interpret = torch.device(device).type != "cuda"
    signature = json.dumps(op_signature(node), sort_keys=True)  # fixes the one-op graph, hence its kernels
    key = (signature, interpret)
    if key not in _SOURCES:
        _SOURCES[key] = _generate_source(type(backend), signature, node, interpret)
    return _SOURCES[key]


_SOURCES: dict = {}  # (op signature, interpret) -> the text tuning_source returns: generated once per process


def _generate_source(backend_class, signature: str, node, interpret: bool) -> str:
    mini, _ = single_op_graph(node)
    prog = backend_class(interpret=interpret).build_program(mini, {})
    parts = []
    for n in prog.kernel_nodes:
        dtypes = prog.declared_dtypes(n)
        if all(dt in KERNEL_DTYPES for dt in dtypes.values()):
            parts.append(prog.source_for(n, dtypes, interpret).full_source)
        else:  # this op runs its torch implementation at these dtypes: there is no kernel source
            parts.append(f"# {n.op} %{n.outputs[0].name}: torch at {dtypes}")
    if not parts:
        raise SessaCompilerError(f"{kernel_name(node)}: the triton backend generates no kernel for it")
    return signature + "\n" + "\n\n".join(parts)


def triton_plan(backend, graph: Graph, seq_len: int, device) -> tuple:
    """Pipeline options and per-op launch configs for one shape class; and a report of where each came from."""
    given = {k: v for k, v in backend.options.items() if v is not None}
    per_node, notes = {}, []
    chunks = collections.defaultdict(list)
    for node in tunable_nodes(graph):
        cfg, where = resolve_node(backend, node, seq_len, device)
        per_node[node.output.name] = (cfg or {}, where)
        if cfg:
            if node.op == "feedback" and "chunk_size" in cfg:
                chunks["feedback_chunk_size"].append(cfg["chunk_size"])
            if node.op == "scan":
                chunks["scan_strategy"].append(cfg.get("strategy", "sequential"))
                if "chunk_size" in cfg:
                    chunks["scan_chunk_size"].append(cfg["chunk_size"])
    options = {}
    for opt, values in chunks.items():
        value, _ = collections.Counter(values).most_common(1)[0]
        options[opt] = value
        if len(set(values)) > 1:  # the chunking passes take one value per graph
            notes.append(f"{opt}: ops disagree ({sorted(set(values))}); using {value} for all")
    for opt, v in given.items():
        if opt in ("feedback_chunk_size", "scan_chunk_size"):
            options[opt] = v
    if backend.scan_strategy != "sequential":  # asked for explicitly (sequential is the backend's default)
        options["scan_strategy"] = backend.scan_strategy
    options.setdefault("scan_strategy", backend.scan_strategy)
    return options, per_node, notes


def _origin(node) -> str:
    """The traced op a rewritten kernel node came from (chunking keeps the op's output name on the last node)."""
    return node.outputs[0].name if len(node.outputs) == 1 else None


def attach_launch_configs(program, per_node: dict) -> None:
    """Launch configs (num_warps, num_stages, block sizes) by rewritten node: feedback's lse and
    diag-inverse nodes follow their solve."""
    configs = {}
    for n in program.graph.nodes:
        name = _origin(n)
        if name is not None and name in per_node:
            cfg = {k: v for k, v in per_node[name][0].items()
                   if k in ("num_warps", "num_stages", "block_m", "block_n", "outer_chunk")}
            configs[n] = cfg
            if n.op == "feedback_chunked":
                for x in n.inputs[4:6]:
                    if isinstance(x, Value) and x.producer is not None:
                        configs[x.producer] = cfg
    program.node_configs = configs


def describe_plan(options: dict, per_node: dict, notes: list, seq_len: int, device) -> list:
    lines = [(f"  kernel configs for {shape_class(seq_len)} on {device_label(device)} "
              "(tuning cache, then shipped defaults, then cost model; options given to compile win):")]
    for name, (cfg, where) in per_node.items():
        text = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())) or "-"
        lines.append(f"    %{name}: {text}  [{where}]")
    lines.append("    pipeline options: " + ", ".join(f"{k}={v}" for k, v in sorted(options.items())))
    lines += [f"    note: {n}" for n in notes]
    return lines


def triton_runner(backend, graph: Graph, ctx: CompileContext):
    """The Triton backend's prepare(): one program per distinct resolved config (shape class x device)."""
    programs: dict = {}      # (shape class, device) -> program
    by_plan: dict = {}       # plan fingerprint -> program (same configs: same program, no new kernels)
    lock = threading.Lock()

    def program_for(seq_len: int, device):
        device = torch.device(device)
        key = (shape_class(seq_len), str(device))
        prog = programs.get(key)
        if prog is not None:
            return prog
        with lock:
            options, per_node, notes = triton_plan(backend, graph, seq_len, device)
            fp = json.dumps([options, {k: v[0] for k, v in per_node.items()}], sort_keys=True, default=str)
            prog = by_plan.get(fp)
            if prog is None:
                prog = backend.build_program(graph, options)
                ctx.pass_records.extend(prog.passes.records)
                attach_launch_configs(prog, per_node)
                by_plan[fp] = prog
            prog.config_report = describe_plan(options, per_node, notes, seq_len, device)
            programs[key] = prog
            backend.programs[id(graph)] = prog
            return prog

    if ctx.example_inputs:
        program_for(sequence_length(graph, ctx.example_inputs), ctx.device)
    else:
        program_for(1024, "cuda" if torch.cuda.is_available() else "cpu")  # for describe(); calls pick their own

    graphed: dict = {}   # id(program) -> GraphedCalls (CUDA graphs: the second call at a shape records, then replays)

    def run(inputs, params):
        device = inputs[0].device if inputs else torch.device("cpu")
        prog = program_for(sequence_length(graph, inputs), device)
        if not getattr(backend, "cuda_graphs", False) or device.type != "cuda":
            return prog.run(inputs, params)
        calls = graphed.get(id(prog))
        if calls is None:
            from .cuda_graphs import GraphedCalls

            calls = graphed.setdefault(id(prog), GraphedCalls(prog.run))
        return calls(inputs, params)

    run.programs = programs
    run.graphed = graphed
    return run


def _cuda_timer(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def tuning_kernel(backend, node, operands: list, seq_len: int) -> TunableKernel:
    """Each candidate config builds the op's program on a one-op graph; the reference is the eager backend."""
    from ...ir.dtypes import to_torch
    from ...tolerance import TOLERANCE
    from ..eager import run_graph

    mini, _ = single_op_graph(node)
    device = operands[0].device
    tb = type(backend)(interpret=backend.interpret, feedback_one_pass=getattr(backend, "feedback_one_pass", True))
    programs: dict = {}

    def run(config):
        key = json.dumps(config, sort_keys=True)
        prog = programs.get(key)
        if prog is None:
            options = {"scan_strategy": config.get("strategy", "sequential")}
            if node.op == "feedback":
                options["feedback_chunk_size"] = config["chunk_size"]
            elif node.op == "scan" and "chunk_size" in config:
                options["scan_chunk_size"] = config["chunk_size"]
            prog = tb.build_program(mini, options)
            attach_launch_configs(prog, {node.output.name: (config, "candidate")})
            programs[key] = prog
        with torch.no_grad():
            return prog.run(operands, {})[0]

    def reference():
        with torch.no_grad():
            return run_graph(mini, operands, {})[0]

    tol = TOLERANCE.get(to_torch(node.outputs[0].type.dtype), 1e-4)
    return TunableKernel(kernel_name(node), "triton", tuning_source(backend, node, device), triton_space(node, device), run,
                         reference, seq_len=seq_len, tolerance=tol, device=device,
                         timer=_cuda_timer if device.type == "cuda" else None)
