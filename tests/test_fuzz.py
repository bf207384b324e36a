"""Compiled Sessa layers against a float64 row-by-row oracle, at the extremes and under random draws.

The oracle below is written from docs/spec.md in float64 numpy, one position at a time; it shares no code
with sessa_compiler. Each backend runs the same traced graph (one trace per layer structure, so the draws
cost a kernel call, not a trace): eager, triton (in Triton's interpreter on CPU) and tvm (its hybrid mode:
generated attention/feedback kernels, the rest in torch; tests/test_tvm.py covers the whole-graph mode).

Hypothesis draws the sequence length (1, primes, and both sides of every chunk and tile size up to 64),
the batch, the gain gamma (up to within 1e-13 of +-gamma_max), the weight and input scales. A small draw
runs here; ``python benchmarks/fuzz.py`` runs a large one and plots it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sessa_compiler as sc
from sessa_compiler.backends import get_backend
from sessa_compiler.models import SessaLayer

BACKENDS = ("eager", "triton", "tvm")
SPEC_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}


# -- the oracle ------------------------------------------------------------------------------------------
_erf = np.frompyfunc(math.erf, 1, 1)


def oracle(P: dict, x: np.ndarray, H: int, Hkv: int, rope: bool, gamma_max: float, eps: float = 1e-5) -> np.ndarray:
    """y = x + W_out(s * g) for one SessaLayer, in float64, attention and feedback one row t at a time."""
    B, T, D = x.shape
    d, G = D // H, H // Hkv
    lin = lambda v, name: v @ P[name + ".weight"].T + (P[name + ".bias"] if name + ".bias" in P else 0.0)  # noqa: E731
    mu = x.mean(-1, keepdims=True)
    xn = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * P["ln.weight"] + P["ln.bias"]
    ag = lin(xn, "W_in")
    a, g = ag[..., :D], ag[..., D:]
    abar = 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)).astype(np.float64))
    q = lin(abar, "mixer.q_proj").reshape(B, T, H, d)
    k = lin(abar, "mixer.k_proj").reshape(B, T, Hkv, d)
    v = lin(abar, "mixer.v_proj").reshape(B, T, Hkv, d)
    if rope:
        theta = np.arange(T)[:, None] * P["mixer.rope_inv_freq"][None, :]           # (T, d/2) in float64
        c, s_ = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]
        for t_ in (q, k):
            e, o = t_[..., 0::2].copy(), t_[..., 1::2].copy()
            t_[..., 0::2], t_[..., 1::2] = e * c - o * s_, e * s_ + o * c
    f = np.zeros((B, T, H, d))
    for t in range(T):
        for h in range(H):
            logits = np.einsum("bc,bjc->bj", q[:, t, h], k[:, : t + 1, h // G]) / math.sqrt(d)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            f[:, t, h] = np.einsum("bj,bjc->bc", w / w.sum(-1, keepdims=True), v[:, : t + 1, h // G])
    f = f.reshape(B, T, D)
    if H > 1:
        f = f @ P["mixer.out_proj.weight"].T
    fb = lin(abar, "mixer.proj_fb")
    qb, kb = fb[..., :D], fb[..., D:]
    gamma = gamma_max * np.tanh(P["mixer.gamma_bias"] + (abar @ P["mixer.gamma_ctx.weight"].T)[..., 0])
    s = f.copy()
    for t in range(1, T):
        logits = np.einsum("bc,bjc->bj", qb[:, t], kb[:, :t]) / math.sqrt(D)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        s[:, t] += gamma[:, t, None] * np.einsum("bj,bjc->bc", w / w.sum(-1, keepdims=True), s[:, :t])
    return x + lin(s * g, "W_out")


def rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    out = out.detach().double().numpy()
    if not np.isfinite(out).all():
        return math.inf
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# -- one trace per layer structure, shared by every draw and backend ------------------------------------------
STRUCTURES = {
    # GQA with RoPE in float64, gamma_max close to 1 (condition up to 1e4)
    "gqa-rope-f64": dict(D=48, H=4, Hkv=2, rope=True, gamma_max=0.9999, dtype=torch.float64),
    # one head (no out_proj), RoPE off, float32
    "h1-norope-f32": dict(D=24, H=1, Hkv=1, rope=False, gamma_max=0.999, dtype=torch.float32),
}


@functools.lru_cache(maxsize=None)
def structure(name: str):
    cfg = STRUCTURES[name]
    torch.manual_seed(0)
    m = SessaLayer(cfg["D"], n_heads=cfg["H"], n_kv_heads=cfg["Hkv"], use_forward_rope=cfg["rope"],
                   gamma_max=cfg["gamma_max"]).to(cfg["dtype"]).eval()
    graph = sc.trace(m, (torch.randn(1, 5, cfg["D"], dtype=cfg["dtype"]),))
    return m, graph


@functools.lru_cache(maxsize=None)
def runner(name: str, backend: str):
    _, graph = structure(name)
    options = {"whole_graph": False} if backend == "tvm" else {}
    return get_backend(backend, **options).prepare(graph)


def weights(name: str, seed: int, scale: float, gamma_bias: float) -> dict:
    """Random weights for the traced structure `name` (see random_weights)."""
    return random_weights(structure(name)[1], seed, scale, gamma_bias)


def random_weights(graph, seed: int, scale: float, gamma_bias: float) -> dict:
    """Random weights (matrices ~ 1.5/sqrt(fan_in), vectors ~ 0.2) times `scale`, gamma_bias planted."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, p in graph.params.items():
        if key == "mixer.rope_inv_freq":
            out[key] = p.detach().clone()
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if key == "mixer.gamma_bias":
            value = torch.tensor(float(gamma_bias), dtype=torch.float64)
        elif key == "ln.weight":
            value = (1 + 0.2 * noise) * scale
        elif p.dim() == 2:
            value = 1.5 * noise / math.sqrt(p.shape[1]) * scale
        else:
            value = 0.2 * noise * scale
        out[key] = value.to(p.dtype)
    return out


