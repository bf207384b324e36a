"""The core ops in standard ONNX: attention (causal, GQA, interleaved RoPE), rope, the blocked feedback
ops and the selective scan (an ONNX Scan over time).

The feedback reaches this module already chunked by the ONNX pass pipeline (passes/pipeline.py: the
same chunk-feedback pass as the Triton backend, which also picks the chunk size): ``feedback_lse`` is a
Loop over chunks of rows against the keys they see, ``feedback_diag_inverse`` inverts every diagonal
block at once (the exact nilpotent product), ``feedback_chunked`` is a Loop that solves one chunk against
the solved prefix per iteration. Attention is a Loop over chunks of query rows. No tensor has two
sequence-length dimensions, so memory is O(T * C), not O(T^2). ``scan_chunked`` means the same as
``scan`` and is lowered the same way (the ONNX Scan steps one position at a time; the chunk size is a
kernel schedule that ONNX does not use).

Core ops compute in float32 for float16/bfloat16 inputs (float64 stays float64), as the references
do (ONNX has no triangular solve, hence the nilpotent product; Loop state may grow by concatenation).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import helper

from ..ir.dtypes import compute_name
from ..ir.graph import Node
from .onnx_builder import NEG_INF, GraphBuilder, value_info
from .onnx_lower import Lowering, lowering, out_dtype, static

# Rows per iteration of the log-sum-exp Loop and of the attention Loop (the feedback solve's chunk is the
# chunk-feedback pass's decision, an attribute of the blocked ops). Memory is O(T * rows). On the 2-core
# CPU, 1 thread, SessaLayer(D=128, H=4), attention chunks of 64..256 were within noise of each other at
# T = 512, 2048 and 8192.
FEEDBACK_LSE_ROWS = 128
ATTENTION_CHUNK = 128


def _scalar(b: GraphBuilder, x: str) -> str:
    """int64 [1] -> 0-d."""
    return b.op("Squeeze", x, b.i64(0))


def _slab_positions(b: GraphBuilder, start: str, end: str, key_end: str) -> tuple:
    """int64 rows [end - start, 1] (query positions start .. end-1) and cols [1, key_end] (0 .. key_end-1);
    start, end, key_end are int64 [1] tensors."""
    one = b.scalar(1, "i64")
    rows = b.op("Range", _scalar(b, start), _scalar(b, end), one, hint="slab_rows")
    cols = b.op("Range", b.scalar(0, "i64"), _scalar(b, key_end), one, hint="slab_cols")
    return b.op("Unsqueeze", rows, b.i64(1)), b.op("Unsqueeze", cols, b.i64(0))


def rope_tables(b: GraphBuilder, inv_freq: str, inv_dtype: str, T, cd: str) -> tuple:
    """cos, sin of shape [1, T, 1, d/2] with angles p * inv_freq computed in ``cd`` (>= float32)."""
    key = ("rope", inv_freq, T, cd)
    if key not in b.root.cache:
        r = b.root
        pos = r.cast(r.op("Range", r.scalar(0, "i64"), r.dim_scalar(T), r.scalar(1, "i64"), hint="rope_pos"), "i64", cd)
        freq = r.cast(inv_freq, inv_dtype, cd)
        angles = r.op("Mul", r.op("Unsqueeze", pos, r.i64(1)), r.op("Unsqueeze", freq, r.i64(0)), hint="rope_angles")
        axes = r.i64(0, 2)
        r.cache[key] = (r.op("Unsqueeze", r.op("Cos", angles), axes, hint="rope_cos"),
                        r.op("Unsqueeze", r.op("Sin", angles), axes, hint="rope_sin"))
    return b.root.cache[key]


def apply_rope(b: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """Interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, d] rotated by the tables."""
    pairs = b.op("Reshape", x, b.i64(0, 0, 0, -1, 2), hint="rope_pairs")
    xe = b.op("Gather", pairs, b.scalar(0, "i64"), axis=4, hint="rope_even")
    xo = b.op("Gather", pairs, b.scalar(1, "i64"), axis=4, hint="rope_odd")
    ye = b.op("Sub", b.op("Mul", xe, cos), b.op("Mul", xo, sin))
    yo = b.op("Add", b.op("Mul", xe, sin), b.op("Mul", xo, cos))
    last = b.i64(-1)
    y = b.op("Concat", b.op("Unsqueeze", ye, last), b.op("Unsqueeze", yo, last), axis=-1)
    return b.op("Reshape", y, b.i64(0, 0, 0, -1), hint="rope")


@lowering("rope")
def _rope(L: Lowering, node: Node):
    dt = out_dtype(node)
    cd = compute_name(dt)
    b = L.b
    T = node.inputs[0].type.shape[1]
    cos, sin = rope_tables(b, L.get(node, 1), L.operand_dtype(node, 1), T, cd)
    return [b.cast(apply_rope(b, L.get(node, 0, cd), cos, sin), cd, dt)]


@lowering("attention")
def _attention(L: Lowering, node: Node, chunk: int | None = None):
    """softmax(q k^T * scale + causal bias) v as an ONNX Loop over chunks of C query rows.

    Queries are zero-padded to a multiple of C (an O(T) copy); iteration c scores queries
    [cC, cC + C) against keys [0, end) with end = min(cC + C, T) (all T keys when not causal) and
    emits a [.., C, dv] scan output; the stacked [n, .., C, dv] output is reshaped and clipped to T.
    Padded query rows see every key below end, so their softmax is finite; they are dropped.
    With a key-padding mask (key_padding=True, operand 4 [B, T], nonzero = keep, a graph input) padded keys get
    -inf too, and a row with no visible key takes the mean of v over all T keys (empty_rows="mean") or NaN.
    """
    C = chunk or ATTENTION_CHUNK
    dt = out_dtype(node)
    cd = compute_name(dt)
    b = L.b
    q_t, k_t, v_t = (node.inputs[i].type for i in range(3))
    T = q_t.shape[1]
    H = static(node, q_t.shape[2], "query heads")
    Hkv = static(node, k_t.shape[2], "key/value heads")
    d = static(node, q_t.shape[3], "head width")
    dv = static(node, v_t.shape[3], "value width")
    G = H // Hkv
    causal = bool(node.attrs["causal"])
    q, k, v = L.get(node, 0), L.get(node, 1), L.get(node, 2)
    in_dt = q_t.dtype.name
    if node.attrs.get("rope", False):
        cos, sin = rope_tables(b, L.get(node, 3), L.operand_dtype(node, 3), T, cd)
        # the reference rotates in >= float32 and rounds back to the input dtype before attention
        q = b.cast(apply_rope(b, b.cast(q, in_dt, cd), cos, sin), cd, in_dt)
        k = b.cast(apply_rope(b, b.cast(k, in_dt, cd), cos, sin), cd, in_dt)
    q, k, v = b.cast(q, in_dt, cd), b.cast(k, k_t.dtype.name, cd), b.cast(v, v_t.dtype.name, cd)
    q = b.op("Mul", q, b.scalar(float(node.attrs["scale"]), cd), hint="q_scaled")
    q = b.op("Transpose", q, perm=[0, 2, 1, 3])            # [B, H, T, d]
    kT = b.op("Transpose", k, perm=[0, 2, 3, 1])           # [B, Hkv, d, T]
    v = b.op("Transpose", v, perm=[0, 2, 1, 3])            # [B, Hkv, T, dv]
    if G > 1:  # query head h reads kv head h // G: split H into (Hkv, G) and broadcast k, v over G
        q = b.op("Reshape", q, b.i64(0, Hkv, G, -1, d))     # [B, Hkv, G, T, d]
        kT = b.op("Unsqueeze", kT, b.i64(2))
        v = b.op("Unsqueeze", v, b.i64(2))
    t_axis = 3 if G > 1 else 2                             # the query/key row axis of q and v
    keep = fill = None
    if node.attrs.get("key_padding", False):
        m = L.get(node, 4)
        mdt = L.operand_dtype(node, 4)
        keep = m if mdt == "bool" else b.op("Not", b.op("Equal", m, b.scalar(0, mdt)), hint="key_keep")   # [B, T]
        keep = b.op("Unsqueeze", keep, b.i64(*range(1, t_axis + 1)), hint="key_keep_b")   # [B, 1, (1,) 1, T]
        if node.attrs.get("empty_rows", "mean") == "mean":
            fill = b.op("ReduceMean", v, b.i64(t_axis), keepdims=1, hint="v_mean")       # [B, .., 1, dv]
        else:
            fill = b.scalar(math.nan, cd)

    Tdim = b.dim(T)
    n = _n_chunks(b, Tdim, C, "attn_chunks")
    padded = b.op("Mul", n, b.i64(C), hint="attn_padded_len")
    q = b.op("Pad", q, b.op("Concat", b.i64(0), b.op("Sub", padded, Tdim), axis=0), None, b.i64(t_axis),
             hint="q_padded")                              # rows T .. nC-1 are zeros

    body = b.sub()
    it, cond_in = body.names.fresh("attn_iter"), body.names.fresh("attn_cond_in")
    start = body.op("Mul", body.op("Unsqueeze", it, body.i64(0)), body.i64(C), hint="attn_start")
    stop = body.op("Add", start, body.i64(C), hint="attn_stop")
    q_c = body.op("Slice", q, start, stop, body.i64(t_axis), hint="q_chunk")              # [.., C, d]
    if causal:
        end = body.op("Min", stop, Tdim, hint="attn_end")
        k_c = body.op("Slice", kT, body.i64(0), end, body.i64(-1), hint="k_visible")      # [.., d, end]
        v_c = body.op("Slice", v, body.i64(0), end, body.i64(t_axis), hint="v_visible")   # [.., end, dv]
        rows, cols = _slab_positions(body, start, stop, end)
        allowed = body.op("LessOrEqual", cols, rows)                                       # [C, end]
        if keep is not None:
            allowed = body.op("And", allowed, body.op("Slice", keep, body.i64(0), end, body.i64(-1)),
                              hint="attn_allowed")                                         # [B, 1, C, end]
        bias = body.op("Where", allowed, body.scalar(0.0, cd), body.scalar(NEG_INF, cd),
                       hint="attn_bias")                                                   # [C, end]
        logits = body.op("Add", body.op("MatMul", q_c, k_c), bias, hint="attn_masked")
    else:
        v_c = v
        logits = body.op("MatMul", q_c, kT, hint="attn_logits")
        allowed = keep
        if keep is not None:
            logits = body.op("Add", logits, body.op("Where", keep, body.scalar(0.0, cd), body.scalar(NEG_INF, cd)),
                             hint="attn_masked")
    probs = body.op("Softmax", logits, axis=-1, hint="attn_probs")
    out_c = body.op("MatMul", probs, v_c, hint="attn_out_chunk")
    if keep is not None:   # rows with no visible key: the mean of v over all keys, or NaN
        has = body.op("ReduceMax", body.cast(allowed, "bool", "i32"), body.i64(-1), keepdims=1,
                      hint="attn_has_key")
        out_c = body.op("Where", body.op("Greater", has, body.scalar(0, "i32")), out_c, fill, hint="attn_out_kept")
    cond_out = body.op("Identity", cond_in, hint="attn_cond_out")
    heads = [Hkv, G] if G > 1 else [H]
    g = body.graph("attention_chunks", [value_info(it, "i64", []), value_info(cond_in, "bool", [])],
                   [value_info(cond_out, "bool", []), value_info(out_c, cd, [None, *heads, C, dv])])
    chunks = b.op("Loop", _scalar(b, n), b.scalar(True, "bool"), body=g, hint="attention_chunks")  # [n, B, .., C, dv]
    perm = [1, 0, 4, 2, 3, 5] if G > 1 else [1, 0, 3, 2, 4]                                     # [B, n, C, .., dv]
    out = b.op("Reshape", b.op("Transpose", chunks, perm=perm), b.i64(0, -1, H, dv))            # [B, nC, H, dv]
    out = b.op("Slice", out, b.i64(0), Tdim, b.i64(1), hint="attention")
    return [b.cast(out, cd, dt)]


def _n_chunks(b: GraphBuilder, Tdim: str, C: int, hint: str) -> str:
    """ceil(T / C) as an int64 [1] tensor (Tdim: T as int64 [1])."""
    return b.op("Div", b.op("Add", Tdim, b.i64(C - 1)), b.i64(C), hint=hint)


def _chunk_bounds(b: GraphBuilder, c: str, C: int, Tdim: str) -> tuple:
    """start, end, m = end - start (int64 [1]) of chunk ``c`` (an int64 scalar) of C rows out of Tdim."""
    start = b.op("Mul", b.op("Unsqueeze", c, b.i64(0)), b.i64(C), hint="chunk_start")
    end = b.op("Min", b.op("Add", start, b.i64(C)), Tdim, hint="chunk_end")
    return start, end, b.op("Sub", end, start, hint="chunk_len")


def _loop_chunks(b: GraphBuilder, first: str, n_chunks: str, step, width, cd: str, name: str) -> str:
    """Row chunks 1 .. n-1 in an ONNX Loop, each appended to the result of chunk 0 (``first``, computed
    outside: no MatMul over an empty prefix). ``step(body, c, prefix)`` returns chunk c's rows; ``width``
    is the rows' trailing dim (None for a [B, T] result)."""
    body = b.sub()
    it, cond_in, prefix = body.names.fresh("chunk_iter"), body.names.fresh("cond_in"), body.names.fresh("prefix")
    c = body.op("Add", it, body.scalar(1, "i64"), hint="chunk")
    rows = step(body, c, prefix)
    cond_out = body.op("Identity", cond_in, hint="cond_out")
    out = body.op("Concat", prefix, rows, axis=1, hint="prefix_out")
    shape = [None, None] if width is None else [None, None, width]
    g = body.graph(name, [value_info(it, "i64", []), value_info(cond_in, "bool", []), value_info(prefix, cd, shape)],
                   [value_info(cond_out, "bool", []), value_info(out, cd, shape)])
    trips = b.op("Squeeze", b.op("Sub", n_chunks, b.i64(1)), b.i64(0), hint="loop_trips")
    return b.op("Loop", trips, b.scalar(True, "bool"), first, body=g, hint=name)


