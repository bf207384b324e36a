"""Two independently written Sessa layers (and one block that is not Sessa) that the
frontend must handle "whatever the coding style".

Checks, for tests/styles/sdpa_style.py and tests/styles/loop_free_matmul_style.py:
- they share the reference state_dict layout (shared/SESSA_SPEC.md), so weights
  copy between them with strict=True in both directions;
- both match each other and a float64 row-by-row implementation of the spec
  written below (loops over t and j), at the spec's test shapes and tolerances;
- both load the reference SessaLayer's state_dict with strict=True (mask buffers
  included) and reproduce its output, and the reference loads theirs;
- both, and OddBlock, export with torch.export with dynamic B and T, and the
  exported program matches eager at shapes other than the traced one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim, export

from sessa_compiler.models import SessaLayer
from tests.styles.loop_free_matmul_style import MatmulSessaLayer
from tests.styles.sdpa_style import SdpaSessaLayer
from tests.styles.unrecognised import OddBlock

STYLES = (SdpaSessaLayer, MatmulSessaLayer)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}

# name -> constructor kwargs and the gamma_bias to plant (None plants a mild 0.3)
CONFIGS = {
    "single_head": (dict(D=16, n_heads=1), None),
    "gqa": (dict(D=16, n_heads=4, n_kv_heads=2), None),
    "rope_off": (dict(D=12, n_heads=2, n_kv_heads=1, use_forward_rope=False), None),
    "gamma_near_plus_max": (dict(D=16, n_heads=1), 8.0),
    "gamma_near_minus_max": (dict(D=16, n_heads=4, n_kv_heads=2), -8.0),
    "with_max_len": (dict(D=16, n_heads=2, max_len=40, gamma_max=0.9), None),
}


# --------------------------------------------------------------------------------------
# float64 reference, written from the spec text one row at a time
# --------------------------------------------------------------------------------------


def spec_sessa_layer(state: dict, x: torch.Tensor, *, D, n_heads=1, n_kv_heads=None,
                     max_len=None, ln_eps=1e-5, use_forward_rope=True, gamma_max=0.999):
    del max_len  # the mask buffers carry no learned content
    H = n_heads
    Hkv = n_heads if n_kv_heads is None else n_kv_heads
    d, G = D // H, H // Hkv
    p = {k: v.to(torch.float64) for k, v in state.items() if v.is_floating_point()}
    x = x.to(torch.float64)
    B, T, _ = x.shape

    def linear(name, t):
        out = t @ p[name + ".weight"].T
        return out + p[name + ".bias"] if name + ".bias" in p else out

    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    xn = (x - mean) / torch.sqrt(var + ln_eps) * p["ln.weight"] + p["ln.bias"]
    h = linear("W_in", xn)
    a, g = h[..., :D], h[..., D:]
    abar = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))

    # forward branch
    q = linear("mixer.q_proj", abar).reshape(B, T, H, d)
    k = linear("mixer.k_proj", abar).reshape(B, T, Hkv, d)
    v = linear("mixer.v_proj", abar).reshape(B, T, Hkv, d)
    if use_forward_rope:
        omega = p["mixer.rope_inv_freq"]
        q_rot, k_rot = q.clone(), k.clone()
        for pos in range(T):
            for i in range(d // 2):
                c, s = math.cos(pos * omega[i].item()), math.sin(pos * omega[i].item())
                for src, dst in ((q, q_rot), (k, k_rot)):
                    x0, x1 = src[:, pos, :, 2 * i], src[:, pos, :, 2 * i + 1]
                    dst[:, pos, :, 2 * i] = x0 * c - x1 * s
                    dst[:, pos, :, 2 * i + 1] = x0 * s + x1 * c
        q, k = q_rot, k_rot
    attn = torch.zeros(B, T, H, d, dtype=torch.float64)
    for t in range(T):
        for head in range(H):
            kv = head // G
            scores = torch.stack(
                [(q[:, t, head] * k[:, j, kv]).sum(-1) / math.sqrt(d) for j in range(t + 1)], -1
            )
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            weights = weights / weights.sum(-1, keepdim=True)
            for j in range(t + 1):
                attn[:, t, head] += weights[:, j, None] * v[:, j, kv]
    f = attn.reshape(B, T, D)
    if H > 1:
        f = f @ p["mixer.out_proj.weight"].T

    # feedback branch: s[t] = f[t] + gamma[t] * sum_{j<t} alpha[t, j] s[j]
    fb = linear("mixer.proj_fb", abar)
    q_b, k_b = fb[..., :D], fb[..., D:]
    gamma = gamma_max * torch.tanh(p["mixer.gamma_bias"] + abar @ p["mixer.gamma_ctx.weight"][0])
    s = torch.zeros(B, T, D, dtype=torch.float64)
    for t in range(T):
        s[:, t] = f[:, t]
        if t == 0:
            continue
        logits = torch.stack([(q_b[:, t] * k_b[:, j]).sum(-1) / math.sqrt(D) for j in range(t)], -1)
        alpha = torch.exp(logits - logits.amax(-1, keepdim=True))
        alpha = alpha / alpha.sum(-1, keepdim=True)
        for j in range(t):
            s[:, t] += gamma[:, t, None] * alpha[:, j, None] * s[:, j]

    return x + linear("W_out", s * g)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def expected_keys(D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, **_):
    """The state_dict keys of the spec's table for these constructor arguments."""
    keys = {"ln.weight", "ln.bias", "W_in.weight", "W_in.bias", "W_out.weight", "W_out.bias",
            "mixer.gamma_bias", "mixer.gamma_ctx.weight"}
    for proj in ("q_proj", "k_proj", "v_proj", "proj_fb"):
        keys |= {f"mixer.{proj}.weight", f"mixer.{proj}.bias"}
    if n_heads > 1:
        keys.add("mixer.out_proj.weight")
    if use_forward_rope:
        keys.add("mixer.rope_inv_freq")
    if max_len is not None:
        keys |= {"mixer.causal_mask_f_full", "mixer.causal_mask_fb_full"}
    return keys


