"""The TVM backward kernels (backends/tvm/kernels/attention_bwd.py, run by backends/tvm/training.py) against
autograd through the dense float64 reference of semantics/core.py (never the backward under test), with the
kernel's outputs poisoned with NaN before the run, at shapes straddling the query and key blocks."""
from __future__ import annotations

import pytest
import torch

import tvm  # noqa: E402,F401 - pinned in requirements/all.txt: CI always runs these tests

from sessa_compiler.api import relative_error  # noqa: E402
from sessa_compiler.backends.tvm import training as tvm_training  # noqa: E402
from sessa_compiler.backends.tvm.build import aligned_empty  # noqa: E402
from sessa_compiler.backends.tvm.schedules import AttentionSchedule  # noqa: E402
from sessa_compiler.semantics import attention_ref  # noqa: E402
from sessa_compiler.semantics.backward import attention_lse  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = AttentionSchedule(q_block=16, k_block=8, rows=2, v_lanes=4)   # many blocks at small T


def _poisoned(shape, dtype):
    return aligned_empty(shape, dtype).fill_(float("nan"))


def _dense_grads(B, T, H, Hkv, d, rope, scale, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, T, Hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    inv = torch.rand(d // 2, generator=g, dtype=torch.float64) if rope else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attention_ref(*leaves, scale, True, inv)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    return (q, k, v, inv, out.detach(), w), torch.autograd.grad(out, leaves, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, T, H, Hkv, d, rope, sched", [
    (1, 1, 2, 1, 8, True, None),          # T = 1
    (2, 37, 2, 2, 8, False, SMALL),       # odd T over 16-row / 8-key blocks, RoPE off
    (1, 50, 4, 1, 8, True, SMALL),        # GQA: 4 query heads read one kv head
    (2, 67, 1, 1, 16, True, None),        # H = 1, straddles the default 64-row block
])
@pytest.mark.parametrize("fused", [False, True], ids=["two_pass", "fused_dq"])
def test_attention_backward_kernel_equals_dense_autograd(monkeypatch, dtype, B, T, H, Hkv, d, rope, sched, fused):
    monkeypatch.setattr(tvm_training, "aligned_empty", _poisoned)
    scale = d ** -0.5
    (q, k, v, inv, out, w), want = _dense_grads(B, T, H, Hkv, d, rope, scale, seed=T)
    q_, k_, v_, out_, w_ = (x.to(dtype) for x in (q, k, v, out, w))
    inv_ = inv.to(dtype) if rope else None
    lse = attention_lse(q_, k_, v_, scale, True, inv_, with_out=False)[1]
    got = tvm_training.attention_backward_tvm(w_, q_, k_, v_, inv_, out_, lse, scale, True, schedule=sched,
                                              fused_dq=fused)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, c in zip(got, want):
        assert a.dtype == dtype and not a.isnan().any()
        assert relative_error(a, c) <= tol


