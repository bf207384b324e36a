"""TVM backend: every generated kernel (and each tunable variant of each schedule) against the
plain references, dynamic T from one build, misaligned / strided operands, and compile(backend="tvm")
against the eager backend for every reference model and the independently written styles.

Builds are cached per process (sessa_compiler.backends.tvm.build._CACHE), so each kernel shape is
compiled once for the whole module.
"""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import tvm  # noqa: E402 - pinned in requirements/all.txt, so CI always runs these tests

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.api import relative_error  # noqa: E402
from sessa_compiler.semantics import attention_ref, feedback_ref, scan_ref  # noqa: E402
from sessa_compiler.backends.tvm import schedules as S  # noqa: E402
from sessa_compiler.backends.tvm.backend import ALIGN, KernelCall, TVMBackend  # noqa: E402
from sessa_compiler.backends.tvm.build import attention_spec, build, feedback_spec, kernel_source, scan_spec  # noqa: E402
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer, TransformerLayer  # noqa: E402
from model_helpers import randomize

tvm_build = importlib.import_module("sessa_compiler.backends.tvm.build")

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
DT = {torch.float32: "float32", torch.float64: "float64"}


def rel(out, ref):
    return relative_error(out, ref.to(out.dtype) if out.dtype != ref.dtype else ref)


def run(kernel, *args):
    import collections
    return KernelCall(kernel, collections.Counter())(*args)


def one_field_variants(default, space, limit=None):
    """The default plus, for every tunable, each other value it takes in the space (one field
    changed at a time where such a variant exists, else the nearest variant with that value)."""
    out = [default]
    for f in dataclasses.fields(default):
        for value in sorted({getattr(s, f.name) for s in space}):
            if value == getattr(default, f.name):
                continue
            cand = dataclasses.replace(default, **{f.name: value})
            if cand not in space:
                cand = next((s for s in space if getattr(s, f.name) == value), None)
            if cand is not None and cand not in out:
                out.append(cand)
    return out[:limit] if limit else out


# -- feedback ----------------------------------------------------------------------------------------
def feedback_inputs(B, T, D, dtype, gamma_bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    f, q, k = (torch.randn(B, T, D, generator=g, dtype=dtype) for _ in range(3))
    gamma = 0.999 * torch.tanh(gamma_bias + 0.5 * torch.randn(B, T, generator=g, dtype=dtype))
    return f, q, k, gamma


FEEDBACK_WIDTH = 32
FEEDBACK_VARIANTS = one_field_variants(S.FeedbackSchedule(chunk=32, key_block=16, rows=4, col_block=16, gemm_rows=4),
                                       S.feedback_space(FEEDBACK_WIDTH))


@pytest.mark.parametrize("sched", FEEDBACK_VARIANTS, ids=lambda s: s.tag())
def test_feedback_every_schedule_variant(sched):
    kern = build(feedback_spec(FEEDBACK_WIDTH, FEEDBACK_WIDTH ** -0.5, "float32", sched))
    for B, T in ((2, 1), (1, 37), (2, sched.chunk * 2 + 5)):
        f, q, k, g = feedback_inputs(B, T, FEEDBACK_WIDTH, torch.float32, seed=T)
        ref = feedback_ref(f.double(), q.double(), k.double(), g.double(), FEEDBACK_WIDTH ** -0.5)
        assert rel(run(kern, f, q, k, g), ref) < TOL[torch.float32], (sched, B, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma_bias", [0.0, 8.0, -8.0], ids=["gamma_mild", "gamma_near_plus_max", "gamma_near_minus_max"])
def test_feedback_dtypes_and_extreme_gamma(dtype, gamma_bias):
    D = 24  # not a power of two: col_block falls back to 8
    kern = build(feedback_spec(D, D ** -0.5, DT[dtype]))
    for B, T in ((1, 1), (3, 67), (1, 150)):
        f, q, k, g = feedback_inputs(B, T, D, dtype, gamma_bias, seed=T)
        if gamma_bias:
            assert g.abs().max() > 0.99
        ref = feedback_ref(f.double(), q.double(), k.double(), g.double(), D ** -0.5)
        out = run(kern, f, q, k, g)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel(out, ref) < TOL[dtype], (dtype, gamma_bias, B, T)


def test_feedback_is_not_the_identity():
    # guards the test itself: a kernel returning f (or zeros) must fail the comparison
    f, q, k, g = feedback_inputs(1, 40, 16, torch.float32, 2.0)
    ref = feedback_ref(f, q, k, g, 0.25)
    assert rel(f, ref) > 1e-2
    assert rel(run(build(feedback_spec(16, 0.25, "float32")), f, q, k, g), ref) < 1e-4


# -- attention ---------------------------------------------------------------------------------------
def attention_inputs(B, T, H, HKV, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g, dtype=dtype)
    k = torch.randn(B, T, HKV, d, generator=g, dtype=dtype)
    v = torch.randn(B, T, HKV, d, generator=g, dtype=dtype)
    inv = (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)).to(dtype)
    return q, k, v, inv


ATTENTION_VARIANTS = one_field_variants(S.AttentionSchedule(q_block=32, k_block=16, rows=4, v_lanes=16),
                                        S.attention_space(16))


@pytest.mark.parametrize("sched", ATTENTION_VARIANTS, ids=lambda s: s.tag())
def test_attention_every_schedule_variant(sched):
    H, HKV, d = 4, 2, 16
    kern = build(attention_spec(H, HKV, d, d ** -0.5, True, "float32", sched))
    for B, T in ((1, 1), (2, 37), (1, sched.q_block * 3 + 1)):
        q, k, v, inv = attention_inputs(B, T, H, HKV, d, torch.float32, seed=T)
        ref = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, True, inv.double())
        assert rel(run(kern, q, k, v, inv), ref) < TOL[torch.float32], (sched, B, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,HKV,d,rope", [(1, 1, 8, True), (4, 1, 8, True), (3, 3, 12, False), (2, 1, 16, False)],
                         ids=["single_head", "gqa_mqa", "rope_off", "gqa_rope_off"])
