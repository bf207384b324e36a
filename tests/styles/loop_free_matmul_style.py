"""A Sessa layer as a user who writes attention out with explicit matmuls would.

Same math and state_dict keys as the reference ``SessaLayer`` (see
shared/SESSA_SPEC.md), spelled differently from ``sdpa_style`` on purpose:

- the mixer is a parameter holder; the whole computation lives in the layer's
  forward;
- projections stay (B, T, H, d); RoPE is applied there by splitting the last axis
  into pairs (``unflatten(-1, (d // 2, 2))`` + ``unbind``) and the heads are moved
  with ``permute(0, 2, 1, 3)``;
- forward branch: ``torch.matmul(q, k^T) / math.sqrt(d)``, ``masked_fill(~mask,
  -inf)`` with an inclusive ``tril`` mask, ``torch.softmax``, ``@ v``; GQA by
  ``k[:, :, None].expand(...).reshape(...)``;
- feedback: ``torch.bmm``, a strict mask from comparing two ``arange``s,
  ``torch.where(mask, logits, -inf)`` (row 0 becomes NaN after softmax), row 0
  overwritten with zeros on a clone, and the solve as a plain lower-triangular
  ``solve_triangular(eye(T) - gamma * alpha, f)``.

The reference's causal mask buffers (when ``max_len`` is given) are registered
under the reference's names and with its contents (True = masked) so checkpoints
load with ``strict=True`` both ways; they are not used by this forward, which
builds its masks from T so T stays dynamic.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _MixerParams(nn.Module):
    """Holds the mixer's weights under the reference's names; no forward."""

    def __init__(self, D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max):
        super().__init__()
        head_dim = D // n_heads
        self.gamma_max = gamma_max
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, n_kv_heads * head_dim)
        self.v_proj = nn.Linear(D, n_kv_heads * head_dim)
        if n_heads > 1:
            self.out_proj = nn.Linear(D, D, bias=False)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.gamma_bias = nn.Parameter(torch.ones(()))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        if use_forward_rope:
            i = torch.arange(head_dim // 2, dtype=torch.float32)
            self.register_buffer("rope_inv_freq", torch.pow(10000.0, -2.0 * i / head_dim))
        if max_len is not None:
            rows = torch.arange(max_len)[:, None]
            cols = torch.arange(max_len)[None, :]
            # Same contents as the reference's (True = masked), which reads them.
            self.register_buffer("causal_mask_f_full", cols > rows)
            self.register_buffer("causal_mask_fb_full", cols >= rows)


class MatmulSessaLayer(nn.Module):
    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        ln_eps: float = 1e-5,
        use_forward_rope: bool = True,
        gamma_max: float = 0.999,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not (gamma_max > 0 and gamma_max < 1):
            raise ValueError(f"gamma_max={gamma_max} is outside (0, 1)")
        if D % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"need D % n_heads == 0 and n_heads % n_kv_heads == 0, "
                f"got D={D}, n_heads={n_heads}, n_kv_heads={n_kv_heads}"
            )
        if use_forward_rope and (D // n_heads) % 2:
            raise ValueError(f"RoPE needs an even head width, got {D // n_heads}")
        self.D, self.H, self.Hkv, self.d = D, n_heads, n_kv_heads, D // n_heads
        self.use_forward_rope = use_forward_rope
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.act = nn.GELU()
        self.mixer = _MixerParams(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, heads, d); cos, sin: (T, 1, d/2)."""
        # Rotate in at least float32: 16-bit angles lose whole radians at long T.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x_even, x_odd = xf.unflatten(-1, (self.d // 2, 2)).unbind(-1)
        out = torch.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
        return out.reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixer
        B, T, D = x.shape
        H, Hkv, d = self.H, self.Hkv, self.d

        h = self.W_in(F.layer_norm(x, (D,), self.ln.weight, self.ln.bias, self.ln.eps))
        a, g = h[..., :D], h[..., D:]
        abar = self.act(a)

        # ---- forward branch: causal GQA attention ----
        q = m.q_proj(abar).reshape(B, T, H, d)
        k = m.k_proj(abar).reshape(B, T, Hkv, d)
        v = m.v_proj(abar).reshape(B, T, Hkv, d)
        if self.use_forward_rope:
            inv_freq = m.rope_inv_freq
            if inv_freq.dtype in (torch.float16, torch.bfloat16):
                inv_freq = inv_freq.float()
            theta = torch.outer(torch.arange(T, device=x.device).to(inv_freq.dtype), inv_freq)
            cos, sin = torch.cos(theta)[:, None, :], torch.sin(theta)[:, None, :]
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, T, d)
        if H != Hkv:
            k = k[:, :, None].expand(B, Hkv, H // Hkv, T, d).reshape(B, H, T, d)
            v = v[:, :, None].expand(B, Hkv, H // Hkv, T, d).reshape(B, H, T, d)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        f = torch.softmax(scores, dim=-1) @ v
        f = f.permute(0, 2, 1, 3).reshape(B, T, D)
        if H > 1:
            f = m.out_proj(f)

        # ---- feedback branch: (I - gamma * alpha) s = f ----
        fb = m.proj_fb(abar)
        q_b, k_b = fb[..., :D], fb[..., D:]
        logits = torch.bmm(q_b, k_b.transpose(1, 2)) / math.sqrt(D)
        pos = torch.arange(T, device=x.device)
        before = pos[None, :] < pos[:, None]
        alpha = torch.softmax(torch.where(before, logits, float("-inf")), dim=-1)
        alpha = alpha.clone()
        alpha[:, 0, :] = 0.0  # row 0 was all -inf, i.e. NaN after softmax
        gamma = torch.tanh(m.gamma_ctx(abar).squeeze(-1) + m.gamma_bias) * m.gamma_max
        system = torch.eye(T, dtype=alpha.dtype, device=x.device) - gamma.unsqueeze(-1) * alpha
        low_precision = f.dtype in (torch.float16, torch.bfloat16)
        if low_precision:
            s = torch.linalg.solve_triangular(system.float(), f.float(), upper=False).to(f.dtype)
        else:
            s = torch.linalg.solve_triangular(system, f, upper=False)

        return x + self.W_out(s * g)
