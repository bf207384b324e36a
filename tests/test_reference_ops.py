"""The core-op references (rope, attention, feedback, scan) against float64 oracles written from SESSA_SPEC.md.

Each oracle below is an independent restatement of the spec's formula with explicit Python loops over
positions t and j (math/numpy float64), deliberately not sharing any structure with
``sessa_compiler.semantics.core``: no masks, no einsum, no triangular solve, no repeat_interleave.
The same oracles also check graphs run through the eager interpreter (``run_graph``) at two sequence
lengths of one symbolic graph.

Tolerances (spec): max abs err / max abs ref <= 1e-10 (float64), 1e-4 (float32), 3e-2 (bfloat16).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sessa_compiler.backends.eager import run_graph
from sessa_compiler.semantics import attention_ref, feedback_ref, rope_ref, scan_ref
from sessa_compiler.ir import parse

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}
GAMMA_EXTREME = 0.999 * math.tanh(8.0)  # gamma_max * tanh(large gamma_bias): just below 0.999


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers -------------------------------------------------------------------------------------------
def gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def inv_freq64(d: int) -> list:
    """omega_i = 10000 ** (-2i/d), i = 0 .. d/2-1, in float64 (Python floats)."""
    return [10000.0 ** (-2.0 * i / d) for i in range(d // 2)]


def as_np(x: torch.Tensor) -> np.ndarray:
    """The values the kernel actually saw (after rounding to its dtype), as float64."""
    return x.detach().to(torch.float64).numpy()


def rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float64))
    assert tuple(out.shape) == tuple(ref_t.shape), (tuple(out.shape), tuple(ref_t.shape))
    assert torch.isfinite(ref_t).all(), "oracle is not finite"
    assert torch.isfinite(out).all(), "NaN/Inf in the output where the oracle is finite"
    denom = ref_t.abs().max().item()
    err = (out.detach().to(torch.float64) - ref_t).abs().max().item()
    return err / denom if denom > 0 else err


def assert_close(out: torch.Tensor, ref: np.ndarray, dtype: torch.dtype, what: str = ""):
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    e = rel_err(out, ref)
    assert e <= TOL[dtype], f"{what}: relative error {e:.3e} > {TOL[dtype]:.0e} ({dtype})"


# -- oracles (float64, explicit loops over t and j) ------------------------------------------------------
def rope_oracle(x: np.ndarray, omegas) -> np.ndarray:
    """x [B, T, H, d]: rotate interleaved pairs (x[2i], x[2i+1]) by theta = p * omega_i, p = index along T."""
    T, d = x.shape[1], x.shape[3]
    out = np.empty_like(x)
    for p in range(T):
        for i in range(d // 2):
            c, s = math.cos(p * omegas[i]), math.sin(p * omegas[i])
            a, b = x[:, p, :, 2 * i], x[:, p, :, 2 * i + 1]
            out[:, p, :, 2 * i] = a * c - b * s
            out[:, p, :, 2 * i + 1] = a * s + b * c
    return out


def softmax_list(logits: list) -> list:
    m = max(logits)
    e = [math.exp(z - m) for z in logits]
    tot = math.fsum(e)
    return [w / tot for w in e]


def attention_oracle(q, k, v, scale: float, omegas=None) -> np.ndarray:
    """out[b, t, h] = sum_{j <= t} softmax_j(q[b,t,h] . k[b,j,h//G] * scale) v[b,j,h//G]."""
    if omegas is not None:
        q, k = rope_oracle(q, omegas), rope_oracle(k, omegas)
    B, T, H, _ = q.shape
    Hkv, dv = k.shape[2], v.shape[3]
    G = H // Hkv
    out = np.zeros((B, T, H, dv))
    for b in range(B):
        for h in range(H):
            kh = h // G
            for t in range(T):
                logits = [float(np.dot(q[b, t, h], k[b, j, kh])) * scale for j in range(t + 1)]
                w = softmax_list(logits)
                acc = np.zeros(dv)
                for j in range(t + 1):
                    acc += w[j] * v[b, j, kh]
                out[b, t, h] = acc
    return out


def feedback_oracle(f, qb, kb, gamma, scale: float) -> np.ndarray:
    """s[t] = f[t] + gamma[t] * sum_{j < t} softmax_{j < t}(qb[t] . kb[j] * scale) s[j];  s[0] = f[0]."""
    B, T, _ = f.shape
    s = np.zeros_like(f)
    for b in range(B):
        for t in range(T):
            s[b, t] = f[b, t]
            if t == 0:
                continue
            w = softmax_list([float(np.dot(qb[b, t], kb[b, j])) * scale for j in range(t)])
            acc = np.zeros(f.shape[2])
            for j in range(t):
                acc += w[j] * s[b, j]
            s[b, t] = f[b, t] + gamma[b, t] * acc
    return s


def scan_oracle(u, delta, A, Bm, Cm, Dv) -> np.ndarray:
    """h_t = exp(delta_t * A) h_{t-1} + (delta_t u_t) outer B_t (h_{-1} = 0);  y_t = h_t C_t + D u_t."""
    batch, T, Din = u.shape
    N = A.shape[1]
    y = np.zeros((batch, T, Din))
    for b in range(batch):
        h = [[0.0] * N for _ in range(Din)]
        for t in range(T):
            for c in range(Din):
                dt = float(delta[b, t, c])
                for n in range(N):
                    h[c][n] = math.exp(dt * float(A[c, n])) * h[c][n] + dt * float(u[b, t, c]) * float(Bm[b, t, n])
                y[b, t, c] = math.fsum(h[c][n] * float(Cm[b, t, n]) for n in range(N)) + float(Dv[c]) * float(u[b, t, c])
    return y


# -- input builders --------------------------------------------------------------------------------------
def attention_inputs(key, B, T, H, Hkv, d, dv=None, dtype=torch.float64):
    g = gen("attn", *key)
    dv = d if dv is None else dv
    q = randn(g, B, T, H, d).to(dtype)
    k = randn(g, B, T, Hkv, d).to(dtype)
    v = randn(g, B, T, Hkv, dv).to(dtype)
    return q, k, v


def feedback_inputs(key, B, T, wf, wq, gamma_kind, dtype=torch.float64, logit_scale=1.0):
    g = gen("fb", *key)
    f = randn(g, B, T, wf).to(dtype)
    qb = randn(g, B, T, wq, scale=logit_scale).to(dtype)
    kb = randn(g, B, T, wq, scale=logit_scale).to(dtype)
    if gamma_kind == "pos":
        gamma = torch.full((B, T), GAMMA_EXTREME, dtype=torch.float64)
    elif gamma_kind == "neg":
        gamma = torch.full((B, T), -GAMMA_EXTREME, dtype=torch.float64)
    elif gamma_kind == "mixed":  # each row at one of the two extremes
        gamma = GAMMA_EXTREME * torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    else:  # random in (-0.999, 0.999)
        gamma = 0.999 * torch.tanh(randn(g, B, T, scale=2.0))
    return f, qb, kb, gamma.to(dtype)


def scan_inputs(key, batch, T, Din, N, dtype=torch.float64):
    g = gen("scan", *key)
    u = randn(g, batch, T, Din)
    delta = torch.nn.functional.softplus(randn(g, batch, T, Din) - 1.0)
    A = -torch.exp(randn(g, Din, N, scale=0.5))
    Bm = randn(g, batch, T, N)
    Cm = randn(g, batch, T, N)
    Dv = randn(g, Din)
    return tuple(x.to(dtype) for x in (u, delta, A, Bm, Cm, Dv))


def freq_tensor(d, dtype):
    # The checkpoint's buffer: float64 in a float64 model, float32 otherwise (spec: angles in >= float32).
    return torch.tensor(inv_freq64(d), dtype=torch.float64 if dtype == torch.float64 else torch.float32)


# -- rope -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
# T = 257: angles up to ~256 rad, where bf16-rounded angles (a quirk the spec says not to copy) are visibly wrong.
@pytest.mark.parametrize("B,T,H,d", [(1, 1, 1, 2), (2, 7, 3, 8), (1, 33, 2, 16), (2, 50, 1, 4), (1, 257, 2, 16)])
def test_rope(B, T, H, d, dtype):
    x = randn(gen("rope", B, T, H, d), B, T, H, d).to(dtype)
    out = rope_ref(x, freq_tensor(d, dtype))
    assert_close(out, rope_oracle(as_np(x), inv_freq64(d)), dtype, "rope")


def test_rope_position_zero_is_identity_and_pairs_are_interleaved():
    x = torch.arange(1, 9, dtype=torch.float64).reshape(1, 2, 1, 4)
    out = rope_ref(x, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert torch.equal(out[:, 0], x[:, 0])
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.5), math.sin(0.5)
    want = [5 * c1 - 6 * s1, 5 * s1 + 6 * c1, 7 * c2 - 8 * s2, 7 * s2 + 8 * c2]
    assert torch.allclose(out[0, 1, 0], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)


# -- attention ------------------------------------------------------------------------------------------
ATTN_SHAPES = [  # (B, T, H, Hkv, d, dv)
    (1, 1, 1, 1, 8, 8),      # T = 1, H = 1
    (2, 7, 1, 1, 4, 4),      # H = 1
    (2, 33, 4, 2, 8, 8),     # GQA, G = 2, T not a multiple of anything
    (1, 33, 4, 1, 6, 6),     # GQA, G = 4 (multi-query)
    (2, 7, 4, 2, 2, 2),      # smallest even d
    (1, 7, 2, 2, 4, 6),      # value width differs from the key width
    (1, 1, 4, 1, 4, 4),      # T = 1 with GQA
]


@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("B,T,H,Hkv,d,dv", ATTN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_attention(B, T, H, Hkv, d, dv, rope, dtype):
    q, k, v = attention_inputs((B, T, H, Hkv, d, dv, rope), B, T, H, Hkv, d, dv, dtype)
    scale = 1.0 / math.sqrt(d)
    out = attention_ref(q, k, v, scale, True, freq_tensor(d, dtype) if rope else None)
    ref = attention_oracle(as_np(q), as_np(k), as_np(v), scale, inv_freq64(d) if rope else None)
    assert_close(out, ref, dtype, f"attention rope={rope}")


def test_attention_gqa_head_mapping_is_h_div_g():
    # With H=4, Hkv=2, query heads 0,1 read kv head 0 and heads 2,3 read kv head 1 (not h % Hkv).
    B, T, H, Hkv, d = 1, 3, 4, 2, 2
    q = torch.zeros(B, T, H, d, dtype=torch.float64)  # uniform attention: output = running mean of v
    k = torch.zeros(B, T, Hkv, d, dtype=torch.float64)
    v = torch.zeros(B, T, Hkv, d, dtype=torch.float64)
    v[..., 0, :] = 1.0
    v[..., 1, :] = -1.0
    out = attention_ref(q, k, v, 1.0)
    assert torch.equal(out[0, :, :, 0], torch.tensor([[1.0, 1.0, -1.0, -1.0]] * T, dtype=torch.float64))


def test_attention_scale_is_applied():
    q, k, v = attention_inputs(("scale",), 1, 9, 2, 2, 4)
    for scale in (0.1, 1.0, 3.0):
        ref = attention_oracle(as_np(q), as_np(k), as_np(v), scale)
        assert rel_err(attention_ref(q, k, v, scale), ref) <= 1e-10


# -- feedback -------------------------------------------------------------------------------------------
FB_SHAPES = [  # (B, T, width of f, width of q_b/k_b)
    (1, 1, 8, 8),
    (2, 2, 4, 6),
    (2, 7, 8, 3),
    (2, 33, 6, 10),
    (1, 33, 16, 16),
]


@pytest.mark.parametrize("gamma_kind", ["pos", "neg", "mixed", "random"])
@pytest.mark.parametrize("B,T,wf,wq", FB_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_feedback(B, T, wf, wq, gamma_kind, dtype):
    f, qb, kb, gamma = feedback_inputs((B, T, wf, wq, gamma_kind, dtype), B, T, wf, wq, gamma_kind, dtype)
    scale = 1.0 / math.sqrt(wq)
    out = feedback_ref(f, qb, kb, gamma, scale)
    ref = feedback_oracle(as_np(f), as_np(qb), as_np(kb), as_np(gamma), scale)
    assert_close(out, ref, dtype, f"feedback gamma={gamma_kind}")


def test_feedback_row_zero_and_strict_causality():
    # s[0] = f[0] exactly (no predecessor); s[1] = f[1] + gamma[1] * s[0] (alpha[1, 0] = 1, diagonal excluded).
    f, qb, kb, gamma = feedback_inputs(("rows",), 2, 5, 3, 4, "random")
    s = feedback_ref(f, qb, kb, gamma, 0.5)
    assert torch.equal(s[:, 0], f[:, 0])
    assert torch.allclose(s[:, 1], f[:, 1] + gamma[:, 1, None] * f[:, 0], rtol=0, atol=1e-14)
    # Changing the future must not change the past.
    f2 = f.clone()
    f2[:, 3:] += 10.0
    s2 = feedback_ref(f2, qb, kb, gamma, 0.5)
    assert torch.equal(s2[:, :3], s[:, :3])


@pytest.mark.parametrize("gamma_kind", ["pos", "neg", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_feedback_long_near_gamma_max_is_finite(gamma_kind, dtype):
    B, T, wf, wq = 1, 200, 4, 8
    # Sharp logits too, so that some rows are close to one-hot (the largest amplification).
    f, qb, kb, gamma = feedback_inputs(("long", gamma_kind, dtype), B, T, wf, wq, gamma_kind, dtype, logit_scale=2.0)
    scale = 1.0 / math.sqrt(wq)
    out = feedback_ref(f, qb, kb, gamma, scale)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = feedback_oracle(as_np(f), as_np(qb), as_np(kb), as_np(gamma), scale)
    assert np.isfinite(ref).all()
    # The stability bound: |s| <= max|f| / (1 - max|gamma|).
    g = float(np.abs(as_np(gamma)).max())
    if g < 1.0:
        assert np.abs(ref).max() <= np.abs(as_np(f)).max() / (1.0 - g) * (1 + 1e-12)
    assert_close(out, ref, dtype, f"feedback T=200 gamma={gamma_kind}")


# -- bf16: accumulate in float32, round once ----------------------------------------------------------------
def assert_rounded_once(out: torch.Tensor, ref: np.ndarray, what: str):
    """bf16 output = the exact result (on the bf16-rounded inputs) rounded once to bf16, up to float32 noise.

    Rounding to nearest bf16 (8 significant bits) moves a value by at most 2^-8 of itself; the 1e-4 * max|ref|
    slack covers float32 accumulation. Computing in bf16 (or solving the feedback system in bf16) passes the
    3e-2 tolerance on these sizes but not this check.
    """
    assert out.dtype == torch.bfloat16
    ref_t = torch.from_numpy(ref)
    excess = (out.to(torch.float64) - ref_t).abs() - 2.0 ** -8 * ref_t.abs()
    worst = excess.max().item() / ref_t.abs().max().item()
    assert worst <= 1e-4, f"{what}: bf16 output is off the once-rounded exact result by {worst:.2e} of max|ref|"


@pytest.mark.parametrize("B,T,H,Hkv,d", [(2, 33, 4, 2, 8), (1, 33, 4, 1, 6), (2, 7, 1, 1, 4)])
def test_attention_bf16_accumulates_in_float32(B, T, H, Hkv, d):
    # Without RoPE only: rope_ref returns the rotated q and k in the input dtype, an extra bf16 rounding.
    q, k, v = attention_inputs(("once", B, T, H, Hkv, d), B, T, H, Hkv, d, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    assert_rounded_once(attention_ref(q, k, v, scale), attention_oracle(as_np(q), as_np(k), as_np(v), scale),
                        "attention")


@pytest.mark.parametrize("gamma_kind", ["pos", "neg", "mixed", "random"])
@pytest.mark.parametrize("T", [33, 200])
def test_feedback_bf16_solves_in_float32(T, gamma_kind):
    f, qb, kb, gamma = feedback_inputs(("once", T, gamma_kind), 1, T, 6, 10, gamma_kind, torch.bfloat16, 2.0)
    out = feedback_ref(f, qb, kb, gamma, 0.3)
    assert_rounded_once(out, feedback_oracle(as_np(f), as_np(qb), as_np(kb), as_np(gamma), 0.3), "feedback")


# -- scan -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,T,Din,N", [(1, 1, 3, 2), (2, 5, 4, 3), (2, 17, 6, 4), (1, 17, 1, 1)])
def test_scan(batch, T, Din, N, dtype):
    xs = scan_inputs((batch, T, Din, N, dtype), batch, T, Din, N, dtype)
    out = scan_ref(*xs)
    assert_close(out, scan_oracle(*(as_np(x) for x in xs)), dtype, "scan")


# -- through the IR (eager interpreter, symbolic B and T) -------------------------------------------------
IR_DT = {torch.float64: "f64", torch.float32: "f32"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ir_attention_rope_and_feedback(dtype):
    t = IR_DT[dtype]
    H, Hkv, d, wq = 4, 2, 8, 6
    D = H * d
    text = f"""
graph mixer(%q: {t}[B, T, {H}, {d}], %k: {t}[B, T, {Hkv}, {d}], %v: {t}[B, T, {Hkv}, {d}], %qb: {t}[B, T, {wq}], \
%kb: {t}[B, T, {wq}], %gpre: {t}[B, T]) {{
  param %inv_freq: {t}[{d // 2}]
  %att: {t}[B, T, {H}, {d}] = attention(%q, %k, %v, %inv_freq) {{scale={1 / math.sqrt(d)!r}, causal=True, rope=True}}
  %plain: {t}[B, T, {H}, {d}] = attention(%q, %k, %v) {{scale={1 / math.sqrt(d)!r}, causal=True}}
  %qr: {t}[B, T, {H}, {d}] = rope(%q, %inv_freq)
  %f: {t}[B, T, {D}] = reshape(%att) {{shape=[B, T, {D}]}}
  %th: {t}[B, T] = tanh(%gpre)
  %gamma: {t}[B, T] = mul(%th, 0.999)
  %s: {t}[B, T, {D}] = feedback(%f, %qb, %kb, %gamma) {{scale={1 / math.sqrt(wq)!r}}}
  return %att, %plain, %qr, %s
}}
"""
    graph = parse(text)
    graph.params["inv_freq"] = freq_tensor(d, dtype)
    omegas = inv_freq64(d)
    for B, T in ((2, 5), (1, 13), (3, 1)):  # one graph, several sequence lengths
        q, k, v = attention_inputs(("ir", B, T, dtype), B, T, H, Hkv, d, dtype=dtype)
        g = gen("ir-fb", B, T)
        qb, kb = randn(g, B, T, wq).to(dtype), randn(g, B, T, wq).to(dtype)
        gpre = randn(g, B, T, scale=4.0)
        gpre[:, ::3] = 8.0 * torch.sign(gpre[:, ::3])  # some rows at gamma ~ +-0.999 * tanh(8)
        gpre = gpre.to(dtype)
        att, plain, qr, s = run_graph(graph, [q, k, v, qb, kb, gpre])
        qn, kn, vn = as_np(q), as_np(k), as_np(v)
        att_ref = attention_oracle(qn, kn, vn, 1 / math.sqrt(d), omegas)
        assert_close(att, att_ref, dtype, f"IR attention rope T={T}")
        assert_close(plain, attention_oracle(qn, kn, vn, 1 / math.sqrt(d)), dtype, f"IR attention T={T}")
        assert_close(qr, rope_oracle(qn, omegas), dtype, f"IR rope T={T}")
        gamma = 0.999 * np.tanh(as_np(gpre))
        # Feedback oracle fed with the graph's own f (the attention output it actually computed).
        s_ref = feedback_oracle(as_np(att).reshape(B, T, D), as_np(qb), as_np(kb), gamma, 1 / math.sqrt(wq))
        assert_close(s, s_ref, dtype, f"IR feedback T={T}")
        # And end to end from the float64 attention oracle.
        s_ref2 = feedback_oracle(att_ref.reshape(B, T, D), as_np(qb), as_np(kb), gamma, 1 / math.sqrt(wq))
        assert_close(s, s_ref2, dtype, f"IR attention+feedback T={T}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ir_scan(dtype):
    t = IR_DT[dtype]
    Din, N = 5, 3
    text = f"""
graph s6(%u: {t}[B, T, {Din}], %dt_raw: {t}[B, T, {Din}], %Bm: {t}[B, T, {N}], %Cm: {t}[B, T, {N}]) {{
  param %A_log: {t}[{Din}, {N}]
  param %D: {t}[{Din}]
  %delta: {t}[B, T, {Din}] = softplus(%dt_raw)
  %ea: {t}[{Din}, {N}] = exp(%A_log)
  %A: {t}[{Din}, {N}] = neg(%ea)
  %y: {t}[B, T, {Din}] = scan(%u, %delta, %A, %Bm, %Cm, %D)
  return %y
}}
"""
    graph = parse(text)
    g = gen("ir-scan", dtype)
    A_log = randn(g, Din, N, scale=0.5).to(dtype)
    Dv = randn(g, Din).to(dtype)
    graph.params["A_log"] = A_log
    graph.params["D"] = Dv
    A = -np.exp(as_np(A_log))
    for B, T in ((2, 5), (1, 17), (2, 1)):
        g = gen("ir-scan", B, T, dtype)
        u, dt_raw, Bm, Cm = (randn(g, B, T, w).to(dtype) for w in (Din, Din, N, N))
        (y,) = run_graph(graph, [u, dt_raw, Bm, Cm])
        delta = np.log1p(np.exp(as_np(dt_raw)))
        ref = scan_oracle(as_np(u), delta, A, as_np(Bm), as_np(Cm), as_np(Dv))
        assert_close(y, ref, dtype, f"IR scan T={T}")


# -- properties over shapes (float64) ----------------------------------------------------------------------
@st.composite
def attn_cases(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]))
    return {"B": draw(st.integers(1, 3)), "T": draw(st.integers(1, 20)), "H": H, "Hkv": Hkv,
            "d": draw(st.sampled_from([2, 4, 8])), "rope": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1))}


@settings(max_examples=40, deadline=None)
@given(attn_cases())
def test_attention_property(c):
    B, T, H, Hkv, d = c["B"], c["T"], c["H"], c["Hkv"], c["d"]
    g = torch.Generator().manual_seed(c["seed"])
    q, k, v = randn(g, B, T, H, d), randn(g, B, T, Hkv, d), randn(g, B, T, Hkv, d)
    scale = 1.0 / math.sqrt(d)
    out = attention_ref(q, k, v, scale, True, freq_tensor(d, torch.float64) if c["rope"] else None)
    ref = attention_oracle(as_np(q), as_np(k), as_np(v), scale, inv_freq64(d) if c["rope"] else None)
    assert_close(out, ref, torch.float64, f"attention {c}")


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 20), H=st.sampled_from([1, 2, 4]), d=st.sampled_from([2, 4, 8]),
       wq=st.sampled_from([2, 4, 8, 5]), gamma_kind=st.sampled_from(["pos", "neg", "mixed", "random"]),
       seed=st.integers(0, 2**31 - 1))
def test_feedback_property(B, T, H, d, wq, gamma_kind, seed):
    wf = H * d
    f, qb, kb, gamma = feedback_inputs((seed,), B, T, wf, wq, gamma_kind)
    scale = 1.0 / math.sqrt(wq)
    out = feedback_ref(f, qb, kb, gamma, scale)
    ref = feedback_oracle(as_np(f), as_np(qb), as_np(kb), as_np(gamma), scale)
    assert_close(out, ref, torch.float64, f"feedback B={B} T={T} wf={wf} wq={wq} gamma={gamma_kind}")
