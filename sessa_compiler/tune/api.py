"""``sessa_compiler.tune(...)`` / ``compile(..., autotune=True)``, and the configs a backend uses.

Tuning is per core op of the traced graph (``feedback``, ``scan``, ``attention``): each becomes a
one-op graph whose operands are the values the eager backend computes for the example inputs; every
candidate config runs that graph through the backend and must match the eager backend's output for
the op (``tune_kernel`` rejects it otherwise), the fastest by median wins and is stored in the
persistent cache. Identical ops (the same layer repeated) share one cache entry and are tuned once.

At compile time the Triton backend resolves each op's config per *shape class* (sequence length
bucket) and device: the tuning cache first, then the shipped defaults (defaults.json, per device
class), then its cost model; options given explicitly to ``compile`` win over all three. The
resolution is a few file reads: a warm compile in a new process runs no tuning.

Triton knobs per op: ``chunk_size`` (feedback: the chunked solve's block; scan: the associative
strategy's chunk), ``strategy`` (scan: sequential or associative), ``num_warps``, ``num_stages``.
The generators fix block sizes from the IR shapes (not searched yet). On CPU the kernels run in
Triton's interpreter, timed with a CPU timer, over a reduced space (num_warps/num_stages do not
change what the interpreter does, and the associative scan is too slow to time there).

TVM knobs per op are the fields of its schedule (backends/tvm/schedules.py): feedback chunk, logits
key_block (vector lanes) and register rows, GEMM col_block and gemm_rows; attention q_block, k_block,
rows, v_lanes; scan channel_block (lanes). ``tvm_space`` is a small curated subset of each op's
``space()`` (a build costs ~1-2 s on CPU), the backend's rule-based default first. The TVM kernels
are symbolic in B and T (built once), so the TVM backend resolves each op's schedule at prepare time
for the example input's shape class (cache, then the shipped "cpu" defaults, then the backend's own
rule; schedules given to compile win) and uses it for every T; ``explain()`` says where each came from.
The key also holds the target string (its vector width decides the space) and a hash of the TVM
kernel generator files; tvm's version is in the key's library versions.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import re
import threading
import time
from pathlib import Path

import torch

from ..errors import SessaCompilerError
from ..ir.graph import Graph, Value
from .cache import TuningCache, device_key, make_key, shape_class
from .defaults import default_config
from .tuner import TunableKernel, TuneResult, tune_kernel

TUNABLE_OPS = ("feedback", "scan", "attention")


# -- what is tuned -----------------------------------------------------------------------------------------
def tunable_nodes(graph: Graph, backend: str = "triton", target=None) -> list:
    nodes = [n for n in graph.nodes if n.op in TUNABLE_OPS and (n.op != "attention" or n.attrs.get("causal"))]
    if backend == "tvm":  # only the ops the TVM backend generates kernels for (static widths, f32/f64, ...)
        nodes = [n for n in nodes if _tvm_spec(n, _tvm_lanes(target)) is not None]
    return nodes


def _type_text(v) -> str:
    return str(v.type) if isinstance(v, Value) else repr(v)


def op_signature(node) -> dict:
    """What fixes an op's kernels apart from B and T: op, attributes, operand types."""
    return {"op": node.op, "attrs": {k: repr(v) for k, v in sorted(node.attrs.items())},
            "inputs": [_type_text(x) for x in node.inputs]}


def kernel_name(node) -> str:
    """Readable and stable: 'feedback[f32[B,T,32] f32[B,T,16] ...]#<sig hash>'."""
    sig = op_signature(node)
    short = " ".join(t.replace(" ", "") for t in sig["inputs"] if not t[:1].isdigit())
    digest = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:8]
    return f"{node.op}[{short}]#{digest}"


GENERATOR_FILES = {"feedback": ("feedback.py", "../../passes/chunk_feedback.py"), "scan": ("scan.py", "../../passes/chunk_scan.py"),
                   "attention": ("attention.py",)}


