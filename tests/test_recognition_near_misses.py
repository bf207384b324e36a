"""Near misses of the recognised ops that a probe used to let through: each must stay ordinary ops (the module's
outputs at every length, including lengths far from the probes'), and the plain form beside it must still be
recognised. Found by writing modules that differ from causal attention / Sessa's feedback only where a probe
might not look:

- a bf16/fp16 module (HF's ``softmax(scores.float()).to(x.dtype)``) whose scores carry an ALiBi bias or a
  temperature: probes evaluated the casts, and their rounding set the tolerance to 0.3 of the output's scale;
- scores clamped before the softmax (``w.clamp(-30, 30)``, a stability trick): probes drew unit-scale sources,
  where the clamp never acts;
- a sliding window read from a mask buffer of fewer than 4100 positions: the long-length mask check halved its
  length until the region ran (2050 for a 4096-row buffer), below the window;
- position factors that are not a square mask (Qwen's log-n scaling of the scores past position 16, a bias on
  key positions past 16): the long-length check only looked at [T, T] masks;
- a mask or temperature buffer that the recognised attention was built from and that the module also reads
  elsewhere (a causal running mean): only tensors the graph no longer read at all were watched for edits;
- a scale computed from the length as a scalar (``clamp(log(T) / log(n0), min=1)``): only factors with a T dim
  were long-checked; top-k attention (``min(16, T)`` keys per row, all of them at the probe lengths); RoPE whose
  positions stop growing past the rotation's long probe (``arange(T).clamp(max=799)``).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sessa_compiler.frontend import trace_with_report
from model_helpers import op_counts


def _alibi_slopes(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return torch.tensor([start ** (i + 1) for i in range(n)])


class HalfAttention(nn.Module):
    """Attention in a 16-bit model, HF style: scores upcast to float32, softmax, cast back. ``bias``: "alibi"
    (Falcon/MPT: a slope per head times the key position), "temperature" (logits divided by a buffer holding 1.1), or None (plain)."""

    def __init__(self, bias=None, d=32, n_heads=4):
        super().__init__()
        self.h, self.hd, self.bias = n_heads, d // n_heads, bias
        self.qkv, self.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("slopes", _alibi_slopes(n_heads), persistent=False)
        self.register_buffer("temperature", torch.tensor(1.1))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.hd).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.hd)
        if self.bias == "alibi":
            scores = scores + self.slopes[:, None, None] * torch.arange(1 - T, 1, device=x.device)[None, None, :]
        elif self.bias == "temperature":
            scores = scores / self.temperature
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1).to(x.dtype)
        return self.dense((probs @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", ["alibi", "temperature", None])
def test_a_half_precision_attention_with_a_bias_is_not_taken_for_plain_attention(dtype, bias):
    torch.manual_seed(0)
    m = HalfAttention(bias).to(dtype).eval()
    x = torch.randn(2, 9, 32).to(dtype)
    tr = trace_with_report(m, (x,))
    attention = op_counts(tr.graph).get("attention", 0)
    if bias is None:   # the plain form: the casts do not hide it
        assert attention == 1, tr.report.rejected
    elif bias == "alibi":
        assert attention == 0, tr.report.accepted
    else:   # a temperature is attention at another scale: taken only with that scale
        assert all("scale=0.321412" in a for a in tr.report.accepted if a.startswith("attention")), tr.report.accepted
    # what runs is the module, at a length past the probes'
    from sessa_compiler.backends.eager import run_graph
    x = torch.randn(2, 40, 32).to(dtype)
    with torch.no_grad():
        want = m(x)
        (got,) = run_graph(tr.graph, [x])
    assert (got.double() - want.double()).abs().max() <= 2e-2 * want.double().abs().max()


class ClampedAttention(nn.Module):
    def __init__(self, d=16, n_heads=2, clip=30.0):
        super().__init__()
        self.h, self.clip = n_heads, clip
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        hd = D // self.h
        q, k, v = (t.view(B, T, self.h, hd).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        w = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if self.clip is not None:
            w = w.clamp(-self.clip, self.clip)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        w = w.masked_fill(~causal, float("-inf"))
        return self.o((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


class ClampedFeedback(nn.Module):
    """Sessa's feedback with its logits clamped (None: not clamped)."""

    def __init__(self, d=8, clip=20.0):
        super().__init__()
        self.clip = clip
        self.f_proj, self.proj_fb, self.g = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, 1)

    def forward(self, x):
        B, T, D = x.shape
        f = self.f_proj(x)
        q_b, k_b = self.proj_fb(x).split([D, D], -1)
        logits = torch.einsum("btd,bsd->bts", q_b, k_b) * D ** -0.5
        if self.clip is not None:
            logits = logits.clamp(-self.clip, self.clip)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(0)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        alpha = logits.softmax(-1).masked_fill(mask, 0.0)
        gamma = 0.99 * torch.tanh(self.g(x))
        return torch.linalg.solve_triangular(-(gamma * alpha), f, upper=False, unitriangular=True)


