"""IR op `attention`'s forward for training: kernels/attention.py's kernel that also writes the row
log-sum-exps of the scaled logits, lse [B, H, T] (read by kernels/attention_bwd.py)."""
from __future__ import annotations

from .attention import attention_kernel


def attention_lse_kernel(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str, sched,
                         key_padding: bool = False):
    """The PrimFunc `attention(q, k, v, inv_freq, out, lse)`; with `key_padding`
    `attention(q, k, v, inv_freq, mask, out, lse)` (a row with no visible key: lse = log T)."""
    return attention_kernel(n_heads, n_kv_heads, head_dim, scale, rope, dtype, sched, key_padding=key_padding,
                            with_lse=True)
