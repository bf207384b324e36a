"""The core ops as torch.library custom ops, for code that torch.compile, torch.export or autograd sees:

- ``torch.ops.sessa_compiler.attention(q, k, v, inv_freq, scale, causal)``: q [B,T,H,d], k/v [B,T,Hkv,d]
  (GQA: head h reads kv head h // (H/Hkv)); ``inv_freq`` [d/2] applies interleaved RoPE to q and k, None
  does not.
- ``torch.ops.sessa_compiler.feedback(f, q_b, k_b, gamma, scale)``: s[t] = f[t] + gamma[t] *
  softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; f [B,T,D], q_b/k_b [B,T,c], gamma [B,T].
- ``torch.ops.sessa_compiler.selective_scan(u, delta, A, B, C, D)``: the Mamba-1 scan (models/scan_op.py).

Each has a fake kernel (contiguous outputs of the right shape and dtype, as the real kernels return) and
an autograd formula, and passes ``torch.library.opcheck``. The attention runs by query blocks both ways:
its backward is FlashAttention-2 style (semantics/backward.py), [B, H, block, T] at a time, never
[B, H, T, T]. The feedback backward is a transposed blocked
solve: it never forms a T x T matrix, only [B, chunk, T] blocks of the weights, so its extra memory is
O(B*T*(D + chunk)) (tests/test_library.py measures it against the dense solve's).
"""
from __future__ import annotations

from typing import Optional

import torch

from .semantics.backward import attention_autograd, attention_lse, attention_setup_context
from .semantics.core import (FEEDBACK_GRAD_CHUNK, feedback_autograd, feedback_backward, feedback_ref,
                             feedback_setup_context)
from .models.scan_op import selective_scan

__all__ = ["attention", "feedback", "selective_scan", "feedback_backward", "FEEDBACK_GRAD_CHUNK"]



# -- attention -------------------------------------------------------------------------------------------
@torch.library.custom_op("sessa_compiler::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: Optional[torch.Tensor], scale: float,
              causal: bool) -> torch.Tensor:
    """softmax_{j <= t}(q_t . k_j * scale) @ v with GQA; RoPE on q and k when inv_freq is given (the IR's
    attention op), by query blocks (semantics/backward.py attention_lse: no [B, H, T, T] tensor)."""
    return attention_lse(q, k, v, scale, causal, inv_freq)[0].contiguous()


@attention.register_fake
def _attention_fake(q, k, v, inv_freq, scale, causal):
    return q.new_empty((*q.shape[:3], v.shape[3]))


attention.register_autograd(attention_autograd, setup_context=attention_setup_context)


# -- feedback ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sessa_compiler::feedback", mutates_args=())
def feedback(f: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """s[t] = f[t] + gamma[t] * softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; s[0] = f[0] (the IR's feedback).
    torch.onnx.export translates it with sessa_compiler.export.onnx_translation.translation_table()."""
    return feedback_ref(f, q_b, k_b, gamma, scale).contiguous()


@feedback.register_fake
def _feedback_fake(f, q_b, k_b, gamma, scale):
    return f.new_empty(f.shape)  # contiguous, as the real op returns (empty_like would copy f's strides)


feedback.register_autograd(feedback_autograd, setup_context=feedback_setup_context)
