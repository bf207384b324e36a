"""Feed 16-bit values straight into the kernels that would upcast them anyway.

A bf16 model often casts the feedback's q_b and k_b to float32 before the op (the reference does,
to compute the softmax in fp32):

    %to_8 = cast(%linear_5: bf16) {dtype=f32}
    %q, %k = split(%to_8)
    %s = feedback(%f, %q, %k, %gamma)

The upcast is exact, and every product of two bf16 (or fp16) values is exact in an fp32 accumulator,
so the feedback kernels compute the same function from the 16-bit values: they convert after each
load, feed the tensor cores 16-bit operands, and keep the solve in fp32. This pass rewrites the
operand to read the 16-bit value (through the same split/reshape), which halves the bytes loaded
and replaces 3xTF32 products with bf16 ones. Only ``q_b``/``k_b`` of ``feedback`` move: ``f`` and
``gamma`` keep their cast (the output dtype and the solve follow them).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph, Value
from ..ir.types import TensorType
from .manager import Pass, PassResult

NARROW = ("bf16", "f16")
LAYOUT = ("split", "reshape", "slice")   # ops that only move or select elements


def _narrow_source(v: Value):
    """The 16-bit value that ``v`` is an exact upcast of (through layout ops), else None; with the
    chain of layout nodes between them, outermost first."""
    chain = []
    while v.producer is not None and v.producer.op in LAYOUT:
        chain.append(v)
        v = v.producer.inputs[0]
        if not isinstance(v, Value):
            return None, []
    node = v.producer
    if node is None or node.op != "cast" or v.type.dtype.name != "f32":
        return None, []
    src = node.inputs[0]
    if not isinstance(src, Value) or src.type.dtype.name not in NARROW:
        return None, []
    return src, chain


@dataclass
class SinkCasts(Pass):
    """Rewrite ``feedback``'s q_b and k_b to their 16-bit sources when they are exact upcasts."""

    name = "sink-casts"

    def run(self, graph: Graph) -> PassResult:
        count, decisions = 0, []
        replayed: dict = {}   # (layout node, its new input) -> the 16-bit copy, so q_b and k_b share one split
        for node in [n for n in graph.nodes if n.op == "feedback"]:
            for idx in (1, 2):
                v = node.inputs[idx]
                if not isinstance(v, Value):
                    continue
                src, chain = _narrow_source(v)
                if src is None:
                    continue
                new = src
                for layout_v in reversed(chain):   # replay the layout ops on the 16-bit value
                    old = layout_v.producer
                    made = replayed.get((id(old), id(new)))
                    if made is None:
                        types = [TensorType(src.type.dtype, o.type.shape) for o in old.outputs]
                        made = graph.make_node(old.op, [new] + list(old.inputs[1:]), old.attrs, types,
                                               names=[graph.fresh_name(o.name + "_narrow") for o in old.outputs],
                                               index=graph.nodes.index(node))
                        replayed[(id(old), id(new))] = made
                    new = made.outputs[old.outputs.index(layout_v)]
                node.inputs[idx] = new
                decisions.append(f"%{node.output.name}: {('q_b', 'k_b')[idx - 1]} reads %{new.name} "
                                      f"({src.type.dtype.name}) instead of its fp32 upcast")
                count += 1
        if count:
            graph.dead_code_elimination()
        return PassResult(count, decisions)
