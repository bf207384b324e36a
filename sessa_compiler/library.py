"""The core ops as torch.library custom ops, for code that torch.compile, torch.export or autograd sees:

- ``torch.ops.sessa_compiler.attention(q, k, v, inv_freq, scale, causal)``: q [B,T,H,d], k/v [B,T,Hkv,d]
  (GQA: head h reads kv head h // (H/Hkv)); ``inv_freq`` [d/2] applies interleaved RoPE to q and k, None
  does not.
- ``torch.ops.sessa_compiler.feedback(f, q_b, k_b, gamma, scale)``: s[t] = f[t] + gamma[t] *
  softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; f [B,T,D], q_b/k_b [B,T,c], gamma [B,T].
- ``torch.ops.sessa_compiler.selective_scan(u, delta, A, B, C, D)``: the Mamba-1 scan (models/scan_op.py).

Each has a fake kernel (contiguous outputs of the right shape and dtype, as the real kernels return) and
an autograd formula, and passes ``torch.library.opcheck``. The feedback backward is a transposed blocked
solve: it never forms a T x T matrix, only [B, chunk, T] blocks of the weights, so its extra memory is
O(B*T*(D + chunk)) (tests/test_library.py measures it against the dense solve's).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .dtypes import compute_dtype
from .semantics.core import attention_ref, feedback_ref
from .models.scan_op import selective_scan

__all__ = ["attention", "feedback", "selective_scan", "feedback_backward", "FEEDBACK_GRAD_CHUNK"]

FEEDBACK_GRAD_CHUNK = 64  # rows of the weights formed at once by the feedback backward


# -- attention -------------------------------------------------------------------------------------------
@torch.library.custom_op("sessa_compiler::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: Optional[torch.Tensor], scale: float,
              causal: bool) -> torch.Tensor:
    """softmax_{j <= t}(q_t . k_j * scale) @ v with GQA; RoPE on q and k when inv_freq is given (the IR's
    attention op)."""
    return attention_ref(q, k, v, scale, causal, inv_freq).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, inv_freq, scale, causal):
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _attention_setup(ctx, inputs, output):
    q, k, v, inv_freq, scale, causal = inputs
    ctx.scale, ctx.causal, ctx.rope = scale, causal, inv_freq is not None
    ctx.save_for_backward(q, k, v, inv_freq if inv_freq is not None else q.new_empty(0))


def _attention_backward(ctx, grad):
    q, k, v, inv_freq = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        out = attention_ref(*leaves, ctx.scale, ctx.causal, inv_freq if ctx.rope else None)
    dq, dk, dv = torch.autograd.grad(out, leaves, grad)
    return dq, dk, dv, None, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


# -- feedback ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sessa_compiler::feedback", mutates_args=())
def feedback(f: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """s[t] = f[t] + gamma[t] * softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; s[0] = f[0] (the IR's feedback).
    torch.onnx.export translates it with sessa_compiler.export.onnx_translation.translation_table()."""
    return feedback_ref(f, q_b, k_b, gamma, scale).contiguous()


@feedback.register_fake
def _feedback_fake(f, q_b, k_b, gamma, scale):
    return f.new_empty(f.shape)  # contiguous, as the real op returns (empty_like would copy f's strides)


def _weights(q_rows, k_cols, row0: int, scale: float) -> torch.Tensor:
    """alpha[row0 + i, j] = softmax over j < row0 + i of q.k*scale (zero elsewhere; a row with no
    predecessor is all zero): [B, rows, cols] in the compute dtype."""
    rows, cols = q_rows.shape[1], k_cols.shape[1]
    logits = torch.einsum("btc,bsc->bts", q_rows, k_cols) * scale
    i = torch.arange(row0, row0 + rows, device=q_rows.device)[:, None]
    j = torch.arange(cols, device=q_rows.device)[None, :]
    strict = j < i
    logits = logits.masked_fill(~strict, -math.inf)
    logits = torch.where(strict.any(-1, keepdim=True), logits, torch.zeros_like(logits))  # row 0: no NaN
    return torch.softmax(logits, dim=-1) * strict


def feedback_backward(grad_s, s, q_b, k_b, gamma, scale: float, chunk: int = FEEDBACK_GRAD_CHUNK):
    """Gradients (df, dq_b, dk_b, dgamma) of s = (I - diag(gamma) alpha)^-1 f given ds, in the compute dtype.

    df = (I - diag(gamma) alpha)^-T ds by backward substitution over row chunks (last chunk first): each
    chunk solves its diagonal block and pushes its contribution to all earlier rows. Then per chunk, with
    c = alpha @ s: dgamma = df . c, and through the softmax P = gamma * alpha * (df.s^T - dgamma),
    dq_b = scale * P @ k_b, dk_b += scale * P^T @ q_b."""
    cd = compute_dtype(s.dtype)
    ds, s, q, k, g = (t.to(cd) for t in (grad_s, s, q_b, k_b, gamma))
    T = s.shape[1]
    starts = list(range(0, T, chunk))
    acc = ds.clone()      # ds plus the contributions of later rows: [B, T, D]
    df = torch.empty_like(acc)
    eye = None
    for a in reversed(starts):
        b = min(a + chunk, T)
        alpha = _weights(q[:, a:b], k[:, :b], a, scale)           # [B, rows, b]
        ga = g[:, a:b, None] * alpha
        m = -ga[:, :, a:b]                                          # the diagonal block of I - G*alpha, minus I
        if eye is None or eye.shape[0] != b - a:
            eye = torch.eye(b - a, dtype=cd, device=s.device)
        df[:, a:b] = torch.linalg.solve_triangular((eye + m).transpose(1, 2), acc[:, a:b], upper=True,
                                                   unitriangular=True)
        if a:
            acc[:, :a] += ga[:, :, :a].transpose(1, 2) @ df[:, a:b]
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dgamma = torch.empty_like(g)
    for a in starts:
        b = min(a + chunk, T)
        alpha = _weights(q[:, a:b], k[:, :b], a, scale)
        dfa = df[:, a:b]
        c = alpha @ s[:, :b]
        dg = (dfa * c).sum(-1)
        dgamma[:, a:b] = dg
        p = g[:, a:b, None] * alpha * (dfa @ s[:, :b].transpose(1, 2) - dg[..., None])
        dq[:, a:b] = scale * (p @ k[:, :b])
        dk[:, :b] += scale * (p.transpose(1, 2) @ q[:, a:b])
    return df, dq, dk, dgamma


def _feedback_setup(ctx, inputs, output):
    f, q_b, k_b, gamma, scale = inputs
    ctx.scale = scale
    ctx.dtypes = (f.dtype, q_b.dtype, k_b.dtype, gamma.dtype)
    ctx.save_for_backward(output, q_b, k_b, gamma)


def _feedback_backward(ctx, grad):
    s, q_b, k_b, gamma = ctx.saved_tensors
    grads = feedback_backward(grad, s, q_b, k_b, gamma, ctx.scale)
    return (*(x.to(dt) for x, dt in zip(grads, ctx.dtypes)), None)


feedback.register_autograd(_feedback_backward, setup_context=_feedback_setup)
