"""The one-pass Triton forward of ``feedback_chunked``: no separate log-sum-exp pass, no parallel inverse pass.

Per outer chunk of CO rows at r0 (in sequence, a host loop), three launches:

1. ``feedback_probs_online`` (grid CO/PM x key tiles x B): each program computes one PM x PN tile of
   logits (contracting over the full width, the only place the logits are computed), its row max m_tile
   and row sum l_tile = sum exp(z - m_tile) over the strictly causal columns, and stores
   P = exp(z - m_tile) (bf16 for bf16 models on a GPU, else fp32) with (m_tile, l_tile) per row and tile.
   The key range of the chunk is split into PN-wide tiles, one program each: a split-K online softmax.
2. ``feedback_update_online`` (grid CO/UM x (1 + D_V/UN) x B*splits): the combine. Every program merges
   its rows' per-tile partials into the row max m and sum l (flash-decoding style), then
   - programs with axis 1 > 0: S[rows] = f[rows] + sum_k (gamma/l * exp(m_tile(k) - m) * P[:, k]) @ s[k]
     over the earlier chunks' columns (rescaled in the update; bf16 operands for bf16 models, reading the
     bf16 output rows of s; else the policy's TF32 / 3xTF32 on the fp32 workspace), split over the
     earlier rows when the grid is small (split 0 writes S, split q > 0 partial sums to PART);
   - programs with axis 1 == 0 (split 0, issued first): the rows' lse = m + log l (kept for the backward
     and the solve) and the inverses (I - A_ii)^-1 of the row block's C x C diagonal blocks, A_ii rebuilt
     from the stored P, by repeated squaring (A is nilpotent).
3. ``feedback_solve_online`` (grid D_V/BLOCK_DV x B): the chunk's inner blocks in order,
   s_i = dinv_i (S_i + sum_{i' < i} (gamma exp(m_tile - lse) P)[i, i'] s_i').

The whole forward reads q_b and k_b once per outer chunk's logits and never recomputes a logit.
"""
from __future__ import annotations

from ...errors import UnsupportedError
from ...ir.graph import Node
from .codegen import AOT_POINTER, TRITON_DTYPE, KernelSource, dot_block, dot_policy, next_pow2
from .feedback import CHUNK_SOLVE_BLOCK_DV, _constants, _row_strides, _widths, default_outer_chunk, direct_launch, \
    update_splits


def _combine(rows_local: str, n: str, indent: str) -> str:
    """Source merging the per-tile (M, L) partials of the chunk rows ``rows_local`` into m_row, l_row."""
    return (f"{indent}m_row = tl.full([{n}], -1.0e30, tl.float32)\n"
            f"{indent}l_row = tl.zeros([{n}], tl.float32)\n"
            f"{indent}for t0 in range(0, NT, NTB):\n"
            f"{indent}    tt = t0 + tl.arange(0, NTB)\n"
            f"{indent}    ml = (b * CO + {rows_local})[:, None] * NTS + tt[None, :]\n"
            f"{indent}    mt = tl.load(M + ml, mask=tt[None, :] < NT, other=-1.0e30)\n"
            f"{indent}    lt = tl.load(L + ml, mask=tt[None, :] < NT, other=0.0)\n"
            f"{indent}    m_new = tl.maximum(m_row, tl.max(mt, axis=1))\n"
            f"{indent}    l_row = l_row * tl.exp(m_row - m_new) + tl.sum(lt * tl.exp(mt - m_new[:, None]), axis=1)\n"
            f"{indent}    m_row = m_new\n")


