"""Triton kernels for the blocked feedback ops (ir/ops_chunked.py), generated from the IR nodes.

Three kernels, none of which writes a T x T matrix:

- ``feedback_lse``: one program per (row block, batch); online max/sum over the strictly causal
  columns. Fully parallel.
- ``feedback_diag_inverse``: one program per (chunk, batch); builds the C x C block
  A = gamma * exp(q k^T * scale - lse) (strictly lower) in registers and inverts I - A by repeated
  squaring, (I - A)^-1 = (I + A)(I + A^2)(I + A^4)... (A is nilpotent of index <= C, so log2(C)
  factors are exact), with tensor-core products. Fully parallel.
- ``feedback_solve``: one program per (column block of s, batch) walks the chunks in order
  (left-looking): acc = f_c + sum_{c' < c} B_cc' s_c' with B recomputed on the fly from q_b, k_b,
  gamma and lse, then s_c = dinv_c @ acc. s is accumulated in an fp32 workspace.

The code shape follows the node: when the feedback width fits one tile, the row block of q_b is
loaded once per chunk; otherwise the logits contract over width tiles in a loop.
"""
from __future__ import annotations

from ...errors import UnsupportedError
from ...ir.graph import Node
from .codegen import AOT_POINTER, KernelSource, dot_block, dot_policy

CHUNK_SOLVE_BLOCK_DV = 64


def _widths(node: Node, f_index: int | None):
    qb = node.inputs[1 if f_index == 0 else 0]
    d_qk = qb.type.shape[2]
    d_v = node.inputs[0].type.shape[2] if f_index == 0 else None
    for name, d in (("feedback width", d_qk), ("f width", d_v)):
        if d is not None and not isinstance(d, int):
            raise UnsupportedError(f"op '{node.op}': the {name} must be static to generate a kernel, got {d}")
    return d_qk, d_v


def _logits(rows: str, cols: str, m: str, n: str, d_qk: int, block_k: int, hoisted_q: str | None,
            dot_dtype: str, prec: str, indent: str) -> str:
    """Source computing logits[m, n] = q_b[rows] . k_b[cols] in fp32 (contracting over the width)."""
    kmask = "" if d_qk % block_k == 0 else " & ((k0 + kk)[None, :] < D_QK)"
    kmask_t = "" if d_qk % block_k == 0 else " & ((k0 + kk)[:, None] < D_QK)"
    if hoisted_q is not None:
        return (f"{indent}kt = tl.load(k_base + {cols}[None, :] * stride_kt + kk[:, None], "
                f"mask=({cols}[None, :] < T){kmask_t.replace('k0 + ', '')}, other=0.0).to(tl.float32)\n"
                f"{indent}logits = tl.dot({hoisted_q}, kt.to({dot_dtype}), out_dtype=tl.float32, input_precision=\"{prec}\")\n")
    return (f"{indent}logits = tl.zeros([{m}, {n}], tl.float32)\n"
            f"{indent}for k0 in range(0, D_QK, BLOCK_K):\n"
            f"{indent}    q = tl.load(q_base + {rows}[:, None] * stride_qt + (k0 + kk)[None, :], "
            f"mask=({rows}[:, None] < T){kmask}, other=0.0).to(tl.float32)\n"
            f"{indent}    kt = tl.load(k_base + {cols}[None, :] * stride_kt + (k0 + kk)[:, None], "
            f"mask=({cols}[None, :] < T){kmask_t}, other=0.0).to(tl.float32)\n"
            f"{indent}    logits += tl.dot(q.to({dot_dtype}), kt.to({dot_dtype}), out_dtype=tl.float32, "
            f"input_precision=\"{prec}\")\n")


def _hoist_q(rows: str, d_qk: int, block_k: int, dot_dtype: str, indent: str) -> str:
    kmask = "" if d_qk == block_k else " & (kk[None, :] < D_QK)"
    return (f"{indent}q_rows = tl.load(q_base + {rows}[:, None] * stride_qt + kk[None, :], "
            f"mask=({rows}[:, None] < T){kmask}, other=0.0).to(tl.float32).to({dot_dtype})\n")


def _constants(**kw) -> str:
    return "".join(f"{k} = tl.constexpr({v!r})\n" for k, v in kw.items()) + "\n\n"


