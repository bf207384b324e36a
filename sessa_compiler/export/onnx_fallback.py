"""``fallback`` ops (torch ops the frontend did not map to an IR op) in standard ONNX.

A small table keyed by the torch target; the arguments are bound to the op's schema names (defaults
filled in), so each entry reads like the torch signature. A target outside the table is exported on its
own by torch.onnx.export (dynamo, dynamic B/T) and spliced in when that yields plain standard ONNX;
otherwise the export fails with an OnnxUnsupportedOpError naming the target.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import sympy
import torch

from ..ir.graph import Node, Value
from ..ir.ops import ArgRef
from ..semantics.fallback_forms import FORMS, bind, leading_indices, pad_widths, reduced_dims
from .onnx_builder import INT64_MAX, NUMPY_DTYPE, ONNX_DTYPE, OnnxExportError, OnnxUnsupportedOpError, out_dtype, value_info

FALLBACKS: dict[str, Callable] = {}


def fallback(*targets):
    def deco(fn):
        for t in targets:
            FALLBACKS[t] = fn
        return fn
    return deco


class Args:
    """A fallback's arguments by schema name: tensors as ONNX names, everything else as Python values."""

    def __init__(self, L, node: Node):
        self.L, self.node = L, node
        self.values: dict = bind(node)

    def value(self, name: str):
        return self.values.get(name)

    def operand(self, name: str, dtype: str) -> str:
        """A tensor argument cast to ``dtype``, or a scalar argument as a 0-d constant of ``dtype``."""
        v = self.values[name]
        if isinstance(v, ArgRef):
            return self.L.get(self.node, v.index, dtype)
        if isinstance(v, sympy.Basic) and not v.is_Number:   # a size (ids % T): its runtime value
            return self.L.b.size_value(v, dtype)
        if isinstance(v, sympy.Basic):
            v = int(v) if v.is_Integer else float(v)
        return self.L.b.scalar(bool(v) if dtype == "bool" else v, dtype)

    def tensor(self, name: str, dtype: str | None = None) -> str:
        ref = self.values[name]
        if not isinstance(ref, ArgRef):
            raise OnnxExportError(f"fallback {self.node.attrs['target']}: argument {name} is not a tensor ({ref!r})")
        return self.L.get(self.node, ref.index, dtype)

    def type(self, name: str):
        return self.node.inputs[self.values[name].index].type

    def dims(self, name: str, rank: int) -> list:
        v = self.values[name]
        v = [v] if isinstance(v, (int, sympy.Basic)) else list(v)
        return [int(d) % rank for d in v]


@fallback("aten.logsumexp.default")
def _logsumexp(L, node, a: Args):
    """max + log(sum(exp(x - max))): stable for large |x| (max is kept finite for all -inf rows)."""
    b = L.b
    dt = out_dtype(node)
    cd = "f32" if dt in ("f16", "bf16") else dt
    x = a.tensor("self", cd)
    axes = b.i64(*a.dims("dim", a.type("self").rank))
    m = b.op("ReduceMax", x, axes, keepdims=1)
    m = b.op("Where", b.op("IsInf", m), b.scalar(0.0, cd), m)  # all -inf rows: shift by 0 (inf - inf is NaN)
    y = b.op("Add", b.op("Log", b.op("ReduceSum", b.op("Exp", b.op("Sub", x, m)), axes, keepdims=1)), m, hint="logsumexp")
    if not a.value("keepdim"):
        y = b.op("Squeeze", y, axes)
    return [b.cast(y, cd, dt)]


@fallback("aten.clamp.default")
def _clamp(L, node, a: Args):
    dt = out_dtype(node)
    lo, hi = a.value("min"), a.value("max")
    b = L.b
    return [b.op("Clip", a.tensor("self", dt), None if lo is None else b.scalar(lo, dt),
                 None if hi is None else b.scalar(hi, dt), hint="clamp")]


SIMPLE = {"aten.floor.default": "Floor", "aten.ceil.default": "Ceil", "aten.round.default": "Round",
          "aten.sign.default": "Sign", "aten.atan.default": "Atan", "aten.sinh.default": "Sinh",
          "aten.cosh.default": "Cosh", "aten.asin.default": "Asin", "aten.acos.default": "Acos",
          "aten.tan.default": "Tan", "aten.isnan.default": "IsNaN"}


def _simple(L, node, a: Args):
    dt = out_dtype(node)
    return [L.b.op(SIMPLE[node.attrs["target"]], a.tensor("self", None if dt == "bool" else dt))]


for _t in SIMPLE:
    FALLBACKS[_t] = _simple


# -- the forms of semantics/fallback_forms.py (export_tvm lowers the same ones: backends/tvm/relax_fallback.py) --
FORM_LOWERINGS: dict[str, Callable] = {}


def form(*names):
    def deco(fn):
        for n in names:
            FORM_LOWERINGS[n] = fn
        return fn
    return deco


def _compute(dt: str) -> str:
    """The dtype an op computes in: onnxruntime has no half kernels for CumSum, ReduceProd, Mod, Atan."""
    return "f32" if dt in ("f16", "bf16") else dt


@form("cumsum")
def _cumsum(L, node, a: Args):
    dt = out_dtype(node)   # torch's: int64 for bool / integer input without dtype=
    cd = _compute(dt)
    y = L.b.op("CumSum", a.tensor("self", cd), L.b.scalar(a.dims("dim", a.type("self").rank)[0], "i64"), hint="cumsum")
    return [L.b.cast(y, cd, dt)]


