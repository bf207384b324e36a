"""The TVM backend's schedule choice: which schedule each generated kernel is built with, and the space
the autotuner searches.

TVM knobs per op are the fields of its schedule (schedules.py): feedback chunk, logits key_block
(vector lanes) and register rows, GEMM col_block and gemm_rows; attention q_block, k_block, rows,
v_lanes; scan channel_block (lanes). ``tvm_space`` is a small curated subset of each op's ``space()``
(a build costs ~1-2 s on CPU), the backend's rule-based default first. The TVM kernels are symbolic
in B and T (built once), so the backend resolves each op's schedule at prepare time for the example
input's shape class (tuning cache, then the shipped "cpu" defaults, then the backend's own rule;
schedules given to compile win) and uses it for every T; ``explain()`` says where each came from.

The tuning cache key hashes the source of the code that generates the op's kernel (``tuning_source``:
``build.generator_source``, read with ``inspect`` from the generator function in use and the modules it
uses), the kernel spec at the backend's default schedule, and the target string (its vector width
decides the space); tvm's version is in the key's library versions. Not the generated TVMScript itself:
generating the TIR costs 0.13-0.27 s per op (measured on the shared 2-core host), which made a warm
compile's lookup of its tuned schedules about four times slower.
"""
from __future__ import annotations

import collections
import json
from dataclasses import replace

import torch

from ...autotune.cache import shape_class
from ...autotune.search import core_tunable_nodes, device_label, kernel_name, op_signature, resolve_node, single_op_graph
from ...autotune.tuner import TunableKernel
from ...errors import SessaCompilerError
from ...ir.graph import Graph
from ..base import CompileContext
from ..shapes import sequence_length
from . import schedules as S
from .build import generator_source, lanes_for
from .lowering import lower_node

_TARGETS: dict = {}


def resolved_target(target=None):
    """The backend's target (None: this host's CPU), resolved once per description; a recorded HostTarget
    (target.py) as it is: its text and lanes are what the lookups read, without importing tvm."""
    from .target import HostTarget

    if isinstance(target, HostTarget):
        return target
    key = target if isinstance(target, (str, type(None))) else str(target)
    if key not in _TARGETS:
        from .target import resolve_target

        _TARGETS[key] = resolve_target(target)
    return _TARGETS[key]


def target_lanes(target=None) -> int:
    return lanes_for(resolved_target(target))


def kernel_spec(node, lanes: int, schedule=None):
    """The KernelSpec the TVM backend generates for this node (with this schedule, else its default), or None."""
    return lower_node(node, lanes, {node.op: schedule} if schedule is not None else None).spec


def tunable_nodes(graph: Graph, target=None) -> list:
    """The core ops the TVM backend generates kernels for (static widths, f32/f64, ...)."""
    lanes = target_lanes(target)
    return [n for n in core_tunable_nodes(graph) if kernel_spec(n, lanes) is not None]


_SCHEDULE_CLASS = {"feedback": S.FeedbackSchedule, "attention": S.AttentionSchedule, "scan": S.ScanSchedule}


def schedule_size(spec) -> int:
    """The size a schedule's check() validates against."""
    p = spec.params
    return p.get("width") or p.get("head_dim") or p.get("channels")


def tvm_schedule(node, config: dict, target=None):
    """A schedule object from a config dict, or None when it is malformed or invalid for this node."""
    try:
        sched = _SCHEDULE_CLASS[node.op](**config)
        spec = kernel_spec(node, target_lanes(target))
        if spec is None or not all(isinstance(v, int) and v > 0 for v in config.values()):
            return None
        sched.check(schedule_size(spec))
    except (TypeError, ValueError, KeyError):
        return None
    return sched


def tvm_space(node, device=None, target=None) -> list:
    """A few schedule variants per op (dicts), the backend's default first: builds cost ~1-2 s each on CPU,
    so this is a curated subset of schedules.*_space(), not all of it (every entry is in that space)."""
    L = target_lanes(target)
    spec = kernel_spec(node, L)
    if spec is None:
        raise SessaCompilerError(f"op '{node.op}' has no TVM kernel here")
    d, size = spec.schedule, schedule_size(spec)
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