def generate_lse(node: Node, dtypes: dict, interpret: bool) -> KernelSource:
    d_qk, _ = _widths(node, None)
    qdt = dtypes["q_b"]
    pol = dot_policy(qdt, interpret)
    block_m = block_n = 64
    block_k = dot_block(d_qk, 128)
    hoist = block_k >= d_qk
    body = _constants(D_QK=d_qk, SCALE=node.attrs["scale"], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    body += ("@triton.jit\n"
             "def feedback_lse(Q, K, LSE, T, stride_qb, stride_qt, stride_kb, stride_kt):\n"
             "    # lse[t] = log sum_{j<t} exp(q_b[t].k_b[j] * SCALE) for one row block; lse[0] = 0\n"
             "    pid_m = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    q_base = Q + b * stride_qb\n"
             "    k_base = K + b * stride_kb\n"
             "    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)\n"
             "    l_i = tl.zeros([BLOCK_M], tl.float32)\n")
    if hoist:
        body += _hoist_q("rows", d_qk, block_k, pol["dot_dtype"], "    ")
    body += ("    for n0 in range(0, (pid_m + 1) * BLOCK_M - 1, BLOCK_N):  # columns j < t <= last row\n"
             "        cols = n0 + tl.arange(0, BLOCK_N)\n")
    body += _logits("rows", "cols", "BLOCK_M", "BLOCK_N", d_qk, block_k, "q_rows" if hoist else None,
                    pol["dot_dtype"], pol["dot_precision"], "        ")
    body += ("        z = tl.where((cols[None, :] < rows[:, None]) & (cols[None, :] < T), logits * SCALE, float(\"-inf\"))\n"
             "        m_new = tl.maximum(m_i, tl.max(z, axis=1))\n"
             "        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)\n"
             "        m_i = m_new\n"
             "    lse = tl.where(l_i > 0.0, m_i + tl.log(tl.maximum(l_i, 1e-30)), 0.0)\n"
             "    tl.store(LSE + b * T + rows, lse, mask=rows < T)\n")
    ptr = AOT_POINTER[qdt]
    return KernelSource(
        "feedback_lse", "feedback_lse", {"D_qk": d_qk, "dtype": qdt, "scale": node.attrs["scale"]},
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "q_hoisted": hoist, **pol}, body,
        {"Q": ptr, "K": ptr, "LSE": "*fp32", "T": "i32", "stride_qb": "i64", "stride_qt": "i32",
         "stride_kb": "i64", "stride_kt": "i32"},
        do_not_specialize=("T", "stride_qb", "stride_kb"))


