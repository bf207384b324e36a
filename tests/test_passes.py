"""Passes: the pass manager, golden text (parse -> pass -> print -> compare), numerics on eager."""
import io
import math

import pytest
import torch

from sessa_compiler.backends.eager import run_graph
from sessa_compiler.semantics import feedback_ref, scan_ref
from sessa_compiler.errors import IRError, UnsupportedError
from sessa_compiler.ir import parse
from sessa_compiler.passes import (
    PRINT_IR_ENV,
    ChunkFeedback,
    ChunkScan,
    FeedbackCost,
    Pass,
    PassManager,
    Simplify,
    build_pipeline,
    run_pipeline,
)


def golden(pass_, text: str) -> str:
    g = parse(text)
    PassManager([pass_]).run(g)
    return str(g)


FEEDBACK_IR = """\
graph fb(%f: f32[B, T, 24], %qb: f32[B, T, 16], %kb: f32[B, T, 16], %g: f32[B, T]) {
  %s: f32[B, T, 24] = feedback(%f, %qb, %kb, %g) {scale=0.25}
  %y: f32[B, T, 24] = mul(%s, 2.0)
  return %y
}
"""

FEEDBACK_CHUNKED_IR = """\
graph fb(%f: f32[B, T, 24], %qb: f32[B, T, 16], %kb: f32[B, T, 16], %g: f32[B, T]) {
  %s_lse: f32[B, T] = feedback_lse(%qb, %kb) {scale=0.25}
  %s_dinv: f32[B, ceiling(T/32), 32, 32] = feedback_diag_inverse(%qb, %kb, %g, %s_lse) {scale=0.25, chunk_size=32}
  %s: f32[B, T, 24] = feedback_chunked(%f, %qb, %kb, %g, %s_lse, %s_dinv) {scale=0.25, chunk_size=32}
  %y: f32[B, T, 24] = mul(%s, 2.0)
  return %y
}
"""

SCAN_IR = """\
graph ssm(%u: f64[B, T, 20], %dt: f64[B, T, 20], %Bm: f64[B, T, 5], %Cm: f64[B, T, 5]) {
  param %A: f64[20, 5]
  param %D: f64[20]
  %y: f64[B, T, 20] = scan(%u, %dt, %A, %Bm, %Cm, %D)
  return %y
}
"""


def test_chunk_feedback_golden():
    assert golden(ChunkFeedback(chunk_size=32), FEEDBACK_IR) == FEEDBACK_CHUNKED_IR


def test_chunked_text_round_trips():
    assert str(parse(FEEDBACK_CHUNKED_IR)) == FEEDBACK_CHUNKED_IR


def test_chunk_scan_golden():
    expected = SCAN_IR.replace("scan(%u, %dt, %A, %Bm, %Cm, %D)", "scan_chunked(%u, %dt, %A, %Bm, %Cm, %D) {chunk_size=16}")
    assert golden(ChunkScan(chunk_size=16), SCAN_IR) == expected


def test_simplify_golden():
    text = """\
graph g(%x: f32[B, T, 8]) {
  %a: f32[B, 8, T] = transpose(%x) {dim0=1, dim1=2}
  %b: f32[B, T, 8] = transpose(%a) {dim0=1, dim1=2}
  %c: f32[B, T, 8] = cast(%b) {dtype=dtype.f32}
  %y: f32[B, T, 8] = tanh(%c)
  return %y
}
"""
    assert golden(Simplify(), text) == """\
graph g(%x: f32[B, T, 8]) {
  %y: f32[B, T, 8] = tanh(%x)
  return %y
}
"""


