"""The TVM backend's training path (backends/training.py): in a call that needs gradients each core op is one
autograd.Function whose forward is the op's generated TVM kernel and whose backward is a generated TVM
backward kernel where there is one:

    op          forward kernel (saves)                                backward
    attention   kernels/attention_lse.py (q, k, v, inv_freq, out, lse) kernels/attention_bwd.py
    feedback    kernels/feedback.py (s, q_b, k_b, gamma)              kernels/feedback_bwd.py
    scan        kernels/scan.py (its operands)                        semantics.backward's blocked torch
    tri_solve   kernels/tri_solve.py (A, x)                           semantics.backward's blocked torch

The attention's lse (row log-sum-exps of the scaled logits, [B, H, T] in the kernel dtype) is written by the
forward kernel itself (kernels/attention_lse.py: kernels/attention.py with one more output), so the backward
needs no extra pass over the logits. Attention with a key-padding mask (key_padding=True, empty_rows="mean":
the only masked form with a TVM kernel) runs the masked variants of both kernels, which read the mask and
save it. Cases the backward kernel does not
cover (non-causal, a value width other than the query's, operands of mixed dtypes or not float, empty
tensors; for the feedback: q_b / k_b narrower or wider than s, mixed dtypes) run semantics.backward's blocked
torch backward.

Importing this module registers the backward kernels (``register_backward("tvm", ...)``).
"""
from __future__ import annotations

import os

import torch

from ...semantics.backward import BACKWARD
from ..training import register_backward
from .build import ALIGN, KernelSpec, aligned_empty, attention_bwd_spec, build, feedback_bwd_spec, lanes_for
from .target import resolve_target

_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "float32", torch.float16: "float32"}
_TORCH = {"float32": torch.float32, "float64": torch.float64}
_TARGET: list = []


def _target():
    if not _TARGET:
        target = resolve_target(None)
        _TARGET.append((target, lanes_for(target)))
    return _TARGET[0]


