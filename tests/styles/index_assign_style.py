"""A Sessa layer that handles row 0 by index assignment, as the paper's code does.

Same model and state_dict keys as the reference SessaLayer, written afresh:

- forward attention with ``@`` and an additive 0/-inf mask from ``tril(ones) == 0``
  on (B, H, T, d), GQA by ``repeat_interleave`` over dim 2 before the transpose;
- RoPE GPT-J style: ``x * cos + rotate_every_two(x) * sin`` with cos/sin
  repeated per pair (interleaved);
- feedback: logits by ``torch.matmul(q_b, k_b.mT)`` times ``1 / math.sqrt(D)``,
  ``masked_fill(-inf)`` with a strict mask built as ``tril(ones, -1) == 0``, then
  ``scores = scores.clone(); scores[:, 0, 0] = 0.0`` before the softmax and
  ``alpha[:, 0, :] = 0.0`` after it;
- the gain as ``gamma_max * tanh(gamma_ctx(a) + gamma_bias)``;
- the solve as ``solve_triangular(-(gamma * alpha), f, upper=False,
  unitriangular=True)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class IndexAssignMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        checks = [(0.0 < gamma_max < 1.0, "gamma_max"), (D % n_heads == 0, "D % n_heads"),
                  (n_heads % n_kv_heads == 0, "GQA grouping"),
                  (not use_forward_rope or (D // n_heads) % 2 == 0, "RoPE head width")]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"invalid {what}")
        self.h, self.hkv, self.dh, self.gmax = n_heads, n_kv_heads, D // n_heads, gamma_max
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, n_kv_heads * self.dh)
        self.v_proj = nn.Linear(D, n_kv_heads * self.dh)
        self.proj_fb = nn.Linear(D, 2 * D)
        if n_heads > 1:
            self.out_proj = nn.Linear(D, D, bias=False)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.use_rope = use_forward_rope
        if use_forward_rope:
            self.register_buffer(
                "rope_inv_freq", 10000.0 ** (-2 * torch.arange(self.dh // 2, dtype=torch.float32) / self.dh))
        if max_len is not None:
            tri = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", tri.triu(1))
            self.register_buffer("causal_mask_fb_full", tri.triu(0))

    def forward(self, a):
        B, T, D = a.shape
        q = self.q_proj(a).view(B, T, self.h, self.dh)
        k = self.k_proj(a).view(B, T, self.hkv, self.dh)
        v = self.v_proj(a).view(B, T, self.hkv, self.dh)
        if self.use_rope:
            theta = torch.arange(T, device=a.device).float()[:, None] * self.rope_inv_freq
            cos = theta.cos().repeat_interleave(2, dim=-1)[None, :, None, :].to(a.dtype)
            sin = theta.sin().repeat_interleave(2, dim=-1)[None, :, None, :].to(a.dtype)
            q = q * cos + rotate_every_two(q) * sin
            k = k * cos + rotate_every_two(k) * sin
        if self.h != self.hkv:
            k = k.repeat_interleave(self.h // self.hkv, dim=2)
            v = v.repeat_interleave(self.h // self.hkv, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        visible = torch.tril(torch.ones(T, T, device=a.device)) == 0
        bias = torch.zeros(T, T, device=a.device, dtype=a.dtype).masked_fill(visible, float("-inf"))
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.dh) + bias, dim=-1)
        f = (att @ v).transpose(1, 2).reshape(B, T, D)
        if self.h > 1:
            f = self.out_proj(f)

        proj = self.proj_fb(a)
        q_b, k_b = proj[..., :D], proj[..., D:]
        strict = torch.tril(torch.ones(T, T, device=a.device), diagonal=-1) == 0
        scores = torch.matmul(q_b, k_b.mT) * (1.0 / math.sqrt(D))
        scores = scores.masked_fill(strict, float("-inf"))
        scores = scores.clone()
        scores[:, 0, 0] = 0.0
        alpha = torch.softmax(scores, dim=-1)
        alpha[:, 0, :] = 0.0
        gamma = self.gmax * torch.tanh(self.gamma_ctx(a) + self.gamma_bias)
        return torch.linalg.solve_triangular(-(gamma * alpha), f, upper=False, unitriangular=True)


class IndexAssignSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = IndexAssignMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        a, g = self.W_in(self.ln(x)).split(x.shape[-1], -1)
        return x + self.W_out(self.mixer(F.gelu(a)) * g)