def _feedback_operands(L: Lowering, node: Node, cd: str) -> tuple:
    """q_b * scale, k_b^T [B, c, T] and the sequence length of a blocked feedback op."""
    b = L.b
    i = 1 if node.op == "feedback_chunked" else 0
    qb = b.op("Mul", L.get(node, i, cd), b.scalar(float(node.attrs["scale"]), cd), hint="qb_scaled")
    kbT = b.op("Transpose", L.get(node, i + 1, cd), perm=[0, 2, 1], hint="kb_t")
    return qb, kbT, b.dim(node.inputs[i].type.shape[1])


@lowering("feedback_lse")
def _feedback_lse(L: Lowering, node: Node):
    """lse[t] = log sum_{j<t} exp(q_b[t].k_b[j] * scale), lse[0] = 0 (semantics/chunked.py), by chunks of
    FEEDBACK_LSE_ROWS rows against the keys they can see: [B, rows, end] logits, never T x T."""
    cd = out_dtype(node)
    b = L.b
    qb, kbT, Tdim = _feedback_operands(L, node, cd)
    C = FEEDBACK_LSE_ROWS

    def rows(g: GraphBuilder, start: str, end: str) -> str:
        q = g.op("Slice", qb, start, end, g.i64(1), hint="lse_q_rows")                # [B, m, c]
        k = g.op("Slice", kbT, g.i64(0), end, g.i64(2), hint="lse_k_visible")         # [B, c, end]
        logits = g.op("MatMul", q, k, hint="lse_logits")
        r, cols = _slab_positions(g, start, end, end)
        keep = g.op("Less", cols, g.op("Max", r, g.scalar(1, "i64")), hint="lse_keep")  # strict, and (0, 0)
        logits = g.op("Where", keep, logits, g.scalar(NEG_INF, cd), hint="lse_masked")
        mx = g.op("ReduceMax", logits, g.i64(-1), keepdims=1, hint="lse_max")
        lse = g.op("Add", g.op("Log", g.op("ReduceSum", g.op("Exp", g.op("Sub", logits, mx)), g.i64(-1), keepdims=1)),
                   mx, hint="lse_rows")
        first_row = g.op("Equal", r, g.scalar(0, "i64"), hint="lse_row0")
        lse = g.op("Where", first_row, g.scalar(0.0, cd), lse, hint="lse_rows0")      # row 0 sees no key
        return g.op("Squeeze", lse, g.i64(2), hint="lse_chunk")                        # [B, m]

    n = _n_chunks(b, Tdim, C, "lse_chunks")
    first = rows(b, b.i64(0), b.op("Min", Tdim, b.i64(C), hint="first_chunk_len"))

    def step(g, c, prefix):
        start, end, _ = _chunk_bounds(g, c, C, Tdim)
        return rows(g, start, end)
    return [_loop_chunks(b, first, n, step, None, cd, "feedback_lse")]