def test_simplify_rewrites_a_hand_written_softmax_by_structure():
    text = """\
graph g(%x: f32[B, T, 8]) {
  %m: f32[B, T, 1] = amax(%x) {dims=[-1], keepdim=True}
  %z: f32[B, T, 8] = sub(%x, %m)
  %e: f32[B, T, 8] = exp(%z)
  %m2: f32[B, T, 1] = amax(%x) {dims=[-1], keepdim=True}
  %z2: f32[B, T, 8] = sub(%x, %m2)
  %e2: f32[B, T, 8] = exp(%z2)
  %s: f32[B, T, 1] = sum(%e2) {dims=[-1], keepdim=True}
  %y: f32[B, T, 8] = div(%e, %s)
  %s1: f32[B, 1, 8] = sum(%e) {dims=[1], keepdim=True}
  %w: f32[B, T, 8] = div(%e, %s1)
  %o: f32[B, T, 8] = add(%y, %w)
  return %o
}
"""
    out = golden(Simplify(), text)
    assert "  %softmax: f32[B, T, 8] = softmax(%x) {dim=2}\n" in out, out       # max and sum over the same dim
    assert "softmax(%z) {dim=1}" in out and "exp" not in out, out             # sum over another dim: of x - max
    x = torch.randn(2, 5, 8)
    assert torch.allclose(run_graph(parse(out), [x])[0], run_graph(parse(text), [x])[0], atol=1e-6)


def test_cost_model_picks_a_legal_chunk_and_says_why():
    p = ChunkFeedback()
    g = parse(FEEDBACK_IR)
    pm = PassManager([p])
    pm.run(g)
    node = next(n for n in g.nodes if n.op == "feedback_chunked")
    assert node.attrs["chunk_size"] in (16, 32, 64)
    decisions = pm.records[0].decisions
    assert len(decisions) == 1 and "cost model" in decisions[0] and "C=16" in decisions[0]
    assert p.run(parse(FEEDBACK_IR)).decisions == decisions   # a second run decides afresh: nothing kept on p
    cost = FeedbackCost()
    # long sequences favour large chunks (fewer sequential steps); the register budget caps them
    assert cost.choose(65536, 1024, 1024)[0] == 64
    assert not cost.fits(128)
    # with free steps the model prefers the fewest FLOPs: the smallest chunk
    assert FeedbackCost(step_latency_s=0.0).choose(4096, 64, 64)[0] == 16


def test_print_ir_after_each_pass_argument_and_env(monkeypatch):
    out = io.StringIO()
    PassManager([Simplify(), ChunkFeedback(chunk_size=16)], print_ir=True, stream=out).run(parse(FEEDBACK_IR))
    text = out.getvalue()
    assert "// ----- IR before any pass -----" in text
    assert "// ----- IR after chunk-feedback{chunk_size=16} (1 rewrite(s)) -----" in text
    assert "feedback_chunked(" in text.split("after chunk-feedback")[1]
    monkeypatch.setenv(PRINT_IR_ENV, "1")
    out2 = io.StringIO()
    PassManager([Simplify()], stream=out2).run(parse(FEEDBACK_IR))
    assert "after simplify" in out2.getvalue()
    monkeypatch.setenv(PRINT_IR_ENV, "0")
    out3 = io.StringIO()
    PassManager([Simplify()], stream=out3).run(parse(FEEDBACK_IR))
    assert out3.getvalue() == ""


def test_a_pass_that_breaks_the_ir_is_named():
    class Breaker(Pass):
        name = "breaker"

        def run(self, graph):
            graph.nodes[0].attrs["scale"] = "oops"
            return 1

    with pytest.raises(IRError, match="after pass 'breaker'.*attribute 'scale'"):
        PassManager([Breaker()]).run(parse(FEEDBACK_IR))


def test_pipelines_per_backend():
    assert [p.name for p in build_pipeline("eager").passes] == ["simplify"]
    pm = build_pipeline("triton", feedback_chunk_size=32)
    assert [p.name for p in pm.passes] == ["simplify", "sink-casts", "chunk-feedback", "chunk-scan"]
    assert str(pm) == "simplify -> sink-casts -> chunk-feedback{chunk_size=32} -> chunk-scan{chunk_size=None}"
    with pytest.raises(UnsupportedError, match="no pass pipeline for backend 'nope'"):
        build_pipeline("nope")
    g = parse(FEEDBACK_IR)
    pm = run_pipeline(g, "triton", feedback_chunk_size=16)
    assert [r.rewrites for r in pm.records] == [0, 0, 1, 0]
    assert g.ops() == ["feedback_lse", "feedback_diag_inverse", "feedback_chunked", "mul"]


