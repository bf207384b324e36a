"""IR op `linear` (y = x @ W^T + b) as a TIR kernel, used where the whole graph must run in TVM (export).

compile(backend="tvm") keeps linear layers on torch's BLAS, which is faster on CPUs; an exported
library has no torch, so its matmuls run here. Rows m (= batch x sequence) are symbolic.
Weights are packed per call into panels [N / col_block, K, col_block] (vector lanes over output
columns); one parallel task per (panel, block of `row_block` rows), register tile `rows` x
`col_block`; consecutive tasks share a panel so it stays in cache.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..schedules import LinearSchedule


def linear_kernel(in_features: int, out_features: int, bias: bool, dtype: str, sched: LinearSchedule):
    """The PrimFunc `linear(x [m, K], w [N, K], b [N], y [m, N])`; b is read only when `bias`."""
    sched.check(out_features)
    K, N = in_features, out_features
    NB, R, RB = sched.col_block, sched.rows, sched.row_block
    NPAN = N // NB
    BIAS = bool(bias)

    @T.prim_func
    def linear(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "linear", "tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x_h, (m, K), dtype)
        W = T.match_buffer(w_h, (N, K), dtype)
        BV = T.match_buffer(b_h, (N,), dtype)
        Y = T.match_buffer(y_h, (m, N), dtype)
        WP = T.alloc_buffer((NPAN, K, NB), dtype)
        for p in T.parallel(NPAN):
            for k in T.serial(K):
                for j in T.serial(NB):
                    WP[p, k, j] = W[p * NB + j, k]
        for task in T.parallel(NPAN * ((m + RB - 1) // RB)):
            p = task // ((m + RB - 1) // RB)
            r0 = task % ((m + RB - 1) // RB) * RB
            acc = T.alloc_buffer((R, NB), dtype, scope="local")
            for ib in T.serial(RB // R):
                if r0 + ib * R < m:
                    for r in T.unroll(R):
                        for j in T.vectorized(NB):
                            acc[r, j] = T.Cast(dtype, 0.0)
                    for k in T.serial(K):
                        for r in T.unroll(R):
                            for j in T.vectorized(NB):
                                acc[r, j] = acc[r, j] + X[T.min(r0 + ib * R + r, m - 1), k] * WP[p, k, j]
                    for r in T.unroll(R):
                        if r0 + ib * R + r < m:
                            for j in T.vectorized(NB):
                                if BIAS:
                                    Y[r0 + ib * R + r, p * NB + j] = acc[r, j] + BV[p * NB + j]
                                else:
                                    Y[r0 + ib * R + r, p * NB + j] = acc[r, j]

    return linear
