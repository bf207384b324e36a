"""Simplification: fold layout ops that cancel or compose (what recognition and lowering leave behind) and
merge common subexpressions. ``simplify(graph)`` is the function (the frontend calls it after lowering);
``Simplify`` is the same as a named pass for the pipelines."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from ..ir.verify import verify_graph
from .manager import Pass, PassResult


def _is_identity(n) -> bool:
    x = n.inputs[0]
    if n.op in ("reshape", "expand") and n.output.type.same_as(x.type):
        return True
    if n.op == "permute" and list(n.attrs["dims"]) == list(range(x.type.rank)):
        return True
    if n.op == "transpose" and n.attrs["dim0"] % x.type.rank == n.attrs["dim1"] % x.type.rank:
        return True
    return n.op == "cast" and n.attrs["dtype"] == x.type.dtype


def _cancels(outer, inner) -> bool:
    """transpose(transpose(x, a, b), a, b) == x."""
    if outer.op == inner.op == "transpose":
        r = inner.inputs[0].type.rank
        return {outer.attrs["dim0"] % r, outer.attrs["dim1"] % r} == {inner.attrs["dim0"] % r, inner.attrs["dim1"] % r}
    return False


def _key(n):
    from ..ir.graph import format_literal, format_operand
    from ..semantics.ordinary import draws_random

    if n.op == "fallback" and draws_random(n.attrs["target"]):
        return (n.op, id(n))   # two draws with the same operands are two draws (x + randn_like(x) - randn_like(x))
    return (n.op, tuple(x if hasattr(x, "producer") else ("lit", format_operand(x)) for x in n.inputs),
            format_literal(n.attrs), tuple(str(o.type) for o in n.outputs))


def common_subexpressions(graph: Graph) -> int:
    """Merge nodes that apply the same op with the same attributes to the same operands."""
    seen: dict = {}
    merged = 0
    for n in list(graph.nodes):
        k = _key(n)
        if k in seen:
            for old, new in zip(n.outputs, seen[k].outputs):
                graph.replace_all_uses(old, new)
            merged += 1
        else:
            seen[k] = n
    graph.dead_code_elimination()
    return merged


def _same(a, b, depth: int = 12) -> bool:
    """a and b compute the same thing: the same value, equal literals, or the same op with the same attributes
    on operands that are the same (structure only, never names)."""
    if a is b:
        return True
    if not (hasattr(a, "producer") and hasattr(b, "producer")):
        return not hasattr(a, "producer") and not hasattr(b, "producer") and type(a) is type(b) and a == b
    na, nb = a.producer, b.producer
    if depth == 0 or na is None or nb is None or na.op != nb.op or len(na.outputs) != 1 or len(nb.outputs) != 1 \
            or len(na.inputs) != len(nb.inputs) or na.op == "fallback" or not a.type.same_as(b.type):
        return False
    from ..ir.graph import format_literal

    return format_literal(na.attrs) == format_literal(nb.attrs) and all(
        _same(x, y, depth - 1) for x, y in zip(na.inputs, nb.inputs))


def _reduces_last(n, op: str, rank: int):
    """n is ``op`` over exactly one dim with keepdim: that dim (normalised), else None."""
    if n is None or n.op != op or not n.attrs.get("keepdim") or len(n.attrs.get("dims") or []) != 1:
        return None
    return n.attrs["dims"][0] % rank


def hand_written_softmax(graph: Graph) -> int:
    """exp(x - amax_d(x)) / sum_d(exp(x - amax_d(x))) and exp(x) / sum_d(exp(x)) (keepdim reductions over one dim
    d, the same x throughout, checked by structure) -> softmax(x, d). Returns the number of rewrites. (Without
    the max, the rewrite differs only where exp(x) overflows: there softmax stays finite.)"""
    count = 0
    for n in list(graph.nodes):
        if n.op != "div" or n not in graph.nodes or len(n.inputs) != 2 or \
                not all(hasattr(x, "producer") and x.producer is not None for x in n.inputs):
            continue
        e, s = n.inputs
        if e.producer.op != "exp" or not e.type.same_as(n.output.type) or not e.type.dtype.is_float:
            continue
        rank = e.type.rank
        d = _reduces_last(s.producer, "sum", rank)
        if d is None or not _same(s.producer.inputs[0], e):
            continue
        z = e.producer.inputs[0]
        x = z
        if hasattr(z, "producer") and z.producer is not None and z.producer.op == "sub" and \
                hasattr(z.producer.inputs[1], "producer"):
            a, m = z.producer.inputs
            if hasattr(a, "producer") and _reduces_last(m.producer, "amax", rank) == d and \
                    _same(m.producer.inputs[0], a):
                x = a
        if not hasattr(x, "producer") or not x.type.same_as(n.output.type):
            continue
        sm = graph.make_node("softmax", [x], {"dim": d}, [x.type], index=graph.nodes.index(n)).output
        graph.replace_all_uses(n.output, sm)
        count += 1
    if count:
        graph.dead_code_elimination()
    return count


def simplify(graph: Graph) -> int:
    """Rewrite to a fixed point; returns the number of rewrites."""
    total = 0
    changed = True
    while changed:
        changed = False
        for n in list(graph.nodes):
            if len(n.outputs) != 1 or not n.inputs or not hasattr(n.inputs[0], "producer"):
                continue
            x = n.inputs[0]
            if n.op in ("reshape", "expand", "permute", "transpose", "cast") and _is_identity(n):
                graph.replace_all_uses(n.output, x)
            elif x.producer is not None and _cancels(n, x.producer):
                graph.replace_all_uses(n.output, x.producer.inputs[0])
            elif n.op == "reshape" and x.producer is not None and x.producer.op == "reshape":
                n.inputs = [x.producer.inputs[0]]  # reshape of a reshape is one reshape
            else:
                continue
            changed = True
            total += 1
        graph.dead_code_elimination()
        merged = common_subexpressions(graph) + hand_written_softmax(graph)
        total += merged
        changed = changed or bool(merged)
    verify_graph(graph)
    return total


@dataclass
class Simplify(Pass):
    """Fold identity/cancelling layout ops and merge common subexpressions, to a fixed point."""

    name = "simplify"

    def run(self, graph: Graph) -> PassResult:
        return PassResult(simplify(graph))