def test_attention_shapes(dtype, H, HKV, d, rope):
    kern = build(attention_spec(H, HKV, d, d ** -0.5, rope, DT[dtype]))
    for B, T in ((2, 1), (1, 45), (2, 100)):
        q, k, v, inv = attention_inputs(B, T, H, HKV, d, dtype, seed=T)
        ref = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, True, inv.double() if rope else None)
        out = run(kern, q, k, v, inv) if rope else run(kern, q, k, v)
        assert out.dtype == dtype
        assert rel(out, ref) < TOL[dtype], (H, HKV, d, rope, B, T)


# -- scan --------------------------------------------------------------------------------------------
def scan_inputs(B, T, DIN, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, DIN, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(B, T, DIN, generator=g, dtype=dtype))
    A = -torch.exp(torch.randn(DIN, N, generator=g, dtype=dtype))
    Bm, Cm = torch.randn(B, T, N, generator=g, dtype=dtype), torch.randn(B, T, N, generator=g, dtype=dtype)
    Dv = torch.randn(DIN, generator=g, dtype=dtype)
    return u, delta, A, Bm, Cm, Dv


@pytest.mark.parametrize("sched", S.scan_space(32), ids=lambda s: s.tag())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_every_schedule_variant(sched, dtype):
    kern = build(scan_spec(32, 5, DT[dtype], sched))
    for B, T in ((1, 1), (2, 23)):
        args = scan_inputs(B, T, 32, 5, dtype, seed=T)
        ref = scan_ref(*(a.double() for a in args))
        assert rel(run(kern, *args), ref) < TOL[dtype], (sched, B, T)


# -- one build, every T; layouts -----------------------------------------------------------------------
def test_dynamic_sequence_length_from_one_build():
    spec = feedback_spec(16, 0.25, "float32", S.FeedbackSchedule(16, 8, 2, 8, 2))
    before = len(tvm_build._CACHE)
    kern = build(spec)
    for T in (1, 5, 16, 17, 90, 333):
        f, q, k, g = feedback_inputs(2, T, 16, torch.float32, seed=T)
        assert rel(run(kern, f, q, k, g), feedback_ref(f, q, k, g, 0.25)) < 1e-4
    assert build(spec) is kern
    assert len(tvm_build._CACHE) <= before + 1
    source = kernel_source(spec)  # batch and length are variables of the one PrimFunc
    assert "nt" in source and "IR op 'feedback'" in source and "chunk" in source


