"""The backward Triton kernels (backends/triton/attention_bwd.py, feedback_bwd.py, feedback_bwd_wide.py,
scan_bwd.py) under the interpreter, against autograd through dense float64 definitions (attention:
semantics.core.attention_ref; feedback: the weights built densely below and torch.linalg.solve_triangular
differentiated; scan: semantics.core.scan_ref, one step at a time), never against the function under test.

Shapes straddle the tiles (16-row blocks; the feedback solve's inner chunks of 16 and outer chunks of 32): T = 1,
17, 70; H = 1, GQA; RoPE on and off; widths that are not powers of two; gamma within 1e-3 of +-gamma_max = 0.999.
Every buffer the kernels allocate starts as NaN (``nan_empty``)."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import math

import pytest
import torch

from sessa_compiler.backends.triton import attention_bwd, feedback_bwd
from sessa_compiler.backends.triton.attention_bwd import attention_backward_triton, attention_lse_triton
from sessa_compiler.backends.triton.feedback_bwd import feedback_backward_triton
from sessa_compiler.errors import InputError, UnsupportedError
from sessa_compiler.semantics.core import attention_ref
from sessa_compiler.tolerance import TOLERANCE, relative_error

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors: any element the kernels leave unwritten shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        x = real(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", empty)


def inv_freq(d):
    return 10000.0 ** (-2.0 * torch.arange(d // 2, dtype=torch.float32) / d)


def attention_case(B, T, H, Hkv, d, dv, rope, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, h, d, generator=gen, dtype=torch.float64) for h in (H, Hkv))
    v = torch.randn(B, T, Hkv, dv, generator=gen, dtype=torch.float64)
    grad = torch.randn(B, T, H, dv, generator=gen, dtype=torch.float64)
    return q, k, v, grad, (inv_freq(d) if rope else None)


def attention_want(q, k, v, grad, inv, scale):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attention_ref(*leaves, scale, True, inv)
    return out.detach(), torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("B, T, H, Hkv, d, dv, rope", [
    (1, 1, 1, 1, 16, 16, False),
    (1, 17, 1, 1, 16, 16, True),
    (2, 70, 4, 2, 24, 20, True),     # GQA, widths not powers of two, T a multiple of no tile
    (1, 70, 4, 1, 32, 32, False),
])
def test_attention_backward_matches_float64_autograd(B, T, H, Hkv, d, dv, rope, nan_empty):
    q, k, v, grad, inv = attention_case(B, T, H, Hkv, d, dv, rope, seed=T + H)
    scale = d ** -0.5
    out, want = attention_want(q, k, v, grad, inv, scale)
    got = attention_backward_triton(q.float(), k.float(), v.float(), out.float(), grad.float(), scale, inv)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.isfinite(a).all(), name
        assert relative_error(a, b) <= TOLERANCE[torch.float32], (name, relative_error(a, b))


def test_attention_backward_uses_the_given_lse():
    """The kernels take the forward's log-sum-exps: the float64 ones give the same gradients, a wrong one not."""
    q, k, v, grad, inv = attention_case(1, 40, 2, 1, 16, 16, True, seed=3)
    scale = 0.3
    out, want = attention_want(q, k, v, grad, inv, scale)
    from sessa_compiler.semantics.core import _rotate
    qr, kr = _rotate(q, inv), _rotate(k, inv).repeat_interleave(2, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", qr, kr) * scale
    logits = logits.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), -math.inf)
    lse = torch.logsumexp(logits, -1).float()
    assert relative_error(attention_lse_triton(q.float(), k.float(), scale, inv), lse) <= 1e-6
    args = (q.float(), k.float(), v.float(), out.float(), grad.float(), scale, inv)
    got = attention_backward_triton(*args, lse=lse)
    for a, b in zip(got, want):
        assert relative_error(a, b) <= TOLERANCE[torch.float32]
    bad = attention_backward_triton(*args, lse=lse + 1.0)
    assert relative_error(bad[0], want[0]) > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_backward_16_bit(dtype, nan_empty):
    """16-bit operands (stored in 16 bits, computed in float32): within the spec's 16-bit tolerance of float64
    autograd at the same rounded inputs; gradients come back in the operands' dtype."""
    q, k, v, grad, inv = attention_case(2, 33, 4, 2, 16, 16, True, seed=5)
    q, k, v, grad = (x.to(dtype).double() for x in (q, k, v, grad))
    out, want = attention_want(q, k, v, grad, inv, 0.25)
    got = attention_backward_triton(q.to(dtype), k.to(dtype), v.to(dtype), out.to(dtype), grad.to(dtype), 0.25, inv)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert relative_error(a.double(), b) <= TOLERANCE[dtype]


