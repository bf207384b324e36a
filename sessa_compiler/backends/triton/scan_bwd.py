"""Selective scan (Mamba-1 S6) backward as Triton kernels: a reverse scan over chunks of L steps.

Forward: h_t = a_t * h_{t-1} + (delta_t u_t) B_t with a_t = exp(delta_t A) ([channels, N]); y_t = h_t C_t + D u_t.
One program per (channel block, batch), as the forward:

- ``scan_bwd_states``: the forward recurrence again, storing h at the start of every chunk (float32
  [B, chunks, D_inner, N]).
- ``scan_bwd``: chunks last first. Each chunk's L + 1 states are recomputed from its stored start into a
  per-program float32 scratch; then the steps run backwards with the state adjoint
  g_t = a_{t+1} g_{t+1} + dy_t C_t: du_t = D dy_t + delta_t sum_n g_t B_t, ddelta_t = sum_n g_t (A a_t h_{t-1}
  + u_t B_t), dA += g_t delta_t a_t h_{t-1}, dD += dy_t u_t; dB_t = sum_d g_t delta_t u_t and dC_t = sum_d dy_t h_t
  are per channel block (summed over blocks, and dA / dD over the batch, by torch afterwards).
"""
from __future__ import annotations

import functools

from ...ir.dtypes import from_torch
from ...errors import InputError, UnsupportedError
from .codegen import AOT_POINTER, KERNEL_CACHE, KERNEL_DTYPES, KernelSource, next_pow2

BLOCK_CHANNELS = 16


def _consts(**kw) -> str:
    return "".join(f"{k} = tl.constexpr({v!r})\n" for k, v in kw.items()) + "\n\n"


