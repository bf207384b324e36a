"""Small helpers shared by the rewriting passes."""
from __future__ import annotations

from ..ir.graph import Graph, Node, Value


def replace_node(graph: Graph, old: Node, op: str, inputs: list, attrs: dict) -> Node:
    """Put a new node in ``old``'s place that *keeps old's output values* (names and every use)."""
    new = Node(op, list(inputs), dict(attrs))
    new.outputs = list(old.outputs)
    for v in new.outputs:
        v.producer = new
    graph.nodes[graph.nodes.index(old)] = new
    return new


def insert_before(graph: Graph, anchor: Node, op: str, inputs: list, attrs: dict, out_type, name: str) -> Value:
    """Insert a single-output node just before ``anchor``; returns its output value."""
    node = graph.make_node(op, inputs, attrs, [out_type], names=[graph.fresh_name(name)],
                           index=graph.nodes.index(anchor))
    return node.output


def static_dim(d, default: int) -> int:
    """A dim's value when it is a constant, else ``default`` (what a cost model assumes for T)."""
    return d if isinstance(d, int) else default