def test_misaligned_and_strided_operands_are_copied_not_crashed():
    import collections
    stats = collections.Counter()
    kern = build(feedback_spec(16, 0.25, "float32"))
    call = KernelCall(kern, stats)
    f, q, k, g = feedback_inputs(1, 41, 16, torch.float32)
    f_mis = torch.randn(1 * 41 * 16 + 1)[1:].view(1, 41, 16)   # 4-byte offset: misaligned
    assert f_mis.data_ptr() % ALIGN != 0
    q_strided = torch.randn(1, 41, 32)[..., ::2]                 # non-contiguous
    k_t = torch.randn(1, 16, 41).transpose(1, 2)                 # transposed view
    g_strided = torch.randn(1, 82)[:, ::2]
    ref = feedback_ref(f_mis, q_strided, k_t, g_strided, 0.25)
    out = call(f_mis, q_strided, k_t, g_strided)
    assert rel(out, ref) < 1e-4
    assert stats["aligned_copies"] == 4
    assert out.data_ptr() % ALIGN == 0
    # contiguous aligned operands go through without a copy (zero-copy DLPack)
    call(f, q, k, g)
    assert stats["aligned_copies"] == 4


# -- whole models ------------------------------------------------------------------------------------
def check_model(m, make_x, Ts=(1, 13, 70), dtype=torch.float32, whole_graph=True):
    m = m.to(dtype)
    eager = sc.compile(m, (make_x(2, 9),), backend="eager")
    compiled = sc.compile(m, (make_x(2, 9),), backend="tvm", options={"whole_graph": whole_graph})
    if not whole_graph:
        assert "mode: hybrid" in compiled.explain()
    runner = compiled._runner
    assert any(item.spec is not None for item in runner.plan), compiled.explain()
    before = runner.stats["kernel_calls"]
    for T in Ts:
        x = make_x(2, T)
        ref = eager(x)
        out = compiled(x)
        with torch.no_grad():
            orig = m(x)
        assert rel(out, ref) < TOL[dtype], (type(m).__name__, T)
        assert rel(out, orig) < TOL[dtype], (type(m).__name__, T)
    assert runner.stats["kernel_calls"] > before   # the TVM kernels really ran
    return compiled


def float_x(D, dtype=torch.float32):
    return lambda B, T: torch.randn(B, T, D, dtype=dtype)


@pytest.mark.parametrize("cfg,gamma_bias", [
    (dict(D=32, n_heads=4, n_kv_heads=2), None),
    (dict(D=16, n_heads=1), 8.0),
    (dict(D=24, n_heads=2, use_forward_rope=False), -8.0),
], ids=["gqa", "single_head_gamma_plus", "rope_off_gamma_minus"])
def test_sessa_layer_matches_eager(cfg, gamma_bias):
    c = check_model(randomize(SessaLayer(**cfg), gamma_bias), float_x(cfg["D"]))
    text = c.explain()
    assert "mode: whole graph" in text
    assert "feedback x1" in text and "attention x1" in text and "matmul kernels" in text


def test_sessa_layer_hybrid_mode_matches_eager():
    # core ops in TVM, everything else through torch (the path for graphs with ops TVM cannot lower)
    c = check_model(randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), 5.0), float_x(32), Ts=(1, 45),
                    whole_graph=False)
    assert "mode: hybrid" in c.explain() and "run through torch (its BLAS)" in c.explain()


def test_mamba_layer_hybrid_mode_matches_eager():
    check_model(randomize(MambaLayer(16, d_state=4)), float_x(16), Ts=(1, 30), whole_graph=False)


def test_whole_graph_outputs_are_not_overwritten_by_the_next_call():
    m = randomize(SessaLayer(16, n_heads=2))
    c = sc.compile(m, (torch.randn(1, 8, 16),), backend="tvm")
    x1, x2 = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    y1 = c(x1)
    kept = y1.clone()
    c(x2)
    assert torch.equal(y1, kept)


