"""Small modules, each written in its own hand, using the ordinary ops Hugging Face style model code uses (issue 22,
point 2: exports never crash on an ordinary op). Each takes inputs(B, T, seed) -> a tuple of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

D, H, V = 8, 2, 13


def _gen(B, T, seed):
    return torch.Generator().manual_seed(seed * 1000 + 31 * T + B)


def x_input(B: int, T: int, seed: int = 0):
    return (torch.randn(B, T, D, generator=_gen(B, T, seed)),)


def x_and_mask(B: int, T: int, seed: int = 0):
    g = _gen(B, T, seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : T // 3] = 0                       # left padding
    if B > 1:
        mask[-1, T - 2:] = 0                    # right padding
    return torch.randn(B, T, D, generator=g), mask


def ids_and_labels(B: int, T: int, seed: int = 0):
    g = _gen(B, T, seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, :2] = 0                              # padding tokens
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = -100                         # ignored positions
    labels[0, T // 2:] = -100
    return ids, labels


class PaddedSelfAttention(nn.Module):
    """q/k/v projections, einsum scores, a key-padding mask from attention_mask via masked_fill with the dtype's
    min, a causal mask from triu(ones, diagonal=1), softmax; masked_fill of padded query rows."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D)

    def forward(self, hidden_states, attention_mask):
        bsz, q_len, _ = hidden_states.shape
        hd = D // H
        q = self.q_proj(hidden_states).view(bsz, q_len, H, hd).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, H, hd).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, H, hd).transpose(1, 2)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd)
        causal = torch.triu(torch.ones(q_len, q_len, dtype=torch.bool, device=scores.device), diagonal=1)
        key_pad = attention_mask[:, None, None, :] == 0
        scores = scores.masked_fill(causal | key_pad, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, q_len, D)
        out = out.masked_fill(attention_mask[..., None] == 0, 0.0)
        return (self.o_proj(out),)


class CreationAndClamps(nn.Module):
    def forward(self, x):
        ones = x.new_ones(x.shape[0], x.shape[1])
        zeros = x.new_zeros((x.size(0), 1, x.size(2)))
        full = torch.full_like(x, 0.25)
        lo = x.mean(-1, keepdim=True) - 0.5
        hi = lo + 1.0
        band = torch.tril(torch.ones_like(x[0, :, 0:1] @ x[0, :, 0:1].T), diagonal=-1)
        return (ones.cumsum(-1) * 0.5, zeros.expand_as(x) + full, x.clamp_min(-0.3), torch.clamp(x, min=lo, max=hi),
                torch.clamp(x, max=hi), band, torch.triu(x[:, :, :4] @ x[:, :, :4].transpose(1, 2), 2))


class ShapeShuffles(nn.Module):
    def forward(self, x):
        b, t, d = x.shape
        a = x.unflatten(-1, (2, d // 2))                   # [B, T, 2, 4]
        m = torch.movedim(a, 2, 0)                         # [2, B, T, 4]
        c1, c2 = x.chunk(2, dim=-1)
        rows = torch.unbind(a, dim=2)
        st = torch.stack(rows, dim=1)                      # [B, 2, T, 4]
        rep = x[:, :1, :].repeat(1, 2, 1)
        padded = F.pad(x, (1, 2))                          # last dim 8 -> 11
        trimmed = F.pad(x, (-1, 0, 0, 1))                  # last dim 8 -> 7, T -> T + 1
        return (m * 2, c1 - c2, st.sum(1), rep, padded, trimmed, torch.stack([c1, c2], -1).flatten(-2))


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 1, D) * 0.1)

    def forward(self, x):
        pos = torch.where(x > 0, x, 0.0)
        capped = torch.where(x < 1.0, 0.5, x)
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (pos, capped, x * r, F.softplus(x), F.silu(x), F.mish(x), F.hardtanh(x, -0.5, 0.5),
                torch.logsumexp(x, dim=-1), torch.norm(x, dim=-1), torch.linalg.vector_norm(x, ord=2, dim=-1),
                torch.linalg.vector_norm(x, dim=(1, 2)), x.norm(p=1, dim=-1, keepdim=True) + self.bias)


class BatchedProducts(nn.Module):
    def forward(self, x):
        scores = torch.baddbmm(x[:, :, :1].expand(-1, -1, x.shape[1]), x, x.transpose(1, 2), beta=0.5, alpha=0.25)
        outer = torch.einsum("bi,bj->bij", x[:, 0], x[:, -1])
        return scores, outer, torch.einsum("btd,bsd->bts", x, x).softmax(-1)


