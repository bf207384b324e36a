"""The Triton backend's training path (backends/training.py): in a call that needs gradients each core op is one
autograd.Function whose forward is a Triton forward kernel and whose backward is a Triton backward kernel.

    op          forward kernel (saves)                          backward kernel
    attention   attention_fwd (its row lse, float32 [B, H, T])  attention_backward_triton(..., lse=saved lse)
    feedback    feedback_lse, diag_inverse, solve (s, its lse)  feedback_backward_triton(..., lse=saved lse)
    scan        scan_chunked, sequential (its operands)         scan_backward_triton
    tri_solve   semantics' torch forward                        tri_solve.py's kernels on the transposed system
                                                                (db = A^-T g), dA = -db x^T by torch

Attention with a key-padding mask (key_padding=True, empty_rows="mean") trains on the masked variants of the same
kernels: attention_fwd reading the mask (its lse saved, the mask saved beside it) and the backward kernels reading
it (attention_bwd.py). With empty_rows="nan" (rows that see no key are NaN) it trains on the blocked torch forward
and backward of semantics/backward.py (counted as a torch forward in the stats). The same fallbacks as the triton_ops of ops.py: a case without kernels (float64, non-causal attention, operands
of mixed dtypes, head widths past the backward's) runs the blocked torch forward of backends/training.py and
semantics.backward's blocked backward; never the dense T x T reference of semantics/core.py.

Importing this module registers the backward kernels (``register_backward("triton", ...)``).
"""
from __future__ import annotations

import functools

import torch

from ...ir.dtypes import from_torch
from ...semantics.backward import BACKWARD, tri_solve_weight_grad
from ..training import _torch_forward, register_backward
from .attention import launch_attention
from .attention_bwd import MAX_WIDTH as ATTENTION_BWD_WIDTH, attention_backward_triton
from .codegen import KERNEL_DTYPES
from .feedback_bwd import feedback_backward_triton
from .ops import _attention_kernel, _scan_kernel, feedback_forward
from .scan import launch_scan
from .scan_bwd import scan_backward_triton
from .tri_solve import generate_tri_solve, launch_tri_solve


def _kernel_dtype(*tensors) -> str | None:
    """The one kernel dtype name these tensors share, else None."""
    names = {from_torch(x.dtype).name for x in tensors}
    return names.pop() if len(names) == 1 and names <= set(KERNEL_DTYPES) else None