@functools.cache
def _generator_source(backend: str, op: str) -> str:
    """A hash of the code that generates this op's kernels: editing it changes the key (a new kernel source)."""
    root = Path(__file__).resolve().parent.parent / "backends" / backend
    if backend == "triton":
        names = ("codegen.py", "fused.py") + GENERATOR_FILES.get(op, ())
    elif backend == "tvm":  # the files that generate and build the op's TIR kernel (not the runners)
        names = ("build.py", "schedules.py", "lowering.py", "target.py", "tir_math.py", f"kernels/{op}.py")
    else:
        names = ()
    files = [root / n for n in names] if names else sorted(root.glob("*.py")) + sorted(root.glob("kernels/*.py"))
    h = hashlib.sha256()
    for f in files:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def kernel_source(backend: str, node, target=None) -> str:
    text = _generator_source(backend, node.op) + "\n" + json.dumps(op_signature(node), sort_keys=True)
    if backend == "tvm":  # the same TIR compiles to different code (and other lanes) for another target
        text += "\n" + _tvm_target_text(target)
    return text


def triton_space(node, device: torch.device) -> list:
    """Candidate configs for one op, the cost-model-like choice first (so a tiny budget still verifies it)."""
    gpu = device.type == "cuda"
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


# -- TVM schedules ----------------------------------------------------------------------------------------
_TVM_TARGETS: dict = {}


def _tvm_target(target=None):
    """The backend's target (None: this host's CPU), resolved once per description."""
    key = target if isinstance(target, (str, type(None))) else str(target)
    if key not in _TVM_TARGETS:
        from ..backends.tvm.target import resolve_target

        _TVM_TARGETS[key] = resolve_target(target)
    return _TVM_TARGETS[key]


def _tvm_target_text(target=None) -> str:
    return str(_tvm_target(target))


def _tvm_lanes(target=None) -> int:
    from ..backends.tvm.build import lanes_for

    return lanes_for(_tvm_target(target))


def _tvm_spec(node, lanes: int, schedule=None):
    """The KernelSpec the TVM backend generates for this node (with this schedule, else its default), or None."""
    from ..backends.tvm.lowering import lower_node

    return lower_node(node, lanes, {node.op: schedule} if schedule is not None else None).spec


def _tvm_schedule_class(op: str):
    from ..backends.tvm import schedules as S

    return {"feedback": S.FeedbackSchedule, "attention": S.AttentionSchedule, "scan": S.ScanSchedule}[op]


def _tvm_size(spec) -> int:
    """The size a schedule's check() validates against."""
    p = spec.params
    return p.get("width") or p.get("head_dim") or p.get("channels")


def tvm_schedule(node, config: dict, target=None):
    """A schedule object from a config dict, or None when it is malformed or invalid for this node."""
    try:
        sched = _tvm_schedule_class(node.op)(**config)
        spec = _tvm_spec(node, _tvm_lanes(target))
        if spec is None or not all(isinstance(v, int) and v > 0 for v in config.values()):
            return None
        sched.check(_tvm_size(spec))
    except (TypeError, ValueError, KeyError):
        return None
    return sched