_SOURCES: dict = {}  # (op signature, target) -> tuning_source's text


def tuning_source(node, target=None) -> str:
    """The kernel generator's source, the node's kernel spec at the backend's default schedule, and the
    target (the same TIR compiles to other code, and other lanes, for another target)."""
    target_text = str(resolved_target(target))
    key = (json.dumps(op_signature(node), sort_keys=True), target_text)
    if key not in _SOURCES:
        spec = kernel_spec(node, target_lanes(target))
        if spec is None:
            raise SessaCompilerError(f"{kernel_name(node)}: the tvm backend generates no kernel for it")
        _SOURCES[key] = f"{key[0]}\n{target_text}\n{spec!r}\n{generator_source(node.op)}"
    return _SOURCES[key]


def _signature(node) -> tuple:
    """What a schedule lookup reads of a node: its op, operand and result types and attributes (not value names)."""
    return (node.op, tuple(str(x.type) if hasattr(x, "type") else repr(x) for x in node.inputs),
            repr(sorted(node.attrs.items())), tuple(str(o.type) for o in node.outputs))


def tvm_schedules(backend, graph: Graph, ctx: CompileContext) -> tuple:
    """(schedules by op, report lines) for this graph.

    Per op: schedules given to compile (options={"schedules": ...} or feedback_chunk_size) win; else the
    tuning cache for the example's shape class on this device and target, then the shipped defaults for
    the device class ("cpu"), then the backend's own rule (schedules.default_*). The backend takes one
    schedule per op, so when several nodes of an op resolve differently the most common one that is valid
    for all of them is used (and the report says so)."""
    seq_len = sequence_length(graph, ctx.example_inputs) if ctx.example_inputs else 1024
    target = backend.key_target
    schedules = dict(backend.schedules)
    by_op = collections.defaultdict(list)
    for node in tunable_nodes(graph, target):
        by_op[node.op].append(node)
    entries, notes = {}, []
    for op, nodes in by_op.items():
        if op in backend.schedules:
            for n in nodes:
                entries[n.output.name] = (op, backend.schedules[op].as_dict(), "given to compile")
            continue
        # identical layers: one lookup (tuning space, tuning cache, defaults) per distinct node signature
        memo: dict = {}
        resolved = []
        for n in nodes:
            sig = _signature(n)
            if sig not in memo:
                memo[sig] = resolve_node(backend, n, seq_len, "cpu")
            cfg, where = memo[sig]
            resolved.append((n, dict(cfg) if cfg else cfg, where))
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
                entries[n.output.name] = (op, kernel_spec(n, backend.lanes).schedule.as_dict(), "backend default")
            else:
                entries[n.output.name] = (op, chosen, where if cfg == chosen else f"{where}: not used, see note")
    lines = [(f"    schedules for {shape_class(seq_len)} on {device_label('cpu')} (tuning cache, then shipped defaults, "
              "then the backend's rule; schedules given to compile win; one build serves every T):")]
    for name, (op, cfg, where) in entries.items():
        lines.append(f"      %{name} ({op}): {_schedule_text(cfg)}  [{where}]")
    lines += [f"      note: {n}" for n in notes]
    return schedules, lines


def _schedule_text(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) if cfg else "-"


def tuning_kernel(backend, node, operands: list, seq_len: int) -> TunableKernel:
    """Each candidate schedule builds the op's kernel (in-process build cache) and runs it through the TVM
    backend's hybrid runner on a one-op graph; the reference is the eager backend on the same operands."""
    from ...ir.dtypes import to_torch
    from ...tolerance import TOLERANCE
    from ..eager import run_graph

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
            runner = type(backend)(target=target, schedules={node.op: sched}, whole_graph=False).prepare(mini)
            runners[key] = runner
        with torch.no_grad():
            return runner(operands, {})[0]

    def reference():
        with torch.no_grad():
            return run_graph(mini, operands, {})[0]

    tol = TOLERANCE.get(to_torch(node.outputs[0].type.dtype), 1e-4)
    return TunableKernel(kernel_name(node), "tvm", tuning_source(node, target), tvm_space(node, None, target),
                         run, reference, seq_len=seq_len, tolerance=tol, device=torch.device("cpu"))