def test_sessa_layer_float64():
    c = check_model(randomize(SessaLayer(16, n_heads=2, n_kv_heads=1), 3.0), float_x(16, torch.float64),
                Ts=(1, 40), dtype=torch.float64)
    assert "mode: whole graph" in c.explain()


def test_mamba_layer_matches_eager():
    check_model(randomize(MambaLayer(16, d_state=4)), float_x(16))


def test_transformer_layer_matches_eager():
    check_model(randomize(TransformerLayer(32, n_heads=4, n_kv_heads=1)), float_x(32))


def test_decoder_matches_eager():
    dec = randomize(Decoder(37, 16, "SMTS", n_heads=2, d_state=4))
    c = check_model(dec, lambda B, T: torch.randint(0, 37, (B, T)), Ts=(1, 21))
    with pytest.raises(sc.InputError):   # an out-of-range token id is an error, not an out-of-bounds read
        c(torch.tensor([[0, 5, 37]]))


@pytest.mark.parametrize("style", ["sdpa", "matmul"])
def test_independent_styles_match_eager(style):
    from styles.loop_free_matmul_style import MatmulSessaLayer
    from styles.sdpa_style import SdpaSessaLayer
    cls = SdpaSessaLayer if style == "sdpa" else MatmulSessaLayer
    c = check_model(randomize(cls(16, n_heads=4, n_kv_heads=2), 2.0), float_x(16), Ts=(1, 33))
    assert "feedback" in c.explain()


@pytest.mark.parametrize("whole_graph", [True, False], ids=["whole_graph", "hybrid"])
def test_misaligned_module_input(whole_graph):
    m = randomize(SessaLayer(16, n_heads=2))
    c = sc.compile(m, (torch.randn(1, 8, 16),), backend="tvm", options={"whole_graph": whole_graph})
    x = torch.randn(1 * 20 * 16 + 3)[3:].view(1, 20, 16)
    assert x.data_ptr() % ALIGN != 0
    with torch.no_grad():
        assert rel(c(x), m(x)) < 1e-4
    xt = torch.randn(1, 16, 20).transpose(1, 2)
    with torch.no_grad():
        assert rel(c(xt), m(xt)) < 1e-4


def test_host_target_is_not_generic():
    b = TVMBackend()
    assert str(b.target.attrs["mcpu"]) not in ("", "generic", "x86-64", "native")
    assert str(b.target.kind.name) == "llvm"
    # the wheel's LLVM reports its own toolchain's triple (x86_64-conda-linux-gnu); explain() shows the host's
    assert "conda" not in str(b.target.attrs["mtriple"])


def test_canonical_triple_drops_the_toolchain_vendor():
    from sessa_compiler.backends.tvm.target import canonical_triple
    assert canonical_triple("x86_64-conda-linux-gnu") == "x86_64-unknown-linux-gnu"
    assert canonical_triple("aarch64-unknown-linux-gnu") == "aarch64-unknown-linux-gnu"
    assert canonical_triple("x86_64-pc-linux-gnu") == "x86_64-pc-linux-gnu"
    assert canonical_triple("") == ""


def test_cuda_tensors_are_refused_cleanly():
    m = randomize(SessaLayer(16, n_heads=2))
    c = sc.compile(m, (torch.randn(1, 4, 16),), backend="tvm")
    fake = torch.randn(1, 4, 16, device="meta")
    with pytest.raises(Exception):
        c(fake)


def test_kernels_cross_compile_for_aarch64():
    # code generation only (nothing runs): NEON fused multiply-adds must appear in every kernel
    from sessa_compiler.backends.tvm.build import primfunc
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    for spec in (feedback_spec(64, 0.125, "float32"), attention_spec(4, 2, 16, 0.25, True, "float32"),
                 scan_spec(32, 4, "float32")):
        asm = tvm.compile(tvm.IRModule({spec.symbol: primfunc(spec)}), target=target).mod.inspect_source("asm")
        assert "fmla" in asm, spec.op