@pytest.mark.parametrize("bad, msg", [
    ("chunk_size=24", "chunk_size must be a power of two >= 16"),
    ("chunk_size=8", "chunk_size must be a power of two >= 16"),
])
def test_blocked_ops_verify(bad, msg):
    with pytest.raises(IRError, match=msg):
        parse(FEEDBACK_CHUNKED_IR.replace("chunk_size=32", bad))


def test_dinv_shape_is_checked():
    text = FEEDBACK_CHUNKED_IR.replace("f32[B, ceiling(T/32), 32, 32] = feedback_diag_inverse",
                                       "f32[B, ceiling(T/16), 32, 32] = feedback_diag_inverse")
    with pytest.raises(IRError, match="feedback_diag_inverse"):
        parse(text)


# -- numerics: the chunked IR on the eager backend equals the unchunked one ------------------------------
def _feedback_inputs(T, dtype, gamma_sign, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(2, T, 24, generator=gen, dtype=torch.float64)
    qb = torch.randn(2, T, 16, generator=gen, dtype=torch.float64) * 2
    kb = torch.randn(2, T, 16, generator=gen, dtype=torch.float64) * 2
    g = 0.999 * torch.tanh(gamma_sign * 8.0 + 0.1 * torch.randn(2, T, generator=gen, dtype=torch.float64))
    return [t.to(dtype) for t in (f, qb, kb, g)]


@pytest.mark.parametrize("T", [1, 15, 16, 17, 40, 64])
@pytest.mark.parametrize("gamma_sign", [1.0, -1.0])
def test_chunked_feedback_matches_feedback_float64(T, gamma_sign):
    text = FEEDBACK_IR.replace("f32", "f64")
    g = parse(text)
    inputs = _feedback_inputs(T, torch.float64, gamma_sign)
    ref = run_graph(g, inputs)[0]
    run_pipeline(g, "triton", feedback_chunk_size=16)
    assert "feedback" not in g.ops()
    out = run_graph(g, inputs)[0]
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


def test_chunked_feedback_float32_against_float64_reference():
    g = parse(FEEDBACK_IR)
    run_pipeline(g, "triton", feedback_chunk_size=16)
    inputs = _feedback_inputs(37, torch.float32, 1.0, seed=3)
    out = run_graph(g, inputs)[0]
    ref = 2 * feedback_ref(*[t.double() for t in inputs], 0.25)
    assert (out.double() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("T", [1, 16, 23])
def test_chunked_scan_matches_scan(T):
    gen = torch.Generator().manual_seed(T)
    u, Bm, Cm = (torch.randn(2, T, n, generator=gen, dtype=torch.float64) for n in (20, 5, 5))
    dt = torch.rand(2, T, 20, generator=gen, dtype=torch.float64)
    A = -torch.rand(20, 5, generator=gen, dtype=torch.float64) * 4
    D = torch.randn(20, generator=gen, dtype=torch.float64)
    g = parse(SCAN_IR)
    g.params.update({"A": A, "D": D})
    ref = scan_ref(u, dt, A, Bm, Cm, D)
    PassManager([ChunkScan(chunk_size=16)]).run(g)
    out = run_graph(g, [u, dt, Bm, Cm])[0]
    assert (out - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())


def test_lse_row_zero_is_zero_and_rows_match_logsumexp():
    from sessa_compiler.semantics.chunked import feedback_lse

    q, k = torch.randn(1, 9, 4, dtype=torch.float64), torch.randn(1, 9, 4, dtype=torch.float64)
    lse = feedback_lse(q, k, scale=0.5, row_block=4)
    assert lse[0, 0] == 0.0
    for t in range(1, 9):
        want = torch.logsumexp((q[0, t] @ k[0, :t].T) * 0.5, dim=0)
        assert math.isclose(lse[0, t].item(), want.item(), rel_tol=1e-12)