from masks import padding_masks  # noqa: E402


@pytest.mark.parametrize("T, H, Hkv, d, dv, rope", [
    (1, 1, 1, 16, 16, False),        # T = 1: rows fully padded or seeing only themselves
    (17, 1, 1, 16, 16, True),        # H = 1 over two 16-row blocks, RoPE
    (20, 4, 2, 24, 20, True),        # GQA, widths not powers of two, T a multiple of no tile
    (33, 2, 2, 16, 16, False),       # RoPE off
])
def test_masked_attention_backward_matches_float64_autograd(T, H, Hkv, d, dv, rope, nan_empty):
    """The key-padding-mask kernels (module docstring of attention_bwd.py) against autograd through the dense float64
    attention_ref with the mask (empty_rows="mean"), given the masked forward kernel's lse and given none (the
    masked lse kernel)."""
    from sessa_compiler.backends.triton.ops import _attention_kernel
    from sessa_compiler.backends.triton.attention import launch_attention

    q, k, v, grad, inv = attention_case(5, T, H, Hkv, d, dv, rope, seed=T + H)
    m = padding_masks(T)
    scale = d ** -0.5
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attention_ref(*leaves, scale, True, inv, m)
    want = torch.autograd.grad(out, leaves, grad)
    named = [("q", "f32"), ("k", "f32"), ("v", "f32")] + ([("inv_freq", "f32")] if rope else [])
    fwd = _attention_kernel(H, Hkv, d, dv, scale, rope, tuple(sorted(named)), True, True)
    got_out, lse = launch_attention(fwd, q.float(), k.float(), v.float(), inv, return_lse=True, mask=m)
    assert relative_error(got_out, out.detach()) <= TOLERANCE[torch.float32]
    for given in (lse, None):
        got = attention_backward_triton(q.float(), k.float(), v.float(), got_out, grad.float(), scale, inv, given,
                                        mask=m)
        for name, a, b in zip("qkv", got, want):
            assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
            assert relative_error(a, b) <= TOLERANCE[torch.float32], (name, relative_error(a, b))
    with pytest.raises(InputError, match="key-padding mask must be"):
        attention_backward_triton(q.float(), k.float(), v.float(), got_out, grad.float(), scale, inv, lse, mask=m[:1])


def test_masked_attention_backward_bf16(nan_empty):
    """bf16 operands with a key-padding mask (stored in 16 bits, computed in float32): within the spec's bf16
    tolerance of float64 autograd at the same rounded inputs."""
    q, k, v, grad, inv = attention_case(5, 20, 4, 2, 16, 16, True, seed=7)
    q, k, v, grad = (x.to(torch.bfloat16).double() for x in (q, k, v, grad))
    m = padding_masks(20)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attention_ref(*leaves, 0.25, True, inv, m)
    want = torch.autograd.grad(out, leaves, grad)
    bf = torch.bfloat16
    got = attention_backward_triton(q.to(bf), k.to(bf), v.to(bf), out.detach().to(bf), grad.to(bf), 0.25, inv, mask=m)
    for a, b in zip(got, want):
        assert a.dtype == bf
        assert relative_error(a.double(), b) <= TOLERANCE[bf]