def _unit(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# -- attention ---------------------------------------------------------------------------------------------------
def _attention_on_kernels(q, k, v, inv_freq, causal: bool) -> bool:
    """The Triton forward and backward kernels apply: causal, q, k, v in one kernel dtype, widths the backward
    holds, whole query groups (GQA), inv_freq (RoPE) in a kernel dtype."""
    return (causal and _kernel_dtype(q, k, v) is not None and max(q.shape[3], v.shape[3]) <= ATTENTION_BWD_WIDTH
            and q.shape[2] % k.shape[2] == 0 and (inv_freq is None or _kernel_dtype(inv_freq) is not None))


def _mask_on_kernels(attrs: dict) -> bool:
    """No key-padding mask, or one whose rows without a visible key give the mean of v (empty_rows="mean"): the
    case the masked kernels cover."""
    return not attrs.get("key_padding", False) or (attrs.get("empty_rows", "mean") == "mean"
                                                    and attrs.get("empty_grad", True))


def attention_forward(attrs: dict, stats=None):
    """kernel(q, k, v[, inv_freq[, mask]]) -> (out, lse): attention_fwd with its row log-sum-exps (float32
    [B, H, T], after RoPE: the layout attention_backward_triton reads), the masked variant for a key-padding mask
    (operand 4); the blocked torch forward where no kernel applies."""
    rope, scale, causal = bool(attrs.get("rope", False)), float(attrs["scale"]), bool(attrs["causal"])
    masked = bool(attrs.get("key_padding", False))
    fallback = _torch_forward("attention", attrs)

    def run(q, k, v, *rest):
        inv_freq = rest[0] if rope and rest else None
        mask = rest[1] if masked else None
        if not _mask_on_kernels(attrs) or not _attention_on_kernels(q, k, v, inv_freq, causal) \
                or q.shape[1] == 0 or q.shape[0] == 0 or (masked and tuple(mask.shape) != tuple(q.shape[:2])):
            _count(stats, "attention", False)
            return fallback(q, k, v, *rest)
        named = [("q", q), ("k", k), ("v", v)] + ([("inv_freq", inv_freq)] if rope else [])
        dtypes = tuple(sorted((n, from_torch(x.dtype).name) for n, x in named))
        kernel = _attention_kernel(q.shape[2], k.shape[2], q.shape[3], v.shape[3], scale, rope, dtypes,
                                   not q.is_cuda, masked)
        _count(stats, "attention", True)
        return launch_attention(kernel, _unit(q), _unit(k), _unit(v),
                                inv_freq.contiguous() if rope else None, return_lse=True, mask=mask)
    return run


def attention_backward(grad, saved, attrs):
    q, k, v, inv_freq, out, lse, mask = saved
    if (mask is None or _mask_on_kernels(attrs)) and _attention_on_kernels(q, k, v, inv_freq, attrs["causal"]) \
            and out.dtype == q.dtype and lse.dtype == torch.float32 and lse.is_contiguous():
        return attention_backward_triton(q, k, v, out, grad.to(out.dtype), attrs["scale"], inv_freq, lse, mask=mask)
    return BACKWARD["attention"][1](grad, saved, attrs)


# -- feedback ----------------------------------------------------------------------------------------------------
def _feedback_on_kernels(f, q_b, k_b, gamma) -> bool:
    return all(_kernel_dtype(x) is not None for x in (f, q_b, k_b, gamma))


def feedback_forward_kernel(attrs: dict, stats=None):
    """kernel(f, q_b, k_b, gamma) -> (s, lse): the blocked solve kernels (ops.feedback_forward), returning
    feedback_lse's float32 [B, T] row log-sum-exps for the backward; the blocked torch forward otherwise."""
    scale = float(attrs["scale"])
    fallback = _torch_forward("feedback", attrs)

    def run(f, q_b, k_b, gamma):
        if not _feedback_on_kernels(f, q_b, k_b, gamma) or f.numel() == 0:
            _count(stats, "feedback", False)
            return fallback(f, q_b, k_b, gamma), None
        _count(stats, "feedback", True)
        return feedback_forward(f, q_b, k_b, gamma, scale)
    return run


def feedback_save(operands, out, attrs, lse=None):
    f, q_b, k_b, gamma = operands
    return (out, q_b, k_b, gamma, lse)


def feedback_backward(grad, saved, attrs):
    s, q_b, k_b, gamma, lse = saved
    if lse is None or not _feedback_on_kernels(s, q_b, k_b, gamma):
        return BACKWARD["feedback"][1](grad, (s, q_b, k_b, gamma), attrs)
    if q_b.dtype != k_b.dtype:   # as the forward: both read in float32 (gradients cast back by the caller)
        q_b, k_b = q_b.float(), k_b.float()
    return feedback_backward_triton(grad.to(s.dtype), s, q_b, k_b, gamma, attrs["scale"], lse=lse)


# -- scan --------------------------------------------------------------------------------------------------------
def _scan_on_kernels(u, delta, A, B, C, D) -> bool:
    return (_kernel_dtype(u, delta, B, C) is not None and _kernel_dtype(A) is not None
            and _kernel_dtype(D) is not None)


def scan_forward(attrs: dict, stats=None):
    """kernel(u, delta, A, B, C, D) -> y: the sequential scan_chunked kernel; the torch forward otherwise."""
    fallback = _torch_forward("scan", attrs)

    def run(u, delta, A, B, C, D):
        if not _scan_on_kernels(u, delta, A, B, C, D) or u.numel() == 0:
            _count(stats, "scan", False)
            return fallback(u, delta, A, B, C, D)
        dtypes = tuple(sorted((k, from_torch(x.dtype).name) for k, x in
                              (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D))))
        kernel = _scan_kernel(u.shape[2], A.shape[1], dtypes, not u.is_cuda)
        _count(stats, "scan", True)
        return launch_scan(kernel, *(_unit(x) for x in (u, delta)), A, _unit(B), _unit(C), D)
    return run


