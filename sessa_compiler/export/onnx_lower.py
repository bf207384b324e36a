"""IR -> standard ONNX, op by op: one lowering function per IR op (the core ops live in onnx_core.py).

A lowering reads its operands through the ``Lowering`` context (which casts and turns literal and
symbolic operands into constants or runtime dims) and returns the ONNX names of its outputs.
Every op's semantics is sessa_compiler.semantics' (the interpreter the eager backend runs).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import sympy
import torch

from ..ir.dtypes import comparison_name, from_torch, to_torch
from ..ir.graph import Graph, Node, Value
from ..ir.types import DType
from .onnx_builder import INT64_MAX, NUMPY_DTYPE, GraphBuilder, OnnxExportError, OnnxUnsupportedOpError, tensor_proto
from .onnx_builder import out_dtype

LOWERINGS: dict[str, Callable] = {}

# IR dtypes whose transcendental / normalising ops are computed in float32, as torch does on CPU.
LOW_PRECISION = ("f16", "bf16")


def lowering(*names):
    def deco(fn):
        for n in names:
            LOWERINGS[n] = fn
        return fn
    return deco


def promote(*dtypes: str) -> str:
    out = to_torch(DType(dtypes[0]))
    for d in dtypes[1:]:
        out = torch.promote_types(out, to_torch(DType(d)))
    return from_torch(out).name


def is_static(d) -> bool:
    return isinstance(d, int) or (isinstance(d, sympy.Basic) and d.is_Integer)


class Lowering:
    """State of one export: the builder and the ONNX name (and IR dtype) of every IR value."""

    def __init__(self, graph: Graph, builder: GraphBuilder):
        self.graph = graph
        self.b = builder
        self.names: dict = {}   # Value -> onnx name

    def name(self, v: Value) -> str:
        return self.names[v]

    def get(self, node: Node, i: int, dtype: str | None = None) -> str | None:
        """Operand i as an ONNX name, cast to ``dtype`` when given; literals become constants of ``dtype``."""
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        x = node.inputs[i]
        b = self.b
        if isinstance(x, Value):
            return b.cast(self.names[x], x.type.dtype.name, dtype or x.type.dtype.name)
        dtype = dtype or self.literal_dtype(x)
        if isinstance(x, sympy.Basic) and not x.is_Number:
            return b.size_value(x, dtype)
        if isinstance(x, sympy.Basic):
            x = int(x) if x.is_Integer else float(x)
        if dtype == "bool":
            x = bool(x)
        return b.scalar(x, dtype)

    @staticmethod
    def literal_dtype(x) -> str:
        if isinstance(x, bool):
            return "bool"
        if isinstance(x, float) or (isinstance(x, sympy.Basic) and x.has(sympy.Float)):
            return "f32"
        return "i64"

    def operand_dtype(self, node: Node, i: int) -> str:
        x = node.inputs[i]
        return x.type.dtype.name if isinstance(x, Value) else self.literal_dtype(x)


def rank(v: Value) -> int:
    return v.type.rank


def static(node: Node, d, what: str) -> int:
    if not is_static(d):
        raise OnnxExportError(f"op '{node.op}' (%{node.outputs[0].name}): {what} must be a static size, got {d}")
    return int(d)


# -- compute ---------------------------------------------------------------------------------------------
@lowering("linear")
def _linear(L: Lowering, node: Node):
    dt = out_dtype(node)
    b = L.b
    x, w = L.get(node, 0, dt), L.get(node, 1, dt)
    if node.inputs[1].kind == "param":  # one transpose per parameter; onnxruntime folds it at session start
        key = ("weight_t", w)
        if key not in b.root.cache:
            b.root.cache[key] = b.root.op("Transpose", w, perm=[1, 0], hint="weight_t")
        wt = b.root.cache[key]
    else:
        wt = b.op("Transpose", w, perm=[1, 0], hint="weight_t")
    y = b.op("MatMul", x, wt, hint="linear")
    bias = L.get(node, 2, dt)
    return [b.op("Add", y, bias, hint="linear") if bias else y]


@lowering("matmul")
def _matmul(L, node):
    dt = out_dtype(node)
    return [L.b.op("MatMul", L.get(node, 0, dt), L.get(node, 1, dt))]


@lowering("einsum")
def _einsum(L, node):
    dt = out_dtype(node)
    ins = [L.get(node, i, dt) for i in range(len(node.inputs))]
    return [L.b.op("Einsum", *ins, equation=node.attrs["equation"].replace(" ", ""))]


def _upcast(dt: str) -> str:
    return "f32" if dt in LOW_PRECISION else dt


@lowering("layer_norm")
def _layer_norm(L, node):
    dt = out_dtype(node)
    cd = _upcast(dt)
    b = L.b
    shape = list(node.attrs["normalized_shape"])
    x = L.get(node, 0, cd)
    w = L.get(node, 1, cd)
    if w is None:  # LayerNormalization needs a scale
        w = b.const(np.ones([static(node, d, "normalized_shape") for d in shape]), cd, hint="ln_scale")
    bias = L.get(node, 2, cd)
    y = b.op("LayerNormalization", x, w, bias, axis=-len(shape), epsilon=float(node.attrs["eps"]), hint="layer_norm")
    return [b.cast(y, cd, dt)]


@lowering("softmax", "log_softmax")
def _softmax(L, node):
    dt = out_dtype(node)
    cd = _upcast(dt)
    y = L.b.op("Softmax" if node.op == "softmax" else "LogSoftmax", L.get(node, 0, cd), axis=node.attrs["dim"])
    return [L.b.cast(y, cd, dt)]


@lowering("embedding")
def _embedding(L, node):
    idx = L.get(node, 1)
    if L.operand_dtype(node, 1) not in ("i64", "i32"):
        idx = L.b.cast(idx, L.operand_dtype(node, 1), "i64")
    return [L.b.op("Gather", L.get(node, 0, out_dtype(node)), idx, axis=0, hint="embedding")]


@lowering("conv1d")
def _conv1d(L, node):
    dt = out_dtype(node)
    a = node.attrs
    pad = list(a["padding"])
    if len(pad) == 1:
        pad = pad * 2
    return [L.b.op("Conv", L.get(node, 0, dt), L.get(node, 1, dt), L.get(node, 2, dt),
                   strides=list(a["stride"]), pads=pad, dilations=list(a["dilation"]), group=int(a["groups"]))]


@lowering("causal_conv1d")
def _causal_conv1d(L, node):
    dt = out_dtype(node)
    b = L.b
    C, K = (static(node, d, "conv weight dims") for d in node.inputs[1].type.shape)
    xt = b.op("Transpose", L.get(node, 0, dt), perm=[0, 2, 1])
    w3 = b.op("Unsqueeze", L.get(node, 1, dt), b.i64(1))
    y = b.op("Conv", xt, w3, L.get(node, 2, dt), kernel_shape=[K], pads=[K - 1, 0], group=C, hint="causal_conv1d")
    return [b.op("Transpose", y, perm=[0, 2, 1])]


# -- elementwise -------------------------------------------------------------------------------------------
SIMPLE_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh", "sigmoid": "Sigmoid",
                "relu": "Relu", "abs": "Abs", "sin": "Sin", "cos": "Cos", "erf": "Erf", "reciprocal": "Reciprocal",
                "floor": "Floor", "ceil": "Ceil", "round": "Round", "detach": "Identity"}   # ONNX Round is half to even, as torch's


@lowering(*SIMPLE_UNARY)
def _unary(L, node):
    dt = out_dtype(node)
    return [L.b.op(SIMPLE_UNARY[node.op], L.get(node, 0, dt))]


@lowering("sign")
def _sign(L, node):
    """torch.sign(NaN) is 0."""
    dt = out_dtype(node)
    x = L.get(node, 0, dt)
    if dt not in ("f16", "bf16", "f32", "f64"):
        return [L.b.op("Sign", x)]
    return [L.b.op("Where", L.b.op("IsNaN", x), L.b.scalar(0.0, dt), L.b.op("Sign", x), hint="sign")]


@lowering("expm1", "log1p")
def _expm1_log1p(L, node):
    """Accurate near 0 from Exp and Log (ONNX has neither op): expm1(x) = (u - 1) x / log(u), u = exp(x)
    (Kahan); log1p(x) = log(u) x / (u - 1), u = 1 + x (Goldberg); x itself where u rounds to 1."""
    dt = out_dtype(node)
    b = L.b
    x = L.get(node, 0, dt)
    one = b.scalar(1.0, dt)
    if node.op == "expm1":
        u = b.op("Exp", x)
        um1 = b.op("Sub", u, one)
        body = b.op("Mul", um1, b.op("Div", x, b.op("Log", u)))   # x / log(u) ~ 1: no overflow
        body = b.op("Where", b.op("IsInf", u), u, body)                                 # x = inf
        body = b.op("Where", b.op("Equal", um1, b.scalar(-1.0, dt)), b.scalar(-1.0, dt), body)   # x very negative
    else:
        u = b.op("Add", x, one)
        um1 = b.op("Sub", u, one)
        body = b.op("Mul", b.op("Log", u), b.op("Div", x, um1))
        body = b.op("Where", b.op("IsInf", u, detect_negative=0), u, body)   # log1p(inf) = inf, log1p(-inf) NaN
    return [b.op("Where", b.op("Equal", u, one), x, body, hint=node.op)]


@lowering("exp2", "log2")
def _exp2_log2(L, node):
    dt = out_dtype(node)
    x = L.get(node, 0, dt)
    if node.op == "exp2":
        return [L.b.op("Pow", L.b.scalar(2.0, dt), x, hint="exp2")]
    return [L.b.op("Div", L.b.op("Log", x), L.b.scalar(math.log(2.0), dt), hint="log2")]


@lowering("rsqrt")
def _rsqrt(L, node):
    dt = out_dtype(node)
    return [L.b.op("Reciprocal", L.b.op("Sqrt", L.get(node, 0, dt)), hint="rsqrt")]


@lowering("logical_not")
def _not(L, node):
    return [L.b.op("Not", L.get(node, 0, "bool"))]


@lowering("silu")
def _silu(L, node):
    dt = out_dtype(node)
    cd = _upcast(dt)
    x = L.get(node, 0, cd)
    return [L.b.cast(L.b.op("Mul", x, L.b.op("Sigmoid", x), hint="silu"), cd, dt)]


@lowering("gelu")
def _gelu(L, node):
    dt = out_dtype(node)
    cd = _upcast(dt)
    b = L.b
    x = L.get(node, 0, cd)
    half = b.op("Mul", x, b.scalar(0.5, cd))
    if node.attrs.get("approximate", "none") == "tanh":
        x3 = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Mul", b.op("Add", x, b.op("Mul", x3, b.scalar(0.044715, cd))),
                     b.scalar(math.sqrt(2.0 / math.pi), cd))
        t = b.op("Tanh", inner)
    else:
        t = b.op("Erf", b.op("Mul", x, b.scalar(1.0 / math.sqrt(2.0), cd)))
    y = b.op("Mul", half, b.op("Add", t, b.scalar(1.0, cd)), hint="gelu")
    return [b.cast(y, cd, dt)]


@lowering("softplus")
def _softplus(L, node):
    dt = out_dtype(node)
    cd = _upcast(dt)
    b = L.b
    beta = float(node.attrs.get("beta", 1))
    threshold = float(node.attrs.get("threshold", 20))
    x = L.get(node, 0, cd)
    bx = x if beta == 1 else b.op("Mul", x, b.scalar(beta, cd))
    sp = b.op("Softplus", bx)
    if beta != 1:
        sp = b.op("Div", sp, b.scalar(beta, cd))
    y = b.op("Where", b.op("Greater", bx, b.scalar(threshold, cd)), x, sp, hint="softplus")
    return [b.cast(y, cd, dt)]


BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min"}
COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}


# on bool tensors torch's add and maximum are "or", mul and minimum "and" (ONNX's Add and Mul take no bool)
BOOL_BINARY = {"add": "Or", "maximum": "Or", "mul": "And", "minimum": "And"}


@lowering(*BINARY)
def _binary(L, node):
    dt = out_dtype(node)
    if dt == "bool" and node.op in BOOL_BINARY:
        return [L.b.op(BOOL_BINARY[node.op], L.get(node, 0, dt), L.get(node, 1, dt), hint=node.op)]
    return [L.b.op(BINARY[node.op], L.get(node, 0, dt), L.get(node, 1, dt), hint=node.op)]


@lowering(*COMPARE, "ne")
def _compare(L, node):
    dt = comparison_name(*node.inputs)
    a, c = L.get(node, 0, dt), L.get(node, 1, dt)
    if node.op == "ne":
        return [L.b.op("Not", L.b.op("Equal", a, c))]
    return [L.b.op(COMPARE[node.op], a, c)]


@lowering("logical_and", "logical_or")
def _logical(L, node):
    return [L.b.op("And" if node.op == "logical_and" else "Or", L.get(node, 0, "bool"), L.get(node, 1, "bool"))]


@lowering("where")
def _where(L, node):
    dt = out_dtype(node)
    if dt == "bool":   # onnxruntime has no Where on bool branches: chosen as uint8
        y = L.b.op("Where", L.get(node, 0, "bool"), L.get(node, 1, "u8"), L.get(node, 2, "u8"))
        return [L.b.cast(y, "u8", "bool")]
    return [L.b.op("Where", L.get(node, 0, "bool"), L.get(node, 1, dt), L.get(node, 2, dt))]


@lowering("masked_fill")
def _masked_fill(L, node):
    dt = out_dtype(node)
    return [L.b.op("Where", L.get(node, 1, "bool"), L.get(node, 2, dt), L.get(node, 0, dt), hint="masked_fill")]


@lowering("cast")
def _cast(L, node):
    if L.operand_dtype(node, 0) == out_dtype(node):  # a no-op cast still needs its own output name
        return [L.b.op("Identity", L.get(node, 0), hint="cast")]
    return [L.get(node, 0, out_dtype(node))]


def _index_mask(L, node, x: Value, keep_upper: bool, k: int) -> str:
    """For tril/triu: a bool [rows, cols] mask, True where the element is kept."""
    b = L.b
    R, C = x.type.shape[-2], x.type.shape[-1]
    rows = b.op("Unsqueeze", b.op("Range", b.scalar(0, "i64"), b.dim_scalar(R), b.scalar(1, "i64")), b.i64(1))
    cols = b.op("Unsqueeze", b.op("Range", b.scalar(0, "i64"), b.dim_scalar(C), b.scalar(1, "i64")), b.i64(0))
    diff = b.op("Sub", cols, rows)  # j - i
    return b.op("GreaterOrEqual" if keep_upper else "LessOrEqual", diff, b.scalar(k, "i64"))


@lowering("tril", "triu")
def _trilu(L, node):
    dt = out_dtype(node)
    x = node.inputs[0]
    keep = _index_mask(L, node, x, node.op == "triu", int(node.attrs["diagonal"]))
    if dt == "bool":   # onnxruntime has no bool Where (nor Trilu): keep the elements by And
        return [L.b.op("And", keep, L.get(node, 0, dt), hint=node.op)]
    zero = L.b.scalar(0, dt)
    return [L.b.op("Where", keep, L.get(node, 0, dt), zero, hint=node.op)]


# -- layout ----------------------------------------------------------------------------------------------
@lowering("reshape")
def _reshape(L, node):
    # allowzero=1: a size that is 0 at run time (B * (T - 1) at T = 1) is 0, not "copy the input's dim"
    return [L.b.op("Reshape", L.get(node, 0), L.b.shape_tensor(node.attrs["shape"]), allowzero=1, hint="reshape")]


@lowering("permute")
def _permute(L, node):
    r = rank(node.inputs[0])
    return [L.b.op("Transpose", L.get(node, 0), perm=[d % r for d in node.attrs["dims"]])]


@lowering("transpose")
def _transpose(L, node):
    r = rank(node.inputs[0])
    perm = list(range(r))
    a, c = node.attrs["dim0"] % r, node.attrs["dim1"] % r
    perm[a], perm[c] = perm[c], perm[a]
    return [L.b.op("Transpose", L.get(node, 0), perm=perm)]


@lowering("unsqueeze")
def _unsqueeze(L, node):
    r = rank(node.inputs[0]) + 1
    return [L.b.op("Unsqueeze", L.get(node, 0), L.b.i64(node.attrs["dim"] % r))]


@lowering("squeeze")
def _squeeze(L, node):
    x = node.inputs[0]
    r = rank(x)
    axes = sorted({d % r for d in node.attrs["dims"] if is_static(x.type.shape[d % r]) and int(x.type.shape[d % r]) == 1})
    if not axes:
        return [L.b.op("Identity", L.get(node, 0))]
    return [L.b.op("Squeeze", L.get(node, 0), L.b.i64(*axes))]


@lowering("expand")
def _expand(L, node):
    shape = [1 if (is_static(d) and int(d) == -1) else d for d in node.attrs["shape"]]
    return [L.b.op("Expand", L.get(node, 0), L.b.shape_tensor(shape))]


def _end(x):
    if is_static(x) and int(x) >= 2**62:
        return INT64_MAX
    return x


@lowering("slice")
def _slice(L, node):
    b = L.b
    a = node.attrs
    r = rank(node.inputs[0])
    start, end = a.get("start", 0), _end(a.get("end"))
    return [b.op("Slice", L.get(node, 0), b.dim(start), b.dim(end), b.i64(a["dim"] % r), b.i64(a.get("step", 1)))]


@lowering("select")
def _select(L, node):
    r = rank(node.inputs[0])
    return [L.b.op("Gather", L.get(node, 0), L.b.dim_scalar(node.attrs["index"]), axis=node.attrs["dim"] % r,
                   hint="select")]


@lowering("split")
def _split(L, node):
    r = rank(node.inputs[0])
    outs = L.b.op("Split", L.get(node, 0), L.b.shape_tensor(node.attrs["sizes"]), axis=node.attrs["dim"] % r,
                  outputs=len(node.outputs), hint="split")
    return outs if isinstance(outs, list) else [outs]


@lowering("concat")
def _concat(L, node):
    dt = out_dtype(node)
    r = rank(node.outputs[0])
    return [L.b.op("Concat", *[L.get(node, i, dt) for i in range(len(node.inputs))], axis=node.attrs["dim"] % r)]


@lowering("stack")
def _stack(L, node):
    dt = out_dtype(node)
    r = rank(node.outputs[0])
    axis = node.attrs["dim"] % r
    parts = [L.b.op("Unsqueeze", L.get(node, i, dt), L.b.i64(axis)) for i in range(len(node.inputs))]
    return [L.b.op("Concat", *parts, axis=axis, hint="stack")]


@lowering("repeat_interleave")
def _repeat_interleave(L, node):
    b = L.b
    x = node.inputs[0]
    d = node.attrs["dim"] % rank(x)
    reps = node.attrs["repeats"]
    shape = list(x.type.shape)
    y = b.op("Unsqueeze", L.get(node, 0), b.i64(d + 1))
    y = b.op("Expand", y, b.shape_tensor(shape[:d + 1] + [reps] + shape[d + 1:]))
    return [b.op("Reshape", y, b.shape_tensor(list(node.outputs[0].type.shape)), allowzero=1, hint="repeat_interleave")]


# -- reductions and factories --------------------------------------------------------------------------------
REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax"}


@lowering(*REDUCE)
def _reduce(L, node):
    dt = out_dtype(node)
    dims = node.attrs.get("dims")
    keep = int(bool(node.attrs.get("keepdim", False)))
    x = L.get(node, 0, dt)
    r = rank(node.inputs[0])
    axes = [L.b.i64(*sorted(d % r for d in dims))] if dims else []
    out = L.b.op(REDUCE[node.op], x, *axes, keepdims=keep)
    if node.op == "amax" and node.inputs[0].type.dtype.is_float:
        # onnxruntime's ReduceMax drops NaN; torch.amax returns NaN where the reduced elements hold one
        nan_only = L.b.op("Where", L.b.op("IsNaN", x), x, L.b.scalar(0.0, dt))
        nan_sum = L.b.op("ReduceSum", nan_only, *axes, keepdims=keep)
        out = L.b.op("Where", L.b.op("IsNaN", nan_sum), nan_sum, out, hint="amax")
    return [out]


RANGE_DTYPES = ("f32", "f64", "i16", "i32", "i64")


@lowering("arange")
def _arange(L, node):
    b = L.b
    dt = out_dtype(node)
    rd = dt if dt in RANGE_DTYPES else "f32"
    vals = []
    for k in ("start", "end", "step"):
        v = node.attrs[k]
        if isinstance(v, sympy.Basic) and not v.is_Number:
            vals.append(b.cast(b.dim_scalar(v), "i64", rd))
        else:
            vals.append(b.scalar(float(v) if DType(rd).is_float else int(v), rd))
    return [b.cast(b.op("Range", *vals, hint="arange"), rd, dt)]


@lowering("full")
def _full(L, node):
    b = L.b
    dt = out_dtype(node)
    value = node.attrs["value"]
    if isinstance(value, sympy.Basic) and not value.is_Number:
        v = b.size_value(value, dt)
        return [b.op("Expand", v, b.shape_tensor(node.attrs["shape"]), hint="full")]
    cd = "f32" if dt == "bf16" else dt
    fill = tensor_proto("value", np.asarray([value], dtype=NUMPY_DTYPE[cd]))
    y = b.op("ConstantOfShape", b.shape_tensor(node.attrs["shape"]), value=fill, hint="full")
    return [b.cast(y, cd, dt)]


@lowering("eye")
def _eye(L, node):
    b = L.b
    dt = out_dtype(node)
    r = b.op("Range", b.scalar(0, "i64"), b.dim_scalar(node.attrs["n"]), b.scalar(1, "i64"))
    eq = b.op("Equal", b.op("Unsqueeze", r, b.i64(1)), b.op("Unsqueeze", r, b.i64(0)))
    return [b.cast(eq, "bool", dt)]


# -- fallback ------------------------------------------------------------------------------------------------
@lowering("fallback")
def _fallback(L, node):
    from .onnx_fallback import lower_fallback

    return lower_fallback(L, node)


# IR ops with no ONNX lowering, and why (sessa_compiler/op_registry.py reads this; the core ops' lowerings
# are in onnx_core.py)
GAPS = {"fused": "made only by the Triton pipeline's fuse pass; the ONNX pipeline does not fuse (onnxruntime fuses)",
        "feedback": "never lowered as such: the ONNX pipeline's chunk-feedback pass rewrites it into feedback_lse, "
                    "feedback_diag_inverse and feedback_chunked before lowering, and those are lowered"}


def lower_node(L: Lowering, node: Node) -> list:
    fn = LOWERINGS.get(node.op)
    if fn is None:
        raise OnnxUnsupportedOpError(
            f"op '{node.op}' (%{node.outputs[0].name if node.outputs else '?'}) has no ONNX lowering; "
            f"supported ops: {', '.join(sorted(LOWERINGS))}")
    return fn(L, node)
