"""Gradients through compiled modules on every backend.

The TVM and Triton backends train through their own kernels: each core op is an autograd.Function whose
forward is the backend's kernel and whose backward a backward kernel (backends/training.py; Triton's are
registered by backends/triton/training.py); no call recomputes on the eager interpreter. Before that,
Triton silently dropped the gradient through its kernels (outputs carried a grad_fn from the torch ops
around them only) and TVM outputs had none.
Every test compares the gradient of every parameter and of the input with the original module's own
autograd, on a deep copy with the same weights.
"""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import copy

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import TOLERANCE, relative_error
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer, TransformerLayer

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["eager", "triton", "tvm"]
TOL = TOLERANCE[torch.float32]


def planted(m, gamma_bias):
    with torch.no_grad():  # gamma near +-gamma_max: the feedback solve is at its least damped
        m.mixer.gamma_bias.fill_(gamma_bias)
    return m


MODELS = {
    "sessa_gqa": (lambda: planted(SessaLayer(32, n_heads=4, n_kv_heads=2), 6.0),
                  lambda g, B, T: torch.randn(B, T, 32, generator=g)),
    "sessa_h1_no_rope": (lambda: planted(SessaLayer(16, n_heads=1, use_forward_rope=False), -6.0),
                         lambda g, B, T: torch.randn(B, T, 16, generator=g)),
    "mamba": (lambda: MambaLayer(16), lambda g, B, T: torch.randn(B, T, 16, generator=g)),
    "transformer": (lambda: TransformerLayer(32, 4, n_kv_heads=2), lambda g, B, T: torch.randn(B, T, 32, generator=g)),
    "decoder": (lambda: Decoder(40, 32, "SMT", n_heads=2), lambda g, B, T: torch.randint(0, 40, (B, T), generator=g)),
}


def grads_of(module, out_fn, x, weight):
    module.zero_grad(set_to_none=True)
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    out = out_fn(x)
    (out * weight).sum().backward()
    params = {k: p.grad for k, p in module.named_parameters()}
    return out.detach(), (x.grad if x.is_floating_point() else None), params


def structurally_zero(module, x, weight) -> dict:
    """{name: bound} for parameters whose gradient is zero in exact arithmetic (the float64 module's is below
    1e-12 of its largest; e.g. a key bias without RoPE, which softmax cancels): the float32 gradients there are
    rounding noise, bounded by 1e-6 (a few float32 ulps) of the largest gradient."""
    m64 = copy.deepcopy(module).double()
    _, _, gp = grads_of(m64, m64, x.double() if x.is_floating_point() else x, weight.double())
    top = max(g.abs().max().item() for g in gp.values() if g is not None)
    return {k: 1e-6 * top for k, g in gp.items() if g is not None and g.abs().max().item() < 1e-12 * top}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_the_module(backend, name):
    factory, make_input = MODELS[name]
    torch.manual_seed(3)
    m = factory().train()
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(4)
    compiled = sc.compile(m, (make_input(g, 2, 5),), backend=backend)
    for B, T in [(2, 13), (1, 1)]:   # 13: not a multiple of any chunk or tile
        x = make_input(g, B, T)
        with torch.no_grad():
            weight = torch.randn(ref(x).shape, generator=g)   # a random cotangent, not all ones
        out, gx, gp = grads_of(m, compiled, x, weight)
        ref_out, ref_gx, ref_gp = grads_of(ref, ref, x, weight)
        zero = structurally_zero(ref, x, weight)
        assert relative_error(out, ref_out) <= TOL
        if ref_gx is not None:
            assert gx is not None and relative_error(gx, ref_gx) <= TOL, f"input gradient T={T}"
        for k, r in ref_gp.items():
            if r is None:
                assert gp[k] is None, k
                continue
            assert gp[k] is not None, f"{backend}: no gradient reached {k} (T={T})"
            if k in zero:   # zero in exact arithmetic: both are rounding noise, so only its size is checked
                assert gp[k].abs().max() <= zero[k], f"{backend}: gradient of {k} (T={T}) is not ~0"
                continue
            assert relative_error(gp[k], r) <= TOL, f"{backend}: gradient of {k} (T={T})"
    if backend in ("triton", "tvm"):   # their own forward and backward kernels (backends/training.py)
        assert compiled.grad_recomputes == 0
        assert "The eager interpreter is not used" in compiled.explain()


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_no_grad_calls_save_and_recompute_nothing(backend):
    torch.manual_seed(5)
    m = SessaLayer(32, n_heads=4).eval()
    x = torch.randn(2, 9, 32)
    compiled = sc.compile(m, (x,), backend=backend)
    with torch.no_grad():
        out = compiled(x)
    assert not out.requires_grad and compiled.grad_recomputes == 0
    m.requires_grad_(False)   # frozen weights and an input without grad: nothing to differentiate either
    out = compiled(x)
    assert not out.requires_grad and compiled.grad_recomputes == 0
    with torch.no_grad():
        assert relative_error(out, m(x)) <= TOL


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_a_training_step_updates_the_weights_the_compiled_module_reads(backend):
    torch.manual_seed(6)
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).train()
    ref = copy.deepcopy(m)
    compiled = sc.compile(m, (torch.randn(1, 4, 32),), backend=backend)
    opt, ref_opt = torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(2, 11, 32)
    for _ in range(2):
        for model, o, fn in ((m, opt, compiled), (ref, ref_opt, ref)):
            o.zero_grad()
            fn(x).pow(2).mean().backward()
            o.step()
    for (k, p), r in zip(m.named_parameters(), ref.parameters()):
        assert relative_error(p.detach(), r.detach()) <= TOL, k
    with torch.no_grad():
        assert relative_error(compiled(x), ref(x)) <= TOL


