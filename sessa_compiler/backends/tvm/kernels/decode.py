"""Decode-step kernels in TIR: one new position against preallocated caches, split-K over the cached positions.

Both read caches of capacity ``L`` (symbolic: one build serves every capacity) in place, with the current
position ``t0`` a runtime argument (one build serves every length), in float32 or bfloat16 (widened to float32
in registers, so a bf16 cache halves the bytes a step reads), and write the new position's entries in place.
The cached positions are split into ``chunks`` ranges of whole ``block``-position blocks; one parallel task per
(batch row [, kv head], chunk) runs an online softmax over its range (exact block max, one rescale per block)
and leaves (max, sum, partial output) in a workspace; a serial loop then combines the chunks (log-sum-exp).
``parallel=False`` runs the same tasks on the calling thread (short contexts: no thread-pool launch).

``attention_decode(q, k, v, inv_freq, K, V, t0, work, out)``: q [B, H, d], k [B, Hkv, d], v [B, Hkv, dv] at
position t0 (RoPE applied here when ``rope``: interleaved pairs at angle t0 * inv_freq), K/V [B, Hkv, L, d|dv]
head-major caches; writes K/V[:, :, t0] then attends each query head h over kv head h // (H/Hkv), positions
0..t0 inclusive. work [B, Hkv, chunks, H/Hkv, dv + 2]; out [B, H, dv].

``feedback_decode(f, q_b, k_b, gamma, KB, S, t0, work, out)``: f, q_b, k_b [B, W], gamma [B]; KB [B, L, W]
feedback keys, S [B, L, W] solved states (float32); writes KB[:, t0] = k_b, then
s = f + gamma * softmax(q_b . KB[:, :t0] * scale) @ S[:, :t0] (s = f at t0 = 0), S[:, t0] = s, out = s.
work [B, chunks, W + 2].
"""
from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import FloatImm

from ..tir_math import MASKED, make_exp

F32 = "float32"


def _widen(x, dtype: str):
    """A cache element as float32: bfloat16 caches arrive as int16 bit patterns (the upper half of a float32)."""
    if dtype == "bfloat16":
        return T.reinterpret(F32, T.shift_left(T.Cast("int32", x), 16))
    return x


def _narrow(x, dtype: str):
    """float32 -> the cache's storage: bfloat16 rounded to nearest even, as int16 bits."""
    if dtype == "bfloat16":
        u = T.reinterpret("int32", x)
        return T.Cast("int16", T.shift_right(u + 32767 + T.bitwise_and(T.shift_right(u, 16), 1), 16))
    return x


def _storage(dtype: str) -> str:
    return "int16" if dtype == "bfloat16" else dtype


def _lanes(width: int, lanes: int) -> int:
    v = lanes
    while v > 1 and width % v:
        v //= 2
    return v


