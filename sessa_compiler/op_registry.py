"""Which IR op each backend and export supports, and how: one record per (op, target).

Each target keeps its own table next to its code; this module only reads them:

    eager      semantics.SEMANTICS                                     every op, by definition
    triton     backends/triton: backend._generator (kernels), fused._expr (ops inside fused kernels), and
               passes: chunk-feedback / chunk-scan (feedback, scan -> blocked kernels), fuse (fusible ops);
               every other op runs on torch between the kernels (the eager semantics), as does any kernel op
               whose dtype has no kernel (float64 stays on torch)
    tvm        backends/tvm/lowering.KERNEL_OPS (generated kernels); whole-graph mode runs the rest as Relax
               ops, hybrid mode (some op without a Relax lowering) runs them on torch
    tvm-relax  backends/tvm/relax_lower: SIMPLE, COMPLEX, KERNEL_OPS; GAPS says why an op has none
    onnx       export/onnx_lower.LOWERINGS (+ onnx_core's core ops); GAPS says why an op has none

``coverage()`` returns {target: {op: Cell}}; a cell is supported (``how`` says how) or a gap with a reason.
tests/test_op_coverage.py prints the matrix and fails on a gap without a reason or a table entry for an op
the IR does not have.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from .ir.ops import OPS

TARGETS = ("eager", "triton", "tvm", "tvm-relax", "onnx")


@dataclass(frozen=True)
class Cell:
    supported: bool
    how: str          # supported: how the target runs it; gap: the reason it cannot

    def short(self) -> str:
        return self.how.split(":")[0] if self.supported else "GAP"


def _eager() -> dict:
    from .semantics import SEMANTICS

    return {op: Cell(True, "torch: semantics") for op in SEMANTICS}


def triton_kernel_ops() -> set:
    """Ops the Triton backend generates a kernel for when a node of that op reaches it."""
    from .backends.triton.backend import _generator

    return {op for op in OPS if _generator(SimpleNamespace(op=op, attrs={"causal": True})) is not None}


def triton_fused_ops() -> set:
    """Ops the fusion pass may group that the fused-kernel generator has a Triton spelling for."""
    from .backends.triton.fused import _expr
    from .errors import UnsupportedError
    from .ir.types import DType
    from .passes.fuse import POINTWISE_OPS, ROW_NOOP_OPS, ROW_OPS

    out = set()
    for op in POINTWISE_OPS | ROW_NOOP_OPS | ROW_OPS:
        node = SimpleNamespace(op=op, attrs={"dtype": DType("f16"), "eps": 1e-5})
        try:
            _expr(node, ["a", "b", "c"])
        except UnsupportedError:
            continue
        out.add(op)
    return out


def _triton() -> dict:
    kernels, fused = triton_kernel_ops(), triton_fused_ops()
    table = {}
    for op in OPS:
        if op in kernels:
            note = "non-causal runs on torch; " if op == "attention" else ""
            table[op] = Cell(True, f"kernel: generated Triton kernel ({note}float64 stays on torch)")
        elif op == "feedback":
            table[op] = Cell(True, "kernel: the chunk-feedback pass makes feedback_lse/diag_inverse/chunked kernels "
                                   "(float64 stays on torch)")
        elif op == "scan":
            table[op] = Cell(True, "kernel: the chunk-scan pass makes a scan_chunked kernel (float64 stays on torch)")
        elif op in fused:
            table[op] = Cell(True, "fused: inside a fused kernel when the fusion pass groups it, else on torch")
        else:
            table[op] = Cell(True, "torch: runs on torch between kernels (eager semantics)")
    return table


def _tvm() -> dict:
    from .backends.tvm.lowering import KERNEL_OPS

    relax = _relax()
    table = {}
    for op in OPS:
        if op in KERNEL_OPS:
            table[op] = Cell(True, "kernel: generated TVM kernel (static widths; a node without one runs on torch, or, "
                                   "for attention in whole-graph mode, as Relax ops)")
        elif op == "fallback":
            table[op] = Cell(True, "relax: the aten targets of semantics/fallback_forms.py in whole-graph mode; "
                                   "any other target runs on torch (hybrid mode)")
        elif op in relax and relax[op].supported:
            table[op] = Cell(True, "relax: a Relax op in whole-graph mode, torch in hybrid mode")
        else:
            table[op] = Cell(True, "torch: hybrid mode runs it on torch (no Relax lowering)")
    return table


def _relax() -> dict:
    from .backends.tvm.lowering import KERNEL_OPS
    from .backends.tvm.relax_lower import COMPLEX, GAPS, SIMPLE

    table = {op: Cell(True, "lowered: Relax op") for op in SIMPLE}
    table.update({op: Cell(True, "lowered: Relax ops") for op in COMPLEX})
    table.update({op: Cell(True, "kernel: call_tir to the generated TVM kernel") for op in KERNEL_OPS})
    table["fallback"] = Cell(True, "lowered: the aten targets of semantics/fallback_forms.py "
                                   "(backends/tvm/relax_fallback.py); others fail naming the op and line")
    table.update({op: Cell(False, why) for op, why in GAPS.items()})
    return table


def _onnx() -> dict:
    from .export import onnx_core  # noqa: F401  (its lowerings are entries of LOWERINGS)
    from .export.onnx_lower import GAPS, LOWERINGS

    table = {op: Cell(True, "lowered: standard ONNX ops") for op in LOWERINGS}
    if "fallback" in table:
        table["fallback"] = Cell(True, "lowered: the aten targets of semantics/fallback_forms.py and the others "
                                       "export/onnx_fallback.py or torch.onnx know; others fail naming the op and line")
    table.update({op: Cell(False, why) for op, why in GAPS.items()})
    return table


_BUILDERS = {"eager": _eager, "triton": _triton, "tvm": _tvm, "tvm-relax": _relax, "onnx": _onnx}


def registry(target: str) -> dict:
    """{op: Cell} as the target's own tables declare it (may name ops the IR lacks: the test checks)."""
    return _BUILDERS[target]()


def coverage(targets=TARGETS) -> dict:
    """{target: {op: Cell}} over every op in OPS; an op the target's tables do not mention is a gap with an
    empty reason (which the coverage test rejects)."""
    out = {}
    for t in targets:
        reg = registry(t)
        out[t] = {op: reg.get(op, Cell(False, "")) for op in OPS}
    return out


def format_matrix(cov: dict) -> str:
    targets = list(cov)
    width = max(len(op) for op in OPS)
    lines = [" " * width + "  " + "  ".join(f"{t:<9}" for t in targets)]
    for op in OPS:
        lines.append(f"{op:<{width}}  " + "  ".join(f"{cov[t][op].short():<9}" for t in targets))
    gaps = [(t, op, c.how) for t in targets for op, c in cov[t].items() if not c.supported]
    if gaps:
        lines.append("gaps:")
        lines += [f"  {t:<9} {op:<22} {why or '(no reason given)'}" for t, op, why in gaps]
    return "\n".join(lines)