def generate_diag_inverse(node: Node, dtypes: dict, interpret: bool) -> KernelSource:
    d_qk, _ = _widths(node, None)
    C = node.attrs["chunk_size"]
    qdt = dtypes["q_b"]
    pol = dot_policy(qdt, interpret)
    block_k = dot_block(d_qk, 64)
    hoist = block_k >= d_qk
    log2c = C.bit_length() - 1
    body = _constants(D_QK=d_qk, SCALE=node.attrs["scale"], C=C, LOG2_C=log2c, BLOCK_K=block_k)
    body += ("@triton.jit\n"
             "def feedback_diag_inverse(Q, K, GAMMA, LSE, DINV, T, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                          stride_gb, stride_gt):\n"
             "    # (I - A)^-1 of diagonal block c, A[t, j] = gamma[t] exp(q_b[t].k_b[j]*SCALE - lse[t]), j < t\n"
             "    c = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    r = tl.arange(0, C)\n"
             "    rows = c * C + r\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    q_base = Q + b * stride_qb\n"
             "    k_base = K + b * stride_kb\n")
    if hoist:
        body += _hoist_q("rows", d_qk, block_k, pol["dot_dtype"], "    ")
    body += _logits("rows", "rows", "C", "C", d_qk, block_k, "q_rows" if hoist else None,
                    pol["dot_dtype"], pol["dot_precision"], "    ")
    body += ("    lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "    gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "    strict = (r[None, :] < r[:, None]) & (rows[:, None] < T)\n"
             "    a = tl.where(strict, tl.exp(logits * SCALE - lse[:, None]), 0.0) * gamma[:, None]\n"
             "    x = tl.where(r[:, None] == r[None, :], 1.0, 0.0) + a   # sum_{k<2} A^k\n"
             "    a_pow = a\n"
             "    for _ in tl.static_range(LOG2_C - 1):   # x <- x (I + A^(2^i)) = sum_{k<2^(i+1)} A^k\n"
             f"        a_pow = tl.dot(a_pow, a_pow, out_dtype=tl.float32, input_precision=\"{pol['solve_precision']}\")\n"
             f"        x = x + tl.dot(x, a_pow, out_dtype=tl.float32, input_precision=\"{pol['solve_precision']}\")\n"
             "    n_chunks = tl.cdiv(T, C)\n"
             "    tl.store(DINV + ((b * n_chunks + c) * C + r[:, None]) * C + r[None, :], x)\n")
    ptr = AOT_POINTER[qdt]
    return KernelSource(
        "feedback_diag_inverse", "feedback_diag_inverse",
        {"D_qk": d_qk, "chunk_size": C, "dtype": qdt, "gamma_dtype": dtypes["gamma"], "scale": node.attrs["scale"]},
        {"BLOCK_K": block_k, "q_hoisted": hoist, **pol}, body,
        {"Q": ptr, "K": ptr, "GAMMA": AOT_POINTER[dtypes["gamma"]], "LSE": "*fp32", "DINV": "*fp32", "T": "i32",
         "stride_qb": "i64", "stride_qt": "i32", "stride_kb": "i64", "stride_kt": "i32",
         "stride_gb": "i64", "stride_gt": "i32"},
        do_not_specialize=("T", "stride_qb", "stride_kb", "stride_gb"))