@form("cumprod")
def _cumprod(L, node, a: Args):
    """An ONNX Scan along the dim carrying the running product (exact, any dtype; ONNX has no CumProd)."""
    from onnx import helper

    b = L.b
    dt = out_dtype(node)
    cd = _compute(dt)
    t = a.type("self")
    if t.rank == 0:
        return [b.cast(a.tensor("self", cd), cd, dt)]
    axis = a.dims("dim", t.rank)[0]
    one = helper.make_tensor("one", ONNX_DTYPE[cd], [1], [1])
    rest = [d for i, d in enumerate(t.shape) if i != axis]
    p0 = b.op("ConstantOfShape", b.shape_tensor(rest), value=one, hint="cumprod_init")
    body = b.sub()
    p, x = body.names.fresh("prod_prev"), body.names.fresh("x_t")
    new = body.op("Mul", p, x, hint="prod_t")
    carry = body.op("Identity", new, hint="prod_carry")
    g = body.graph("cumprod_step", [value_info(p, cd, [None] * len(rest)), value_info(x, cd, [None] * len(rest))],
                   [value_info(carry, cd, [None] * len(rest)), value_info(new, cd, [None] * len(rest))])
    _, ys = b.op("Scan", p0, a.tensor("self", cd), body=g, num_scan_inputs=1, scan_input_axes=[axis],
                 scan_output_axes=[axis], outputs=2, hint="cumprod")
    return [b.cast(ys, cd, dt)]


def _scan_init(b, t, axis: int, dtype: str, value) -> str:
    """A carry of ``value`` shaped like one slice of the scanned tensor (its dims but ``axis``)."""
    from onnx import helper

    rest = [d for i, d in enumerate(t.shape) if i != axis]
    v = helper.make_tensor("v", ONNX_DTYPE[dtype], [1], [value])
    return b.op("ConstantOfShape", b.shape_tensor(rest), value=v, hint="scan_init"), len(rest)


@form("cummax", "cummin")
def _cummax(L, node, a: Args):
    """An ONNX Scan along the dim carrying (value, index, step), with torch's rule at each step: take x where
    x is NaN, or where the running value is not NaN and x >= it (<= for cummin): ties take the LAST index, a
    NaN sticks (its index moves to each later NaN)."""
    b = L.b
    t = a.type("self")
    dt = out_dtype(node)
    if t.rank == 0:
        return [a.tensor("self"), b.scalar(0, "i64")]
    axis = a.dims("dim", t.rank)[0]
    largest = FORMS[node.attrs["target"]] == "cummax"
    is_float = t.dtype.is_float
    cd = _compute(dt) if is_float else dt
    if is_float:
        start = -math.inf if largest else math.inf
    elif dt == "bool":
        cd, start = "i32", 0 if largest else 1
    else:
        info = np.iinfo(NUMPY_DTYPE[dt])
        start = int(info.min if largest else info.max)
    m0, r = _scan_init(b, t, axis, cd, start)
    i0, _ = _scan_init(b, t, axis, "i64", 0)
    body = b.sub()
    m, i, k, x = (body.names.fresh(n) for n in ("run", "run_idx", "step", "x_t"))
    take = body.op("GreaterOrEqual" if largest else "LessOrEqual", x, m)
    if is_float:
        take = body.op("Or", body.op("IsNaN", x), body.op("And", body.op("Not", body.op("IsNaN", m)), take))
    new_m = body.op("Where", take, x, m, hint="run_new")
    new_i = body.op("Where", take, body.op("Expand", k, body.op("Shape", i)), i, hint="run_idx_new")
    new_k = body.op("Add", k, body.scalar(1, "i64"), hint="step_next")
    outs = [body.op("Identity", new_m, hint="run_out"), body.op("Identity", new_i, hint="idx_out")]
    g = body.graph("cum_extreme_step", [value_info(m, cd, [None] * r), value_info(i, "i64", [None] * r),
                                        value_info(k, "i64", []), value_info(x, cd, [None] * r)],
                   [value_info(new_m, cd, [None] * r), value_info(new_i, "i64", [None] * r),
                    value_info(new_k, "i64", []), value_info(outs[0], cd, [None] * r),
                    value_info(outs[1], "i64", [None] * r)])
    _, _, _, vals, idx = b.op("Scan", m0, i0, b.scalar(0, "i64"), b.cast(a.tensor("self"), t.dtype.name, cd),
                              body=g, num_scan_inputs=1, scan_input_axes=[axis], scan_output_axes=[axis, axis],
                              outputs=5, hint=FORMS[node.attrs["target"]])
    return [b.cast(vals, cd, dt), idx]


def _log1p(b, u: str, cd: str) -> str:
    """log(1 + u) accurate for small u (ONNX has no Log1p): log(w) * u / (w - 1) with w = 1 + u, u where w == 1."""
    one = b.scalar(1.0, cd)
    w = b.op("Add", one, u)
    wm1 = b.op("Sub", w, one)
    same = b.op("Equal", wm1, b.scalar(0.0, cd))
    safe = b.op("Where", same, one, wm1)
    return b.op("Where", same, u, b.op("Div", b.op("Mul", b.op("Log", w), u), safe), hint="log1p")


