"""A Sessa layer that keeps its masks in registered buffers and fills with finfo.min.

Same model and state_dict keys as the reference SessaLayer. What differs:

- masks: when ``max_len`` is given, the reference-named boolean buffers sliced to
  ``[:T, :T]``; otherwise ``torch.triu(ones, diagonal=...)`` per call;
- forward attention by ``einsum("bhqd,bhkd->bhqk")`` on heads-first tensors with
  ``masked_fill(mask, finfo.min)``, GQA by ``repeat_interleave``;
- RoPE by even/odd slicing, ``torch.stack(..., -1).flatten(-2)``;
- feedback: ``einsum("btd,bsd->bts") / math.sqrt(D)``, ``masked_fill(mask,
  finfo.min)``, softmax, then ``alpha.masked_fill(mask, 0.0)`` (row 0 is fully
  masked, so it becomes zero there);
- the gain as ``gamma_max * tanh(gamma_bias.view(1, 1, 1) + gamma_ctx(a))``;
- the solve in a static helper that branches on dtype (half types solve in float32)
  as ``solve_triangular(-(gamma * alpha), f, upper=False, left=True,
  unitriangular=True)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class FinfoMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if not 0 < gamma_max < 1:
            raise ValueError(f"gamma_max={gamma_max} must be in (0, 1)")
        if D % n_heads:
            raise ValueError("D % n_heads != 0")
        if n_heads % self.n_kv_heads:
            raise ValueError("n_heads % n_kv_heads != 0")
        self.head_dim = D // n_heads
        if use_forward_rope and self.head_dim % 2:
            raise ValueError("RoPE needs an even head_dim")
        self.gamma_max = gamma_max
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads != 1 else None
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.use_forward_rope = use_forward_rope
        if use_forward_rope:
            exps = torch.arange(self.head_dim // 2, dtype=torch.float32) * 2 / self.head_dim
            self.register_buffer("rope_inv_freq", 10000.0 ** -exps)
        self.max_len = max_len
        if max_len is not None:
            ones = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", torch.triu(ones, diagonal=1))
            self.register_buffer("causal_mask_fb_full", torch.triu(ones, diagonal=0))

    def masks(self, T, device):
        if self.max_len is not None:
            return self.causal_mask_f_full[:T, :T], self.causal_mask_fb_full[:T, :T]
        ones = torch.ones(T, T, dtype=torch.bool, device=device)
        return torch.triu(ones, diagonal=1), torch.triu(ones, diagonal=0)

    @staticmethod
    def solve(system, rhs):
        if system.dtype in (torch.float16, torch.bfloat16):
            out = torch.linalg.solve_triangular(system.float(), rhs.float(), upper=False, left=True,
                                                unitriangular=True)
            return out.to(rhs.dtype)
        return torch.linalg.solve_triangular(system, rhs, upper=False, left=True, unitriangular=True)

    def rope(self, x, T):
        pos = torch.arange(T, device=x.device, dtype=torch.float32)
        theta = pos[:, None] * self.rope_inv_freq[None, :]
        cos = torch.cos(theta)[None, None].to(x.dtype)
        sin = torch.sin(theta)[None, None].to(x.dtype)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def forward(self, a):
        B, T, D = a.shape
        mask_f, mask_fb = self.masks(T, a.device)
        q = self.q_proj(a).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(a).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_forward_rope:
            q, k = self.rope(q, T), self.rope(k, T)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.head_dim)
        logits = logits.masked_fill(mask_f, torch.finfo(logits.dtype).min)
        out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), v)
        f = out.transpose(1, 2).reshape(B, T, D)
        if self.out_proj is not None:
            f = self.out_proj(f)

        q_b, k_b = self.proj_fb(a).split([D, D], dim=-1)
        logits_fb = torch.einsum("btd,bsd->bts", q_b, k_b) / math.sqrt(D)
        logits_fb = logits_fb.masked_fill(mask_fb, torch.finfo(logits_fb.dtype).min)
        alpha = torch.softmax(logits_fb, dim=-1).masked_fill(mask_fb, 0.0)
        gamma = self.gamma_max * torch.tanh(self.gamma_bias.view(1, 1, 1) + self.gamma_ctx(a))
        return self.solve(-(gamma * alpha), f)


class FinfoBufferSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = FinfoMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        a, g = torch.split(self.W_in(self.ln(x)), x.shape[-1], dim=-1)
        return x + self.W_out(self.mixer(F.gelu(a)) * g)
