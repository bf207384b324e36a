"""The OPS x {eager, triton, tvm, tvm-relax, onnx} coverage matrix (sessa_compiler/op_registry.py), printed with
``pytest -s``: every cell is supported (the target's own table has the op) or a gap whose reason the target's
table states; no table names an op the IR does not have."""
from __future__ import annotations

import pytest

from sessa_compiler.ir.ops import BINARY, COMPARE, CORE_OPS, OPS, UNARY
from sessa_compiler.op_registry import TARGETS, Cell, coverage, format_matrix, registry


def problems(cov: dict, tables: dict) -> list:
    """What is wrong with a coverage matrix and the tables it was read from."""
    out = []
    for target, cells in cov.items():
        for op, cell in cells.items():
            if not cell.supported and not cell.how.strip():
                out.append(f"{target}: {op} is a gap without a stated reason")
    for target, table in tables.items():
        for op in table:
            if op not in OPS:
                out.append(f"{target}: the table has an entry for {op!r}, which is not an IR op")
    return out


@pytest.fixture(scope="module")
def cov():
    return coverage()


def raw_tables() -> dict:
    """Every per-target table the registry reads, by the name of the table."""
    from sessa_compiler.backends.triton import fused as triton_fused
    from sessa_compiler.backends.tvm import relax_lower
    from sessa_compiler.backends.tvm.lowering import KERNEL_OPS
    from sessa_compiler.export import onnx_core  # noqa: F401
    from sessa_compiler.export import onnx_lower
    from sessa_compiler.passes.fuse import POINTWISE_OPS, ROW_NOOP_OPS, ROW_OPS
    from sessa_compiler.semantics import SEMANTICS

    tables = {"semantics": SEMANTICS, "relax SIMPLE": relax_lower.SIMPLE, "relax COMPLEX": relax_lower.COMPLEX,
              "relax GAPS": relax_lower.GAPS, "tvm KERNEL_OPS": KERNEL_OPS, "onnx LOWERINGS": onnx_lower.LOWERINGS,
              "onnx GAPS": onnx_lower.GAPS, "triton fused unary": triton_fused._UNARY,
              "triton fused binary": triton_fused._BINARY, "fusion pass": POINTWISE_OPS | ROW_NOOP_OPS | ROW_OPS}
    tables.update({f"registry {t}": registry(t) for t in TARGETS})
    return tables


def test_print_and_check_the_coverage_matrix(cov):
    print("\n" + format_matrix(cov))
    assert list(cov) == list(TARGETS)
    assert all(set(cells) == set(OPS) for cells in cov.values())
    assert problems(cov, raw_tables()) == []


def test_the_check_catches_a_gap_without_reason_and_a_stray_entry(cov):
    bad = {t: dict(cells) for t, cells in cov.items()}
    bad["onnx"]["fused"] = Cell(False, " ")
    found = set(problems(bad, {"relax GAPS": {"no_such_op": "why"}})) - set(problems(cov, {}))
    assert found == {"onnx: fused is a gap without a stated reason",
                     "relax GAPS: the table has an entry for 'no_such_op', which is not an IR op"}


def test_no_op_is_both_lowered_and_listed_as_a_gap():
    from sessa_compiler.backends.tvm import relax_lower
    from sessa_compiler.export import onnx_lower

    assert set(relax_lower.GAPS) & (set(relax_lower.SIMPLE) | set(relax_lower.COMPLEX)) == set()
    assert set(onnx_lower.GAPS) & set(onnx_lower.LOWERINGS) == set()


def test_eager_has_every_op_and_the_traced_ops_have_no_gaps_in_any_target(cov):
    """The ops a traced graph holds (all but the blocked and fused forms passes make) are covered everywhere
    but a fallback in TVM, which calls an arbitrary torch op."""
    assert all(c.supported for c in cov["eager"].values())
    made_by_passes = {"feedback_lse", "feedback_diag_inverse", "feedback_chunked", "scan_chunked", "fused"}
    # the ONNX export runs the chunk passes first (pipeline "onnx"): it lowers the blocked feedback ops, and
    # feedback itself never reaches its lowering (tests/test_onnx_export.py checks the rewrite)
    assert {op for op, c in cov["onnx"].items() if not c.supported} == {"feedback", "fused"}
    for target in TARGETS:
        rewritten = {"feedback"} if target == "onnx" else set()
        gaps = {op for op, c in cov[target].items() if not c.supported} - made_by_passes - rewritten
        assert gaps <= {"fallback"}, (target, gaps)


def test_export_tvm_lowers_every_op_compile_tvm_runs_as_a_relax_op_or_kernel(cov):
    """compile(backend="tvm") runs a traced graph whole in TVM or, when an op has no Relax lowering, partly on
    torch; export_tvm needs every op lowered. It takes every traced op (fallback: the aten targets of
    semantics/fallback_forms.py; tests/test_export_fallbacks.py refuses one outside it)."""
    torch_only = {op for op, c in cov["tvm"].items() if c.short() == "torch"}
    assert torch_only == {op for op, c in cov["tvm-relax"].items() if not c.supported}
    made_by_passes = {"feedback_lse", "feedback_diag_inverse", "feedback_chunked", "scan_chunked", "fused"}
    assert torch_only - made_by_passes == set()

def test_op_families_are_read_from_the_ir():
    """The unary/binary/compare lists and the core ops are the IR's; every target covers each family member."""
    assert set(CORE_OPS) == {"attention", "feedback", "tri_solve", "scan", "rope"}
    for target, cells in coverage().items():
        for op in UNARY + BINARY + COMPARE:
            assert cells[op].supported, (target, op)


def test_every_op_the_fusion_pass_groups_has_a_triton_spelling():
    """The fusion pass's pointwise set is derived from the IR's op families: a new unary or binary op becomes
    fusible at once, so the fused-kernel generator must spell it (or fuse.py must exclude it)."""
    from sessa_compiler.op_registry import triton_fused_ops
    from sessa_compiler.passes.fuse import POINTWISE_OPS, ROW_NOOP_OPS, ROW_OPS

    assert (POINTWISE_OPS | ROW_NOOP_OPS | ROW_OPS) - triton_fused_ops() == set()