@form("logcumsumexp")
def _logcumsumexp(L, node, a: Args):
    """An ONNX Scan along the dim carrying the running log-sum-exp, each step as torch's: with lo, hi the smaller
    and larger of (run, x) (NaN if either is), hi + log1p(exp(lo - hi)) unless lo == hi is infinite (then run:
    -inf stays -inf, +inf stays +inf; no inf - inf). The shift is the running maximum, never a global one."""
    b = L.b
    t = a.type("self")
    dt = out_dtype(node)
    cd = _compute(dt)
    if t.rank == 0:
        return [b.cast(a.tensor("self", cd), cd, dt)]
    axis = a.dims("dim", t.rank)[0]
    s0, r = _scan_init(b, t, axis, cd, -math.inf)
    body = b.sub()
    s, x = body.names.fresh("lse_prev"), body.names.fresh("x_t")
    nan = body.op("Or", body.op("IsNaN", s), body.op("IsNaN", x))
    qnan = body.scalar(math.nan, cd)
    lo = body.op("Where", nan, qnan, body.op("Min", s, x))
    hi = body.op("Where", nan, qnan, body.op("Max", s, x))
    finite = body.op("Not", body.op("Or", body.op("IsInf", lo), body.op("IsNaN", lo)))
    general = body.op("Or", body.op("Not", body.op("Equal", lo, hi)), finite)
    general = body.op("Or", general, nan)   # NaN != NaN in C: the general branch, which propagates it
    step = body.op("Add", hi, _log1p(body, body.op("Exp", body.op("Sub", lo, hi)), cd))
    new = body.op("Where", general, step, s, hint="lse_t")
    carry = body.op("Identity", new, hint="lse_carry")
    g = body.graph("logcumsumexp_step", [value_info(s, cd, [None] * r), value_info(x, cd, [None] * r)],
                   [value_info(carry, cd, [None] * r), value_info(new, cd, [None] * r)])
    _, ys = b.op("Scan", s0, a.tensor("self", cd), body=g, num_scan_inputs=1, scan_input_axes=[axis],
                 scan_output_axes=[axis], outputs=2, hint="logcumsumexp")
    return [b.cast(ys, cd, dt)]


@form("logaddexp")
def _logaddexp(L, node, a: Args):
    """torch's: a where a == b is infinite (no inf - inf), else max(a, b) + log1p(exp(-|a - b|)) (NaN in, NaN
    out: |a - b| is NaN)."""
    b = L.b
    dt = out_dtype(node)
    cd = _compute(dt)
    x, y = a.operand("self", cd), a.operand("other", cd)
    d = b.op("Neg", b.op("Abs", b.op("Sub", x, y)))
    r = b.op("Add", b.op("Max", x, y), _log1p(b, b.op("Exp", d), cd))
    same_inf = b.op("And", b.op("IsInf", x), b.op("Equal", x, y))
    return [b.cast(b.op("Where", same_inf, x, r, hint="logaddexp"), cd, dt)]


@form("index")
def _index(L, node, a: Args):
    """x[i0, ..., ik-1] with integer index tensors over the leading dims (broadcast together; negative indices count
    from the end, like torch): GatherND over the stacked indices."""
    b = L.b
    t = a.type("self")

    idx, why = leading_indices(node, a.values)
    if why:   # torch's exporter may still know it (it names the op and what to change when not)
        return via_torch_exporter(L, node)
    out = list(node.outputs[0].type.shape)
    lead = out[:len(out) - (t.rank - len(idx))]
    cols = []
    for j, ref in enumerate(idx):
        i = L.get(node, ref.index, "i64")
        i = b.op("Where", b.op("Less", i, b.scalar(0, "i64")), b.op("Add", i, b.dim(t.shape[j])), i)
        if list(node.inputs[ref.index].type.shape) != lead:
            i = b.op("Expand", i, b.shape_tensor(lead))
        cols.append(b.op("Unsqueeze", i, b.i64(-1)))
    stacked = cols[0] if len(cols) == 1 else b.op("Concat", *cols, axis=-1)
    return [b.op("GatherND", a.tensor("self"), stacked, hint="index")]


@form("index_fill")
def _index_fill(L, node, a: Args):
    """x with the entries at the given indices along dim set to value: Where over a mask along the dim."""
    b = L.b
    t = a.type("self")
    dt = out_dtype(node)
    dim = a.dims("dim", t.rank)[0]
    n = b.dim(t.shape[dim])
    idx = b.op("Reshape", a.tensor("index", "i64"), b.i64(1, -1))
    idx = b.op("Where", b.op("Less", idx, b.scalar(0, "i64")), b.op("Add", idx, n), idx)
    pos = b.op("Unsqueeze", b.op("Range", b.scalar(0, "i64"), b.op("Squeeze", n, b.i64(0)), b.scalar(1, "i64")),
               b.i64(-1))
    hit = b.op("ReduceMax", b.cast(b.op("Equal", pos, idx), "bool", "i32"), b.i64(1), keepdims=0)
    shape = [1] * t.rank
    shape[dim] = -1
    mask = b.op("Reshape", b.cast(hit, "i32", "bool"), b.i64(*shape))
    return [b.op("Where", mask, a.operand("value", dt), a.tensor("self", dt), hint="index_fill")]


