"""A Sessa layer written by someone who reaches for dense linear algebra.

Same model and state_dict keys as the reference SessaLayer; spelled differently
from every other style in this folder:

- forward attention by ``torch.einsum("bhid,bhjd->bhij")`` on (B, H, T, d) with an
  additive mask ``torch.triu(torch.full((T, T), float('-inf')), 1)`` and a softmax
  written out by hand as ``exp(x - max) / sum``; heads merged back with
  ``permute(0, 2, 1, 3).reshape``; GQA by ``k.unsqueeze(2).expand(...).flatten(1, 2)``
  on the heads-first layout;
- RoPE on interleaved pairs by swapping each pair with ``unflatten(-1, (-1, 2))
  .flip(-1)`` and multiplying by a ``[-1, +1]`` sign tensor;
- feedback: logits by ``einsum("bid,bjd->bij") * D ** -0.5``, the strict mask as an
  additive ``torch.triu(torch.full((T, T), -1e9), 0)`` (row 0 fully masked, so its
  softmax is uniform) and row 0 zeroed by multiplying with ``(arange(T) > 0)``;
- the gain as ``torch.tanh(self.gamma_bias + self.gamma_ctx(a)).mul(gamma_max)``;
- the solve as a dense general solve ``torch.linalg.solve(I - gamma * alpha, f)``
  with ``I = torch.eye(T)`` (no triangular structure is told to torch);
- the layer splits W_in's output with ``.chunk(2, -1)``; ``rope_inv_freq`` is built
  as ``1 / 10000 ** (arange(0, d, 2) / d)`` and the angles with ``torch.outer``.

Compiled, both are recognised, RoPE and GQA folded: the hand-written softmax is
rewritten to ``softmax`` by structure (``max(dim)`` values lowered to ``amax``), and
the general solve is taken as the feedback once its matrix is shown unit lower
triangular and the region probes equal to it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseSolveMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        kv = n_kv_heads if n_kv_heads is not None else n_heads
        assert 0.0 < gamma_max < 1.0 and D % n_heads == 0 and n_heads % kv == 0
        self.D, self.H, self.Hkv, self.d = D, n_heads, kv, D // n_heads
        assert not use_forward_rope or self.d % 2 == 0
        self.gamma_max, self.rope_on = gamma_max, use_forward_rope
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv * self.d)
        self.v_proj = nn.Linear(D, kv * self.d)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else nn.Identity()
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            self.register_buffer("rope_inv_freq",
                                 1.0 / 10000.0 ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        if max_len is not None:   # reference buffer names and contents (unused: masks are built from T)
            full = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", full.triu(1))
            self.register_buffer("causal_mask_fb_full", full.triu(0))

    def rope(self, x):  # x (B, H, T, d)
        T = x.shape[2]
        ang = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.rope_inv_freq)
        cos = ang.cos().repeat_interleave(2, -1).to(x.dtype)
        sin = ang.sin().repeat_interleave(2, -1).to(x.dtype)
        sign = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)
        swapped = (x.unflatten(-1, (-1, 2)).flip(-1) * sign).flatten(-2)   # (x0, x1) -> (-x1, x0)
        return x * cos + swapped * sin

    def forward(self, a):
        B, T, D = a.shape
        q = self.q_proj(a).reshape(B, T, self.H, self.d).permute(0, 2, 1, 3)
        k = self.k_proj(a).reshape(B, T, self.Hkv, self.d).permute(0, 2, 1, 3)
        v = self.v_proj(a).reshape(B, T, self.Hkv, self.d).permute(0, 2, 1, 3)
        if self.rope_on:
            q, k = self.rope(q), self.rope(k)
        g = self.H // self.Hkv
        k = k.unsqueeze(2).expand(B, self.Hkv, g, T, self.d).flatten(1, 2)
        v = v.unsqueeze(2).expand(B, self.Hkv, g, T, self.d).flatten(1, 2)
        bias = torch.triu(torch.full((T, T), float("-inf"), dtype=a.dtype, device=a.device), 1)
        x = torch.einsum("bhid,bhjd->bhij", q, k) * self.d ** -0.5 + bias
        e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
        p = e / e.sum(dim=-1, keepdim=True)
        f = self.out_proj(torch.einsum("bhij,bhjd->bhid", p, v).permute(0, 2, 1, 3).reshape(B, T, D))

        fb = self.proj_fb(a)
        q_b, k_b = fb[..., :D], fb[..., D:]
        logits = torch.einsum("bid,bjd->bij", q_b, k_b) * D ** -0.5
        logits = logits + torch.triu(torch.full((T, T), -1e9, dtype=a.dtype, device=a.device), 0)
        has_past = (torch.arange(T, device=a.device) > 0).to(a.dtype)[:, None]
        alpha = F.softmax(logits, dim=-1) * has_past
        gamma = torch.tanh(self.gamma_bias + self.gamma_ctx(a)).mul(self.gamma_max)
        eye = torch.eye(T, dtype=a.dtype, device=a.device)
        return torch.linalg.solve(eye - gamma * alpha, f)


class DenseSolveSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = DenseSolveMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        return self.W_out(self.mixer(F.gelu(a)) * g) + x
