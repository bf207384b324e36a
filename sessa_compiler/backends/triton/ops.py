"""Generated Triton kernels as ``torch.library.triton_op`` ops, launched through ``wrap_triton``.

- ``torch.ops.sessa_compiler.selective_scan_triton(u, delta, A, B, C, D)``: the Mamba-1 selective scan
  (the same arguments and result as ``torch.ops.sessa_compiler.selective_scan``), one launch of the
  generated ``scan_chunked`` kernel (sequential strategy).
- ``torch.ops.sessa_compiler.attention_triton(q, k, v, inv_freq, scale, causal)``: the arguments and result of
  ``torch.ops.sessa_compiler.attention``. Causal attention launches the generated ``attention_fwd`` kernel
  (after two ``rope_rotate`` launches when ``inv_freq`` is given); non-causal attention, which has no
  kernel, is the reference's torch ops.
- ``torch.ops.sessa_compiler.feedback_triton(f, q_b, k_b, gamma, scale)``: the arguments and result of
  ``torch.ops.sessa_compiler.feedback``. The blocked kernels of backends/triton/feedback.py, through the
  launchers the backend uses (``launch=wrap_triton``): the one-pass kernels of feedback_online.py, per outer
  chunk of rows (a host loop) ``feedback_probs_online``, ``feedback_update_online`` (which also writes the
  rows' lse and the diagonal inverses) and ``feedback_solve_online``; (for 16-bit f) s is a float32
  workspace. float64 runs the reference's torch ops.
  The host loop runs ceil(T / outer chunk) times, so a trace unrolls it for one T.

Gradients: attention and feedback run their backward Triton kernels (backends/triton/attention_bwd.py and
feedback_bwd.py, launched through ``wrap_triton``; float64 and non-causal attention take the reference's
formula); the scan runs its reverse-scan kernels (backends/triton/scan_bwd.py) likewise.

A ``triton_op`` is what Inductor can trace into: on CUDA tensors, torch.compile with Inductor sees the
kernel launches themselves instead of an opaque custom op. That has not been run: no GPU was available, and
none of these ops has run on a GPU. What was checked: on CPU tensors each op runs its kernels under Triton's
interpreter and matches its custom op, forward and backward; and AOT autograd, on fake CUDA tensors with the
interpreter off, traces into each op and records its kernel launches (tests/test_triton_ops.py). The same
generated kernels compile ahead of time for sm_90 (tests/test_triton_aot.py; the feedback's at chunks of 64
with outer chunks of 256, as this op picks on a GPU, for bf16 and f32). torch.compile and
``torch.library.opcheck`` cannot run the ops on CPU tensors, because tracing an op runs its body, and the
interpreter then launches the kernel on fake tensors.

Importing this module imports triton (registered on first import, not on ``import sessa_compiler``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from ...ir.dtypes import from_torch
from ...ir import parse
from ...passes.chunk_feedback import FeedbackCost
from ...semantics import SEMANTICS
from ...semantics.core import attention_ref, feedback_ref, feedback_setup_context
from .attention import attention_grid, generate_attention
from .attention_bwd import attention_triton_autograd, attention_triton_setup_context
from .codegen import KERNEL_CACHE, KERNEL_DTYPES
from .feedback_bwd import feedback_triton_autograd
from .feedback import default_outer_chunk, direct_launch
from .feedback_online import generate_online, launch_online
from .scan import generate_scan
from .scan_bwd import scan_backward_triton

__all__ = ["attention_triton", "feedback_triton", "selective_scan_triton"]

_SCAN_CHUNK = 16  # the IR node's chunk size; the sequential strategy walks the time steps one by one anyway


@functools.lru_cache(maxsize=64)
def _scan_kernel(d_inner: int, n_state: int, dtypes: tuple, interpret: bool):
    names = dict(dtypes)
    text = (f"graph s(%u: {names['u']}[B, T, {d_inner}], %dt: {names['delta']}[B, T, {d_inner}], "
            f"%Bm: {names['B']}[B, T, {n_state}], %Cm: {names['C']}[B, T, {n_state}]) {{\n"
            f"  param %A: {names['A']}[{d_inner}, {n_state}]\n"
            f"  param %D: {names['D']}[{d_inner}]\n"
            f"  %y: {names['u']}[B, T, {d_inner}] = scan_chunked(%u, %dt, %A, %Bm, %Cm, %D) "
            f"{{chunk_size={_SCAN_CHUNK}}}\n"
            "  return %y\n}")
    node = parse(text).nodes[0]
    return KERNEL_CACHE.load(generate_scan(node, names, interpret, "sequential"), interpret)


@triton_op("sessa_compiler::selective_scan_triton", mutates_args={})
def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: torch.Tensor) -> torch.Tensor:
    """y_t = C_t . h_t + D * u_t with h_t = exp(delta_t * A) h_{t-1} + delta_t * u_t (x) B_t; u/delta [B, T, Din],
    A [Din, N], B/C [B, T, N], D [Din]."""
    batch, T, d_inner = u.shape
    n_state = A.shape[1]
    dtypes = tuple(sorted((k, from_torch(x.dtype).name) for k, x in
                          (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D))))
    kernel = _scan_kernel(d_inner, n_state, dtypes, not u.is_cuda)
    u, delta, B, C = (x if x.stride(-1) == 1 else x.contiguous() for x in (u, delta, B, C))
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    src = kernel.source
    grid = (-(-d_inner // src.tunables["BLOCK_D"]), batch)
    wrap_triton(kernel.fn)[grid](u, delta, A.contiguous(), B, C, D.contiguous(), out, T, *u.stride()[:2],
                                 *delta.stride()[:2], *B.stride()[:2], *C.stride()[:2], *out.stride()[:2],
                                 num_warps=src.num_warps, num_stages=src.num_stages)
    return out


def _scan_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scan_backward(ctx, grad):
    """The reverse-scan kernels (backends/triton/scan_bwd.py, through ``wrap_triton``) when u, delta, B, C and the
    gradient share a kernel dtype; otherwise the torch.ops.sessa_compiler.selective_scan formula's gradients,
    recomputed from the saved inputs."""
    u, delta, A, B, C, D = ctx.saved_tensors
    if len({x.dtype for x in (u, delta, B, C, grad)}) == 1 and from_torch(u.dtype).name in KERNEL_DTYPES \
            and A.is_floating_point() and D.is_floating_point() and A.dtype != torch.float64:
        grads = scan_backward_triton(grad, u, delta, A, B, C, D, launch=wrap_triton)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
    leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
    wanted = [t for t in leaves if t.requires_grad]
    with torch.enable_grad():
        out = torch.ops.sessa_compiler.selective_scan(*leaves)
    got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return tuple(next(got) if t.requires_grad else None for t in leaves)


selective_scan_triton.register_autograd(_scan_backward, setup_context=_scan_setup)


@functools.lru_cache(maxsize=64)
def _attention_kernel(H: int, Hkv: int, d: int, dv: int, scale: float, rope: bool, dtypes: tuple, interpret: bool,
                      key_padding: bool = False):
    """The attention forward kernel (attention.py) for these sizes and dtypes; with ``key_padding`` the variant
    that reads a key-padding mask (empty_rows="mean")."""
    names = dict(dtypes)
    inv = ", %inv" if rope else (", None" if key_padding else "")
    mask, kp = (", %m", ', key_padding=True, empty_rows="mean"') if key_padding else ("", "")
    text = (f"graph a(%q: {names['q']}[B, T, {H}, {d}], %k: {names['k']}[B, T, {Hkv}, {d}], "
            f"%v: {names['v']}[B, T, {Hkv}, {dv}]{', %m: i32[B, T]' if key_padding else ''}) {{\n"
            f"  param %inv: {names.get('inv_freq', 'f32')}[{max(d // 2, 1)}]\n"
            f"  %o: {names['q']}[B, T, {H}, {dv}] = attention(%q, %k, %v{inv}{mask}) "
            f"{{scale={scale!r}, causal=True, rope={rope}{kp}}}\n"
            "  return %o\n}")
    node = parse(text).nodes[0]
    return KERNEL_CACHE.load(generate_attention(node, names, interpret), interpret)


_ROTATED = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@triton_op("sessa_compiler::attention_triton", mutates_args={})
def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: Optional[torch.Tensor],
                     scale: float, causal: bool) -> torch.Tensor:
    """softmax_{j <= t}(q_t . k_j * scale) @ v with GQA, RoPE on q and k when inv_freq is given; q [B,T,H,d],
    k/v [B,T,Hkv,d]."""
    if not causal:
        return attention_ref(q, k, v, scale, causal, inv_freq).contiguous()
    B, T, H, d = q.shape
    rope = inv_freq is not None
    named = [("q", q), ("k", k), ("v", v)] + ([("inv_freq", inv_freq)] if rope else [])
    dtypes = tuple(sorted((n, from_torch(x.dtype).name) for n, x in named))
    kernel = _attention_kernel(H, k.shape[2], d, v.shape[3], float(scale), rope, dtypes, not q.is_cuda)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    src = kernel.source
    if rope:  # rotate q (times the scale) and k once, as launch_attention does
        rot = kernel.parts["rope_rotate"]
        rotated = []
        for x, mult in ((q, float(scale)), (k, 1.0)):
            y = torch.empty(x.shape, dtype=_ROTATED[rot.source.specialisation["rotated_dtype"]], device=x.device)
            wrap_triton(rot.fn)[(-(-T // rot.source.tunables["BLOCK_M"]), B * x.shape[2])](
                x, inv_freq.contiguous(), y, T, x.shape[2], mult, *x.stride()[:3],
                num_warps=rot.source.num_warps, num_stages=rot.source.num_stages)
            rotated.append(y)
        q, k = rotated
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)   # [B, H, T]: see launch_attention
    wrap_triton(kernel.fn)[attention_grid(kernel, B, T)](
        q, k, v, out, lse, T, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        num_warps=src.num_warps, num_stages=src.num_stages)
    return out


attention_triton.register_autograd(attention_triton_autograd, setup_context=attention_triton_setup_context)


# The feedback's blocked kernels: None takes the chunk-feedback pass's cost model (at its assumed T, since one kernel
# serves every T) and the generator's outer chunk (256 rows on a GPU, two inner blocks under the interpreter).
# Tests set smaller ones so that short sequences cross inner and outer chunks.
FEEDBACK_CHUNK_SIZE: Optional[int] = None
FEEDBACK_OUTER_CHUNK: Optional[int] = None


@functools.lru_cache(maxsize=64)
def _feedback_kernel(d_qk: int, d_v: int, scale: float, chunk: int, outer: Optional[int], dtypes: tuple,
                     interpret: bool):
    """The one-pass solve kernels (feedback_online.py) of the feedback_chunked node the chunk-feedback pass writes."""
    names = dict(dtypes)
    text = (f"graph fb(%f: {names['f']}[B, T, {d_v}], %q: {names['q_b']}[B, T, {d_qk}], "
            f"%k: {names['k_b']}[B, T, {d_qk}], %g: {names['gamma']}[B, T]) {{\n"
            f"  %lse: f32[B, T] = feedback_lse(%q, %k) {{scale={scale!r}}}\n"
            f"  %dinv: f32[B, ceiling(T/{chunk}), {chunk}, {chunk}] = feedback_diag_inverse(%q, %k, %g, %lse) "
            f"{{scale={scale!r}, chunk_size={chunk}}}\n"
            f"  %s: {names['f']}[B, T, {d_v}] = feedback_chunked(%f, %q, %k, %g, %lse, %dinv) "
            f"{{scale={scale!r}, chunk_size={chunk}}}\n"
            "  return %s\n}")
    solve_node = parse(text).nodes[2]
    return KERNEL_CACHE.load(generate_online(solve_node, names, interpret, outer_chunk=outer), interpret)


@triton_op("sessa_compiler::feedback_triton", mutates_args={})
def feedback_triton(f: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, gamma: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """s[t] = f[t] + gamma[t] * softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; f [B,T,D], q_b/k_b [B,T,c],
    gamma [B,T]; the result has f's dtype. Launches, per outer chunk of rows, feedback_probs_online,
    feedback_update_online and feedback_solve_online; dtypes without kernels (float64) run the reference."""
    named = (("f", f), ("q_b", q_b), ("k_b", k_b), ("gamma", gamma))
    if not all(from_torch(x.dtype).name in KERNEL_DTYPES for _, x in named):
        return feedback_ref(f, q_b, k_b, gamma, scale).contiguous()
    if f.numel() == 0:
        return torch.empty(f.shape, dtype=f.dtype, device=f.device)
    return feedback_forward(f, q_b, k_b, gamma, scale, launch=wrap_triton)[0]


def feedback_forward(f, q_b, k_b, gamma, scale: float, launch=None):
    """(s, lse) of the blocked feedback kernels (f, q_b, k_b and gamma in kernel dtypes, T >= 1): the solved s in
    f's dtype and the row log-sum-exps float32 [B, T] (made by the one-pass kernels), which feedback_backward_triton reuses.
    ``launch`` wraps each kernel (``wrap_triton`` inside the triton_op; None launches it directly)."""
    launch = launch or direct_launch
    if q_b.dtype != k_b.dtype:   # the kernels read both through one pointer type: compute both in float32
        q_b, k_b = q_b.float(), k_b.float()
    dtypes = tuple(sorted((n, from_torch(x.dtype).name) for n, x in (("f", f), ("q_b", q_b), ("k_b", k_b),
                                                                        ("gamma", gamma))))
    interpret = not f.is_cuda
    d_qk, d_v = q_b.shape[2], f.shape[2]
    cost = FeedbackCost()
    chunk = FEEDBACK_CHUNK_SIZE or cost.choose(cost.assumed_T, d_qk, d_v)[0]
    outer = FEEDBACK_OUTER_CHUNK or default_outer_chunk(chunk, interpret)
    kernel = _feedback_kernel(d_qk, d_v, float(scale), chunk, outer, dtypes, interpret)
    f, q_b, k_b = (x if x.stride(-1) == 1 else x.contiguous() for x in (f, q_b, k_b))
    return launch_online(kernel, f, q_b, k_b, gamma, launch=launch)


feedback_triton.register_autograd(feedback_triton_autograd, setup_context=feedback_setup_context)


# The IR's core ops as these triton_ops, with the operands and attributes of semantics.SEMANTICS: what
# torch.compile of a module compiled for Triton records on CUDA tensors (api.CompiledModule._export_call).
CORE_OP_IMPLS = {
    "attention": lambda q, k, v, inv_freq=None, mask=None, *, scale, causal, rope=False, key_padding=False,
    empty_rows="mean", empty_grad=True: (
        attention_triton(q, k, v, inv_freq if rope else None, scale, causal) if not key_padding else
        SEMANTICS["attention"](q, k, v, inv_freq, mask, scale=scale, causal=causal, rope=rope, key_padding=True,
                               empty_rows=empty_rows, empty_grad=empty_grad)),   # no custom op takes a mask
    "feedback": lambda f, q_b, k_b, gamma, *, scale: feedback_triton(f, q_b, k_b, gamma, scale),
    "scan": lambda u, delta, A, B, C, D: selective_scan_triton(u, delta, A, B, C, D),
}