@form("pad")
def _pad(L, node, a: Args):
    """F.pad in mode replicate (Pad edge), reflect, circular (Pad wrap, opset 19) or constant."""
    b = L.b
    t = a.type("self")
    widths, mode, why = pad_widths(a.values, t.rank)
    if why:   # torch's exporter may still know it (it names the op and what to change when not)
        return via_torch_exporter(L, node)
    dt = out_dtype(node)
    if mode == "circular":   # the last l elements before, the first r after (Pad's wrap needs opset 19)
        x = a.tensor("self", dt)
        for d, (lo, hi) in enumerate(widths):
            if lo or hi:
                n = b.dim(t.shape[d])
                parts = [b.op("Slice", x, b.op("Sub", n, b.i64(lo)), n, b.i64(d))] if lo else []
                parts.append(x)
                if hi:
                    parts.append(b.op("Slice", x, b.i64(0), b.i64(hi), b.i64(d)))
                x = b.op("Concat", *parts, axis=d, hint="pad_circular")
        return [x]
    onnx_mode = {"replicate": "edge", "reflect": "reflect", "constant": "constant"}[mode]
    pads = b.i64(*[w[0] for w in widths], *[w[1] for w in widths])
    value = a.value("value")
    fill = b.scalar(0 if value is None else value, dt) if mode == "constant" else None
    return [b.op("Pad", a.tensor("self", dt), pads, fill, mode=onnx_mode, hint="pad")]


@form("embedding")
def _embedding(L, node, a: Args):
    """The weight's rows at the indices (padding_idx and the other arguments only change the gradient)."""
    return [L.b.op("Gather", a.tensor("weight"), a.tensor("indices", "i64"), axis=0, hint="embedding")]


@form("flip")
def _flip(L, node, a: Args):
    b = L.b
    axes = a.dims("dims", a.type("self").rank)
    k = len(axes)
    return [b.op("Slice", a.tensor("self"), b.i64(*([-1] * k)), b.i64(*([-INT64_MAX] * k)), b.i64(*axes),
                 b.i64(*([-1] * k)), hint="flip")]


@form("gather")
def _gather(L, node, a: Args):
    t = a.type("self")
    return [L.b.op("GatherElements", a.tensor("self"), a.tensor("index", "i64"), axis=a.dims("dim", t.rank)[0],
                   hint="gather")]


@form("take_along_dim")
def _take_along_dim(L, node, a: Args):
    """torch.take_along_dim: with a dim, self and indices broadcast against each other except along it (the
    node's output shape says to what), then GatherElements; without one, both flattened."""
    b = L.b
    x, idx = a.tensor("self"), a.tensor("indices", "i64")
    if a.value("dim") is None:
        return [b.op("GatherElements", b.op("Reshape", x, b.i64(-1)), b.op("Reshape", idx, b.i64(-1)), axis=0,
                     hint="take_along_dim")]
    t, it = a.type("self"), a.type("indices")
    dim = a.dims("dim", t.rank)[0]
    out = list(node.outputs[0].type.shape)
    want_x = out[:dim] + [t.shape[dim]] + out[dim + 1:]
    if list(t.shape) != want_x:
        x = b.op("Expand", x, b.shape_tensor(want_x))
    if list(it.shape) != out:
        idx = b.op("Expand", idx, b.shape_tensor(out))
    return [b.op("GatherElements", x, idx, axis=dim, hint="take_along_dim")]


@form("index_select")
def _index_select(L, node, a: Args):
    b = L.b
    idx = a.tensor("index", "i64")
    if a.type("index").rank == 0:
        idx = b.op("Reshape", idx, b.i64(1))
    return [b.op("Gather", a.tensor("self"), idx, axis=a.dims("dim", a.type("self").rank)[0], hint="index_select")]


def _arg_extreme(b, x: str, axis: int, largest: bool, is_float: bool) -> str:
    """torch's argmax / argmin along ``axis`` (kept, size 1): the first index of the extreme, a NaN counting as
    the extreme (onnxruntime's ArgMax skips NaN): the first 1 of an int32 mask where x equals the row's max (min),
    or is NaN in a row holding one."""
    op = "ArgMax" if largest else "ArgMin"
    if not is_float:
        return b.op(op, x, axis=axis, keepdims=1, select_last_index=0)
    hit = b.op("Equal", x, b.op("ReduceMax" if largest else "ReduceMin", x, b.i64(axis), keepdims=1))
    nan = b.op("IsNaN", x)
    any_nan = b.op("Greater", b.op("ReduceMax", b.cast(nan, "bool", "i32"), b.i64(axis), keepdims=1), b.scalar(0, "i32"))
    hit = b.op("Where", any_nan, b.cast(nan, "bool", "i32"), b.cast(hit, "bool", "i32"))   # (no bool Where in ORT)
    return b.op("ArgMax", hit, axis=axis, keepdims=1, select_last_index=0)


@form("argmax", "argmin")
def _argmax(L, node, a: Args):
    b = L.b
    t = a.type("self")
    x = a.tensor("self")
    largest = FORMS[node.attrs["target"]] == "argmax"
    keep = bool(a.value("keepdim"))
    if a.value("dim") is None:
        y = _arg_extreme(b, b.op("Reshape", x, b.i64(-1)), 0, largest, t.dtype.is_float)
        return [b.op("Reshape", y, b.i64(*([1] * t.rank)) if keep else b.const([], "i64", hint="scalar_shape"))]
    dim = a.dims("dim", t.rank)[0]
    y = _arg_extreme(b, x, dim, largest, t.dtype.is_float)
    return [y if keep else b.op("Squeeze", y, b.i64(dim))]


@form("topk")
def _topk(L, node, a: Args):
    b = L.b
    t = a.type("self")
    k = a.value("k")
    values, indices = b.op("TopK", a.tensor("self"), b.dim(k), axis=a.dims("dim", t.rank)[0],
                           largest=int(bool(a.value("largest"))), sorted=1, outputs=2, hint="topk")
    return [values, indices]


