"""The feedback backward for any width ("strips" strategy): per outer chunk of CO rows, the chunk's weights are
materialised as two [B, CO, T] float32 strips, never T x T, so no kernel holds a whole row of q_b, k_b, s or df.

Same gradients as feedback_bwd.py (which holds whole rows in registers, widths up to 256). For each outer chunk
R = [r0, r1), last first (a host loop):

1. ``fbw_colprobs`` (grid: rows t >= r0 x columns of R x batch): PT[j, t] = G[t, j] = gamma[t]
   exp(scale q_b[t].k_b[j] - lse[t]) for t > j, logits contracted over width tiles.
2. ``fbw_update`` (grid: R's rows x value tiles x batch): DF[j] = ds[j] + PT[j, r1:] @ df[r1:] (a matmul).
3. ``fbw_solve`` (grid: value tiles x batch): R's inner blocks last first, df_i = dinv_i^T (DF_i +
   PT[i, later blocks of R] @ df), with the forward's diagonal inverses.
4. ``fbw_rowprobs`` (grid: R's rows x columns < r1 x batch): P[t, j] = alpha[t, j] and W = P * (df[t].s[j]),
   both contractions over width tiles (into the strip PT's memory and a second strip).
5. ``fbw_rowsum`` (grid: R's row blocks x batch): dgamma[t] = sum_j W[t, j] (= df[t] . (alpha s)[t]), then
   W <- scale gamma[t] (W - P dgamma[t]) = scale dS in place.
6. ``fbw_dq`` (grid: R's rows x width tiles x batch): dq_b[R] = W @ k_b[:r1].
7. ``fbw_dk`` (grid: rows < r1 x width tiles x batch): DK[:r1] += W^T @ q_b[R] (a float32 workspace).

Issued products per strictly causal pair: logits twice (steps 1 and 4), G^T df, dP, dq, dk: 4 d_qk + 2 d_v
against the minimum 3 d_qk + 2 d_v, plus two [B, CO, T] float32 strips of memory traffic per chunk.
"""
from __future__ import annotations

from .codegen import AOT_POINTER, KernelSource, dot_block, dot_policy


def _consts(**kw) -> str:
    return "".join(f"{k} = tl.constexpr({v!r})\n" for k, v in kw.items()) + "\n\n"


def wide_tiles(interpret: bool) -> dict:
    if interpret:
        return {"strip": (16, 16, 16, 4), "mm": (16, 16, 16, 4), "solve_dv": 16}
    return {"strip": (128, 64, 64, 8), "mm": (128, 64, 32, 8), "solve_dv": 64}


def _sig(names: str, types: dict) -> dict:
    return {n: types.get(n, "i32") for n in names.replace(",", " ").split()}