def _unit_lower_inverse(b: GraphBuilder, N: str, m: str, C: int, cd: str) -> str:
    """(I - N)^-1 for N [.., m, m] strictly lower triangular, m <= C, by the exact nilpotent product
    (I+N)(I+N^2)(I+N^4)...: N^C = 0, so ceil(log2 C) factors are exact (exact in exact arithmetic; the
    reference uses a triangular solve, so the two check each other)."""
    eye = b.op("Slice", b.const(np.eye(C), cd, hint="eye_chunk"), b.i64(0, 0), b.op("Concat", m, m, axis=0),
               b.i64(0, 1), hint="eye_m")
    inv = b.op("Add", eye, N, hint="block_inv")
    power, covered = N, 2
    while covered < C:
        power = b.op("MatMul", power, power, hint="block_pow")
        inv = b.op("Add", inv, b.op("MatMul", inv, power), hint="block_inv")
        covered *= 2
    return inv


@lowering("feedback_diag_inverse")
def _feedback_diag_inverse(L: Lowering, node: Node):
    """dinv[:, c] = (I - N_c)^-1 with N_c[t, j] = gamma[t] exp(q_b[t].k_b[j] * scale - lse[t]) for j < t
    inside chunk c, all chunks at once: rows padded with zeros to n * C (gamma = 0 there: identity rows),
    reshaped to [B, n, C, .], the inverse by the exact nilpotent product."""
    cd = out_dtype(node)
    b = L.b
    C = int(node.attrs["chunk_size"])
    qb, kbT, Tdim = _feedback_operands(L, node, cd)
    kb = b.op("Transpose", kbT, perm=[0, 2, 1], hint="kb_scaled_rows")
    gamma, lse = L.get(node, 2, cd), L.get(node, 3, cd)
    n = _n_chunks(b, Tdim, C, "dinv_chunks")
    pad = b.op("Sub", b.op("Mul", n, b.i64(C)), Tdim, hint="dinv_pad")
    zero = b.i64(0)

    def blocks(x: str, rank: int, tail: list) -> str:   # [B, T, *tail] -> [B, n, C, *tail], zero rows appended
        pads = b.op("Concat", *([zero] * (rank + 1) + [pad] + [zero] * (rank - 2)), axis=0, hint="dinv_pads")
        return b.op("Reshape", b.op("Pad", x, pads, hint="dinv_padded"), b.i64(0, -1, C, *tail), hint="dinv_blocks")
    width = static(node, node.inputs[0].type.shape[2], "feedback key width")
    q4, k4 = blocks(qb, 3, [width]), blocks(kb, 3, [width])
    g4, l4 = blocks(gamma, 2, []), blocks(lse, 2, [])
    logits = b.op("MatMul", q4, b.op("Transpose", k4, perm=[0, 1, 3, 2]), hint="dinv_logits")   # [B, n, C, C]
    p = b.op("Mul", b.op("Exp", b.op("Sub", logits, b.op("Unsqueeze", l4, b.i64(3)))),
             b.op("Unsqueeze", g4, b.i64(3)), hint="dinv_probs")
    strict = b.const(np.tril(np.ones((C, C), dtype=bool), -1), "bool", hint="strict_lower")
    N = b.op("Where", strict, p, b.scalar(0.0, cd), hint="dinv_N")
    return [_unit_lower_inverse(b, N, b.i64(C), C, cd)]


