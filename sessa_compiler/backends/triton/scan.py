"""Selective scan (Mamba-1 S6), generated from a ``scan_chunked`` node, in one of two strategies.

One program per (channel block, batch) carries the state h [channels, N] in registers.

- ``sequential`` (default): one time step per loop iteration on a [channels, N] tile, as Mamba-1's
  own kernel does. Parallel over batch x channels x states only.
- ``associative``: walks the IR's chunks; inside a chunk the recurrence h_t = a_t h_{t-1} + b_t runs
  as ``tl.associative_scan`` over time with the combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)
  on a [chunk, channels, N] tile: log2(chunk) parallel steps instead of chunk sequential ones.
  Triton's interpreter evaluates that scan element by element (seconds per tile), so it is
  tested at one tiny shape only and is not the default until it is measured on a GPU.
"""
from __future__ import annotations

from ...errors import UnsupportedError
from ...ir.graph import Node
from .codegen import AOT_POINTER, KernelSource, next_pow2

BLOCK_CHANNELS = 16


SCAN_STRATEGIES = ("sequential", "associative")


def generate_scan(node: Node, dtypes: dict, interpret: bool, strategy: str = "sequential") -> KernelSource:
    if strategy not in SCAN_STRATEGIES:
        raise UnsupportedError(f"scan strategy {strategy!r}: expected one of {SCAN_STRATEGIES}")
    A = node.inputs[2]
    d_inner, n_state = A.type.shape
    for name, x in (("inner width", d_inner), ("state size", n_state)):
        if not isinstance(x, int):
            raise UnsupportedError(f"op 'scan_chunked': the {name} must be static to generate a kernel, got {x}")
    L = node.attrs["chunk_size"]
    block_n = next_pow2(n_state)
    block_d = min(BLOCK_CHANNELS, next_pow2(d_inner))
    consts = dict(D_INNER=d_inner, N=n_state, L=L, BLOCK_D=block_d, BLOCK_N=block_n)
    cmask = "" if d_inner % block_d == 0 else " & (ch[None, :] < D_INNER)"
    nmask = "" if n_state == block_n else " & (n[None, :] < N)"
    body = "".join(f"{a} = tl.constexpr({b!r})\n" for a, b in consts.items()) + "\n\n"
    if strategy == "sequential":
        body += _sequential_body(cmask, nmask)
    else:
        body += _associative_body(cmask, nmask)
    sig = {"U": AOT_POINTER[dtypes["u"]], "DELTA": AOT_POINTER[dtypes["delta"]], "A": AOT_POINTER[dtypes["A"]],
           "BM": AOT_POINTER[dtypes["B"]], "CM": AOT_POINTER[dtypes["C"]], "DSKIP": AOT_POINTER[dtypes["D"]],
           "OUT": AOT_POINTER[dtypes["u"]], "T": "i32"}
    for t in "udbco":
        sig.update({f"stride_{t}b": "i64", f"stride_{t}t": "i32"})
    spec = {"D_inner": d_inner, "N": n_state, "chunk_size": L, "dtype": dtypes["u"]}
    return KernelSource("scan_chunked", "scan_chunked", spec,
                        {"strategy": strategy, "BLOCK_D": block_d, "BLOCK_N": block_n}, body, sig,
                        do_not_specialize=("T", "stride_ub", "stride_db", "stride_bb", "stride_cb", "stride_ob"),
                        uses_dot=False)


_PROLOGUE = ("    pid_d = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    ch = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)\n"
             "    n = tl.arange(0, BLOCK_N)\n")


