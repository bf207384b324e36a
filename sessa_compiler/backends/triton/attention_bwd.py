"""Causal attention backward (FlashAttention-2 style) as Triton kernels, with GQA and interleaved RoPE.

Given q [B, T, H, d], k [B, T, Hkv, d], v [B, T, Hkv, dv], the forward's output o and its gradient dO
([B, T, H, dv]) and the forward's row log-sum-exps lse[b, h, t] = log sum_{j<=t} exp(scale * q_t . k_j)
(natural log, of the rotated q and k when RoPE is on; any [B, H, T] strided view, float32):

- ``attention_lse`` (only when lse is not given): the log-sum-exps, online over key tiles.
- ``attention_bwd_delta``: delta[b, h, t] = dO_t . o_t (the softmax backward's row term).
- ``attention_bwd_dkdv``: one program per (key block, batch x kv head); walks the key block's query
  group (GQA: the H/Hkv query heads of its kv head, summed in registers, no atomics) and every later
  row block: P^T = exp(scale k q^T - lse) recomputed, dV += P^T dO, dS^T = P^T * (V dO^T - delta),
  dK += scale dS^T Q.
- ``attention_bwd_dq``: one program per (query block, batch x head), a second pass over the key blocks
  up to the diagonal: dQ = scale sum dS K.
- ``attention_rope`` (RoPE only): rotates q and k into float copies before, and applies the rotation's
  transpose (the rotation by minus the angle) to the float dQ and dK after.

With a key-padding mask (``mask`` [B, T], nonzero = keep; the op's empty_rows="mean") the kernels generated with
``key_padding=True`` also read the mask (int32 [B, T]) and each batch row's first query row that sees a key
(``first`` [B] int32, made by the launcher): padded keys get P = 0 like future ones, and a row before ``first``
sees no key and has P = 1/T over all T keys (semantics.core.attention_ref: the softmax of a uniform row, whose
gradient reaches every key). So the dK/dV pass also visits the row blocks before the diagonal that hold such
rows, and the dQ pass walks every key block for them; their lse is not read.

Nothing T x T is stored; every tile's probabilities are recomputed from lse.
"""
from __future__ import annotations

import functools

from ...ir.dtypes import from_torch
from ...errors import InputError, UnsupportedError
from .codegen import AOT_POINTER, KERNEL_CACHE, KERNEL_DTYPES, KernelSource, dot_block, dot_policy

MAX_WIDTH = 256   # head widths (d, dv) held whole in one tile


def _consts(**kw) -> str:
    return "".join(f"{k} = tl.constexpr({v!r})\n" for k, v in kw.items()) + "\n\n"


def _strides(*names) -> dict:
    sig = {}
    for n in names:
        sig.update({f"stride_{n}b": "i64", f"stride_{n}t": "i32", f"stride_{n}h": "i32"})
    return sig


def _tiles(d: int, dv: int, dtype: str, interpret: bool) -> dict:
    """Block sizes and warps per kernel: 128-row tiles at 8 warps (each warpgroup a full-width wgmma) for the
    dq pass; the dK/dV pass keeps two fp32 accumulators of 128 key rows and walks 32 query rows at a time."""
    if interpret:
        return {"dq": (16, 16, 4), "dkdv": (16, 16, 4), "lse": (16, 16, 4)}
    wide = dtype == "f32" or max(d, dv) > 128
    if wide:
        return {"dq": (64, 32, 4), "dkdv": (32, 64, 4), "lse": (64, 64, 4)}
    return {"dq": (128, 64, 8), "dkdv": (32, 128, 8), "lse": (128, 64, 8)}


