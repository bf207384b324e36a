"""Pieces the reference layers share: the head-count checks and decode_step by way of prefill."""
from __future__ import annotations

import torch


def resolve_heads(D: int, n_heads: int, n_kv_heads: int | None) -> int:
    """Check D / n_heads / n_kv_heads for (grouped-query) attention; -> n_kv_heads (default n_heads)."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_heads <= 0 or D % n_heads != 0:
        raise ValueError(f"D={D} must be divisible by n_heads={n_heads} (n_heads >= 1)")
    if n_kv_heads <= 0 or n_kv_heads > n_heads or n_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} "
            "(1 <= n_kv_heads <= n_heads) for grouped-query attention"
        )
    return n_kv_heads


class DecodeByPrefill:
    """decode_step for a layer whose prefill(x (B, T, D), cache) -> (y, cache) extends the cache."""

    def decode_step(self, x_t: torch.Tensor, cache: dict):
        """x_t (B, D) or (B, 1, D) -> (y_t of the same rank, cache)."""
        if x_t.dim() not in (2, 3) or (x_t.dim() == 3 and x_t.shape[1] != 1):
            raise ValueError(f"decode_step expects (B, D) or (B, 1, D), got {tuple(x_t.shape)}")
        x3 = x_t if x_t.dim() == 3 else x_t[:, None, :]
        y, cache = self.prefill(x3, cache)
        return (y if x_t.dim() == 3 else y[:, 0]), cache