def run_case(name: str, backend: str, T: int, B: int, seed: int, scale: float, gamma_bias: float, x_scale: float = 1.0):
    """(compiled error, module error) against the oracle, both max |out - ref| / max |ref|."""
    cfg = STRUCTURES[name]
    m, graph = structure(name)
    params = weights(name, seed, scale, gamma_bias)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(B, T, cfg["D"], generator=gen, dtype=torch.float64) * x_scale).to(cfg["dtype"])
    ref = oracle({k: v.double().numpy() for k, v in params.items()}, x.double().numpy(), cfg["H"], cfg["Hkv"],
                 cfg["rope"], cfg["gamma_max"])
    with torch.no_grad():
        out = runner(name, backend)([x], params)[0]
        m.load_state_dict(params, strict=True)
        own = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    return rel_err(out, ref), rel_err(own, ref)


def check(err: float, own: float, dtype) -> None:
    """The spec's rule: within the dtype's tolerance; float64 has no escape."""
    tol = SPEC_TOL[dtype]
    assert math.isfinite(err), "NaN/Inf where the oracle is finite"
    assert own <= tol, f"the module itself misses the spec here ({own:.2e} > {tol:.0e}): the draw is out of its range"
    assert err <= tol, f"compiled error {err:.3e} > {tol:.0e} (the module's own: {own:.3e})"


# -- the extremes, named --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma_bias", [-30.0, 30.0])
def test_float64_is_exact_with_gamma_at_its_bound_and_weights_times_3(backend, gamma_bias):
    """gamma_max = 0.9999, gamma = +-0.9999 to double precision, every weight x3: 1e-10 on every backend."""
    for T in (1, 37, 70):
        err, own = run_case("gqa-rope-f64", backend, T=T, B=2, seed=T, scale=3.0, gamma_bias=gamma_bias)
        check(err, own, torch.float64)


def test_every_float_in_a_float64_graph_is_float64():
    """No float32 constant, table or cast inside a float64 model's graph (the spec: float64 end to end)."""
    _, graph = structure("gqa-rope-f64")
    floats = {v.type.dtype.name for v in [*graph.inputs, *graph.param_values.values()]
              + [o for n in graph.nodes for o in n.outputs] if v.type.dtype.is_float}
    assert floats == {"f64"}
    assert all(p.dtype == torch.float64 for p in graph.params.values() if p.is_floating_point())


def test_a_float64_tvm_program_has_no_float32_constants():
    """The TVM kernels of a float64 graph carry their scales and mask values as float64 constants: a bare
    Python float in TVMScript is a float32 literal (only an exact 0.0 may stay one)."""
    import re

    from sessa_compiler.backends.tvm.relax_lower import graph_to_relax

    _, graph = structure("gqa-rope-f64")
    module, _ = graph_to_relax(graph, 8, {})
    assert set(re.findall(r"T\.float32\(([^)]*)\)", module.script())) <= {"0.0"}