@lowering("feedback_chunked")
def _feedback_chunked(L: Lowering, node: Node):
    """s[chunk c] = dinv[:, c] (f[c] + P_c s[:start]) with P_c[t, j] = gamma[t] exp(q_b[t].k_b[j] * scale -
    lse[t]) over the solved prefix j < start, chunk after chunk (semantics/chunked.py). Chunk 0 is solved
    outside the ONNX Loop; each iteration computes its [B, m, start] block where it is used, solves and
    appends, so no tensor has two sequence-length dims: memory O(T * C)."""
    dt = out_dtype(node)
    cd = node.inputs[4].type.dtype.name   # the accumulation dtype of lse (f32, or f64)
    b = L.b
    C = int(node.attrs["chunk_size"])
    f = L.get(node, 0, cd)
    qb, kbT, Tdim = _feedback_operands(L, node, cd)
    gamma, lse, dinv = L.get(node, 3, cd), L.get(node, 4, cd), L.get(node, 5, cd)
    n = _n_chunks(b, Tdim, C, "n_chunks")

    def diag(g: GraphBuilder, c: str, m: str) -> str:   # dinv[:, c, :m, :m]
        block = g.op("Gather", dinv, c, axis=1, hint="dinv_c")
        return g.op("Slice", block, g.i64(0, 0), g.op("Concat", m, m, axis=0), g.i64(1, 2), hint="dinv_cm")

    m0 = b.op("Min", Tdim, b.i64(C), hint="first_chunk_len")
    first = b.op("MatMul", diag(b, b.scalar(0, "i64"), m0), b.op("Slice", f, b.i64(0), m0, b.i64(1)), hint="s_chunk0")

    def step(g, c, prefix):
        start, end, m = _chunk_bounds(g, c, C, Tdim)
        q = g.op("Slice", qb, start, end, g.i64(1), hint="fb_q_rows")
        k = g.op("Slice", kbT, g.i64(0), start, g.i64(2), hint="fb_k_solved")
        rows = lambda x: g.op("Unsqueeze", g.op("Slice", x, start, end, g.i64(1)), g.i64(2))  # noqa: E731
        p = g.op("Mul", g.op("Exp", g.op("Sub", g.op("MatMul", q, k, hint="fb_logits"), rows(lse))), rows(gamma),
                 hint="fb_probs")                                                       # [B, m, start]
        rhs = g.op("Add", g.op("Slice", f, start, end, g.i64(1)), g.op("MatMul", p, prefix), hint="rhs")
        return g.op("MatMul", diag(g, c, m), rhs, hint="s_chunk")
    width = node.inputs[0].type.shape[2]
    s = _loop_chunks(b, first, n, step, width, cd, "feedback_chunks")
    return [b.cast(s, cd, dt)]


