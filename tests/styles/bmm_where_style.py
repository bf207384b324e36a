"""A Sessa layer written by someone who thinks in batched matrix products.

Same model and state_dict keys as the reference SessaLayer; the spelling differs
on purpose from every other style in this folder:

- forward attention: ``torch.matmul`` on (B, H, T, d) with an additive float mask
  (0 above nothing, -inf above the diagonal), GQA by ``[:, :, :, None, :]
  .expand(...).reshape(...)`` before the heads move forward;
- RoPE on interleaved pairs by ``reshape`` to (..., d/2, 2), ``unbind`` and
  ``stack``;
- feedback: the query is scaled *before* the product (``q_b / math.sqrt(D)``),
  logits by ``torch.bmm``, masking by ``torch.where(allowed, x, -1e30)`` with an
  allowed-set from ``tril(ones, -1)``; row 0 (all disallowed, so a uniform
  softmax) is zeroed by multiplying the probabilities with the 0/1 mask;
- the gain as ``tanh(gamma_ctx(a) + gamma_bias) * gamma_max`` (bias added after);
- the solve as ``solve_triangular(I - gamma * alpha, f, upper=False)`` with
  ``I = torch.eye(T).expand(B, T, T)`` and no ``unitriangular`` flag.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BmmMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not (0 < gamma_max < 1):
            raise ValueError("gamma_max outside (0, 1)")
        if D % n_heads or n_heads % n_kv_heads:
            raise ValueError("head counts do not divide")
        if use_forward_rope and (D // n_heads) % 2:
            raise ValueError("RoPE wants an even head width")
        self.D, self.H, self.Hkv, self.hd = D, n_heads, n_kv_heads, D // n_heads
        self.gamma_max = gamma_max
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, n_kv_heads * self.hd)
        self.v_proj = nn.Linear(D, n_kv_heads * self.hd)
        self.proj_fb = nn.Linear(D, 2 * D)
        if n_heads > 1:
            self.out_proj = nn.Linear(D, D, bias=False)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.rope = use_forward_rope
        if use_forward_rope:
            i = torch.arange(0, self.hd, 2, dtype=torch.float32)
            self.register_buffer("rope_inv_freq", 1.0 / (10000.0 ** (i / self.hd)))
        if max_len is not None:
            full = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", full.triu(1))
            self.register_buffer("causal_mask_fb_full", full.triu(0))

    def _rotate(self, x, cos, sin):
        B, T, H, d = x.shape
        pairs = x.reshape(B, T, H, d // 2, 2)
        x0, x1 = pairs.unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(B, T, H, d)

    def forward(self, a):
        B, T, D = a.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        q = self.q_proj(a).reshape(B, T, H, hd)
        k = self.k_proj(a).reshape(B, T, Hkv, hd)
        v = self.v_proj(a).reshape(B, T, Hkv, hd)
        if self.rope:
            ang = torch.arange(T, device=a.device, dtype=self.rope_inv_freq.dtype)[:, None] * self.rope_inv_freq
            cos, sin = ang.cos()[None, :, None, :].to(a.dtype), ang.sin()[None, :, None, :].to(a.dtype)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if H != Hkv:
            g = H // Hkv
            k = k[:, :, :, None, :].expand(B, T, Hkv, g, hd).reshape(B, T, H, hd)
            v = v[:, :, :, None, :].expand(B, T, Hkv, g, hd).reshape(B, T, H, hd)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        future = torch.full((T, T), float("-inf"), device=a.device, dtype=a.dtype).triu(1)
        w = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * hd ** -0.5 + future, dim=-1)
        f = torch.matmul(w, v).permute(0, 2, 1, 3).reshape(B, T, D)
        if H > 1:
            f = self.out_proj(f)

        qb, kb = self.proj_fb(a).split(D, dim=-1)
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
        scores = torch.bmm(qb / math.sqrt(D), kb.transpose(1, 2))
        scores = torch.where(allowed, scores, -1e30)
        alpha = torch.softmax(scores, dim=-1) * allowed.to(scores.dtype)
        gamma = torch.tanh(self.gamma_ctx(a) + self.gamma_bias) * self.gamma_max
        eye = torch.eye(T, dtype=a.dtype, device=a.device).expand(B, T, T)
        return torch.linalg.solve_triangular(eye - gamma * alpha, f, upper=False)


class BmmWhereSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = BmmMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        h = self.W_in(self.ln(x))
        D = x.shape[-1]
        a, g = h[..., :D], h[..., D:]
        return x + self.W_out(self.mixer(F.gelu(a)) * g)