def _extreme_bf16_draws(seeds):
    """bf16 with a tiny gain (gamma_max = 0.001, gamma_bias = 6), D = 48, H = 1, T = 63, weights x3: the plain
    module can miss 3e-2 here (docs/spec.md explains why). Yields (module, graph, params, x, float64 oracle)
    per weight draw; the module holds that draw's weights."""
    torch.manual_seed(1)
    m = SessaLayer(48, n_heads=1, gamma_max=0.001).to(torch.bfloat16).eval()
    graph = sc.trace(m, (torch.randn(1, 5, 48, dtype=torch.bfloat16),))
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        params = {}
        for key, p in graph.params.items():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if key == "mixer.gamma_bias":
                value = torch.tensor(6.0)
            elif key == "mixer.rope_inv_freq":
                value = p.detach()
            elif p.dim() == 2:
                value = 3 * 1.5 * noise / math.sqrt(p.shape[1])
            else:
                value = (1 + 0.2 * noise) if key == "ln.weight" else 0.2 * noise
            params[key] = value.to(p.dtype)
        m.load_state_dict(params, strict=True)
        P = {k: v.double().numpy() for k, v in params.items()}  # the bf16-rounded weights
        x = torch.randn(2, 63, 48, generator=gen, dtype=torch.float64).to(torch.bfloat16)
        yield m, graph, params, x, oracle(P, x.double().numpy(), 1, 1, True, 0.001)


@pytest.mark.parametrize("backend,options", [("eager", {}), ("triton", {"half_in_float32": True})])
def test_bf16_computed_in_float32_rounds_once(backend, options):
    """Backends that compute a bf16 graph in float32 (eager always; triton with half_in_float32=True) stay
    within about one bf16 rounding of float64 at every draw, where the module is 20 to 60 times further."""
    worst = 0.0
    run = None
    for m, graph, params, x, ref in _extreme_bf16_draws(range(3)):
        run = run or get_backend(backend, **options).prepare(graph)
        with torch.no_grad():
            own = rel_err(m(x), ref)
            err = rel_err(run([x], params)[0], ref)
        assert err <= 2 * 2.0**-8, (backend, err, own)
        assert err <= min(SPEC_TOL[torch.bfloat16], own), (backend, err, own)
        worst = max(worst, own)
    assert worst > 1e-2  # these draws are ones where bf16 storage does hurt: the comparison means something


def test_bf16_storage_on_triton_is_as_accurate_as_the_module():
    """Triton's default keeps bf16 storage between kernels, as the module does. Both then round the same
    tensors at different places, and with large weights the softmaxes are nearly one-hot, so a rounding can
    change which key wins: per draw either may be the closer one (12 draws measured: the Triton path from
    0.39x to 2.9x the module's error, docs/spec.md). Over draws they must be equally accurate: the median of
    the Triton path's errors within 1.5x the module's median. (Triton runs in its interpreter here.)"""
    import statistics

    own, ours = [], []
    run = None
    for m, graph, params, x, ref in _extreme_bf16_draws(range(8)):
        run = run or get_backend("triton").prepare(graph)
        with torch.no_grad():
            own.append(rel_err(m(x), ref))
            ours.append(rel_err(run([x], params)[0], ref))
    assert statistics.median(own) > SPEC_TOL[torch.bfloat16]  # draws where bf16 storage misses the spec's bound
    assert statistics.median(ours) <= 1.5 * statistics.median(own), (ours, own)
    assert max(ours) < 1.0, ours   # never garbage, only bf16 rounding amplified


# -- the property -----------------------------------------------------------------------------------------
EDGE_T = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65]


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(STRUCTURES)), backend=st.sampled_from(BACKENDS),
       T=st.sampled_from(EDGE_T) | st.integers(1, 70), B=st.integers(1, 2),
       gamma_bias=st.sampled_from([-30.0, -8.0, 0.0, 8.0, 30.0]) | st.floats(-6, 6),
       scale=st.sampled_from([0.5, 1.0, 2.0]), x_scale=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 2**16))
def test_compiled_layers_match_the_float64_oracle(name, backend, T, B, gamma_bias, scale, x_scale, seed):
    err, own = run_case(name, backend, T=T, B=B, seed=seed, scale=scale, gamma_bias=gamma_bias, x_scale=x_scale)
    check(err, own, STRUCTURES[name]["dtype"])