@form("sort")
def _sort(L, node, a: Args):
    b = L.b
    t = a.type("self")
    dim = a.dims("dim", t.rank)[0]
    k = b.op("Shape", a.tensor("self"), start=dim, end=dim + 1)
    values, indices = b.op("TopK", a.tensor("self"), k, axis=dim, largest=int(bool(a.value("descending"))),
                           sorted=1, outputs=2, hint="sort")
    return [values, indices]


@form("argsort")
def _argsort(L, node, a: Args):
    return [_sort(L, node, a)[1]]


@form("atan2")
def _atan2(L, node, a: Args):
    """atan2(y, x) from Atan (ONNX has no Atan2), with torch's (C's) values on the axes, at signed zeros and at
    infinities: the sign of a zero is read as the sign of 1 / zero."""
    b = L.b
    dt = out_dtype(node)
    cd = _compute(dt)
    y, x = a.operand("self", cd), a.operand("other", cd)

    def c(v):
        return b.scalar(v, cd)

    zero = c(0.0)

    def negative(v):   # v < 0, -0 included
        return b.op("Less", b.op("Where", b.op("Equal", v, zero), b.op("Div", c(1.0), v), v), zero)

    x_neg, y_neg = negative(x), negative(y)
    pi = b.op("Where", y_neg, c(-math.pi), c(math.pi))
    r = b.op("Atan", b.op("Div", y, x))
    r = b.op("Where", b.op("Less", x, zero), b.op("Add", r, pi), r)                  # x < 0: the other half-plane
    half = b.op("Where", y_neg, c(-math.pi / 2), c(math.pi / 2))
    r = b.op("Where", b.op("Equal", x, zero), b.op("Where", b.op("Equal", y, zero),
                                                   b.op("Where", x_neg, pi, y), half), r)   # x = +-0
    both_inf = b.op("And", b.op("IsInf", x), b.op("IsInf", y))
    corner = b.op("Where", x_neg, b.op("Mul", pi, c(0.75)), b.op("Mul", pi, c(0.25)))
    r = b.op("Where", both_inf, corner, r)
    nan = b.op("Or", b.op("IsNaN", x), b.op("IsNaN", y))
    r = b.op("Where", nan, b.op("Add", x, y), r, hint="atan2")   # NaN in, NaN out
    return [b.cast(r, cd, dt)]


@form("remainder", "fmod")
def _remainder(L, node, a: Args):
    """fmod: C's fmod (the dividend's sign); remainder: the divisor's sign, as torch computes it (fmod, plus the
    divisor where the signs differ), so floats match torch to the bit."""
    b = L.b
    dt = out_dtype(node)
    cd = _compute(dt)
    x, y = a.operand("self", cd), a.operand("other", cd)
    is_float = cd.startswith("f")
    if FORMS[node.attrs["target"]] == "fmod":
        return [b.cast(b.op("Mod", x, y, fmod=1, hint="fmod"), cd, dt)]
    if not is_float:
        return [b.cast(b.op("Mod", x, y, fmod=0, hint="remainder"), cd, dt)]
    m = b.op("Mod", x, y, fmod=1)
    zero = b.scalar(0, cd)
    fix = b.op("And", b.op("Not", b.op("Equal", m, zero)), b.op("Xor", b.op("Less", m, zero), b.op("Less", y, zero)))
    return [b.cast(b.op("Where", fix, b.op("Add", m, y), m, hint="remainder"), cd, dt)]


@form("nan_to_num")
def _nan_to_num(L, node, a: Args):
    b = L.b
    dt = out_dtype(node)
    x = a.tensor("self", dt)
    if not dt.startswith(("f", "bf")):
        return [b.op("Identity", x, hint="nan_to_num")]
    info = torch.finfo(to_torch_dtype(dt))
    nan, pos, neg = a.value("nan"), a.value("posinf"), a.value("neginf")
    nan = 0.0 if nan is None else nan
    pos = info.max if pos is None else pos
    neg = info.min if neg is None else neg
    y = b.op("Where", b.op("IsNaN", x), b.scalar(nan, dt), x)
    y = b.op("Where", b.op("IsInf", x, detect_negative=0), b.scalar(pos, dt), y)
    return [b.op("Where", b.op("IsInf", x, detect_positive=0), b.scalar(neg, dt), y, hint="nan_to_num")]


def _reduce_axes(L, a: Args, rank: int):
    """(axes input or None for every element, keepdims) of an any / all / prod."""
    dims = reduced_dims(a.values, rank)
    return (None if dims is None else L.b.i64(*dims)), int(bool(a.value("keepdim")))


@form("any", "all")
def _any_all(L, node, a: Args):
    b = L.b
    t = a.type("self")
    x = a.tensor("self")
    truth = x if t.dtype.name == "bool" else b.op("Not", b.op("Equal", x, b.scalar(0, t.dtype.name)))
    axes, keep = _reduce_axes(L, a, t.rank)
    op = "ReduceMax" if FORMS[node.attrs["target"]] == "any" else "ReduceMin"
    y = b.op(op, b.cast(truth, "bool", "i32"), axes, keepdims=keep if axes is not None else 0, hint="any_all")
    return [b.cast(y, "i32", out_dtype(node))]


@form("prod")
def _prod(L, node, a: Args):
    b = L.b
    dt = out_dtype(node)   # torch's: int64 for bool / integer input without dtype=
    cd = _compute(dt)
    t = a.type("self")
    axes, keep = _reduce_axes(L, a, t.rank)
    y = b.op("ReduceProd", a.tensor("self", cd), axes, keepdims=keep if axes is not None else 0, hint="prod")
    return [b.cast(y, cd, dt)]