def tvm_space(node, device=None, target=None) -> list:
    """A few schedule variants per op (dicts), the backend's default first: builds cost ~1-2 s each on CPU,
    so this is a curated subset of schedules.*_space(), not all of it (every entry is in that space)."""
    from dataclasses import replace

    from ..backends.tvm import schedules as S

    lanes = _tvm_lanes(target)
    spec = _tvm_spec(node, lanes)
    if spec is None:
        raise SessaCompilerError(f"op '{node.op}' has no TVM kernel here")
    d, size = spec.schedule, _tvm_size(spec)
    L = lanes
    if node.op == "feedback":
        full = S.feedback_space(size)
        cands = [d, replace(d, chunk=32), replace(d, chunk=16, key_block=min(d.key_block, 16)),
                 replace(d, chunk=128, key_block=4 * L, rows=2),
                 replace(d, key_block=4 * L, rows=2, col_block=2 * d.col_block, gemm_rows=2)]
    elif node.op == "attention":
        full = S.attention_space(size)
        cands = [d, replace(d, k_block=2 * L, rows=4, v_lanes=min(d.v_lanes, 2 * L)),
                 replace(d, q_block=32, k_block=2 * L, rows=4, v_lanes=min(d.v_lanes, 2 * L)),
                 replace(d, q_block=32, k_block=4 * L if 32 % (4 * L) == 0 else 2 * L),
                 replace(d, q_block=16, k_block=16 if L <= 8 else L, rows=4, v_lanes=min(d.v_lanes, 2 * L))]
    elif node.op == "scan":
        full = S.scan_space(size)
        cands = [d] + [S.ScanSchedule(c) for c in (L, 2 * L, 4 * L, 4)]
    else:
        raise SessaCompilerError(f"op '{node.op}' has no tunables")
    out = []
    for c in cands:
        if c in full and c.as_dict() not in out:
            out.append(c.as_dict())
    if d.as_dict() not in out:  # the default is always a candidate, even outside the listed space
        out.insert(0, d.as_dict())
    return out


SPACES = {"triton": triton_space, "tvm": tvm_space}


def _space(backend: str, node, device, target=None) -> list:
    return tvm_space(node, device, target) if backend == "tvm" else SPACES[backend](node, device)


@functools.lru_cache(maxsize=16)
def _device_key_cached(dev_type: str, index) -> str:
    return device_key(torch.device(dev_type, index) if index is not None else torch.device(dev_type))


def _dev_key(device) -> str:
    device = torch.device(device)
    return _device_key_cached(device.type, device.index)


def cache_key(backend: str, node, seq_len: int, device, target=None):
    """target: the TVM backend's target (None: the host CPU); ignored for triton."""
    device = torch.device(device)
    return make_key(backend, kernel_name(node), kernel_source(backend, node, target), _space(backend, node, device, target),
                    seq_len, device)


# -- resolving configs at compile time ----------------------------------------------------------------------
def resolve_node(backend: str, node, seq_len: int, device, cache: TuningCache | None = None, target=None):
    """(config, where) for one op: ('tuned' cache entry | 'default' table | None, 'cost model')."""
    device = torch.device(device)
    cache = cache or TuningCache()
    space = _space(backend, node, device, target)
    try:
        hit = cache.get(cache_key(backend, node, seq_len, device, target))
    except OSError:  # an unreadable cache directory is a miss
        hit = None
    if hit is not None and hit in space:
        return dict(hit), "tuned"
    d = default_config(_dev_key(device), backend, node.op, shape_class(seq_len))
    if d is not None and (backend != "tvm" or tvm_schedule(node, d, target) is not None):
        return d, "default"
    return None, "cost model"


def triton_plan(backend, graph: Graph, seq_len: int, device) -> tuple:
    """Pipeline options and per-op launch configs for one shape class; and a report of where each came from."""
    given = {k: v for k, v in backend.options.items() if v is not None}
    per_node, notes = {}, []
    chunks = collections.defaultdict(list)
    for node in tunable_nodes(graph):
        cfg, where = resolve_node("triton", node, seq_len, device)
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
    lines = [(f"  kernel configs for {shape_class(seq_len)} on {_dev_key(device)} "
              "(tuning cache, then shipped defaults, then cost model; options given to compile win):")]
    for name, (cfg, where) in per_node.items():
        text = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())) or "-"
        lines.append(f"    %{name}: {text}  [{where}]")
    lines.append("    pipeline options: " + ", ".join(f"{k}={v}" for k, v in sorted(options.items())))
    lines += [f"    note: {n}" for n in notes]
    return lines


