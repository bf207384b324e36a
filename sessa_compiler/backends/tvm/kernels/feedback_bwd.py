"""The backward of IR op `feedback` as a chunked transposed solve in TIR.

Given s (the forward's output) and its gradient ds, with alpha the strictly causal softmax of
q_b k_b^T * scale (alpha[0, :] = 0) and G = diag(gamma):

    df = (I - G alpha)^-T ds                   (backward substitution, from the last row)
    dgamma[t] = df[t] . (alpha @ s)[t] = sum_j alpha[t, j] X[t, j],   X = df s^T
    P = G alpha * (X - dgamma)                 (the logits' gradient, per row)
    dq_b = scale * P @ k_b,  dk_b = scale * P^T @ q_b

Per chunk of `chunk` rows, last chunk first (sequential over chunks; fork-join parallel phases):
  1. logits  parallel over (batch, key blocks): the chunk's rows against keys [0, chunk end)
     (as the forward kernel), 2. softmax parallel over (batch, rows): alpha in place;
  3. solve   parallel over (batch, column blocks of df): the diagonal block's backward substitution
     on the chunk's rows of ACC (ds plus what later chunks pushed: df in place), then the push
     ACC[:chunk start] += (G alpha)[chunk, :chunk start]^T df[chunk] (register tile `gemm_rows` x
     `col_block`);
  4. X       parallel over (batch, key blocks): X = df[chunk] s^T (s in key panels), then per row
     dgamma and P in place;
  5. dq, dk  parallel over (batch, column blocks): dq[chunk] = P @ k_b and dk += P^T @ (q_b * scale).
Memory beyond the inputs and outputs: O(T * width) (padded copies, accumulators) + two
[chunk, T] blocks; never O(T^2). Tunables: the forward's FeedbackSchedule.
"""
from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import FloatImm

from ..schedules import FeedbackSchedule
from ..tir_math import MASKED, make_exp


