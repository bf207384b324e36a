"""The search over a traced graph's kernels, and the protocol a backend implements to be tuned.

Tuning is per core op of the traced graph (``feedback``, ``scan``, ``attention``): each becomes a
one-op graph whose operands are the values the eager backend computes for the example inputs; every
candidate config runs that graph through the backend and must match the eager backend's output for
the op (``tune_kernel`` rejects it otherwise), the fastest by median wins and is stored in the
persistent cache. Identical ops (the same layer repeated) share one cache entry and are tuned once.

This package knows nothing of any backend: a backend that has tunables implements ``Tunable`` (its
tunable nodes, each node's candidate space and generated kernel source, whether a config is valid
for a node, and a ``TunableKernel`` that runs one candidate). The backends own their spaces and how a
resolved config is used: ``backends/triton/prepare.py`` and ``backends/tvm/schedule_choice.py``.

At compile time a backend resolves each op's config per *shape class* (sequence length bucket) and
device with ``resolve_node``: the tuning cache first, then the shipped defaults (defaults.json, per
device class), then the backend's own rule. The resolution is a few file reads: a warm compile in a
new process runs no tuning.

The cache key holds a hash of the op's *generated kernel source* (``Tunable.tuning_source``): a change
to a kernel generator that changes what it generates makes earlier entries stale.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from typing import Any, Callable, Protocol, runtime_checkable

from ..errors import SessaCompilerError
from ..ir.graph import Graph, Node, Value
from .cache import CacheKey, TuningCache, device_key, make_key
from .defaults import default_config
from .tuner import TunableKernel, TuneResult, tune_kernel

# the traced core ops whose kernels have tunables (non-causal attention has no generated kernel)
TUNABLE_OPS = ("feedback", "scan", "attention")


def core_tunable_nodes(graph: Graph) -> list:
    return [n for n in graph.nodes if n.op in TUNABLE_OPS and (n.op != "attention" or n.attrs.get("causal"))]


@runtime_checkable
class Tunable(Protocol):
    """What a backend exposes to be tuned (the Triton and TVM backends implement it)."""

    name: str

    def tunable_nodes(self, graph: Graph) -> list:
        """The nodes of a traced graph this backend generates tunable kernels for."""

    def tuning_space(self, node: Node, device) -> list:
        """Candidate configs (dicts) for one node, the backend's own choice first."""

    def tuning_source(self, node: Node, device) -> str:
        """The generated source of the node's kernel(s) at a fixed config: part of the cache key."""

    def accepts_config(self, node: Node, config: dict) -> bool:
        """Whether a stored or shipped config is valid for this node."""

    def tuning_kernel(self, node: Node, operands: list, seq_len: int) -> TunableKernel:
        """One node as a kernel the search runs per candidate and checks against the eager reference."""


# -- naming and keys ---------------------------------------------------------------------------------------
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


@functools.lru_cache(maxsize=16)
def _device_key_cached(dev_type: str, index) -> str:
    import torch

    return device_key(torch.device(dev_type, index) if index is not None else torch.device(dev_type))


def device_label(device) -> str:
    """The cache's device key (GPU name and capability, or CPU model and cores), memoised per device."""
    import torch

    device = torch.device(device)
    return _device_key_cached(device.type, device.index)


def cache_key(backend: Tunable, node, seq_len: int, device) -> CacheKey:
    import torch

    device = torch.device(device)
    return make_key(backend.name, kernel_name(node), backend.tuning_source(node, device),
                    backend.tuning_space(node, device), seq_len, device)


# -- resolving configs at compile time ----------------------------------------------------------------------
def resolve_node(backend: Tunable, node, seq_len: int, device, cache: TuningCache | None = None) -> tuple:
    """(config, where) for one op: ('tuned' cache entry | 'default' table | None, 'cost model')."""
    import torch

    from .cache import shape_class

    device = torch.device(device)
    cache = cache or TuningCache()
    space = backend.tuning_space(node, device)
    try:
        hit = cache.get(cache_key(backend, node, seq_len, device))
    except OSError:  # an unreadable cache directory is a miss
        hit = None
    if hit is not None and hit in space:
        return dict(hit), "tuned"
    d = default_config(device_label(device), backend.name, node.op, shape_class(seq_len))
    if d is not None and backend.accepts_config(node, d):
        return d, "default"
    return None, "cost model"


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


def tune_graph(backend: Tunable, graph: Graph, inputs, *, seq_len: int, evaluate: Callable[[list], list],
               budget=None, cache: TuningCache | None = None, progress: bool = True, repeats: int | None = None,
               kernel_hook: Callable[[TunableKernel, Any], TunableKernel] | None = None) -> list:
    """Tune every tunable node of a traced graph for these inputs' device and shape class; -> [TuneResult].

    seq_len: the inputs' sequence length (its shape class keys the cache); evaluate(values) -> the
    reference (eager) tensors of those IR values for these inputs: the operands each kernel is timed on.
    kernel_hook(TunableKernel, node) -> TunableKernel lets tests alter a kernel's space or runner
    (e.g. inject a wrong-but-fast candidate, which the verification must reject).
    """
    import torch

    from .tuner import tqdm  # tqdm's, or a silent stand-in where tqdm is not installed

    nodes = backend.tunable_nodes(graph)
    if not nodes:
        return []
    inputs = list(inputs)
    seconds, trials = parse_budget(budget)
    device = inputs[0].device
    cache = cache or TuningCache()
    # one kernel per distinct cache key: repeated identical layers are tuned once; hits need no operands
    unique: dict = {}
    for n in nodes:
        unique.setdefault(cache_key(backend, n, seq_len, device).digest(), n)
    hits = ({d: cache.get(cache_key(backend, n, seq_len, device)) for d, n in unique.items()}
            if kernel_hook is None else {})
    todo = [n for d, n in unique.items() if hits.get(d) is None]
    results = [TuneResult(kernel_name(n), hits[d], True) for d, n in unique.items() if hits.get(d) is not None]
    if not todo:
        return results
    targets = list(dict.fromkeys(x for n in todo for x in n.inputs if isinstance(x, Value)))
    with torch.no_grad():
        values = dict(zip(targets, evaluate(targets)))
    if repeats is None:
        repeats = 10 if device.type == "cuda" else 5 if backend.name == "tvm" else 3
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"autotuning ({backend.name})", disable=None if progress else True, unit="kernel")
    for i, node in enumerate(todo):
        operands = [values[x] for x in dict.fromkeys(x for x in node.inputs if isinstance(x, Value))]
        k = backend.tuning_kernel(node, operands, seq_len)
        if kernel_hook is not None:
            k = kernel_hook(k, node)
        budget_s = None
        if seconds is not None:  # what is left, shared among the kernels still to tune
            budget_s = max(0.0, seconds - (time.perf_counter() - start)) / (len(todo) - i)
        bar.set_postfix_str(k.name.split("[")[0])
        results.append(tune_kernel(k, cache=cache, budget_s=budget_s, max_trials=trials, repeats=repeats,
                                   progress=progress))
        bar.update(1)
    bar.close()
    return results
