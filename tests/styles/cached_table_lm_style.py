"""A small Sessa language model in the idiom of older Llama code (written for the tests, not taken from any
library):

- rotary tables ``cos_cached`` / ``sin_cached`` [max_len, d] built once at init as non-persistent buffers and
  indexed by ``position_ids`` [B, T] (``table[position_ids]``, a gather), positions from
  ``arange(T).unsqueeze(0).expand(B, -1)``; the rotation by ``rotate_half`` (``chunk`` into halves);
- keys and values from one fused projection, ``view(B, T, 2, Hkv, d).unbind(2)``; GQA by ``repeat_interleave``;
- attention by ``F.scaled_dot_product_attention(..., is_causal=True)``;
- the feedback's gain and weights from one fused projection ``split([C, C, 1])``; the strict softmax's empty row 0
  cleared with ``nan_to_num``; the system solved by ``solve_triangular(eye - gamma * alpha, f, upper=False)``
  (not unit-triangular: its diagonal is the identity's);
- ``nn.LayerNorm``, a head tied to the embedding (``head.weight = emb.weight``), and ``labels`` giving
  ``(loss, logits)`` with the shifted cross-entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CachedRotary(nn.Module):
    def __init__(self, dim, max_pos=64, base=10000.0):
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        emb = torch.cat([torch.outer(torch.arange(max_pos).float(), inv)] * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, position_ids):
        return self.cos_cached[position_ids], self.sin_cached[position_ids]   # [B, T, d]


class CachedTableBlock(nn.Module):
    def __init__(self, d_model=32, heads=4, kv_heads=2, gamma_max=0.95):
        super().__init__()
        self.h, self.kv, self.hd, self.gamma_max = heads, kv_heads, d_model // heads, gamma_max
        self.ln = nn.LayerNorm(d_model)
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wkv = nn.Linear(d_model, 2 * kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.fb = nn.Linear(d_model, 2 * d_model + 1)
        self.rot = CachedRotary(self.hd)

    def forward(self, x, position_ids):
        B, T, C = x.shape
        h = self.ln(x)
        q = self.wq(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k, v = self.wkv(h).view(B, T, 2, self.kv, self.hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.rot(position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        f = self.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        qb, kb, g = self.fb(h).split([C, C, 1], dim=-1)
        gamma = self.gamma_max * torch.tanh(g)
        strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
        alpha = torch.softmax((qb @ kb.transpose(1, 2) / math.sqrt(C)).masked_fill(~strict, float("-inf")),
                              dim=-1).nan_to_num(0.0)
        eye = torch.eye(T, device=x.device, dtype=x.dtype)
        return x + torch.linalg.solve_triangular(eye - gamma * alpha, f, upper=False)


class CachedTableLM(nn.Module):
    def __init__(self, vocab=50, d=32, n_layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([CachedTableBlock(d) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, labels=None):
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, -1)
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = blk(x, pos)
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return loss, logits