def _seq_len(graph: Graph, inputs) -> int:
    from ..backends.eager import bind_symbols

    binding = bind_symbols(graph, list(inputs))
    if "T" in binding:
        return int(binding["T"])
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[1])
    return 1


def triton_runner(backend, graph: Graph):
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
                attach_launch_configs(prog, per_node)
                by_plan[fp] = prog
            prog.config_report = describe_plan(options, per_node, notes, seq_len, device)
            programs[key] = prog
            backend.programs[id(graph)] = prog
            return prog

    example = getattr(graph, "example_inputs", None)
    if example:
        program_for(_seq_len(graph, example), example[0].device)
    else:
        program_for(1024, "cuda" if torch.cuda.is_available() else "cpu")  # for describe(); calls pick their own

    def run(inputs, params):
        device = inputs[0].device if inputs else torch.device("cpu")
        return program_for(_seq_len(graph, inputs), device).run(inputs, params)

    run.programs = programs
    return run


def tvm_schedules(backend, graph: Graph) -> tuple:
    """The TVM backend's hook: (schedules by op, report lines) for this graph.

    Per op: schedules given to compile (options={"schedules": ...} or feedback_chunk_size) win; else the
    tuning cache for the example's shape class on this device and target, then the shipped defaults for
    the device class ("cpu"), then the backend's own rule (schedules.default_*). The backend takes one
    schedule per op, so when several nodes of an op resolve differently the most common one that is valid
    for all of them is used (and the report says so)."""
    example = getattr(graph, "example_inputs", None)
    seq_len = _seq_len(graph, example) if example else 1024
    target = backend.target
    schedules = dict(backend.schedules)
    by_op = collections.defaultdict(list)
    for node in tunable_nodes(graph, "tvm", target):
        by_op[node.op].append(node)
    entries, notes = {}, []
    for op, nodes in by_op.items():
        if op in backend.schedules:
            for n in nodes:
                entries[n.output.name] = (op, backend.schedules[op].as_dict(), "given to compile")
            continue
        resolved = [(n, *resolve_node("tvm", n, seq_len, "cpu", target=target)) for n in nodes]
        found = [(json.dumps(cfg, sort_keys=True), where) for _, cfg, where in resolved if cfg]
        chosen = None
        for text, _ in collections.Counter(t for t, _ in found).most_common():
            cfg = json.loads(text)
            if all(tvm_schedule(n, cfg, target) is not None for n in nodes):
                chosen = cfg
                break
        if chosen is not None:
            schedules[op] = tvm_schedule(nodes[0], chosen, target)
        if len({t for t, _ in found}) > 1 or (found and len(found) < len(nodes)):
            notes.append(f"{op}: nodes resolve to different schedules; using "
                         f"{_schedule_text(chosen) if chosen else 'the backend default'} for all")
        for n, cfg, where in resolved:
            if chosen is None:
                entries[n.output.name] = (op, _tvm_spec(n, backend.lanes).schedule.as_dict(), "backend default")
            else:
                entries[n.output.name] = (op, chosen, where if cfg == chosen else f"{where}: not used, see note")
    lines = [(f"    schedules for {shape_class(seq_len)} on {_dev_key('cpu')} (tuning cache, then shipped defaults, "
              "then the backend's rule; schedules given to compile win; one build serves every T):")]
    for name, (op, cfg, where) in entries.items():
        lines.append(f"      %{name} ({op}): {_schedule_text(cfg)}  [{where}]")
    lines += [f"      note: {n}" for n in notes]
    return schedules, lines


def _schedule_text(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) if cfg else "-"


