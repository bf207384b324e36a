"""Decode-step kernel for the feedback op's read of its cache (flash-decoding style split-K).

For one new position at t (after t cached positions), per batch row b:

    mixed[b] = softmax_{j < t}(q_b[b] . k_b[b, j] * scale) @ s[b, :t]

``feedback_decode_partial`` runs one program per (batch row, chunk of ``chunk_for(W)`` cached positions): it reads its
chunk of keys and solved states once (in their cache dtype, accumulating in fp32) and writes the chunk's
max logit, sum of exponentials and weighted state sum. ``feedback_decode_combine`` merges the chunks per
batch row (log-sum-exp rescaling). The caches are read in place through their strides (capacity max_len;
only the first t positions are touched). The step then is s_t = f_t + gamma_t * mixed (serving.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



def chunk_for(width: int) -> int:
    """Cached positions per program: a [chunk, width] fp32 tile of about 8K elements (64 per thread at 4 warps)."""
    return max(16, min(64, 8192 // triton.next_power_of_2(width)))


@triton.jit
def feedback_decode_partial(q_ptr, kb_ptr, s_ptr, pm_ptr, pl_ptr, pa_ptr, t, stride_kb_b, stride_kb_l,
                            stride_s_b, stride_s_l, scale, W: tl.constexpr, BW: tl.constexpr,
                            CHUNK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    cols = tl.arange(0, BW)
    row_ok = rows < t
    col_ok = cols < W
    both = row_ok[:, None] & col_ok[None, :]
    q = tl.load(q_ptr + b * W + cols, mask=col_ok, other=0.0).to(tl.float32)
    kb = tl.load(kb_ptr + b * stride_kb_b + rows[:, None] * stride_kb_l + cols[None, :], mask=both,
                 other=0.0).to(tl.float32)
    logits = tl.sum(kb * q[None, :], axis=1) * scale
    logits = tl.where(row_ok, logits, -1.0e30)
    m = tl.max(logits, axis=0)
    p = tl.where(row_ok, tl.exp(logits - m), 0.0)
    s = tl.load(s_ptr + b * stride_s_b + rows[:, None] * stride_s_l + cols[None, :], mask=both,
                other=0.0).to(tl.float32)
    acc = tl.sum(p[:, None] * s, axis=0)
    tl.store(pm_ptr + b * nc + c, m)
    tl.store(pl_ptr + b * nc + c, tl.sum(p, axis=0))
    tl.store(pa_ptr + (b * nc + c) * W + cols, acc, mask=col_ok)


@triton.jit
def feedback_decode_combine(pm_ptr, pl_ptr, pa_ptr, out_ptr, nc, W: tl.constexpr, BW: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.arange(0, BW)
    col_ok = cols < W
    m = tl.load(pm_ptr + b * nc)
    for c in range(1, nc):
        m = tl.maximum(m, tl.load(pm_ptr + b * nc + c))
    total = tl.load(pl_ptr + b * nc) * 0.0
    acc = tl.zeros([BW], dtype=tl.float32)
    for c in range(0, nc):
        w = tl.exp(tl.load(pm_ptr + b * nc + c) - m)
        total += tl.load(pl_ptr + b * nc + c) * w
        acc += tl.load(pa_ptr + (b * nc + c) * W + cols, mask=col_ok, other=0.0) * w
    tl.store(out_ptr + b * W + cols, acc / total, mask=col_ok)


def feedback_decode(q_b: torch.Tensor, k_b_cache: torch.Tensor, s_cache: torch.Tensor, t: int,
                    scale: float) -> torch.Tensor:
    """q_b [B, W]; caches [B, L, W] (L >= t >= 1, last dim contiguous) -> mixed [B, W] in float32."""
    B, W = q_b.shape
    if t < 1 or k_b_cache.shape[1] < t or s_cache.shape[1] < t:
        raise ValueError(f"feedback_decode: t={t} must be in 1..{min(k_b_cache.shape[1], s_cache.shape[1])}")
    if k_b_cache.stride(2) != 1 or s_cache.stride(2) != 1:
        raise ValueError("feedback_decode: the caches' last dim must be contiguous")
    q = q_b.contiguous()
    chunk = chunk_for(W)
    nc = triton.cdiv(t, chunk)
    f32 = dict(device=q.device, dtype=torch.float32)
    pm, pl, pa = torch.empty(B, nc, **f32), torch.empty(B, nc, **f32), torch.empty(B, nc, W, **f32)
    out = torch.empty(B, W, **f32)
    BW = triton.next_power_of_2(W)
    feedback_decode_partial[(B, nc)](q, k_b_cache, s_cache, pm, pl, pa, t, k_b_cache.stride(0), k_b_cache.stride(1),
                                     s_cache.stride(0), s_cache.stride(1), float(scale), W=W, BW=BW, CHUNK=chunk)
    feedback_decode_combine[(B,)](pm, pl, pa, out, nc, W=W, BW=BW)
    return out


def aot_compile(arch: int = 90, W: int = 512) -> list:
    """Compile both kernels for ``GPUTarget("cuda", arch, 32)`` with no GPU present; -> one summary per kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    BW = triton.next_power_of_2(W)
    jobs = [
        (feedback_decode_partial,
         {"q_ptr": "*fp32", "kb_ptr": "*bf16", "s_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32",
          "pa_ptr": "*fp32", "t": "i32", "stride_kb_b": "i32", "stride_kb_l": "i32", "stride_s_b": "i32", "stride_s_l": "i32",
          "scale": "fp32", "W": "constexpr", "BW": "constexpr", "CHUNK": "constexpr"},
         {"W": W, "BW": BW, "CHUNK": chunk_for(W)}),
        (feedback_decode_combine,
         {"pm_ptr": "*fp32", "pl_ptr": "*fp32", "pa_ptr": "*fp32", "out_ptr": "*fp32", "nc": "i32",
          "W": "constexpr", "BW": "constexpr"},
         {"W": W, "BW": BW}),
    ]
    out = []
    for fn, signature, constexprs in jobs:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        out.append({"kernel": fn.__name__, "ptx_lines": compiled.asm["ptx"].count("\n"),
                    "cubin_bytes": len(compiled.asm.get("cubin", b""))})
    return out


if __name__ == "__main__":  # python -m sessa_compiler.backends.triton.decode  (TRITON_INTERPRET unset)
    import json

    for record in aot_compile():
        print(json.dumps(record))
