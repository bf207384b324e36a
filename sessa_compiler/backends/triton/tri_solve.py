"""Triton kernels for the general triangular solve ``tri_solve(A, b) {upper, unitriangular}``:
x with A x = b for explicit weights A [..., T, T] and b [..., T, N] (``reference.tri_solve_ref``).

Blocked forward substitution in two kernels, one launch each:

- ``tri_solve_diag_inverse`` (grid: batch x diagonal blocks, fully parallel): loads one BM x BM
  diagonal block of A (only its own triangle; the diagonal too unless unit), upcast to fp32, and
  inverts it: with D its diagonal and N its strict part, (D + N)^-1 = (I - M)^-1 D^-1 for the
  nilpotent M = -D^-1 N, and (I - M)^-1 = (I + M)(I + M^2)(I + M^4)... (log2(BM) factors, exact),
  as tensor-core products. Rows past the tail are padded with the identity. fp32 workspace
  [batch, blocks, BM, BM].
- ``tri_solve_fwd`` (grid: batch x column blocks of b): the row blocks in order; block i is
  b_i - sum_{solved j} A_ij x_j (tensor-core dots over the already-solved rows, fp32 accumulation),
  then x_i = inverse_i @ that. x is accumulated in fp32 (in the output for fp32, else in an fp32
  workspace besides the output) and re-read by the later blocks.

Upper systems walk the same row blocks (i*BM .. i*BM + BM - 1, the tail block last in memory) from
the bottom, with rows and columns in ascending order inside each tile, so nothing is copied or
flipped and loads stay aligned; their diagonal blocks are upper triangular, which the same product
inverts. Leading dims: b's are grouped
into at most two strided batch axes (A broadcasts with stride 0 when it has fewer, e.g. rank 2).
Work: O(T^2 N) per batch element; T/BM sequential steps per program.
"""
from __future__ import annotations

from ...errors import InputError, UnsupportedError
from ...ir.graph import Node
from .codegen import AOT_POINTER, KernelSource, dot_block, dot_policy


def default_block(interpret: bool) -> int:
    """Rows per diagonal block: 64 on a GPU (warpgroup tiles), 16 under the interpreter so that small
    tests cross blocks."""
    return 16 if interpret else 64


def _constants(**kw) -> str:
    return "".join(f"{k} = tl.constexpr({v!r})\n" for k, v in kw.items()) + "\n\n"


