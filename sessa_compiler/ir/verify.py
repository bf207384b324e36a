"""The graph verifier: every op checks its operands, attributes and declared output types."""
from __future__ import annotations

from ..errors import IRError
from .graph import Graph, Node, Value
from .ops import OPS, ArgRef, fail, literal_ok
from .types import TensorType, dims_equal, format_dim


def verify_node(node: Node) -> None:
    if node.op not in OPS:
        raise IRError(f"unknown op '{node.op}'; known ops: {', '.join(sorted(OPS))}")
    od = OPS[node.op]
    lo, hi = od.n_inputs
    n = len(node.inputs)
    if n < lo or (hi is not None and n > hi):
        fail(node, f"expects {lo}{'' if hi == lo else ('+' if hi is None else f'..{hi}')} operands, got {n}")
    for i, x in enumerate(node.inputs):
        if x is None and (node.op in ("linear", "layer_norm", "conv1d", "causal_conv1d")
                          or (node.op == "attention" and i == 3)):   # no inv_freq before a key-padding mask
            continue
        if not isinstance(x, Value) and not literal_ok(node, i, x):
            fail(node, f"operand {i} must be a tensor value, got literal {x!r}")
    for key, (required, types) in od.attrs.items():
        if key not in node.attrs:
            if required:
                fail(node, f"missing attribute '{key}'")
            continue
        val = node.attrs[key]
        if val is not None and not isinstance(val, types):
            fail(node, f"attribute '{key}' must be {'/'.join(t.__name__ for t in types)}, got {val!r}")
    unknown = set(node.attrs) - set(od.attrs)
    if unknown:
        fail(node, f"unknown attributes {sorted(unknown)}; '{node.op}' takes {sorted(od.attrs)}")
    if od.n_outputs is not None and len(node.outputs) != od.n_outputs:
        fail(node, f"must have {od.n_outputs} output(s), has {len(node.outputs)}")
    if node.op == "fallback":
        refs = set()

        def collect(a):
            if isinstance(a, ArgRef):
                refs.add(a.index)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    collect(b)
            elif isinstance(a, dict):
                for b in a.values():
                    collect(b)

        collect(node.attrs["args"])
        collect(node.attrs["kwargs"])
        if refs != set(range(len(node.inputs))):
            fail(node, f"args reference operands {sorted(refs)} but the node has {len(node.inputs)} operands")
    expected = od.infer(node) if od.infer else None
    if expected is None:
        return
    for out, exp in zip(node.outputs, expected):
        dtype, shape = (exp.dtype, exp.shape) if isinstance(exp, TensorType) else exp
        if dtype is not None and out.type.dtype != dtype:
            fail(node, f"output %{out.name} declared {out.type}, but the op gives dtype {dtype}")
        if shape is not None:
            if len(shape) != out.type.rank or not all(dims_equal(a, b) for a, b in zip(shape, out.type.shape)):
                fail(node, f"output %{out.name} declared {out.type}, but the op gives shape "
                           f"[{', '.join(format_dim(d) for d in shape)}]")


def verify_graph(graph: Graph) -> None:
    defined: set = set(graph.inputs) | set(graph.param_values.values())
    names: set = set()
    for v in defined:
        if v.name in names:
            raise IRError(f"value name %{v.name} is defined twice")
        names.add(v.name)
    for node in graph.nodes:
        for i, x in enumerate(node.inputs):
            if isinstance(x, Value) and x not in defined:
                fail(node, f"operand {i} %{x.name} is used before it is defined (or is not in this graph)")
        verify_node(node)
        for o in node.outputs:
            if o.name in names:
                fail(node, f"value name %{o.name} is defined twice")
            if o.producer is not node:
                fail(node, f"output %{o.name} does not point back at its node")
            names.add(o.name)
            defined.add(o)
    if not graph.outputs:
        raise IRError(f"graph {graph.name} has no outputs")
    for v in graph.outputs:
        if v not in defined:
            raise IRError(f"graph output %{v.name} is not defined in graph {graph.name}")
    missing = [n for n in graph.param_values if graph.params and n not in graph.params]
    if graph.params and missing:
        raise IRError(f"parameters declared without data: {missing}")
