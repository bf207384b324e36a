"""A Sessa layer whose feedback is solved step by step, as the recurrence reads.

Same model and state_dict keys as the reference SessaLayer; spelled differently
from every other style in this folder:

- forward attention by ``F.scaled_dot_product_attention(q, k, v, attn_mask=keep)``
  with an explicit boolean keep-mask ``arange(T)[:, None] >= arange(T)[None, :]``
  (not ``is_causal``) and GQA by ``repeat_interleave`` on dim 1;
- RoPE on (B, H, T, d) by ``x.unflatten(-1, (-1, 2)).unbind(-1)`` into (x0, x1),
  ``x0*c - x1*s`` / ``x0*s + x1*c``, ``torch.stack(...).flatten(-2)``; the
  frequencies from a Python list comprehension;
- feedback: alpha of the full (T, T) problem computed at once (``torch.where``
  with a strict ``arange`` comparison, fill ``-inf``, softmax, then ``torch.where``
  to zero the NaN row 0), and the *solve* as a Python ``for`` loop over time steps:
  ``s_t = f_t + gamma_t * sum_{j<t} alpha_tj s_j``, each ``s_t`` appended to a list
  and ``torch.stack``-ed at the end.

The loop's trip count is the sequence length, so torch.export cannot keep T dynamic
through it: the compiler traces each length on its own (static T), and the unrolled
loop is not recognised as a Sessa feedback. SDPA with an ``attn_mask`` is lowered to
the matmul, mask, softmax and matmul it computes, and the attention recogniser's
probes find the mask causal: the forward attention is recognised.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class TimeLoopMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        self.D, self.H = D, n_heads
        self.Hkv = n_kv_heads if n_kv_heads else n_heads
        self.d = D // n_heads
        self.gamma_max = float(gamma_max)
        self.use_forward_rope = use_forward_rope
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, self.Hkv * self.d)
        self.v_proj = nn.Linear(D, self.Hkv * self.d)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads != 1 else None
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            self.register_buffer(
                "rope_inv_freq", torch.tensor([10000.0 ** (-2.0 * i / self.d) for i in range(self.d // 2)]))
        if max_len is not None:
            full = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", full.triu(1))
            self.register_buffer("causal_mask_fb_full", full.triu(0))

    def rope(self, x):  # (B, H, T, d)
        T = x.shape[-2]
        ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * self.rope_inv_freq[None]
        c, s = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)

    def forward(self, a):
        B, T, D = a.shape
        q = self.q_proj(a).view(B, T, self.H, self.d).transpose(1, 2)
        k = self.k_proj(a).view(B, T, self.Hkv, self.d).transpose(1, 2)
        v = self.v_proj(a).view(B, T, self.Hkv, self.d).transpose(1, 2)
        if self.use_forward_rope:
            q, k = self.rope(q), self.rope(k)
        k = k.repeat_interleave(self.H // self.Hkv, dim=1)
        v = v.repeat_interleave(self.H // self.Hkv, dim=1)
        pos = torch.arange(T, device=a.device)
        keep = pos[:, None] >= pos[None, :]
        f = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, D)
        if self.out_proj is not None:
            f = self.out_proj(f)

        q_b, k_b = self.proj_fb(a).split([D, D], dim=-1)
        strict = pos[:, None] > pos[None, :]
        logits = torch.where(strict, q_b @ k_b.transpose(-1, -2) / math.sqrt(D), float("-inf"))
        alpha = torch.where(strict, logits.softmax(-1), 0.0)            # row 0: NaN -> 0
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a))  # (B, T, 1)
        outs = []
        for t in range(T):
            s_t = f[:, t]
            if t > 0:
                past = torch.stack(outs, dim=1)                         # (B, t, D)
                s_t = s_t + gamma[:, t] * torch.einsum("bj,bjd->bd", alpha[:, t, :t], past)
            outs.append(s_t)
        return torch.stack(outs, dim=1)


class TimeLoopSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = TimeLoopMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        a, g = self.W_in(self.ln(x)).split(x.shape[-1], -1)
        return x + self.W_out(self.mixer(F.gelu(a)) * g)
