"""Simplification: fold layout ops that cancel or compose (what recognition and lowering leave behind) and
merge common subexpressions. ``simplify(graph)`` is the function (the frontend calls it after lowering);
``Simplify`` is the same as a named pass for the pipelines."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
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
    from ..ir.text import format_literal, format_operand

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
        merged = common_subexpressions(graph)
        total += merged
        changed = changed or bool(merged)
    graph.verify()
    return total


@dataclass
class Simplify(Pass):
    """Fold identity/cancelling layout ops and merge common subexpressions, to a fixed point."""

    name = "simplify"

    def run(self, graph: Graph) -> PassResult:
        return PassResult(simplify(graph))