def attention_decode_kernel(n_heads: int, n_kv_heads: int, head_dim: int, v_dim: int, scale: float, rope: bool,
                            cache_dtype: str, chunks: int, block: int, lanes: int, parallel: bool = True,
                            key_padding: bool = False):
    H, HKV, D, DV = n_heads, n_kv_heads, head_dim, v_dim
    G = H // HKV
    NC, BLK = chunks, block
    VL = _lanes(D, lanes)          # lanes of the q.k dot products (over the head width)
    VV = _lanes(DV, lanes)         # lanes of the p * v accumulation
    HALF = max(D // 2, 1)
    exp = make_exp(F32)
    neg = FloatImm(F32, MASKED)
    scale = FloatImm(F32, float(scale))
    cdt = cache_dtype

    # key_padding: km [B, L] (uint8, nonzero = a real key; position t0's written by the caller) masks the padded
    # keys' logits to MASKED, and positions past t0 get 2 * MASKED: beside a real key a padded one weighs
    # exp(MASKED - m) = 0, and a row with no real key weighs its padded keys exp(0) = 1 and the positions past
    # t0 exp(MASKED) = 0 (the mean of v over [0, t0], the op's empty_rows="mean")
    far = FloatImm(F32, 2 * MASKED) if key_padding else neg

    @T.prim_func
    def attention_decode(q_h: T.handle, k_h: T.handle, v_h: T.handle, f_h: T.handle, kc_h: T.handle,
                         vc_h: T.handle, km_h: T.handle, t0: T.int32, w_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "attention_decode", "tirx.noalias": True})
        nb = T.int32()
        L = T.int32()
        LM = T.int32()
        KM = T.match_buffer(km_h, (nb, LM), "uint8")
        Q = T.match_buffer(q_h, (nb, H, D), F32)
        Kn = T.match_buffer(k_h, (nb, HKV, D), F32)
        Vn = T.match_buffer(v_h, (nb, HKV, DV), F32)
        FR = T.match_buffer(f_h, (HALF,), F32)
        KC = T.match_buffer(kc_h, (nb, HKV, L, D), _storage(cdt))
        VC = T.match_buffer(vc_h, (nb, HKV, L, DV), _storage(cdt))
        WK = T.match_buffer(w_h, (nb, HKV, NC, G, DV + 2), F32)
        O = T.match_buffer(o_h, (nb, H, DV), F32)
        # -- the new position's key (rotated) and value, written in place --------------------------------
        for task in T.serial(nb * HKV):
            b = task // HKV
            h = task % HKV
            if rope:
                for i in T.serial(D // 2):
                    KC[b, h, t0, 2 * i] = _narrow(Kn[b, h, 2 * i] * T.cos(T.Cast(F32, t0) * FR[i])
                                                 - Kn[b, h, 2 * i + 1] * T.sin(T.Cast(F32, t0) * FR[i]), cdt)
                    KC[b, h, t0, 2 * i + 1] = _narrow(Kn[b, h, 2 * i] * T.sin(T.Cast(F32, t0) * FR[i])
                                                     + Kn[b, h, 2 * i + 1] * T.cos(T.Cast(F32, t0) * FR[i]), cdt)
            else:
                for i in T.serial(D):
                    KC[b, h, t0, i] = _narrow(Kn[b, h, i], cdt)
            for i in T.serial(DV):
                VC[b, h, t0, i] = _narrow(Vn[b, h, i], cdt)
        # -- per (batch, kv head, chunk): online softmax over the chunk's positions ------------------------
        # positions [0, t0] in blocks of BLK; chunk c takes blocks [c * per, (c + 1) * per). Past the last position
        # a block reads the last position again (never an unwritten slot) and masks its logit.
        for task in T.parallel(nb * HKV * NC) if parallel else T.serial(nb * HKV * NC):
            b = task // (HKV * NC)
            h = task // NC % HKV
            c = task % NC
            qs = T.alloc_buffer((G, D), F32, scope="local")
            lg = T.alloc_buffer((G, BLK), F32, scope="local")
            pp = T.alloc_buffer((BLK, VL), F32, scope="local")
            acc = T.alloc_buffer((G, DV), F32, scope="local")
            st = T.alloc_buffer((G, 3), F32, scope="local")       # running max, running sum, block scratch
            cs = T.alloc_buffer((HALF, 2), F32, scope="local")
            per = T.alloc_buffer((1,), "int32", scope="local")
            if rope:
                for i in T.serial(D // 2):
                    cs[i, 0] = T.cos(T.Cast(F32, t0) * FR[i])
                    cs[i, 1] = T.sin(T.Cast(F32, t0) * FR[i])
            for gi in T.serial(G):
                if rope:
                    for i in T.serial(D // 2):
                        qs[gi, 2 * i] = (Q[b, h * G + gi, 2 * i] * cs[i, 0] - Q[b, h * G + gi, 2 * i + 1] * cs[i, 1]) \
                            * scale
                        qs[gi, 2 * i + 1] = (Q[b, h * G + gi, 2 * i] * cs[i, 1]
                                             + Q[b, h * G + gi, 2 * i + 1] * cs[i, 0]) * scale
                else:
                    for i in T.vectorized(D):
                        qs[gi, i] = Q[b, h * G + gi, i] * scale
                st[gi, 0] = neg
                st[gi, 1] = T.float32(0.0)
                for i in T.vectorized(DV):
                    acc[gi, i] = T.float32(0.0)
            per[0] = ((t0 + BLK) // BLK + NC - 1) // NC
            for jb in T.serial(per[0]):
                if (c * per[0] + jb) * BLK <= t0:
                    for gi in T.serial(G):
                        for j in T.serial(BLK):
                            for l in T.vectorized(VL):
                                pp[j, l] = T.float32(0.0)
                            for dc in T.serial(D // VL):
                                for l in T.vectorized(VL):
                                    pp[j, l] = pp[j, l] + qs[gi, dc * VL + l] * _widen(
                                        KC[b, h, T.min((c * per[0] + jb) * BLK + j, t0), dc * VL + l], cdt)
                        for j in T.unroll(BLK):   # each position's lanes summed by halves
                            if VL >= 16:
                                for l in T.vectorized(8):
                                    pp[j, l] = pp[j, l] + pp[j, l + 8]
                            if VL >= 8:
                                for l in T.vectorized(4):
                                    pp[j, l] = pp[j, l] + pp[j, l + 4]
                            if VL >= 4:
                                for l in T.vectorized(2):
                                    pp[j, l] = pp[j, l] + pp[j, l + 2]
                            if VL >= 2:
                                lg[gi, j] = pp[j, 0] + pp[j, 1]
                            else:
                                lg[gi, j] = pp[j, 0]
                        if key_padding:
                            for j in T.serial(BLK):
                                lg[gi, j] = T.Select((c * per[0] + jb) * BLK + j <= t0, T.Select(
                                    KM[b, T.min((c * per[0] + jb) * BLK + j, t0)] != T.uint8(0), lg[gi, j], neg),
                                    far)
                        else:
                            for j in T.vectorized(BLK):
                                lg[gi, j] = T.Select((c * per[0] + jb) * BLK + j <= t0, lg[gi, j], neg)
                        # block max, one rescale of the running sum and output
                        st[gi, 2] = st[gi, 0]
                        for j in T.serial(BLK):
                            st[gi, 2] = T.max(st[gi, 2], lg[gi, j])
                        for i in T.vectorized(DV):
                            acc[gi, i] = acc[gi, i] * exp(st[gi, 0] - st[gi, 2])
                        st[gi, 1] = st[gi, 1] * exp(st[gi, 0] - st[gi, 2])
                        st[gi, 0] = st[gi, 2]
                        for j in T.vectorized(BLK):
                            lg[gi, j] = exp(lg[gi, j] - st[gi, 0])
                        for j in T.serial(BLK):
                            st[gi, 1] = st[gi, 1] + lg[gi, j]
                    for j in T.serial(BLK):
                        for gi in T.serial(G):
                            for vc in T.serial(DV // VV):
                                for l in T.vectorized(VV):
                                    acc[gi, vc * VV + l] = acc[gi, vc * VV + l] + lg[gi, j] * _widen(
                                        VC[b, h, T.min((c * per[0] + jb) * BLK + j, t0), vc * VV + l], cdt)
            for gi in T.serial(G):
                WK[b, h, c, gi, DV] = st[gi, 0]
                WK[b, h, c, gi, DV + 1] = st[gi, 1]
                for i in T.vectorized(DV):
                    WK[b, h, c, gi, i] = acc[gi, i]
        # -- combine the chunks (log-sum-exp) ------------------------------------------------------------
        for task in T.serial(nb * H):   # small: a parallel launch would cost more than it saves
            b = task // H
            hq = task % H
            red = T.alloc_buffer((3,), F32, scope="local")
            res = T.alloc_buffer((DV,), F32, scope="local")
            red[0] = neg
            for c in T.serial(NC):
                red[0] = T.max(red[0], WK[b, hq // G, c, hq % G, DV])
            red[1] = T.float32(0.0)
            for i in T.vectorized(DV):
                res[i] = T.float32(0.0)
            for c in T.serial(NC):
                red[2] = exp(WK[b, hq // G, c, hq % G, DV] - red[0])
                red[1] = red[1] + red[2] * WK[b, hq // G, c, hq % G, DV + 1]
                for i in T.vectorized(DV):
                    res[i] = res[i] + red[2] * WK[b, hq // G, c, hq % G, i]
            for i in T.vectorized(DV):
                O[b, hq, i] = res[i] / red[1]

    return attention_decode


def feedback_decode_kernel(width: int, scale: float, key_dtype: str, chunks: int, block: int, lanes: int,
                           parallel: bool = True):
    W = width
    NC, BLK = chunks, block
    VL = _lanes(W, lanes)
    exp = make_exp(F32)
    neg = FloatImm(F32, MASKED)
    scale = FloatImm(F32, float(scale))
    kdt = key_dtype

    @T.prim_func
    def feedback_decode(f_h: T.handle, q_h: T.handle, k_h: T.handle, g_h: T.handle, kb_h: T.handle,
                        s_h: T.handle, t0: T.int32, w_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "feedback_decode", "tirx.noalias": True})
        nb = T.int32()
        L = T.int32()
        Fn = T.match_buffer(f_h, (nb, W), F32)
        Qb = T.match_buffer(q_h, (nb, W), F32)
        Kn = T.match_buffer(k_h, (nb, W), F32)
        Gm = T.match_buffer(g_h, (nb,), F32)
        KB = T.match_buffer(kb_h, (nb, L, W), _storage(kdt))
        S = T.match_buffer(s_h, (nb, L, W), F32)
        WK = T.match_buffer(w_h, (nb, NC, W + 2), F32)
        O = T.match_buffer(o_h, (nb, W), F32)
        for b in T.serial(nb):
            for i in T.serial(W):
                KB[b, t0, i] = _narrow(Kn[b, i], kdt)
        # -- per (batch, chunk): online softmax of q_b against the strictly earlier keys -------------------
        # positions [0, t0) in blocks of BLK (clamped reads past the last one, masked logits), as in attention
        for task in T.parallel(nb * NC) if parallel else T.serial(nb * NC):
            b = task // NC
            c = task % NC
            qs = T.alloc_buffer((W,), F32, scope="local")
            acc = T.alloc_buffer((W,), F32, scope="local")
            lg = T.alloc_buffer((BLK,), F32, scope="local")
            pp = T.alloc_buffer((BLK, VL), F32, scope="local")
            st = T.alloc_buffer((3,), F32, scope="local")
            per = T.alloc_buffer((1,), "int32", scope="local")
            for i in T.vectorized(W):
                qs[i] = Qb[b, i] * scale
            for i in T.vectorized(W):
                acc[i] = T.float32(0.0)
            st[0] = neg
            st[1] = T.float32(0.0)
            per[0] = ((t0 + BLK - 1) // BLK + NC - 1) // NC
            for jb in T.serial(per[0]):
                if (c * per[0] + jb) * BLK < t0:
                    for j in T.serial(BLK):
                        for l in T.vectorized(VL):
                            pp[j, l] = T.float32(0.0)
                        for dc in T.serial(W // VL):
                            for l in T.vectorized(VL):
                                pp[j, l] = pp[j, l] + qs[dc * VL + l] * _widen(
                                    KB[b, T.min((c * per[0] + jb) * BLK + j, t0 - 1), dc * VL + l], kdt)
                    for j in T.vectorized(BLK):
                        lg[j] = T.float32(0.0)
                    for l in T.unroll(VL):
                        for j in T.vectorized(BLK):
                            lg[j] = lg[j] + pp[j, l]
                    for j in T.vectorized(BLK):
                        lg[j] = T.Select((c * per[0] + jb) * BLK + j < t0, lg[j], neg)
                    st[2] = st[0]
                    for j in T.serial(BLK):
                        st[2] = T.max(st[2], lg[j])
                    for i in T.vectorized(W):
                        acc[i] = acc[i] * exp(st[0] - st[2])
                    st[1] = st[1] * exp(st[0] - st[2])
                    st[0] = st[2]
                    for j in T.vectorized(BLK):
                        lg[j] = exp(lg[j] - st[0])
                    for j in T.serial(BLK):
                        st[1] = st[1] + lg[j]
                    for j in T.serial(BLK):
                        for dc in T.serial(W // VL):
                            for l in T.vectorized(VL):
                                acc[dc * VL + l] = acc[dc * VL + l] + lg[j] * S[
                                    b, T.min((c * per[0] + jb) * BLK + j, t0 - 1), dc * VL + l]
            WK[b, c, W] = st[0]
            WK[b, c, W + 1] = st[1]
            for i in T.vectorized(W):
                WK[b, c, i] = acc[i]
        # -- combine, add to f, write the solved state ----------------------------------------------------
        for task in T.serial(nb * (W // VL)):   # small: a parallel launch would cost more than it saves
            b = task // (W // VL)
            col = task % (W // VL) * VL
            red = T.alloc_buffer((3,), F32, scope="local")
            res = T.alloc_buffer((VL,), F32, scope="local")
            for l in T.vectorized(VL):
                res[l] = T.float32(0.0)
            red[1] = T.float32(0.0)
            if t0 > 0:
                red[0] = neg
                for c in T.serial(NC):
                    red[0] = T.max(red[0], WK[b, c, W])
                for c in T.serial(NC):
                    red[2] = exp(WK[b, c, W] - red[0])
                    red[1] = red[1] + red[2] * WK[b, c, W + 1]
                    for l in T.vectorized(VL):
                        res[l] = res[l] + red[2] * WK[b, c, col + l]
                red[1] = Gm[b] / red[1]
            for l in T.vectorized(VL):
                O[b, col + l] = Fn[b, col + l] + red[1] * res[l]
                S[b, t0, col + l] = Fn[b, col + l] + red[1] * res[l]

    return feedback_decode


RB = 4   # rows of a weight matrix per unit of the matrix-vector kernels: independent accumulators (FMA latency
#          and four weight streams in flight), so one thread reads the weights near its cache's rate


def _gemv_units(outs: tuple):
    """Per layer (blocks of RB rows, single rows after them) as unit-index boundaries: the loop over units runs
    every layer's output rows, RB at a time where they fill a block."""
    bounds, u = [], 0
    for o in outs:
        nb, rem = o // RB, o % RB
        bounds.append((u, u + nb, u + nb + rem))
        u += nb + rem
    return bounds, u


def _gemv_macros(IN: int, VL: int):
    @T.macro
    def rows(X, Wt, Bb, Out, r0, m, part, has_bias, n):
        """Output rows r0 .. r0+n-1 of every input row: n accumulators of VL lanes, then n lane sums."""
        for i in T.serial(m):
            for rr in T.unroll(n):
                for l in T.vectorized(VL):
                    part[rr, l] = T.float32(0.0)
            for dc in T.serial(IN // VL):
                for rr in T.unroll(n):
                    for l in T.vectorized(VL):
                        part[rr, l] = part[rr, l] + X[i, dc * VL + l] * Wt[r0 + rr, dc * VL + l]
            for rr in T.unroll(n):
                if VL >= 16:
                    for l in T.vectorized(8):
                        part[rr, l] = part[rr, l] + part[rr, l + 8]
                if VL >= 8:
                    for l in T.vectorized(4):
                        part[rr, l] = part[rr, l] + part[rr, l + 4]
                if VL >= 4:
                    for l in T.vectorized(2):
                        part[rr, l] = part[rr, l] + part[rr, l + 2]
                if VL >= 2:
                    part[rr, 0] = part[rr, 0] + part[rr, 1]
                if has_bias:
                    Out[i, r0 + rr] = part[rr, 0] + Bb[r0 + rr]
                else:
                    Out[i, r0 + rr] = part[rr, 0]

    return rows


def linear_decode_kernel(in_features: int, out_features: int, bias: bool, lanes: int, parallel: bool = True):
    """``linear_decode(x, w, b, out)``: out [M, OUT] = x [M, IN] @ w[OUT, IN]^T (+ b) for the few rows of a decode
    step (M symbolic); a loop over units of RB output rows (then single rows), each weight row read once per unit
    while the M input rows stay in L1. ``parallel=False``: the loop on the calling thread (no thread-pool launch)."""
    IN, OUT = in_features, out_features
    VL = _lanes(IN, lanes)
    ((b0, b1, b2),), U = _gemv_units((OUT,))
    rows = _gemv_macros(IN, VL)

    @T.prim_func
    def linear_decode(x_h: T.handle, w_h: T.handle, b_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "linear_decode", "tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x_h, (m, IN), F32)
        Wt = T.match_buffer(w_h, (OUT, IN), F32)
        Bb = T.match_buffer(b_h, (OUT,), F32)
        O = T.match_buffer(o_h, (m, OUT), F32)
        for u in T.parallel(U) if parallel else T.serial(U):
            part = T.alloc_buffer((RB, VL), F32, scope="local")
            if u < b1:
                rows(X, Wt, Bb, O, (u - b0) * RB, m, part, bias, RB)
            else:
                rows(X, Wt, Bb, O, (b1 - b0) * RB + (u - b1), m, part, bias, 1)

    return linear_decode


MAX_FUSED = 5   # linear layers of one input run by one linears_decode call


def linears_decode_kernel(in_features: int, outs: tuple, biases: tuple, lanes: int, parallel: bool = True):
    """``linears_decode(x, w0..w4, b0..b4, o0..o4)``: up to MAX_FUSED linear layers reading the same input x [M, IN]
    in one loop over all their output rows (one launch of the thread pool instead of one per layer when parallel).
    ``outs[i]`` is layer i's output width (0: an unused slot, given a dummy buffer); ``biases[i]`` whether it has
    a bias (else its bias buffer is a dummy and never read). ``parallel=False``: the loop on the calling thread."""
    IN = in_features
    VL = _lanes(IN, lanes)
    O = tuple(outs) + (0,) * (MAX_FUSED - len(outs))
    HB = tuple(biases) + (False,) * (MAX_FUSED - len(biases))
    bounds, U = _gemv_units(O)
    (a0, a1, a2), (c0, c1, c2), (d0, d1, d2), (e0, e1, e2), (f0, f1, f2) = bounds
    S = tuple(max(o, 1) for o in O)   # buffer extents (unused slots: one element)
    rows = _gemv_macros(IN, VL)

    @T.prim_func
    def linears_decode(x_h: T.handle, w0_h: T.handle, w1_h: T.handle, w2_h: T.handle, w3_h: T.handle,
                       w4_h: T.handle, b0_h: T.handle, b1_h: T.handle, b2_h: T.handle, b3_h: T.handle,
                       b4_h: T.handle, o0_h: T.handle, o1_h: T.handle, o2_h: T.handle, o3_h: T.handle,
                       o4_h: T.handle):
        T.func_attr({"global_symbol": "linears_decode", "tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x_h, (m, IN), F32)
        W0 = T.match_buffer(w0_h, (S[0], IN), F32)
        W1 = T.match_buffer(w1_h, (S[1], IN), F32)
        W2 = T.match_buffer(w2_h, (S[2], IN), F32)
        W3 = T.match_buffer(w3_h, (S[3], IN), F32)
        W4 = T.match_buffer(w4_h, (S[4], IN), F32)
        B0 = T.match_buffer(b0_h, (S[0],), F32)
        B1 = T.match_buffer(b1_h, (S[1],), F32)
        B2 = T.match_buffer(b2_h, (S[2],), F32)
        B3 = T.match_buffer(b3_h, (S[3],), F32)
        B4 = T.match_buffer(b4_h, (S[4],), F32)
        O0 = T.match_buffer(o0_h, (m, S[0]), F32)
        O1 = T.match_buffer(o1_h, (m, S[1]), F32)
        O2 = T.match_buffer(o2_h, (m, S[2]), F32)
        O3 = T.match_buffer(o3_h, (m, S[3]), F32)
        O4 = T.match_buffer(o4_h, (m, S[4]), F32)
        for u in T.parallel(U) if parallel else T.serial(U):
            part = T.alloc_buffer((RB, VL), F32, scope="local")
            if u < a1:
                rows(X, W0, B0, O0, (u - a0) * RB, m, part, HB[0], RB)
            elif u < a2:
                rows(X, W0, B0, O0, (a1 - a0) * RB + (u - a1), m, part, HB[0], 1)
            elif u < c1:
                rows(X, W1, B1, O1, (u - c0) * RB, m, part, HB[1], RB)
            elif u < c2:
                rows(X, W1, B1, O1, (c1 - c0) * RB + (u - c1), m, part, HB[1], 1)
            elif u < d1:
                rows(X, W2, B2, O2, (u - d0) * RB, m, part, HB[2], RB)
            elif u < d2:
                rows(X, W2, B2, O2, (d1 - d0) * RB + (u - d1), m, part, HB[2], 1)
            elif u < e1:
                rows(X, W3, B3, O3, (u - e0) * RB, m, part, HB[3], RB)
            elif u < e2:
                rows(X, W3, B3, O3, (e1 - e0) * RB + (u - e1), m, part, HB[3], 1)
            elif u < f1:
                rows(X, W4, B4, O4, (u - f0) * RB, m, part, HB[4], RB)
            else:
                rows(X, W4, B4, O4, (f1 - f0) * RB + (u - f1), m, part, HB[4], 1)

    return linears_decode