def generate_solve(node: Node, dtypes: dict, interpret: bool) -> KernelSource:
    d_qk, d_v = _widths(node, 0)
    C = node.attrs["chunk_size"]
    qdt, fdt = dtypes["q_b"], dtypes["f"]
    pol = dot_policy(qdt, interpret)
    solve = dot_policy(fdt, interpret)["solve_precision"]
    block_k = dot_block(d_qk, 64)
    block_dv = dot_block(d_v, CHUNK_SOLVE_BLOCK_DV)
    hoist = block_k >= d_qk
    separate_out = fdt != "f32"
    vmask = "" if d_v % block_dv == 0 else " & (vcols[None, :] < D_V)"
    body = _constants(D_QK=d_qk, D_V=d_v, SCALE=node.attrs["scale"], C=C, BLOCK_K=block_k, BLOCK_DV=block_dv)
    out_args = ", OUT, stride_ob, stride_ot" if separate_out else ""
    body += ("@triton.jit\n"
             f"def feedback_solve(F, Q, K, GAMMA, LSE, DINV, S{out_args}, T, stride_fb, stride_ft, stride_qb, stride_qt,\n"
             "                   stride_kb, stride_kt, stride_gb, stride_gt):\n"
             "    # s_c = dinv_c (f_c + sum_{c'<c} B_cc' s_c'), chunk by chunk, for one block of columns of s\n"
             "    pid_v = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    vcols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)\n"
             "    r = tl.arange(0, C)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    q_base = Q + b * stride_qb\n"
             "    k_base = K + b * stride_kb\n"
             "    s_base = S + b * T * D_V   # fp32 workspace, contiguous [B, T, D_V]\n"
             "    n_chunks = tl.cdiv(T, C)\n"
             "    for c in range(0, n_chunks):\n"
             "        rows = c * C + r\n"
             f"        io_mask = (rows[:, None] < T){vmask}\n"
             "        acc = tl.load(F + b * stride_fb + rows[:, None] * stride_ft + vcols[None, :], mask=io_mask, other=0.0).to(tl.float32)\n"
             "        lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "        gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n")
    if hoist:
        body += _hoist_q("rows", d_qk, block_k, pol["dot_dtype"], "        ")
    body += ("        for n0 in range(0, c * C, C):   # earlier chunks: every column is < every row\n"
             "            cols = n0 + r\n")
    body += _logits("rows", "cols", "C", "C", d_qk, block_k, "q_rows" if hoist else None,
                    pol["dot_dtype"], pol["dot_precision"], "            ")
    body += ("            p = tl.exp(logits * SCALE - lse[:, None]) * gamma[:, None]\n"
             f"            s_prev = tl.load(s_base + cols[:, None] * D_V + vcols[None, :], mask=(cols[:, None] < T){vmask}, other=0.0)\n"
             f"            acc += tl.dot(p, s_prev, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        dinv = tl.load(DINV + ((b * n_chunks + c) * C + r[:, None]) * C + r[None, :])\n"
             f"        s_c = tl.dot(dinv, acc, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        tl.store(s_base + rows[:, None] * D_V + vcols[None, :], s_c, mask=io_mask)\n")
    if separate_out:
        body += ("        tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + vcols[None, :], "
                 "s_c.to(OUT.dtype.element_ty), mask=io_mask)\n")
    body += "        tl.debug_barrier()   # the next chunk reads these rows of s from other threads\n"
    ptr = AOT_POINTER[qdt]
    sig = {"F": AOT_POINTER[fdt], "Q": ptr, "K": ptr, "GAMMA": AOT_POINTER[dtypes["gamma"]], "LSE": "*fp32",
           "DINV": "*fp32", "S": "*fp32"}
    if separate_out:
        sig.update({"OUT": AOT_POINTER[fdt], "stride_ob": "i64", "stride_ot": "i32"})
    sig.update({"T": "i32", "stride_fb": "i64", "stride_ft": "i32", "stride_qb": "i64", "stride_qt": "i32",
                "stride_kb": "i64", "stride_kt": "i32", "stride_gb": "i64", "stride_gt": "i32"})
    dns = ("T", "stride_fb", "stride_qb", "stride_kb", "stride_gb") + (("stride_ob",) if separate_out else ())
    return KernelSource(
        "feedback_solve", "feedback_chunked",
        {"D_qk": d_qk, "D_v": d_v, "chunk_size": C, "dtype": qdt, "f_dtype": fdt, "gamma_dtype": dtypes["gamma"],
         "scale": node.attrs["scale"]},
        {"BLOCK_K": block_k, "BLOCK_DV": block_dv, "q_hoisted": hoist, "strategy": "left-looking, recomputed P",
         **pol, "solve_precision": solve}, body, sig, do_not_specialize=dns)


# -- launchers --------------------------------------------------------------------------------------
def _row_strides(x):
    return x.stride(0), x.stride(1)


def launch_lse(kernel, q_b, k_b, out=None):
    import torch

    B, T, _ = q_b.shape
    lse = torch.empty(B, T, dtype=torch.float32, device=q_b.device) if out is None else out
    src = kernel.source
    grid = (-(-T // 64), B)
    kernel.fn[grid](q_b, k_b, lse, T, *_row_strides(q_b), *_row_strides(k_b),
                    num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return lse


def launch_diag_inverse(kernel, q_b, k_b, gamma, lse, chunk_size: int, out=None):
    import torch

    B, T, _ = q_b.shape
    nC = -(-T // chunk_size)
    dinv = torch.empty(B, nC, chunk_size, chunk_size, dtype=torch.float32, device=q_b.device) if out is None else out
    src = kernel.source
    kernel.fn[(nC, B)](q_b, k_b, gamma, lse, dinv, T, *_row_strides(q_b), *_row_strides(k_b), *gamma.stride(),
                       num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return dinv


def launch_solve(kernel, f, q_b, k_b, gamma, lse, dinv, out=None):
    """``out`` (contiguous, f's dtype) may be given; for fp32 it doubles as the solve's workspace."""
    import torch

    B, T, Dv = f.shape
    src = kernel.source
    block_dv = src.tunables["BLOCK_DV"]
    if out is None:
        out = torch.empty(B, T, Dv, dtype=f.dtype, device=f.device)
    out_args = ()
    s = out
    if f.dtype != torch.float32:
        s = torch.empty(B, T, Dv, dtype=torch.float32, device=f.device)
        out_args = (out, *_row_strides(out))
    kernel.fn[(-(-Dv // block_dv), B)](f, q_b, k_b, gamma, lse, dinv, s, *out_args, T, *_row_strides(f),
                                       *_row_strides(q_b), *_row_strides(k_b), *gamma.stride(),
                                       num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return out
