"""Partition the graph into fusion groups and replace each by one ``fused`` node (ir/ops_fused.py).

What fuses: the elementwise, no-op layout (squeeze/unsqueeze/reshape that keep the row grid) and
layer_norm ops around the matmuls and core ops: layer-norm prologues with their residual add,
gelu/silu gating and tanh-gamma epilogues. Matmuls (``linear``, ``matmul``, ``einsum``), core ops
and views that move data between rows (``split``, ``permute``, ...) stay where they are: the fused
kernels read split/reshape views through row strides, so those cost no copy.

How (TorchInductor's scheduler, small): every fusible node starts as its own group; repeatedly take
the producer -> consumer merge that saves the most bytes of memory traffic, provided the merged group
still lives in one [rows, N] grid (``row_space``) and is convex: no path leaves the group and comes
back into it (checked with networkx), else the fused node would have to run both before and after
an outside op. Stop when no merge saves bytes. Groups of one op are left alone (nothing to save).

Bytes saved = traffic of the ops run one by one (each reads its operands and writes its outputs)
minus traffic of the fused kernel (each distinct external operand read once, only the values used
outside the group written). It is kept symbolic (``bytes_saved=128*B*T``); merges are ranked with
every dimension symbol set to ``assumed_dim``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy

from ..errors import IRError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import BINARY, ELEMENTWISE, LOGICAL, OPS, UNARY
from ..ir.ops_fused import body_lines, row_space
from ..ir.dtypes import ITEMSIZE
from ..ir.types import format_dim
from .manager import Pass, PassResult

if TYPE_CHECKING:   # networkx is imported where a pass runs (not on a warm compile's path: sessa_compiler imports this)
    import networkx as nx

# elementwise ops the generated kernels implement (float in, float out): every unary and binary op but the
# logical ones and pow (no Triton spelling), plus cast
POINTWISE_OPS = (frozenset(UNARY) | frozenset(BINARY)) - frozenset(LOGICAL) - {"pow"} | {"cast"}
ROW_NOOP_OPS = frozenset({"squeeze", "unsqueeze", "reshape"})   # fusible when they keep the row grid
ROW_OPS = frozenset({"layer_norm"})
MAX_WIDTH = 16384
KERNEL_FLOATS = ("f32", "f16", "bf16")  # a row must fit one program's registers


def value_bytes(v: Value):
    n = sympy.Integer(ITEMSIZE[v.type.dtype.name])
    for d in v.type.shape:
        n = n * sympy.sympify(d)
    return n


def fusible(node: Node) -> bool:
    if node.op not in POINTWISE_OPS | ROW_NOOP_OPS | ROW_OPS or len(node.outputs) != 1:
        return False
    # fused kernels compute in fp32: float64 groups would lose precision, so they stay op by op
    if any(v.type.dtype.name not in KERNEL_FLOATS for v in node.value_inputs + node.outputs):
        return False
    if node.op == "cast" and not node.attrs["dtype"].is_float:
        return False
    if node.op == "layer_norm" and any(x is None for x in node.inputs):
        return False
    literals_ok = all(isinstance(x, Value) or (isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x)) for x in node.inputs)
    return literals_ok and (OPS[node.op].kind == ELEMENTWISE or node.op in ROW_NOOP_OPS | ROW_OPS)


def is_convex(nxg: nx.DiGraph, members) -> bool:
    """True when no path leaves ``members`` and re-enters it (then the group can run as one node)."""
    import networkx as nx

    members = set(members)
    leaving = {s for m in members for s in nxg.successors(m)} - members
    return not any(nx.descendants(nxg, u) & members for u in leaving)


def convexity_violation(nxg: nx.DiGraph, members):
    """A path member -> outside ... -> member that breaks convexity, or None."""
    import networkx as nx

    members = set(members)
    for m in members:
        for u in set(nxg.successors(m)) - members:
            back = nx.descendants(nxg, u) & members
            if back:
                target = min(back, key=lambda n: n.outputs[0].name)
                return [m] + nx.shortest_path(nxg, u, target)
    return None


def quotient_is_acyclic(nxg: nx.DiGraph, group_of: dict) -> bool:
    """True when contracting every group to one vertex leaves a DAG (groups that are each convex can
    still feed each other both ways: A -> B and B -> A)."""
    import networkx as nx

    q = nx.DiGraph()
    for p, c in nxg.edges:
        gp, gc = group_of.get(p, p), group_of.get(c, c)
        if gp is not gc:
            q.add_edge(gp, gc)
    return nx.is_directed_acyclic_graph(q)


def group_interface(graph: Graph, members: list):
    """(external operands in first-use order, outputs needed outside the group)."""
    inside = {o for n in members for o in n.outputs}
    member_set = set(members)
    operands = []
    for n in members:
        for x in n.value_inputs:
            if x not in inside and x not in operands:
                operands.append(x)
    users = graph.users()
    returned = set(graph.outputs)
    outputs = [o for n in members for o in n.outputs
               if o in returned or any(u not in member_set for u in users.get(o, []))]
    return operands, outputs


def bytes_saved(graph: Graph, members: list):
    operands, outputs = group_interface(graph, members)
    unfused = sum((value_bytes(x) for n in members for x in n.value_inputs), sympy.Integer(0)) + \
        sum((value_bytes(o) for n in members for o in n.outputs), sympy.Integer(0))
    fused = sum((value_bytes(x) for x in operands), sympy.Integer(0)) + \
        sum((value_bytes(o) for o in outputs), sympy.Integer(0))
    return sympy.expand(unfused - fused)


def body_graph(graph: Graph, members: list, gid: int) -> Graph:
    """The members as a standalone graph over the group's operands (names kept)."""
    operands, outputs = group_interface(graph, members)
    body = Graph(f"group{gid}")
    env = {}
    for x in operands:
        env[x] = body.add_input(x.name, x.type)
    for n in members:
        new = body.make_node(n.op, [env.get(x, x) if isinstance(x, Value) else x for x in n.inputs], n.attrs,
                             [o.type for o in n.outputs], names=[o.name for o in n.outputs])
        env.update(zip(n.outputs, new.outputs))
    body.outputs = [env[o] for o in outputs]
    return body