def generate_online(node: Node, dtypes: dict, interpret: bool, outer_chunk: int | None = None,
                    low_storage: bool | None = None) -> KernelSource:
    """``low_storage`` (default: 16-bit models on a GPU) stores P in the model's dtype and has the update read the
    16-bit output rows of s; under the interpreter its products stay fp32 (its bf16 arithmetic is broken), so tests
    can run that data path."""
    d_qk, d_v = _widths(node, 0)
    C = node.attrs["chunk_size"]
    CO = outer_chunk or default_outer_chunk(C, interpret)
    if CO % C or CO & (CO - 1) or C & (C - 1):
        raise UnsupportedError(f"op 'feedback_chunked': the outer chunk must be a power-of-two multiple of the "
                               f"power-of-two chunk_size={C}, got {CO}")
    qdt, fdt = dtypes["q_b"], dtypes["f"]
    pol = dot_policy(qdt, interpret)
    solve = dot_policy(fdt, interpret)["solve_precision"]
    dd = pol["dot_dtype"]
    # 16-bit models on a GPU: P stored in the model's dtype (exp(z - m_tile) lies in (0, 1]) and the update's
    # products in that dtype on the bf16 output rows of s; otherwise fp32 P and the policy's TF32 / 3xTF32
    low = qdt in ("bf16", "f16") and fdt == qdt and (not interpret if low_storage is None else low_storage)
    p_ptr = AOT_POINTER[qdt] if low else "*fp32"
    separate_out = fdt != "f32"
    ptr, gptr = AOT_POINTER[qdt], AOT_POINTER[dtypes["gamma"]]
    scale = node.attrs["scale"]
    spec = {"D_qk": d_qk, "D_v": d_v, "chunk_size": C, "dtype": qdt, "f_dtype": fdt, "gamma_dtype": dtypes["gamma"],
            "scale": scale}
    pm = min(128, CO)
    pn = max(C, min(128, CO))           # key tile: a multiple of C, so an inner block lies in one tile
    pk = dot_block(d_qk, 64)
    ntb = 64 if not interpret else 16   # key tiles merged per step of the combine
    kmask = "" if d_qk % pk == 0 else " & ((k0 + kk)[None, :] < D_QK)"
    kmask_t = "" if d_qk % pk == 0 else " & ((k0 + kk)[:, None] < D_QK)"

    # 1. logits tile, its row max / sum, P relative to the tile's max
    body = _constants(D_QK=d_qk, SCALE=scale, CO=CO, BLOCK_M=pm, BLOCK_N=pn, BLOCK_K=pk)
    body += ("@triton.jit\n"
             "def feedback_probs_online(Q, K, P, M, L, T, r0, NTS, stride_p, stride_qb, stride_qt, stride_kb,\n"
             "                          stride_kt):\n"
             "    # P[r, j] = exp(z - m_tile[r]), z = q_b[r0+r].k_b[j]*SCALE for j < r0+r (else 0); M, L: the\n"
             "    # tile's row max and sum exp(z - m_tile), [B, CO, NTS]\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    rows = r0 + r\n"
             "    n0 = pid_n * BLOCK_N\n"
             "    cols = n0 + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    q_base = Q + b * stride_qb\n"
             "    k_base = K + b * stride_kb\n"
             "    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)\n"
             "    l_t = tl.zeros([BLOCK_M], tl.float32)\n"
             "    if n0 < r0 + (pid_m + 1) * BLOCK_M - 1:   # some column left of the block's last row\n"
             "        logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
             "        for k0 in range(0, D_QK, BLOCK_K):\n"
             f"            q = tl.load(q_base + rows[:, None] * stride_qt + (k0 + kk)[None, :], mask=(rows[:, None] < T){kmask}, other=0.0)\n"
             f"            kt = tl.load(k_base + cols[None, :] * stride_kt + (k0 + kk)[:, None], mask=(cols[None, :] < T){kmask_t}, other=0.0)\n"
             f"            logits += tl.dot(q.to({dd}), kt.to({dd}), out_dtype=tl.float32, input_precision=\"{pol['dot_precision']}\")\n"
             "        z = tl.where((cols[None, :] < rows[:, None]) & (rows[:, None] < T), logits * SCALE, float(\"-inf\"))\n"
             "        m_t = tl.maximum(m_t, tl.max(z, axis=1))\n"
             "        p = tl.exp(z - m_t[:, None])\n"
             "        l_t = tl.sum(p, axis=1)\n"
             "        tl.store(P + (b * CO + r[:, None]) * stride_p + cols[None, :], p.to(P.dtype.element_ty))\n"
             "    tl.store(M + (b * CO + r) * NTS + pid_n, m_t)\n"
             "    tl.store(L + (b * CO + r) * NTS + pid_n, l_t)\n")
    probs = KernelSource(
        "feedback_probs_online", "feedback_chunked", spec,
        {"CO": CO, "BLOCK_M": pm, "BLOCK_N": pn, "BLOCK_K": pk, "p_dtype": p_ptr[1:], "dot_dtype": dd,
         "dot_precision": pol["dot_precision"]},
        body, {"Q": ptr, "K": ptr, "P": p_ptr, "M": "*fp32", "L": "*fp32", "T": "i32", "r0": "i32", "NTS": "i32",
               "stride_p": "i32", "stride_qb": "i64", "stride_qt": "i32", "stride_kb": "i64", "stride_kt": "i32"},
        do_not_specialize=("T", "NTS"), num_warps=8, num_stages=3)

    # 2. combine, then the earlier chunks' contribution (rescaled) or the lse and the diagonal inverses
    um, un, uk = min(128, CO), dot_block(d_v, 128), (64 if low else min(32, C))
    uk = min(uk, pn)
    ud = TRITON_DTYPE[qdt] if low and not interpret else "tl.float32"
    uprec = "tf32" if low and not interpret else solve
    vmask = "" if d_v % un == 0 else " & (vcols[None, :] < D_V)"
    log2c = C.bit_length() - 1
    body = _constants(D_V=d_v, C=C, LOG2_C=log2c, CO=CO, PN=pn, NTB=ntb, BLOCK_M=um, BLOCK_N=un, BLOCK_K=uk)
    body += ("@triton.jit\n"
             "def feedback_update_online(F, P, M, L, GAMMA, SPREV, S, PART, DINV, LSE, T, r0, NB, NT, NTS, k_per_split,\n"
             "                           stride_p, stride_fb, stride_ft, stride_gb, stride_gt, stride_sb, stride_st):\n"
             "    # axis 1 == 0: lse of the rows, inverses of their diagonal blocks; axis 1 = 1 + n: value columns n of\n"
             "    # S[rows] = f + (gamma / l * exp(M - m) * P)[:, :r0] @ s[:r0] (s read from SPREV); split q > 0 of the\n"
             "    # earlier rows writes its partial sum to PART[q - 1]\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    split = tl.program_id(2) // NB\n"
             "    b = (tl.program_id(2) % NB).to(tl.int64)\n"
             "    if pid_n == 0:\n"
             "        if split == 0:\n"
             "            rr = tl.arange(0, C)\n"
             "            for ib in tl.static_range(BLOCK_M // C):\n"
             "                rl = pid_m * BLOCK_M + ib * C + rr\n"
             "                rows = r0 + rl\n")
    body += _combine("rl", "C", "                ")
    body += ("                lse = tl.where(l_row > 0.0, m_row + tl.log(tl.maximum(l_row, 1e-30)), 0.0)\n"
             "                tl.store(LSE + b * T + rows, lse, mask=rows < T)\n"
             "                gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "                c0 = r0 + pid_m * BLOCK_M + ib * C\n"
             "                m_d = tl.load(M + (b * CO + rl) * NTS + c0 // PN)\n"
             "                sc = gamma * tl.exp(m_d - lse)\n"
             "                a = tl.load(P + (b * CO + rl[:, None]) * stride_p + (c0 + rr)[None, :]).to(tl.float32)\n"
             "                a = tl.where((rr[None, :] < rr[:, None]) & (rows[:, None] < T), a * sc[:, None], 0.0)\n"
             "                x = tl.where(rr[:, None] == rr[None, :], 1.0, 0.0) + a   # sum_{k<2} A^k\n"
             "                a_pow = a\n"
             "                for _ in tl.static_range(LOG2_C - 1):   # x <- x (I + A^(2^i))\n"
             f"                    a_pow = tl.dot(a_pow, a_pow, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             f"                    x = x + tl.dot(x, a_pow, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "                tl.store(DINV + ((b * (CO // C) + pid_m * (BLOCK_M // C) + ib) * C + rr[:, None]) * C + rr[None, :], x)\n"
             "    else:\n"
             "        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "        rows = r0 + r\n"
             "        vcols = (pid_n - 1) * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "        kk = tl.arange(0, BLOCK_K)\n"
             f"        io_mask = (rows[:, None] < T){vmask}\n"
             "        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
             "        if split == 0:\n"
             "            acc += tl.load(F + b * stride_fb + rows[:, None] * stride_ft + vcols[None, :], mask=io_mask, other=0.0).to(tl.float32)\n"
             "        k_hi = tl.minimum(r0, (split + 1) * k_per_split)\n"
             "        if split * k_per_split < k_hi:\n")
    body += _combine("r", "BLOCK_M", "            ")
    body += ("            gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "            g_over_l = tl.where(l_row > 0.0, gamma / tl.maximum(l_row, 1e-30), 0.0)\n"
             "            for k0 in range(split * k_per_split, k_hi, BLOCK_K):   # multiples of BLOCK_K, below r0\n"
             "                m_k = tl.load(M + (b * CO + r) * NTS + k0 // PN)\n"
             "                sc = g_over_l * tl.exp(m_k - m_row)\n"
             "                p = tl.load(P + (b * CO + r[:, None]) * stride_p + (k0 + kk)[None, :]).to(tl.float32) * sc[:, None]\n"
             f"                sv = tl.load(SPREV + b * stride_sb + (k0 + kk)[:, None] * stride_st + vcols[None, :]{', mask=vcols[None, :] < D_V, other=0.0' if vmask else ''})\n"
             f"                acc += tl.dot(p.to({ud}), sv.to({ud}), out_dtype=tl.float32, input_precision=\"{uprec}\")\n"
             "        if split == 0:\n"
             "            tl.store(S + b * T * D_V + rows[:, None] * D_V + vcols[None, :], acc, mask=io_mask)\n"
             "        else:\n"
             "            part = PART + (((split - 1) * NB + b) * CO + r[:, None]) * D_V + vcols[None, :]\n"
             f"            tl.store(part, acc{', mask=vcols[None, :] < D_V' if vmask else ''})\n")
    update = KernelSource(
        "feedback_update_online", "feedback_chunked", spec,
        {"CO": CO, "BLOCK_M": um, "BLOCK_N": un, "BLOCK_K": uk, "NTB": ntb, "update_dtype": ud,
         "update_precision": uprec, "solve_precision": solve}, body,
        {"F": AOT_POINTER[fdt], "P": p_ptr, "M": "*fp32", "L": "*fp32", "GAMMA": gptr,
         "SPREV": AOT_POINTER[fdt] if low else "*fp32", "S": "*fp32", "PART": "*fp32", "DINV": "*fp32",
         "LSE": "*fp32", "T": "i32", "r0": "i32", "NB": "i32", "NT": "i32", "NTS": "i32", "k_per_split": "i32",
         "stride_p": "i32", "stride_fb": "i64", "stride_ft": "i32", "stride_gb": "i64", "stride_gt": "i32",
         "stride_sb": "i64", "stride_st": "i32"},
        do_not_specialize=("T", "NB", "NT", "NTS"), num_warps=8, num_stages=3)

    # 3. the inner blocks of the chunk, in order, by the inverses the update wrote
    block_dv = dot_block(d_v, CHUNK_SOLVE_BLOCK_DV)
    vmask = "" if d_v % block_dv == 0 else " & (vcols[None, :] < D_V)"
    out_args = ", OUT, stride_ob, stride_ot" if separate_out else ""
    body = _constants(D_V=d_v, C=C, CO=CO, PN=pn, BLOCK_DV=block_dv)
    body += ("@triton.jit\n"
             f"def feedback_solve_online(P, M, LSE, GAMMA, DINV, S, PART{out_args}, T, r0, NTS, stride_p, n_parts,\n"
             "                          stride_gb, stride_gt):\n"
             "    # s_i = dinv_i (S_i + sum_{i' < i in this chunk} (gamma exp(M - lse) P)[i, i'] s_i'), block by block\n"
             "    pid_v = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    vcols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)\n"
             "    r = tl.arange(0, C)\n"
             "    s_base = S + b * T * D_V   # fp32 workspace, contiguous [B, T, D_V]\n"
             "    n_inner = tl.cdiv(tl.minimum(CO, T - r0), C)\n"
             "    for i in range(0, n_inner):\n"
             "        rl = i * C + r\n"
             "        rows = r0 + rl\n"
             f"        io_mask = (rows[:, None] < T){vmask}\n"
             "        acc = tl.load(s_base + rows[:, None] * D_V + vcols[None, :], mask=io_mask, other=0.0)\n"
             "        for q in range(0, n_parts):   # partial sums of the update's split over earlier rows\n"
             "            acc += tl.load(PART + ((q * tl.num_programs(1) + b) * CO + rl[:, None]) * D_V + vcols[None, :], "
             f"mask=(r[:, None] >= 0){vmask}, other=0.0)\n"
             "        lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "        gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "        for i2 in tl.range(0, i, num_stages=2):\n"
             "            c0 = r0 + i2 * C\n"
             "            sc = gamma * tl.exp(tl.load(M + (b * CO + rl) * NTS + c0 // PN) - lse)\n"
             "            p = tl.load(P + (b * CO + rl[:, None]) * stride_p + (c0 + r)[None, :]).to(tl.float32) * sc[:, None]\n"
             f"            sv = tl.load(s_base + (c0 + r)[:, None] * D_V + vcols[None, :]{', mask=vcols[None, :] < D_V, other=0.0' if vmask else ''})\n"
             f"            acc += tl.dot(p, sv, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        dinv = tl.load(DINV + ((b * (CO // C) + i) * C + r[:, None]) * C + r[None, :])\n"
             f"        s_c = tl.dot(dinv, acc, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        tl.store(s_base + rows[:, None] * D_V + vcols[None, :], s_c, mask=io_mask)\n")
    if separate_out:
        body += ("        tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + vcols[None, :], "
                 "s_c.to(OUT.dtype.element_ty), mask=io_mask)\n")
    body += "        tl.debug_barrier()   # the next inner block reads these rows of s from other threads\n"
    sig = {"P": p_ptr, "M": "*fp32", "LSE": "*fp32", "GAMMA": gptr, "DINV": "*fp32", "S": "*fp32", "PART": "*fp32"}
    if separate_out:
        sig.update({"OUT": AOT_POINTER[fdt], "stride_ob": "i64", "stride_ot": "i32"})
    sig.update({"T": "i32", "r0": "i32", "NTS": "i32", "stride_p": "i32", "n_parts": "i32", "stride_gb": "i64",
                "stride_gt": "i32"})
    return KernelSource(
        "feedback_solve_online", "feedback_chunked", spec,
        {"CO": CO, "BLOCK_DV": block_dv, "PN": pn, "p_dtype": p_ptr[1:], "strategy": "one pass: per outer chunk, "
         "logits once with split-K row max/sum, combine + rescale + inverses in the update, inner blocks",
         "solve_precision": solve}, body, sig,
        do_not_specialize=("T", "NTS", "n_parts"), num_warps=4, num_stages=2, parts=(probs, update))


def launch_online(kernel, f, q_b, k_b, gamma, out=None, lse_out=None, target_programs: int = 264,
                  launch=direct_launch):
    """The one-pass solve: per outer chunk (in order) probabilities, combine/update/inverses, inner blocks.
    Returns (s in f's dtype, lse float32 [B, T]). Extra memory: one outer chunk's P [B, CO, T] (bf16 for bf16
    models on a GPU), its per-tile row max/sum [B, CO, T/PN] x 2, its inverses, an fp32 copy of s for 16-bit
    models, and the update's partial sums when it splits over earlier rows."""
    import torch

    B, T, Dv = f.shape
    src = kernel.source
    probs, update = kernel.parts["feedback_probs_online"], kernel.parts["feedback_update_online"]
    ps, us = probs.source, update.source
    CO, C, PN = src.tunables["CO"], src.specialisation["chunk_size"], src.tunables["PN"]
    dev = f.device
    if out is None:
        out = torch.empty(B, T, Dv, dtype=f.dtype, device=dev)
    lse = torch.empty(B, T, dtype=torch.float32, device=dev) if lse_out is None else lse_out
    out_args = ()
    s = out
    if f.dtype != torch.float32:
        s = torch.empty(B, T, Dv, dtype=torch.float32, device=dev)
        out_args = (out, *_row_strides(out))
    low = src.tunables["p_dtype"] != "fp32"
    s_prev = out if low else s   # what the update reads for earlier rows (the 16-bit output for 16-bit P)
    nts = -(-T // PN)
    stride_p = nts * PN
    p = torch.empty(B, CO, stride_p, dtype=q_b.dtype if low else torch.float32, device=dev)
    m_part = torch.empty(B, CO, nts, dtype=torch.float32, device=dev)
    l_part = torch.empty(B, CO, nts, dtype=torch.float32, device=dev)
    dinv = torch.empty(B, CO // C, C, C, dtype=torch.float32, device=dev)
    pm, um, un = ps.tunables["BLOCK_M"], us.tunables["BLOCK_M"], us.tunables["BLOCK_N"]
    nv = -(-Dv // un)
    base = (CO // um) * nv * B
    max_splits = update_splits(base, (-(-T // CO) - 1) * CO, us.tunables["BLOCK_K"], target_programs)[0]
    part = torch.empty(max(1, max_splits - 1), B, CO, Dv, dtype=torch.float32, device=dev)
    for r0 in range(0, T, CO):
        nt = -(-min(r0 + CO, T) // PN)
        launch(probs.fn)[(CO // pm, nt, B)](
            q_b, k_b, p, m_part, l_part, T, r0, nts, stride_p, *_row_strides(q_b), *_row_strides(k_b),
            num_warps=ps.num_warps, num_stages=ps.num_stages)
        splits, per = update_splits(base, r0, us.tunables["BLOCK_K"], target_programs)
        launch(update.fn)[(CO // um, 1 + nv, B * splits)](
            f, p, m_part, l_part, gamma, s_prev, s, part, dinv, lse, T, r0, B, nt, nts, per, stride_p,
            *_row_strides(f), *gamma.stride(), *_row_strides(s_prev),
            num_warps=us.num_warps, num_stages=us.num_stages)
        launch(kernel.fn)[(-(-Dv // src.tunables["BLOCK_DV"]), B)](
            p, m_part, lse, gamma, dinv, s, part, *out_args, T, r0, nts, stride_p, splits - 1, *gamma.stride(),
            num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return out, lse