# -- tuning ---------------------------------------------------------------------------------------------
def parse_budget(budget) -> tuple:
    """-> (seconds, trials per kernel). None: the whole space; a number: seconds; '30s', '2m', '10 trials';
    {'seconds': s, 'trials': n}."""
    if budget is None:
        return None, None
    if isinstance(budget, dict):
        return budget.get("seconds"), budget.get("trials")
    if isinstance(budget, (int, float)):
        return float(budget), None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|seconds?|m|min|minutes?|t|trials?)?\s*", str(budget))
    if not m:
        raise SessaCompilerError(f"tune budget {budget!r}: expected seconds (60, '60s', '2m') or trials ('20 trials')")
    value, unit = float(m.group(1)), (m.group(2) or "s")
    if unit.startswith("t"):
        return None, int(value)
    return (value * 60 if unit.startswith("m") else value), None


def single_op_graph(node) -> tuple:
    """A graph holding just this op, its value operands as inputs; -> (graph, operand values in input order)."""
    g = Graph(f"tune_{node.op}")
    mapping: dict = {}
    ins = []
    for x in node.inputs:
        if isinstance(x, Value):
            if x not in mapping:
                mapping[x] = g.add_input(x.name, x.type)
            ins.append(mapping[x])
        else:
            ins.append(x)
    n = g.make_node(node.op, ins, dict(node.attrs), [v.type for v in node.outputs], names=[v.name for v in node.outputs])
    g.outputs = list(n.outputs)
    return g, list(mapping)


