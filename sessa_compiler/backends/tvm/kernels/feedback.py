"""IR op `feedback` as a chunked forward substitution in TIR.

Solves (I - diag(gamma) alpha) s = f with alpha = strictly causal softmax(q_b k_b^T * scale) and
alpha[0, :] = 0, for every batch element and every column of f. Batch and sequence length are
symbolic: one compiled function serves every (B, T).

Per chunk of `chunk` rows (sequential over chunks, three fork-join parallel phases each):
  1. logits  parallel over (batch, key blocks):  the chunk's rows against keys [0, chunk end),
     blocks entirely above the diagonal are skipped (only causal logits are computed);
     register tile `rows` x `key_block` (vector lanes over keys, k_b pre-transposed).
  2. softmax parallel over (batch, rows): exact row max and sum over j < t, then
     P[t, j] = gamma[t] * alpha[t, j] in place.
  3. solve   parallel over (batch, column blocks of s): inter-chunk tile GEMM
     s[chunk] = f[chunk] + P[:, :c0] @ s[:c0] (register tile `gemm_rows` x `col_block`), then the
     intra-chunk forward substitution over the diagonal block, all in the task's columns.
Memory beyond the inputs and output: O(T * width) (padded copies) + O(chunk * T) (one chunk of P);
never O(T^2).
"""
from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import FloatImm

from ..schedules import FeedbackSchedule
from ..tir_math import MASKED, make_exp