def generate_wide(d_qk: int, d_v: int, scale: float, chunk: int, outer: int, dtypes: dict, interpret: bool,
                  tiles: dict | None = None) -> dict:
    """KernelSources by role for the strips strategy (the lse and diagonal-inverse kernels come from the caller)."""
    qdt, fdt, gdt = dtypes["q_b"], dtypes["f"], dtypes["gamma"]
    qp, vp = dot_policy(qdt, interpret), dot_policy(fdt, interpret)
    qd, qprec = qp["dot_dtype"], qp["dot_precision"]
    vd, vprec, sprec = vp["dot_dtype"], vp["dot_precision"], vp["solve_precision"]
    tiles = tiles or wide_tiles(interpret)
    sm, sn, sk, snw = tiles["strip"]
    mm, mn, mk, mnw = tiles["mm"]
    bkq, bkv = min(sk, dot_block(d_qk, 256)), min(sk, dot_block(d_v, 256))
    spec = {"D_qk": d_qk, "D_v": d_v, "chunk_size": chunk, "dtype": qdt, "f_dtype": fdt, "gamma_dtype": gdt,
            "scale": scale, "strategy": "strips"}
    qptr, fptr, gptr = AOT_POINTER[qdt], AOT_POINTER[fdt], AOT_POINTER[gdt]
    types = {"Q": qptr, "K": qptr, "S": fptr, "DS": fptr, "GAMMA": gptr, "LSE": "*fp32", "PT": "*fp32",
             "W": "*fp32", "DF": "*fp32", "DINV": "*fp32", "DQ": qptr, "DK": "*fp32", "DGAMMA": "*fp32",
             "stride_qb": "i64", "stride_kb": "i64", "stride_sb": "i64", "stride_db": "i64", "stride_gb": "i64",
             "stride_dqb": "i64"}
    common = dict(D_QK=d_qk, D_V=d_v, SCALE=scale, C=chunk, CO=outer)
    dns = ("T", "r0", "r1", "stride_p")
    out = {}

    def logits(rows: str, cols: str, indent: str) -> str:
        """lg[rows, cols] = q_b[rows] . k_b[cols] over width tiles (BLOCK_KQ)."""
        tail = "" if d_qk % bkq == 0 else " & ((k0 + kq)[None, :] < D_QK)"
        tail_t = "" if d_qk % bkq == 0 else " & ((k0 + kq)[:, None] < D_QK)"
        return (f"{indent}lg = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
                f"{indent}for k0 in range(0, D_QK, BLOCK_KQ):\n"
                f"{indent}    a = tl.load(Q + b * stride_qb + {rows}[:, None] * stride_qt + (k0 + kq)[None, :], "
                f"mask=({rows}[:, None] < T){tail}, other=0.0).to(tl.float32).to({qd})\n"
                f"{indent}    bt = tl.load(K + b * stride_kb + {cols}[None, :] * stride_kt + (k0 + kq)[:, None], "
                f"mask=({cols}[None, :] < T){tail_t}, other=0.0).to(tl.float32).to({qd})\n"
                f"{indent}    lg += tl.dot(a, bt, out_dtype=tl.float32, input_precision=\"{qprec}\")\n")

    # 1. column strip: PT[j - r0, t] = G[t, j], j in [r0, r1), t in (j, T)
    body = _consts(**common, BLOCK_M=sm, BLOCK_N=sn, BLOCK_KQ=bkq)
    body += ("@triton.jit\n"
             "def fbw_colprobs(Q, K, GAMMA, LSE, PT, T, r0, r1, stride_p, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                 stride_gb, stride_gt):\n"
             "    # PT[j - r0, t] = gamma[t] exp(q_b[t].k_b[j]*SCALE - lse[t]) for t > j (t from r0), else 0\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    rows = r0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    cols = r0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kq = tl.arange(0, BLOCK_KQ)\n" + logits("rows", "cols", "    ") +
             "    lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "    gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "    keep = (cols[None, :] < rows[:, None]) & (rows[:, None] < T)\n"
             "    g = tl.where(keep, tl.exp(lg * SCALE - lse[:, None]), 0.0) * gamma[:, None]\n"
             "    tl.store(PT + (b * CO + (cols - r0)[None, :]) * stride_p + rows[:, None], g, "
             "mask=(cols[None, :] < r1) & (rows[:, None] < T))\n")
    out["colprobs"] = KernelSource(
        "fbw_colprobs", "feedback_backward", spec, {"BLOCK_M": sm, "BLOCK_N": sn, "BLOCK_KQ": bkq, "CO": outer,
                                                    "dot_dtype": qd, "dot_precision": qprec}, body,
        _sig("Q K GAMMA LSE PT T r0 r1 stride_p stride_qb stride_qt stride_kb stride_kt stride_gb stride_gt", types),
        do_not_specialize=dns, num_warps=snw, num_stages=3)

    # 2. DF[j] = ds[j] + PT[j, r1:] @ DF[r1:]
    vtail = "" if d_v % mn == 0 else " & (vc[None, :] < D_V)"
    body = _consts(**common, BLOCK_M=mm, BLOCK_N=mn, BLOCK_K=mk)
    body += ("@triton.jit\n"
             "def fbw_update(DS, PT, DF, T, r0, r1, stride_p, stride_db, stride_dt):\n"
             "    # DF[j] = ds[j] + sum_{t >= r1} PT[j - r0, t] DF[t] for j in [r0, r1)\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    vc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             f"    io = ((r0 + j)[:, None] < r1){vtail}\n"
             "    acc = tl.load(DS + b * stride_db + (r0 + j)[:, None] * stride_dt + vc[None, :], mask=io, "
             "other=0.0).to(tl.float32)\n"
             "    for t0 in range(r1, T, BLOCK_K):\n"
             "        t = t0 + kk\n"
             "        a = tl.load(PT + (b * CO + j[:, None]) * stride_p + t[None, :], mask=t[None, :] < T, other=0.0)\n"
             f"        x = tl.load(DF + (b * T + t[:, None]) * D_V + vc[None, :], mask=(t[:, None] < T){vtail}, "
             "other=0.0)\n"
             f"        acc += tl.dot(a, x, out_dtype=tl.float32, input_precision=\"{sprec}\")\n"
             "    tl.store(DF + (b * T + r0 + j[:, None]) * D_V + vc[None, :], acc, mask=io)\n")
    out["update"] = KernelSource(
        "fbw_update", "feedback_backward", spec, {"BLOCK_M": mm, "BLOCK_N": mn, "BLOCK_K": mk, "CO": outer,
                                                  "solve_precision": sprec}, body,
        _sig("DS PT DF T r0 r1 stride_p stride_db stride_dt", types), do_not_specialize=dns, num_warps=mnw,
        num_stages=3)

    # 3. the chunk's inner blocks, last first
    sdv = min(tiles["solve_dv"], dot_block(d_v, 256))
    stail = "" if d_v % sdv == 0 else " & (vc[None, :] < D_V)"
    body = _consts(**common, BLOCK_DV=sdv)
    body += ("@triton.jit\n"
             "def fbw_solve(PT, DINV, DF, T, r0, stride_p):\n"
             "    # rows [r0, r0 + CO): df_i = dinv_i^T (DF_i + sum_{i' > i} PT[i, i'] df_i'), inner blocks last first\n"
             "    pid_v = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    r = tl.arange(0, C)\n"
             "    vc = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)\n"
             "    n_inner = tl.cdiv(tl.minimum(r0 + CO, T) - r0, C)\n"
             "    n_chunks = tl.cdiv(T, C)\n"
             "    for ii in range(0, n_inner):\n"
             "        i0 = r0 + (n_inner - 1 - ii) * C\n"
             "        rows = i0 + r\n"
             f"        io = (rows[:, None] < T){stail}\n"
             "        acc = tl.load(DF + (b * T + rows[:, None]) * D_V + vc[None, :], mask=io, other=0.0)\n"
             "        for t0 in range(i0 + C, tl.minimum(r0 + CO, T), C):\n"
             "            later = t0 + r\n"
             "            a = tl.load(PT + (b * CO + (rows - r0)[:, None]) * stride_p + later[None, :], "
             "mask=later[None, :] < T, other=0.0)\n"
             f"            x = tl.load(DF + (b * T + later[:, None]) * D_V + vc[None, :], "
             f"mask=(later[:, None] < T){stail}, other=0.0)\n"
             f"            acc += tl.dot(a, x, out_dtype=tl.float32, input_precision=\"{sprec}\")\n"
             "        dinv_t = tl.load(DINV + ((b * n_chunks + i0 // C) * C + r[None, :]) * C + r[:, None])\n"
             f"        x = tl.dot(dinv_t, acc, out_dtype=tl.float32, input_precision=\"{sprec}\")\n"
             "        tl.store(DF + (b * T + rows[:, None]) * D_V + vc[None, :], x, mask=io)\n"
             "        tl.debug_barrier()   # the next (earlier) inner block reads these rows from other threads\n")
    out["solve"] = KernelSource(
        "fbw_solve", "feedback_backward", spec, {"BLOCK_DV": sdv, "CO": outer, "solve_precision": sprec}, body,
        _sig("PT DINV DF T r0 stride_p", types), do_not_specialize=("T", "r0", "stride_p"), num_warps=4,
        num_stages=2)

    # 4. row strip: P[t - r0, j] = alpha[t, j], W = P * (df[t] . s[j]) for t in R, j < r1
    vt = "" if d_v % bkv == 0 else " & ((k0 + kv)[None, :] < D_V)"
    vt_t = "" if d_v % bkv == 0 else " & ((k0 + kv)[:, None] < D_V)"
    body = _consts(**common, BLOCK_M=sm, BLOCK_N=sn, BLOCK_KQ=bkq, BLOCK_KV=bkv)
    body += ("@triton.jit\n"
             "def fbw_rowprobs(Q, K, S, LSE, PT, W, DF, T, r0, r1, stride_p, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                 stride_sb, stride_st):\n"
             "    # P[t - r0, j] = exp(q_b[t].k_b[j]*SCALE - lse[t]) for j < t, W = P * (df[t] . s[j])\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    rows = r0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kq = tl.arange(0, BLOCK_KQ)\n"
             "    kv = tl.arange(0, BLOCK_KV)\n" + logits("rows", "cols", "    ") +
             "    dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
             "    for k0 in range(0, D_V, BLOCK_KV):\n"
             f"        a = tl.load(DF + (b * T + rows[:, None]) * D_V + (k0 + kv)[None, :], mask=(rows[:, None] < T){vt}, "
             f"other=0.0).to({vd})\n"
             f"        st = tl.load(S + b * stride_sb + cols[None, :] * stride_st + (k0 + kv)[:, None], "
             f"mask=(cols[None, :] < r1){vt_t}, other=0.0).to(tl.float32).to({vd})\n"
             f"        dp += tl.dot(a, st, out_dtype=tl.float32, input_precision=\"{vprec}\")\n"
             "    lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "    keep = (cols[None, :] < rows[:, None]) & (rows[:, None] < T)\n"
             "    p = tl.where(keep, tl.exp(lg * SCALE - lse[:, None]), 0.0)\n"
             "    at = (b * CO + (rows - r0)[:, None]) * stride_p + cols[None, :]\n"
             "    smask = (rows[:, None] < r1) & (cols[None, :] < r1)\n"
             "    tl.store(PT + at, p, mask=smask)\n"
             "    tl.store(W + at, p * dp, mask=smask)\n")
    out["rowprobs"] = KernelSource(
        "fbw_rowprobs", "feedback_backward", spec,
        {"BLOCK_M": sm, "BLOCK_N": sn, "BLOCK_KQ": bkq, "BLOCK_KV": bkv, "CO": outer, "dot_dtype": qd,
         "dot_precision": qprec, "value_dot_dtype": vd, "value_precision": vprec}, body,
        _sig("Q K S LSE PT W DF T r0 r1 stride_p stride_qb stride_qt stride_kb stride_kt stride_sb stride_st", types),
        do_not_specialize=dns, num_warps=snw, num_stages=3)

    # 5. dgamma = row sums of W; W <- SCALE gamma (W - P dgamma) = SCALE dS
    body = _consts(**common, BLOCK_M=32, BLOCK_N=128)
    body += ("@triton.jit\n"
             "def fbw_rowsum(GAMMA, PT, W, DGAMMA, T, r0, r1, stride_p, stride_gb, stride_gt):\n"
             "    pid_m = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    rows = r0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    base = (b * CO + (rows - r0)[:, None]) * stride_p\n"
             "    dg = tl.zeros([BLOCK_M], tl.float32)\n"
             "    for n0 in range(0, r1, BLOCK_N):\n"
             "        cols = n0 + tl.arange(0, BLOCK_N)\n"
             "        m = (rows[:, None] < r1) & (cols[None, :] < r1)\n"
             "        dg += tl.sum(tl.load(W + base + cols[None, :], mask=m, other=0.0), axis=1)\n"
             "    tl.store(DGAMMA + b * T + rows, dg, mask=rows < r1)\n"
             "    gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < r1, other=0.0).to(tl.float32)\n"
             "    for n0 in range(0, r1, BLOCK_N):\n"
             "        cols = n0 + tl.arange(0, BLOCK_N)\n"
             "        m = (rows[:, None] < r1) & (cols[None, :] < r1)\n"
             "        w = tl.load(W + base + cols[None, :], mask=m, other=0.0)\n"
             "        p = tl.load(PT + base + cols[None, :], mask=m, other=0.0)\n"
             "        tl.store(W + base + cols[None, :], (w - p * dg[:, None]) * (gamma * SCALE)[:, None], mask=m)\n")
    out["rowsum"] = KernelSource(
        "fbw_rowsum", "feedback_backward", spec, {"BLOCK_M": 32, "BLOCK_N": 128, "CO": outer}, body,
        _sig("GAMMA PT W DGAMMA T r0 r1 stride_p stride_gb stride_gt", types), do_not_specialize=dns, num_warps=4,
        num_stages=2, uses_dot=False)

    # 6. dq_b[R] = W @ k_b[:r1]
    qtail = "" if d_qk % mn == 0 else " & (kc[None, :] < D_QK)"
    body = _consts(**common, BLOCK_M=mm, BLOCK_N=mn, BLOCK_K=mk)
    body += ("@triton.jit\n"
             "def fbw_dq(W, K, DQ, T, r0, r1, stride_p, stride_kb, stride_kt, stride_dqb, stride_dqt):\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    kc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
             "    for j0 in range(0, r1, BLOCK_K):\n"
             "        j = j0 + kk\n"
             "        w = tl.load(W + (b * CO + r[:, None]) * stride_p + j[None, :], "
             f"mask=((r0 + r)[:, None] < r1) & (j[None, :] < r1), other=0.0).to({qd})\n"
             f"        k = tl.load(K + b * stride_kb + j[:, None] * stride_kt + kc[None, :], mask=(j[:, None] < r1){qtail}, "
             f"other=0.0).to(tl.float32).to({qd})\n"
             f"        acc += tl.dot(w, k, out_dtype=tl.float32, input_precision=\"{qprec}\")\n"
             "    tl.store(DQ + b * stride_dqb + (r0 + r)[:, None] * stride_dqt + kc[None, :], acc.to(DQ.dtype.element_ty), "
             f"mask=((r0 + r)[:, None] < r1){qtail})\n")
    out["dq"] = KernelSource(
        "fbw_dq", "feedback_backward", spec, {"BLOCK_M": mm, "BLOCK_N": mn, "BLOCK_K": mk, "CO": outer,
                                              "dot_dtype": qd, "dot_precision": qprec}, body,
        _sig("W K DQ T r0 r1 stride_p stride_kb stride_kt stride_dqb stride_dqt", types), do_not_specialize=dns,
        num_warps=mnw, num_stages=3)

    # 7. DK[:r1] += W^T @ q_b[R]
    body = _consts(**common, BLOCK_M=mm, BLOCK_N=mn, BLOCK_K=mk)
    body += ("@triton.jit\n"
             "def fbw_dk(W, Q, DK, T, r0, r1, stride_p, stride_qb, stride_qt):\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    kc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             f"    io = (j[:, None] < r1){qtail}\n"
             "    acc = tl.load(DK + (b * T + j[:, None]) * D_QK + kc[None, :], mask=io, other=0.0)\n"
             "    for t0 in range(0, r1 - r0, BLOCK_K):\n"
             "        r = t0 + kk\n"
             "        wt = tl.load(W + (b * CO + r[None, :]) * stride_p + j[:, None], "
             f"mask=((r0 + r)[None, :] < r1) & (j[:, None] < r1), other=0.0).to({qd})\n"
             "        q = tl.load(Q + b * stride_qb + (r0 + r)[:, None] * stride_qt + kc[None, :], "
             f"mask=((r0 + r)[:, None] < r1){qtail}, other=0.0).to(tl.float32).to({qd})\n"
             f"        acc += tl.dot(wt, q, out_dtype=tl.float32, input_precision=\"{qprec}\")\n"
             "    tl.store(DK + (b * T + j[:, None]) * D_QK + kc[None, :], acc, mask=io)\n")
    out["dk"] = KernelSource(
        "fbw_dk", "feedback_backward", spec, {"BLOCK_M": mm, "BLOCK_N": mn, "BLOCK_K": mk, "CO": outer,
                                              "dot_dtype": qd, "dot_precision": qprec}, body,
        _sig("W Q DK T r0 r1 stride_p stride_qb stride_qt", types), do_not_specialize=dns, num_warps=mnw,
        num_stages=3)
    return out


