"""A Sessa layer as a user who likes ``scaled_dot_product_attention`` would write it.

Same math and state_dict keys as the reference ``SessaLayer`` (see
shared/SESSA_SPEC.md); the code deliberately differs from
``loop_free_matmul_style`` so that the frontend's recognisers are tested against
two independent spellings of the same model:

- forward branch: (B, H, T, d) tensors, ``F.scaled_dot_product_attention(...,
  is_causal=True)``, GQA by ``repeat_interleave`` over the head dimension (torch
  2.13 also accepts ``enable_gqa=True``; this style does not use it);
- RoPE by interleaved slicing ``x[..., 0::2]`` / ``x[..., 1::2]`` and
  ``torch.stack(..., -1).flatten(-2)``;
- feedback: strict mask from ``torch.tril(ones, diagonal=-1)``, finite fill
  ``finfo(dtype).min``, softmax, row 0 zeroed by multiplying with a row-validity
  mask, and the solve as a *unitriangular* ``solve_triangular`` on ``-gamma*alpha``
  (the diagonal is ignored, so the matrix solved is I - gamma*alpha).

The causal mask buffers of the reference (present when ``max_len`` is given) are
registered with the reference's names and contents (True = masked) so
checkpoints load with ``strict=True`` both ways; the forward builds its masks
from T instead of slicing them, which keeps T dynamic under torch.export.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_args(D, n_heads, n_kv_heads, use_forward_rope, gamma_max):
    if not 0.0 < gamma_max < 1.0:
        raise ValueError(f"gamma_max must lie in (0, 1), got {gamma_max}")
    if D % n_heads != 0:
        raise ValueError(f"D={D} is not divisible by n_heads={n_heads}")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    if use_forward_rope and (D // n_heads) % 2 != 0:
        raise ValueError(f"RoPE needs an even head width, got d={D // n_heads}")


class _SdpaMixer(nn.Module):
    def __init__(self, D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max):
        super().__init__()
        self.D = D
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = D // n_heads
        self.use_forward_rope = use_forward_rope
        self.gamma_max = gamma_max

        kv_width = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv_width)
        self.v_proj = nn.Linear(D, kv_width)
        # With one head the output projection is the identity, and the reference
        # has no parameter for it.
        self.out_proj = nn.Linear(D, D, bias=False) if n_heads > 1 else None
        self.proj_fb = nn.Linear(D, 2 * D)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)

        if use_forward_rope:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            self.register_buffer("rope_inv_freq", 1.0 / (10000.0 ** exponent))
        if max_len is not None:
            # True = masked, as in the reference: the future for the forward
            # branch, the future and the diagonal for the feedback.
            full = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", torch.triu(full, diagonal=1))
            self.register_buffer("causal_mask_fb_full", torch.triu(full))

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of x (B, heads, T, d) by position * inv_freq."""
        T = x.shape[-2]
        angle_dtype = torch.promote_types(self.rope_inv_freq.dtype, torch.float32)
        positions = torch.arange(T, device=x.device, dtype=angle_dtype)
        angles = positions[:, None] * self.rope_inv_freq.to(angle_dtype)[None, :]
        cos, sin = angles.cos(), angles.sin()
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        even, odd = xf[..., 0::2], xf[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    def _forward_branch(self, abar: torch.Tensor) -> torch.Tensor:
        B, T, _ = abar.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(abar).view(B, T, H, d).transpose(1, 2)
        k = self.k_proj(abar).view(B, T, Hkv, d).transpose(1, 2)
        v = self.v_proj(abar).view(B, T, Hkv, d).transpose(1, 2)
        if self.use_forward_rope:
            q, k = self._rope(q), self._rope(k)
        group = H // Hkv
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        f = attn.transpose(1, 2).reshape(B, T, self.D)
        return self.out_proj(f) if self.out_proj is not None else f

    def _feedback_solve(self, abar: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        T = abar.shape[1]
        q_fb, k_fb = self.proj_fb(abar).chunk(2, dim=-1)
        logits = q_fb @ k_fb.transpose(-1, -2) * (1.0 / math.sqrt(self.D))
        strictly_past = torch.tril(
            torch.ones(T, T, dtype=torch.bool, device=abar.device), diagonal=-1
        )
        logits = logits.masked_fill(~strictly_past, torch.finfo(logits.dtype).min)
        alpha = torch.softmax(logits, dim=-1)
        # Row 0 has no past: the finite fill made it uniform, so zero it.
        has_past = (torch.arange(T, device=abar.device) > 0).to(alpha.dtype)
        alpha = alpha * has_past[:, None]

        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(abar).squeeze(-1))
        # The solve is ill-conditioned near |gamma| = 1: never run it in 16 bits.
        solve_dtype = torch.promote_types(f.dtype, torch.float32)
        minus_feedback = -(gamma[..., None] * alpha)
        s = torch.linalg.solve_triangular(
            minus_feedback.to(solve_dtype), f.to(solve_dtype), upper=False, unitriangular=True
        )
        return s.to(f.dtype)

    def forward(self, abar: torch.Tensor) -> torch.Tensor:
        return self._feedback_solve(abar, self._forward_branch(abar))


class SdpaSessaLayer(nn.Module):
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
        if n_kv_heads is None:
            n_kv_heads = n_heads
        _check_args(D, n_heads, n_kv_heads, use_forward_rope, gamma_max)
        self.D = D
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = _SdpaMixer(D, n_heads, n_kv_heads, max_len, use_forward_rope, gamma_max)
        self.W_out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        s = self.mixer(F.gelu(a))
        return x + self.W_out(s * g)