def test_attention_backward_rejects_bad_inputs():
    q, k, v, grad, _ = attention_case(1, 8, 4, 2, 16, 16, False, seed=0)
    q, k, v, grad = (x.float() for x in (q, k, v, grad))
    with pytest.raises(InputError, match="attention"):
        attention_backward_triton(q, k[:, :4], v, grad, grad, 0.25)
    with pytest.raises(InputError, match="multiple of kv heads"):
        attention_backward_triton(q[:, :, :3], k, v, grad[:, :, :3], grad[:, :, :3], 0.25)
    with pytest.raises(InputError, match="lse"):
        attention_backward_triton(q, k, v, grad, grad, 0.25, lse=torch.zeros(1, 8, 4))
    with pytest.raises(UnsupportedError, match="share one of"):
        attention_backward_triton(q.double(), k.double(), v.double(), grad.double(), grad.double(), 0.25)


def feedback_case(B, T, d_qk, d_v, gamma_sign, seed):
    """Fresh operands with |gamma| within about 1e-3 of gamma_max = 0.999 (ill-conditioned solves)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, T, d_v, generator=gen, dtype=torch.float64)
    q = torch.randn(B, T, d_qk, generator=gen, dtype=torch.float64) * 1.5
    k = torch.randn(B, T, d_qk, generator=gen, dtype=torch.float64) * 1.5
    gamma = 0.999 * torch.tanh(gamma_sign * 9.0 + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64))
    grad = torch.randn(B, T, d_v, generator=gen, dtype=torch.float64)
    return f, q, k, gamma, grad


def feedback_dense(f, q_b, k_b, gamma, scale):
    """s = (I - diag(gamma) alpha)^-1 f with alpha the strictly causal softmax built densely (row 0 zero)."""
    T = f.shape[1]
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    logits = torch.einsum("btc,bsc->bts", q_b, k_b) * scale
    logits = torch.where(strict, logits, torch.full_like(logits, -1e300))
    alpha = torch.softmax(logits, -1) * strict
    system = torch.eye(T, dtype=f.dtype) - gamma[..., None] * alpha
    return torch.linalg.solve_triangular(system, f, upper=False, unitriangular=True)


def feedback_want(f, q, k, gamma, grad, scale):
    leaves = [x.clone().requires_grad_(True) for x in (f, q, k, gamma)]
    s = feedback_dense(*leaves, scale)
    return s.detach(), torch.autograd.grad(s, leaves, grad)


@pytest.mark.parametrize("B, T, d_qk, d_v, gamma_sign, strategy", [
    (1, 1, 16, 16, 1.0, "rows"),
    (1, 17, 16, 16, -1.0, "rows"),
    (2, 70, 24, 20, 1.0, "rows"),     # crosses inner (16) and outer (32) chunks; widths not powers of two
    (1, 70, 40, 16, -1.0, "rows"),
    (1, 1, 16, 16, -1.0, "strips"),
    (1, 17, 16, 16, 1.0, "strips"),
    (2, 70, 40, 36, -1.0, "strips"),   # width tiles of 16 with masked tails
    (1, 20, 264, 24, 1.0, None),       # wider than a register row: the default picks strips
])
def test_feedback_backward_matches_float64_autograd(B, T, d_qk, d_v, gamma_sign, strategy, nan_empty):
    f, q, k, gamma, grad = feedback_case(B, T, d_qk, d_v, gamma_sign, seed=T + d_qk)
    scale = d_qk ** -0.5
    s, want = feedback_want(f, q, k, gamma, grad, scale)
    got = feedback_backward_triton(grad.float(), s.float(), q.float(), k.float(), gamma.float(), scale,
                                   strategy=strategy)
    for name, a, b in zip(("f", "q_b", "k_b", "gamma"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.isfinite(a).all(), name
        assert relative_error(a, b) <= TOLERANCE[torch.float32], (name, relative_error(a, b))


def test_feedback_backward_uses_the_given_lse():
    f, q, k, gamma, grad = feedback_case(1, 40, 16, 16, 1.0, seed=8)
    s, want = feedback_want(f, q, k, gamma, grad, 0.25)
    logits = torch.einsum("btc,bsc->bts", q, k) * 0.25
    logits = logits.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(-1), -math.inf)
    lse = torch.logsumexp(logits, -1)
    lse[:, 0] = 0.0
    args = (grad.float(), s.float(), q.float(), k.float(), gamma.float(), 0.25)
    for a, b in zip(feedback_backward_triton(*args, lse=lse.float()), want):
        assert relative_error(a, b) <= TOLERANCE[torch.float32]
    bad = feedback_backward_triton(*args, lse=lse.float() - 0.5)
    assert relative_error(bad[0], want[0]) > 0.1


@pytest.mark.parametrize("dtype, strategy", [(torch.bfloat16, "rows"), (torch.float16, "rows"),
                                             (torch.bfloat16, "strips")])
def test_feedback_backward_16_bit(dtype, strategy, nan_empty):
    f, q, k, gamma, grad = feedback_case(2, 45, 16, 24, -1.0, seed=11)
    f, q, k, gamma, grad = (x.to(dtype).double() for x in (f, q, k, gamma, grad))
    s, want = feedback_want(f, q, k, gamma, grad, 0.25)
    got = feedback_backward_triton(grad.to(dtype), s.to(dtype), q.to(dtype), k.to(dtype), gamma.to(dtype), 0.25,
                                   strategy=strategy)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert relative_error(a.double(), b) <= TOLERANCE[dtype]


def test_feedback_backward_rejects_bad_inputs():
    f, q, k, gamma, grad = (x.float() for x in feedback_case(1, 8, 16, 16, 1.0, seed=0))
    with pytest.raises(InputError, match="feedback"):
        feedback_backward_triton(grad, f, q, k[:, :4], gamma, 0.25)
    with pytest.raises(InputError, match="lse"):
        feedback_backward_triton(grad, f, q, k, gamma, 0.25, lse=torch.zeros(1, 7))
    with pytest.raises(UnsupportedError, match="no kernel"):
        feedback_backward_triton(grad.double(), f.double(), q, k, gamma, 0.25)
    with pytest.raises(UnsupportedError, match="widths up to"):
        feedback_backward_triton(grad, f, torch.zeros(1, 8, 300), torch.zeros(1, 8, 300), gamma, 0.25,
                                 strategy="rows")
    with pytest.raises(UnsupportedError, match="strategy"):
        feedback_backward_triton(grad, f, q, k, gamma, 0.25, strategy="dense")


def test_triton_ops_backward_runs_these_kernels(monkeypatch):
    """torch.ops.sessa_compiler.attention_triton / feedback_triton / selective_scan_triton: their registered backward
    calls the kernels above (counted) and matches float64 autograd of the dense definitions."""
    import sessa_compiler  # noqa: F401
    from sessa_compiler.backends.triton import ops

    monkeypatch.setattr(ops, "FEEDBACK_CHUNK_SIZE", 16)
    calls = []
    for mod, name in ((attention_bwd, "attention_backward_triton"), (feedback_bwd, "feedback_backward_triton")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))

    q, k, v, grad, inv = attention_case(1, 21, 4, 2, 16, 16, True, seed=13)
    _, want = attention_want(q, k, v, grad, inv, 0.25)
    leaves = [x.float().requires_grad_(True) for x in (q, k, v)]
    torch.ops.sessa_compiler.attention_triton(*leaves, inv, 0.25, True).backward(grad.float())
    for a, b in zip(leaves, want):
        assert relative_error(a.grad, b) <= TOLERANCE[torch.float32]

    f, qb, kb, gamma, grad = feedback_case(2, 37, 16, 16, 1.0, seed=14)
    _, want = feedback_want(f, qb, kb, gamma, grad, 0.25)
    leaves = [x.float().requires_grad_(True) for x in (f, qb, kb, gamma)]
    torch.ops.sessa_compiler.feedback_triton(*leaves, 0.25).backward(grad.float())
    for a, b in zip(leaves, want):
        assert relative_error(a.grad, b) <= TOLERANCE[torch.float32]

    real_scan = ops.scan_backward_triton
    monkeypatch.setattr(ops, "scan_backward_triton",
                        lambda *a, **kw: calls.append("scan_backward_triton") or real_scan(*a, **kw))
    *args, grad = scan_case(1, 5, 16, 4, seed=15)
    leaves = [x.clone().requires_grad_(True) for x in args]
    from sessa_compiler.semantics.core import scan_ref
    want = torch.autograd.grad(scan_ref(*leaves), leaves, grad)
    leaves = [x.float().requires_grad_(True) for x in args]
    torch.ops.sessa_compiler.selective_scan_triton(*leaves).backward(grad.float())
    for a, b in zip(leaves, want):
        assert relative_error(a.grad, b) <= TOLERANCE[torch.float32]
    assert calls == ["attention_backward_triton", "feedback_backward_triton", "scan_backward_triton"]


def scan_case(Bt, T, Din, N, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)   # noqa: E731
    u, delta = r(Bt, T, Din), torch.nn.functional.softplus(r(Bt, T, Din))
    A = -torch.rand(Din, N, generator=gen, dtype=torch.float64) - 0.5
    return u, delta, A, r(Bt, T, N), r(Bt, T, N), r(Din), r(Bt, T, Din)


@pytest.mark.parametrize("Bt, T, Din, N", [(1, 1, 16, 4), (2, 20, 20, 5)])   # chunks of 8: T=20 crosses two
def test_scan_backward_matches_float64_autograd(Bt, T, Din, N, nan_empty):
    from sessa_compiler.backends.triton.scan_bwd import scan_backward_triton
    from sessa_compiler.semantics.core import scan_ref

    *args, grad = scan_case(Bt, T, Din, N, seed=T)
    leaves = [x.clone().requires_grad_(True) for x in args]
    want = torch.autograd.grad(scan_ref(*leaves), leaves, grad)
    got = scan_backward_triton(grad.float(), *(x.float() for x in args), chunk=8)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert relative_error(a, b) <= TOLERANCE[torch.float32], (name, relative_error(a, b))


@pytest.mark.parametrize("strategy", ["rows", "strips"])
def test_strided_operands_and_an_expanded_gradient(strategy, nan_empty):
    """Views as a traced model passes them (q_b and k_b halves of one projection, q from a transposed tensor) and
    the stride-0 gradient of out.sum()."""
    f, q, k, gamma, _ = feedback_case(1, 23, 16, 16, 1.0, seed=21)
    qk = torch.cat([q, k], dim=-1).float()
    qb, kb = qk.split([16, 16], dim=-1)
    s, want = feedback_want(f, q, k, gamma, torch.ones_like(f), 0.25)
    got = feedback_backward_triton(torch.ones(1, 1, 1).expand(1, 23, 16), s.float(), qb, kb,
                                   gamma.float().t().contiguous().t(), 0.25, strategy=strategy)
    for a, b in zip(got, want):
        assert relative_error(a, b) <= TOLERANCE[torch.float32]
    qa, ka, va, _, inv = attention_case(1, 19, 2, 1, 16, 16, True, seed=22)
    out, want = attention_want(qa, ka, va, torch.ones(1, 19, 2, 16, dtype=torch.float64), inv, 0.25)
    qt = qa.float().transpose(1, 2).contiguous().transpose(1, 2)   # [B, T, H, d] with T not the outer stride
    ones = torch.ones(1, 1, 1, 1).expand(1, 19, 2, 16)
    got = attention_backward_triton(qt, ka.float(), va.float(), out.float(), ones, 0.25, inv)
    for a, b in zip(got, want):
        assert relative_error(a, b) <= TOLERANCE[torch.float32]