@pytest.mark.parametrize("cls,op,d", [(ClampedAttention, "attention", 16), (ClampedFeedback, "feedback", 8)])
@pytest.mark.parametrize("clip", [30.0, None])
def test_clamped_scores_are_not_taken_for_the_softmax_op(cls, op, d, clip):
    from sessa_compiler.backends.eager import run_graph

    torch.manual_seed(0)
    m = cls(d=d, clip=clip).eval()
    tr = trace_with_report(m, (torch.randn(2, 9, d),))
    assert op_counts(tr.graph).get(op, 0) == (0 if clip is not None else 1), (tr.report.accepted,
                                                                                tr.report.rejected)
    x = 10 * torch.randn(2, 33, d)    # scores far past the clamp
    with torch.no_grad():
        want = m(x)
        (got,) = run_graph(tr.graph, [x])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class BufferWindowAttention(nn.Module):
    """A sliding window stored as a [1, 1, max_len, max_len] buffer (GPT-2 / Mistral style), sliced to T."""

    def __init__(self, max_len, window, d=4):
        super().__init__()
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        i, j = torch.arange(max_len)[:, None], torch.arange(max_len)[None, :]
        self.register_buffer("bias", ((j <= i) & (i - j < window))[None, None], persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t[:, None] for t in self.qkv(x).split(D, -1))
        w = q @ k.transpose(-1, -2) / math.sqrt(D)
        w = w.masked_fill(~self.bias[:, :, :T, :T].expand(B, 1, T, T), float("-inf"))
        return self.o((w.softmax(-1) @ v)[:, 0])