def generate_tri_solve(node: Node, dtypes: dict, interpret: bool, block: int | None = None) -> KernelSource:
    upper, unit = bool(node.attrs["upper"]), bool(node.attrs["unitriangular"])
    dt = dtypes["b"]
    if dtypes["A"] != dt:
        raise UnsupportedError(f"op 'tri_solve': weights and right-hand side need one dtype, got {dtypes['A']} "
                               f"and {dt}")
    BM = block or default_block(interpret)
    if BM < 16 or BM & (BM - 1):
        raise UnsupportedError(f"op 'tri_solve': the block must be a power of two >= 16, got {BM}")
    n = node.inputs[1].type.shape[-1]
    block_n = dot_block(n, 32) if isinstance(n, int) else 32
    solve = dot_policy(dt, interpret)["solve_precision"]
    separate_out = dt != "f32"
    spec = {"upper": upper, "unitriangular": unit, "dtype": dt, "N": n}

    # 1. the diagonal blocks' inverses, all in parallel
    body = _constants(UPPER=upper, UNIT=unit, BM=BM, LOG2_BM=BM.bit_length() - 1)
    body += ("@triton.jit\n"
             "def tri_solve_diag_inverse(A, DINV, T, L1, stride_a0, stride_a1, stride_at):\n"
             "    # inverse of diagonal block i of A (fp32), rows and columns ascending; identity past the tail\n"
             "    pid_b = tl.program_id(0)   # batch on axis 0 (up to 2^31 programs), blocks on axis 1\n"
             "    i = tl.program_id(1)\n"
             "    b0 = (pid_b // L1).to(tl.int64)\n"
             "    b1 = (pid_b % L1).to(tl.int64)\n"
             "    r = tl.arange(0, BM)\n"
             "    rows = i * BM + r\n"
             "    valid = rows < T\n"
             "    eye = r[:, None] == r[None, :]\n"
             "    if UPPER:\n"
             "        strict = r[None, :] > r[:, None]\n"
             "    else:\n"
             "        strict = r[None, :] < r[:, None]\n"
             "    both = valid[:, None] & valid[None, :]\n"
             "    a_rows = A + b0 * stride_a0 + b1 * stride_a1 + rows.to(tl.int64)[:, None] * stride_at\n"
             "    if UNIT:   # the diagonal is 1 and never read\n"
             "        n = tl.load(a_rows + rows[None, :], mask=both & strict, other=0.0).to(tl.float32)\n"
             "        m = -n\n"
             "        d = tl.full([BM], 1.0, tl.float32)\n"
             "    else:\n"
             "        a = tl.load(a_rows + rows[None, :], mask=both & (strict | eye), other=0.0).to(tl.float32)\n"
             "        d = tl.where(valid, tl.sum(tl.where(eye, a, 0.0), axis=1), 1.0)\n"
             "        m = -tl.where(strict, a, 0.0) / d[:, None]\n"
             "    x = tl.where(eye, 1.0, 0.0) + m   # sum_{k<2} M^k\n"
             "    m_pow = m\n"
             "    for _ in tl.static_range(LOG2_BM - 1):   # x <- x (I + M^(2^s)) = sum_{k<2^(s+1)} M^k\n"
             f"        m_pow = tl.dot(m_pow, m_pow, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             f"        x = x + tl.dot(x, m_pow, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "    x = x / d[None, :]   # (I - M)^-1 D^-1\n"
             "    n_blocks = tl.cdiv(T, BM)\n"
             "    tl.store(DINV + ((pid_b.to(tl.int64) * n_blocks + i) * BM + r[:, None]) * BM + r[None, :], x)\n")
    aptr = AOT_POINTER[dt]
    inverse = KernelSource(
        "tri_solve_diag_inverse", "tri_solve", spec, {"BM": BM, "solve_precision": solve}, body,
        {"A": aptr, "DINV": "*fp32", "T": "i32", "L1": "i32", "stride_a0": "i64", "stride_a1": "i64",
         "stride_at": "i32"},
        do_not_specialize=("T", "L1"), num_warps=4, num_stages=2)

    # 2. the row blocks in order, reduced by the solved rows, solved by their inverses
    out_args = ", OUT" if separate_out else ""
    body = _constants(UPPER=upper, BM=BM, BLOCK_N=block_n)
    body += ("@triton.jit\n"
             f"def tri_solve_fwd(A, Bm, DINV, X{out_args}, T, N, L1, stride_a0, stride_a1, stride_at,\n"
             "                  stride_b0, stride_b1, stride_bt):\n"
             "    # x_i = inverse_i (b_i - sum_{solved j} A_ij x_j), block by block; X: fp32 [batch, T, N], contiguous\n"
             "    pid_b = tl.program_id(0)\n"
             "    pid_n = tl.program_id(1)\n"
             "    b0 = (pid_b // L1).to(tl.int64)\n"
             "    b1 = (pid_b % L1).to(tl.int64)\n"
             "    r = tl.arange(0, BM)\n"
             "    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
             "    cmask = cols < N\n"
             "    a_base = A + b0 * stride_a0 + b1 * stride_a1\n"
             "    b_base = Bm + b0 * stride_b0 + b1 * stride_b1\n"
             "    x_base = X + pid_b.to(tl.int64) * T * N\n")
    if separate_out:
        body += "    o_base = OUT + pid_b.to(tl.int64) * T * N\n"
    body += ("    n_blocks = tl.cdiv(T, BM)\n"
             "    for step in range(0, n_blocks):\n"
             "        if UPPER:   # blocks from the bottom (the tail block first)\n"
             "            i = n_blocks - 1 - step\n"
             "        else:\n"
             "            i = step\n"
             "        rows = i * BM + r\n"
             "        valid = rows < T\n"
             "        io_mask = valid[:, None] & cmask[None, :]\n"
             "        acc = tl.load(b_base + rows[:, None] * stride_bt + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)\n"
             "        a_rows = a_base + rows.to(tl.int64)[:, None] * stride_at\n"
             "        if UPPER:   # solved blocks below: full ones, then the tail block (rows up to T)\n"
             "            for j in range(i + 1, n_blocks - 1):\n"
             "                k = j * BM + r\n"
             "                a = tl.load(a_rows + k[None, :], mask=valid[:, None], other=0.0).to(tl.float32)\n"
             "                xs = tl.load(x_base + k[:, None] * N + cols[None, :], mask=cmask[None, :], other=0.0)\n"
             f"                acc -= tl.dot(a, xs, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "            if i < n_blocks - 1:\n"
             "                k = (n_blocks - 1) * BM + r\n"
             "                a = tl.load(a_rows + k[None, :], mask=valid[:, None] & (k[None, :] < T), other=0.0).to(tl.float32)\n"
             "                xs = tl.load(x_base + k[:, None] * N + cols[None, :], mask=(k[:, None] < T) & cmask[None, :], other=0.0)\n"
             f"                acc -= tl.dot(a, xs, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        else:   # solved blocks above: every row and column inside [0, T)\n"
             "            for j in range(0, i):\n"
             "                k = j * BM + r\n"
             "                a = tl.load(a_rows + k[None, :], mask=valid[:, None], other=0.0).to(tl.float32)\n"
             "                xs = tl.load(x_base + k[:, None] * N + cols[None, :], mask=cmask[None, :], other=0.0)\n"
             f"                acc -= tl.dot(a, xs, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        dinv = tl.load(DINV + ((pid_b.to(tl.int64) * n_blocks + i) * BM + r[:, None]) * BM + r[None, :])\n"
             f"        x = tl.dot(dinv, acc, out_dtype=tl.float32, input_precision=\"{solve}\")\n"
             "        tl.store(x_base + rows[:, None] * N + cols[None, :], x, mask=io_mask)\n")
    if separate_out:
        body += "        tl.store(o_base + rows[:, None] * N + cols[None, :], x.to(OUT.dtype.element_ty), mask=io_mask)\n"
    body += "        tl.debug_barrier()   # the next blocks read these rows of x from other threads\n"
    sig = {"A": aptr, "Bm": aptr, "DINV": "*fp32", "X": "*fp32"}
    if separate_out:
        sig["OUT"] = aptr
    sig.update({"T": "i32", "N": "i32", "L1": "i32", "stride_a0": "i64", "stride_a1": "i64", "stride_at": "i32",
                "stride_b0": "i64", "stride_b1": "i64", "stride_bt": "i32"})
    return KernelSource(
        "tri_solve_fwd", "tri_solve", spec,
        {"BM": BM, "BLOCK_N": block_n, "strategy": "blocked substitution by diagonal-block inverses",
         "solve_precision": solve}, body, sig,
        do_not_specialize=("T", "L1"), num_warps=4, num_stages=2, parts=(inverse,))


# -- launcher ---------------------------------------------------------------------------------------
def batch_groups(sizes, *strides) -> list:
    """Leading dims merged into as few strided axes as every tensor allows: [(size, [stride per tensor])],
    outermost first; dims of size 1 dropped."""
    groups: list = []
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        st = [s[i] for s in strides]
        if groups and all(gs == s * size for gs, s in zip(groups[-1][1], st)):
            groups[-1] = (groups[-1][0] * size, st)
        else:
            groups.append((size, st))
    return groups


def check_tri_solve_inputs(A, b) -> None:
    """A [..., T, T] with leading dims equal to b's last ones (or none), b [..., T, N], one dtype."""
    if b.dim() < 2 or A.dim() < 2 or A.dim() > b.dim():
        raise InputError(f"op 'tri_solve': expected weights [..., T, T] (rank 2 .. rank of b) and a right-hand side "
                         f"[..., T, N], got weights {tuple(A.shape)} and right-hand side {tuple(b.shape)}")
    T = b.shape[-2]
    lead = tuple(b.shape[b.dim() - A.dim():-2])
    if tuple(A.shape) != (*lead, T, T):
        raise InputError(f"op 'tri_solve': expected weights of shape {(*lead, T, T)} for a right-hand side "
                         f"{tuple(b.shape)}, got {tuple(A.shape)}")
    if A.dtype != b.dtype:
        raise InputError(f"op 'tri_solve': expected weights in the right-hand side's dtype {b.dtype}, got {A.dtype}")


def launch_tri_solve(kernel, A, b, out=None):
    """x with A x = b (``kernel.source.specialisation`` fixes upper / unit); ``out`` (contiguous, b's shape
    and dtype) may be given. Extra memory: the diagonal-block inverses (batch x T x BM fp32) and, for
    16-bit b, an fp32 copy of x."""
    import torch

    check_tri_solve_inputs(A, b)
    src = kernel.source
    inverse = kernel.parts["tri_solve_diag_inverse"]
    BM, BN = src.tunables["BM"], src.tunables["BLOCK_N"]
    T, N = b.shape[-2], b.shape[-1]
    lead = tuple(b.shape[:-2])
    if out is None:
        out = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    elif out.shape != b.shape or out.dtype != b.dtype or not out.is_contiguous():
        raise InputError(f"op 'tri_solve': expected a contiguous output {tuple(b.shape)} {b.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()})")
    if out.numel() == 0:
        return out
    if A.stride(-1) != 1:
        A = A.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    Ae = A.expand(*lead, T, T)
    groups = batch_groups(lead, Ae.stride()[:-2], b.stride()[:-2])
    if len(groups) > 2:   # A's own leading dims, b's: made contiguous (A is not expanded by this)
        A, b = A.contiguous(), b.contiguous()
        Ae = A.expand(*lead, T, T)
        groups = batch_groups(lead, Ae.stride()[:-2], b.stride()[:-2])
    groups = [(1, [0, 0])] * (2 - len(groups)) + groups
    (L0, (sa0, sb0)), (L1, (sa1, sb1)) = groups
    nb, n_blocks = L0 * L1, -(-T // BM)
    dinv = torch.empty(nb, n_blocks, BM, BM, dtype=torch.float32, device=b.device)
    inverse.fn[(nb, n_blocks)](Ae, dinv, T, L1, sa0, sa1, Ae.stride(-2),
                               num_warps=inverse.source.num_warps, num_stages=inverse.source.num_stages)
    x = out if b.dtype == torch.float32 else torch.empty(b.shape, dtype=torch.float32, device=b.device)
    outs = (x,) if x is out else (x, out)
    kernel.fn[(nb, -(-N // BN))](Ae, b, dinv, *outs, T, N, L1, sa0, sa1, Ae.stride(-2), sb0, sb1, b.stride(-2),
                                 num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return out
