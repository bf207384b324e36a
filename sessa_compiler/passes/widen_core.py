"""Core ops on 16-bit operands, computed by float32 kernels: a backend whose kernels are float32 only (TVM on
CPU) gets a copy of the graph where each core op with bf16/fp16 float operands reads them through casts to
float32 and its output is cast back to the op's dtype.

Mixed precision puts core ops on 16-bit operands (under ``torch.autocast`` the linear layers that make q, k and v
return bf16), and the core ops' meaning (semantics/) computes them in at least float32 and rounds the output to
its dtype: upcasting the operands is exact, so the float32 kernel computes the same function (the rounding of the
output is the cast after it). Without this, such a graph ran its attention and feedback as generic ops (on TVM:
Relax's legalised softmax over a T x T matrix, 10x slower than the module itself at T = 512).
"""
from __future__ import annotations

from ..ir.dtypes import HALF as NARROW
from ..ir.graph import Graph, Value
from ..ir.ops import CORE_OPS
from ..ir.types import DType, TensorType


def _narrow(x) -> bool:
    return isinstance(x, Value) and x.type.dtype.name in NARROW


def needs_widening(graph: Graph) -> bool:
    return any(n.op in CORE_OPS and any(_narrow(x) for x in n.inputs) for n in graph.nodes)


def widen_core_ops(graph: Graph) -> Graph:
    """``graph`` itself when no core op reads a 16-bit float operand, else a copy whose core ops read float32
    (casts before) and whose outputs are cast back (casts after)."""
    if not needs_widening(graph):
        return graph
    g = graph.clone()
    f32 = DType("f32")
    for node in [n for n in g.nodes if n.op in CORE_OPS and any(_narrow(x) for x in n.inputs)]:
        at = g.nodes.index(node)
        for i, x in enumerate(node.inputs):
            if _narrow(x):
                up = g.make_node("cast", [x], {"dtype": f32}, [TensorType(f32, x.type.shape)], index=at)
                node.inputs[i] = up.output
                at += 1
        for out in node.outputs:
            if out.type.dtype.name not in NARROW:
                continue
            narrow = out.type
            wide = g.make_node("cast", [out], {"dtype": narrow.dtype}, [narrow], index=at + 1)
            g.replace_all_uses(out, wide.output)
            wide.inputs = [out]   # (replace_all_uses rewrote the cast's own input too)
            out.type = TensorType(f32, narrow.shape)
    g.toposort()
    return g
