"""Eager pre-norm Transformer block, the attention baseline of shared/SESSA_SPEC.md.

Its attention computes the same function as Sessa's forward branch but is
spelled differently on purpose (matmul + where, expand-based GQA, RoPE on
reshaped channel pairs), so the compiler's recognisers see a second idiom.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import DecodeByPrefill, resolve_heads

__all__ = ["TransformerLayer"]


class TransformerLayer(DecodeByPrefill, nn.Module):
    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        mlp_ratio: int = 4,
        use_rope: bool = True,
        ln_eps: float = 1e-5,
    ):
        super().__init__()
        n_kv_heads = resolve_heads(D, n_heads, n_kv_heads)
        if use_rope and (D // n_heads) % 2 != 0:
            raise ValueError(f"RoPE needs an even head width, got D/n_heads={D // n_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")

        self.D = D
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = D // n_heads
        self.use_rope = bool(use_rope)

        kv_dim = n_kv_heads * self.head_dim
        self.ln1 = nn.LayerNorm(D, eps=ln_eps)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv_dim)
        self.v_proj = nn.Linear(D, kv_dim)
        self.o_proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D, eps=ln_eps)
        self.W1 = nn.Linear(D, mlp_ratio * D)
        self.W2 = nn.Linear(mlp_ratio * D, D)
        if self.use_rope:
            freq = 10000.0 ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
            # Not persistent: it is a function of the shape, not learned state.
            self.register_buffer("rope_inv_freq", freq, persistent=False)
        else:
            self.register_buffer("rope_inv_freq", None, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # Rounding the frequencies to bf16 would corrupt the angles at long positions.
        saved = self.rope_inv_freq
        super()._apply(fn, *args, **kwargs)
        if self.rope_inv_freq is not None and self.rope_inv_freq.dtype in (torch.float16, torch.bfloat16):
            self.rope_inv_freq = saved.to(device=self.rope_inv_freq.device, dtype=torch.float32)
        return self

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, heads, T, d) rotated pairwise by positions (T,) * omega."""
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # never rotate in bf16
        angle = torch.outer(positions.to(wide), self.rope_inv_freq.to(wide))  # (T, d/2)
        c, s = angle.cos(), angle.sin()
        pairs = x.to(wide).unflatten(-1, (self.head_dim // 2, 2))  # (..., d/2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # (B, n, T, d)

    def _attend(self, q, k, v, allowed):
        """q (B,H,Tq,d); k, v (B,Hkv,Tk,d); allowed (Tq,Tk) True where j may be read."""
        group = self.n_heads // self.n_kv_heads
        B, _, Tk, d = k.shape
        # Head h = kv * group + g reads kv head h // group.
        k = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(B, self.n_heads, Tk, d)
        v = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(B, self.n_heads, Tk, d)
        logits = q @ k.transpose(-1, -2) * (1.0 / d ** 0.5)
        logits = torch.where(allowed, logits, float("-inf"))
        return F.softmax(logits, dim=-1) @ v  # (B, H, Tq, d)

    def _block(self, x, positions_q, kv_source):
        """Shared body: kv_source(k, v) returns the keys/values the queries read."""
        B, T, D = x.shape
        h = self.ln1(x)
        q = self._heads(self.q_proj(h), self.n_heads)
        k = self._heads(self.k_proj(h), self.n_kv_heads)
        v = self._heads(self.v_proj(h), self.n_kv_heads)
        if self.use_rope:
            q = self._rotate(q, positions_q)
            k = self._rotate(k, positions_q)
        k_all, v_all, positions_k = kv_source(k, v)
        allowed = positions_k[None, :] <= positions_q[:, None]
        attn = self._attend(q, k_all, v_all, allowed).transpose(1, 2).reshape(B, T, D)
        x = x + self.o_proj(attn)
        return x + self.W2(F.gelu(self.W1(self.ln2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self._block(x, positions, lambda k, v: (k, v, positions))

    # ---------------------------------------------------- incremental decoding

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        """Rotated keys and values, (B, Hkv, L, d); grows when full."""
        device = self.q_proj.weight.device if device is None else device
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        shape = (int(batch_size), self.n_kv_heads, int(max_len or 0), self.head_dim)
        return {"t": 0, "k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def prefill(self, x: torch.Tensor, cache: dict):
        """x (B, T, D) -> (y, cache); continues whatever the cache holds."""
        t0 = int(cache["t"])
        t1 = t0 + x.shape[1]
        if cache["k"].shape[2] < t1:
            grow = max(t1 - cache["k"].shape[2], cache["k"].shape[2])
            for name in ("k", "v"):
                old = cache[name]
                cache[name] = torch.cat([old, old.new_zeros(*old.shape[:2], grow, old.shape[3])], dim=2)

        def from_cache(k, v):
            cache["k"][:, :, t0:t1] = k
            cache["v"][:, :, t0:t1] = v
            return cache["k"][:, :, :t1], cache["v"][:, :, :t1], torch.arange(t1, device=x.device)

        y = self._block(x, torch.arange(t0, t1, device=x.device), from_cache)
        cache["t"] = t1
        return y, cache
