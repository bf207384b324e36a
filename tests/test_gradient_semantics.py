"""What a module says about gradients holds through the compiled module: x.detach(), torch.no_grad() blocks
inside forward (a stop-gradient normaliser, a spectral norm's power iteration), straight-through estimators and
the user's own torch.autograd.Functions (a gradient reversal) and hooks on activations' gradients registered in
forward give the module's gradients on every backend,
and a recogniser never folds a region whose gradient the module stops. Also: masks that differ from causal only
far from the diagonal (sliding windows, chunks) are never recognised as causal attention or feedback."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from model_helpers import NeoxRopeAttention

try:
    import tvm  # noqa: F401
    BACKENDS = ["eager", "tvm"]
except ImportError:
    BACKENDS = ["eager"]


class NoGradNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        with torch.no_grad():
            s = h.pow(2).mean(-1, keepdim=True).sqrt()
        return h / s


class DetachNorm(NoGradNorm):
    def forward(self, x):
        h = self.lin(x)
        return h / h.pow(2).mean(-1, keepdim=True).sqrt().detach()


class StraightThrough(NoGradNorm):
    def forward(self, x):
        h = self.lin(x)
        return h + (torch.round(h * 4) / 4 - h).detach()


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class Reversed(NoGradNorm):
    def forward(self, x):
        return torch.tanh(GradReverse.apply(self.lin(x)))


class HookedBranch(NoGradNorm):
    """A gradient hook on an activation, registered in forward (a branch's gradient scaled by 3)."""

    def forward(self, x):
        h = self.lin(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * 3.0)
        return torch.tanh(h)


class MultiHookedBranch(NoGradNorm):
    """torch.autograd.graph.register_multi_grad_hook on activations, here scaling one of them in place."""

    def forward(self, x):
        h = self.lin(x)
        if h.requires_grad:
            h.register_hook(lambda g: g.clamp(-0.1, 0.1))
            torch.autograd.graph.register_multi_grad_hook([h], lambda grads: None)
        return torch.tanh(h) * h


def _grads(m, x, w):
    x = x.clone().requires_grad_(True)
    (m(x) * w).sum().backward()
    return [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [NoGradNorm, DetachNorm, StraightThrough, Reversed, HookedBranch, MultiHookedBranch])
def test_gradients_follow_the_modules_own_gradient_rules(cls, backend):
    torch.manual_seed(0)
    m = cls().double()
    ref = copy.deepcopy(m)
    c = sc.compile(m, backend=backend)
    for T in (5, 9):
        x = torch.randn(2, T, 16, dtype=torch.float64)
        w = torch.randn(2, T, 16, dtype=torch.float64)
        m.zero_grad(), ref.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the autograd.Function's warning: tested below
            got = _grads(c, x, w)
        want = _grads(ref, x, w)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(c(x), ref(x), rtol=1e-12, atol=1e-12)


def test_an_autograd_function_is_said_and_only_gradient_calls_run_the_module():
    torch.manual_seed(0)
    m = Reversed()
    c = sc.compile(m, backend="eager")
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        c(x)
    assert c.uncompiled_calls == 0
    assert "__main__" not in c.explain() and "GradReverse" in c.explain(), c.explain()
    with pytest.warns(UserWarning, match="GradReverse.*own backward"):
        c(x).sum().backward()
    assert c.uncompiled_calls == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_hook_registered_in_forward_holds_when_the_first_call_is_under_no_grad(backend):
    """Traced under torch.no_grad(), ``if h.requires_grad: h.register_hook(...)`` registers nothing: that graph
    does not serve a call with gradients, whose trace sees the hook, so such calls run the module itself."""
    torch.manual_seed(0)
    m = HookedBranch().double()
    ref = copy.deepcopy(m)
    c = sc.compile(m, backend=backend)
    x, w = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(c(x), ref(x), rtol=1e-12, atol=1e-12)
    assert c.uncompiled_calls == 0
    with pytest.warns(UserWarning, match="hook on a tensor's gradient"):
        got = _grads(c, x, w)
    for g, r in zip(got, _grads(ref, x, w)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert c.uncompiled_calls == 1 and "Tensor.register_hook" in c.explain()
    with torch.no_grad():   # calls without gradients still run compiled
        c(x)
    assert c.uncompiled_calls == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_spectral_norm_trains(backend):
    # its power iteration runs under no_grad and writes its vectors with out=: the region reads detached
    # operands, as in the module (it failed: "functions with out=... arguments don't support autograd")
    torch.manual_seed(0)
    m = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)), nn.Tanh()).eval()
    ref = copy.deepcopy(m)
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 3, 8)
    got, want = _grads(c, x, torch.ones(2, 3, 8)), _grads(ref, x, torch.ones(2, 3, 8))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


