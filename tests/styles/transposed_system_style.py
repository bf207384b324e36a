"""A Sessa layer written by someone who keeps time on the last axis of the feedback (channels first).

Same model and state_dict keys as the reference SessaLayer (it loads the public reference's layout
strictly); spelled differently from every other style in this folder:

- RoPE as the half-split ``rotate_half`` convention (pairs (i, i + d/2)), applied to each head's channels
  regrouped as ``cat(x[..., 0::2], x[..., 1::2])`` first, so the rotation is the spec's interleaved one up
  to that fixed channel order (q . k does not see the order); cos/sin computed per call as
  ``cat(angles, angles)`` from the ``rope_inv_freq`` buffer;
- GQA by ``repeat_interleave`` on the heads-first layout, scores by ``q @ k.transpose(-2, -1)`` and a
  ``masked_fill`` with a boolean ``triu(1)`` mask;
- the gain as ``gamma_max * (2 * sigmoid(2 z) - 1)`` (= gamma_max * tanh(z), written without tanh);
- the feedback transposed: weights ``alpha^T`` built as ``softmax(k_b q_b^T)`` over the key axis (dim -2),
  row 0 of alpha (column 0 of alpha^T) handled by padding the softmax of columns 1.. with a zero column
  (``F.pad``), the gain scaling columns, and the system solved from the right on channels-first values:
  ``solve_triangular(I - alpha^T diag(gamma), f^T, upper=True, left=False)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TransposedSystemMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        kv = n_kv_heads or n_heads
        self.D, self.H, self.Hkv, self.d = D, n_heads, kv, D // n_heads
        self.gamma_max, self.rope_on = gamma_max, use_forward_rope
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv * self.d)
        self.v_proj = nn.Linear(D, kv * self.d)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else nn.Identity()
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            half = torch.arange(self.d // 2, dtype=torch.float32)
            self.register_buffer("rope_inv_freq", torch.pow(10000.0, -2.0 * half / self.d))
        if max_len is not None:
            m = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", torch.triu(m, 1))
            self.register_buffer("causal_mask_fb_full", torch.triu(m, 0))

    def half_split_rope(self, x):   # x (B, H, T, d)
        T = x.size(2)
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)   # pairs (2i, 2i+1) -> (i, i + d/2)
        ang = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * self.rope_inv_freq[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * emb.cos().to(x.dtype) + torch.cat((-x2, x1), dim=-1) * emb.sin().to(x.dtype)

    def forward(self, a):
        B, T, D = a.shape
        q = self.q_proj(a).view(B, T, self.H, self.d).transpose(1, 2)
        k = self.k_proj(a).view(B, T, self.Hkv, self.d).transpose(1, 2)
        v = self.v_proj(a).view(B, T, self.Hkv, self.d).transpose(1, 2)
        if self.rope_on:
            q, k = self.half_split_rope(q), self.half_split_rope(k)
        rep = self.H // self.Hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        future = torch.ones(T, T, dtype=torch.bool, device=a.device).triu(1)
        w = (q @ k.transpose(-2, -1) / self.d ** 0.5).masked_fill(future, float("-inf")).softmax(-1)
        f = self.out_proj((w @ v).transpose(1, 2).reshape(B, T, D))

        q_b, k_b = self.proj_fb(a).split([D, D], dim=-1)
        kq = k_b @ q_b.transpose(1, 2) / D ** 0.5                      # [B, j, t]
        earlier = torch.ones(T, T, dtype=torch.bool, device=a.device).triu(1)   # j < t
        cols = kq[:, :, 1:].masked_fill(~earlier[:, 1:], float("-inf")).softmax(dim=-2)
        alpha_t = F.pad(cols, (1, 0))                                  # alpha^T, column 0 (row 0 of alpha) zero
        z = self.gamma_bias + self.gamma_ctx(a)
        gamma = self.gamma_max * (2.0 * torch.sigmoid(2.0 * z) - 1.0)   # [B, T, 1]
        system_t = torch.eye(T, dtype=a.dtype, device=a.device) - alpha_t * gamma.transpose(1, 2)
        s_t = torch.linalg.solve_triangular(system_t, f.transpose(1, 2), upper=True, left=False)
        return s_t.transpose(1, 2)


class TransposedSystemSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = TransposedSystemMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        h = self.W_in(self.ln(x))
        a, g = h[..., :h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        return self.W_out(self.mixer(F.gelu(a)) * g) + x
