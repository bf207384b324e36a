"""IR op `tri_solve` (a triangular solve with explicit weights) as a TIR kernel.

Solves A x = b for lower-triangular A [nb, nt, nt] (unit diagonal or not) and b [nb, nt, width], for
every batch element and column. An upper-triangular system is solved as the lower one of the reversed
sequence (the callers flip rows and columns). One parallel task per (batch, block of `col_block`
columns); rows run in order (forward substitution), vector lanes run over the task's columns, so each
row reads its weights once for `col_block` columns. Memory beyond the inputs and output: none. Batch and
sequence length are symbolic: one compiled function serves every (B, T).

This is the general form of feedback, used when the weights cannot be factored into the feedback op;
its weights are a [T, T] tensor per batch element, so it is O(T^2) in memory and O(T^2 width) in work.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..schedules import TriSolveSchedule


def tri_solve_kernel(width: int, unitriangular: bool, dtype: str, sched: TriSolveSchedule):
    """The PrimFunc `tri_solve(A, b, x)` for lower-triangular A."""
    sched.check(width)
    N, CB = width, sched.col_block
    NCB = N // CB
    unit = bool(unitriangular)

    @T.prim_func
    def tri_solve(a_h: T.handle, b_h: T.handle, x_h: T.handle):
        T.func_attr({"global_symbol": "tri_solve", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        A = T.match_buffer(a_h, (nb, nt, nt), dtype)
        Bm = T.match_buffer(b_h, (nb, nt, N), dtype)
        X = T.match_buffer(x_h, (nb, nt, N), dtype)
        for task in T.parallel(nb * NCB):
            b = task // NCB
            c0 = task % NCB * CB
            acc = T.alloc_buffer((CB,), dtype, scope="local")
            for t in T.serial(nt):
                for j in T.vectorized(CB):
                    acc[j] = Bm[b, t, c0 + j]
                for s in T.serial(t):
                    for j in T.vectorized(CB):
                        acc[j] = acc[j] - A[b, t, s] * X[b, s, c0 + j]
                if unit:
                    for j in T.vectorized(CB):
                        X[b, t, c0 + j] = acc[j]
                else:
                    for j in T.vectorized(CB):
                        X[b, t, c0 + j] = acc[j] / A[b, t, t]

    return tri_solve