class DetachedWeights(nn.Module):
    """Causal attention whose weights carry no gradient (q and k get none): equal in value to attention, not in
    gradient. (A detach before the scores, k.detach(), stays outside the region: an attention op on a detached
    operand, exact either way.)"""

    def __init__(self, D=16, H=2):
        super().__init__()
        self.H = H
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.H)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = torch.softmax(s.masked_fill(~causal, float("-inf")), -1).detach() @ v
        return y.transpose(1, 2).reshape(B, T, D)


def test_a_region_with_a_stopped_gradient_is_not_folded_into_a_core_op():
    torch.manual_seed(0)
    m = DetachedWeights().double()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    w = torch.randn(2, 7, 16, dtype=torch.float64)
    ref = copy.deepcopy(m)
    for g, r in zip(_grads(c, x, w), _grads(ref, x, w)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert not any(n.op == "attention" for n in c.graph.nodes), c.explain()


# -- masks that are causal near the diagonal only ------------------------------------------------------------
class WindowAttention(nn.Module):
    def __init__(self, D=16, H=2, window=16, chunk=None):
        super().__init__()
        self.H, self.window, self.chunk = H, window, chunk
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        i = torch.arange(T, device=x.device)
        keep = i[:, None] >= i[None, :]
        if self.chunk:
            keep = keep & (i[:, None] // self.chunk == i[None, :] // self.chunk)
        else:
            keep = keep & (i[:, None] - i[None, :] < self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return y.transpose(1, 2).reshape(B, T, D)


class WindowFeedback(nn.Module):
    def __init__(self, D=16, window=16):
        super().__init__()
        self.D, self.window = D, window
        self.f, self.qk, self.g = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, 1)

    def forward(self, x):
        B, T, D = x.shape
        qb, kb = self.qk(x).chunk(2, -1)
        i = torch.arange(T, device=x.device)
        keep = (i[:, None] > i[None, :]) & (i[:, None] - i[None, :] <= self.window)
        a = torch.softmax((qb @ kb.transpose(1, 2) / math.sqrt(D)).masked_fill(~keep, float("-inf")), -1)
        a = a.nan_to_num(0.0)
        gamma = 0.9 * torch.tanh(self.g(x))
        return torch.linalg.solve_triangular(torch.eye(T) - gamma * a, self.f(x), upper=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda: WindowAttention(window=16), lambda: WindowAttention(window=300),
                                  lambda: WindowAttention(chunk=16), lambda: WindowFeedback(window=16)],
                         ids=["window16", "window300", "chunk16", "feedback_window16"])
def test_masks_causal_only_near_the_diagonal_are_not_recognised_as_causal(make, backend):
    torch.manual_seed(0)
    m = make()
    c = sc.compile(m, backend=backend)
    for T in (8, 40, 320):
        x = torch.randn(1, T, 16)
        with torch.no_grad():
            torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-5)
    assert not any(n.op in ("attention", "feedback") for n in c.graph.nodes), c.explain()


def test_a_causal_mask_is_still_recognised_with_the_long_check():
    torch.manual_seed(0)
    m = WindowAttention(window=10 ** 6)   # every pair within the window: causal at every length the check runs
    c = sc.compile(m, backend="eager")
    with torch.no_grad():
        x = torch.randn(1, 20, 16)
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-6)
    assert any(n.op == "attention" for n in c.graph.nodes), c.explain()


