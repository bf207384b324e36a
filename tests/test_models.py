"""The eager reference models against an independent, loop-by-loop reading of the spec.

The ``ref_*`` functions below are written from shared/SESSA_SPEC.md in float64
numpy, one position (and one key) at a time; they share no code with
``sessa_compiler.models``. Tolerances are the spec's: max |out - ref| / max |ref|
below 1e-10 in float64 and 1e-4 in float32.
"""

import math

import numpy as np
import pytest
import torch
from torch.export import Dim, export

from sessa_compiler.models import (
    Decoder,
    MambaLayer,
    SessaLayer,
    TransformerLayer,
    selective_scan,
    selective_scan_with_state,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


# ---------------------------------------------------------------- helpers


def rel_err(out, ref):
    out = out.detach().double().numpy() if isinstance(out, torch.Tensor) else out
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def randomize(module, seed):
    """Non-trivial weights: LayerNorm away from identity, biases non-zero, sharp softmaxes."""
    gen = torch.Generator().manual_seed(seed)

    def noise(p):
        return torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)

    with torch.no_grad():
        norm_params = set()
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.2 * noise(mod.weight))
                mod.bias.copy_(0.2 * noise(mod.bias))
                norm_params |= {id(mod.weight), id(mod.bias)}
        for name, p in module.named_parameters():
            leaf = name.split(".")[-1]
            if id(p) in norm_params or leaf in ("A_log", "D") or name.endswith("dt_proj.bias"):
                continue  # keep Mamba's A, skip and step-size initialisation
            if leaf == "gamma_bias":
                p.copy_(torch.rand((), generator=gen, dtype=torch.float64) * 3 - 1.5)
            elif leaf == "bias":
                p.copy_(0.2 * noise(p))
            elif p.dim() == 2:
                p.copy_(1.5 * noise(p) / math.sqrt(p.shape[1]))
    return module


def state(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def np_gelu(a):
    return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))


def np_silu(a):
    return a / (1.0 + np.exp(-a))


def np_softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_linear(x, P, name, bias=True):
    y = x @ P[name + ".weight"].T
    return y + P[name + ".bias"] if bias else y