def generate_scan_backward(d_inner: int, n_state: int, chunk: int, dtype: str) -> dict:
    bn = next_pow2(n_state)
    bd = min(BLOCK_CHANNELS, next_pow2(d_inner))
    consts = _consts(D_INNER=d_inner, N=n_state, L=chunk, BLOCK_D=bd, BLOCK_N=bn)
    ptr = AOT_POINTER[dtype]
    head = ("    pid_d = tl.program_id(0)\n"
            "    b = tl.program_id(1).to(tl.int64)\n"
            "    ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)\n"
            "    n = tl.arange(0, BLOCK_N)\n"
            "    cm = ch < D_INNER\n"
            "    nm = n < N\n"
            "    dn = cm[:, None] & nm[None, :]\n"
            "    a = tl.load(A + ch[:, None] * N + n[None, :], mask=dn, other=0.0).to(tl.float32)\n")
    step = ("        okc = cm & ((ch * 0 + t) < T)\n"
            "        okn = nm & ((n * 0 + t) < T)\n"
            "        uu = tl.load(U + b * stride_ub + t * stride_ut + ch, mask=okc, other=0.0).to(tl.float32)\n"
            "        dt = tl.load(DELTA + b * stride_db + t * stride_dt + ch, mask=okc, other=0.0).to(tl.float32)\n"
            "        bt = tl.load(BM + b * stride_bb + t * stride_bt + n, mask=okn, other=0.0).to(tl.float32)\n")
    strides = ("stride_ub, stride_ut, stride_db, stride_dt, stride_bb, stride_bt")
    body = consts + ("@triton.jit\n"
                     f"def scan_bwd_states(U, DELTA, A, BM, HS, T, {strides}):\n"
                     "    # HS[b, c] = h before step c * L (the forward recurrence)\n" + head +
                     "    n_chunks = tl.cdiv(T, L)\n"
                     "    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)\n"
                     "    for c in range(0, n_chunks):\n"
                     "        tl.store(HS + ((b * n_chunks + c) * D_INNER + ch[:, None]) * N + n[None, :], h, mask=dn)\n"
                     "        for i in range(0, L):\n"
                     "            t = c * L + i\n" + step.replace("        ", "            ") +
                     "            h = tl.exp(dt[:, None] * a) * h + (dt * uu)[:, None] * bt[None, :]\n")
    sig = {"U": ptr, "DELTA": ptr, "A": AOT_POINTER["f32"], "BM": ptr, "HS": "*fp32", "T": "i32"}
    for s in ("u", "d", "b"):
        sig.update({f"stride_{s}b": "i64", f"stride_{s}t": "i32"})
    spec = {"D_inner": d_inner, "N": n_state, "chunk_size": chunk, "dtype": dtype}
    out = {"states": KernelSource("scan_bwd_states", "scan_backward", spec, {"BLOCK_D": bd, "BLOCK_N": bn}, body,
                                  sig, do_not_specialize=("T",), num_warps=4, num_stages=1, uses_dot=False)}

    body = consts + ("@triton.jit\n"
                     f"def scan_bwd(U, DELTA, A, BM, CM, DSKIP, DY, HS, SCR, DU, DDELTA, DAP, DBP, DCP, DDP, T, {strides},\n"
                     "             stride_cb, stride_ct, stride_gb, stride_gt, stride_xb, stride_xt):\n"
                     "    # reverse scan: g_t = a_{t+1} g_{t+1} + dy_t C_t, chunks last first\n" + head +
                     "    n_chunks = tl.cdiv(T, L)\n"
                     "    d_skip = tl.load(DSKIP + ch, mask=cm, other=0.0).to(tl.float32)\n"
                     "    scr = SCR + ((b * tl.num_programs(0) + pid_d) * (L + 1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]) "
                     "* BLOCK_N + n[None, :]\n"
                     "    g = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)\n"
                     "    da = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)\n"
                     "    dd = tl.zeros([BLOCK_D], tl.float32)\n"
                     "    for cc in range(0, n_chunks):\n"
                     "        c = n_chunks - 1 - cc\n"
                     "        h = tl.load(HS + ((b * n_chunks + c) * D_INNER + ch[:, None]) * N + n[None, :], mask=dn, other=0.0)\n"
                     "        tl.store(scr, h)\n"
                     "        for i in range(0, L):   # the chunk's states h_t into scratch slots 1..L\n"
                     "            t = c * L + i\n" + step.replace("        ", "            ") +
                     "            h = tl.exp(dt[:, None] * a) * h + (dt * uu)[:, None] * bt[None, :]\n"
                     "            tl.store(scr + (i + 1) * BLOCK_D * BLOCK_N, h)\n"
                     "        tl.debug_barrier()\n"
                     "        for ii in range(0, L):\n"
                     "            i = L - 1 - ii\n"
                     "            t = c * L + i\n" + step.replace("        ", "            ") +
                     "            ct = tl.load(CM + b * stride_cb + t * stride_ct + n, mask=okn, other=0.0).to(tl.float32)\n"
                     "            dy = tl.load(DY + b * stride_gb + t * stride_gt + ch, mask=okc, other=0.0).to(tl.float32)\n"
                     "            h_t = tl.load(scr + (i + 1) * BLOCK_D * BLOCK_N)\n"
                     "            h_prev = tl.load(scr + i * BLOCK_D * BLOCK_N)\n"
                     "            g = g + dy[:, None] * ct[None, :]\n"
                     "            a_t = tl.exp(dt[:, None] * a)\n"
                     "            gb = tl.sum(g * bt[None, :], axis=1)\n"
                     "            du = d_skip * dy + dt * gb\n"
                     "            ddt = tl.sum(g * (a * a_t * h_prev), axis=1) + uu * gb\n"
                     "            da += g * dt[:, None] * a_t * h_prev\n"
                     "            dd += dy * uu\n"
                     "            part = (pid_d * tl.num_programs(1) + b) * T + t\n"
                     "            tl.store(DBP + part * N + n, tl.sum(tl.where(dn, g * (dt * uu)[:, None], 0.0), axis=0), "
                     "mask=okn)\n"
                     "            tl.store(DCP + part * N + n, tl.sum(tl.where(dn, h_t * dy[:, None], 0.0), axis=0), "
                     "mask=okn)\n"
                     "            tl.store(DU + b * stride_xb + t * stride_xt + ch, du.to(DU.dtype.element_ty), mask=okc)\n"
                     "            tl.store(DDELTA + b * stride_xb + t * stride_xt + ch, ddt.to(DDELTA.dtype.element_ty), "
                     "mask=okc)\n"
                     "            g = a_t * g\n"
                     "        tl.debug_barrier()\n"
                     "    tl.store(DAP + (b * D_INNER + ch[:, None]) * N + n[None, :], da, mask=dn)\n"
                     "    tl.store(DDP + b * D_INNER + ch, dd, mask=cm)\n")
    sig = {"U": ptr, "DELTA": ptr, "A": AOT_POINTER["f32"], "BM": ptr, "CM": ptr, "DSKIP": AOT_POINTER["f32"],
           "DY": ptr, "HS": "*fp32", "SCR": "*fp32", "DU": ptr, "DDELTA": ptr, "DAP": "*fp32", "DBP": "*fp32",
           "DCP": "*fp32", "DDP": "*fp32", "T": "i32"}
    for s in ("u", "d", "b", "c", "g", "x"):
        sig.update({f"stride_{s}b": "i64", f"stride_{s}t": "i32"})
    out["backward"] = KernelSource("scan_bwd", "scan_backward", spec, {"BLOCK_D": bd, "BLOCK_N": bn}, body, sig,
                                   do_not_specialize=("T",), num_warps=4, num_stages=1, uses_dot=False)
    return out