@dataclass
class Fuse(Pass):
    """Group fusible ops (see the module docstring); the result's decisions list the groups and their savings,
    its rejected list the merges left because the group would not be convex."""

    name = "fuse"
    assumed_dim: int = 4096
    max_width: int = MAX_WIDTH

    def options(self) -> dict:
        return {}

    def _rank(self, expr) -> float:
        return float(expr.subs({s: self.assumed_dim for s in expr.free_symbols})) if isinstance(expr, sympy.Basic) \
            else float(expr)

    def _fits(self, graph: Graph, members: list) -> bool:
        space = row_space(body_graph(graph, members, 0))
        return space is not None and space[1] <= self.max_width

    def partition(self, graph: Graph, rejected: list | None = None) -> list:
        """The fusion groups (lists of nodes in graph order), best merges first; ``rejected`` gets a line for
        each merge left because it would not be convex."""
        rejected = [] if rejected is None else rejected
        nxg = graph.to_networkx()
        order = {n: i for i, n in enumerate(graph.nodes)}
        group_of = {n: frozenset([n]) for n in graph.nodes if fusible(n) and self._fits(graph, [n])}

        cache: dict = {}

        def saved(g):
            if g not in cache:
                cache[g] = self._rank(bytes_saved(graph, sorted(g, key=order.get)))
            return cache[g]

        fits: dict = {}

        while True:
            best = None
            for p, c in nxg.edges:
                if p not in group_of or c not in group_of or group_of[p] is group_of[c]:
                    continue
                merged = group_of[p] | group_of[c]
                members = sorted(merged, key=order.get)
                if not is_convex(nxg, merged):
                    note = f"not convex: {' + '.join('%' + n.outputs[0].name for n in members)}"
                    if note not in rejected:
                        rejected.append(note)
                    continue
                if merged not in fits:
                    fits[merged] = self._fits(graph, members)
                if not fits[merged]:
                    continue
                trial = dict(group_of)
                for n in merged:
                    trial[n] = merged
                if not quotient_is_acyclic(nxg, trial):
                    continue
                gain = saved(merged) - saved(group_of[p]) - saved(group_of[c])
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, merged)
            if best is None:
                break
            for n in best[1]:
                group_of[n] = best[1]
        groups = {g for g in group_of.values() if len(g) > 1}
        return sorted((sorted(g, key=order.get) for g in groups), key=lambda g: order[g[0]])

    def run(self, graph: Graph) -> PassResult:
        result = PassResult(0)
        groups = self.partition(graph, result.rejected)
        fuse_groups(graph, groups, result.decisions)
        result.rewrites = len(groups)
        return result


def fuse_groups(graph: Graph, groups: list, decisions: list | None = None) -> list:
    """Replace each group (a list of nodes) by one ``fused`` node; raises IRError for a bad group."""
    nxg = graph.to_networkx()
    seen: set = set()
    for members in groups:
        path = convexity_violation(nxg, members)
        if path is not None:
            raise IRError("fusion group " + ", ".join("%" + n.outputs[0].name for n in members) +
                          " is not convex: the path " + " -> ".join("%" + n.outputs[0].name for n in path) +
                          " leaves the group and re-enters it")
        if seen & set(members):
            raise IRError("fusion groups overlap at " + ", ".join("%" + n.outputs[0].name for n in seen & set(members)))
        seen |= set(members)
        for n in members:
            if not fusible(n):
                raise IRError(f"op '{n.op}' (%{n.outputs[0].name}) cannot be fused")
    frozen = [frozenset(g) for g in groups]
    if not quotient_is_acyclic(nxg, {n: g for g in frozen for n in g}):
        raise IRError("fusion groups feed each other both ways: contracting them makes a cycle")
    made = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for gid, members in enumerate(sorted((sorted(g, key=order.get) for g in groups), key=lambda g: order[g[0]])):
        body = body_graph(graph, members, gid)
        if row_space(body) is None:
            raise IRError("fusion group " + ", ".join("%" + n.outputs[0].name for n in members) +
                          " does not fit one [rows, N] grid")
        operands, outputs = group_interface(graph, members)
        saved = bytes_saved(graph, members)
        saved = int(saved) if saved.is_Integer else saved
        kernel = "rowwise" if any(n.op in ROW_OPS for n in members) else "pointwise"
        node = Node("fused", list(operands), {"group": gid, "kernel": kernel, "bytes_saved": saved,
                                              "body": body_lines(body)})
        node.outputs = list(outputs)
        for o in outputs:
            o.producer = node
        at = graph.nodes.index(members[-1])
        graph.nodes[at] = node
        graph.nodes = [n for n in graph.nodes if n not in set(members)]
        made.append(node)
        if decisions is not None:
            decisions.append(f"group {gid} ({kernel}): " + ", ".join(f"{n.op} %{n.outputs[0].name}" for n in members)
                             + f" -> 1 kernel, saves {format_dim(saved)} bytes")
    graph.toposort()
    graph.dead_code_elimination()
    return made