def _reverse(b: GraphBuilder, x: str, *axes: int) -> str:
    """x read backwards along the given (negative) axes."""
    n = len(axes)
    return b.op("Slice", x, b.i64(*[-1] * n), b.i64(*[-(2 ** 63)] * n), b.i64(*axes), b.i64(*[-1] * n),
                hint="reversed")


@lowering("tri_solve")
def _tri_solve(L: Lowering, node: Node):
    """x with A x = b for triangular A [..., T, T] (explicit weights) and b [..., T, N], as an ONNX Loop
    over rows: row t reduces b[t] by A[t, :t] @ x[:t] (the solved prefix, carried by the Loop) and divides
    by A[t, t] unless the diagonal is unit. An upper system is the lower one read backwards. Row 0 is
    peeled (no MatMul with an empty prefix). Memory is the weights' O(T^2) plus O(T * N)."""
    dt = out_dtype(node)
    cd = compute_name(dt)
    b = L.b
    A, rhs = L.get(node, 0, cd), L.get(node, 1, cd)
    upper, unit = node.attrs["upper"], node.attrs["unitriangular"]
    if upper:
        A, rhs = _reverse(b, A, -2, -1), _reverse(b, rhs, -2)
    bt = node.inputs[1].type
    T = bt.shape[-2]
    x0 = b.op("Slice", rhs, b.i64(0), b.i64(1), b.i64(-2), hint="x_row0")
    if not unit:
        x0 = b.op("Div", x0, b.op("Slice", A, b.i64(0, 0), b.i64(1, 1), b.i64(-2, -1), hint="diag0"))

    body = b.sub()
    it, cond_in, prefix = body.names.fresh("row_iter"), body.names.fresh("cond_in"), body.names.fresh("x_prefix")
    t = body.op("Unsqueeze", body.op("Add", it, body.scalar(1, "i64")), body.i64(0), hint="row")      # [1]
    t1 = body.op("Add", t, body.i64(1))
    row = body.op("Slice", A, t, t1, body.i64(-2), hint="A_row")                                       # [..., 1, T]
    past = body.op("Slice", row, body.i64(0), t, body.i64(-1), hint="A_past")                          # [..., 1, t]
    acc = body.op("Sub", body.op("Slice", rhs, t, t1, body.i64(-2)), body.op("MatMul", past, prefix), hint="x_acc")
    if not unit:
        acc = body.op("Div", acc, body.op("Slice", row, t, t1, body.i64(-1), hint="diag"), hint="x_row")
    cond_out = body.op("Identity", cond_in, hint="cond_out")
    x_out = body.op("Concat", prefix, acc, axis=-2, hint="x_prefix_out")
    shape = [None] * bt.rank
    shape[-1] = bt.shape[-1]
    g = body.graph("tri_solve_rows", [value_info(it, "i64", []), value_info(cond_in, "bool", []),
                                      value_info(prefix, cd, shape)],
                   [value_info(cond_out, "bool", []), value_info(x_out, cd, shape)])
    trips = b.op("Squeeze", b.op("Sub", b.dim(T), b.i64(1)), b.i64(0), hint="loop_trips")
    x = b.op("Loop", trips, b.scalar(True, "bool"), x0, body=g, hint="tri_solve")
    if upper:
        x = _reverse(b, x, -2)
    return [b.cast(x, cd, dt)]