def feedback_kernel(width: int, scale: float, dtype: str, sched: FeedbackSchedule):
    """The PrimFunc `feedback(f, q_b, k_b, gamma, s)`."""
    sched.check(width)
    D = width
    CH, KB, R, DC, R2 = sched.chunk, sched.key_block, sched.rows, sched.col_block, sched.gemm_rows
    NDC = D // DC
    exp = make_exp(dtype)
    neg = FloatImm(dtype, MASKED)
    # a typed constant: a bare Python float in TVMScript is a float32 literal, which would round the
    # scale of a float64 kernel to float32 (1e-8 relative, amplified by the feedback solve)
    scale = FloatImm(dtype, float(scale))

    @T.prim_func
    def feedback(f_h: T.handle, q_h: T.handle, k_h: T.handle, g_h: T.handle, s_h: T.handle):
        T.func_attr({"global_symbol": "feedback", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        F = T.match_buffer(f_h, (nb, nt, D), dtype)
        Q = T.match_buffer(q_h, (nb, nt, D), dtype)
        K = T.match_buffer(k_h, (nb, nt, D), dtype)
        G = T.match_buffer(g_h, (nb, nt), dtype)
        S = T.match_buffer(s_h, (nb, nt, D), dtype)
        QS = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH, D), dtype)   # scaled queries, zero rows past T
        KP = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * (CH // KB), D, KB), dtype)   # key panels: lanes run over keys
        SB = T.alloc_buffer((nb, NDC, ((nt + CH - 1) // CH) * CH, DC), dtype)   # the solution in column panels, padded
        P = T.alloc_buffer((nb, CH, ((nt + CH - 1) // CH) * CH), dtype)   # gamma * alpha for the current chunk's rows

        # -- layout: scaled, padded q_b; transposed, padded k_b ----------------------------------
        for task in T.parallel(nb * ((nt + CH - 1) // CH) * CH):
            b = task // (((nt + CH - 1) // CH) * CH)
            t = task % (((nt + CH - 1) // CH) * CH)
            if t < nt:
                for d in T.vectorized(D):
                    QS[b, t, d] = Q[b, t, d] * T.Cast(dtype, scale)
            else:
                for d in T.vectorized(D):
                    QS[b, t, d] = T.Cast(dtype, 0.0)
        for task in T.parallel(nb * ((nt + CH - 1) // CH) * (CH // KB)):
            b = task // (((nt + CH - 1) // CH) * (CH // KB))
            t0 = task % (((nt + CH - 1) // CH) * (CH // KB)) * KB
            for d in T.serial(D):
                for j in T.serial(KB):
                    KP[b, t0 // KB, d, j] = T.if_then_else(t0 + j < nt, K[b, T.min(t0 + j, nt - 1), d], T.Cast(dtype, 0.0))

        for c in T.serial(((nt + CH - 1) // CH)):
            # -- 1. logits of rows [c*CH, c*CH+CH) against keys [0, c*CH+CH) ----------------------
            for task in T.parallel(nb * (c + 1) * (CH // KB)):
                b = task // ((c + 1) * (CH // KB))
                kb = task % ((c + 1) * (CH // KB))
                acc = T.alloc_buffer((R, KB), dtype, scope="local")
                for ib in T.serial(CH // R):
                    if kb * KB < c * CH + ib * R + R - 1:   # some key of the block precedes some row
                        for r in T.unroll(R):
                            for j in T.vectorized(KB):
                                acc[r, j] = T.Cast(dtype, 0.0)
                        for d in T.serial(D):
                            for r in T.unroll(R):
                                for j in T.vectorized(KB):
                                    acc[r, j] = acc[r, j] + QS[b, c * CH + ib * R + r, d] * KP[b, kb, d, j]
                        for r in T.unroll(R):
                            for j in T.vectorized(KB):
                                P[b, ib * R + r, kb * KB + j] = acc[r, j]
            # -- 2. strictly causal softmax of each row, times gamma --------------------------------
            for task in T.parallel(nb * CH):
                b = task // CH
                i = task % CH
                lane = T.alloc_buffer((KB,), dtype, scope="local")
                red = T.alloc_buffer((2,), dtype, scope="local")
                if c * CH + i == 0:
                    for jb in T.serial(CH // KB):   # row 0 has no predecessor: alpha[0, :] = 0
                        for j in T.vectorized(KB):
                            P[b, i, jb * KB + j] = T.Cast(dtype, 0.0)
                else:
                    for j in T.vectorized(KB):
                        lane[j] = T.Cast(dtype, neg)
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            lane[j] = T.max(lane[j], T.Select(jb * KB + j < c * CH + i, P[b, i, jb * KB + j],
                                                              T.Cast(dtype, neg)))
                    red[0] = T.Cast(dtype, neg)
                    for j in T.serial(KB):
                        red[0] = T.max(red[0], lane[j])
                    for j in T.vectorized(KB):
                        lane[j] = T.Cast(dtype, 0.0)
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            P[b, i, jb * KB + j] = T.Select(jb * KB + j < c * CH + i,
                                                            exp(P[b, i, jb * KB + j] - red[0]), T.Cast(dtype, 0.0))
                            lane[j] = lane[j] + P[b, i, jb * KB + j]
                    red[1] = T.Cast(dtype, 0.0)
                    for j in T.serial(KB):
                        red[1] = red[1] + lane[j]
                    red[1] = T.if_then_else(c * CH + i < nt, G[b, T.min(c * CH + i, nt - 1)],
                                            T.Cast(dtype, 0.0)) / red[1]
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            P[b, i, jb * KB + j] = P[b, i, jb * KB + j] * red[1]
            # -- 3. inter-chunk GEMM tile and intra-chunk substitution, per column block -----------
            for task in T.parallel(nb * NDC):
                b = task // NDC
                cb = task % NDC
                col = cb * DC
                acc = T.alloc_buffer((R2, DC), dtype, scope="local")
                row = T.alloc_buffer((DC,), dtype, scope="local")
                for ib in T.serial(CH // R2):
                    for r in T.unroll(R2):
                        if c * CH + ib * R2 + r < nt:
                            for j in T.vectorized(DC):
                                acc[r, j] = F[b, c * CH + ib * R2 + r, col + j]
                        else:
                            for j in T.vectorized(DC):
                                acc[r, j] = T.Cast(dtype, 0.0)
                    for jj in T.serial(c * CH):
                        for r in T.unroll(R2):
                            for j in T.vectorized(DC):
                                acc[r, j] = acc[r, j] + P[b, ib * R2 + r, jj] * SB[b, cb, jj, j]
                    for r in T.unroll(R2):
                        for j in T.vectorized(DC):
                            SB[b, cb, c * CH + ib * R2 + r, j] = acc[r, j]
                for i in T.serial(CH):
                    for j in T.vectorized(DC):
                        row[j] = SB[b, cb, c * CH + i, j]
                    for jj in T.serial(i):
                        for j in T.vectorized(DC):
                            row[j] = row[j] + P[b, i, c * CH + jj] * SB[b, cb, c * CH + jj, j]
                    for j in T.vectorized(DC):
                        SB[b, cb, c * CH + i, j] = row[j]

        for task in T.parallel(nb * nt):
            b = task // nt
            t = task % nt
            for cb in T.serial(NDC):
                for j in T.vectorized(DC):
                    S[b, t, cb * DC + j] = SB[b, cb, t, j]

    return feedback
