"""The feedback's backward as Triton kernels: s = (I - diag(gamma) alpha)^-1 f, alpha[t, j] = softmax_{j<t}
(scale q_b[t] . k_b[j]) (row 0 has no predecessor), given ds. Never forms a T x T matrix.

With G = diag(gamma) alpha and P[t, j] = exp(scale q_b[t].k_b[j] - lse[t]) (j < t; lse the forward's
per-row log-sum-exp, recomputed by the forward's ``feedback_lse`` kernel when not given):

1. df = (I - G)^-T ds, an upper-triangular solve from the last row. The diagonal blocks' inverses
   (I - G_cc)^-1 come from the forward's ``feedback_diag_inverse`` kernel (fully parallel). Then per
   outer chunk of CO rows, last chunk first (a host loop of two launches):
   ``feedback_bwd_update`` (grid: column blocks x value tiles x batch) adds every later row's
   contribution, rhs[j] = ds[j] + sum_{t >= chunk end} G[t, j] df[t], a transposed attention with
   tensor-core products; ``feedback_bwd_solve`` (grid: value tiles x batch) walks the chunk's inner
   blocks from the last, df_i = dinv_i^T (rhs_i + sum_{i' > i} G[i', i]^T df_i').
2. ``feedback_bwd_dq`` (grid: row blocks x batch): per row block, a first pass over the earlier columns
   gives c = alpha s, hence dgamma = df . c (the softmax backward's row term); a second pass gives
   dS = gamma P (df s^T - dgamma) and dq_b = scale dS k_b.
3. ``feedback_bwd_dk`` (grid: column blocks x batch): dk_b = scale dS^T q_b over the later row blocks.

df is accumulated in a float32 workspace [B, T, Dv]; everything else is O(B T) float32.
"""
from __future__ import annotations

import functools

from ...ir.dtypes import from_torch
from ...errors import InputError, UnsupportedError
from ...ir import parse
from .codegen import AOT_POINTER, KERNEL_CACHE, KERNEL_DTYPES, KernelSource, dot_block, dot_policy
from .feedback_bwd_wide import generate_wide, launch_wide
from .feedback import (default_outer_chunk, generate_diag_inverse, generate_lse, launch_diag_inverse,
                       launch_lse)

MAX_WIDTH = 256   # feedback and value widths held whole in one tile


def _consts(**kw) -> str:
    return "".join(f"{k} = tl.constexpr({v!r})\n" for k, v in kw.items()) + "\n\n"


def _tiles(dtype: str, interpret: bool, d_qk: int, d_v: int) -> dict:
    """(BLOCK_M rows, BLOCK_N columns, warps) per kernel; the update's value tile; the solve's value tile."""
    if interpret:
        return {"update": (16, 16, 4), "dq": (16, 16, 4), "dk": (16, 16, 4), "update_dv": 16, "solve_dv": 16}
    if dtype == "f32" or max(d_qk, d_v) > 128:
        return {"update": (32, 64, 4), "dq": (64, 32, 4), "dk": (32, 64, 4), "update_dv": 64, "solve_dv": 32}
    return {"update": (64, 128, 8), "dq": (128, 64, 8), "dk": (64, 128, 8), "update_dv": 128, "solve_dv": 64}


def default_strategy(d_qk: int, d_v: int) -> str:
    """"rows" (whole rows in registers, no T-long workspace) up to MAX_WIDTH, else "strips"."""
    return "rows" if max(d_qk, d_v) <= MAX_WIDTH else "strips"


