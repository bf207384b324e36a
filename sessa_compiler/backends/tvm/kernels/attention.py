"""IR op `attention` (causal, GQA, interleaved RoPE) as a flash-style TIR kernel.

out[b, t, h] = softmax_{j <= t}(q_t . k_j * scale) @ v, query head h reading kv head h // G, with q and
k rotated at their positions when `rope` is on. Batch and sequence length are symbolic.

Layout pass (parallel over batch x positions): RoPE angles in the compute dtype from inv_freq
(table per position), rotated and scaled queries [B, H, T, d], rotated keys in panels
[B, Hkv, T/k_block, d, k_block] (vector lanes over keys), values [B, Hkv, T, d].
Main pass, one parallel task per (batch, head, query block) in a zig-zag order over query blocks so
that any contiguous split of the tasks between threads gets equal causal work; per task an online
softmax over key blocks up to the diagonal only, with register tiles `rows` x `k_block` (logits) and
`rows` x `v_lanes` (P @ V). O(T * d) memory per head.
"""
from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import FloatImm

from ..schedules import AttentionSchedule
from ..tir_math import MASKED, make_exp


def attention_kernel(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str,
                     sched: AttentionSchedule, key_padding: bool = False, with_lse: bool = False):
    """The PrimFunc `attention(q, k, v, inv_freq, out)`; inv_freq is read only when `rope`.

    With `key_padding`: `attention(q, k, v, inv_freq, mask, out)`, mask [B, T] in the kernel's dtype (nonzero =
    keep): padded keys are masked like future ones, and a row with no visible key (before the row's first
    unpadded key) gives the mean of v over all keys (the op's empty_rows="mean").
    With `with_lse`: `attention(q, k, v, inv_freq, out, lse)` (with the mask: `attention(q, k, v, inv_freq, mask,
    out, lse)`) also writes each row's log-sum-exp of its scaled logits, lse [B, H, T] = running max + log(running
    sum) (what the backward kernel reads); a row with no visible key gets log(T), the log-sum-exp of the uniform
    row of zeros semantics.backward.attention_lse gives it."""
    sched.check(head_dim)
    H, HKV, DH = n_heads, n_kv_heads, head_dim
    G = H // HKV
    HALF = max(DH // 2, 1)
    BQ, BK, R, VL = sched.q_block, sched.k_block, sched.rows, sched.v_lanes
    NVB = DH // VL
    RL = 8 if BK % 8 == 0 else BK   # lanes of the row max / row sum partials
    exp = make_exp(dtype)
    neg = FloatImm(dtype, MASKED)
    # a typed constant: a bare Python float in TVMScript is a float32 literal, which would round the
    # scale of a float64 kernel to float32 (1e-8 relative, amplified by the feedback solve)
    scale = FloatImm(dtype, float(scale))
    ROPE = bool(rope)
    MASKP = bool(key_padding)

    WITH_LSE = bool(with_lse)

    @T.macro
    def body(Q, K, V, INV, MK, O, LSE, nb, nt):
        QS = T.alloc_buffer((nb, H, (nt + BQ - 1) // BQ * BQ, DH), dtype)
        KP = T.alloc_buffer((nb, HKV, (nt + BQ - 1) // BQ * (BQ // BK), DH, BK), dtype)
        VH = T.alloc_buffer((nb, HKV, (nt + BQ - 1) // BQ * BQ, DH), dtype)
        COS = T.alloc_buffer(((nt + BQ - 1) // BQ * BQ, HALF), dtype)
        SIN = T.alloc_buffer(((nt + BQ - 1) // BQ * BQ, HALF), dtype)

        if MASKP:
            KM = T.alloc_buffer((nb, (nt + BQ - 1) // BQ * BQ), dtype)
            FIRST = T.alloc_buffer((nb,), "int32")
            VM = T.alloc_buffer((nb, HKV, DH), dtype)
            for b in T.parallel(nb):   # the first unpadded key of each row (nt when none)
                FIRST[b] = nt
                for t in T.serial(nt):
                    if MK[b, nt - 1 - t] != T.Cast(dtype, 0.0):
                        FIRST[b] = nt - 1 - t
            for task in T.parallel(nb * HKV):
                for d in T.serial(DH):
                    VM[task // HKV, task % HKV, d] = T.Cast(dtype, 0.0)
                for t in T.serial(nt):
                    for d in T.serial(DH):
                        VM[task // HKV, task % HKV, d] = VM[task // HKV, task % HKV, d] + V[task // HKV, t, task % HKV, d]
                for d in T.serial(DH):
                    VM[task // HKV, task % HKV, d] = VM[task // HKV, task % HKV, d] / T.Cast(dtype, nt)

        # -- layout: rope tables, rotated/scaled q, key panels, values (zero past T) -----------------
        if ROPE:
            for t in T.parallel((nt + BQ - 1) // BQ * BQ):
                for i in T.serial(HALF):
                    COS[t, i] = T.cos(T.Cast(dtype, t) * INV[i])
                    SIN[t, i] = T.sin(T.Cast(dtype, t) * INV[i])
        for task in T.parallel(nb * ((nt + BQ - 1) // BQ * BQ)):
            b = task // ((nt + BQ - 1) // BQ * BQ)
            t = task % ((nt + BQ - 1) // BQ * BQ)
            if t < nt:
                for h in T.serial(H):
                    if ROPE:
                        for i in T.serial(HALF):
                            QS[b, h, t, 2 * i] = (Q[b, t, h, 2 * i] * COS[t, i] - Q[b, t, h, 2 * i + 1] * SIN[t, i]) \
                                * T.Cast(dtype, scale)
                            QS[b, h, t, 2 * i + 1] = (Q[b, t, h, 2 * i] * SIN[t, i] + Q[b, t, h, 2 * i + 1] * COS[t, i]) \
                                * T.Cast(dtype, scale)
                    else:
                        for d in T.vectorized(DH):
                            QS[b, h, t, d] = Q[b, t, h, d] * T.Cast(dtype, scale)
                if MASKP:
                    KM[b, t] = MK[b, t]
                for h in T.serial(HKV):
                    if ROPE:
                        for i in T.serial(HALF):
                            KP[b, h, t // BK, 2 * i, t % BK] = K[b, t, h, 2 * i] * COS[t, i] - K[b, t, h, 2 * i + 1] * SIN[t, i]
                            KP[b, h, t // BK, 2 * i + 1, t % BK] = K[b, t, h, 2 * i] * SIN[t, i] + K[b, t, h, 2 * i + 1] * COS[t, i]
                    else:
                        for d in T.serial(DH):
                            KP[b, h, t // BK, d, t % BK] = K[b, t, h, d]
                    for d in T.vectorized(DH):
                        VH[b, h, t, d] = V[b, t, h, d]
            else:
                if MASKP:
                    KM[b, t] = T.Cast(dtype, 0.0)
                for h in T.serial(H):
                    for d in T.vectorized(DH):
                        QS[b, h, t, d] = T.Cast(dtype, 0.0)
                for h in T.serial(HKV):
                    for d in T.serial(DH):
                        KP[b, h, t // BK, d, t % BK] = T.Cast(dtype, 0.0)
                    for d in T.vectorized(DH):
                        VH[b, h, t, d] = T.Cast(dtype, 0.0)

        # -- main: one task per (batch, head, query block), zig-zag over query blocks --------------
        for task in T.parallel(nb * H * ((nt + BQ - 1) // BQ)):
            b = task // (H * ((nt + BQ - 1) // BQ))
            h = task // ((nt + BQ - 1) // BQ) % H
            z = task % ((nt + BQ - 1) // BQ)
            qb = T.Select(z % 2 == 0, z // 2, (nt + BQ - 1) // BQ - 1 - z // 2)
            S = T.alloc_buffer((BQ, BK), dtype, scope="local")
            M = T.alloc_buffer((BQ,), dtype, scope="local")
            L = T.alloc_buffer((BQ,), dtype, scope="local")
            ACC = T.alloc_buffer((BQ, DH), dtype, scope="local")
            tile = T.alloc_buffer((R, BK), dtype, scope="local")
            vt = T.alloc_buffer((R, VL), dtype, scope="local")
            red = T.alloc_buffer((3,), dtype, scope="local")
            part = T.alloc_buffer((RL,), dtype, scope="local")
            for i in T.serial(BQ):
                M[i] = T.Cast(dtype, neg)
                L[i] = T.Cast(dtype, 0.0)
                for d in T.vectorized(DH):
                    ACC[i, d] = T.Cast(dtype, 0.0)
            for kb in T.serial((qb + 1) * (BQ // BK)):
                # logits tile, causal mask on the diagonal
                for ib in T.serial(BQ // R):
                    for r in T.unroll(R):
                        for j in T.vectorized(BK):
                            tile[r, j] = T.Cast(dtype, 0.0)
                    for d in T.serial(DH):
                        for r in T.unroll(R):
                            for j in T.vectorized(BK):
                                tile[r, j] = tile[r, j] + QS[b, h, qb * BQ + ib * R + r, d] * KP[b, h // G, kb, d, j]
                    if MASKP:   # padded keys masked like future ones (a row of only those: see FIRST below)
                        for r in T.unroll(R):
                            for j in T.vectorized(BK):
                                S[ib * R + r, j] = T.Select(
                                    (kb * BK + j <= qb * BQ + ib * R + r) & (KM[b, kb * BK + j] != T.Cast(dtype, 0.0)),
                                    tile[r, j], T.Cast(dtype, neg))
                    else:
                        for r in T.unroll(R):
                            for j in T.vectorized(BK):
                                S[ib * R + r, j] = T.Select(kb * BK + j <= qb * BQ + ib * R + r, tile[r, j],
                                                            T.Cast(dtype, neg))
                # online softmax update
                for i in T.serial(BQ):
                    # row max and sum: vector partials over RL lanes, then RL scalar steps
                    for j in T.vectorized(RL):
                        part[j] = S[i, j]
                    for jb in T.serial(BK // RL - 1):
                        for j in T.vectorized(RL):
                            part[j] = T.max(part[j], S[i, RL + jb * RL + j])
                    red[0] = M[i]
                    for j in T.serial(RL):
                        red[0] = T.max(red[0], part[j])
                    red[1] = exp(M[i] - red[0])   # rescales what was accumulated under the old max
                    for j in T.vectorized(BK):
                        S[i, j] = exp(S[i, j] - red[0])
                    for j in T.vectorized(RL):
                        part[j] = S[i, j]
                    for jb in T.serial(BK // RL - 1):
                        for j in T.vectorized(RL):
                            part[j] = part[j] + S[i, RL + jb * RL + j]
                    red[2] = T.Cast(dtype, 0.0)
                    for j in T.serial(RL):
                        red[2] = red[2] + part[j]
                    L[i] = L[i] * red[1] + red[2]
                    M[i] = red[0]
                    for d in T.vectorized(DH):
                        ACC[i, d] = ACC[i, d] * red[1]
                # ACC += P @ V
                for ib in T.serial(BQ // R):
                    for vb in T.serial(NVB):
                        for r in T.unroll(R):
                            for d in T.vectorized(VL):
                                vt[r, d] = ACC[ib * R + r, vb * VL + d]
                        for j in T.serial(BK):
                            for r in T.unroll(R):
                                for d in T.vectorized(VL):
                                    vt[r, d] = vt[r, d] + S[ib * R + r, j] * VH[b, h // G, kb * BK + j, vb * VL + d]
                        for r in T.unroll(R):
                            for d in T.vectorized(VL):
                                ACC[ib * R + r, vb * VL + d] = vt[r, d]
            for i in T.serial(BQ):
                if qb * BQ + i < nt:
                    if MASKP:   # a row before the first unpadded key sees none: the mean of v over all keys
                        if qb * BQ + i >= FIRST[b]:
                            for d in T.vectorized(DH):
                                O[b, qb * BQ + i, h, d] = ACC[i, d] / L[i]
                        else:
                            for d in T.vectorized(DH):
                                O[b, qb * BQ + i, h, d] = VM[b, h // G, d]
                    else:
                        for d in T.vectorized(DH):
                            O[b, qb * BQ + i, h, d] = ACC[i, d] / L[i]
                    if WITH_LSE:
                        if MASKP:
                            LSE[b, h, qb * BQ + i] = T.Select(qb * BQ + i >= FIRST[b], M[i] + T.log(L[i]),
                                                              T.log(T.Cast(dtype, nt)))
                        else:
                            LSE[b, h, qb * BQ + i] = M[i] + T.log(L[i])

    if MASKP and WITH_LSE:
        @T.prim_func
        def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, m_h: T.handle, o_h: T.handle,
                      lse_h: T.handle):
            T.func_attr({"global_symbol": "attention", "tirx.noalias": True})
            nb = T.int32()
            nt = T.int32()
            Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
            K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
            V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
            INV = T.match_buffer(inv_h, (HALF,), dtype)
            MK = T.match_buffer(m_h, (nb, nt), dtype)
            O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
            LSE = T.match_buffer(lse_h, (nb, H, nt), dtype)
            body(Q, K, V, INV, MK, O, LSE, nb, nt)
        return attention

    if MASKP:
        @T.prim_func
        def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, m_h: T.handle, o_h: T.handle):
            T.func_attr({"global_symbol": "attention", "tirx.noalias": True})
            nb = T.int32()
            nt = T.int32()
            Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
            K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
            V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
            INV = T.match_buffer(inv_h, (HALF,), dtype)
            MK = T.match_buffer(m_h, (nb, nt), dtype)
            O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
            body(Q, K, V, INV, MK, O, None, nb, nt)
        return attention

    if WITH_LSE:
        @T.prim_func
        def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, o_h: T.handle, lse_h: T.handle):
            T.func_attr({"global_symbol": "attention", "tirx.noalias": True})
            nb = T.int32()
            nt = T.int32()
            Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
            K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
            V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
            INV = T.match_buffer(inv_h, (HALF,), dtype)
            O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
            LSE = T.match_buffer(lse_h, (nb, H, nt), dtype)
            body(Q, K, V, INV, Q, O, LSE, nb, nt)   # MK is never read without the mask
        return attention

    @T.prim_func
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "attention", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
        K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
        V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
        INV = T.match_buffer(inv_h, (HALF,), dtype)
        O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
        body(Q, K, V, INV, Q, O, None, nb, nt)   # MK is never read without the mask
    return attention
