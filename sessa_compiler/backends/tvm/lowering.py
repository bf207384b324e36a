"""IR node -> TVM kernel spec: which core ops lower to generated TVM kernels, and why others do not."""
from __future__ import annotations

from dataclasses import dataclass

from ...ir.dtypes import TVM_NAME, compute_name
from ...ir.graph import Graph, Node, Value
from .build import attention_spec, feedback_spec, scan_spec, tri_solve_spec

# the core ops TVM generates kernels for (rope runs inside attention or through torch)
KERNEL_OPS = ("attention", "feedback", "scan", "tri_solve")


def kernel_dtype(name: str) -> str | None:
    """The dtype a TVM kernel computes a float operand of IR dtype ``name`` in (at least float32)."""
    return TVM_NAME[compute_name(name)] if name in ("f64", "f32", "bf16", "f16") else None


@dataclass
class Lowered:
    node: Node
    spec: object = None      # KernelSpec, or None when the node runs through torch
    reason: str = ""         # why a core op did not lower


def _static(d) -> int | None:
    return d if isinstance(d, int) else None


def lower_node(node: Node, lanes: int = 8, schedules: dict | None = None) -> Lowered:
    """A KernelSpec for a core op this backend generates kernels for; otherwise the reason it cannot."""
    schedules = schedules or {}
    if node.op not in KERNEL_OPS:
        return Lowered(node)
    ins = [x for x in node.inputs]
    first = ins[0].type
    dtype = kernel_dtype(first.dtype.name)
    if dtype is None:
        return Lowered(node, None, f"dtype {first.dtype} has no TVM kernel")
    if any(isinstance(x, Value) and x.type.dtype != first.dtype for x in ins[:3]):
        return Lowered(node, None, "operands of mixed dtypes")
    sched = schedules.get(node.op)
    if node.op == "tri_solve":
        A, b = ins[0].type, ins[1].type
        width = _static(b.shape[-1])
        if width is None:
            return Lowered(node, None, f"right-hand side width {b.shape[-1]} is not static")
        if A.rank != b.rank:
            return Lowered(node, None, "weights broadcast over the right-hand side's leading dims")
        if A.dtype != b.dtype:
            return Lowered(node, None, "operands of mixed dtypes")
        return Lowered(node, tri_solve_spec(width, node.attrs["unitriangular"], dtype, sched, lanes))
    if node.op == "feedback":
        width = _static(first.shape[2])
        if width is None:
            return Lowered(node, None, f"feedback width {first.shape[2]} is not static")
        return Lowered(node, feedback_spec(width, node.attrs["scale"], dtype, sched, lanes))
    if node.op == "attention":
        q, k, v = (x.type for x in ins[:3])
        H, HKV, DH, DV = (_static(s) for s in (q.shape[2], k.shape[2], q.shape[3], v.shape[3]))
        if None in (H, HKV, DH, DV):
            return Lowered(node, None, "head counts and head width must be static")
        if not node.attrs.get("causal", False):
            return Lowered(node, None, "non-causal attention has no TVM kernel")
        kp = bool(node.attrs.get("key_padding", False))
        if kp and node.attrs.get("empty_rows", "mean") != "mean":
            return Lowered(node, None, "attention with a key-padding mask whose empty rows are NaN has no TVM kernel "
                                       "(a composite Relax form in whole-graph mode and in export_tvm, torch "
                                       "otherwise)")
        if DV != DH:
            return Lowered(node, None, f"value width {DV} differs from query width {DH}")
        rope = bool(node.attrs.get("rope", False))
        if rope and ins[3].type.dtype != first.dtype:
            return Lowered(node, None, "inv_freq dtype differs from q")
        return Lowered(node, attention_spec(H, HKV, DH, node.attrs["scale"], rope, dtype, sched, lanes,
                                            key_padding=kp))
    u, A = ins[0].type, ins[2].type
    DIN, N = _static(u.shape[2]), _static(A.shape[1])
    if None in (DIN, N):
        return Lowered(node, None, "scan channels and state size must be static")
    if any(x.type.dtype != first.dtype for x in ins):
        return Lowered(node, None, "operands of mixed dtypes")
    return Lowered(node, scan_spec(DIN, N, dtype, sched, lanes))


def lower_graph(graph: Graph, lanes: int = 8, schedules: dict | None = None) -> list:
    return [lower_node(n, lanes, schedules) for n in graph.nodes]
