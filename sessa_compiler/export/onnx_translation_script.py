"""onnxscript translation of sessa_compiler::feedback (see onnx_translation.py); imported only on demand.

onnxscript reads type annotations from this module's globals, so the imports stay at module level
(and no ``from __future__ import annotations``).
"""
import onnxscript
from onnxscript import FLOAT
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat


# The chunk size (32) is spelled out: onnxscript scripts take literals, not Python globals.
@onnxscript.script(default_opset=op)
def sessa_feedback(f: TFloat, q_b: TFloat, k_b: TFloat, gamma: TFloat, scale: float) -> TFloat:
    x = op.Cast(f, to=FLOAT.dtype)
    qb = op.Cast(q_b, to=FLOAT.dtype)
    kb = op.Cast(k_b, to=FLOAT.dtype)
    g = op.Cast(gamma, to=FLOAT.dtype)
    T = op.Shape(x, start=1, end=2)
    pos = op.Range(0, op.Squeeze(T, [0]), 1)
    rows = op.Unsqueeze(pos, [1])
    cols = op.Unsqueeze(pos, [0])
    strict = op.Less(cols, rows)
    keep = op.Or(strict, op.Equal(op.Add(rows, cols), 0))  # row 0 keeps (0, 0): finite softmax, then zeroed
    logits = op.MatMul(op.Mul(qb, op.CastLike(scale, qb)), op.Transpose(kb, perm=[0, 2, 1]))
    alpha = op.Softmax(op.Where(keep, logits, op.Constant(value_float=float("-inf"))), axis=-1)
    W = op.Where(strict, op.Mul(alpha, op.Unsqueeze(g, [2])), op.Constant(value_float=0.0))
    n = op.Div(op.Add(T, 31), 32)
    base = op.Mul(op.Unsqueeze(op.Range(0, op.Squeeze(n, [0]), 1), [1, 2]), 32)
    ar = op.Range(0, 32, 1)
    brow = op.Add(base, op.Unsqueeze(ar, [1]))
    bcol = op.Add(base, op.Unsqueeze(ar, [0]))
    valid = op.And(op.Less(brow, T), op.Less(bcol, brow))
    flat = op.Where(valid, op.Add(op.Mul(brow, T), bcol), 0)
    N = op.Where(valid, op.Gather(op.Reshape(W, [0, -1]), flat, axis=1), op.Constant(value_float=0.0))
    inv = op.Add(op.EyeLike(op.ConstantOfShape([32, 32])), N)   # (I - N)^-1 = (I+N)(I+N^2)(I+N^4)...
    P2 = op.MatMul(N, N)
    inv = op.Add(inv, op.MatMul(inv, P2))
    P4 = op.MatMul(P2, P2)
    inv = op.Add(inv, op.MatMul(inv, P4))
    P8 = op.MatMul(P4, P4)
    inv = op.Add(inv, op.MatMul(inv, P8))
    P16 = op.MatMul(P8, P8)
    inv = op.Add(inv, op.MatMul(inv, P16))
    m0 = op.Min(T, [32])
    inv0 = op.Slice(op.Gather(inv, 0, axis=1), [0, 0], op.Concat(m0, m0, axis=0), [1, 2])
    s = op.MatMul(inv0, op.Slice(x, [0], m0, [1]))
    for it in range(op.Squeeze(op.Sub(n, 1), [0])):
        c = op.Add(it, 1)
        start = op.Mul(op.Unsqueeze(c, [0]), 32)
        end = op.Min(op.Add(start, 32), T)
        m = op.Sub(end, start)
        W_rows = op.Slice(W, op.Concat(start, [0], axis=0), op.Concat(end, start, axis=0), [1, 2])
        rhs = op.Add(op.Slice(x, start, end, [1]), op.MatMul(W_rows, s))
        inv_c = op.Slice(op.Gather(inv, c, axis=1), [0, 0], op.Concat(m, m, axis=0), [1, 2])
        s = op.Concat(s, op.MatMul(inv_c, rhs), axis=1)
    return op.CastLike(s, f)