class _MaskedAttention(torch.nn.Module):
    """Attention whose causal mask is a buffer (the recognised op is built from its values: checked at calls)."""

    def __init__(self, d=32, h=4, L=64):
        super().__init__()
        self.h, self.qkv = h, torch.nn.Linear(d, 3 * d)
        self.register_buffer("mask", torch.tril(torch.ones(L, L, dtype=torch.bool)))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (D // self.h) ** -0.5
        a = a.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(B, T, D)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_torch_func_transforms_of_a_compiled_module(backend):
    """torch.func.grad, vmap and jacrev over a compiled module after a plain call (the check of the mask buffer
    read the transform's wrapped values and failed: 'Cannot access data pointer')."""
    torch.manual_seed(0)
    m = _MaskedAttention().eval()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 32)
    assert relative_error(c(x), m(x)) <= TOL
    got = torch.func.grad(lambda x: c(x).pow(2).sum())(x)
    assert relative_error(got, torch.func.grad(lambda x: m(x).pow(2).sum())(x)) <= TOL
    xs = torch.randn(3, 2, 5, 32)
    assert relative_error(torch.func.vmap(c)(xs), torch.func.vmap(m)(xs)) <= TOL
    jac = torch.func.jacrev(lambda x: c(x).sum(-1))(x[:1, :3])
    assert relative_error(jac, torch.func.jacrev(lambda x: m(x).sum(-1))(x[:1, :3])) <= TOL


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_a_first_call_inside_torch_func_grad_runs_the_module(backend):
    """torch.export cannot trace inside torch.func.grad (saved-tensor hooks): a call there that needs a trace runs
    the module itself (one warning); after a plain call has traced, calls inside the transform run compiled."""
    torch.manual_seed(0)
    m = _MaskedAttention().eval()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 32)
    want = torch.func.grad(lambda x: m(x).pow(2).sum())(x)
    with pytest.warns(UserWarning, match="inside a torch.func transform"):
        got = torch.func.grad(lambda x: c(x).pow(2).sum())(x)
    assert relative_error(got, want) <= TOL and c.uncompiled_calls == 1
    c(x)
    got = torch.func.grad(lambda x: c(x).pow(2).sum())(x)
    assert relative_error(got, want) <= TOL and c.uncompiled_calls == 1
