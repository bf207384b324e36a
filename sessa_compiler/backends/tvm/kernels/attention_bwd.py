"""The backward of IR op `attention` (causal, GQA, interleaved RoPE) as a FlashAttention-2 style TIR kernel.

Given q, k, v, the forward's output O, its gradient dO and the row log-sum-exps of the scaled logits
(lse [B, H, T]), the probabilities are recomputed tile by tile, P = exp(S - lse) with S = (q*scale) . k,
and with delta = rowsum(dO * O), dP = dO . v^T, dS = P * (dP - delta):
dV = P^T dO, dK = dS^T (q*scale), dQ = scale * dS k. No [T, T] tensor: O(T * d) memory per head.

Layout pass (parallel over batch x positions): RoPE tables, rotated and scaled queries and dO by head
[B, H, T, d], lse and delta [B, H, T], key and value panels [B, Hkv, T/k_block, d, k_block] (vector lanes
over keys) and rotated keys by row [B, Hkv, T, d] (all zero past T).
dK/dV pass: one parallel task per (batch, kv head, key block), zig-zag over key blocks (a block's work
falls with its position); the task walks every query head of its group (GQA's sum) and every query block
from the diagonal on, accumulating dK and dV of its keys in registers-sized local tiles, then writes them
with the rotation's transpose on dK.
dQ pass: one parallel task per (batch, head, query block), zig-zag like the forward; key blocks up to the
diagonal; dQ gets scale and the rotation's transpose on the way out.
Both passes recompute S and dP (no atomics, no shared accumulators between tasks).

With `key_padding` the kernel also reads the key-padding mask [B, T] (kernel dtype, nonzero = keep): padded keys
get P = 0 like future ones, and a row with no visible key (a query before its row's first unpadded key) has
P = 1/T over all T keys (semantics.core.attention_ref's empty_rows="mean": the softmax of a uniform row, whose
gradient reaches every key), so its query block walks every key block in the dQ pass and the dK/dV pass also
visits the query blocks before the diagonal that hold such rows.
"""
from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import FloatImm, Or

from ..schedules import AttentionSchedule
from ..tir_math import make_exp


