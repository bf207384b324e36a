"""A Sessa layer in the LLaMA family's idiom: complex-number RoPE and SDPA.

Same model and state_dict keys as the reference SessaLayer. What differs:

- RoPE by ``torch.view_as_complex`` on (..., d/2, 2) pairs times
  ``torch.polar(ones, angles)``, back with ``torch.view_as_real(...).flatten``;
- forward attention by ``F.scaled_dot_product_attention(is_causal=True)`` on
  (B, H, T, d), GQA by ``repeat_interleave`` over heads;
- feedback: logits ``q_b @ k_b.transpose(-1, -2) * D ** -0.5``, an additive
  float mask of 0 / -inf built per call (row 0 is all -inf, its softmax NaN),
  repaired by ``torch.nan_to_num``;
- the solve as ``solve_triangular(eye - gamma * alpha, f, upper=False,
  unitriangular=True)`` with a plain ``torch.eye(T)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ComplexRopeMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        kv = n_heads if n_kv_heads is None else n_kv_heads
        if not 0.0 < gamma_max < 1.0 or D % n_heads != 0 or n_heads % kv != 0:
            raise ValueError("bad SessaMixer arguments")
        head = D // n_heads
        if use_forward_rope and head % 2 == 1:
            raise ValueError("odd head width with RoPE")
        self.n_heads, self.n_kv, self.head, self.gamma_max = n_heads, kv, head, gamma_max
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, kv * head), nn.Linear(D, kv * head)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else nn.Identity()
        self.gamma_bias = nn.Parameter(torch.ones(()))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.use_rope = use_forward_rope
        if use_forward_rope:
            self.register_buffer("rope_inv_freq", torch.pow(10000.0, -torch.arange(0, head, 2).float() / head))
        if max_len is not None:
            m = torch.ones(max_len, max_len).bool()
            self.register_buffer("causal_mask_f_full", torch.triu(m, diagonal=1))
            self.register_buffer("causal_mask_fb_full", torch.triu(m, diagonal=0))

    @staticmethod
    def rotary(x, freqs_cis):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)

    def forward(self, a):
        b, t, width = a.shape
        q = self.q_proj(a).view(b, t, self.n_heads, self.head)
        k = self.k_proj(a).view(b, t, self.n_kv, self.head)
        v = self.v_proj(a).view(b, t, self.n_kv, self.head)
        if self.use_rope:
            angles = torch.outer(torch.arange(t, device=a.device).to(a.dtype), self.rope_inv_freq.to(a.dtype))
            freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
            q, k = self.rotary(q, freqs_cis), self.rotary(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        f = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        f = self.out_proj(f.transpose(1, 2).reshape(b, t, width))

        q_b, k_b = torch.chunk(self.proj_fb(a), 2, dim=-1)
        blocked = torch.ones(t, t, dtype=torch.bool, device=a.device).triu()
        additive = torch.zeros(t, t, dtype=a.dtype, device=a.device).masked_fill(blocked, float("-inf"))
        alpha = torch.softmax(q_b @ k_b.transpose(-1, -2) * width ** -0.5 + additive, dim=-1)
        alpha = torch.nan_to_num(alpha, nan=0.0)
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a))
        eye = torch.eye(t, dtype=a.dtype, device=a.device)
        return torch.linalg.solve_triangular(eye - gamma * alpha, f, upper=False, unitriangular=True)


class ComplexRopeSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = ComplexRopeMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        return x + self.W_out(self.mixer(F.gelu(a)) * g)