def _arg(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t detached, in ``dtype``, contiguous and 64-byte aligned (what the generated code assumes)."""
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous() or t.data_ptr() % ALIGN:
        out = aligned_empty(tuple(t.shape), dtype)
        out.copy_(t)
        t = out
    return t


def attention_forward_kernel(spec: KernelSpec, target, stats=None):
    """kernel(q, k, v[, inv_freq[, mask]]) -> (out, lse) for an attention node lowered to ``spec``: the forward
    kernel that also writes its row log-sum-exps (kernels/attention_lse.py, same schedule), so the backward needs
    no extra pass over the logits; with key_padding in the spec, the masked variant reading operand 4 (the mask,
    nonzero = keep; operand 3 is inv_freq or None). ``out`` in q's dtype, ``lse`` [B, H, T] in the kernel dtype."""
    kernel = build(KernelSpec("attention_lse", spec.static, spec.dtype, spec.schedule), target)
    dt = _TORCH[spec.dtype]
    p = spec.params
    H, d, rope, masked = p["n_heads"], p["head_dim"], p["rope"], p.get("key_padding", False)

    def run(q, k, v, *rest):
        inv = _arg(rest[0], dt) if rope else torch.zeros(max(d // 2, 1), dtype=dt)
        args = [_arg(x, dt) for x in (q, k, v)] + [inv]
        if masked:
            args.append(_mask_arg(rest[1], dt))
        out = aligned_empty(tuple(q.shape), dt)
        lse = aligned_empty((q.shape[0], H, q.shape[1]), dt)
        kernel(*args, out, lse)
        if stats is not None:
            stats["kernel_calls"] += 1
        return (out if q.dtype == dt else out.to(q.dtype)), lse
    return run


def _mask_arg(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A key-padding mask (any dtype, nonzero = keep) as the kernels read it: 1/0 in the kernel dtype."""
    return _arg((mask.detach() != 0).to(dtype), dtype)


def attention_bwd_applies(q, k, v, inv_freq, out, causal: bool) -> bool:
    """The TVM attention backward kernel covers this case: causal, q/k/v/out of one float dtype, value width
    equal to the query width, whole GQA groups, a non-empty batch and sequence."""
    return (causal and q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES and v.shape[3] == q.shape[3]
            and q.shape[2] % k.shape[2] == 0 and q.shape[0] > 0 and q.shape[1] > 0
            and (inv_freq is None or inv_freq.dtype.is_floating_point))


def fused_dq_pays(batch: int, n_kv_heads: int, threads: int | None = None) -> bool:
    """Whether the attention backward runs its one-pass variant (dQ accumulated by the dK/dV pass, 5 tile products
    per block pair instead of 7): its tasks are (batch row, kv head) pairs, so it needs enough of them to keep
    the runtime's threads busy (two per thread, or one thread)."""
    threads = threads or int(os.environ.get("TVM_NUM_THREADS", "1") or 1)
    return threads == 1 or batch * n_kv_heads >= 2 * threads


def attention_backward_tvm(grad, q, k, v, inv_freq, out, lse, scale: float, causal: bool = True, schedule=None,
                           mask=None, fused_dq: bool | None = None):
    """(dq, dk, dv) of the causal attention from the forward's output and lse, by the generated TVM kernel
    (kernels/attention_bwd.py), in the kernel dtype (float32, or float64 for float64 operands). ``mask`` [B, T]
    (nonzero = keep): the key-padding mask with empty_rows="mean" (the masked kernel; lse as the masked forward
    wrote it, any value on rows that see no key). ``fused_dq``: the one-pass variant (default: ``fused_dq_pays``)."""
    name = _DTYPES[q.dtype]
    dt = _TORCH[name]
    target, lanes = _target()
    H, Hkv, d = q.shape[2], k.shape[2], q.shape[3]
    rope = inv_freq is not None
    if fused_dq is None:
        fused_dq = fused_dq_pays(q.shape[0], Hkv)
    kernel = build(attention_bwd_spec(H, Hkv, d, float(scale), rope, name, schedule, lanes,
                                      key_padding=mask is not None, fused_dq=fused_dq), target)
    inv = _arg(inv_freq, dt) if rope else torch.zeros(max(d // 2, 1), dtype=dt)
    args = [_arg(x, dt) for x in (q, k, v)] + [inv] + ([_mask_arg(mask, dt)] if mask is not None else []) \
        + [_arg(x, dt) for x in (out, grad, lse)]
    outs = [aligned_empty(tuple(x.shape), dt) for x in (q, k, v)]
    kernel(*args, *outs)
    return tuple(outs)


def _attention_bwd(grad, saved, attrs):
    q, k, v, inv_freq, out, lse, mask = saved
    masked_ok = mask is None or (attrs.get("empty_rows", "mean") == "mean" and attrs.get("empty_grad", True)
                                 and tuple(mask.shape) == tuple(q.shape[:2]))
    if masked_ok and attention_bwd_applies(q, k, v, inv_freq, out, attrs["causal"]):
        return attention_backward_tvm(grad, q, k, v, inv_freq, out, lse, attrs["scale"], attrs["causal"], mask=mask)
    return BACKWARD["attention"][1](grad, saved, attrs)


def feedback_bwd_applies(s, q_b, k_b, gamma) -> bool:
    """The TVM feedback backward kernel covers this case: s, q_b, k_b, gamma of one float dtype, q_b / k_b as
    wide as s (the forward kernel's layout), a non-empty batch and sequence."""
    return (s.dtype == q_b.dtype == k_b.dtype == gamma.dtype and s.dtype in _DTYPES and s.dim() == 3
            and q_b.shape == s.shape == k_b.shape and s.shape[0] > 0 and s.shape[1] > 0)


def feedback_backward_tvm(grad, s, q_b, k_b, gamma, scale: float, schedule=None):
    """(df, dq_b, dk_b, dgamma) of the feedback from its output s, by the generated TVM kernel
    (kernels/feedback_bwd.py), in the kernel dtype."""
    name = _DTYPES[s.dtype]
    dt = _TORCH[name]
    target, lanes = _target()
    kernel = build(feedback_bwd_spec(s.shape[2], float(scale), name, schedule, lanes), target)
    args = [_arg(x, dt) for x in (grad, s, q_b, k_b, gamma)]
    outs = [aligned_empty(tuple(x.shape), dt) for x in (s, q_b, k_b, gamma)]
    kernel(*args, *outs)
    return tuple(outs)


def _feedback_bwd(grad, saved, attrs):
    s, q_b, k_b, gamma = saved
    if feedback_bwd_applies(s, q_b, k_b, gamma):
        return feedback_backward_tvm(grad, s, q_b, k_b, gamma, attrs["scale"])
    return BACKWARD["feedback"][1](grad, saved, attrs)


register_backward("tvm", "attention", backward=_attention_bwd)
register_backward("tvm", "feedback", backward=_feedback_bwd)

__all__ = ["attention_backward_tvm", "attention_bwd_applies", "attention_forward_kernel", "feedback_backward_tvm",
           "feedback_bwd_applies", "fused_dq_pays"]