class PositionFactorAttention(nn.Module):
    """Causal attention whose scores are scaled per query row past position n0 (log-n scaling), or biased on key
    positions past n0: one value at every length up to n0."""

    def __init__(self, variant, n0=16, d=8, n_heads=2):
        super().__init__()
        self.variant, self.n0, self.h = variant, n0, n_heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        hd = D // self.h
        q, k, v = (t.view(B, T, self.h, hd).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        w = q @ k.transpose(-1, -2) / math.sqrt(hd)
        pos = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)
        if self.variant == "logn_rows":
            w = w * torch.where(pos > self.n0, torch.log(pos) / math.log(self.n0), torch.ones_like(pos))[:, None]
        elif self.variant == "key_bias":
            w = w + 0.5 * (pos > self.n0).to(x.dtype)
        elif self.variant == "logn_scalar":   # one factor for the whole call, from the length: 1 up to n0
            w = w * torch.clamp(torch.log(pos.amax()) / math.log(self.n0), min=1.0)
        elif self.variant == "topk":   # each query keeps its n0 best keys: all of them at the probe lengths
            w = w.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            keep = torch.zeros_like(w, dtype=torch.bool).scatter(-1, w.topk(min(self.n0, T), dim=-1).indices, True)
            w = w.masked_fill(~keep, float("-inf"))
        w = w.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.o((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("make,d,lengths,recognised", [
    (lambda: BufferWindowAttention(100, 64), 4, (65, 100), False),
    (lambda: BufferWindowAttention(100, 100), 4, (65, 100), True),      # the window covers the buffer: causal
    (lambda: PositionFactorAttention("logn_rows"), 8, (17, 64), False),
    (lambda: PositionFactorAttention("key_bias"), 8, (17, 64), False),
    (lambda: PositionFactorAttention("logn_scalar"), 8, (17, 64), False),
    (lambda: PositionFactorAttention("topk"), 8, (17, 64), False),
    (lambda: PositionFactorAttention(None), 8, (17, 64), True),
], ids=["window64-buffer100", "window100-buffer100", "logn-rows", "key-bias", "logn-scalar", "topk", "plain"])
def test_position_dependence_past_the_probe_lengths_is_seen(make, d, lengths, recognised):
    from sessa_compiler.backends.eager import run_graph

    torch.manual_seed(0)
    m = make().eval()
    tr = trace_with_report(m, (torch.randn(1, 9, d),))
    assert op_counts(tr.graph).get("attention", 0) == int(recognised), (tr.report.accepted, tr.report.rejected)
    for T in lengths:
        x = torch.randn(1, T, d)
        with torch.no_grad():
            want = m(x)
            (got,) = run_graph(tr.graph, [x])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), T


class SharedMaskBuffers(nn.Module):
    """Attention and a causal running mean read the same mask and temperature buffers."""

    def __init__(self, L=64, d=8, n_heads=2):
        super().__init__()
        self.h = n_heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(L, L, dtype=torch.bool)))
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, x):
        B, T, D = x.shape
        hd = D // self.h
        q, k, v = (t.view(B, T, self.h, hd).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        m = self.mask[:T, :T]
        w = (q @ k.transpose(-1, -2) / math.sqrt(hd) / self.temperature).masked_fill(~m, float("-inf"))
        y = self.o((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))
        mf = m.to(x.dtype)
        return y + (mf @ x) / mf.sum(-1, keepdim=True) * self.temperature


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_editing_a_buffer_the_attention_was_built_from_and_that_is_read_elsewhere_traces_again(backend):
    import sessa_compiler as sc

    torch.manual_seed(0)
    m = SharedMaskBuffers().eval()
    c = sc.compile(m, backend=backend)
    x = torch.randn(1, 20, 8)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
        assert op_counts(c._traced.graph).get("attention", 0) == 1
        m.temperature.fill_(2.0)
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
        m.temperature.fill_(1.0)
        i = torch.arange(64)
        m.mask.copy_((i[None] <= i[:, None]) & (i[:, None] - i[None] < 4))   # a window of 4
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
    assert c.retraces


class ClampedPositionRope(nn.Module):
    """RoPE at positions arange(T).clamp(max=p_max): plain RoPE up to p_max, a constant angle past it."""

    def __init__(self, p_max, d=32, n_heads=2):
        super().__init__()
        self.h, self.p_max = n_heads, p_max
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        hd = d // n_heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

    def rotate(self, x, ang):
        x1, x2 = x.chunk(2, -1)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        pos = torch.arange(T, device=x.device)
        if self.p_max is not None:
            pos = pos.clamp(max=self.p_max)
        ang = pos[:, None].float() * self.inv_freq[None, :]
        a = F.scaled_dot_product_attention(self.rotate(q, ang), self.rotate(k, ang), v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("p_max", [3000, None])
def test_rope_whose_positions_stop_growing_past_the_long_probe_is_not_folded(p_max):
    """Plain RoPE up to position 3000, past the attention's long probe for two heads (2048 positions: the
    rotation is now also checked further, at the rotation alone); the plain form still folds."""
    from sessa_compiler.backends.eager import run_graph

    torch.manual_seed(0)
    m = ClampedPositionRope(p_max).eval()
    tr = trace_with_report(m, (torch.randn(1, 9, 32),))
    counts = op_counts(tr.graph)
    assert counts.get("attention", 0) == 1
    rope = [n for n in tr.graph.nodes if n.op == "attention" and n.attrs.get("rope")]
    assert bool(rope) == (p_max is None), (tr.report.accepted, tr.report.rejected)
    x = torch.randn(1, 3100, 32)
    with torch.no_grad():
        want = m(x)
        (got,) = run_graph(tr.graph, [x])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class ChunkedPaddedAttention(nn.Module):
    """Llama 4's chunked attention in Hugging Face's spelling (masking_utils.chunked_overlay): the chunks of
    ``chunk`` positions are shifted by each row's left padding, which comes from the attention_mask, so the mask
    is built from the key-padding input as well as from positions."""

    def __init__(self, chunk, d=8, n_heads=2):
        super().__init__()
        self.h, self.chunk = n_heads, chunk
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, attention_mask):
        B, T, D = x.shape
        hd = D // self.h
        q, k, v = (t.view(B, T, self.h, hd).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        left = (attention_mask.cumsum(-1) == 0).sum(-1)[:, None, None]
        i, j = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
        allowed = (j <= i) & ((j - left) // self.chunk == (i - left) // self.chunk) & attention_mask[:, None, :].bool()
        w = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)
        return self.o((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


def test_chunks_shifted_by_the_padding_mask_are_not_taken_for_key_padding():
    """At the probe lengths every row is one chunk, so the mask probed equal to causal attention with a
    key-padding mask; past a chunk it is not. The long-length check now evaluates masks built from a
    key-padding input too (with every key real)."""
    from sessa_compiler.backends.eager import run_graph

    torch.manual_seed(0)
    m = ChunkedPaddedAttention(16).eval()
    tr = trace_with_report(m, (torch.randn(2, 9, 8), torch.ones(2, 9, dtype=torch.long)))
    assert op_counts(tr.graph).get("attention", 0) == 0, tr.report.accepted
    for T in (17, 40):
        x, mask = torch.randn(2, T, 8), torch.ones(2, T, dtype=torch.long)
        mask[1, :3] = 0
        with torch.no_grad():
            want = m(x, mask)
            (got,) = run_graph(tr.graph, [x, mask])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), T


class LearnedTemperature(nn.Module):
    """A learned per-head temperature, initialised equal across heads to 1/sqrt(head_dim)."""

    def __init__(self, d=16, n_heads=2):
        super().__init__()
        self.h, hd = n_heads, d // n_heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.temperature = nn.Parameter(torch.full((n_heads, 1, 1), hd ** -0.5))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        w = (q @ k.transpose(-1, -2)) * self.temperature
        w = w.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.o((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("trainable", [True, False])
def test_a_trainable_parameter_is_not_built_into_a_recognised_op(trainable):
    """Probed at its initial values, the temperature is plain attention's scale, and the op was built with it:
    no gradient reached it (training left it at its initial value). Trainable parameters are probed moved off
    their values, so it stays an operand of ordinary ops; frozen, it is still built in."""
    import sessa_compiler as sc

    torch.manual_seed(0)
    m = LearnedTemperature()
    m.temperature.requires_grad_(trainable)
    tr = trace_with_report(m, (torch.randn(2, 9, 16),))
    assert op_counts(tr.graph).get("attention", 0) == int(not trainable), (tr.report.accepted, tr.report.rejected)
    if trainable:
        c = sc.compile(m, backend="eager")
        x = torch.randn(2, 11, 16)
        c(x).square().mean().backward()
        got = m.temperature.grad.clone()
        m.zero_grad()
        m(x).square().mean().backward()
        assert torch.allclose(got, m.temperature.grad, rtol=1e-5, atol=1e-7)


class FusedQKV(nn.Module):
    """Plain attention from a fused projection (split, view, transpose), or with a rotation that is not RoPE
    (each channel pair mixed with its mirror)."""

    def __init__(self, mirror):
        super().__init__()
        self.mirror = mirror
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        if self.mirror:
            pos = torch.arange(T, dtype=x.dtype)[:, None]
            q = q * torch.cos(pos * 0.3) + q.flip(-1) * torch.sin(pos * 0.3)
            k = k * torch.cos(pos * 0.3) + k.flip(-1) * torch.sin(pos * 0.3)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("mirror", [False, True])
def test_explain_names_a_transform_before_attention_only_where_there_is_one(mirror):
    """explain() said "q and k are transformed before attention, but not by a rotary embedding" for every attention
    whose q and k came through a split (GPT-BigCode, a plain fused-projection layer): there it says nothing."""
    tr = trace_with_report(FusedQKV(mirror), (torch.randn(2, 9, 16),))
    assert op_counts(tr.graph).get("attention", 0) == 1
    said = [r for r in tr.report.rejected if r.startswith("rope around attention")]
    assert bool(said) == mirror, tr.report.rejected