def np_rope(x, inv_freq):
    """x (B, T, heads, d): pair (2i, 2i+1) at position p turned by p * inv_freq[i]."""
    out = x.copy()
    for p in range(x.shape[1]):
        for i in range(x.shape[-1] // 2):
            c, s = math.cos(p * inv_freq[i]), math.sin(p * inv_freq[i])
            e, o = x[:, p, :, 2 * i], x[:, p, :, 2 * i + 1]
            out[:, p, :, 2 * i] = e * c - o * s
            out[:, p, :, 2 * i + 1] = e * s + o * c
    return out


def np_causal_attention(q, k, v):
    """q (B,T,H,d), k/v (B,T,Hkv,d): softmax over j <= t of q.k/sqrt(d), query head h reads kv h // G."""
    B, T, H, d = q.shape
    G = H // k.shape[2]
    out = np.zeros_like(q)
    for t in range(T):
        for h in range(H):
            logits = np.stack([(q[:, t, h] * k[:, j, h // G]).sum(-1) for j in range(t + 1)], -1) / math.sqrt(d)
            w = np_softmax(logits)
            for j in range(t + 1):
                out[:, t, h] += w[:, j, None] * v[:, j, h // G]
    return out


# ------------------------------------------------------ spec, loop by loop


def ref_sessa(P, x, n_heads, n_kv_heads, rope, gamma_max=0.999, eps=1e-5):
    B, T, D = x.shape
    d = D // n_heads
    a_g = np_linear(np_layer_norm(x, P["ln.weight"], P["ln.bias"], eps), P, "W_in")
    a, g = a_g[..., :D], a_g[..., D:]
    abar = np_gelu(a)

    q = np_linear(abar, P, "mixer.q_proj").reshape(B, T, n_heads, d)
    k = np_linear(abar, P, "mixer.k_proj").reshape(B, T, n_kv_heads, d)
    v = np_linear(abar, P, "mixer.v_proj").reshape(B, T, n_kv_heads, d)
    if rope:
        q = np_rope(q, P["mixer.rope_inv_freq"])
        k = np_rope(k, P["mixer.rope_inv_freq"])
    f = np_causal_attention(q, k, v).reshape(B, T, D)
    if n_heads > 1:
        f = f @ P["mixer.out_proj.weight"].T

    fb = np_linear(abar, P, "mixer.proj_fb")
    q_b, k_b = fb[..., :D], fb[..., D:]
    gamma = gamma_max * np.tanh(P["mixer.gamma_bias"] + (abar @ P["mixer.gamma_ctx.weight"].T)[..., 0])
    s = np.zeros_like(f)
    for t in range(T):
        s[:, t] = f[:, t]
        if t == 0:
            continue  # no predecessor: alpha row 0 is zero
        logits = np.stack([(q_b[:, t] * k_b[:, j]).sum(-1) for j in range(t)], -1) / math.sqrt(D)
        alpha = np_softmax(logits)
        for j in range(t):
            s[:, t] += gamma[:, t, None] * alpha[:, j, None] * s[:, j]
    return x + np_linear(s * g, P, "W_out")


def ref_mamba(P, x, d_state, d_conv, expand, eps=1e-5):
    B, T, D = x.shape
    Di, N, R = expand * D, d_state, math.ceil(D / 16)
    uz = np_linear(np_layer_norm(x, P["ln.weight"], P["ln.bias"], eps), P, "in_proj", bias=False)
    u_raw, z = uz[..., :Di], uz[..., Di:]
    w, wb = P["conv1d.weight"][:, 0, :], P["conv1d.bias"]  # (Di, d_conv)
    u = np.zeros_like(u_raw)
    for t in range(T):
        u[:, t] = wb
        for tap in range(d_conv):
            src = t - (d_conv - 1) + tap  # left zero padding: the last tap sees position t
            if src >= 0:
                u[:, t] += w[:, tap] * u_raw[:, src]
    u = np_silu(u)
    xd = np_linear(u, P, "x_proj", bias=False)
    dt_low, Bt, Ct = xd[..., :R], xd[..., R:R + N], xd[..., R + N:]
    dt = np.logaddexp(0.0, np_linear(dt_low, P, "dt_proj"))  # softplus
    A = -np.exp(P["A_log"])
    h = np.zeros((B, Di, N))
    y = np.zeros_like(u)
    for t in range(T):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bt[:, t, None, :]
        y[:, t] = (h * Ct[:, t, None, :]).sum(-1) + P["D"] * u[:, t]
    return x + np_linear(y * np_silu(z), P, "out_proj", bias=False)


def ref_transformer(P, inv_freq, x, n_heads, n_kv_heads, rope, eps=1e-5):
    B, T, D = x.shape
    d = D // n_heads
    h = np_layer_norm(x, P["ln1.weight"], P["ln1.bias"], eps)
    q = np_linear(h, P, "q_proj").reshape(B, T, n_heads, d)
    k = np_linear(h, P, "k_proj").reshape(B, T, n_kv_heads, d)
    v = np_linear(h, P, "v_proj").reshape(B, T, n_kv_heads, d)
    if rope:
        q, k = np_rope(q, inv_freq), np_rope(k, inv_freq)
    x = x + np_linear(np_causal_attention(q, k, v).reshape(B, T, D), P, "o_proj")
    return x + np_linear(np_gelu(np_linear(np_layer_norm(x, P["ln2.weight"], P["ln2.bias"], eps), P, "W1")), P, "W2")


# ------------------------------------------------------------ SessaLayer

SESSA_CONFIGS = {
    "H1": dict(n_heads=1),
    "H4": dict(n_heads=4),
    "gqa2": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "norope": dict(n_heads=2, use_forward_rope=False),
    "maxlen_gqa": dict(n_heads=4, n_kv_heads=2, max_len=128),
}


def make_sessa(D=32, seed=0, **cfg):
    torch.manual_seed(seed)
    return randomize(SessaLayer(D, **cfg), seed).double()


def check_sessa(layer, cfg, x64, dtype):
    P = state(layer)
    ref = ref_sessa(P, x64.numpy(), cfg.get("n_heads", 1), cfg.get("n_kv_heads") or cfg.get("n_heads", 1),
                    cfg.get("use_forward_rope", True), cfg.get("gamma_max", 0.999))
    with torch.no_grad():
        out = layer.to(dtype)(x64.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3e}"
    return ref


@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("name", sorted(SESSA_CONFIGS))
def test_sessa_float64_matches_spec(name, T):
    cfg = SESSA_CONFIGS[name]
    layer = make_sessa(seed=T, **cfg)
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + T))
    check_sessa(layer, cfg, x, torch.float64)


@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("name", ["H1", "gqa2", "norope", "maxlen_gqa"])
def test_sessa_float32_matches_spec(name, T):
    cfg = SESSA_CONFIGS[name]
    layer = make_sessa(seed=T + 7, **cfg)
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(200 + T))
    check_sessa(layer, cfg, x, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [8.0, -8.0])
def test_sessa_gamma_near_gamma_max(bias, dtype):
    cfg = dict(n_heads=4, n_kv_heads=2)
    layer = make_sessa(seed=3, **cfg)
    with torch.no_grad():
        layer.mixer.gamma_bias.fill_(bias)
        layer.mixer.gamma_ctx.weight.mul_(0.05)  # keep the context term from pulling gamma back
    x = torch.randn(2, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # gamma = 0.999 * tanh(+-8 + small) is within 1e-4 of +-gamma_max.
    abar = torch.nn.functional.gelu(layer.W_in(layer.ln(x))[..., :32])
    gamma = 0.999 * torch.tanh(bias + layer.mixer.gamma_ctx(abar))
    assert (gamma.abs() > 0.999 - 1e-4).all()
    check_sessa(layer, cfg, x, dtype)


def test_sessa_feedback_matters_and_row0_is_plain_attention():
    """Guards against a model that ignores the feedback: gamma -> 0 must change the output."""
    layer = make_sessa(seed=11, n_heads=2)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        layer.mixer.gamma_bias.fill_(0.0)
        layer.mixer.gamma_ctx.weight.zero_()
        y0 = layer(x)
    assert torch.equal(y[:, 0], y0[:, 0])  # position 0 has no feedback
    assert (y[:, 1:] - y0[:, 1:]).abs().max() > 1e-3


def test_sessa_bfloat16_within_spec_tolerance():
    cfg = dict(n_heads=4, n_kv_heads=2)
    layer = make_sessa(seed=21, **cfg)
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    P = state(layer)
    ref = ref_sessa(P, x.numpy(), 4, 2, True)
    layer = layer.to(torch.bfloat16)
    # Rounding the RoPE frequencies to bf16 would move angles at long positions.
    assert layer.mixer.rope_inv_freq.dtype == torch.float32
    with torch.no_grad():
        out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 3e-2


def test_sessa_rope_inv_freq_matches_formula():
    layer = SessaLayer(32, n_heads=2)
    d = 16
    expected = 10000.0 ** (-2 * np.arange(d // 2) / d)
    freq = layer.mixer.rope_inv_freq
    assert freq.dtype == torch.float32 and freq.shape == (d // 2,)
    np.testing.assert_allclose(freq.numpy(), expected, rtol=1e-6)


def test_sessa_max_len_is_enforced():
    layer = SessaLayer(8, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        layer(torch.randn(1, 5, 8))


# --------------------------------------------------------- Mamba, Transformer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("D,d_state,d_conv,expand", [(32, 16, 4, 2), (20, 4, 3, 1), (8, 2, 1, 2)])
def test_mamba_matches_spec(D, d_state, d_conv, expand, T, dtype):
    torch.manual_seed(T)
    layer = randomize(MambaLayer(D, d_state=d_state, d_conv=d_conv, expand=expand), T).double()
    x = torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    ref = ref_mamba(state(layer), x.numpy(), d_state, d_conv, expand)
    with torch.no_grad():
        out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_selective_scan_op_matches_loop_and_is_one_custom_op():
    g = torch.Generator().manual_seed(0)
    B, T, Di, N = 2, 6, 3, 4
    u, delta = torch.randn(B, T, Di, generator=g, dtype=torch.float64), torch.rand(B, T, Di, generator=g, dtype=torch.float64)
    A = -torch.rand(Di, N, generator=g, dtype=torch.float64) * 2
    Bm, Cm = torch.randn(B, T, N, generator=g, dtype=torch.float64), torch.randn(B, T, N, generator=g, dtype=torch.float64)
    Dk = torch.randn(Di, generator=g, dtype=torch.float64)
    y = selective_scan(u, delta, A, Bm, Cm, Dk)
    h = np.zeros((B, Di, N))
    for t in range(T):
        h = np.exp(delta[:, t, :, None].numpy() * A.numpy()) * h + (delta[:, t] * u[:, t]).numpy()[:, :, None] * Bm[:, t, None, :].numpy()
        assert rel_err(y[:, t], (h * Cm[:, t, None, :].numpy()).sum(-1) + Dk.numpy() * u[:, t].numpy()) < 1e-12
    # Chunked scan with carried state equals the whole scan.
    y1, h1 = selective_scan_with_state(u[:, :2], delta[:, :2], A, Bm[:, :2], Cm[:, :2], Dk)
    y2, h2 = selective_scan_with_state(u[:, 2:], delta[:, 2:], A, Bm[:, 2:], Cm[:, 2:], Dk, h0=h1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-13)
    assert rel_err(h2, h) < 1e-12
    torch.library.opcheck(torch.ops.sessa_compiler.selective_scan.default,
                          [t.requires_grad_() for t in (u, delta, A, Bm, Cm, Dk)],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert torch.autograd.gradcheck(selective_scan, (u, delta, A, Bm, Cm, Dk))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("cfg", [dict(n_heads=1), dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=1),
                                 dict(n_heads=2, use_rope=False)], ids=["H1", "gqa", "mqa", "norope"])
def test_transformer_matches_spec(cfg, T, dtype):
    torch.manual_seed(T)
    layer = randomize(TransformerLayer(32, mlp_ratio=3, **cfg), T + 1).double()
    x = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    inv = None
    if cfg.get("use_rope", True):
        inv = layer.rope_inv_freq.double().numpy()
        d = 32 // cfg["n_heads"]
        np.testing.assert_allclose(inv, 10000.0 ** (-2 * np.arange(d // 2) / d), rtol=1e-6)
    ref = ref_transformer(state(layer), inv, x.numpy(), cfg["n_heads"], cfg.get("n_kv_heads", cfg["n_heads"]),
                          cfg.get("use_rope", True))
    with torch.no_grad():
        out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


# -------------------------------------------------------- incremental decoding


def run_incremental(layer, x, chunks, three_d):
    """Prefill the given chunk lengths in turn, then decode the rest one token at a time."""
    cache = layer.init_cache(x.shape[0])
    outs, t = [], 0
    for n in chunks:
        y, cache = layer.prefill(x[:, t:t + n], cache)
        assert y.shape == (x.shape[0], n, x.shape[2])
        outs.append(y)
        t += n
    while t < x.shape[1]:
        x_t = x[:, t:t + 1] if three_d else x[:, t]
        y_t, cache = layer.decode_step(x_t, cache)
        assert y_t.shape == x_t.shape
        outs.append(y_t if three_d else y_t[:, None])
        t += 1
    return torch.cat(outs, 1)


LAYER_FACTORIES = {
    "sessa_gqa": lambda: SessaLayer(16, n_heads=4, n_kv_heads=2),
    "sessa_h1_maxlen": lambda: SessaLayer(16, n_heads=1, max_len=64),
    "sessa_norope": lambda: SessaLayer(16, n_heads=2, use_forward_rope=False),
    "mamba": lambda: MambaLayer(16, d_state=8, d_conv=4),
    "transformer": lambda: TransformerLayer(16, n_heads=4, n_kv_heads=2),
}


@pytest.mark.parametrize("chunks,three_d", [((0,), False), ((1,), True), ((5,), False), ((5, 3), True)])
@pytest.mark.parametrize("kind", sorted(LAYER_FACTORIES))
def test_prefill_then_decode_equals_forward(kind, chunks, three_d):
    torch.manual_seed(1)
    layer = randomize(LAYER_FACTORIES[kind](), 1).double()
    x = torch.randn(3, 13, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(len(chunks)))
    with torch.no_grad():
        full = layer(x)
        inc = run_incremental(layer, x, chunks, three_d)
    assert rel_err(inc, full.numpy()) < 1e-10


def test_sessa_cache_preallocated_and_growing_agree():
    torch.manual_seed(2)
    layer = randomize(SessaLayer(16, n_heads=2), 2).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        c1 = layer.init_cache(2, max_len=10)
        c2 = layer.init_cache(2)
        y1, c1 = layer.prefill(x, c1)
        y2, c2 = layer.prefill(x[:, :1], c2)
        for t in range(1, 10):
            y2_t, c2 = layer.decode_step(x[:, t], c2)
            y2 = torch.cat([y2, y2_t[:, None]], 1)
    assert c1["t"] == c2["t"] == 10
    assert rel_err(y2, y1.numpy()) < 1e-10


def test_bfloat16_decoding_stays_close_to_forward():
    torch.manual_seed(3)
    layer = randomize(SessaLayer(16, n_heads=2), 3).to(torch.bfloat16)
    x = torch.randn(1, 12, 16).to(torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
        inc = run_incremental(layer, x, (4,), False)
    assert torch.isfinite(inc).all()
    assert rel_err(inc, full.double().numpy()) < 3e-2


# ------------------------------------------------------------------ Decoder


def test_decoder_forward_shapes_and_kind_order():
    dec = Decoder(37, 16, "SMTS", n_heads=2)
    assert [type(l).__name__ for l in dec.layers] == ["SessaLayer", "MambaLayer", "TransformerLayer", "SessaLayer"]
    logits = dec(torch.randint(0, 37, (2, 5)))
    assert logits.shape == (2, 5, 37)
    assert dec.lm_head.bias is None


@pytest.mark.parametrize("layers", ["SMT", "TS"])
def test_decoder_generate_equals_greedy_recompute(layers):
    torch.manual_seed(4)
    dec = randomize(Decoder(41, 16, layers, n_heads=4, n_kv_heads=2, d_state=4), 4).double()
    prompt = torch.randint(0, 41, (2, 5), generator=torch.Generator().manual_seed(4))
    out = dec.generate(prompt, 8)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    expected = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = dec(expected)[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], 1)
    assert torch.equal(out, expected)


def test_decoder_prefill_decode_logits_equal_forward():
    torch.manual_seed(5)
    dec = randomize(Decoder(23, 16, "MST", n_heads=2), 5).double()
    tokens = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        full = dec(tokens)
        caches = dec.init_cache(2)
        logits, caches = dec.prefill(tokens[:, :4], caches)
        steps = [logits]
        for t in range(4, 9):
            lt, caches = dec.decode_step(tokens[:, t], caches)
            assert lt.shape == (2, 23)
            steps.append(lt[:, None])
    assert rel_err(torch.cat(steps, 1), full.numpy()) < 1e-10


# ------------------------------------------------------ construction, state


@pytest.mark.parametrize("kwargs,match", [
    (dict(D=16, gamma_max=1.0), "gamma_max"),
    (dict(D=16, gamma_max=0.0), "gamma_max"),
    (dict(D=16, gamma_max=-0.5), "gamma_max"),
    (dict(D=18, n_heads=4), "divisible"),
    (dict(D=16, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(D=16, n_heads=2, n_kv_heads=4), "n_kv_heads"),
    (dict(D=12, n_heads=4), "even"),
])
def test_sessa_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SessaLayer(**kwargs)


def test_odd_head_width_is_fine_without_rope():
    SessaLayer(12, n_heads=4, use_forward_rope=False)
    TransformerLayer(12, n_heads=4, use_rope=False)


def test_other_constructors_reject():
    with pytest.raises(ValueError, match="unknown"):
        Decoder(10, 16, "SXM")
    with pytest.raises(ValueError):
        Decoder(10, 16, "")
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerLayer(16, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="even"):
        TransformerLayer(12, n_heads=4)


def spec_keys(H, has_rope, max_len):
    keys = {"ln.weight", "ln.bias", "W_in.weight", "W_in.bias", "W_out.weight", "W_out.bias",
            "mixer.gamma_bias", "mixer.gamma_ctx.weight"}
    for proj in ("q_proj", "k_proj", "v_proj", "proj_fb"):
        keys |= {f"mixer.{proj}.weight", f"mixer.{proj}.bias"}
    if H > 1:
        keys.add("mixer.out_proj.weight")
    if has_rope:
        keys.add("mixer.rope_inv_freq")
    if max_len:
        keys |= {"mixer.causal_mask_f_full", "mixer.causal_mask_fb_full"}
    return keys


def test_sessa_state_dict_matches_spec_table():
    sd = SessaLayer(16).state_dict()
    assert set(sd) == spec_keys(1, True, None)
    assert sd["mixer.gamma_bias"].shape == () and sd["mixer.gamma_bias"].item() == 1.0
    assert sd["mixer.gamma_ctx.weight"].shape == (1, 16)

    D, H, Hkv, L = 32, 4, 2, 32
    sd = SessaLayer(D, n_heads=H, n_kv_heads=Hkv, max_len=L).state_dict()
    assert set(sd) == spec_keys(H, True, L)
    d = D // H
    shapes = {"ln.weight": (D,), "W_in.weight": (2 * D, D), "W_in.bias": (2 * D,),
              "mixer.q_proj.weight": (D, D), "mixer.k_proj.weight": (Hkv * d, D), "mixer.k_proj.bias": (Hkv * d,),
              "mixer.v_proj.weight": (Hkv * d, D), "mixer.proj_fb.weight": (2 * D, D), "mixer.proj_fb.bias": (2 * D,),
              "mixer.out_proj.weight": (D, D), "W_out.weight": (D, D), "mixer.rope_inv_freq": (d // 2,),
              "mixer.causal_mask_f_full": (L, L), "mixer.causal_mask_fb_full": (L, L)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["mixer.causal_mask_f_full"].dtype == torch.bool
    # Reference semantics: True = masked; f keeps the diagonal, feedback masks it.
    ones = torch.ones(L, L, dtype=torch.bool)
    assert torch.equal(sd["mixer.causal_mask_f_full"], ones.triu(1))
    assert torch.equal(sd["mixer.causal_mask_fb_full"], ones.triu(0))

    assert set(SessaLayer(16, n_heads=2, use_forward_rope=False).state_dict()) == spec_keys(2, False, None)


def test_sessa_load_state_dict_strict_round_trip():
    cfg = dict(n_heads=4, n_kv_heads=2, max_len=32)
    src = make_sessa(seed=8, D=16, **cfg)
    dst = SessaLayer(16, **cfg).double()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    with pytest.raises(RuntimeError):  # H=1 has no out_proj
        SessaLayer(16, n_heads=1).load_state_dict(src.state_dict(), strict=True)


def test_mamba_and_transformer_parameter_names():
    m = MambaLayer(32, d_state=8, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    R = 2
    assert shapes == {"ln.weight": (32,), "ln.bias": (32,), "in_proj.weight": (128, 32),
                      "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,), "x_proj.weight": (R + 16, 64),
                      "dt_proj.weight": (64, R), "dt_proj.bias": (64,), "A_log": (64, 8), "D": (64,),
                      "out_proj.weight": (32, 64)}
    assert torch.allclose(m.A_log.exp(), torch.arange(1, 9, dtype=torch.float32).expand(64, 8))
    assert torch.equal(m.D.detach(), torch.ones(64))
    t = TransformerLayer(32, n_heads=4, n_kv_heads=2, mlp_ratio=4)
    assert set(t.state_dict()) == {f"{n}.{p}" for n in ("ln1", "q_proj", "k_proj", "v_proj", "o_proj", "ln2", "W1", "W2")
                                   for p in ("weight", "bias")}
    assert t.k_proj.weight.shape == (16, 32) and t.W1.weight.shape == (128, 32)


# ------------------------------------------------------------- torch.export


def export_and_compare(module, example, others, dims):
    ep = export(module, (example,), dynamic_shapes=(dims,))
    for x in others:
        with torch.no_grad():
            expected = module(x)
            got = ep.module()(x)
        assert got.shape == expected.shape
        assert rel_err(got, expected.double().numpy()) < 1e-12
    return ep


def _x(B, T, D=16):
    return torch.randn(B, T, D, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["sessa_gqa", "sessa_norope", "mamba", "transformer"])
def test_export_dynamic_batch_and_length(kind):
    torch.manual_seed(9)
    layer = randomize(LAYER_FACTORIES[kind](), 9).double()
    ep = export_and_compare(layer, _x(2, 7), [_x(3, 13), _x(1, 1), _x(2, 64)],
                            {0: Dim("B"), 1: Dim("T", min=1, max=64)})
    if kind == "mamba":
        scans = [n for n in ep.graph.nodes if n.target is torch.ops.sessa_compiler.selective_scan.default]
        assert len(scans) == 1


def test_export_sessa_with_max_len_buffers():
    """Like the reference, the forward slices its mask buffers [:T, :T]. That view is contiguous
    only at T == max_len, so export guards T != max_len: the dynamic range must stop at max_len - 1."""
    torch.manual_seed(10)
    layer = randomize(SessaLayer(16, n_heads=4, n_kv_heads=2, max_len=32), 10).double()
    export_and_compare(layer, _x(2, 7), [_x(3, 31), _x(1, 1), _x(2, 16)],
                       {0: Dim("B"), 1: Dim("T", min=1, max=31)})


def test_export_decoder():
    torch.manual_seed(11)
    dec = randomize(Decoder(29, 16, "SMT", n_heads=2), 11).double()
    tok = lambda B, T: torch.randint(0, 29, (B, T))
    ep = export(dec, (tok(2, 6),), dynamic_shapes=({0: Dim("B"), 1: Dim("T", min=1, max=48)},))
    for x in (tok(3, 17), tok(1, 1)):
        with torch.no_grad():
            assert rel_err(ep.module()(x), dec(x).numpy()) < 1e-12
