"""IR op `scan` (Mamba-1 selective scan) as a TIR kernel.

h_t = exp(delta_t * A) h_{t-1} + (delta_t * u_t) (x) B_t,  y_t = h_t C_t + D u_t,  h_{-1} = 0.
One parallel task per (batch, block of `channel_block` channels); the state h [N, channel_block]
lives in a task-local buffer, time runs sequentially, vector lanes run over channels. Batch and
sequence length are symbolic.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..schedules import ScanSchedule
from ..tir_math import make_exp


def scan_kernel(channels: int, d_state: int, dtype: str, sched: ScanSchedule):
    """The PrimFunc `scan(u, delta, A, B, C, D, y)`."""
    sched.check(channels)
    DIN, N, CB = channels, d_state, sched.channel_block
    NCB = DIN // CB
    exp = make_exp(dtype)

    @T.prim_func
    def scan(u_h: T.handle, dt_h: T.handle, a_h: T.handle, b_h: T.handle, c_h: T.handle, d_h: T.handle,
             y_h: T.handle):
        T.func_attr({"global_symbol": "scan", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        U = T.match_buffer(u_h, (nb, nt, DIN), dtype)
        DT = T.match_buffer(dt_h, (nb, nt, DIN), dtype)
        A = T.match_buffer(a_h, (DIN, N), dtype)
        BM = T.match_buffer(b_h, (nb, nt, N), dtype)
        CM = T.match_buffer(c_h, (nb, nt, N), dtype)
        DV = T.match_buffer(d_h, (DIN,), dtype)
        Y = T.match_buffer(y_h, (nb, nt, DIN), dtype)
        for task in T.parallel(nb * NCB):
            b = task // NCB
            c0 = task % NCB * CB
            h = T.alloc_buffer((N, CB), dtype, scope="local")
            a = T.alloc_buffer((N, CB), dtype, scope="local")
            dtu = T.alloc_buffer((CB,), dtype, scope="local")
            y = T.alloc_buffer((CB,), dtype, scope="local")
            for n in T.serial(N):
                for j in T.vectorized(CB):
                    h[n, j] = T.Cast(dtype, 0.0)
                for j in T.serial(CB):
                    a[n, j] = A[c0 + j, n]
            for t in T.serial(nt):
                for j in T.vectorized(CB):
                    dtu[j] = DT[b, t, c0 + j] * U[b, t, c0 + j]
                    y[j] = DV[c0 + j] * U[b, t, c0 + j]
                for n in T.serial(N):
                    for j in T.vectorized(CB):
                        h[n, j] = exp(DT[b, t, c0 + j] * a[n, j]) * h[n, j] + dtu[j] * BM[b, t, n]
                        y[j] = y[j] + h[n, j] * CM[b, t, n]
                for j in T.vectorized(CB):
                    Y[b, t, c0 + j] = y[j]

    return scan