def _sequential_body(cmask: str, nmask: str) -> str:
    cm = "" if not cmask else ", mask=ch < D_INNER, other=0.0"
    nm = "" if not nmask else ", mask=n < N, other=0.0"
    return ("@triton.jit\n"
            "def scan_chunked(U, DELTA, A, BM, CM, DSKIP, OUT, T, stride_ub, stride_ut, stride_db, stride_dt,\n"
            "                 stride_bb, stride_bt, stride_cb, stride_ct, stride_ob, stride_ot):\n"
            "    # h_t = exp(delta_t A) h_{t-1} + (delta_t u_t) B_t ; y_t = h_t C_t + D u_t, one step at a time\n"
            + _PROLOGUE +
            f"    a = tl.load(A + ch[:, None] * N + n[None, :], mask=(ch[:, None] < D_INNER){nmask}, other=0.0).to(tl.float32)\n"
            "    d_skip = tl.load(DSKIP + ch, mask=ch < D_INNER, other=0.0).to(tl.float32)\n"
            "    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)\n"
            "    for t in range(0, T):\n"
            f"        uu = tl.load(U + b * stride_ub + t * stride_ut + ch{cm}).to(tl.float32)\n"
            f"        dt = tl.load(DELTA + b * stride_db + t * stride_dt + ch{cm}).to(tl.float32)\n"
            f"        bt = tl.load(BM + b * stride_bb + t * stride_bt + n{nm}).to(tl.float32)\n"
            f"        ct = tl.load(CM + b * stride_cb + t * stride_ct + n{nm}).to(tl.float32)\n"
            "        h = tl.exp(dt[:, None] * a) * h + (dt * uu)[:, None] * bt[None, :]\n"
            "        y = tl.sum(h * ct[None, :], axis=1) + d_skip * uu\n"
            f"        tl.store(OUT + b * stride_ob + t * stride_ot + ch, y.to(OUT.dtype.element_ty){cm.replace(', other=0.0', '')})\n")


def _associative_body(cmask: str, nmask: str) -> str:
    return ("@triton.jit\n"
             "def linear_recurrence(a1, b1, a2, b2):\n"
             "    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2\n"
             "    return a1 * a2, a2 * b1 + b2\n\n\n"
             "@triton.jit\n"
             "def scan_chunked(U, DELTA, A, BM, CM, DSKIP, OUT, T, stride_ub, stride_ut, stride_db, stride_dt,\n"
             "                 stride_bb, stride_bt, stride_cb, stride_ct, stride_ob, stride_ot):\n"
             "    # h_t = exp(delta_t A) h_{t-1} + (delta_t u_t) B_t ; y_t = h_t C_t + D u_t, chunk by chunk\n"
             + _PROLOGUE +
             "    steps = tl.arange(0, L)\n"
             f"    a = tl.load(A + ch[:, None] * N + n[None, :], mask=(ch[:, None] < D_INNER){nmask}, other=0.0).to(tl.float32)\n"
             "    d_skip = tl.load(DSKIP + ch, mask=ch < D_INNER, other=0.0).to(tl.float32)\n"
             "    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)\n"
             "    for t0 in range(0, T, L):\n"
             "        ts = t0 + steps\n"
             f"        tu_mask = (ts[:, None] < T){cmask}\n"
             f"        tn_mask = (ts[:, None] < T){nmask}\n"
             "        uu = tl.load(U + b * stride_ub + ts[:, None] * stride_ut + ch[None, :], mask=tu_mask, other=0.0).to(tl.float32)\n"
             "        dt = tl.load(DELTA + b * stride_db + ts[:, None] * stride_dt + ch[None, :], mask=tu_mask, other=0.0).to(tl.float32)\n"
             "        bt = tl.load(BM + b * stride_bb + ts[:, None] * stride_bt + n[None, :], mask=tn_mask, other=0.0).to(tl.float32)\n"
             "        ct = tl.load(CM + b * stride_cb + ts[:, None] * stride_ct + n[None, :], mask=tn_mask, other=0.0).to(tl.float32)\n"
             "        decay = tl.exp(dt[:, :, None] * a[None, :, :])          # [L, BLOCK_D, BLOCK_N]; 1 past T\n"
             "        inp = (dt * uu)[:, :, None] * bt[:, None, :]             # 0 past T\n"
             "        decay_cum, inp_cum = tl.associative_scan((decay, inp), 0, linear_recurrence)\n"
             "        hs = decay_cum * h[None, :, :] + inp_cum\n"
             "        y = tl.sum(hs * ct[:, None, :], axis=2) + d_skip[None, :] * uu\n"
             "        tl.store(OUT + b * stride_ob + ts[:, None] * stride_ot + ch[None, :], y.to(OUT.dtype.element_ty), mask=tu_mask)\n"
             "        h = tl.sum(tl.where((steps == L - 1)[:, None, None], hs, 0.0), axis=0)\n")


def launch_scan(kernel, u, delta, A, B, C, D, out=None):
    import torch

    batch, T, d_inner = u.shape
    if out is None:
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
    src = kernel.source
    grid = (-(-d_inner // src.tunables["BLOCK_D"]), batch)
    kernel.fn[grid](u, delta, A.contiguous(), B, C, D.contiguous(), out, T, *u.stride()[:2], *delta.stride()[:2],
                    *B.stride()[:2], *C.stride()[:2], *out.stride()[:2],
                    num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return out