class AdditiveNegInfMask(nn.Module):
    """SDPA with an additive float mask of 0 / -inf (causal and key padding): left padding leaves rows with no
    visible key, whose output torch gives as 0 and whose gradient is 0 (it was NaN through the compiled module)."""

    def __init__(self, V=50, D=16, H=2):
        super().__init__()
        self.H, self.emb, self.qkv, self.head = H, nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, V)

    def forward(self, ids, attention_mask):
        x = self.emb(ids)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(B, 1, T, T).masked_fill(~keep, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head(x + o.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_with_an_additive_neg_inf_mask_has_the_modules_gradients(backend):
    torch.manual_seed(0)
    m = AdditiveNegInfMask()
    c = sc.compile(m, backend=backend)
    ids = torch.randint(1, 50, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, :3] = 0
    want = torch.autograd.grad(m(ids, am).sum(), list(m.parameters()))
    got = torch.autograd.grad(c(ids, am).sum(), list(m.parameters()))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


class ReplacedScores(nn.Module):
    """Causal attention with key padding written scores.masked_fill(~keep, finfo.min) (or += an additive
    finfo.min mask with ``additive``): equal outputs, but a row with no visible key (a left-padded query) sends
    q and k a gradient only through the additive spelling. With a shifted LM loss that row reaches the loss."""

    def __init__(self, additive=False, V=50, D=16, H=2):
        super().__init__()
        self.H, self.additive = H, additive
        self.emb, self.qkv, self.head = nn.Embedding(V, D), nn.Linear(D, 3 * D), nn.Linear(D, V)

    def forward(self, ids, attention_mask, labels):
        x = self.emb(ids)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        w = q @ k.transpose(-1, -2) / math.sqrt(D // self.H)
        keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & attention_mask[:, None, None, :].bool()
        if self.additive:
            w = w + torch.zeros(B, 1, T, T).masked_fill(~keep, torch.finfo(w.dtype).min)
        else:
            w = w.masked_fill(~keep, torch.finfo(w.dtype).min)
        logits = self.head(x + (w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("additive", [False, True], ids=["masked_fill", "additive"])
def test_left_padded_rows_get_the_modules_gradient_for_either_mask_spelling(additive, backend):
    torch.manual_seed(0)
    m = ReplacedScores(additive)
    c = sc.compile(m, backend=backend)
    ids = torch.randint(1, 50, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, :3] = 0
    labels = ids.masked_fill(am == 0, -100)
    want = torch.autograd.grad(m(ids, am, labels), list(m.parameters()))
    got = torch.autograd.grad(c(ids, am, labels), list(m.parameters()))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # both are the attention op; the replacing spelling's emptied rows pass their scores no gradient
    att = [n for n in c.graph.nodes if n.op == "attention"]
    assert len(att) == 1 and att[0].attrs.get("empty_grad", True) == additive, c.explain()


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_a_trainable_rope_frequency_table_gets_its_gradient(backend):
    """The attention backward kernels differentiate q, k and v only: the table's gradient came back None on TVM
    (the parameter silently stopped training); it is computed through the op's definition."""
    torch.manual_seed(0)
    m = NeoxRopeAttention(learned=True)
    x, w = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    c = sc.compile(m, backend=backend)
    (c(x) * w).sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert "rope" in c.explain()   # folded into the attention op
    m.zero_grad()
    (m(x) * w).sum().backward()
    for n, p in m.named_parameters():
        assert relative_error(got[n], p.grad) <= 1e-4, n


class CheckpointedLM(torch.nn.Module):
    """Hugging Face's gradient checkpointing: each block's call wrapped in a reentrant checkpoint."""

    def __init__(self, vocab=30, d=16, reentrant=True):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d),
                                                              torch.nn.GELU()) for _ in range(2))
        self.head = torch.nn.Linear(d, vocab)
        self.reentrant = reentrant

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_inside_forward_keeps_every_gradient(backend, reentrant):
    """A reentrant checkpoint runs its function under no_grad inside a torch Function: the export recorded a
    no-gradient region, so the blocks' parameters got no gradient and the embedding a wrong one."""
    torch.manual_seed(0)
    m = CheckpointedLM(reentrant=reentrant)
    ids = torch.randint(0, 30, (2, 9))
    c = sc.compile(m, backend=backend)
    F.cross_entropy(c(ids).flatten(0, 1), ids.flatten()).backward()
    got = {n: p.grad for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    for n, p in m.named_parameters():
        assert got[n] is not None and relative_error(got[n], p.grad) <= 1e-5, n


class BufferedRecurrence(torch.nn.Module):
    """A recurrence writing each step into a preallocated buffer (DeltaNet / RWKV ports): o[:, t] = h."""

    def __init__(self):
        super().__init__()
        self.lin, self.decay = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.rand(8))

    def forward(self, x):
        B, T, D = x.shape
        u = self.lin(x)
        h = x.new_zeros(B, D)
        o = torch.empty_like(u)
        for t in range(T):
            h = torch.sigmoid(self.decay) * h + u[:, t]
            o[:, t] = h
        return o


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_index_assignment_into_a_buffer_trains(backend):
    """The export's aten.copy ran as a torch fallback, which has no autograd formula: backward raised."""
    torch.manual_seed(0)
    m, x = BufferedRecurrence(), torch.randn(2, 5, 8)
    c = sc.compile(m, backend=backend)
    c(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).pow(2).sum().backward()
    for g, p in zip(got, m.parameters()):
        assert relative_error(g, p.grad) <= 1e-5


class OneKeyBias(nn.Module):
    """A learned [heads, n, n] bias added to causal attention scores (T5's relative position bias, spelled
    directly); ``int(T)`` makes export pin the length, so a call at T = 1 has a graph of its own."""

    def __init__(self, d=16, heads=2, n=8):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.rel = nn.Parameter(torch.randn(heads, n, n))

    def forward(self, x):
        B, T, D = x.shape
        T = int(T)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // self.heads) + self.rel[:, :T, :T]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, D)


def test_a_parameter_the_output_ignores_at_these_sizes_gets_a_zero_gradient():
    """At T = 1 each softmax has one key, so the bias added to it changes nothing: the recogniser's attention
    dropped it. The compiled module gave it grad None where the module gives zeros (AdamW then skipped its weight
    decay: T5 at T = 1 drifted from the module), warned that it was 'folded', and would have traced again at
    every change of it. It now gets the module's zero gradient, with no warning and no retrace."""
    torch.manual_seed(0)
    m = OneKeyBias()
    twin = copy.deepcopy(m)
    c = sc.compile(twin, backend="eager")
    opts = [torch.optim.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1) for mod in (m, twin)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no 'folded' warning
        for step in range(3):
            x = torch.randn(2, 1, 16)
            for f, opt in ((m, opts[0]), (c, opts[1])):
                opt.zero_grad(set_to_none=True)
                f(x).square().sum().backward()
                opt.step()
            assert twin.rel.grad is not None and not twin.rel.grad.any()
            for (n, a), b in zip(m.named_parameters(), twin.parameters()):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert c.retraces == [] and len(c._variants) == 1
    with torch.no_grad():   # (and at T > 1, where it matters, it is read)
        x = torch.randn(2, 5, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)


class TwoDraws(nn.Module):
    """Draws with the same operands: two noises on one input, two dropouts of the same hidden states (LoRA's
    dropout before q_proj and v_proj), two Bernoulli masks."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.drop_a, self.drop_b = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x):
        noise = torch.randn_like(x) - torch.randn_like(x)
        masks = torch.bernoulli(torch.full_like(x, 0.5)) - torch.bernoulli(torch.full_like(x, 0.5))
        return self.a(self.drop_a(x)) + self.b(self.drop_b(x)) + noise + masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_draws_with_the_same_operands_stay_two(backend):
    """Common-subexpression elimination merged them: the noises cancelled to exactly 0 and both dropouts used one
    mask (errors 4.7 and 1.0 against the module at the same seed). A node that draws random numbers is never
    merged; with the same seed the compiled module draws what the module draws."""
    torch.manual_seed(0)
    m = TwoDraws().train()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 7, 16)
    for seed in range(2):
        torch.manual_seed(seed)
        want = m(x)
        torch.manual_seed(seed)
        got = c(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class ScanFromItsInput(nn.Module):
    """A selective scan whose delta, B and C are computed from the scan's own input u (as Mamba's x_proj does)."""

    def __init__(self, d=4, n=3):
        super().__init__()
        self.pre, self.proj = nn.Linear(d, d), nn.Linear(d, d + 2 * n)
        self.A_log, self.D = nn.Parameter(torch.randn(d, n) * 0.3), nn.Parameter(torch.randn(d))
        self.d, self.n = d, n

    def forward(self, x):
        from sessa_compiler.models.scan_op import selective_scan

        u = self.pre(x)
        dl, B, C = self.proj(u).split([self.d, self.n, self.n], -1)
        return selective_scan(u, F.softplus(dl), -torch.exp(self.A_log), B, C, self.D)


class SharedQueryKey(nn.Module):
    """Reformer's shared query/key projection: the attention's q and k are one tensor."""

    def __init__(self, d=16, h=2):
        super().__init__()
        self.h, self.qk, self.v, self.o = h, nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        qk = self.qk(x).view(B, T, self.h, -1).transpose(1, 2)
        v = self.v(x).view(B, T, self.h, -1).transpose(1, 2)
        w = (qk @ qk.transpose(-1, -2)) / math.sqrt(qk.shape[-1])   # (sdpa has no double backward on CPU)
        w = w.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,d,T", [(ScanFromItsInput, 4, 5), (SharedQueryKey, 16, 6)])
def test_create_graph_through_a_core_op_whose_operands_depend_on_each_other(cls, d, T, backend):
    """Under create_graph the core op's backward differentiates its definition on the saved operands; with the
    operands themselves as the targets autograd gave total derivatives, counting again the path from one operand
    into another (a scan's delta computed from u; q passed as k), so even first-order gradients were off (0.64 for
    the scan, 1.0 for shared q/k on tvm). Second-order gradients are checked too (shared q/k: plain torch)."""
    torch.manual_seed(0)
    ref = cls(d=d).double()
    c = sc.compile(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, T, d, dtype=torch.float64)
    for m in (ref, c):
        m.zero_grad()
    got, want = [], []
    for m, out in ((ref, want), (c, got)):
        ps = list(m.parameters())
        grads = torch.autograd.grad(m(x).pow(2).sum(), ps, create_graph=True)
        out.extend(g.detach().clone() for g in grads)
        if cls is SharedQueryKey:
            sum(g.square().sum() for g in grads).backward()
            out.extend(p.grad.clone() for p in ps)
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-10


def test_the_selective_scan_ops_second_order_gradients():
    """models.MambaLayer's scan is a custom op whose backward differentiates the eager loop; under create_graph it
    detached its inputs, so second-order gradients treated the first-order ones as constants in the scan's
    operands (0.73 off). Oracle: the same layer with the loop called directly."""
    from sessa_compiler.models import MambaLayer
    from sessa_compiler.models.scan_op import selective_scan_with_state

    class Oracle(MambaLayer):
        def forward(self, x):
            T = x.shape[1]
            u, z = self.in_proj(self.ln(x)).split([self.d_inner, self.d_inner], dim=-1)
            u = F.silu(self.conv1d(u.transpose(1, 2))[..., :T].transpose(1, 2))
            delta, A, B_t, C_t = self._ssm_inputs(u)
            y, _ = selective_scan_with_state(u, delta, A, B_t, C_t, self.D)
            return x + self.out_proj(y * F.silu(z))

    def second_order(m, x):
        ps = list(m.parameters())
        g1 = torch.autograd.grad(m(x).pow(2).mean(), ps, create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in g1), ps, allow_unused=True)

    torch.manual_seed(0)
    oracle = Oracle(16).double()
    layer = MambaLayer(16).double()
    layer.load_state_dict(oracle.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for a, b in zip(second_order(oracle, x), second_order(layer, x)):
        assert relative_error(b, a) < 1e-10