def test_attention_backward_kernel_sees_large_logits():
    """Rows whose logits differ by hundreds (probabilities 0 or 1 after the softmax): the recomputed
    P = exp(S - lse) must not overflow."""
    (q, k, v, inv, out, w), want = _dense_grads(1, 40, 2, 1, 8, True, 8.0, seed=3)
    lse = attention_lse(q.float(), k.float(), v.float(), 8.0, True, inv.float(), with_out=False)[1]
    got = tvm_training.attention_backward_tvm(w.float(), q.float(), k.float(), v.float(), inv.float(), out.float(),
                                              lse, 8.0, True, schedule=SMALL)
    for a, c in zip(got, want):
        assert relative_error(a, c) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_forward_kernel_writes_the_row_lse(monkeypatch, dtype):
    """kernels/attention_lse.py: the forward's output and its row log-sum-exps (poisoned before the run)
    against semantics.backward.attention_lse, at an odd T over several query blocks with GQA and RoPE."""
    from sessa_compiler.backends.tvm.build import attention_spec
    from sessa_compiler.backends.tvm.target import resolve_target

    monkeypatch.setattr(tvm_training, "aligned_empty", _poisoned)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 45, 4, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 45, 2, 8, generator=g, dtype=dtype) for _ in range(2))
    inv = torch.rand(4, generator=g, dtype=dtype)
    name = "float64" if dtype == torch.float64 else "float32"
    run = tvm_training.attention_forward_kernel(attention_spec(4, 2, 8, 0.35, True, name, SMALL), resolve_target(None))
    out, lse = run(q, k, v, inv)
    want_out, want_lse = attention_lse(q.double(), k.double(), v.double(), 0.35, True, inv.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert relative_error(out, want_out) <= tol and relative_error(lse, want_lse) <= tol


def test_a_tvm_training_step_runs_the_backward_kernels(monkeypatch):
    """A training step of the TVM backend runs the forward-with-lse and backward attention kernels and the
    feedback backward kernel (float64: gradients equal the module's own autograd to 1e-10)."""
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer

    calls = []
    real = tvm_training.attention_backward_tvm
    monkeypatch.setattr(tvm_training, "attention_backward_tvm", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_fb = tvm_training.feedback_backward_tvm
    monkeypatch.setattr(tvm_training, "feedback_backward_tvm", lambda *a, **k: calls.append(2) or real_fb(*a, **k))
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).train().double()
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    params = dict(m.named_parameters())
    m(x).pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    compiled = sc.compile(m, backend="tvm")
    compiled(x).pow(2).mean().backward()
    assert sorted(calls) == [1, 2]
    for n, w in want.items():
        assert relative_error(params[n].grad, w) <= 1e-10, n


# -- attention with a key-padding mask ---------------------------------------------------------------------------
from masks import padding_masks  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T, H, Hkv, d, rope, sched", [
    (1, 2, 1, 8, True, None),             # T = 1: rows fully padded or seeing only themselves
    (37, 2, 2, 8, False, SMALL),          # odd T over 16-row / 8-key blocks, RoPE off
    (50, 4, 1, 8, True, SMALL),           # GQA 4:1 with RoPE
    (67, 1, 1, 16, False, None),          # H = 1, straddles the default 64-row block
])
@pytest.mark.parametrize("fused", [False, True], ids=["two_pass", "fused_dq"])
def test_masked_attention_kernels_equal_dense_autograd(monkeypatch, dtype, T, H, Hkv, d, rope, sched, fused):
    """The masked forward-with-lse and backward kernels (every buffer they are handed starts as NaN) against
    autograd through the dense float64 attention_ref with the mask (empty_rows="mean": a row that sees no key is
    the mean of v over all T keys, and its gradient reaches every key)."""
    from sessa_compiler.backends.tvm.build import attention_spec
    from sessa_compiler.backends.tvm.target import resolve_target

    monkeypatch.setattr(tvm_training, "aligned_empty", _poisoned)
    scale = d ** -0.5
    g = torch.Generator().manual_seed(T + H)
    m = padding_masks(T)
    q = torch.randn(5, T, H, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(5, T, Hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    inv = torch.rand(d // 2, generator=g, dtype=torch.float64) if rope else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attention_ref(*leaves, scale, True, inv, m)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(out, leaves, w)
    q_, k_, v_, w_ = (x.to(dtype) for x in (q, k, v, w))
    inv_ = inv.to(dtype) if rope else None
    name = "float64" if dtype == torch.float64 else "float32"
    fwd = tvm_training.attention_forward_kernel(attention_spec(H, Hkv, d, scale, rope, name, sched, key_padding=True),
                                                resolve_target(None))
    got_out, lse = fwd(q_, k_, v_, inv_, m)
    want_lse = attention_lse(q, k, v, scale, True, inv, with_out=False, mask=m)[1]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert relative_error(got_out, out.detach()) <= tol and relative_error(lse, want_lse) <= tol
    got = tvm_training.attention_backward_tvm(w_, q_, k_, v_, inv_, got_out, lse, scale, True, schedule=sched, mask=m,
                                              fused_dq=fused)
    for a, c in zip(got, want):
        assert a.dtype == dtype and not a.isnan().any()
        assert relative_error(a, c) <= tol


class PaddedAttention(torch.nn.Module):
    """One attention layer with Hugging Face's additive key-padding mask ((1 - mask) * finfo.min plus a finfo.min
    causal mask, clamped), GQA 2:1, RoPE, and an output projection."""

    def __init__(self, D=16, H=2):
        super().__init__()
        self.q, self.kv, self.o = (torch.nn.Linear(D, n) for n in (D, D, D))
        self.H, self.dh = H, D // H
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, self.dh, 2).double() / self.dh))

    def rope(self, x):
        T = x.shape[1]
        ang = torch.arange(T, dtype=x.dtype)[:, None] * self.inv_freq.to(x.dtype)[None, :]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        xe, xo = x[..., 0::2], x[..., 1::2]
        return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)

    def forward(self, x, attention_mask):
        B, T, D = x.shape
        q = self.rope(self.q(x).view(B, T, self.H, self.dh))
        k, v = self.kv(x).view(B, T, 2, 1, self.dh).unbind(2)
        k = self.rope(k)
        k, v = (t.repeat_interleave(self.H, dim=2) for t in (k, v))
        s = torch.einsum("bthd,bshd->bhts", q, k) / self.dh ** 0.5
        minv = torch.finfo(s.dtype).min
        add = torch.full((T, T), minv, dtype=s.dtype).triu(1) + (1.0 - attention_mask[:, None, None, :].to(s.dtype)) * minv
        p = (s + add.clamp(min=minv)).softmax(-1)
        return self.o(torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, D))


