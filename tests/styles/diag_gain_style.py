"""A Sessa layer written by someone who thinks in matrices: the gain as a diagonal matrix.

Same model and state_dict keys as the reference SessaLayer; spelled differently from every other style in
this folder:

- heads kept in a 5-D (B, Hkv, group, T, d) layout: q reshaped so each kv head's group of query heads sits
  together, k and v given the group axis by ``unsqueeze(2).expand(...)`` (GQA by expand), scores by a
  5-D ``q @ k.transpose(-1, -2)`` with an additive float mask from ``torch.where``;
- an optional ``attention_mask`` [B, T] (1 = a real token, 0 = padding) combined with the causal mask, as
  batched prompts of different lengths are served; with None (the default) the layer is the spec's;
- RoPE interleaved, by ``torch.view_as_complex`` against a complex table ``torch.polar(ones, angles)``
  computed per call;
- the feedback weights built row 0 by concatenation (``cat(zeros(B, 1, T), softmax(rows 1..T-1))``), the
  gain applied as ``torch.diag_embed(gamma) @ alpha``, and the system solved transposed by the dense
  ``torch.linalg.solve(M^T, f^T, left=False)``; the feedback logits by ``einsum("bte,bse->bts")``; the gain
  written out as ``gamma_max * (1 - 2 / (exp(2 z) + 1))`` (= gamma_max * tanh(z)) on a [B, T] vector.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DiagGainMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        self.kv = n_kv_heads if n_kv_heads else n_heads
        self.D, self.h, self.hd = D, n_heads, D // n_heads
        self.gmax, self.use_rope = gamma_max, use_forward_rope
        for name, out in (("q_proj", D), ("k_proj", self.kv * self.hd), ("v_proj", self.kv * self.hd),
                          ("proj_fb", 2 * D)):
            setattr(self, name, nn.Linear(D, out))
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else nn.Identity()
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            self.register_buffer("rope_inv_freq", torch.exp(
                torch.arange(0, self.hd, 2, dtype=torch.float32) * (-torch.log(torch.tensor(10000.0)) / self.hd)))
        if max_len is not None:
            ones = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", torch.triu(ones, diagonal=1))
            self.register_buffer("causal_mask_fb_full", torch.triu(ones, diagonal=0))

    def _rotate(self, x):   # x (B, T, heads, hd)
        T = x.shape[1]
        ang = torch.outer(torch.arange(T, device=x.device).float(), self.rope_inv_freq)
        table = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * table).flatten(-2).type_as(x)

    def forward(self, a, attention_mask=None):
        B, T, D = a.shape
        grp = self.h // self.kv
        q = self.q_proj(a).reshape(B, T, self.h, self.hd)
        k = self.k_proj(a).reshape(B, T, self.kv, self.hd)
        v = self.v_proj(a).reshape(B, T, self.kv, self.hd)
        if self.use_rope:
            q, k = self._rotate(q), self._rotate(k)
        q = q.permute(0, 2, 1, 3).reshape(B, self.kv, grp, T, self.hd)
        k = k.permute(0, 2, 1, 3).unsqueeze(2).expand(B, self.kv, grp, T, self.hd)
        v = v.permute(0, 2, 1, 3).unsqueeze(2).expand(B, self.kv, grp, T, self.hd)
        pos = torch.arange(T, device=a.device)
        allowed = pos[None, :] <= pos[:, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, None, :]
        bias = torch.where(allowed, 0.0, float("-inf")).to(a.dtype)
        p = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5 + bias, dim=-1)
        o = (p @ v).reshape(B, self.h, T, self.hd)
        f = self.out_proj(o.permute(0, 2, 1, 3).reshape(B, T, D))

        fb = self.proj_fb(a)
        s = torch.einsum("bte,bse->bts", fb[:, :, :D], fb[:, :, D:]) / D ** 0.5
        later = pos[None, :] >= pos[:, None]     # j >= t: not in row t's past
        rows = torch.softmax(s[:, 1:].masked_fill(later[1:], float("-inf")), dim=-1)
        alpha = torch.cat((torch.zeros(B, 1, T, dtype=a.dtype, device=a.device), rows), dim=1)
        z = self.gamma_ctx(a)[..., 0] + self.gamma_bias
        gamma = self.gmax * (1.0 - 2.0 / (torch.exp(2.0 * z) + 1.0))   # = gmax * tanh(z), on [B, T]
        system = torch.eye(T, dtype=a.dtype, device=a.device) - torch.diag_embed(gamma) @ alpha
        return torch.linalg.solve(system.transpose(1, 2), f.transpose(1, 2), left=False).transpose(1, 2)


class DiagGainSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = DiagGainMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x, attention_mask=None):
        a, g = self.W_in(self.ln(x)).split(x.shape[-1], dim=-1)
        return self.W_out(self.mixer(F.gelu(a), attention_mask) * g) + x