def launch_wide(kern: dict, grad_s, s, q_b, k_b, gamma, lse, dinv, outer: int, launch):
    """The host loop of the strips strategy: (df float32, dq_b, dk_b float32, dgamma float32)."""
    import torch

    B, T, d_v = s.shape
    d_qk = q_b.shape[2]
    L = launch
    stride_p = -(-T // 16) * 16
    pt = torch.empty(B, outer, stride_p, dtype=torch.float32, device=s.device)
    w = torch.empty(B, outer, stride_p, dtype=torch.float32, device=s.device)
    df = torch.empty(B, T, d_v, dtype=torch.float32, device=s.device)
    dq = torch.empty_like(q_b)
    dk = torch.zeros(B, T, d_qk, dtype=torch.float32, device=s.device)
    dgamma = torch.empty(B, T, dtype=torch.float32, device=s.device)
    qs, ks, gs, ss = (q_b.stride(0), q_b.stride(1)), (k_b.stride(0), k_b.stride(1)), tuple(gamma.stride()), \
        (s.stride(0), s.stride(1))
    src = {r: k.source for r, k in kern.items()}

    def run(role, grid, *args):
        L(kern[role].fn)[grid](*args, num_warps=src[role].num_warps, num_stages=src[role].num_stages)

    for r0 in reversed(range(0, T, outer)):
        r1 = min(r0 + outer, T)
        t = src["colprobs"].tunables
        run("colprobs", (-(-(T - r0) // t["BLOCK_M"]), -(-(r1 - r0) // t["BLOCK_N"]), B),
            q_b, k_b, gamma, lse, pt, T, r0, r1, stride_p, *qs, *ks, *gs)
        t = src["update"].tunables
        run("update", (-(-(r1 - r0) // t["BLOCK_M"]), -(-d_v // t["BLOCK_N"]), B),
            grad_s, pt, df, T, r0, r1, stride_p, grad_s.stride(0), grad_s.stride(1))
        run("solve", (-(-d_v // src["solve"].tunables["BLOCK_DV"]), B), pt, dinv, df, T, r0, stride_p)
        t = src["rowprobs"].tunables
        run("rowprobs", (-(-(r1 - r0) // t["BLOCK_M"]), -(-r1 // t["BLOCK_N"]), B),
            q_b, k_b, s, lse, pt, w, df, T, r0, r1, stride_p, *qs, *ks, *ss)
        run("rowsum", (-(-(r1 - r0) // src["rowsum"].tunables["BLOCK_M"]), B), gamma, pt, w, dgamma, T, r0, r1,
            stride_p, *gs)
        t = src["dq"].tunables
        run("dq", (-(-(r1 - r0) // t["BLOCK_M"]), -(-d_qk // t["BLOCK_N"]), B),
            w, k_b, dq, T, r0, r1, stride_p, *ks, dq.stride(0), dq.stride(1))
        t = src["dk"].tunables
        run("dk", (-(-r1 // t["BLOCK_M"]), -(-d_qk // t["BLOCK_N"]), B), w, q_b, dk, T, r0, r1, stride_p, *qs)
    return df, dq, dk, dgamma
