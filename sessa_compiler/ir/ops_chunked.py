"""Blocked forms of the core ops, produced by the chunking passes (passes/chunk_feedback.py,
passes/chunk_scan.py) and consumed by the eager and Triton backends.

``feedback`` becomes three ops; only the last one is sequential over chunks:

    %lse  = feedback_lse(%q_b, %k_b) {scale}                 per-row log-sum-exp over j < t (parallel)
    %dinv = feedback_diag_inverse(%q_b, %k_b, %gamma, %lse) {scale, chunk_size}
                                                             (I - B_cc)^-1 of every diagonal block (parallel)
    %s    = feedback_chunked(%f, %q_b, %k_b, %gamma, %lse, %dinv) {scale, chunk_size}
                                                             blocked forward substitution

with B[t, j] = gamma[t] * exp(q_b[t].k_b[j] * scale - lse[t]) for j < t. Row 0 has no predecessor:
its lse is defined as 0 and it takes no terms. The last chunk is padded with identity rows, so
``dinv`` is [B, ceiling(T/C), C, C]. The accumulation dtype (lse, dinv) is float64 for float64 graphs
and float32 otherwise, as the spec asks.

``scan`` becomes ``scan_chunked`` (same operands, a ``chunk_size``): within a chunk the recurrence is
evaluated in parallel from cumulative decays; only the state h crosses chunk boundaries.
"""
from __future__ import annotations

import sympy

from .dtypes import compute_name
from .ops import CORE, fail, need_eq, register, scan_infer, tin
from .types import DType, TensorType


def accumulation_dtype(dtype: DType) -> DType:
    return DType(compute_name(dtype.name))


def _chunk(node) -> int:
    c = node.attrs["chunk_size"]
    if c < 16 or c & (c - 1):
        fail(node, f"chunk_size must be a power of two >= 16 (tensor-core tiles), got {c}")
    return c


def _qk(node, i=0):
    qb, kb = tin(node, i), tin(node, i + 1)
    for name, t in (("q_b", qb), ("k_b", kb)):
        if t.rank != 3:
            fail(node, f"{name} must be [B, T, width], got {t}")
    need_eq(node, qb.shape[0], kb.shape[0], "batch of k_b")
    need_eq(node, qb.shape[1], kb.shape[1], "sequence length of k_b")
    need_eq(node, qb.shape[2], kb.shape[2], "width of k_b vs q_b")
    return qb, kb


def _row_vector(node, i, what, qb):
    t = tin(node, i)
    if t.rank != 2:
        fail(node, f"{what} must be [B, T], got {t}")
    need_eq(node, t.shape[0], qb.shape[0], f"batch of {what}")
    need_eq(node, t.shape[1], qb.shape[1], f"sequence length of {what}")
    return t


def n_chunks(T, chunk_size: int):
    return sympy.ceiling(sympy.sympify(T) / chunk_size) if not isinstance(T, int) else -(-T // chunk_size)


def feedback_lse_infer(node):
    qb, _ = _qk(node)
    return [TensorType(accumulation_dtype(qb.dtype), qb.shape[:2])]


def feedback_diag_inverse_infer(node):
    qb, _ = _qk(node)
    _row_vector(node, 2, "gamma", qb)
    lse = _row_vector(node, 3, "lse", qb)
    c = _chunk(node)
    return [TensorType(lse.dtype, (qb.shape[0], n_chunks(qb.shape[1], c), c, c))]


def feedback_chunked_infer(node):
    f = tin(node, 0)
    qb, _ = _qk(node, 1)
    if f.rank != 3:
        fail(node, f"f must be [B, T, width], got {f}")
    need_eq(node, f.shape[0], qb.shape[0], "batch of q_b")
    need_eq(node, f.shape[1], qb.shape[1], "sequence length of q_b")
    _row_vector(node, 3, "gamma", qb)
    lse = _row_vector(node, 4, "lse", qb)
    dinv = tin(node, 5)
    c = _chunk(node)
    want = (qb.shape[0], n_chunks(qb.shape[1], c), c, c)
    if dinv.rank != 4 or not all(sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0
                                 for a, b in zip(dinv.shape, want)):
        fail(node, f"diag_inverse must be [B, ceiling(T/{c}), {c}, {c}], got {dinv}")
    if dinv.dtype != lse.dtype:
        fail(node, f"diag_inverse dtype {dinv.dtype} differs from lse dtype {lse.dtype}")
    return [f]


def scan_chunked_infer(node):
    _chunk(node)
    return scan_infer(node)


register("feedback_lse", CORE, (2, 2), {"scale": (True, (float,))}, feedback_lse_infer,
         doc="lse[t] = log sum_{j<t} exp(q_b[t].k_b[j]*scale); lse[0] = 0 (no predecessor); f32 (f64 for f64)")
register("feedback_diag_inverse", CORE, (4, 4), {"scale": (True, (float,)), "chunk_size": (True, (int,))},
         feedback_diag_inverse_infer,
         doc="(I - B_cc)^-1 for every diagonal C x C block of B[t,j] = gamma[t] exp(q_b[t].k_b[j]*scale - lse[t]), "
             "j < t; padded rows of the last chunk are identity")
register("feedback_chunked", CORE, (6, 6), {"scale": (True, (float,)), "chunk_size": (True, (int,))},
         feedback_chunked_infer,
         doc="blocked forward substitution: s_c = dinv_c (f_c + sum_{c'<c} B_cc' s_c'); equals feedback(f, q_b, k_b, gamma)")
register("scan_chunked", CORE, (6, 6), {"chunk_size": (True, (int,))}, scan_chunked_infer,
         doc="scan evaluated chunk by chunk: parallel inside a chunk, the state h carried between chunks")