class TokenLosses(nn.Module):
    """Embedding with padding_idx, a head, cross-entropy by hand (log_softmax + gather, masked by -100) and
    F.cross_entropy with ignore_index=-100."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D, padding_idx=0)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, input_ids, labels):
        h = self.embed_tokens(input_ids)
        logits = self.lm_head(torch.tanh(h))
        logp = logits.log_softmax(dim=-1)
        valid = labels != -100
        safe = labels.masked_fill(~valid, 0)
        nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        by_hand = (nll * valid).sum() / valid.sum().clamp_min(1)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return logits, by_hand, loss, per_token, F.embedding(input_ids, self.embed_tokens.weight, padding_idx=0)


class SmoothedLossesAndNorms(nn.Module):
    # label smoothing and class weights in cross_entropy, F.normalize, new_full, logaddexp, var / std, narrow,
    # split with sizes, the GELU tanh form and erf, amin
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, V)
        self.register_buffer("class_w", torch.linspace(0.5, 1.5, V))

    def forward(self, x, labels):
        logits = self.head(x)
        flat, tgt = logits.reshape(-1, V), labels.reshape(-1)
        smooth = F.cross_entropy(flat, tgt, ignore_index=-100, label_smoothing=0.1)
        weighted = F.cross_entropy(flat, tgt, weight=self.class_w, ignore_index=-100)
        unit = F.normalize(x, dim=-1)
        bias = x.new_full((x.shape[0], 1, 1), 0.5)
        a, b2 = torch.split(x, [3, 5], dim=-1)
        return (smooth, weighted, unit + bias, torch.logaddexp(a, a.flip(-1)), x.var(-1), x.std(1, unbiased=False),
                x.narrow(-1, 2, 4), b2 * 2, F.gelu(x, approximate="tanh") + torch.erf(x), x.amin(dim=(0, 2)))


def x_and_labels(B: int, T: int, seed: int = 0):
    g = _gen(B, T, seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    return torch.randn(B, T, D, generator=g), labels


class ExtendedMaskAndPooling(nn.Module):
    """Older HF idioms: an additive extended mask (1 - mask) * finfo.min, position ids from arange expanded over the
    batch, SDPA with a boolean mask, last-token pooling by advanced indexing with lengths from the mask, a masked
    mean, repeat_interleave, index_fill, x[mask] = 0."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(64, D)
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x, attention_mask):
        B, T, _ = x.shape
        position_ids = torch.arange(T, device=x.device).unsqueeze(0).expand(B, -1)
        h = x + self.pos(position_ids)
        ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        q, k, v = self.qkv(h).split(D, dim=-1)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) * (D // H) ** -0.5 + ext
        att = scores.softmax(-1) @ v
        keep = attention_mask[:, None, :, None].bool().expand(B, H, T, T) & torch.ones(T, T, dtype=torch.bool).tril()
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | torch.eye(T, dtype=torch.bool))
        lengths = attention_mask.sum(-1) - 1
        last = h[torch.arange(B), lengths.clamp_min(0)]
        m = attention_mask.unsqueeze(-1).type_as(h)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        rep = k.repeat_interleave(2, dim=1)
        filled = h.index_fill(-1, torch.tensor([0, 3]), -1.0)
        z = h.clone()
        z[attention_mask == 0] = 0.0
        from_end = h[torch.arange(B) - B, lengths.clamp_min(0) - T]     # negative indices count from the end
        return att.transpose(1, 2).flatten(2), sdpa.sum(1), last, mean, rep.sum(1), filled, z, from_end


class MoreActivations(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, -1)
        return (F.glu(x, -1), F.relu6(x * 4), F.leaky_relu(x, 0.1), F.elu(x), F.gelu(x), F.logsigmoid(x),
                F.softsign(x), torch.clip(x, -0.2, 0.2), F.hardswish(x), F.hardsigmoid(x), torch.einsum("...d,...d->...", a, b),
                F.pad(x, (0, 0, 1, 0), value=-1.0), F.pad(x, (2, 1), mode="replicate"), torch.diff(x, dim=1),
                F.pad(x.transpose(1, 2), (2, 3), mode="reflect"), F.pad(x, (1, 2), mode="circular"),
                torch.tensor_split(x, 3, dim=-1)[1], torch.split(x, 3, dim=-1)[2], torch.outer(x[0, 0], x[0, -1]),
                x.sigmoid().round(decimals=2), F.dropout(x, 0.5, training=False))


class EmptyCacheConcat(nn.Module):
    """Hugging Face's DynamicCache starts from torch.tensor([]) and concatenates the keys to it on dim -2: torch.cat
    skips a 1-D empty operand whatever the others' rank (the concat was refused: 'dim -2 out of range for rank 1')."""

    def forward(self, x):
        keys = torch.cat([torch.tensor([]), x], dim=-2)
        return keys, torch.cat([x, torch.tensor([]), x * 2], dim=1)


class IntegerMaskAndTails(nn.Module):
    """An int64 attention_mask compared with float scalars (``mask < 0.5``: tvm compared in int64, so 0.5 became 0
    and no padding was found), LayerNorms without weight or bias (nanoGPT's bias=False: they ran in hybrid mode),
    and softplus far into its tail (tvm's was log(1 + exp(x)): 0 below about -17, so its log was -inf)."""

    def __init__(self):
        super().__init__()
        self.plain, self.nobias = nn.LayerNorm(D, elementwise_affine=False), nn.LayerNorm(D, bias=False)

    def forward(self, x, attention_mask):
        pad = attention_mask < 0.5
        pooled = x.masked_fill(pad[..., None], 0.0).sum(1) / (attention_mask > -0.5).sum(1, keepdim=True)
        flags = torch.stack([attention_mask >= 0.5, attention_mask == 0.5, attention_mask != 0.5, pad], -1)
        return pooled, flags, self.plain(x) + self.nobias(x), torch.log(F.softplus(4 * x - 40)), F.softplus(x, 2.0, 1.0)


SWEEP = [(IntegerMaskAndTails, x_and_mask), (EmptyCacheConcat, x_input), (ExtendedMaskAndPooling, x_and_mask), (MoreActivations, x_input), (SmoothedLossesAndNorms, x_and_labels), (PaddedSelfAttention, x_and_mask), (CreationAndClamps, x_input), (ShapeShuffles, x_input),
         (Activations, x_input), (BatchedProducts, x_input), (TokenLosses, ids_and_labels)]
