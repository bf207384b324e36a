"""Triton kernels for the blocked feedback ops (ir/ops_chunked.py), generated from the IR nodes.

Three kernels, none of which writes a T x T matrix:

- ``feedback_lse``: one program per (batch, row block), the heaviest row blocks launched first; online
  max/sum over the strictly causal columns. Fully parallel.
- ``feedback_diag_inverse``: one program per (chunk, batch); builds the C x C block
  A = gamma * exp(q k^T * scale - lse) (strictly lower) in registers and inverts I - A by repeated
  squaring, (I - A)^-1 = (I + A)(I + A^2)(I + A^4)... (A is nilpotent of index <= C, so log2(C)
  factors are exact), with tensor-core products. Fully parallel.
- ``feedback_chunked`` (two-level): outer chunks of CO rows (256 on a GPU) in sequence, by a host
  loop of three launches each. ``feedback_probs`` computes the chunk's probabilities against every
  earlier column once (parallel over row blocks x column blocks x batch, logits over the full
  width), ``feedback_update`` adds every earlier chunk's contribution as one parallel tensor-core
  matmul (row blocks x column blocks x batch), and ``feedback_solve`` walks the chunk's inner
  blocks by their precomputed inverses. s is accumulated in an fp32 workspace; the chunk's
  probabilities take [B, CO, T] fp32 (CO <= width, so memory stays O(B*T*D)).

The code shape follows the node: the log-sum-exp and inverse kernels hoist the row block of q_b
when the feedback width fits one tile; otherwise, as in the probabilities kernel, the logits
contract over width tiles in a loop (pipelined: strides are specialised on divisibility by 16).
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
    # 8 warps: each warpgroup 64 rows x the full tile width. A width over one K step re-reads the q block for
    # every column tile: 128 columns per tile halve those re-reads against 64 (L2 traffic, issue 20); fp32
    # operands keep 64 (at 128 they take all 255 registers)
    wide = qdt == "f32"          # 4-byte operands: half the width per stage, two stages (shared memory)
    block_m, block_n = 128, 64 if wide else 128
    block_k = dot_block(d_qk, 64 if wide or d_qk > 128 else 128)
    hoist = block_k >= d_qk
    body = _constants(D_QK=d_qk, SCALE=node.attrs["scale"], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    body += ("@triton.jit\n"
             "def feedback_lse(Q, K, LSE, T, stride_qb, stride_qt, stride_kb, stride_kt):\n"
             "    # lse[t] = log sum_{j<t} exp(q_b[t].k_b[j] * SCALE) for one row block; lse[0] = 0\n"
             "    b = tl.program_id(0).to(tl.int64)\n"
             "    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)   # heaviest row blocks launch first\n"
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
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "q_hoisted": hoist,
         "order": "heaviest row blocks first", **pol}, body,
        {"Q": ptr, "K": ptr, "LSE": "*fp32", "T": "i32", "stride_qb": "i64", "stride_qt": "i32",
         "stride_kb": "i64", "stride_kt": "i32"},
        do_not_specialize=("T",), num_warps=8, num_stages=2 if wide else 3)


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
        do_not_specialize=("T",), num_warps=4, num_stages=3)


def default_outer_chunk(C: int, interpret: bool) -> int:
    """Rows per outer chunk of the two-level solve: 256 on a GPU (a 128-row tile pair of the update
    matmul, 4 inner blocks of 64); two inner blocks under the interpreter, so small tests cross outer
    chunks. A multiple of C and a power of two."""
    return 2 * C if interpret else max(C, 256)


def generate_solve(node: Node, dtypes: dict, interpret: bool, outer_chunk: int | None = None) -> KernelSource:
    """Three kernels for the two-level blocked forward substitution (see ``launch_solve``).

    For each outer chunk of CO rows at r0 (in sequence, a host loop):

    1. ``feedback_probs`` (grid CO/BM x columns/BN x B): P[r, j] = gamma exp(q_b k_b^T * scale - lse)
       for every column j left of row r's inner block, once per chunk, into an fp32 workspace
       [B, CO, T] (O(B*T*CO) memory, CO <= width): the logits contract over the full width here
       and nowhere else.
    2. ``feedback_update`` (grid CO/BM x D_V/BN x B): S[rows] = f[rows] + P[:, :r0] @ S[:r0], the
       contribution of every earlier chunk, as one parallel tensor-core matmul.
    3. ``feedback_solve`` (grid D_V/BN x B): the CO/C inner blocks in order,
       s_i = dinv_i (S_i + P[i, chunk blocks < i] @ s_chunk), with the precomputed inverses.
    """
    d_qk, d_v = _widths(node, 0)
    C = node.attrs["chunk_size"]
    CO = outer_chunk or default_outer_chunk(C, interpret)
    if CO % C or CO & (CO - 1):
        raise UnsupportedError(f"op 'feedback_chunked': the outer chunk must be a power-of-two multiple of "
                               f"chunk_size={C}, got {CO}")
    qdt, fdt = dtypes["q_b"], dtypes["f"]
    pol = dot_policy(qdt, interpret)
    solve = dot_policy(fdt, interpret)["solve_precision"]
    dd = pol["dot_dtype"]
    separate_out = fdt != "f32"
    ptr = AOT_POINTER[qdt]
    gptr = AOT_POINTER[dtypes["gamma"]]
    spec = {"D_qk": d_qk, "D_v": d_v, "chunk_size": C, "dtype": qdt, "f_dtype": fdt, "gamma_dtype": dtypes["gamma"],
            "scale": node.attrs["scale"]}

    # 1. probabilities of one outer chunk against every earlier column
    pm, pn, pk = min(128, CO), 128, dot_block(d_qk, 64)
    kmask = "" if d_qk % pk == 0 else " & ((k0 + kk)[None, :] < D_QK)"
    kmask_t = "" if d_qk % pk == 0 else " & ((k0 + kk)[:, None] < D_QK)"
    body = _constants(D_QK=d_qk, SCALE=node.attrs["scale"], C=C, CO=CO, BLOCK_M=pm, BLOCK_N=pn, BLOCK_K=pk)
    body += ("@triton.jit\n"
             "def feedback_probs(Q, K, GAMMA, LSE, P, T, r0, ncols, stride_p, stride_qb, stride_qt, stride_kb, stride_kt,\n"
             "                   stride_gb, stride_gt):\n"
             "    # P[r, j] = gamma exp(q_b[r0+r].k_b[j]*SCALE - lse) for j left of row r0+r's inner block, else 0\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b = tl.program_id(2).to(tl.int64)\n"
             "    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    rows = r0 + r\n"
             "    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    q_base = Q + b * stride_qb\n"
             "    k_base = K + b * stride_kb\n"
             "    logits = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
             "    for k0 in range(0, D_QK, BLOCK_K):\n"
             f"        q = tl.load(q_base + rows[:, None] * stride_qt + (k0 + kk)[None, :], mask=(rows[:, None] < T){kmask}, other=0.0)\n"
             f"        kt = tl.load(k_base + cols[None, :] * stride_kt + (k0 + kk)[:, None], mask=(cols[None, :] < ncols){kmask_t}, other=0.0)\n"
             f"        logits += tl.dot(q.to({dd}), kt.to({dd}), out_dtype=tl.float32, input_precision=\"{pol['dot_precision']}\")\n"
             "    lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)\n"
             "    gamma = tl.load(GAMMA + b * stride_gb + rows * stride_gt, mask=rows < T, other=0.0).to(tl.float32)\n"
             "    keep = (cols[None, :] < ((rows // C) * C)[:, None]) & (rows[:, None] < T)\n"
             "    p = tl.where(keep, tl.exp(logits * SCALE - lse[:, None]), 0.0) * gamma[:, None]\n"
             "    tl.store(P + (b * CO + r[:, None]) * stride_p + cols[None, :], p, mask=cols[None, :] < ncols)\n")
    probs = KernelSource(
        "feedback_probs", "feedback_chunked", spec,
        {"CO": CO, "BLOCK_M": pm, "BLOCK_N": pn, "BLOCK_K": pk, "dot_dtype": dd, "dot_precision": pol["dot_precision"]},
        body, {"Q": ptr, "K": ptr, "GAMMA": gptr, "LSE": "*fp32", "P": "*fp32", "T": "i32", "r0": "i32",
               "ncols": "i32", "stride_p": "i32", "stride_qb": "i64", "stride_qt": "i32", "stride_kb": "i64",
               "stride_kt": "i32", "stride_gb": "i64", "stride_gt": "i32"},
        do_not_specialize=("T", "ncols"), num_warps=8, num_stages=3)

    # 2. the contribution of every earlier chunk: one matmul over rows x columns x batch
    um, un, uk = min(128, CO), dot_block(d_v, 128), min(32, C)
    vmask = "" if d_v % un == 0 else " & (vcols[None, :] < D_V)"
    body = _constants(D_V=d_v, CO=CO, BLOCK_M=um, BLOCK_N=un, BLOCK_K=uk)
    body += ("@triton.jit\n"
             "def feedback_update(F, P, S, PART, T, r0, NB, k_per_split, stride_p, stride_fb, stride_ft):\n"
             "    # rows r0 + r: S = f + P[r, :r0] @ S[:r0] (fp32 workspace S, contiguous [B, T, D_V]); with a split\n"
             "    # over the earlier rows (grid axis 2 = split x batch), split 0 writes S and split q > 0 writes\n"
             "    # its partial sum to PART[q - 1] (contiguous [splits - 1, B, CO, D_V]), which feedback_solve adds\n"
             "    pid_m = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    split = tl.program_id(2) // NB\n"
             "    b = (tl.program_id(2) % NB).to(tl.int64)\n"
             "    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    rows = r0 + r\n"
             "    vcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    kk = tl.arange(0, BLOCK_K)\n"
             "    s_base = S + b * T * D_V\n"
             f"    io_mask = (rows[:, None] < T){vmask}\n"
             "    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)\n"
             "    if split == 0:\n"
             "        acc += tl.load(F + b * stride_fb + rows[:, None] * stride_ft + vcols[None, :], mask=io_mask, other=0.0).to(tl.float32)\n"
             "    k_hi = tl.minimum(r0, (split + 1) * k_per_split)\n"
             "    for k0 in range(split * k_per_split, k_hi, BLOCK_K):   # multiples of BLOCK_K, below r0\n"
             "        p = tl.load(P + (b * CO + r[:, None]) * stride_p + (k0 + kk)[None, :])\n"
             f"        sv = tl.load(s_base + (k0 + kk)[:, None] * D_V + vcols[None, :]{', mask=vcols[None, :] < D_V, other=0.0' if vmask else ''})\n"
             f"        acc += tl.dot(p, sv, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "    if split == 0:\n"
             "        tl.store(s_base + rows[:, None] * D_V + vcols[None, :], acc, mask=io_mask)\n"
             "    else:\n"
             "        part = PART + (((split - 1) * NB + b) * CO + r[:, None]) * D_V + vcols[None, :]\n"
             f"        tl.store(part, acc{', mask=vcols[None, :] < D_V' if vmask else ''})\n")
    update = KernelSource(
        "feedback_update", "feedback_chunked", spec,
        {"CO": CO, "BLOCK_M": um, "BLOCK_N": un, "BLOCK_K": uk, "solve_precision": solve}, body,
        {"F": AOT_POINTER[fdt], "P": "*fp32", "S": "*fp32", "PART": "*fp32", "T": "i32", "r0": "i32", "NB": "i32",
         "k_per_split": "i32", "stride_p": "i32", "stride_fb": "i64", "stride_ft": "i32"},
        do_not_specialize=("T", "NB"), num_warps=8, num_stages=3)

    # 3. the inner blocks of the chunk, in order, by their precomputed inverses
    block_dv = dot_block(d_v, CHUNK_SOLVE_BLOCK_DV)
    vmask = "" if d_v % block_dv == 0 else " & (vcols[None, :] < D_V)"
    out_args = ", OUT, stride_ob, stride_ot" if separate_out else ""
    body = _constants(D_V=d_v, C=C, CO=CO, BLOCK_DV=block_dv)
    body += ("@triton.jit\n"
             f"def feedback_solve(P, DINV, S, PART{out_args}, T, r0, stride_p, n_parts):\n"
             "    # s_i = dinv_i (S_i + sum_{i' < i in this chunk} P[i, i'] s_i'), inner block by inner block\n"
             "    pid_v = tl.program_id(0)\n"
             "    b = tl.program_id(1).to(tl.int64)\n"
             "    vcols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)\n"
             "    r = tl.arange(0, C)\n"
             "    s_base = S + b * T * D_V   # fp32 workspace, contiguous [B, T, D_V]\n"
             "    n_chunks = tl.cdiv(T, C)\n"
             "    n_inner = tl.cdiv(tl.minimum(CO, T - r0), C)\n"
             "    for i in range(0, n_inner):\n"
             "        rows = r0 + i * C + r\n"
             f"        io_mask = (rows[:, None] < T){vmask}\n"
             "        acc = tl.load(s_base + rows[:, None] * D_V + vcols[None, :], mask=io_mask, other=0.0)\n"
             "        for q in range(0, n_parts):   # partial sums of feedback_update's split over earlier rows\n"
             "            acc += tl.load(PART + ((q * tl.num_programs(1) + b) * CO + i * C + r[:, None]) * D_V + vcols[None, :], "
             f"mask=(r[:, None] >= 0){vmask}, other=0.0)\n"
             "        for i2 in range(0, i):\n"
             "            cols = r0 + i2 * C + r\n"
             "            p = tl.load(P + (b * CO + i * C + r[:, None]) * stride_p + cols[None, :])\n"
             f"            sv = tl.load(s_base + cols[:, None] * D_V + vcols[None, :]{', mask=vcols[None, :] < D_V, other=0.0' if vmask else ''})\n"
             f"            acc += tl.dot(p, sv, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        dinv = tl.load(DINV + ((b * n_chunks + r0 // C + i) * C + r[:, None]) * C + r[None, :])\n"
             f"        s_c = tl.dot(dinv, acc, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        tl.store(s_base + rows[:, None] * D_V + vcols[None, :], s_c, mask=io_mask)\n")
    if separate_out:
        body += ("        tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + vcols[None, :], "
                 "s_c.to(OUT.dtype.element_ty), mask=io_mask)\n")
    body += "        tl.debug_barrier()   # the next inner block reads these rows of s from other threads\n"
    sig = {"P": "*fp32", "DINV": "*fp32", "S": "*fp32", "PART": "*fp32"}
    if separate_out:
        sig.update({"OUT": AOT_POINTER[fdt], "stride_ob": "i64", "stride_ot": "i32"})
    sig.update({"T": "i32", "r0": "i32", "stride_p": "i32", "n_parts": "i32"})
    return KernelSource(
        "feedback_solve", "feedback_chunked", spec,
        {"CO": CO, "BLOCK_DV": block_dv, "strategy": "two-level: probabilities once per outer chunk, "
         "parallel update, inner blocks by inverses", "solve_precision": solve}, body, sig,
        do_not_specialize=("T", "n_parts"), num_warps=4, num_stages=2, parts=(probs, update))


# -- launchers --------------------------------------------------------------------------------------
# ``launch`` maps a kernel's jitted function to what is indexed by the grid and called: the function
# itself (the backend), or ``torch.library.wrap_triton(fn)`` (the triton_op in ops.py, so that a trace
# records each launch).
def direct_launch(fn):
    return fn


def _row_strides(x):
    return x.stride(0), x.stride(1)


def launch_lse(kernel, q_b, k_b, out=None, launch=direct_launch):
    import torch

    B, T, _ = q_b.shape
    lse = torch.empty(B, T, dtype=torch.float32, device=q_b.device) if out is None else out
    src = kernel.source
    grid = (B, -(-T // src.tunables["BLOCK_M"]))   # axis 1 walked from the last (heaviest) row block
    launch(kernel.fn)[grid](q_b, k_b, lse, T, *_row_strides(q_b), *_row_strides(k_b),
                            num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return lse


def launch_diag_inverse(kernel, q_b, k_b, gamma, lse, chunk_size: int, out=None, launch=direct_launch):
    import torch

    B, T, _ = q_b.shape
    nC = -(-T // chunk_size)
    dinv = torch.empty(B, nC, chunk_size, chunk_size, dtype=torch.float32, device=q_b.device) if out is None else out
    src = kernel.source
    launch(kernel.fn)[(nC, B)](q_b, k_b, gamma, lse, dinv, T, *_row_strides(q_b), *_row_strides(k_b),
                               *gamma.stride(), num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return dinv


def update_splits(base_programs: int, r0: int, block_k: int, target_programs: int) -> tuple:
    """(splits, rows per split) of feedback_update's sum over the r0 earlier rows, so that about
    ``target_programs`` programs run (two per SM of an H200: 264) when rows x columns x batch are
    fewer; every split gets at least 4 K tiles."""
    if r0 == 0 or base_programs >= target_programs:
        return 1, max(r0, block_k)
    splits = max(1, min(-(-target_programs // base_programs), r0 // (4 * block_k)))
    per = -(-r0 // splits)
    per = -(-per // block_k) * block_k
    return -(-r0 // per), per


def launch_solve(kernel, f, q_b, k_b, gamma, lse, dinv, out=None, target_programs: int = 264,
                 launch=direct_launch):
    """The two-level solve: per outer chunk (in order) probabilities, update, inner blocks.

    ``out`` (contiguous, f's dtype) may be given; for fp32 it doubles as the solve's workspace.
    Extra memory: the probabilities of one outer chunk, [B, CO, T] fp32, an fp32 copy of s for
    16-bit models, and the update's partial sums when it splits over earlier rows (few programs:
    small B and width).
    """
    import torch

    B, T, Dv = f.shape
    src = kernel.source
    probs, update = kernel.parts["feedback_probs"], kernel.parts["feedback_update"]
    CO = src.tunables["CO"]
    if out is None:
        out = torch.empty(B, T, Dv, dtype=f.dtype, device=f.device)
    out_args = ()
    s = out
    if f.dtype != torch.float32:
        s = torch.empty(B, T, Dv, dtype=torch.float32, device=f.device)
        out_args = (out, *_row_strides(out))
    stride_p = -(-T // 16) * 16   # rows of P 64-byte aligned
    p = torch.empty(B, CO, stride_p, dtype=torch.float32, device=f.device)
    ps, us = probs.source, update.source
    pm, pn, um, un = ps.tunables["BLOCK_M"], ps.tunables["BLOCK_N"], us.tunables["BLOCK_M"], us.tunables["BLOCK_N"]
    base = (CO // um) * -(-Dv // un) * B
    max_splits = update_splits(base, (-(-T // CO) - 1) * CO, us.tunables["BLOCK_K"], target_programs)[0]
    part = torch.empty(max(1, max_splits - 1), B, CO, Dv, dtype=torch.float32, device=f.device)
    for r0 in range(0, T, CO):
        ncols = min(r0 + CO, T)
        launch(probs.fn)[(CO // pm, -(-ncols // pn), B)](
            q_b, k_b, gamma, lse, p, T, r0, ncols, stride_p, *_row_strides(q_b), *_row_strides(k_b), *gamma.stride(),
            num_warps=ps.num_warps, num_stages=ps.num_stages)
        splits, per = update_splits(base, r0, us.tunables["BLOCK_K"], target_programs)
        launch(update.fn)[(CO // um, -(-Dv // un), B * splits)](
            f, p, s, part, T, r0, B, per, stride_p, *_row_strides(f), num_warps=us.num_warps, num_stages=us.num_stages)
        launch(kernel.fn)[(-(-Dv // src.tunables["BLOCK_DV"]), B)](
            p, dinv, s, part, *out_args, T, r0, stride_p, splits - 1,
            num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return out
