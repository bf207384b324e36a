"""A Sessa layer that inverts the feedback matrix and lets softmax make NaNs.

Same model and state_dict keys as the reference SessaLayer; spelled differently
from every other style in this folder:

- forward attention with heads folded into the batch, (B*H, T, d), logits by
  ``torch.baddbmm(bias, q, k^T, alpha=1/sqrt(d))`` with an additive 0/-inf
  ``bias`` built by ``masked_fill`` of zeros over ``ones(T, T).triu(1).bool()``,
  ``F.softmax`` then ``torch.bmm``; GQA by ``index_select`` of kv heads
  ``arange(H) // group``;
- RoPE on interleaved pairs: the angles doubled per pair by
  ``stack((theta, theta), -1).flatten(-2)``, the partner by
  ``stack((-x[..., 1::2], x[..., ::2]), -1).view_as(x)``; ``rope_inv_freq`` built as
  ``exp(-(2i/d) * log(10000))``;
- feedback: logits ``(q_b @ k_b.transpose(1, 2)) / D ** 0.5``, strict mask
  ``torch.ones(T, T).tril(-1).bool()``, ``masked_fill(~mask, float('-inf'))``, and
  the NaN row 0 of the softmax repaired by ``torch.nan_to_num(..., nan=0.0)``;
- the gain as ``gamma_max * torch.tanh(self.gamma_ctx(a) + self.gamma_bias)``,
  applied as ``alpha * gamma``;
- the solve as an explicit inverse: ``torch.linalg.inv(I - alpha*gamma) @ f``;
- the layer splits W_in's output by slicing ``h[..., :D]`` / ``h[..., D:]``.

Compiled, both are recognised: ``baddbmm`` is lowered to bias + alpha * matmul,
``linalg.inv(A) @ f`` is taken as the feedback once A is shown unit lower triangular
and the region probes equal to it, and the ``index_select`` GQA is folded into the
attention (the probe shows it repeats kv heads), so the RoPE is folded too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class InverseMixer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, use_forward_rope=True, gamma_max=0.999):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv = n_kv_heads or n_heads
        self.hd = D // n_heads
        if D % n_heads or n_heads % self.n_kv or not 0 < gamma_max < 1 or (use_forward_rope and self.hd % 2):
            raise ValueError("bad Sessa arguments")
        self.gamma_max = gamma_max
        self.use_rope = use_forward_rope
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd)
        self.proj_fb = nn.Linear(D, 2 * D)
        if n_heads > 1:
            self.out_proj = nn.Linear(D, D, bias=False)
        self.gamma_bias = nn.Parameter(torch.ones(()))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            i = torch.arange(self.hd // 2, dtype=torch.float32)
            self.register_buffer("rope_inv_freq", torch.exp(-(2.0 * i / self.hd) * torch.log(torch.tensor(10000.0))))
        if max_len is not None:
            m = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", m.triu(1))
            self.register_buffer("causal_mask_fb_full", m.triu(0))

    def _rope(self, x):  # x (B, T, h, d)
        T = x.shape[1]
        theta = torch.arange(T, device=x.device).float()[:, None] * self.rope_inv_freq
        theta = torch.stack((theta, theta), -1).flatten(-2)[:, None, :]      # (T, 1, d), pairs share an angle
        partner = torch.stack((-x[..., 1::2], x[..., ::2]), -1).view_as(x)
        return x * theta.cos().to(x.dtype) + partner * theta.sin().to(x.dtype)

    def forward(self, a):
        B, T, D = a.shape
        H, Hk, d = self.n_heads, self.n_kv, self.hd
        q = self.q_proj(a).view(B, T, H, d)
        k = self.k_proj(a).view(B, T, Hk, d)
        v = self.v_proj(a).view(B, T, Hk, d)
        if self.use_rope:
            q, k = self._rope(q), self._rope(k)
        kv_of = torch.arange(H, device=a.device) // (H // Hk)
        k, v = k.index_select(2, kv_of), v.index_select(2, kv_of)
        q, k, v = (t.transpose(1, 2).reshape(B * H, T, d) for t in (q, k, v))
        causal = torch.ones(T, T, device=a.device).triu(1).bool()
        bias = torch.zeros(T, T, dtype=a.dtype, device=a.device).masked_fill(causal, float("-inf"))
        w = F.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=d ** -0.5), dim=-1)
        f = torch.bmm(w, v).view(B, H, T, d).transpose(1, 2).reshape(B, T, D)
        if H > 1:
            f = self.out_proj(f)

        q_b, k_b = self.proj_fb(a).split(D, dim=-1)
        scores = (q_b @ k_b.transpose(1, 2)) / D ** 0.5
        allowed = torch.ones(T, T, device=a.device).tril(-1).bool()
        alpha = torch.nan_to_num(scores.masked_fill(~allowed, float("-inf")).softmax(-1), nan=0.0)
        gamma = self.gamma_max * torch.tanh(self.gamma_ctx(a) + self.gamma_bias)
        system = torch.eye(T, dtype=a.dtype, device=a.device) - alpha * gamma
        return torch.linalg.inv(system) @ f


class InverseNanSessaLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_forward_rope=True,
                 gamma_max=0.999):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = InverseMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):
        h = self.W_in(self.ln(x))
        D = x.shape[-1]
        return x + self.W_out(self.mixer(F.gelu(h[..., :D])) * h[..., D:])