# Extra gain on some weights: sharpen both softmaxes so that neither attention is
# close to uniform.
_GAIN = {"mixer.q_proj.weight": 2.0, "mixer.k_proj.weight": 2.0, "mixer.proj_fb.weight": 4.0}


def build(cls, kwargs, gamma_bias, seed, dtype=torch.float32):
    """A layer whose weights depend on (kwargs, gamma_bias, seed) only, not on cls."""
    layer = cls(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(layer.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if name == "mixer.gamma_bias":
                param.fill_(0.3 if gamma_bias is None else gamma_bias)
            elif name == "ln.weight":
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 2:  # roughly nn.Linear's default scale
                param.copy_(noise * 0.6 / math.sqrt(param.shape[1]) * _GAIN.get(name, 1.0))
            else:
                param.copy_(0.1 * noise)
    return layer.to(dtype).eval()


_spec_outputs: dict = {}


def spec_output(layer, x, config, key):
    """spec_sessa_layer for a layer made by build(); cached because it loops in Python."""
    if key not in _spec_outputs:
        _spec_outputs[key] = spec_sessa_layer(layer.state_dict(), x, **CONFIGS[config][0])
    return _spec_outputs[key]


def rel_err(out, ref):
    return ((out.to(torch.float64) - ref).abs().max() / ref.abs().max()).item()


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny: on a busy 2-core machine, waking a second OpenMP thread
    for every op cost ~100x (0.2 s vs 2 ms per forward)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_keys_follow_the_spec(config):
    kwargs, _ = CONFIGS[config]
    want = expected_keys(**kwargs)
    for cls in STYLES:
        assert set(cls(**kwargs).state_dict()) == want, cls.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("src_cls, dst_cls", [STYLES, STYLES[::-1]],
                         ids=["sdpa_to_matmul", "matmul_to_sdpa"])
def test_styles_agree_with_each_other_and_the_spec(src_cls, dst_cls, config, T, dtype):
    kwargs, gamma_bias = CONFIGS[config]
    src = build(src_cls, kwargs, gamma_bias, seed=T, dtype=dtype)
    dst = build(dst_cls, kwargs, None, seed=T + 1000, dtype=dtype)
    dst.load_state_dict(src.state_dict(), strict=True)

    x = torch.randn(2, T, kwargs["D"], generator=torch.Generator().manual_seed(7), dtype=dtype)
    with torch.no_grad():
        y_src, y_dst = src(x), dst(x)
    # src's parameters do not depend on its class, but its rope_inv_freq buffer does
    # (the two styles compute 10000^(-2i/d) differently in float32: 1-ulp apart).
    freq = src.state_dict().get("mixer.rope_inv_freq")
    freq_key = None if freq is None else tuple(freq.tolist())
    ref = spec_output(src, x, config, key=(config, T, dtype, freq_key))

    tol = TOLERANCE[dtype]
    assert y_src.dtype == y_dst.dtype == dtype
    assert torch.isfinite(y_src).all() and torch.isfinite(y_dst).all()
    assert rel_err(y_src, ref) <= tol, f"{src_cls.__name__}: {rel_err(y_src, ref):.3g}"
    assert rel_err(y_dst, ref) <= tol, f"{dst_cls.__name__}: {rel_err(y_dst, ref):.3g}"
    assert rel_err(y_src, y_dst.to(torch.float64)) <= tol
    # The residual x dominates y; check the Sessa branch alone too, so that a wrong
    # mixer cannot hide under it.
    x64 = x.to(torch.float64)
    for name, y in ((src_cls.__name__, y_src), (dst_cls.__name__, y_dst)):
        branch_err = rel_err(y.to(torch.float64) - x64, ref - x64)
        assert branch_err <= tol, f"{name} branch: {branch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", ["gamma_near_plus_max", "gamma_near_minus_max"])
@pytest.mark.parametrize("cls", STYLES)
def test_low_precision_within_spec_tolerance(cls, config, dtype):
    """16-bit models solve in float32 and stay within the spec's 3e-2."""
    kwargs, gamma_bias = CONFIGS[config]
    layer = build(cls, kwargs, gamma_bias, seed=11, dtype=dtype)
    x = torch.randn(2, 33, kwargs["D"], generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, spec_sessa_layer(layer.state_dict(), x, **kwargs)) <= 3e-2


def test_gamma_is_really_near_gamma_max():
    """The +-8 configurations exercise |gamma| within 1e-5 of gamma_max."""
    for config in ("gamma_near_plus_max", "gamma_near_minus_max"):
        kwargs, gamma_bias = CONFIGS[config]
        layer = build(SdpaSessaLayer, kwargs, gamma_bias, seed=0, dtype=torch.float64)
        abar = torch.randn(2, 33, kwargs["D"], dtype=torch.float64)
        with torch.no_grad():
            gamma = layer.mixer.gamma_max * torch.tanh(
                layer.mixer.gamma_bias + layer.mixer.gamma_ctx(abar)
            )
        assert (gamma.sign() == math.copysign(1.0, gamma_bias)).all()
        assert (0.999 - gamma.abs()).max() < 1e-5


@pytest.mark.parametrize("cls", STYLES)
def test_constructor_rejects_invalid_arguments(cls):
    for bad in (dict(D=16, gamma_max=1.0), dict(D=16, gamma_max=0.0), dict(D=15, n_heads=2),
                dict(D=16, n_heads=4, n_kv_heads=3), dict(D=12, n_heads=4)):
        with pytest.raises(ValueError):
            cls(**bad)
    cls(D=12, n_heads=4, use_forward_rope=False)  # odd head width is fine without RoPE


def _export_dynamic(module, D):
    x = torch.randn(2, 8, D)
    # min=1 is accepted for both dims (T = 1 must run: decoding a single token).
    dims = {"x": {0: Dim("B", min=1), 1: Dim("T", min=1)}}
    return export(module, (x,), dynamic_shapes=dims)


@pytest.mark.parametrize("cls", STYLES)
def test_export_with_dynamic_batch_and_length(cls):
    kwargs, _ = CONFIGS["gqa"]  # the config with the most ops: GQA, RoPE, out_proj
    layer = build(cls, kwargs, None, seed=3)
    program = _export_dynamic(layer, kwargs["D"]).module()
    for B, T in ((3, 5), (1, 1), (1, 33)):
        x = torch.randn(B, T, kwargs["D"])
        with torch.no_grad():
            eager, exported = layer(x), program(x)
        assert exported.shape == (B, T, kwargs["D"])
        assert rel_err(exported, eager.to(torch.float64)) <= 1e-6


def test_odd_block_exports_with_dynamic_batch_and_length():
    torch.manual_seed(0)
    block = OddBlock(16).eval()
    program = _export_dynamic(block, 16)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.sort.default", "aten.cumsum.default", "aten.flip.default",
            "aten.logsumexp.default"} <= targets
    assert not any("attention" in t or "solve_triangular" in t for t in targets)
    for B, T in ((3, 5), (1, 1), (2, 33)):
        x = torch.randn(B, T, 16)
        with torch.no_grad():
            assert rel_err(program.module()(x), block(x).to(torch.float64)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("cls", STYLES)
def test_styles_load_the_reference_checkpoint(cls, config, dtype):
    kwargs, gamma_bias = CONFIGS[config]
    reference = build(SessaLayer, kwargs, gamma_bias, seed=21, dtype=dtype)
    style = build(cls, kwargs, None, seed=22, dtype=dtype)
    style.load_state_dict(reference.state_dict(), strict=True)
    for key, value in reference.state_dict().items():  # nothing lost or reinterpreted
        assert torch.equal(style.state_dict()[key], value), key

    x = torch.randn(2, 33, kwargs["D"], generator=torch.Generator().manual_seed(9), dtype=dtype)
    with torch.no_grad():
        y_ref, y_style = reference(x), style(x)
    assert rel_err(y_style, y_ref.to(torch.float64)) <= TOLERANCE[dtype]

    # And back: a checkpoint saved from a style drives the reference (which reads
    # the mask buffers when max_len is given).
    round_trip = build(SessaLayer, kwargs, None, seed=23, dtype=dtype)
    round_trip.load_state_dict(style.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(round_trip(x), y_ref.to(torch.float64)) <= TOLERANCE[dtype]