def generate_attention_backward(H: int, Hkv: int, d: int, dv: int, scale: float, dtype: str, interpret: bool,
                                rope: bool = False, inv_freq_dtype: str = "f32",
                                tiles: dict | None = None, key_padding: bool = False) -> dict:
    """The backward's KernelSources by role: "lse", "delta", "dkdv", "dq" (and "rope" with RoPE). With
    ``key_padding`` the lse, dkdv and dq kernels read the key-padding mask (see the module docstring)."""
    if H % Hkv:
        raise InputError(f"op 'attention' backward: query heads {H} must be a multiple of kv heads {Hkv}")
    if max(d, dv) > MAX_WIDTH:
        raise UnsupportedError(f"op 'attention' backward: head widths up to {MAX_WIDTH} have a Triton kernel, "
                               f"got d={d}, dv={dv}")
    if rope and d % 2:
        raise UnsupportedError(f"op 'attention' backward: RoPE needs an even head width, got {d}")
    pol = dot_policy(dtype, interpret)
    dd, prec = pol["dot_dtype"], pol["dot_precision"]
    # the rotated copies are float32: the kernels then read q and k through fp32 pointers
    qdt = "f32" if rope else dtype
    tiles = tiles or _tiles(d, dv, dtype, interpret)
    bd, bdv = dot_block(d, MAX_WIDTH), dot_block(dv, MAX_WIDTH)
    dm = lambda ax: "" if d == bd else f" & (ds[{ax}] < D)"        # noqa: E731
    vm = lambda ax: "" if dv == bdv else f" & (dvs[{ax}] < DV)"    # noqa: E731
    spec = {"H": H, "Hkv": Hkv, "d": d, "d_v": dv, "dtype": dtype, "scale": scale, "rope": rope}
    kp = bool(key_padding)
    if kp:
        spec["key_padding"] = True
    margs = "MASK, " if kp else ""             # the lse kernel: the mask only
    mfargs = "MASK, FIRST, " if kp else ""     # dkdv, dq: the mask and each batch row's first row that sees a key
    msig = {"MASK": "*i32"} if kp else {}
    mfsig = {"MASK": "*i32", "FIRST": "*i32"} if kp else {}
    common = dict(H=H, HKV=Hkv, GROUP=H // Hkv, D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, SCALE=scale)
    q_ptr, ptr = AOT_POINTER[qdt], AOT_POINTER[dtype]
    out = {}

    # -- lse (when the forward did not keep it) ------------------------------------------------------------
    bm, bn, nw = tiles["lse"]
    body = _consts(**common, BLOCK_M=bm, BLOCK_N=bn)
    body += ("@triton.jit\n"
             f"def attention_lse(Q, K, LSE, {margs}T, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh):\n"
             "    # lse[b, h, t] = log sum_{j<=t} exp(q_t . k_j * SCALE), stored [B, H, T]\n"
             "    pid_m = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // H).to(tl.int64)\n"
             "    h = bh % H\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    ds = tl.arange(0, BLOCK_D)\n"
             "    k_base = K + b * stride_kb + (h // GROUP) * stride_kh\n"
             f"    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + ds[None, :], "
             f"mask=(rows[:, None] < T){dm('None, :')}, other=0.0).to(tl.float32).to({dd})\n"
             "    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)\n"
             "    l_i = tl.zeros([BLOCK_M], tl.float32)\n"
             "    for n0 in range(0, tl.minimum((pid_m + 1) * BLOCK_M, T), BLOCK_N):\n"
             "        cols = n0 + tl.arange(0, BLOCK_N)\n"
             f"        kt = tl.load(k_base + cols[None, :] * stride_kt + ds[:, None], "
             f"mask=(cols[None, :] < T){dm(':, None')}, other=0.0).to(tl.float32)\n"
             f"        s = tl.dot(q, kt.to({dd}), out_dtype=tl.float32, input_precision=\"{prec}\") * SCALE\n"
             "        z = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < T), s, float(\"-inf\"))\n")
    if kp:   # padded keys are -inf too
        body += ("        keep = tl.load(MASK + b * T + cols, mask=cols < T, other=0)\n"
                 "        z = tl.where(keep[None, :] != 0, z, float(\"-inf\"))\n")
    body += ("        m_new = tl.maximum(m_i, tl.max(z, axis=1))\n"
             "        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)\n"
             "        m_i = m_new\n")
    if kp:   # a row that sees no key: log T (the uniform row's; the backward does not read it)
        body += ("    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), tl.log(T.to(tl.float32)))\n"
                 "    tl.store(LSE + (b * H + h) * T + rows, lse, mask=rows < T)\n")
    else:
        body += "    tl.store(LSE + (b * H + h) * T + rows, m_i + tl.log(tl.maximum(l_i, 1e-30)), mask=rows < T)\n"
    out["lse"] = KernelSource("attention_lse", "attention_backward", spec,
                              {"BLOCK_M": bm, "BLOCK_N": bn, "dot_dtype": dd, "dot_precision": prec}, body,
                              {"Q": q_ptr, "K": q_ptr, "LSE": "*fp32", **msig, "T": "i32", **_strides("q", "k")},
                              do_not_specialize=("T",), num_warps=nw, num_stages=2)

    # -- delta = rowsum(dO * o) ------------------------------------------------------------------------------
    body = _consts(**common, BLOCK_M=64)
    body += ("@triton.jit\n"
             "def attention_bwd_delta(O, DO, DELTA, T, stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, "
             "stride_gh):\n"
             "    # delta[b, h, t] = dO_t . o_t, stored [B, H, T] float32\n"
             "    pid_m = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // H).to(tl.int64)\n"
             "    h = bh % H\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    dvs = tl.arange(0, BLOCK_DV)\n"
             f"    mask = (rows[:, None] < T){vm('None, :')}\n"
             "    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dvs[None, :], mask=mask, "
             "other=0.0).to(tl.float32)\n"
             "    g = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + dvs[None, :], mask=mask, "
             "other=0.0).to(tl.float32)\n"
             "    tl.store(DELTA + (b * H + h) * T + rows, tl.sum(o * g, axis=1), mask=rows < T)\n")
    out["delta"] = KernelSource("attention_bwd_delta", "attention_backward", spec, {"BLOCK_M": 64}, body,
                                {"O": ptr, "DO": ptr, "DELTA": "*fp32", "T": "i32", **_strides("o", "g")},
                                do_not_specialize=("T",), num_warps=4, num_stages=1, uses_dot=False)

    # -- dK, dV: one program per key block and kv head, the query group summed in registers -------------------
    bm, bn, nw = tiles["dkdv"]
    dk_ptr = "*fp32" if rope else ptr
    body = _consts(**common, BLOCK_M=bm, BLOCK_N=bn)
    body += ("@triton.jit\n"
             f"def attention_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, {mfargs}T, stride_qb, stride_qt, stride_qh,\n"
             "                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,\n"
             "                       stride_gb, stride_gt, stride_gh, stride_lb, stride_lh, stride_lt,\n"
             "                       stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh):\n"
             "    # dV = sum_h P^T dO, dK = SCALE sum_h (P * (dO V^T - delta))^T Q over the kv head's query group\n"
             "    pid_n = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // HKV).to(tl.int64)\n"
             "    kvh = bh % HKV\n"
             "    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    ds = tl.arange(0, BLOCK_D)\n"
             "    dvs = tl.arange(0, BLOCK_DV)\n"
             f"    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_kt + ds[None, :], "
             f"mask=(cols[:, None] < T){dm('None, :')}, other=0.0).to(tl.float32).to({dd})\n"
             f"    v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vt + dvs[None, :], "
             f"mask=(cols[:, None] < T){vm('None, :')}, other=0.0).to(tl.float32).to({dd})\n"
             "    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)\n"
             "    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)\n"
             "    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M   # the first row block that sees this key block\n")
    if kp:
        body += ("    km = tl.load(MASK + b * T + cols, mask=cols < T, other=0)   # padded keys: P = 0\n"
                 "    first = tl.load(FIRST + b)   # rows before it see no key: P = 1/T over all T keys\n"
                 "    inv_t = 1.0 / T.to(tl.float32)\n")
    tile = ("            rows = m0 + tl.arange(0, BLOCK_M)\n"
            f"            qt = tl.load(q_base + rows[None, :] * stride_qt + ds[:, None], "
            f"mask=(rows[None, :] < T){dm(':, None')}, other=0.0).to(tl.float32).to({dd})\n"
            f"            do = tl.load(g_base + rows[:, None] * stride_gt + dvs[None, :], "
            f"mask=(rows[:, None] < T){vm('None, :')}, other=0.0).to(tl.float32).to({dd})\n"
            "            lse = tl.load(l_base + rows * stride_lt, mask=rows < T, other=0.0)\n"
            "            delta = tl.load(d_base + rows, mask=rows < T, other=0.0)\n"
            f"            st = tl.dot(k, qt, out_dtype=tl.float32, input_precision=\"{prec}\") * SCALE\n"
            "            keep = (cols[:, None] <= rows[None, :]) & (rows[None, :] < T)\n")
    if kp:
        tile += ("            pt = tl.where(keep & (km[:, None] != 0), tl.exp(st - lse[None, :]), 0.0)\n"
                 "            pt = tl.where(rows[None, :] < first, tl.where((cols[:, None] < T) & (rows[None, :] < T), "
                 "inv_t, 0.0), pt)\n")
    else:
        tile += "            pt = tl.where(keep, tl.exp(st - lse[None, :]), 0.0)\n"
    tile += (f"            dv += tl.dot(pt.to({dd}), do, out_dtype=tl.float32, input_precision=\"{prec}\")\n"
             f"            dpt = tl.dot(v, tl.trans(do), out_dtype=tl.float32, input_precision=\"{prec}\")\n"
             "            dst = pt * (dpt - delta[None, :])\n"
             f"            dk += tl.dot(dst.to({dd}), tl.trans(qt), out_dtype=tl.float32, input_precision=\"{prec}\")\n")
    body += ("    for g in range(GROUP):\n"
             "        h = kvh * GROUP + g\n"
             "        q_base = Q + b * stride_qb + h * stride_qh\n"
             "        g_base = DO + b * stride_gb + h * stride_gh\n"
             "        l_base = LSE + b * stride_lb + h * stride_lh\n"
             "        d_base = DELTA + (b * H + h) * T\n")
    if kp:   # first the row blocks before the diagonal that hold rows seeing no key
        body += "        for m0 in range(0, tl.minimum(lo, first), BLOCK_M):\n" + tile
    body += "        for m0 in range(lo, T, BLOCK_M):\n" + tile
    body += (
             "    dk = dk * SCALE\n"
             f"    tl.store(DK + b * stride_dkb + kvh * stride_dkh + cols[:, None] * stride_dkt + ds[None, :], "
             f"dk.to(DK.dtype.element_ty), mask=(cols[:, None] < T){dm('None, :')})\n"
             f"    tl.store(DV_OUT + b * stride_dvb + kvh * stride_dvh + cols[:, None] * stride_dvt + dvs[None, :], "
             f"dv.to(DV_OUT.dtype.element_ty), mask=(cols[:, None] < T){vm('None, :')})\n")
    out["dkdv"] = KernelSource(
        "attention_bwd_dkdv", "attention_backward", spec,
        {"BLOCK_M": bm, "BLOCK_N": bn, "dot_dtype": dd, "dot_precision": prec}, body,
        {"Q": q_ptr, "K": q_ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": dk_ptr, "DV_OUT": ptr,
         **mfsig, "T": "i32", **_strides("q", "k", "v", "g"), "stride_lb": "i64", "stride_lh": "i32", "stride_lt": "i32",
         **_strides("dk", "dv")},
        do_not_specialize=("T",), num_warps=nw, num_stages=2)

    # -- dQ: a second pass per query block over the key blocks up to the diagonal -----------------------------
    bm, bn, nw = tiles["dq"]
    body = _consts(**common, BLOCK_M=bm, BLOCK_N=bn)
    body += ("@triton.jit\n"
             f"def attention_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, {mfargs}T, stride_qb, stride_qt, stride_qh,\n"
             "                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,\n"
             "                     stride_gb, stride_gt, stride_gh, stride_lb, stride_lh, stride_lt,\n"
             "                     stride_dqb, stride_dqt, stride_dqh):\n"
             "    # dQ = SCALE (P * (dO V^T - delta)) K for one query block of one head\n"
             "    pid_m = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // H).to(tl.int64)\n"
             "    h = bh % H\n"
             "    kvh = h // GROUP\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    ds = tl.arange(0, BLOCK_D)\n"
             "    dvs = tl.arange(0, BLOCK_DV)\n"
             "    k_base = K + b * stride_kb + kvh * stride_kh\n"
             "    v_base = V + b * stride_vb + kvh * stride_vh\n"
             f"    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + ds[None, :], "
             f"mask=(rows[:, None] < T){dm('None, :')}, other=0.0).to(tl.float32).to({dd})\n"
             f"    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + dvs[None, :], "
             f"mask=(rows[:, None] < T){vm('None, :')}, other=0.0).to(tl.float32).to({dd})\n"
             "    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows * stride_lt, mask=rows < T, other=0.0)\n"
             "    delta = tl.load(DELTA + (b * H + h) * T + rows, mask=rows < T, other=0.0)\n"
             "    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)\n"
             "    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)\n")
    if kp:   # a block holding rows that see no key walks every key block
        body += ("    first = tl.load(FIRST + b)\n"
                 "    inv_t = 1.0 / T.to(tl.float32)\n"
                 "    if pid_m * BLOCK_M < first:\n"
                 "        hi = T\n")
    body += ("    for n0 in range(0, hi, BLOCK_N):\n"
             "        cols = n0 + tl.arange(0, BLOCK_N)\n"
             f"        kt = tl.load(k_base + cols[None, :] * stride_kt + ds[:, None], "
             f"mask=(cols[None, :] < T){dm(':, None')}, other=0.0).to(tl.float32).to({dd})\n"
             f"        vt = tl.load(v_base + cols[None, :] * stride_vt + dvs[:, None], "
             f"mask=(cols[None, :] < T){vm(':, None')}, other=0.0).to(tl.float32).to({dd})\n"
             f"        s = tl.dot(q, kt, out_dtype=tl.float32, input_precision=\"{prec}\") * SCALE\n"
             "        keep = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T)\n")
    if kp:
        body += ("        km = tl.load(MASK + b * T + cols, mask=cols < T, other=0)\n"
                 "        p = tl.where(keep & (km[None, :] != 0), tl.exp(s - lse[:, None]), 0.0)\n"
                 "        p = tl.where(rows[:, None] < first, tl.where(cols[None, :] < T, inv_t, 0.0), p)\n")
    else:
        body += "        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)\n"
    body += (
             f"        dp = tl.dot(do, vt, out_dtype=tl.float32, input_precision=\"{prec}\")\n"
             "        dsc = p * (dp - delta[:, None])\n"
             f"        dq += tl.dot(dsc.to({dd}), tl.trans(kt), out_dtype=tl.float32, input_precision=\"{prec}\")\n"
             "    dq = dq * SCALE\n"
             f"    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + ds[None, :], "
             f"dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < T){dm('None, :')})\n")
    out["dq"] = KernelSource(
        "attention_bwd_dq", "attention_backward", spec,
        {"BLOCK_M": bm, "BLOCK_N": bn, "dot_dtype": dd, "dot_precision": prec}, body,
        {"Q": q_ptr, "K": q_ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": dk_ptr, **mfsig, "T": "i32",
         **_strides("q", "k", "v", "g"), "stride_lb": "i64", "stride_lh": "i32", "stride_lt": "i32",
         **_strides("dq")},
        do_not_specialize=("T",), num_warps=nw, num_stages=2)

    if rope:
        out["rope"] = _rope_source(d, dtype, inv_freq_dtype)
    return out


def _rope_source(d: int, dtype: str, inv_freq_dtype: str) -> KernelSource:
    """out = rotation of x's interleaved pairs by SIGN * t * inv_freq (SIGN -1: the transpose); x and out
    [B, T, HX, d] strided; used with x in the operand dtype -> float32 copy, and float32 gradient -> dtype."""
    half = d // 2
    bh = dot_block(half, 128)
    imask = "" if half == bh else " & (i[None, :] < HALF)"
    body = _consts(D=d, HALF=half, BLOCK_HALF=bh, BLOCK_M=32)
    body += ("@triton.jit\n"
             "def attention_rope(X, INV_FREQ, OUT, T, HX, sign, stride_xb, stride_xt, stride_xh, stride_yb, "
             "stride_yt, stride_yh):\n"
             "    pid_m = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // HX).to(tl.int64)\n"
             "    h = bh % HX\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    i = tl.arange(0, BLOCK_HALF)\n"
             f"    mask = (rows[:, None] < T){imask}\n"
             "    inv_freq = tl.load(INV_FREQ + i, mask=i < HALF, other=0.0).to(tl.float32)\n"
             "    ang = rows[:, None].to(tl.float32) * inv_freq[None, :]\n"
             "    cos, sin = tl.cos(ang), tl.sin(ang) * sign\n"
             "    x = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt + 2 * i[None, :]\n"
             "    xe = tl.load(x, mask=mask, other=0.0).to(tl.float32)\n"
             "    xo = tl.load(x + 1, mask=mask, other=0.0).to(tl.float32)\n"
             "    y = OUT + b * stride_yb + h * stride_yh + rows[:, None] * stride_yt + 2 * i[None, :]\n"
             "    tl.store(y, (xe * cos - xo * sin).to(OUT.dtype.element_ty), mask=mask)\n"
             "    tl.store(y + 1, (xe * sin + xo * cos).to(OUT.dtype.element_ty), mask=mask)\n")
    # one kernel serves both directions: X and OUT dtypes differ per direction, so AOT compiles the forward one
    return KernelSource("attention_rope", "attention_backward", {"d": d, "dtype": dtype},
                        {"BLOCK_M": 32, "BLOCK_HALF": bh}, body,
                        {"X": AOT_POINTER[dtype], "INV_FREQ": AOT_POINTER[inv_freq_dtype], "OUT": "*fp32",
                         "T": "i32", "HX": "i32", "sign": "fp32", **_strides("x", "y")},
                        do_not_specialize=("T",), num_warps=4, num_stages=1, uses_dot=False)


@functools.lru_cache(maxsize=64)
def _kernels(H, Hkv, d, dv, scale, dtype, interpret, rope, inv_freq_dtype, tiles, key_padding=False):
    srcs = generate_attention_backward(H, Hkv, d, dv, scale, dtype, interpret, rope, inv_freq_dtype,
                                       dict(tiles) if tiles else None, key_padding)
    return {role: KERNEL_CACHE.load(src, interpret) for role, src in srcs.items()}


def _check(q, k, v, out, grad_out, lse, mask=None):
    import torch

    if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(q.shape[:2])):
        raise InputError(f"op 'attention' backward: the key-padding mask must be [B, T] = {tuple(q.shape[:2])}, "
                         f"got {tuple(mask.shape)}")
    for name, x in (("k", k), ("v", v), ("out", out), ("grad_out", grad_out)):
        if x.dim() != 4:
            raise InputError(f"op 'attention' backward: {name} must be [B, T, heads, width], got {tuple(x.shape)}")
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise InputError(f"op 'attention' backward: expected q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    want = q.shape[:3] + (v.shape[3],)
    for name, x in (("out", out), ("grad_out", grad_out)):
        if tuple(x.shape) != tuple(want):
            raise InputError(f"op 'attention' backward: {name} must be {tuple(want)}, got {tuple(x.shape)}")
    if lse is not None and (tuple(lse.shape) != (q.shape[0], q.shape[2], q.shape[1]) or lse.dtype != torch.float32):
        raise InputError(f"op 'attention' backward: lse must be float32 [B, H, T] = "
                         f"{(q.shape[0], q.shape[2], q.shape[1])}, got {lse.dtype} {tuple(lse.shape)}")
    dts = {from_torch(x.dtype).name for x in (q, k, v, out, grad_out)}
    if len(dts) != 1 or not dts <= set(KERNEL_DTYPES):
        raise UnsupportedError(f"op 'attention' backward: q, k, v, out and grad_out must share one of "
                               f"{KERNEL_DTYPES}, got {sorted(dts)}")


def attention_lse_triton(q, k, scale: float, inv_freq=None, *, launch=None):
    """lse[b, h, t] = log sum_{j<=t} exp(scale q_t . k_j) (after RoPE when inv_freq is given): float32 [B, H, T]."""
    kern = _kernels(q.shape[2], k.shape[2], q.shape[3], q.shape[3], float(scale), from_torch(q.dtype).name,
                    not q.is_cuda, inv_freq is not None, from_torch(inv_freq.dtype).name if inv_freq is not None
                    else "f32", None)
    if inv_freq is not None:
        q, k = _rotate(kern["rope"], q, inv_freq, launch), _rotate(kern["rope"], k, inv_freq, launch)
    return _lse(kern["lse"], q, k, launch)


def _launcher(launch):
    return launch or (lambda fn: fn)


def _lse(kl, q, k, launch, keep=()):
    import torch

    B, T, H, _ = q.shape
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    src = kl.source
    _launcher(launch)(kl.fn)[(-(-T // src.tunables["BLOCK_M"]), B * H)](
        q, k, lse, *keep, T, *q.stride()[:3], *k.stride()[:3], num_warps=src.num_warps, num_stages=src.num_stages)
    return lse


def _mask_args(mask, T: int, device):
    """(keep int32 [B, T] contiguous, first int32 [B]): the key-padding mask as the kernels read it, and each batch
    row's first unpadded key (T when none): the rows before it see no key."""
    import torch

    keep = (mask != 0).to(device=device, dtype=torch.int32).contiguous()
    first = torch.where(keep.any(1), keep.argmax(1), torch.full_like(keep[:, 0], T)).to(torch.int32).contiguous()
    return keep, first


def _rotate(kr, x, inv_freq, launch, sign: float = 1.0, dtype=None):
    import torch

    B, T, HX, _ = x.shape
    y = torch.empty(x.shape, dtype=dtype or torch.float32, device=x.device)
    src = kr.source
    _launcher(launch)(kr.fn)[(-(-T // src.tunables["BLOCK_M"]), B * HX)](
        x, inv_freq, y, T, HX, sign, *x.stride()[:3], *y.stride()[:3], num_warps=src.num_warps,
        num_stages=src.num_stages)
    return y


def attention_backward_triton(q, k, v, out, grad_out, scale: float, inv_freq=None, lse=None, *, tiles=None,
                              launch=None, mask=None):
    """(dq, dk, dv) of causal out = softmax_{j<=t}(scale q_t . k_j) v (GQA, RoPE on q and k when inv_freq is
    given), each in its operand's dtype. ``lse`` is the forward's [B, H, T] float32 log-sum-exps (computed by
    ``attention_lse`` when None); ``tiles`` overrides the block sizes ({"dq"|"dkdv"|"lse": (BM, BN, warps)});
    ``launch`` wraps each kernel before its launch (``torch.library.wrap_triton`` inside a triton_op). ``mask``
    [B, T] (nonzero = keep): the key-padding mask of attention_ref with empty_rows="mean" (the masked kernels;
    the lse of a row that sees no key is not read)."""
    import torch

    _check(q, k, v, out, grad_out, lse, mask)
    B, T, H, d = q.shape
    Hkv, dv = k.shape[2], v.shape[3]
    if H % Hkv:
        raise InputError(f"op 'attention' backward: query heads {H} must be a multiple of kv heads {Hkv}")
    rope = inv_freq is not None
    kern = _kernels(H, Hkv, d, dv, float(scale), from_torch(q.dtype).name, not q.is_cuda, rope,
                    from_torch(inv_freq.dtype).name if rope else "f32",
                    tuple(sorted(tiles.items())) if tiles else None, mask is not None)
    q, k, v, out, grad_out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out, grad_out))
    dq = torch.empty(q.shape, dtype=torch.float32 if rope else q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32 if rope else k.dtype, device=q.device)
    dv_ = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    if T == 0 or B == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv_
    L = _launcher(launch)
    if rope:
        inv_freq = inv_freq.contiguous()
        qr, kr = _rotate(kern["rope"], q, inv_freq, launch), _rotate(kern["rope"], k, inv_freq, launch)
    else:
        qr, kr = q, k
    masks = _mask_args(mask, T, q.device) if mask is not None else ()
    if lse is None:
        lse = _lse(kern["lse"], qr, kr, launch, masks[:1])
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    src = kern["delta"].source
    L(kern["delta"].fn)[(-(-T // src.tunables["BLOCK_M"]), B * H)](
        out, grad_out, delta, T, *out.stride()[:3], *grad_out.stride()[:3], num_warps=src.num_warps,
        num_stages=src.num_stages)
    common = (*qr.stride()[:3], *kr.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *lse.stride())
    src = kern["dkdv"].source
    L(kern["dkdv"].fn)[(-(-T // src.tunables["BLOCK_N"]), B * Hkv)](
        qr, kr, v, grad_out, lse, delta, dk, dv_, *masks, T, *common, *dk.stride()[:3], *dv_.stride()[:3],
        num_warps=src.num_warps, num_stages=src.num_stages)
    src = kern["dq"].source
    L(kern["dq"].fn)[(-(-T // src.tunables["BLOCK_M"]), B * H)](
        qr, kr, v, grad_out, lse, delta, dq, *masks, T, *common, *dq.stride()[:3],
        num_warps=src.num_warps, num_stages=src.num_stages)
    if rope:   # the rotation's transpose: rotate the float gradients back by minus the angle
        dq = _rotate(kern["rope"], dq, inv_freq, launch, -1.0, q.dtype)
        dk = _rotate(kern["rope"], dk, inv_freq, launch, -1.0, k.dtype)
    return dq, dk, dv_


# -- register_autograd pair of torch.ops.sessa_compiler.attention_triton (backends/triton/ops.py) ----------------
def attention_triton_setup_context(ctx, inputs, output):
    """Saves q, k, v, inv_freq and the output (the backward's delta = rowsum(dO * out))."""
    q, k, v, inv_freq, scale, causal = inputs
    ctx.scale, ctx.causal, ctx.rope = scale, causal, inv_freq is not None
    ctx.save_for_backward(q, k, v, inv_freq if inv_freq is not None else q.new_empty(0), output)


def attention_triton_autograd(ctx, grad):
    """The backward kernels (launched through ``wrap_triton``, so a trace records them) for causal attention in
    one kernel dtype; otherwise autograd through the reference, recomputed from the saved inputs."""
    import torch
    from torch.library import wrap_triton

    from ...semantics.core import attention_ref

    q, k, v, inv_freq, out = ctx.saved_tensors
    inv_freq = inv_freq if ctx.rope else None
    names = {from_torch(x.dtype).name for x in (q, k, v, out, grad)}
    if ctx.causal and len(names) == 1 and names <= set(KERNEL_DTYPES):
        dq, dk, dv = attention_backward_triton(q, k, v, out, grad.to(out.dtype), ctx.scale, inv_freq,
                                               launch=wrap_triton)
        return dq, dk, dv, None, None, None
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        ref = attention_ref(*leaves, ctx.scale, ctx.causal, inv_freq)
    dq, dk, dv = torch.autograd.grad(ref, leaves, grad)
    return dq, dk, dv, None, None, None