def attention_bwd_kernel(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str,
                         sched: AttentionSchedule, key_padding: bool = False, fused_dq: bool = False):
    """The PrimFunc `attention_bwd(q, k, v, inv_freq, out, dout, lse, dq, dk, dv)`; inv_freq read only when
    `rope`; lse [B, H, T] of the scaled logits (what the forward's online softmax ends with: max + log sum).
    With `key_padding`: `attention_bwd(q, k, v, inv_freq, mask, out, dout, lse, dq, dk, dv)` (a row with no
    visible key does not read its lse). With `fused_dq` the dK/dV pass also accumulates dQ (one task per
    (batch, kv head) walking all its key blocks, so each task owns its group's dQ rows) and the dQ pass, with
    its second recomputation of S and dP, is gone: 5 tile products per visited block pair instead of 7."""
    sched.check(head_dim)
    H, HKV, DH = n_heads, n_kv_heads, head_dim
    G = H // HKV
    HALF = max(DH // 2, 1)
    BQ, BK, R, VL = sched.q_block, sched.k_block, sched.rows, sched.v_lanes
    if BK % R:
        raise ValueError(f"attention schedule {sched}: k_block must be a multiple of rows for the backward")
    NVB = DH // VL
    exp = make_exp(dtype)
    scale = FloatImm(dtype, float(scale))
    zero = FloatImm(dtype, 0.0)
    ROPE = bool(rope)
    MASKP = bool(key_padding)
    FUSED = bool(fused_dq)
    one = FloatImm(dtype, 1.0)

    # The loops over blocks. Without the mask they are the causal ranges (dK/dV: query blocks from the diagonal on;
    # dQ: key blocks up to it) and the visit test is the Python constant True, so the kernel is the unmasked one.
    # With the mask a block holding rows that see no key (rows before FIRST[b]) is visited as well.
    def q_from(kb):
        return 0 if MASKP else kb * BK // BQ

    def q_visits(qb, kb, first):
        return Or(qb >= kb * BK // BQ, qb * BQ < first) if MASKP else True

    def k_to(qb, nt):
        return (nt + BQ - 1) // BQ * (BQ // BK) if MASKP else (qb + 1) * (BQ // BK)

    def k_visits(kb2, qb, first):
        return Or(kb2 < (qb + 1) * (BQ // BK), qb * BQ < first) if MASKP else True

    # The dK/dV pass's tasks: one per (batch, kv head, key block) (zig-zag), or with FUSED one per (batch, kv head)
    # walking its key blocks in turn (it then owns the dQ rows of its query heads: no atomics).
    def n_kb(nt):
        return (nt + BQ - 1) // BQ * (BQ // BK)

    def n_par(nt):
        return 1 if FUSED else n_kb(nt)

    def n_ser(nt):
        return n_kb(nt) if FUSED else 1

    def key_block(task, zz, nt):
        if FUSED:
            return zz
        z = task % n_kb(nt)
        return T.Select(z % 2 == 0, z // 2, n_kb(nt) - 1 - z // 2)

    @T.macro
    def body(Q, K, V, INV, MK, O, DO, LSE, DQ, DK, DV, nb, nt):
        QS = T.alloc_buffer((nb, H, (nt + BQ - 1) // BQ * BQ, DH), dtype)
        DOH = T.alloc_buffer((nb, H, (nt + BQ - 1) // BQ * BQ, DH), dtype)
        LS = T.alloc_buffer((nb, H, (nt + BQ - 1) // BQ * BQ), dtype)
        DL = T.alloc_buffer((nb, H, (nt + BQ - 1) // BQ * BQ), dtype)
        KP = T.alloc_buffer((nb, HKV, (nt + BQ - 1) // BQ * (BQ // BK), DH, BK), dtype)
        VP = T.alloc_buffer((nb, HKV, (nt + BQ - 1) // BQ * (BQ // BK), DH, BK), dtype)
        KH = T.alloc_buffer((nb, HKV, (nt + BQ - 1) // BQ * BQ, DH), dtype)
        COS = T.alloc_buffer(((nt + BQ - 1) // BQ * BQ, HALF), dtype)
        SIN = T.alloc_buffer(((nt + BQ - 1) // BQ * BQ, HALF), dtype)
        # the first query row that sees a key, per batch row: rows before it see none (0 without a mask)
        FIRST = T.alloc_buffer((nb,), "int32")
        if FUSED:   # dQ accumulated over key blocks by the dK/dV pass (rotated frame, before the scale)
            DQS = T.alloc_buffer((nb, H, (nt + BQ - 1) // BQ * BQ, DH), dtype)
        if MASKP:
            KM = T.alloc_buffer((nb, (nt + BQ - 1) // BQ * BQ), dtype)
            for b in T.parallel(nb):   # the first unpadded key of each row (nt when none)
                FIRST[b] = nt
                for t in T.serial(nt):
                    if MK[b, nt - 1 - t] != zero:
                        FIRST[b] = nt - 1 - t
        else:
            for b in T.parallel(nb):
                FIRST[b] = 0

        # -- layout: rope tables, rotated/scaled q, dO, lse, delta, key and value panels (zero past T) -----
        if ROPE:
            for t in T.parallel((nt + BQ - 1) // BQ * BQ):
                for i in T.serial(HALF):
                    COS[t, i] = T.cos(T.Cast(dtype, t) * INV[i])
                    SIN[t, i] = T.sin(T.Cast(dtype, t) * INV[i])
        for task in T.parallel(nb * ((nt + BQ - 1) // BQ * BQ)):
            b = task // ((nt + BQ - 1) // BQ * BQ)
            t = task % ((nt + BQ - 1) // BQ * BQ)
            red = T.alloc_buffer((1,), dtype, scope="local")
            if FUSED:
                for h in T.serial(H):
                    for d in T.vectorized(DH):
                        DQS[b, h, t, d] = zero
            if t < nt:
                for h in T.serial(H):
                    if ROPE:
                        for i in T.serial(HALF):
                            QS[b, h, t, 2 * i] = (Q[b, t, h, 2 * i] * COS[t, i] - Q[b, t, h, 2 * i + 1] * SIN[t, i]) \
                                * scale
                            QS[b, h, t, 2 * i + 1] = (Q[b, t, h, 2 * i] * SIN[t, i] + Q[b, t, h, 2 * i + 1] * COS[t, i]) \
                                * scale
                    else:
                        for d in T.vectorized(DH):
                            QS[b, h, t, d] = Q[b, t, h, d] * scale
                    for d in T.vectorized(DH):
                        DOH[b, h, t, d] = DO[b, t, h, d]
                    red[0] = zero
                    for d in T.serial(DH):
                        red[0] = red[0] + DO[b, t, h, d] * O[b, t, h, d]
                    DL[b, h, t] = red[0]
                    LS[b, h, t] = LSE[b, h, t]
                if MASKP:
                    KM[b, t] = MK[b, t]
                for h in T.serial(HKV):
                    if ROPE:
                        for i in T.serial(HALF):
                            KH[b, h, t, 2 * i] = K[b, t, h, 2 * i] * COS[t, i] - K[b, t, h, 2 * i + 1] * SIN[t, i]
                            KH[b, h, t, 2 * i + 1] = K[b, t, h, 2 * i] * SIN[t, i] + K[b, t, h, 2 * i + 1] * COS[t, i]
                    else:
                        for d in T.vectorized(DH):
                            KH[b, h, t, d] = K[b, t, h, d]
                    for d in T.serial(DH):
                        KP[b, h, t // BK, d, t % BK] = KH[b, h, t, d]
                        VP[b, h, t // BK, d, t % BK] = V[b, t, h, d]
            else:
                if MASKP:
                    KM[b, t] = zero
                for h in T.serial(H):
                    for d in T.vectorized(DH):
                        QS[b, h, t, d] = zero
                        DOH[b, h, t, d] = zero
                    DL[b, h, t] = zero
                    LS[b, h, t] = zero
                for h in T.serial(HKV):
                    for d in T.serial(DH):
                        KH[b, h, t, d] = zero
                        KP[b, h, t // BK, d, t % BK] = zero
                        VP[b, h, t // BK, d, t % BK] = zero

        # -- dK, dV: one task per (batch, kv head, key block), zig-zag over key blocks ------------------------
        for task in T.parallel(nb * HKV * n_par(nt)):
            b = task // (HKV * n_par(nt))
            hk = task // n_par(nt) % HKV
            for zz in T.serial(n_ser(nt)):
                kb = key_block(task, zz, nt)
                P = T.alloc_buffer((BQ, BK), dtype, scope="local")
                DS = T.alloc_buffer((BQ, BK), dtype, scope="local")
                DKA = T.alloc_buffer((BK, DH), dtype, scope="local")
                DVA = T.alloc_buffer((BK, DH), dtype, scope="local")
                st = T.alloc_buffer((R, BK), dtype, scope="local")
                pt = T.alloc_buffer((R, BK), dtype, scope="local")
                kt = T.alloc_buffer((R, VL), dtype, scope="local")
                vt = T.alloc_buffer((R, VL), dtype, scope="local")
                qt = T.alloc_buffer((R, VL), dtype, scope="local")
                for j in T.serial(BK):
                    for d in T.vectorized(DH):
                        DKA[j, d] = zero
                        DVA[j, d] = zero
                for g in T.serial(G):
                    # query blocks from the diagonal on, and (with the mask) earlier ones holding rows that see no key
                    for qb in T.serial(q_from(kb), (nt + BQ - 1) // BQ):
                        if q_visits(qb, kb, FIRST[b]):
                            # S = qs . k and dP = dO . v tiles; P = exp(S - lse) on the causal triangle, dS = P (dP - delta)
                            for ib in T.serial(BQ // R):
                                for r in T.unroll(R):
                                    for j in T.vectorized(BK):
                                        st[r, j] = zero
                                        pt[r, j] = zero
                                for d in T.serial(DH):
                                    for r in T.unroll(R):
                                        for j in T.vectorized(BK):
                                            st[r, j] = st[r, j] + QS[b, hk * G + g, qb * BQ + ib * R + r, d] * KP[b, hk, kb, d, j]
                                            pt[r, j] = pt[r, j] + DOH[b, hk * G + g, qb * BQ + ib * R + r, d] * VP[b, hk, kb, d, j]
                                for r in T.unroll(R):
                                    for j in T.vectorized(BK):
                                        if MASKP:
                                            P[ib * R + r, j] = T.Select(
                                                qb * BQ + ib * R + r < FIRST[b],
                                                T.Select(kb * BK + j < nt and qb * BQ + ib * R + r < nt,
                                                         one / T.Cast(dtype, nt), zero),
                                                T.Select(kb * BK + j <= qb * BQ + ib * R + r and qb * BQ + ib * R + r < nt
                                                         and KM[b, kb * BK + j] != zero,
                                                         exp(st[r, j] - LS[b, hk * G + g, qb * BQ + ib * R + r]), zero))
                                        else:
                                            P[ib * R + r, j] = T.Select(
                                                kb * BK + j <= qb * BQ + ib * R + r and qb * BQ + ib * R + r < nt,
                                                exp(st[r, j] - LS[b, hk * G + g, qb * BQ + ib * R + r]), zero)
                                        DS[ib * R + r, j] = P[ib * R + r, j] * (pt[r, j] - DL[b, hk * G + g, qb * BQ + ib * R + r])
                            # dV[j] += sum_i P[i, j] dO[i]; dK[j] += sum_i dS[i, j] qs[i]
                            for jb in T.serial(BK // R):
                                for vb in T.serial(NVB):
                                    for r in T.unroll(R):
                                        for d in T.vectorized(VL):
                                            vt[r, d] = DVA[jb * R + r, vb * VL + d]
                                            kt[r, d] = DKA[jb * R + r, vb * VL + d]
                                    for i in T.serial(BQ):
                                        for r in T.unroll(R):
                                            for d in T.vectorized(VL):
                                                vt[r, d] = vt[r, d] + P[i, jb * R + r] * DOH[b, hk * G + g, qb * BQ + i, vb * VL + d]
                                                kt[r, d] = kt[r, d] + DS[i, jb * R + r] * QS[b, hk * G + g, qb * BQ + i, vb * VL + d]
                                    for r in T.unroll(R):
                                        for d in T.vectorized(VL):
                                            DVA[jb * R + r, vb * VL + d] = vt[r, d]
                                            DKA[jb * R + r, vb * VL + d] = kt[r, d]
                            if FUSED:   # dQ[i] += sum_j dS[i, j] k[j]
                                for ib in T.serial(BQ // R):
                                    for vb in T.serial(NVB):
                                        for r in T.unroll(R):
                                            for d in T.vectorized(VL):
                                                qt[r, d] = DQS[b, hk * G + g, qb * BQ + ib * R + r, vb * VL + d]
                                        for j in T.serial(BK):
                                            for r in T.unroll(R):
                                                for d in T.vectorized(VL):
                                                    qt[r, d] = qt[r, d] + DS[ib * R + r, j] * KH[b, hk, kb * BK + j, vb * VL + d]
                                        for r in T.unroll(R):
                                            for d in T.vectorized(VL):
                                                DQS[b, hk * G + g, qb * BQ + ib * R + r, vb * VL + d] = qt[r, d]
                for j in T.serial(BK):
                    if kb * BK + j < nt:
                        for d in T.vectorized(DH):
                            DV[b, kb * BK + j, hk, d] = DVA[j, d]
                        if ROPE:
                            for i in T.serial(HALF):
                                DK[b, kb * BK + j, hk, 2 * i] = DKA[j, 2 * i] * COS[kb * BK + j, i] \
                                    + DKA[j, 2 * i + 1] * SIN[kb * BK + j, i]
                                DK[b, kb * BK + j, hk, 2 * i + 1] = DKA[j, 2 * i + 1] * COS[kb * BK + j, i] \
                                    - DKA[j, 2 * i] * SIN[kb * BK + j, i]
                        else:
                            for d in T.vectorized(DH):
                                DK[b, kb * BK + j, hk, d] = DKA[j, d]

        if FUSED:   # dQ out of the accumulator: scale and the rotation's transpose
            for task in T.parallel(nb * nt):
                b = task // nt
                t = task % nt
                for h in T.serial(H):
                    if ROPE:
                        for c in T.serial(HALF):
                            DQ[b, t, h, 2 * c] = (DQS[b, h, t, 2 * c] * COS[t, c] + DQS[b, h, t, 2 * c + 1] * SIN[t, c]) \
                                * scale
                            DQ[b, t, h, 2 * c + 1] = (DQS[b, h, t, 2 * c + 1] * COS[t, c]
                                                      - DQS[b, h, t, 2 * c] * SIN[t, c]) * scale
                    else:
                        for d in T.vectorized(DH):
                            DQ[b, t, h, d] = DQS[b, h, t, d] * scale
        else:
            # -- dQ: one task per (batch, head, query block), zig-zag over query blocks ---------------------------
            for task in T.parallel(nb * H * ((nt + BQ - 1) // BQ)):
                b = task // (H * ((nt + BQ - 1) // BQ))
                h = task // ((nt + BQ - 1) // BQ) % H
                z = task % ((nt + BQ - 1) // BQ)
                qb = T.Select(z % 2 == 0, z // 2, (nt + BQ - 1) // BQ - 1 - z // 2)
                DS2 = T.alloc_buffer((BQ, BK), dtype, scope="local")
                DQA = T.alloc_buffer((BQ, DH), dtype, scope="local")
                st2 = T.alloc_buffer((R, BK), dtype, scope="local")
                pt2 = T.alloc_buffer((R, BK), dtype, scope="local")
                qt = T.alloc_buffer((R, VL), dtype, scope="local")
                for i in T.serial(BQ):
                    for d in T.vectorized(DH):
                        DQA[i, d] = zero
                # key blocks up to the diagonal; all of them for a block holding rows that see no key (the mask)
                for kb2 in T.serial(k_to(qb, nt)):
                    if k_visits(kb2, qb, FIRST[b]):
                        for ib in T.serial(BQ // R):
                            for r in T.unroll(R):
                                for j in T.vectorized(BK):
                                    st2[r, j] = zero
                                    pt2[r, j] = zero
                            for d in T.serial(DH):
                                for r in T.unroll(R):
                                    for j in T.vectorized(BK):
                                        st2[r, j] = st2[r, j] + QS[b, h, qb * BQ + ib * R + r, d] * KP[b, h // G, kb2, d, j]
                                        pt2[r, j] = pt2[r, j] + DOH[b, h, qb * BQ + ib * R + r, d] * VP[b, h // G, kb2, d, j]
                            for r in T.unroll(R):
                                for j in T.vectorized(BK):
                                    if MASKP:
                                        DS2[ib * R + r, j] = T.Select(
                                            qb * BQ + ib * R + r < FIRST[b],
                                            T.Select(kb2 * BK + j < nt and qb * BQ + ib * R + r < nt,
                                                     one / T.Cast(dtype, nt), zero),
                                            T.Select(kb2 * BK + j <= qb * BQ + ib * R + r and qb * BQ + ib * R + r < nt
                                                     and KM[b, kb2 * BK + j] != zero,
                                                     exp(st2[r, j] - LS[b, h, qb * BQ + ib * R + r]), zero)) \
                                            * (pt2[r, j] - DL[b, h, qb * BQ + ib * R + r])
                                    else:
                                        DS2[ib * R + r, j] = T.Select(
                                            kb2 * BK + j <= qb * BQ + ib * R + r and qb * BQ + ib * R + r < nt,
                                            exp(st2[r, j] - LS[b, h, qb * BQ + ib * R + r]), zero) \
                                            * (pt2[r, j] - DL[b, h, qb * BQ + ib * R + r])
                        for ib in T.serial(BQ // R):
                            for vb in T.serial(NVB):
                                for r in T.unroll(R):
                                    for d in T.vectorized(VL):
                                        qt[r, d] = DQA[ib * R + r, vb * VL + d]
                                for j in T.serial(BK):
                                    for r in T.unroll(R):
                                        for d in T.vectorized(VL):
                                            qt[r, d] = qt[r, d] + DS2[ib * R + r, j] * KH[b, h // G, kb2 * BK + j, vb * VL + d]
                                for r in T.unroll(R):
                                    for d in T.vectorized(VL):
                                        DQA[ib * R + r, vb * VL + d] = qt[r, d]
                for i in T.serial(BQ):
                    if qb * BQ + i < nt:
                        if ROPE:
                            for c in T.serial(HALF):
                                DQ[b, qb * BQ + i, h, 2 * c] = (DQA[i, 2 * c] * COS[qb * BQ + i, c]
                                                                + DQA[i, 2 * c + 1] * SIN[qb * BQ + i, c]) * scale
                                DQ[b, qb * BQ + i, h, 2 * c + 1] = (DQA[i, 2 * c + 1] * COS[qb * BQ + i, c]
                                                                    - DQA[i, 2 * c] * SIN[qb * BQ + i, c]) * scale
                        else:
                            for d in T.vectorized(DH):
                                DQ[b, qb * BQ + i, h, d] = DQA[i, d] * scale

    if MASKP:
        @T.prim_func
        def attention_bwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, m_h: T.handle,
                          o_h: T.handle, do_h: T.handle, lse_h: T.handle, dq_h: T.handle, dk_h: T.handle,
                          dv_h: T.handle):
            T.func_attr({"global_symbol": "attention_bwd", "tirx.noalias": True})
            nb = T.int32()
            nt = T.int32()
            Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
            K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
            V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
            INV = T.match_buffer(inv_h, (HALF,), dtype)
            MK = T.match_buffer(m_h, (nb, nt), dtype)
            O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
            DO = T.match_buffer(do_h, (nb, nt, H, DH), dtype)
            LSE = T.match_buffer(lse_h, (nb, H, nt), dtype)
            DQ = T.match_buffer(dq_h, (nb, nt, H, DH), dtype)
            DK = T.match_buffer(dk_h, (nb, nt, HKV, DH), dtype)
            DV = T.match_buffer(dv_h, (nb, nt, HKV, DH), dtype)
            body(Q, K, V, INV, MK, O, DO, LSE, DQ, DK, DV, nb, nt)
        return attention_bwd

    @T.prim_func
    def attention_bwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, o_h: T.handle, do_h: T.handle,
                      lse_h: T.handle, dq_h: T.handle, dk_h: T.handle, dv_h: T.handle):
        T.func_attr({"global_symbol": "attention_bwd", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
        K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
        V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
        INV = T.match_buffer(inv_h, (HALF,), dtype)
        O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
        DO = T.match_buffer(do_h, (nb, nt, H, DH), dtype)
        LSE = T.match_buffer(lse_h, (nb, H, nt), dtype)
        DQ = T.match_buffer(dq_h, (nb, nt, H, DH), dtype)
        DK = T.match_buffer(dk_h, (nb, nt, HKV, DH), dtype)
        DV = T.match_buffer(dv_h, (nb, nt, HKV, DH), dtype)
        body(Q, K, V, INV, Q, O, DO, LSE, DQ, DK, DV, nb, nt)   # MK is never read without the mask
    return attention_bwd