def test_a_masked_tvm_training_step_runs_the_masked_kernels(monkeypatch):
    """compile(backend="tvm") of a layer with a key-padding mask: one float64 training step gives the module's own
    gradients (parameters and input) to 1e-10 through the masked forward and backward kernels, with the blocked
    torch forward and backward made to raise; explain() names the masked kernel path."""
    import sessa_compiler as sc
    import sessa_compiler.backends.training as training
    import sessa_compiler.semantics.backward as sem_backward

    torch.manual_seed(0)
    m = PaddedAttention().double()
    x = torch.randn(5, 13, 16, dtype=torch.float64, requires_grad=True)
    mask = padding_masks(13)
    params = dict(m.named_parameters())
    m(x, mask).pow(2).sum().backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    want_x = x.grad.clone()
    for p in [*params.values(), x]:
        p.grad = None
    compiled = sc.compile(m, backend="tvm")

    def blocked(*a, **k):
        raise AssertionError("the blocked torch attention ran in a masked tvm training step")

    masks_seen = []
    real = tvm_training.attention_backward_tvm
    monkeypatch.setattr(tvm_training, "attention_backward_tvm",
                        lambda *a, **k: masks_seen.append(k.get("mask") is not None) or real(*a, **k))
    monkeypatch.setattr(sem_backward, "attention_backward", blocked)
    monkeypatch.setattr(sem_backward, "attention_lse", blocked)
    monkeypatch.setattr(training, "attention_lse", blocked)
    compiled(x, mask).pow(2).sum().backward()
    assert masks_seen == [True]
    assert compiled.graph.ops().count("attention") == 1
    for n, w in want.items():
        assert relative_error(params[n].grad, w) <= 1e-10, n
    assert relative_error(x.grad, want_x) <= 1e-10
    assert "a call that needs gradients runs its masked forward with lse (attention_lse) and the masked backward " \
        "kernel (attention_bwd)" in compiled.explain()


# -- feedback ----------------------------------------------------------------------------------------------------
from sessa_compiler.backends.tvm.schedules import FeedbackSchedule  # noqa: E402
from sessa_compiler.semantics import feedback_ref  # noqa: E402

FB_SMALL = FeedbackSchedule(chunk=8, key_block=4, rows=2, col_block=4, gemm_rows=2)   # many chunks at small T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, T, D, gamma_max, sched", [
    (1, 1, 8, 0.9, FB_SMALL),          # T = 1: no predecessor at all
    (2, 37, 8, 0.99, FB_SMALL),        # odd T over 8-row chunks, gamma near +-gamma_max
    (1, 131, 16, 0.5, None),           # straddles the default 128-row chunk of the backward
])
def test_feedback_backward_kernel_equals_dense_autograd(monkeypatch, dtype, B, T, D, gamma_max, sched):
    monkeypatch.setattr(tvm_training, "aligned_empty", _poisoned)
    g = torch.Generator().manual_seed(T)
    f, q, k = (torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1).sign() * gamma_max
    leaves = [x.clone().requires_grad_(True) for x in (f, q, k, gamma)]
    s = feedback_ref(*leaves, 0.4)
    w = torch.randn(s.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(s, leaves, w)
    got = tvm_training.feedback_backward_tvm(w.to(dtype), s.detach().to(dtype), q.to(dtype), k.to(dtype),
                                             gamma.to(dtype), 0.4, schedule=sched)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, c in zip(got, want):
        assert a.dtype == dtype and not a.isnan().any()
        assert relative_error(a, c) <= tol


def test_fused_dq_variant_is_chosen_when_its_tasks_fill_the_threads():
    """The one-pass attention backward has one task per (batch row, kv head): used with one thread, or with at
    least two such tasks per thread; otherwise the two-pass kernel (tasks per key block and per query block)."""
    assert tvm_training.fused_dq_pays(1, 8, threads=1) and tvm_training.fused_dq_pays(1, 1, threads=1)
    assert tvm_training.fused_dq_pays(1, 8, threads=2) and tvm_training.fused_dq_pays(2, 2, threads=2)
    assert not tvm_training.fused_dq_pays(1, 2, threads=2) and not tvm_training.fused_dq_pays(1, 8, threads=16)


def test_a_strided_core_operand_is_copied_once_per_training_step(monkeypatch):
    """q_b and k_b are the two halves of one linear layer's output (strided views). The TVM training runner makes
    them contiguous once, and that copy is what the feedback forward kernel reads and its backward saves: no
    copy in the forward kernel's call nor in the backward kernel's (before: one per use, four per step)."""
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer

    copied = []
    real = tvm_training._arg
    monkeypatch.setattr(tvm_training, "_arg", lambda t, dt: (lambda r: copied.append(r.data_ptr() != t.data_ptr())
                                                             or r)(real(t, dt)))
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=4).train()
    compiled = sc.compile(m, backend="tvm")
    x = torch.randn(1, 21, 32)
    compiled(x).pow(2).mean().backward()
    stats = compiled._backend.stats
    assert stats["contiguous_operands"] == 2 and stats["aligned_copies"] == 0
    assert copied and not any(copied)   # the backward kernels' operands: all dense already