@lowering("scan", "scan_chunked")
def _scan(L: Lowering, node: Node):
    """h_t = exp(delta_t A) h_{t-1} + (delta_t u_t) (x) B_t; y_t = h_t C_t + D u_t, as an ONNX Scan over T.

    The decay and input terms of every step are computed up front (batched); the Scan body is two
    elementwise ops and one small MatMul per step.
    """
    dt = out_dtype(node)
    cd = compute_name(dt)
    b = L.b
    u, delta, A, Bm, Cm, D = (L.get(node, i, cd) for i in range(6))
    Din = static(node, node.inputs[2].type.shape[0], "state rows (Din)")
    N = static(node, node.inputs[2].type.shape[1], "state width (N)")
    Bdim = node.inputs[0].type.shape[0]
    decay = b.op("Exp", b.op("Mul", b.op("Unsqueeze", delta, b.i64(3)), A), hint="scan_decay")       # [B,T,Din,N]
    drive = b.op("Mul", b.op("Unsqueeze", b.op("Mul", delta, u), b.i64(3)), b.op("Unsqueeze", Bm, b.i64(2)),
                 hint="scan_drive")                                                                    # [B,T,Din,N]
    zero = helper.make_tensor("zero", helper.np_dtype_to_tensor_dtype(np.dtype(np.float64 if cd == "f64" else np.float32)),
                              [1], [0.0])
    h0 = b.op("ConstantOfShape", b.shape_tensor([Bdim, Din, N]), value=zero, hint="scan_h0")

    body = b.sub()
    h, a, x, c = (body.names.fresh(n) for n in ("h_prev", "decay_t", "drive_t", "C_t"))
    h_new = body.op("Add", body.op("Mul", a, h), x, hint="h_t")
    y_t = body.op("Squeeze", body.op("MatMul", h_new, body.op("Unsqueeze", c, body.i64(2))), body.i64(2), hint="y_t")
    h_out = body.op("Identity", h_new, hint="h_out")
    g = body.graph("selective_scan_step",
                   [value_info(h, cd, [None, Din, N]), value_info(a, cd, [None, Din, N]),
                    value_info(x, cd, [None, Din, N]), value_info(c, cd, [None, N])],
                   [value_info(h_out, cd, [None, Din, N]), value_info(y_t, cd, [None, Din])])
    _, ys = b.op("Scan", h0, decay, drive, Cm, body=g, num_scan_inputs=3, scan_input_axes=[1, 1, 1],
                 scan_output_axes=[1], outputs=2, hint="scan")
    y = b.op("Add", ys, b.op("Mul", D, u), hint="selective_scan")
    return [b.cast(y, cd, dt)]
