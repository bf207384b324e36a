"""The core ops' backward (semantics/backward.py, the feedback's in semantics/core.py) against an independent
definition: autograd through the dense float64 references of semantics/core.py, which share no code with
the blocked backward under test; and torch.autograd.gradcheck in float64 of the training path's
autograd.Function (backends/training.py) at sizes that straddle the block sizes."""
from __future__ import annotations

import pytest
import torch

from sessa_compiler.backends.training import core_function
from sessa_compiler.semantics import backward as bw
from sessa_compiler.semantics.core import (attention_ref, feedback_backward, feedback_ref, scan_ref,
                                           tri_solve_ref)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _autograd(fn, inputs, grad):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad)


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        err = (g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)
        assert err < tol, err


# (B, T, H, Hkv, d, rope, causal)
ATTN = [(1, 1, 2, 1, 4, True, True), (2, 37, 4, 2, 8, True, True), (1, 130, 1, 1, 8, False, True),
        (1, 257, 4, 1, 4, True, True), (2, 19, 2, 2, 4, False, False)]


@pytest.mark.parametrize("B,T,H,Hkv,d,rope,causal", ATTN)
def test_attention_backward_matches_dense_autograd(B, T, H, Hkv, d, rope, causal):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, h, d, generator=g, dtype=F64) for h in (H, Hkv, Hkv))
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=F64) / d) if rope else None
    dout = torch.randn(B, T, H, d, generator=g, dtype=F64)
    scale = d ** -0.5
    want = _autograd(lambda a, b, c: attention_ref(a, b, c, scale, causal, inv), (q, k, v), dout)
    out, lse = bw.attention_lse(q, k, v, scale, causal, inv, block=16)
    _close([out], [attention_ref(q, k, v, scale, causal, inv)], 1e-12)
    got = bw.attention_backward(dout, q, k, v, inv, out, lse, scale, causal, block=16)
    _close(got, want, 1e-10)
    assert [x.shape for x in got] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("T,gamma_bias", [(1, 0.0), (63, 0.999), (65, -0.999), (130, 0.5)])
def test_feedback_backward_matches_dense_autograd(T, gamma_bias):
    g = torch.Generator().manual_seed(T)
    B, D, c = 2, 6, 4
    f = torch.randn(B, T, D, generator=g, dtype=F64)
    qb, kb = torch.randn(B, T, c, generator=g, dtype=F64), torch.randn(B, T, c, generator=g, dtype=F64)
    gamma = (gamma_bias + 0.001 * torch.randn(B, T, generator=g, dtype=F64)).clamp(-0.9999, 0.9999)
    ds = torch.randn(B, T, D, generator=g, dtype=F64)
    want = _autograd(lambda *a: feedback_ref(*a, 0.5), (f, qb, kb, gamma), ds)
    s = feedback_ref(f, qb, kb, gamma, 0.5)
    _close(feedback_backward(ds, s, qb, kb, gamma, 0.5, chunk=64), want, 1e-9)


@pytest.mark.parametrize("upper,unit", [(False, True), (True, False), (False, False)])
def test_tri_solve_backward_matches_autograd(upper, unit):
    g = torch.Generator().manual_seed(1)
    T = 9
    A = torch.randn(2, T, T, generator=g, dtype=F64) * 0.2 + 3 * torch.eye(T, dtype=F64)
    A = A.triu() if upper else A.tril()
    b = torch.randn(2, T, 3, generator=g, dtype=F64)
    grad = torch.randn(2, T, 3, generator=g, dtype=F64)
    want = _autograd(lambda a, c: tri_solve_ref(a, c, upper, unit), (A, b), grad)
    mask = torch.ones(T, T, dtype=torch.bool)
    mask = (mask.triu(1 if unit else 0) if upper else mask.tril(-1 if unit else 0))
    got = bw.tri_solve_backward(grad, A, tri_solve_ref(A, b, upper, unit), upper, unit)
    _close([got[0] * mask, got[1]], [want[0] * mask, want[1]], 1e-12)


@pytest.mark.parametrize("T", [1, 5, 11])
def test_scan_backward_matches_autograd(T):
    g = torch.Generator().manual_seed(T)
    B, Din, N = 2, 3, 4
    u = torch.randn(B, T, Din, generator=g, dtype=F64)
    dt = torch.rand(B, T, Din, generator=g, dtype=F64) * 0.5
    A = -torch.rand(Din, N, generator=g, dtype=F64)
    Bm, Cm = torch.randn(B, T, N, generator=g, dtype=F64), torch.randn(B, T, N, generator=g, dtype=F64)
    D = torch.randn(Din, generator=g, dtype=F64)
    grad = torch.randn(B, T, Din, generator=g, dtype=F64)
    want = _autograd(scan_ref, (u, dt, A, Bm, Cm, D), grad)
    _close(bw.scan_backward(grad, u, dt, A, Bm, Cm, D, chunk=4), want, 1e-10)


def _poisoned_forward(op, attrs):
    """A forward 'kernel' that computes the op and returns a NaN-poisoned buffer refilled with the result (so
    the backward reads only what the forward returned and saved)."""
    from sessa_compiler.semantics import SEMANTICS

    def run(*operands):
        out = SEMANTICS[op](*operands, **attrs)
        buf = torch.full_like(out, float("nan"))
        buf.copy_(out)
        return buf
    return run


@pytest.mark.parametrize("T", [1, 3, 70])
def test_gradcheck_attention_function(T):
    g = torch.Generator().manual_seed(T)
    d = 4
    q = torch.randn(1, T, 2, d, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, T, 1, d, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(1, T, 1, d, generator=g, dtype=F64, requires_grad=True)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=F64) / d)
    attrs = {"scale": 0.5, "causal": True, "rope": True}
    fn = core_function("attention", _poisoned_forward("attention", attrs), attrs)
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, inv), (q, k, v))


@pytest.mark.parametrize("T,gamma_bias", [(1, 0.0), (66, 0.999), (5, -0.999)])
def test_gradcheck_feedback_function(T, gamma_bias):
    g = torch.Generator().manual_seed(T)
    f = torch.randn(1, T, 3, generator=g, dtype=F64, requires_grad=True)
    qb = torch.randn(1, T, 2, generator=g, dtype=F64, requires_grad=True)
    kb = torch.randn(1, T, 2, generator=g, dtype=F64, requires_grad=True)
    gamma = torch.full((1, T), gamma_bias, dtype=F64).requires_grad_(True)
    fn = core_function("feedback", _poisoned_forward("feedback", {"scale": 0.7}), {"scale": 0.7})
    assert torch.autograd.gradcheck(fn, (f, qb, kb, gamma))