@functools.lru_cache(maxsize=32)
def _kernels(d_inner, n_state, chunk, dtype, interpret):
    srcs = generate_scan_backward(d_inner, n_state, chunk, dtype)
    return {r: KERNEL_CACHE.load(s, interpret) for r, s in srcs.items()}


def scan_backward_triton(grad_y, u, delta, A, B, C, D, *, chunk: int = 16, launch=None):
    """(du, ddelta, dA, dB, dC, dD) of y = selective_scan(u, delta, A, B, C, D) given dy: u/delta [Bt, T, Din],
    A [Din, N], B/C [Bt, T, N], D [Din]; gradients in the operands' dtypes (A and D float32 inputs expected as the
    forward's kernel reads them; their gradients come back in their own dtypes)."""
    import torch

    Bt, T, d_inner = u.shape
    n_state = A.shape[1]
    if delta.shape != u.shape or grad_y.shape != u.shape or tuple(A.shape) != (d_inner, n_state) \
            or B.shape != (Bt, T, n_state) or C.shape != B.shape or tuple(D.shape) != (d_inner,):
        raise InputError(f"op 'scan' backward: expected u/delta/grad_y [B, T, Din], A [Din, N], B/C [B, T, N], "
                         f"D [Din]; "
                         f"got {tuple(u.shape)}, {tuple(delta.shape)}, {tuple(grad_y.shape)}, {tuple(A.shape)}, "
                         f"{tuple(B.shape)}, {tuple(C.shape)}, {tuple(D.shape)}")
    dts = {from_torch(x.dtype).name for x in (u, delta, B, C, grad_y)}
    if len(dts) != 1 or not dts <= set(KERNEL_DTYPES):
        raise UnsupportedError(f"op 'scan' backward: u, delta, B, C and grad_y must share one of {KERNEL_DTYPES}, "
                               f"got {sorted(dts)}")
    dtype = dts.pop()
    kern = _kernels(d_inner, n_state, chunk, dtype, not u.is_cuda)
    L = launch or (lambda fn: fn)
    u, delta, B, C, grad_y = (x if x.stride(-1) == 1 else x.contiguous() for x in (u, delta, B, C, grad_y))
    A32, D32 = A.float().contiguous(), D.float().contiguous()
    src = kern["backward"].source
    bd, bn = src.tunables["BLOCK_D"], src.tunables["BLOCK_N"]
    nd = -(-d_inner // bd)
    nc = -(-T // chunk)
    dev = u.device
    hs = torch.empty(Bt, max(nc, 1), d_inner, n_state, dtype=torch.float32, device=dev)
    scr = torch.empty(Bt, nd, chunk + 1, bd, bn, dtype=torch.float32, device=dev)
    du, ddelta = torch.empty(Bt, T, d_inner, dtype=u.dtype, device=dev), torch.empty(Bt, T, d_inner, dtype=u.dtype,
                                                                                       device=dev)
    dap = torch.empty(Bt, d_inner, n_state, dtype=torch.float32, device=dev)
    dbp = torch.empty(nd, Bt, T, n_state, dtype=torch.float32, device=dev)
    dcp = torch.empty(nd, Bt, T, n_state, dtype=torch.float32, device=dev)
    ddp = torch.empty(Bt, d_inner, dtype=torch.float32, device=dev)
    if T == 0 or Bt == 0:
        z = torch.zeros
        return (du, ddelta, z(A.shape, dtype=A.dtype, device=dev), z(B.shape, dtype=B.dtype, device=dev),
                z(C.shape, dtype=C.dtype, device=dev), z(D.shape, dtype=D.dtype, device=dev))
    common = (*u.stride()[:2], *delta.stride()[:2], *B.stride()[:2])
    st = kern["states"].source
    L(kern["states"].fn)[(nd, Bt)](u, delta, A32, B, hs, T, *common, num_warps=st.num_warps,
                                   num_stages=st.num_stages)
    L(kern["backward"].fn)[(nd, Bt)](u, delta, A32, B, C, D32, grad_y, hs, scr, du, ddelta, dap, dbp, dcp, ddp, T,
                                     *common, *C.stride()[:2], *grad_y.stride()[:2], *du.stride()[:2],
                                     num_warps=src.num_warps, num_stages=src.num_stages)
    return (du, ddelta, dap.sum(0).to(A.dtype), dbp.sum(0).to(B.dtype), dcp.sum(0).to(C.dtype),
            ddp.sum(0).to(D.dtype))