@form("max_dim", "min_dim")
def _max_dim(L, node, a: Args):
    """The values at the ArgMax / ArgMin index (first one), so values and indices agree."""
    b = L.b
    t = a.type("self")
    dim = a.dims("dim", t.rank)[0]
    x = a.tensor("self")
    idx = _arg_extreme(b, x, dim, FORMS[node.attrs["target"]] == "max_dim", t.dtype.is_float)
    val = b.op("GatherElements", x, idx, axis=dim)
    if not a.value("keepdim"):
        idx, val = b.op("Squeeze", idx, b.i64(dim)), b.op("Squeeze", val, b.i64(dim))
    return [val, idx]


@form("isnan", "isinf", "isfinite")
def _isnan(L, node, a: Args):
    b = L.b
    t = a.type("self")
    x = a.tensor("self")
    kind = FORMS[node.attrs["target"]]
    if not t.dtype.is_float:   # an integer is never NaN or infinite
        return [b.op("Not" if kind != "isfinite" else "Identity", b.op("Equal", x, x))]
    if kind == "isnan":
        return [b.op("IsNaN", x)]
    if kind == "isinf":
        return [b.op("IsInf", x)]
    return [b.op("Not", b.op("Or", b.op("IsInf", x), b.op("IsNaN", x)), hint="isfinite")]


def _truth(L, a: Args, name: str) -> str:
    b = L.b
    t = a.type(name)
    x = a.tensor(name)
    return x if t.dtype.name == "bool" else b.op("Not", b.op("Equal", x, b.scalar(0, t.dtype.name)))


@form("logical_xor")
def _logical_xor(L, node, a: Args):
    return [L.b.cast(L.b.op("Xor", _truth(L, a, "self"), _truth(L, a, "other")), "bool", out_dtype(node))]


def _trunc_of(b, x: str, dt: str) -> str:
    return b.op("Where", b.op("Less", x, b.scalar(0, dt)), b.op("Ceil", x), b.op("Floor", x), hint="trunc")


@form("trunc", "frac")
def _trunc(L, node, a: Args):
    b = L.b
    dt = out_dtype(node)
    x = a.tensor("self", dt)
    if not dt.startswith(("f", "bf")):
        return [b.op("Identity", x) if FORMS[node.attrs["target"]] == "trunc" else b.op("Sub", x, x)]
    t = _trunc_of(b, x, dt)
    return [t if FORMS[node.attrs["target"]] == "trunc" else b.op("Sub", x, t, hint="frac")]


def _floor_div(b, x: str, y: str, cd: str) -> str:
    """torch's floor division: integers as Python's //; floats as torch computes them (from fmod, so that
    floor_divide(a, b) * b + remainder(a, b) == a), NaN / inf for a zero divisor."""
    zero = b.scalar(0, cd)
    if not cd.startswith("f"):
        q = b.op("Div", x, y)   # truncates
        r = b.op("Sub", x, b.op("Mul", q, y))
        fix = b.op("And", b.op("Not", b.op("Equal", r, zero)), b.op("Xor", b.op("Less", r, zero), b.op("Less", y, zero)))
        return b.op("Sub", q, b.cast(fix, "bool", cd), hint="floor_divide")
    one = b.scalar(1, cd)
    m = b.op("Mod", x, y, fmod=1)
    div = b.op("Div", b.op("Sub", x, m), y)
    fix = b.op("And", b.op("Not", b.op("Equal", m, zero)), b.op("Xor", b.op("Less", m, zero), b.op("Less", y, zero)))
    div = b.op("Where", fix, b.op("Sub", div, one), div)
    fl = b.op("Floor", div)
    fl = b.op("Where", b.op("Greater", b.op("Sub", div, fl), b.scalar(0.5, cd)), b.op("Add", fl, one), fl)
    true_div = b.op("Div", x, y)
    fl = b.op("Where", b.op("Equal", div, zero), b.op("Mul", zero, true_div), fl)   # a signed zero
    return b.op("Where", b.op("Equal", y, zero), true_div, fl, hint="floor_divide")


@form("floor_divide", "div_mode")
def _div_mode(L, node, a: Args):
    b = L.b
    dt = out_dtype(node)
    cd = _compute(dt)
    x, y = a.operand("self", cd), a.operand("other", cd)
    mode = "floor" if FORMS[node.attrs["target"]] == "floor_divide" else a.value("rounding_mode")
    if mode == "floor":
        q = _floor_div(b, x, y, cd)
    elif mode == "trunc" and cd.startswith("f"):
        q = _trunc_of(b, b.op("Div", x, y), cd)
    else:   # trunc of integers (ONNX's integer Div truncates), or true division
        q = b.op("Div", x, y, hint="div")
    return [b.cast(q, cd, dt)]


@form("count_nonzero")
def _count_nonzero(L, node, a: Args):
    b = L.b
    t = a.type("self")
    dims = reduced_dims(a.values, t.rank)
    nz = b.cast(_truth(L, a, "self"), "bool", "i64")
    return [b.op("ReduceSum", nz, None if dims is None else b.i64(*dims), keepdims=0, hint="count_nonzero")]


@form("one_hot")
def _one_hot(L, node, a: Args):
    b = L.b
    n = a.value("num_classes")
    if not isinstance(n, int) or n < 1:
        raise OnnxUnsupportedOpError(f"one_hot with num_classes={n}: the export needs the number of classes; "
                                     "pass num_classes=")
    return [b.op("OneHot", a.tensor("self", "i64"), b.scalar(n, "i64"), b.i64(0, 1), axis=-1, hint="one_hot")]


