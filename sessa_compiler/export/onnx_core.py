"""The core ops in standard ONNX: attention (causal, GQA, interleaved RoPE), rope, the feedback solve
(chunked: an ONNX Loop over chunks with batched diagonal-block inverses) and the selective scan
(an ONNX Scan over time).

Core ops compute in float32 for float16/bfloat16 inputs (float64 stays float64), as the references
in backends/reference.py do. See shared/notes/onnx.md for why the feedback solve looks like this.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..ir.graph import Node
from .onnx_builder import NEG_INF, GraphBuilder, value_info
from .onnx_lower import Lowering, lowering, out_dtype, static

# Rows per chunk of the feedback solve: C x C diagonal blocks are inverted up front (batched), the
# Loop runs ceil(T / C) - 1 times. 32 matched torch's solve on CPU (shared/notes/onnx.md).
FEEDBACK_CHUNK = 32


def compute_dtype(dt: str) -> str:
    return "f64" if dt == "f64" else "f32"


def _positions(b: GraphBuilder, T) -> tuple:
    """Cached int64 [T, 1] row and [1, T] column position indices."""
    key = ("positions", T)
    if key not in b.root.cache:
        r = b.root
        ar = r.op("Range", r.scalar(0, "i64"), r.dim_scalar(T), r.scalar(1, "i64"), hint="pos")
        b.root.cache[key] = (r.op("Unsqueeze", ar, r.i64(1), hint="pos_row"), r.op("Unsqueeze", ar, r.i64(0), hint="pos_col"))
    return b.root.cache[key]


def causal_keep(b: GraphBuilder, T) -> str:
    """bool [T, T]: column j is visible from row t when j <= t (shared by every attention)."""
    key = ("causal_keep", T)
    if key not in b.root.cache:
        rows, cols = _positions(b, T)
        b.root.cache[key] = b.root.op("LessOrEqual", cols, rows, hint="causal_keep")
    return b.root.cache[key]


def causal_bias(b: GraphBuilder, T, cd: str) -> str:
    """[T, T] additive mask: 0 where j <= t, -inf above the diagonal (an Add is cheaper than a broadcast Where)."""
    key = ("causal_bias", T, cd)
    if key not in b.root.cache:
        r = b.root
        r.cache[key] = r.op("Where", causal_keep(b, T), r.scalar(0.0, cd), r.scalar(NEG_INF, cd), hint="causal_bias")
    return b.root.cache[key]


def strict_masks(b: GraphBuilder, T) -> tuple:
    """(strict, softmax_keep): j < t, and the same plus (0, 0) so row 0 has a finite softmax (then zeroed)."""
    key = ("strict", T)
    if key not in b.root.cache:
        r = b.root
        rows, cols = _positions(b, T)
        strict = r.op("Less", cols, rows, hint="strict_causal")
        origin = r.op("Equal", r.op("Add", rows, cols), r.scalar(0, "i64"), hint="origin")
        r.cache[key] = (strict, r.op("Or", strict, origin, hint="feedback_keep"))
    return b.root.cache[key]


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
    cd = compute_dtype(dt)
    b = L.b
    T = node.inputs[0].type.shape[1]
    cos, sin = rope_tables(b, L.get(node, 1), L.operand_dtype(node, 1), T, cd)
    return [b.cast(apply_rope(b, L.get(node, 0, cd), cos, sin), cd, dt)]


@lowering("attention")
def _attention(L: Lowering, node: Node):
    dt = out_dtype(node)
    cd = compute_dtype(dt)
    b = L.b
    q_t, k_t, v_t = (node.inputs[i].type for i in range(3))
    T = q_t.shape[1]
    H = static(node, q_t.shape[2], "query heads")
    Hkv = static(node, k_t.shape[2], "key/value heads")
    d = static(node, q_t.shape[3], "head width")
    dv = static(node, v_t.shape[3], "value width")
    G = H // Hkv
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
        q = b.op("Reshape", q, b.i64(0, Hkv, G, -1, d))
        kT = b.op("Unsqueeze", kT, b.i64(2))
        v = b.op("Unsqueeze", v, b.i64(2))
    logits = b.op("MatMul", q, kT, hint="attn_logits")
    if node.attrs["causal"]:
        logits = b.op("Add", logits, causal_bias(b, T, cd), hint="attn_masked")
    probs = b.op("Softmax", logits, axis=-1, hint="attn_probs")
    out = b.op("MatMul", probs, v, hint="attn_out")
    if G > 1:
        out = b.op("Reshape", out, b.i64(0, H, -1, dv))
    out = b.op("Transpose", out, perm=[0, 2, 1, 3], hint="attention")
    return [b.cast(out, cd, dt)]


@lowering("feedback")
def _feedback(L: Lowering, node: Node, chunk: int | None = None):
    """(I - W) s = f with W = diag(gamma) alpha strictly lower triangular, per batch element.

    Diagonal C x C blocks of W are gathered (clamped flat indices, no Pad or copy of the T x T
    matrix) and inverted all at once with the exact nilpotent product (I+N)(I+N^2)(I+N^4)...; the
    first chunk is solved outside the Loop (no MatMul with K = 0); each Loop iteration solves one
    chunk against the solved prefix and appends it.
    """
    C = chunk or FEEDBACK_CHUNK
    dt = out_dtype(node)
    cd = compute_dtype(dt)
    b = L.b
    f_t = node.inputs[0].type
    T = f_t.shape[1]
    f = L.get(node, 0, cd)
    qb, kb, gamma = L.get(node, 1, cd), L.get(node, 2, cd), L.get(node, 3, cd)
    strict, keep = strict_masks(b, T)

    # W [B, T, T] = gamma[t] * strictly-causal softmax(q_b k_b^T * scale), row 0 = 0
    qb = b.op("Mul", qb, b.scalar(float(node.attrs["scale"]), cd), hint="qb_scaled")
    logits = b.op("MatMul", qb, b.op("Transpose", kb, perm=[0, 2, 1]), hint="fb_logits")
    logits = b.op("Where", keep, logits, b.scalar(NEG_INF, cd), hint="fb_masked")
    alpha = b.op("Softmax", logits, axis=-1, hint="fb_alpha")
    W = b.op("Mul", alpha, b.op("Unsqueeze", gamma, b.i64(2)), hint="fb_weights")
    W = b.op("Where", strict, W, b.scalar(0.0, cd), hint="fb_W")

    # diagonal blocks [B, n, C, C] by one Gather on the flattened W
    Tdim = b.dim(T)
    n = b.op("Div", b.op("Add", Tdim, b.i64(C - 1)), b.i64(C), hint="n_chunks")
    n0d = b.op("Squeeze", n, b.i64(0))
    chunk_ids = b.op("Range", b.scalar(0, "i64"), n0d, b.scalar(1, "i64"), hint="chunk_ids")
    base = b.op("Mul", b.op("Unsqueeze", chunk_ids, b.i64(1, 2)), b.i64(C))       # [n, 1, 1]
    rows = b.op("Add", base, b.const(np.arange(C).reshape(C, 1), "i64", hint="block_rows"))  # [n, C, 1]
    cols = b.op("Add", base, b.const(np.arange(C).reshape(1, C), "i64", hint="block_cols"))  # [n, 1, C]
    valid = b.op("And", b.op("Less", rows, Tdim), b.op("Less", cols, rows), hint="block_valid")  # cols < rows < T
    flat = b.op("Add", b.op("Mul", rows, Tdim), cols)
    flat = b.op("Where", valid, flat, b.scalar(0, "i64"), hint="block_index")
    W_flat = b.op("Reshape", W, b.i64(0, -1), hint="fb_W_flat")
    N = b.op("Gather", W_flat, flat, axis=1, hint="fb_blocks")                         # [B, n, C, C]
    N = b.op("Where", valid, N, b.scalar(0.0, cd))
    eye = b.const(np.eye(C), cd, hint="eye_chunk")
    inv = b.op("Add", eye, N, hint="block_inv")                # (I - N)^-1 = (I+N)(I+N^2)(I+N^4)...
    power, covered = N, 2
    while covered < C:
        power = b.op("MatMul", power, power, hint="block_pow")
        inv = b.op("Add", inv, b.op("MatMul", inv, power), hint="block_inv")
        covered *= 2

    # chunk 0, peeled
    m0 = b.op("Min", Tdim, b.i64(C), hint="first_chunk_len")
    zero2, axes12 = b.i64(0, 0), b.i64(1, 2)
    inv0 = b.op("Gather", inv, b.scalar(0, "i64"), axis=1)
    inv0 = b.op("Slice", inv0, zero2, b.op("Concat", m0, m0, axis=0), axes12)
    f0 = b.op("Slice", f, b.i64(0), m0, b.i64(1))
    s0 = b.op("MatMul", inv0, f0, hint="s_chunk0")

    # chunks 1 .. n-1 in a Loop; the solved prefix grows by one chunk per iteration
    body = b.sub()
    it, cond_in, prefix = body.names.fresh("chunk_iter"), body.names.fresh("cond_in"), body.names.fresh("s_prefix")
    c = body.op("Add", it, body.scalar(1, "i64"), hint="chunk")
    start = body.op("Mul", body.op("Unsqueeze", c, body.i64(0)), body.i64(C), hint="chunk_start")
    end = body.op("Min", body.op("Add", start, body.i64(C)), Tdim, hint="chunk_end")
    m = body.op("Sub", end, start, hint="chunk_len")
    W_rows = body.op("Slice", W, body.op("Concat", start, body.i64(0), axis=0),
                     body.op("Concat", end, start, axis=0), axes12, hint="W_rows")          # [B, m, start]
    rhs = body.op("Add", body.op("Slice", f, start, end, body.i64(1)), body.op("MatMul", W_rows, prefix), hint="rhs")
    inv_c = body.op("Gather", inv, c, axis=1)
    inv_c = body.op("Slice", inv_c, zero2, body.op("Concat", m, m, axis=0), axes12, hint="inv_c")
    s_c = body.op("MatMul", inv_c, rhs, hint="s_chunk")
    cond_out = body.op("Identity", cond_in, hint="cond_out")
    s_out = body.op("Concat", prefix, s_c, axis=1, hint="s_prefix_out")
    width = f_t.shape[2]
    g = body.graph("feedback_chunks",
                   [value_info(it, "i64", []), value_info(cond_in, "bool", []),
                    value_info(prefix, cd, [None, None, width])],
                   [value_info(cond_out, "bool", []), value_info(s_out, cd, [None, None, width])])
    trips = b.op("Squeeze", b.op("Sub", n, b.i64(1)), b.i64(0), hint="loop_trips")
    s = b.op("Loop", trips, b.scalar(True, "bool"), s0, body=g, hint="feedback")
    return [b.cast(s, cd, dt)]


@lowering("scan")
def _scan(L: Lowering, node: Node):
    """h_t = exp(delta_t A) h_{t-1} + (delta_t u_t) (x) B_t; y_t = h_t C_t + D u_t, as an ONNX Scan over T.

    The decay and input terms of every step are computed up front (batched); the Scan body is two
    elementwise ops and one small MatMul per step.
    """
    dt = out_dtype(node)
    cd = compute_dtype(dt)
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