def feedback_bwd_kernel(width: int, scale: float, dtype: str, sched: FeedbackSchedule):
    """The PrimFunc `feedback_bwd(ds, s, q_b, k_b, gamma, df, dq_b, dk_b, dgamma)`."""
    sched.check(width)
    D = width
    CH, KB, R, DC, R2 = sched.chunk, sched.key_block, sched.rows, sched.col_block, sched.gemm_rows
    NDC = D // DC
    exp = make_exp(dtype)
    neg = FloatImm(dtype, MASKED)
    zero = FloatImm(dtype, 0.0)
    scale = FloatImm(dtype, float(scale))

    @T.prim_func
    def feedback_bwd(ds_h: T.handle, s_h: T.handle, q_h: T.handle, k_h: T.handle, g_h: T.handle, df_h: T.handle,
                     dq_h: T.handle, dk_h: T.handle, dg_h: T.handle):
        T.func_attr({"global_symbol": "feedback_bwd", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        DS = T.match_buffer(ds_h, (nb, nt, D), dtype)
        S = T.match_buffer(s_h, (nb, nt, D), dtype)
        Q = T.match_buffer(q_h, (nb, nt, D), dtype)
        K = T.match_buffer(k_h, (nb, nt, D), dtype)
        G = T.match_buffer(g_h, (nb, nt), dtype)
        DF = T.match_buffer(df_h, (nb, nt, D), dtype)
        DQ = T.match_buffer(dq_h, (nb, nt, D), dtype)
        DK = T.match_buffer(dk_h, (nb, nt, D), dtype)
        DG = T.match_buffer(dg_h, (nb, nt), dtype)
        QS = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH, D), dtype)    # scaled queries, zero rows past T
        KR = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH, D), dtype)    # keys by row, zero past T
        KP = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * (CH // KB), D, KB), dtype)   # key panels
        SP = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * (CH // KB), D, KB), dtype)   # s panels
        GP = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH), dtype)       # gamma, zero past T
        ACC = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH, D), dtype)   # ds + pushed terms; df once solved
        DKA = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH, D), dtype)   # dk_b, accumulated over chunks
        DGB = T.alloc_buffer((nb, ((nt + CH - 1) // CH) * CH), dtype)
        P = T.alloc_buffer((nb, CH, ((nt + CH - 1) // CH) * CH), dtype)    # alpha of the chunk's rows
        X = T.alloc_buffer((nb, CH, ((nt + CH - 1) // CH) * CH), dtype)    # df s^T, then the logits' gradient

        # -- layout: padded copies ------------------------------------------------------------------
        for task in T.parallel(nb * ((nt + CH - 1) // CH) * CH):
            b = task // (((nt + CH - 1) // CH) * CH)
            t = task % (((nt + CH - 1) // CH) * CH)
            if t < nt:
                for d in T.vectorized(D):
                    QS[b, t, d] = Q[b, t, d] * scale
                    KR[b, t, d] = K[b, t, d]
                    ACC[b, t, d] = DS[b, t, d]
                    DKA[b, t, d] = zero
                GP[b, t] = G[b, t]
                for d in T.serial(D):
                    KP[b, t // KB, d, t % KB] = K[b, t, d]
                    SP[b, t // KB, d, t % KB] = S[b, t, d]
            else:
                for d in T.vectorized(D):
                    QS[b, t, d] = zero
                    KR[b, t, d] = zero
                    ACC[b, t, d] = zero
                    DKA[b, t, d] = zero
                GP[b, t] = zero
                for d in T.serial(D):
                    KP[b, t // KB, d, t % KB] = zero
                    SP[b, t // KB, d, t % KB] = zero

        for cc in T.serial(((nt + CH - 1) // CH)):
            c = (nt + CH - 1) // CH - 1 - cc
            # -- 1. logits of rows [c*CH, c*CH+CH) against keys [0, c*CH+CH) --------------------------
            for task in T.parallel(nb * (c + 1) * (CH // KB)):
                b = task // ((c + 1) * (CH // KB))
                kb = task % ((c + 1) * (CH // KB))
                acc = T.alloc_buffer((R, KB), dtype, scope="local")
                for ib in T.serial(CH // R):
                    for r in T.unroll(R):
                        for j in T.vectorized(KB):
                            acc[r, j] = zero
                    if kb * KB < c * CH + ib * R + R - 1:   # some key of the block precedes some row
                        for d in T.serial(D):
                            for r in T.unroll(R):
                                for j in T.vectorized(KB):
                                    acc[r, j] = acc[r, j] + QS[b, c * CH + ib * R + r, d] * KP[b, kb, d, j]
                    for r in T.unroll(R):
                        for j in T.vectorized(KB):
                            P[b, ib * R + r, kb * KB + j] = acc[r, j]
            # -- 2. strictly causal softmax of each row (alpha; row 0 and rows past T: zero) --------------
            for task in T.parallel(nb * CH):
                b = task // CH
                i = task % CH
                lane = T.alloc_buffer((KB,), dtype, scope="local")
                red = T.alloc_buffer((2,), dtype, scope="local")
                if c * CH + i == 0 or c * CH + i >= nt:
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            P[b, i, jb * KB + j] = zero
                else:
                    for j in T.vectorized(KB):
                        lane[j] = neg
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            lane[j] = T.max(lane[j], T.Select(jb * KB + j < c * CH + i, P[b, i, jb * KB + j], neg))
                    red[0] = neg
                    for j in T.serial(KB):
                        red[0] = T.max(red[0], lane[j])
                    for j in T.vectorized(KB):
                        lane[j] = zero
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            P[b, i, jb * KB + j] = T.Select(jb * KB + j < c * CH + i,
                                                            exp(P[b, i, jb * KB + j] - red[0]), zero)
                            lane[j] = lane[j] + P[b, i, jb * KB + j]
                    red[1] = zero
                    for j in T.serial(KB):
                        red[1] = red[1] + lane[j]
                    red[1] = T.Cast(dtype, 1.0) / red[1]
                    for jb in T.serial((c + 1) * (CH // KB)):
                        for j in T.vectorized(KB):
                            P[b, i, jb * KB + j] = P[b, i, jb * KB + j] * red[1]
            # -- 3. backward substitution on the diagonal block, then the push to earlier rows ------------
            for task in T.parallel(nb * NDC):
                b = task // NDC
                col = task % NDC * DC
                acc = T.alloc_buffer((R2, DC), dtype, scope="local")
                row = T.alloc_buffer((DC,), dtype, scope="local")
                for ii in T.serial(CH):
                    i = CH - 1 - ii
                    for j in T.vectorized(DC):
                        row[j] = ACC[b, c * CH + i, col + j]
                    for jj in T.serial(i + 1, CH):
                        for j in T.vectorized(DC):
                            row[j] = row[j] + GP[b, c * CH + jj] * P[b, jj, c * CH + i] * ACC[b, c * CH + jj, col + j]
                    for j in T.vectorized(DC):
                        ACC[b, c * CH + i, col + j] = row[j]
                for jb in T.serial(c * CH // R2):
                    for r in T.unroll(R2):
                        for j in T.vectorized(DC):
                            acc[r, j] = ACC[b, jb * R2 + r, col + j]
                    for i in T.serial(CH):
                        for r in T.unroll(R2):
                            for j in T.vectorized(DC):
                                acc[r, j] = acc[r, j] + GP[b, c * CH + i] * P[b, i, jb * R2 + r] * ACC[b, c * CH + i, col + j]
                    for r in T.unroll(R2):
                        for j in T.vectorized(DC):
                            ACC[b, jb * R2 + r, col + j] = acc[r, j]
            # -- 4. X = df s^T tiles, then per row dgamma and P = gamma alpha (X - dgamma) ----------------
            for task in T.parallel(nb * (c + 1) * (CH // KB)):
                b = task // ((c + 1) * (CH // KB))
                kb = task % ((c + 1) * (CH // KB))
                acc = T.alloc_buffer((R, KB), dtype, scope="local")
                for ib in T.serial(CH // R):
                    for r in T.unroll(R):
                        for j in T.vectorized(KB):
                            acc[r, j] = zero
                    if kb * KB < c * CH + ib * R + R - 1:
                        for d in T.serial(D):
                            for r in T.unroll(R):
                                for j in T.vectorized(KB):
                                    acc[r, j] = acc[r, j] + ACC[b, c * CH + ib * R + r, d] * SP[b, kb, d, j]
                    for r in T.unroll(R):
                        for j in T.vectorized(KB):
                            X[b, ib * R + r, kb * KB + j] = acc[r, j]
            for task in T.parallel(nb * CH):
                b = task // CH
                i = task % CH
                lane = T.alloc_buffer((KB,), dtype, scope="local")
                red = T.alloc_buffer((1,), dtype, scope="local")
                for j in T.vectorized(KB):
                    lane[j] = zero
                for jb in T.serial((c + 1) * (CH // KB)):
                    for j in T.vectorized(KB):
                        lane[j] = lane[j] + P[b, i, jb * KB + j] * X[b, i, jb * KB + j]
                red[0] = zero
                for j in T.serial(KB):
                    red[0] = red[0] + lane[j]
                DGB[b, c * CH + i] = red[0]
                for jb in T.serial((c + 1) * (CH // KB)):
                    for j in T.vectorized(KB):
                        X[b, i, jb * KB + j] = GP[b, c * CH + i] * P[b, i, jb * KB + j] * (X[b, i, jb * KB + j] - red[0])
            # -- 5. dq_b[chunk] = P @ k_b (scaled on the way out), dk_b += P^T @ (q_b * scale) -----------
            for task in T.parallel(nb * NDC):
                b = task // NDC
                col = task % NDC * DC
                acc = T.alloc_buffer((R2, DC), dtype, scope="local")
                for ib in T.serial(CH // R2):
                    for r in T.unroll(R2):
                        for j in T.vectorized(DC):
                            acc[r, j] = zero
                    for jj in T.serial(c * CH + ib * R2 + R2 - 1):
                        for r in T.unroll(R2):
                            for j in T.vectorized(DC):
                                acc[r, j] = acc[r, j] + X[b, ib * R2 + r, jj] * KR[b, jj, col + j]
                    for r in T.unroll(R2):
                        if c * CH + ib * R2 + r < nt:
                            for j in T.vectorized(DC):
                                DQ[b, c * CH + ib * R2 + r, col + j] = acc[r, j] * scale
                for jb in T.serial((c + 1) * CH // R2):
                    for r in T.unroll(R2):
                        for j in T.vectorized(DC):
                            acc[r, j] = DKA[b, jb * R2 + r, col + j]
                    for i in T.serial(T.max(jb * R2 - c * CH, 0), CH):
                        for r in T.unroll(R2):
                            for j in T.vectorized(DC):
                                acc[r, j] = acc[r, j] + X[b, i, jb * R2 + r] * QS[b, c * CH + i, col + j]
                    for r in T.unroll(R2):
                        for j in T.vectorized(DC):
                            DKA[b, jb * R2 + r, col + j] = acc[r, j]

        # -- outputs ------------------------------------------------------------------------------------
        for task in T.parallel(nb * nt):
            b = task // nt
            t = task % nt
            for d in T.vectorized(D):
                DF[b, t, d] = ACC[b, t, d]
                DK[b, t, d] = DKA[b, t, d]
            DG[b, t] = DGB[b, t]

    return feedback_bwd