@form("scatter", "scatter_add")
def _scatter(L, node, a: Args):
    """ScatterElements; the updates take the index's shape (a scalar value expanded, a larger src sliced, as
    torch reads only src[:index.shape])."""
    b = L.b
    t, it = a.type("self"), a.type("index")
    dt = out_dtype(node)
    idx = a.tensor("index", "i64")
    if "value" in a.values:
        upd = b.op("Expand", a.operand("value", dt), b.op("Shape", idx))
    else:
        upd = a.tensor("src", dt)
        st = a.type("src")
        if list(st.shape) != list(it.shape):
            upd = b.op("Slice", upd, b.i64(*([0] * it.rank)), b.shape_tensor(list(it.shape)), b.i64(*range(it.rank)))
    reduction = "add" if FORMS[node.attrs["target"]] == "scatter_add" else "none"
    return [b.op("ScatterElements", a.tensor("self", dt), idx, upd, axis=a.dims("dim", t.rank)[0],
                 reduction=reduction, hint="scatter")]


@form("roll")
def _roll(L, node, a: Args):
    """torch.roll: per (shift, dim), the last shift % n elements moved to the front (n may be symbolic); no
    dims: over the flattened tensor, then back to the shape."""
    b = L.b
    t = a.type("self")
    x = a.tensor("self")
    shifts, dims = list(a.value("shifts")), list(a.value("dims") or [])
    shape = list(t.shape)
    if not dims:
        x, dims, shape = b.op("Reshape", x, b.i64(-1)), [0], [sympy.Mul(*t.shape)]
    for s, d in zip(shifts, dims):
        d = int(d) % len(shape)
        n = b.dim(shape[d])
        k = b.op("Sub", n, b.op("Mod", b.op("Add", b.op("Mod", b.dim(s), n), n), n))   # n - (s mod n), in [1, n]
        tail = b.op("Slice", x, k, n, b.i64(d))
        head = b.op("Slice", x, b.i64(0), k, b.i64(d))
        x = b.op("Concat", tail, head, axis=d, hint="roll")
    return [b.op("Reshape", x, b.shape_tensor(list(t.shape)), allowzero=1) if not a.value("dims") else x]


@form("bucketize")
def _bucketize(L, node, a: Args):
    """The number of boundaries below x (at or below, right=True): each element against the 1-D boundaries."""
    b = L.b
    dt = a.type("self").dtype.name
    x = b.op("Unsqueeze", a.tensor("self"), b.i64(-1))
    bounds = a.tensor("boundaries", dt)
    below = b.op("LessOrEqual" if a.value("right") else "Less", bounds, x)
    y = b.op("ReduceSum", b.cast(below, "bool", "i64"), b.i64(-1), keepdims=0, hint="bucketize")
    return [b.cast(y, "i64", out_dtype(node))]


@form("isin")
def _isin(L, node, a: Args):
    b = L.b
    dt = a.type("elements").dtype.name
    x = b.op("Unsqueeze", a.tensor("elements"), b.i64(-1))
    test = b.op("Reshape", a.tensor("test_elements", dt), b.i64(-1))
    hit = b.op("ReduceMax", b.cast(b.op("Equal", x, test), "bool", "i32"), b.i64(-1), keepdims=0)
    y = b.cast(hit, "i32", "bool")
    return [b.op("Not", y, hint="isin") if a.value("invert") else y]


def to_torch_dtype(name: str):
    from ..ir.dtypes import to_torch
    from ..ir.types import DType

    return to_torch(DType(name))


def _symbolic(x) -> bool:
    if isinstance(x, sympy.Basic):
        return not x.is_Number
    if isinstance(x, (list, tuple)):
        return any(_symbolic(y) for y in x)
    if isinstance(x, dict):
        return any(_symbolic(y) for y in x.values())
    return False