def generate_feedback_backward(d_qk: int, d_v: int, scale: float, chunk: int, outer: int, dtypes: dict,
                               interpret: bool, tiles: dict | None = None, strategy: str = "rows") -> dict:
    """KernelSources by role: "lse", "dinv" (the forward's), then for strategy "rows" "update", "solve", "dq",
    "dk"; for "strips" feedback_bwd_wide.py's kernels.

    ``dtypes`` names the operands' dtypes: f (also ds and s), q_b (also k_b), gamma."""
    if strategy not in ("rows", "strips"):
        raise UnsupportedError(f"op 'feedback' backward: strategy must be 'rows' or 'strips', got {strategy!r}")
    if strategy == "rows" and max(d_qk, d_v) > MAX_WIDTH:
        raise UnsupportedError(f"op 'feedback' backward: the \"rows\" strategy holds widths up to {MAX_WIDTH}, got "
                               f"d_qk={d_qk}, d_v={d_v}")
    if chunk < 16 or chunk & (chunk - 1) or outer % chunk or outer & (outer - 1):
        raise UnsupportedError(f"op 'feedback' backward: chunk must be a power of two >= 16 and the outer chunk "
                               f"a power-of-two multiple of it, got {chunk} and {outer}")
    qdt, fdt, gdt = dtypes["q_b"], dtypes["f"], dtypes["gamma"]
    names = {"f": fdt, "q_b": qdt, "k_b": qdt, "gamma": gdt}
    text = (f"graph fb(%q: {qdt}[B, T, {d_qk}], %k: {qdt}[B, T, {d_qk}], %g: {gdt}[B, T]) {{\n"
            f"  %lse: f32[B, T] = feedback_lse(%q, %k) {{scale={scale!r}}}\n"
            f"  %dinv: f32[B, ceiling(T/{chunk}), {chunk}, {chunk}] = feedback_diag_inverse(%q, %k, %g, %lse) "
            f"{{scale={scale!r}, chunk_size={chunk}}}\n"
            "  return %dinv\n}")
    lse_node, dinv_node = parse(text).nodes
    out = {"lse": generate_lse(lse_node, names, interpret), "dinv": generate_diag_inverse(dinv_node, names, interpret)}
    if strategy == "strips":
        return {**out, **generate_wide(d_qk, d_v, scale, chunk, outer, dtypes, interpret, tiles)}

    qp, vp = dot_policy(qdt, interpret), dot_policy(fdt, interpret)
    qd, qprec = qp["dot_dtype"], qp["dot_precision"]        # products of q_b and k_b (the logits)
    vd, vprec = vp["dot_dtype"], vp["dot_precision"]        # products with s or df (gradients)
    sprec = vp["solve_precision"]                           # the solve's fp32 products (G^T df, inverses)
    tiles = tiles or _tiles(qdt, interpret, d_qk, d_v)
    bk, bv = dot_block(d_qk, MAX_WIDTH), dot_block(d_v, MAX_WIDTH)
    km = lambda ax: "" if d_qk == bk else f" & (kk[{ax}] < D_QK)"   # noqa: E731
    spec = {"D_qk": d_qk, "D_v": d_v, "chunk_size": chunk, "dtype": qdt, "f_dtype": fdt, "gamma_dtype": gdt,
            "scale": scale}
    qptr, fptr, gptr = AOT_POINTER[qdt], AOT_POINTER[fdt], AOT_POINTER[gdt]
    common = dict(D_QK=d_qk, D_V=d_v, BLOCK_K=bk, SCALE=scale, C=chunk, CO=outer)

    # -- 1a. rhs[j] = ds[j] + sum over rows t of later outer chunks of G[t, j] df[t] ------------------------
    bm, bn, nw = tiles["update"]
    bdv = min(tiles["update_dv"], bv)
    vmask = "" if d_v % bdv == 0 else " & (vc[None, :] < D_V)"
    body = _consts(**common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bdv)
    body += ("@triton.jit\n"
             "def feedback_bwd_update(DS, Q, K, GAMMA, LSE, DF, T, r0, r1, stride_db, stride_dt, stride_qb, stride_qt,\n"
             "                        stride_kb, stride_kt, stride_gb, stride_gt):\n"
             "    # DF[j] = ds[j] + sum_{t >= r1} gamma[t] exp(q_b[t].k_b[j]*SCALE - lse[t]) DF[t] for j in [r0, r1)\n"
             "    pid_n = tl.program_id(0)\n"
             "    pid_v = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    cols = r0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    vc = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             f"    cmask = (cols[:, None] < r1){vmask}\n"
             "    acc = tl.load(DS + b * stride_db + cols[:, None] * stride_dt + vc[None, :], mask=cmask, "
             "other=0.0).to(tl.float32)\n"
             f"    k = tl.load(K + b * stride_kb + cols[:, None] * stride_kt + kk[None, :], "
             f"mask=(cols[:, None] < r1){km('None, :')}, other=0.0).to(tl.float32).to({qd})\n"
             "    for t0 in range(r1, T, BLOCK_M):\n"
             "        rows = t0 + tl.arange(0, BLOCK_M)\n"
             f"        qt = tl.load(Q + b * stride_qb + rows[None, :] * stride_qt + kk[:, None], "
             f"mask=(rows[None, :] < T){km(':, None')}, other=0.0).to(tl.float32).to({qd})\n"
             "        lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "        gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             f"        lt = tl.dot(k, qt, out_dtype=tl.float32, input_precision=\"{qprec}\") * SCALE\n"
             "        pt = tl.where(rows[None, :] < T, tl.exp(lt - lse[None, :]), 0.0) * gamma[None, :]\n"
             f"        df = tl.load(DF + (b * T + rows[:, None]) * D_V + vc[None, :], mask=(rows[:, None] < T){vmask}, "
             "other=0.0)\n"
             f"        acc += tl.dot(pt, df, out_dtype=tl.float32, input_precision=\"{sprec}\")\n"
             "    tl.store(DF + (b * T + cols[:, None]) * D_V + vc[None, :], acc, mask=cmask)\n")
    out["update"] = KernelSource(
        "feedback_bwd_update", "feedback_backward", spec,
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_DV": bdv, "CO": outer, "dot_dtype": qd, "dot_precision": qprec,
         "solve_precision": sprec}, body,
        {"DS": fptr, "Q": qptr, "K": qptr, "GAMMA": gptr, "LSE": "*fp32", "DF": "*fp32", "T": "i32", "r0": "i32",
         "r1": "i32", "stride_db": "i64", "stride_dt": "i32", "stride_qb": "i64", "stride_qt": "i32",
         "stride_kb": "i64", "stride_kt": "i32", "stride_gb": "i64", "stride_gt": "i32"},
        do_not_specialize=("T", "r0", "r1"), num_warps=nw, num_stages=2)

    # -- 1b. the outer chunk's inner blocks, last first, by the diagonal inverses' transposes ---------------
    sdv = min(tiles["solve_dv"], bv)
    vmask = "" if d_v % sdv == 0 else " & (vc[None, :] < D_V)"
    body = _consts(**common, BLOCK_DV=sdv)
    body += ("@triton.jit\n"
             "def feedback_bwd_solve(Q, K, GAMMA, LSE, DINV, DF, T, r0, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                       stride_gb, stride_gt):\n"
             "    # rows [r0, r0 + CO): df_i = dinv_i^T (DF_i + sum_{i' > i} G[i', i]^T df_i'), inner blocks last first\n"
             "    pid_v = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    r = tl.arange(0, C)\n"
             "    vc = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    n_inner = tl.cdiv(tl.minimum(r0 + CO, T) - r0, C)\n"
             "    n_chunks = tl.cdiv(T, C)\n"
             "    for ii in range(0, n_inner):\n"
             "        i0 = r0 + (n_inner - 1 - ii) * C\n"
             "        rows = i0 + r\n"
             f"        io = (rows[:, None] < T){vmask}\n"
             "        acc = tl.load(DF + (b * T + rows[:, None]) * D_V + vc[None, :], mask=io, other=0.0)\n"
             f"        k = tl.load(K + b * stride_kb + rows[:, None] * stride_kt + kk[None, :], "
             f"mask=(rows[:, None] < T){km('None, :')}, other=0.0).to(tl.float32).to({qd})\n"
             "        for t0 in range(i0 + C, tl.minimum(r0 + CO, T), C):\n"
             "            later = t0 + r\n"
             f"            qt = tl.load(Q + b * stride_qb + later[None, :] * stride_qt + kk[:, None], "
             f"mask=(later[None, :] < T){km(':, None')}, other=0.0).to(tl.float32).to({qd})\n"
             "            lse = tl.load(LSE + b * T + later, mask=later < T, other=0.0)\n"
             "            gamma = tl.load(GAMMA + b * stride_gb + later * stride_gt, mask=later < T, "
             "other=0.0).to(tl.float32)\n"
             f"            lt = tl.dot(k, qt, out_dtype=tl.float32, input_precision=\"{qprec}\") * SCALE\n"
             "            pt = tl.where(later[None, :] < T, tl.exp(lt - lse[None, :]), 0.0) * gamma[None, :]\n"
             f"            df = tl.load(DF + (b * T + later[:, None]) * D_V + vc[None, :], "
             f"mask=(later[:, None] < T){vmask}, other=0.0)\n"
             f"            acc += tl.dot(pt, df, out_dtype=tl.float32, input_precision=\"{sprec}\")\n"
             "        # dinv_i^T[a, c] = dinv_i[c, a]\n"
             "        dinv_t = tl.load(DINV + ((b * n_chunks + i0 // C) * C + r[None, :]) * C + r[:, None])\n"
             f"        df_i = tl.dot(dinv_t, acc, out_dtype=tl.float32, input_precision=\"{sprec}\")\n"
             "        tl.store(DF + (b * T + rows[:, None]) * D_V + vc[None, :], df_i, mask=io)\n"
             "        tl.debug_barrier()   # the next (earlier) inner block reads these rows from other threads\n")
    out["solve"] = KernelSource(
        "feedback_bwd_solve", "feedback_backward", spec,
        {"BLOCK_DV": sdv, "CO": outer, "dot_dtype": qd, "dot_precision": qprec, "solve_precision": sprec}, body,
        {"Q": qptr, "K": qptr, "GAMMA": gptr, "LSE": "*fp32", "DINV": "*fp32", "DF": "*fp32", "T": "i32",
         "r0": "i32", "stride_qb": "i64", "stride_qt": "i32", "stride_kb": "i64", "stride_kt": "i32",
         "stride_gb": "i64", "stride_gt": "i32"},
        do_not_specialize=("T", "r0"), num_warps=4, num_stages=2)

    vm = lambda ax: "" if d_v == bv else f" & (vv[{ax}] < D_V)"   # noqa: E731
    # -- 2. dgamma and dq_b per row block: c = alpha s first, then dS k_b ------------------------------------
    bm, bn, nw = tiles["dq"]
    body = _consts(**common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_V=bv)
    loop = ("    for n0 in range(0, tl.minimum((pid_m + 1) * BLOCK_M - 1, T), BLOCK_N):   # columns j < t\n"
            "        cols = n0 + tl.arange(0, BLOCK_N)\n"
            f"        kt = tl.load(k_base + cols[None, :] * stride_kt + kk[:, None], "
            f"mask=(cols[None, :] < T){km(':, None')}, other=0.0).to(tl.float32).to({qd})\n"
            f"        sv = tl.load(s_base + cols[:, None] * stride_st + vv[None, :], "
            f"mask=(cols[:, None] < T){vm('None, :')}, other=0.0).to(tl.float32).to({vd})\n"
            f"        lg = tl.dot(q, kt, out_dtype=tl.float32, input_precision=\"{qprec}\") * SCALE\n"
            "        keep = (cols[None, :] < rows[:, None]) & (cols[None, :] < T)\n"
            "        p = tl.where(keep, tl.exp(lg - lse[:, None]), 0.0)\n")
    body += ("@triton.jit\n"
             "def feedback_bwd_dq(Q, K, S, DF, GAMMA, LSE, DQ, DGAMMA, T, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                    stride_sb, stride_st, stride_gb, stride_gt, stride_dqb, stride_dqt):\n"
             "    # dgamma[t] = df[t] . (alpha s)[t]; dq_b[t] = SCALE sum_j gamma[t] alpha[t, j] (df[t].s[j] - dgamma[t]) k_b[j]\n"
             "    pid_m = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    vv = tl.arange(0, BLOCK_V)\n"
             "    k_base = K + b * stride_kb\n"
             "    s_base = S + b * stride_sb\n"
             f"    q = tl.load(Q + b * stride_qb + rows[:, None] * stride_qt + kk[None, :], "
             f"mask=(rows[:, None] < T){km('None, :')}, other=0.0).to(tl.float32).to({qd})\n"
             f"    df = tl.load(DF + (b * T + rows[:, None]) * D_V + vv[None, :], mask=(rows[:, None] < T){vm('None, :')}, "
             "other=0.0)\n"
             "    lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "    gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "    c = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)\n" + loop +
             f"        c += tl.dot(p.to({vd}), sv, out_dtype=tl.float32, input_precision=\"{vprec}\")\n"
             "    dgamma = tl.sum(df * c, axis=1)\n"
             "    tl.store(DGAMMA + b * T + rows, dgamma, mask=rows < T)\n"
             f"    df = df.to({vd})\n"
             "    dq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)\n" + loop +
             f"        dp = tl.dot(df, tl.trans(sv), out_dtype=tl.float32, input_precision=\"{vprec}\")\n"
             "        dsc = p * (dp - dgamma[:, None])\n"
             f"        dq += tl.dot(dsc.to({qd}), tl.trans(kt), out_dtype=tl.float32, input_precision=\"{qprec}\")\n"
             "    dq = dq * (gamma * SCALE)[:, None]\n"
             f"    tl.store(DQ + b * stride_dqb + rows[:, None] * stride_dqt + kk[None, :], dq.to(DQ.dtype.element_ty), "
             f"mask=(rows[:, None] < T){km('None, :')})\n")
    out["dq"] = KernelSource(
        "feedback_bwd_dq", "feedback_backward", spec,
        {"BLOCK_M": bm, "BLOCK_N": bn, "dot_dtype": qd, "dot_precision": qprec, "value_dot_dtype": vd,
         "value_precision": vprec}, body,
        {"Q": qptr, "K": qptr, "S": fptr, "DF": "*fp32", "GAMMA": gptr, "LSE": "*fp32", "DQ": qptr,
         "DGAMMA": "*fp32", "T": "i32", "stride_qb": "i64", "stride_qt": "i32", "stride_kb": "i64",
         "stride_kt": "i32", "stride_sb": "i64", "stride_st": "i32", "stride_gb": "i64", "stride_gt": "i32",
         "stride_dqb": "i64", "stride_dqt": "i32"},
        do_not_specialize=("T",), num_warps=nw, num_stages=2)

    # -- 3. dk_b per column block: dS^T q_b over the later rows ---------------------------------------------
    bm, bn, nw = tiles["dk"]
    body = _consts(**common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_V=bv)
    body += ("@triton.jit\n"
             "def feedback_bwd_dk(Q, K, S, DF, GAMMA, LSE, DGAMMA, DK, T, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                    stride_sb, stride_st, stride_gb, stride_gt, stride_dkb, stride_dkt):\n"
             "    # dk_b[j] = SCALE sum_{t>j} gamma[t] alpha[t, j] (df[t].s[j] - dgamma[t]) q_b[t]\n"
             "    pid_n = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    vv = tl.arange(0, BLOCK_V)\n"
             f"    k = tl.load(K + b * stride_kb + cols[:, None] * stride_kt + kk[None, :], "
             f"mask=(cols[:, None] < T){km('None, :')}, other=0.0).to(tl.float32).to({qd})\n"
             f"    sv = tl.load(S + b * stride_sb + cols[:, None] * stride_st + vv[None, :], "
             f"mask=(cols[:, None] < T){vm('None, :')}, other=0.0).to(tl.float32).to({vd})\n"
             "    dk = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)\n"
             "    for m0 in range((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, T, BLOCK_M):\n"
             "        rows = m0 + tl.arange(0, BLOCK_M)\n"
             f"        qt = tl.load(Q + b * stride_qb + rows[None, :] * stride_qt + kk[:, None], "
             f"mask=(rows[None, :] < T){km(':, None')}, other=0.0).to(tl.float32).to({qd})\n"
             f"        df = tl.load(DF + (b * T + rows[:, None]) * D_V + vv[None, :], "
             f"mask=(rows[:, None] < T){vm('None, :')}, other=0.0).to({vd})\n"
             "        lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "        dgamma = tl.load(DGAMMA + b * T + rows, mask=rows < T, other=0.0)\n"
             "        gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             f"        lt = tl.dot(k, qt, out_dtype=tl.float32, input_precision=\"{qprec}\") * SCALE\n"
             "        keep = (cols[:, None] < rows[None, :]) & (rows[None, :] < T)\n"
             "        pt = tl.where(keep, tl.exp(lt - lse[None, :]), 0.0)\n"
             f"        dpt = tl.dot(sv, tl.trans(df), out_dtype=tl.float32, input_precision=\"{vprec}\")\n"
             "        dst = pt * (dpt - dgamma[None, :]) * gamma[None, :]\n"
             f"        dk += tl.dot(dst.to({qd}), tl.trans(qt), out_dtype=tl.float32, input_precision=\"{qprec}\")\n"
             "    dk = dk * SCALE\n"
             f"    tl.store(DK + b * stride_dkb + cols[:, None] * stride_dkt + kk[None, :], dk.to(DK.dtype.element_ty), "
             f"mask=(cols[:, None] < T){km('None, :')})\n")
    out["dk"] = KernelSource(
        "feedback_bwd_dk", "feedback_backward", spec,
        {"BLOCK_M": bm, "BLOCK_N": bn, "dot_dtype": qd, "dot_precision": qprec, "value_dot_dtype": vd,
         "value_precision": vprec}, body,
        {"Q": qptr, "K": qptr, "S": fptr, "DF": "*fp32", "GAMMA": gptr, "LSE": "*fp32", "DGAMMA": "*fp32",
         "DK": qptr, "T": "i32", "stride_qb": "i64", "stride_qt": "i32", "stride_kb": "i64", "stride_kt": "i32",
         "stride_sb": "i64", "stride_st": "i32", "stride_gb": "i64", "stride_gt": "i32", "stride_dkb": "i64",
         "stride_dkt": "i32"},
        do_not_specialize=("T",), num_warps=nw, num_stages=2)
    return out


@functools.lru_cache(maxsize=64)
def _kernels(d_qk, d_v, scale, chunk, outer, dtypes, interpret, tiles, strategy):
    srcs = generate_feedback_backward(d_qk, d_v, scale, chunk, outer, dict(dtypes), interpret,
                                      dict(tiles) if tiles else None, strategy)
    return {role: KERNEL_CACHE.load(src, interpret) for role, src in srcs.items()}


def _launcher(launch):
    return launch or (lambda fn: fn)


def feedback_backward_triton(grad_s, s, q_b, k_b, gamma, scale: float, lse=None, *, chunk: int | None = None,
                             outer: int | None = None, tiles=None, strategy: str | None = None, launch=None):
    """(df, dq_b, dk_b, dgamma) of s = (I - diag(gamma) alpha)^-1 f given ds = grad_s, in the operands' dtypes
    (df in s's). ``lse`` is the forward's float32 [B, T] row log-sum-exps (``feedback_lse`` when None);
    ``chunk``/``outer`` the solve's inner and outer chunk (64 and 256 on a GPU, 16 and 32 under the
    interpreter); ``strategy`` "rows" (feedback_bwd.py, widths up to 256) or "strips" (feedback_bwd_wide.py, any
    width), by default the first where it applies; ``launch`` wraps each kernel before its launch
    (``torch.library.wrap_triton``)."""
    import torch

    if s.dim() != 3 or q_b.dim() != 3 or k_b.shape != q_b.shape or q_b.shape[:2] != s.shape[:2] \
            or grad_s.shape != s.shape or tuple(gamma.shape) != tuple(s.shape[:2]):
        raise InputError(f"op 'feedback' backward: expected grad_s and s [B, T, Dv], q_b and k_b [B, T, c], gamma "
                         f"[B, T]; got {tuple(grad_s.shape)}, {tuple(s.shape)}, {tuple(q_b.shape)}, "
                         f"{tuple(k_b.shape)}, {tuple(gamma.shape)}")
    B, T, d_v = s.shape
    d_qk = q_b.shape[2]
    if lse is not None and (tuple(lse.shape) != (B, T) or lse.dtype != torch.float32):
        raise InputError(f"op 'feedback' backward: lse must be float32 [B, T] = {(B, T)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    names = {n: from_torch(x.dtype).name for n, x in (("f", s), ("q_b", q_b), ("k_b", k_b), ("gamma", gamma),
                                                      ("grad_s", grad_s))}
    if not set(names.values()) <= set(KERNEL_DTYPES) or names["q_b"] != names["k_b"] \
            or names["grad_s"] != names["f"]:
        raise UnsupportedError(f"op 'feedback' backward: dtypes {names} have no kernel (each of {KERNEL_DTYPES}; "
                               "q_b and k_b alike, grad_s like s)")
    interpret = not s.is_cuda
    chunk = chunk or (16 if interpret else 64)
    outer = outer or default_outer_chunk(chunk, interpret)
    dtypes = tuple(sorted((n, names[n]) for n in ("f", "q_b", "gamma")))
    strategy = strategy or default_strategy(d_qk, d_v)
    kern = _kernels(d_qk, d_v, float(scale), chunk, outer, dtypes, interpret,
                    tuple(sorted(tiles.items())) if tiles else None, strategy)
    if B == 0 or T == 0:
        return (torch.zeros_like(s), torch.zeros_like(q_b), torch.zeros_like(k_b), torch.zeros_like(gamma))
    grad_s, s, q_b, k_b = (x if x.stride(-1) == 1 else x.contiguous() for x in (grad_s, s, q_b, k_b))
    L = _launcher(launch)
    wrap = launch or (lambda fn: fn)
    if lse is None:
        lse = launch_lse(kern["lse"], q_b, k_b, launch=wrap)
    else:
        lse = lse.contiguous()
    dinv = launch_diag_inverse(kern["dinv"], q_b, k_b, gamma, lse, chunk, launch=wrap)
    if strategy == "strips":
        df, dq, dk, dgamma = launch_wide(kern, grad_s, s, q_b, k_b, gamma, lse, dinv, outer, L)
        return df.to(s.dtype), dq, dk.to(k_b.dtype), dgamma.to(gamma.dtype)
    df = torch.empty(B, T, d_v, dtype=torch.float32, device=s.device)
    up, so = kern["update"].source, kern["solve"].source
    qs, ks, gs = (q_b.stride(0), q_b.stride(1)), (k_b.stride(0), k_b.stride(1)), tuple(gamma.stride())
    for r0 in reversed(range(0, T, outer)):
        r1 = min(r0 + outer, T)
        L(kern["update"].fn)[(-(-(r1 - r0) // up.tunables["BLOCK_N"]), -(-d_v // up.tunables["BLOCK_DV"]), B)](
            grad_s, q_b, k_b, gamma, lse, df, T, r0, r1, grad_s.stride(0), grad_s.stride(1), *qs, *ks, *gs,
            num_warps=up.num_warps, num_stages=up.num_stages)
        L(kern["solve"].fn)[(-(-d_v // so.tunables["BLOCK_DV"]), B)](
            q_b, k_b, gamma, lse, dinv, df, T, r0, *qs, *ks, *gs, num_warps=so.num_warps, num_stages=so.num_stages)
    dq, dk = torch.empty_like(q_b), torch.empty_like(k_b)
    dgamma = torch.empty(B, T, dtype=torch.float32, device=s.device)
    src = kern["dq"].source
    L(kern["dq"].fn)[(-(-T // src.tunables["BLOCK_M"]), B)](
        q_b, k_b, s, df, gamma, lse, dq, dgamma, T, *qs, *ks, s.stride(0), s.stride(1), *gs, dq.stride(0),
        dq.stride(1), num_warps=src.num_warps, num_stages=src.num_stages)
    src = kern["dk"].source
    L(kern["dk"].fn)[(-(-T // src.tunables["BLOCK_N"]), B)](
        q_b, k_b, s, df, gamma, lse, dgamma, dk, T, *qs, *ks, s.stride(0), s.stride(1), *gs, dk.stride(0),
        dk.stride(1), num_warps=src.num_warps, num_stages=src.num_stages)
    return df.to(s.dtype), dq, dk, dgamma.to(gamma.dtype)


# -- register_autograd backward of torch.ops.sessa_compiler.feedback_triton (backends/triton/ops.py) -------------
def feedback_triton_autograd(ctx, grad):
    """The backward kernels (launched through ``wrap_triton``) from the saved output (semantics.core's
    feedback_setup_context); dtypes without kernels (float64, q_b and k_b apart) take semantics.core's
    feedback_autograd."""
    from torch.library import wrap_triton

    from ...semantics.core import feedback_autograd

    s, q_b, k_b, gamma = ctx.saved_tensors
    names = [from_torch(x.dtype).name for x in (s, q_b, k_b, gamma)]
    if not set(names) <= set(KERNEL_DTYPES) or q_b.dtype != k_b.dtype:
        return feedback_autograd(ctx, grad)
    grads = feedback_backward_triton(grad.to(s.dtype), s, q_b, k_b, gamma, ctx.scale, launch=wrap_triton)
    return (*(x.to(dt) for x, dt in zip(grads, ctx.dtypes)), None)