def scan_backward(grad, saved, attrs):
    u, delta, A, B, C, D = saved
    if _scan_on_kernels(u, delta, A, B, C, D) and grad.dtype == u.dtype:
        return scan_backward_triton(grad, u, delta, A, B, C, D)
    return BACKWARD["scan"][1](grad, saved, attrs)


# -- tri_solve ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tri_solve_kernel(n: int, upper: bool, unit: bool, interpret: bool):
    """The float32 tri_solve kernels (tri_solve.py) for an ``upper`` / ``unit`` system with n right-hand
    columns."""
    from ...ir import parse
    from .codegen import KERNEL_CACHE

    node = parse(f"""graph t(%A: f32[B, T, T], %b: f32[B, T, {n}]) {{
  %x: f32[B, T, {n}] = tri_solve(%A, %b) {{upper={upper}, unitriangular={unit}}}
  return %x
}}""").nodes[0]
    return KERNEL_CACHE.load(generate_tri_solve(node, {"A": "f32", "b": "f32"}, interpret), interpret)


def tri_solve_transposed(A, grad, upper: bool, unit: bool, out=None):
    """db = A^-T grad by the Triton tri_solve kernels: A^T of a lower system is an upper one (and the other way
    round), solved by the same blocked substitution; float32 (A^T made contiguous: A's own size; 16-bit operands
    upcast). ``out``: a contiguous float32 tensor of grad's shape, or None."""
    At = A.detach().transpose(-1, -2).to(torch.float32).contiguous()
    g = grad.to(torch.float32).contiguous()
    kernel = _tri_solve_kernel(int(g.shape[-1]), not upper, bool(unit), not g.is_cuda)
    return launch_tri_solve(kernel, At, g, out=out)


def _tri_solve_on_kernels(A, x, grad) -> bool:
    """float32 / 16-bit operands of one dtype, a non-empty system, A's leading dims matching grad's last ones."""
    return (A.dtype == x.dtype == grad.dtype and A.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and grad.dim() >= 2 and grad.numel() > 0 and A.dim() <= grad.dim()
            and tuple(A.shape[:-2]) == tuple(grad.shape[grad.dim() - A.dim():-2]))


def tri_solve_backward(grad, saved, attrs):
    """(dA, db) of tri_solve: db by tri_solve_transposed, dA = -db x^T on A's triangle
    (semantics.backward.tri_solve_weight_grad); semantics.backward's where no kernel applies (float64)."""
    A, x = saved
    upper, unit = bool(attrs["upper"]), bool(attrs["unitriangular"])
    if not _tri_solve_on_kernels(A, x, grad):
        return BACKWARD["tri_solve"][1](grad, saved, attrs)
    db = tri_solve_transposed(A, grad, upper, unit)
    return tri_solve_weight_grad(db, A, x, upper, unit), db


def _count(stats, op: str, kernel: bool) -> None:
    if stats is not None:
        stats[f"triton_{'kernel' if kernel else 'torch'}_forward_{op}"] += 1


FORWARDS = {"attention": attention_forward, "feedback": feedback_forward_kernel, "scan": scan_forward}

register_backward("triton", "attention", backward=attention_backward)
register_backward("triton", "feedback", save=feedback_save, backward=feedback_backward)
register_backward("triton", "scan", backward=scan_backward)
register_backward("triton", "tri_solve", backward=tri_solve_backward)

__all__ = ["FORWARDS", "attention_forward", "attention_backward", "feedback_forward_kernel", "feedback_save",
           "feedback_backward", "scan_forward", "scan_backward", "tri_solve_backward", "tri_solve_transposed"]