def _summary(e: Exception) -> str:
    """The informative line of a torch.onnx error (it puts the cause under '## Exception summary')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def via_torch_exporter(L, node: Node) -> list:
    """Export the one torch op with torch.onnx.export (dynamo) at symbolic B/T and splice its graph in.

    Raises OnnxUnsupportedOpError when torch's exporter cannot, or when its result is not plain
    standard ONNX that keeps the dims dynamic.
    """
    import contextlib
    import io
    import logging
    import warnings

    import onnx
    import onnx.inliner
    from onnx import numpy_helper
    from torch.export import Dim

    from ..semantics import fill_refs, resolve_target
    from ..ir.dtypes import to_torch

    target = node.attrs["target"]
    outs = ", ".join("%" + v.name for v in node.outputs)
    args, kwargs = node.attrs["args"], node.attrs["kwargs"]
    if _symbolic(args) or _symbolic(kwargs) or any(_symbolic(x) for x in node.inputs if not isinstance(x, Value)):
        raise OnnxUnsupportedOpError(f"fallback op {target} ({outs}) has symbolic arguments; torch's exporter "
                                     "would bake one value of them into the file")
    fn = resolve_target(target)
    tensor_at = [i for i, x in enumerate(node.inputs) if isinstance(x, Value)]
    literals = list(node.inputs)

    class OneOp(torch.nn.Module):
        def forward(self, *tensors):
            operands = list(literals)
            for i, t in zip(tensor_at, tensors):
                operands[i] = t
            return fn(*fill_refs(args, operands), **fill_refs(kwargs, operands))

    sizes, dims = {"B": 3, "T": 7}, {}
    examples, dynamic = [], []
    for i in tensor_at:
        t = node.inputs[i].type
        spec, shape = {}, []
        for axis, d in enumerate(t.shape):
            if isinstance(d, sympy.Symbol):
                spec[axis] = dims.setdefault(d.name, Dim(d.name, min=1))
                shape.append(sizes.get(d.name, 5))
            elif isinstance(d, sympy.Basic) and not d.is_Integer:
                raise OnnxUnsupportedOpError(f"fallback op {target} ({outs}): operand dim {d} is an expression; "
                                             "torch's exporter route needs plain symbols or ints")
            else:
                shape.append(int(d))
        dt = to_torch(t.dtype)
        examples.append(torch.randn(shape).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
        dynamic.append(spec or None)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(OneOp(), tuple(examples), dynamo=True, dynamic_shapes=(tuple(dynamic),),
                                     opset_version=L.b.opset, verbose=False)
        model = onnx.inliner.inline_local_functions(prog.model_proto)
    except Exception as e:
        raise OnnxUnsupportedOpError(
            f"fallback op {target} ({outs}) has no ONNX lowering: it is not in the exporter's table "
            "(semantics/fallback_forms.py, export/onnx_fallback.py) and torch.onnx.export failed on it "
            f"({_summary(e)}). Rewrite that line with ops the exports lower (docs/exports.md lists them; "
            "`explain()` shows the ops that fell back), or keep it out of the exported module") from e
    finally:
        quiet.setLevel(level)
    g = model.graph
    bad = [n.op_type for n in g.node if n.domain not in ("", "ai.onnx") or any(a.g.node or a.graphs for a in n.attribute)]
    if bad or len(g.input) != len(tensor_at) or len(g.output) != len(node.outputs):
        raise OnnxUnsupportedOpError(f"fallback op {target} ({outs}): torch.onnx.export made a graph this exporter "
                                     f"cannot splice in (ops {bad}, {len(g.input)} inputs, {len(g.output)} outputs)")
    _check_against_torch(model, OneOp(), examples, target, outs,
                         values=torch.Tag.nondeterministic_seeded not in getattr(fn, "tags", ()))
    b = L.b
    prefix = target.split(".")[1]
    rename = {"": ""}
    for gi, i in zip(g.input, tensor_at):
        rename[gi.name] = L.get(node, i)
    for init in g.initializer:
        rename[init.name] = b.initializer(numpy_helper.to_array(init), f"{prefix}.{init.name}")
    for n in g.node:
        new = onnx.NodeProto()
        new.CopyFrom(n)
        del new.input[:]
        new.input.extend(rename[x] for x in n.input)
        del new.output[:]
        for o in n.output:
            rename[o] = b.names.fresh(f"{prefix}.{o}") if o else ""
        new.output.extend(rename[o] for o in n.output)
        new.name = b.names.fresh(f"n_{prefix}")
        b.nodes.append(new)
    res = []
    for go, v in zip(g.output, node.outputs):
        have = {code: name for name, code in ONNX_DTYPE.items()}
        res.append(b.cast(rename[go.name], have[go.type.tensor_type.elem_type], v.type.dtype.name))
    return res


def _check_against_torch(model, op, examples: list, target: str, outs: str, values: bool = True) -> None:
    """torch.onnx.export's graph of one op, run in onnxruntime on the op's example operands, against torch: its
    exporter has exported ops to other values (scatter_reduce's "mean", in torch 2.13) or to graphs onnxruntime
    cannot run (Where on bool). Checked whether or not the export is validated as a whole; a random op's values
    (``values=False``) are not compared."""
    import numpy as np
    import onnxruntime as ort

    with torch.no_grad():
        want = op(*examples)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), examples)})
    except Exception as e:  # noqa: BLE001 - onnxruntime cannot run it: no lowering of ours
        raise OnnxUnsupportedOpError(f"fallback op {target} ({outs}): torch.onnx.export's graph for it does not run "
                                     f"in onnxruntime ({_summary(e)})") from e
    for g, w in zip(got, want if values else []):
        w = w.detach().to(torch.float64 if w.is_floating_point() else w.dtype).numpy()
        g = np.asarray(g)
        same = g.shape == w.shape and (np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-4,
                                                   atol=1e-5, equal_nan=True) if w.dtype.kind in "fc"
                                       else np.array_equal(g, w))
        if not same:
            raise OnnxUnsupportedOpError(f"fallback op {target} ({outs}): torch.onnx.export's graph for it gives other "
                                         "values than torch on a sample, so it is not exported. Rewrite that line with "
                                         "ops the exports lower (docs/exports.md)")


def lower_fallback(L, node: Node) -> list:
    target = node.attrs["target"]
    fn = FORM_LOWERINGS.get(FORMS.get(target), FALLBACKS.get(target))
    outs = ", ".join("%" + v.name for v in node.outputs)
    if fn is None:
        from ..ir.ops import FALLBACK_ADVICE

        if target in FALLBACK_ADVICE:
            raise OnnxUnsupportedOpError(f"export_onnx: fallback op {target} ({outs}) has no ONNX lowering: "
                                         f"{FALLBACK_ADVICE[target]}")
        return via_torch_exporter(L, node)
    try:
        a = Args(L, node)
    except Exception as e:
        raise OnnxExportError(f"fallback op {target} ({outs}): cannot bind its arguments: {e}") from e
    res = fn(L, node, a)
    if len(res) != len(node.outputs):
        raise OnnxExportError(f"fallback op {target} ({outs}): lowering made {len(res)} outputs, "
                              f"the node has {len(node.outputs)}")
    return res