def _cuda_timer(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def triton_kernel(backend, node, operands: list, seq_len: int) -> TunableKernel:
    from ..tolerance import TOLERANCE
    from ..backends.eager import run_graph
    from ..backends.triton.backend import TritonBackend
    from ..dtypes import to_torch

    mini, _ = single_op_graph(node)
    device = operands[0].device
    tb = TritonBackend(interpret=backend.interpret)
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
    return TunableKernel(kernel_name(node), "triton", kernel_source("triton", node), triton_space(node, device), run,
                         reference, seq_len=seq_len, tolerance=tol, device=device,
                         timer=_cuda_timer if device.type == "cuda" else None)


def tvm_kernel(backend, node, operands: list, seq_len: int) -> TunableKernel:
    """Each candidate schedule builds the op's kernel (in-process build cache) and runs it through the TVM
    backend's hybrid runner on a one-op graph; the reference is the eager backend on the same operands."""
    from ..tolerance import TOLERANCE
    from ..backends.eager import run_graph
    from ..backends.tvm.backend import TVMBackend
    from ..dtypes import to_torch

    mini, _ = single_op_graph(node)
    target = backend.target
    runners: dict = {}

    def run(config):
        key = json.dumps(config, sort_keys=True)
        runner = runners.get(key)
        if runner is None:
            sched = tvm_schedule(node, config, target)
            if sched is None:
                raise SessaCompilerError(f"schedule {config} is not valid for {kernel_name(node)}")
            runner = TVMBackend(target=target, schedules={node.op: sched}, whole_graph=False).prepare(mini)
            runners[key] = runner
        with torch.no_grad():
            return runner(operands, {})[0]

    def reference():
        with torch.no_grad():
            return run_graph(mini, operands, {})[0]

    tol = TOLERANCE.get(to_torch(node.outputs[0].type.dtype), 1e-4)
    return TunableKernel(kernel_name(node), "tvm", kernel_source("tvm", node, target), tvm_space(node, None, target),
                         run, reference, seq_len=seq_len, tolerance=tol, device=torch.device("cpu"))


KERNEL_BUILDERS = {"triton": triton_kernel, "tvm": tvm_kernel}


def tune_graph(backend, graph: Graph, inputs, *, budget=None, cache: TuningCache | None = None,
               progress: bool = True, repeats: int | None = None, kernel_hook=None) -> list:
    """Tune every core op of a traced graph for these inputs' device and shape class; -> [TuneResult].

    kernel_hook(TunableKernel, node) -> TunableKernel lets tests alter a kernel's space or runner
    (e.g. inject a wrong-but-fast candidate, which the verification must reject).
    """
    from ..backends.eager import run_graph
    from .tuner import tqdm  # tqdm's, or a silent stand-in where tqdm is not installed

    name = getattr(backend, "name", str(backend))
    build = KERNEL_BUILDERS.get(name)
    target = getattr(backend, "target", None) if name == "tvm" else None
    nodes = tunable_nodes(graph, name, target)
    if build is None or not nodes:
        return []
    inputs = list(inputs)
    seconds, trials = parse_budget(budget)
    seq_len = _seq_len(graph, inputs)
    device = inputs[0].device
    cache = cache or TuningCache()
    # one kernel per distinct cache key: repeated identical layers are tuned once; hits need no operands
    unique: dict = {}
    for n in nodes:
        unique.setdefault(cache_key(name, n, seq_len, device, target).digest(), n)
    hits = ({d: cache.get(cache_key(name, n, seq_len, device, target)) for d, n in unique.items()}
            if kernel_hook is None else {})
    todo = [n for d, n in unique.items() if hits.get(d) is None]
    results = [TuneResult(kernel_name(n), hits[d], True) for d, n in unique.items() if hits.get(d) is not None]
    if not todo:
        return results
    targets = list(dict.fromkeys(x for n in todo for x in n.inputs if isinstance(x, Value)))
    with torch.no_grad():
        values = dict(zip(targets, run_graph(graph, inputs, graph.params, targets=targets)))
    if repeats is None:
        repeats = 10 if device.type == "cuda" else 5 if name == "tvm" else 3
    start = time.perf_counter()
    bar = tqdm(todo, desc=f"autotuning ({name})", disable=not progress, unit="kernel")
    for i, node in enumerate(bar):
        operands = [values[x] for x in dict.fromkeys(x for x in node.inputs if isinstance(x, Value))]
        k = build(backend, node, operands, seq_len)
        if kernel_hook is not None:
            k = kernel_hook(k, node)
        budget_s = None
        if seconds is not None:  # what is left, shared among the kernels still to tune
            budget_s = max(0.0, seconds - (time.perf_counter() - start)) / (len(todo) - i)
        bar.set_postfix_str(k.name.split("[")[0])
        results.append(tune_kernel(k, cache=cache, budget_s=budget_s, max_trials=trials, repeats=repeats,
                                   progress=progress))
    bar.close()
    return results


def tune(module, example_inputs, backend: str = "triton", budget=None, *, options: dict | None = None,
         progress: bool = True, repeats: int | None = None, kernel_hook=None) -> list:
    """Autotune every kernel of ``module`` for these inputs' device and sequence-length class.

    backend: "triton" (CUDA tensors, or CPU tensors in Triton's interpreter), "tvm" (CPU tensors: the
    generated TVM kernels' schedules); "auto" means triton.
    budget: None (the whole candidate space), seconds (60, "60s", "2m") shared among the kernels, or
    trials per kernel ("20 trials"). Results go to the persistent cache (SESSA_COMPILER_CACHE_DIR, else
    the user's cache directory), which later compiles on this device read; tuned kernels are cache hits.
    Returns one TuneResult per distinct kernel (config, from_cache, median_ms, tried, rejected).
    """
    from ..api import compile as sc_compile

    if backend == "auto":
        backend = "triton"
    if backend not in KERNEL_BUILDERS:
        raise SessaCompilerError(f"tune: backend '{backend}' has no tunable kernels here; "
                                 f"tunable: {', '.join(sorted(KERNEL_BUILDERS))}")
    settings = {"budget": budget, "progress": progress, "repeats": repeats, "kernel_hook": kernel_hook}
    if backend == "tvm":  # the compile below only prepares: hybrid mode reuses the tuned kernels' builds
        options = {"whole_graph": False, **(options or {})}
    compiled = sc_compile(module, example_inputs, backend=backend, options=options, autotune=settings)
    return compiled.tune_results


__all__ = [
    "TuneResult",
    "kernel_name",
    "parse_budget",
    "resolve_node",
    "triton_space",
    "tune",
    "tune_graph",
    "tvm_space",
]
