"""``fallback`` nodes (aten ops with no IR op) in Relax, for export_tvm and compile(backend="tvm")'s whole graph.

One lowering per form of semantics/fallback_forms.py (export/onnx_fallback.py lowers the same forms to ONNX);
a fallback whose target is not in that table has no TVM form and export_tvm names it. Dtypes follow the
node's output (torch's promotion: a cumsum or prod of a bool / integer tensor is int64); dims may be symbolic.
"""
from __future__ import annotations

import sympy

from ...errors import UnsupportedError
from ...ir.dtypes import TVM_NAME as RELAX_DTYPE
from ...ir.ops import ArgRef
from ...semantics.fallback_forms import FORMS, bind, leading_indices, pad_widths, reduced_dims

RELAX_FORMS: dict = {}


def form(*names):
    def deco(fn):
        for n in names:
            RELAX_FORMS[n] = fn
        return fn
    return deco


def lowers(node) -> bool:
    return FORMS.get(node.attrs["target"]) in RELAX_FORMS


def lower_fallback(lw, node) -> list:
    """The Relax expressions of the node's outputs."""
    fn = RELAX_FORMS[FORMS[node.attrs["target"]]]
    out = fn(_Args(lw, node))
    return out if isinstance(out, list) else [out]


class _Args:
    def __init__(self, lw, node):
        self.lw, self.node, self.op = lw, node, lw.relax.op
        self.values = bind(node)
        self.form = FORMS[node.attrs["target"]]

    def value(self, name):
        return self.values.get(name)

    def type(self, name):
        return self.node.inputs[self.values[name].index].type

    def tensor(self, name, dtype: str | None = None):
        """A tensor argument (cast to the IR dtype ``dtype`` when given) or a scalar one as a constant."""
        v = self.values[name]
        if isinstance(v, ArgRef):
            x = self.node.inputs[v.index]
            return self.lw.cast(self.lw.env[x], x, RELAX_DTYPE[dtype]) if dtype else self.lw.env[x]
        if dtype is None:
            raise UnsupportedError(f"fallback {self.node.attrs['target']}: argument {name} is not a tensor ({v!r})")
        if isinstance(v, sympy.Basic) and not v.is_Number:   # a size (ids % T): a 0-d tensor holding it
            return self.lw.operand(v, RELAX_DTYPE[dtype])
        return self.const(v, dtype)

    def const(self, v, dtype: str):
        rd = RELAX_DTYPE[dtype]
        v = bool(v) if rd == "bool" else float(v) if "float" in rd else int(v)
        return self.lw.relax.const(v, rd)

    def dim(self, name: str) -> int:
        return int(self.values[name]) % max(self.type("self").rank, 1)

    def out(self, i: int = 0) -> str:
        return self.node.outputs[i].type.dtype.name

    def emit(self, expr):
        return self.lw.bb.emit(expr)


def _compute(dt: str) -> str:
    return "f32" if dt in ("f16", "bf16") else dt


def _back(a: _Args, y, cd: str, dt: str):
    return y if cd == dt else a.op.astype(a.emit(y), RELAX_DTYPE[dt])


@form("cumsum", "cumprod")
def _cumulative(a: _Args):
    dt = a.out()
    cd = _compute(dt)
    fn = a.op.cumsum if a.form == "cumsum" else a.op.cumprod
    return _back(a, fn(a.tensor("self", cd), axis=a.dim("dim"), dtype=RELAX_DTYPE[cd]), cd, dt)


@form("flip")
def _flip(a: _Args):
    y = a.tensor("self")
    rank = a.type("self").rank
    for d in a.value("dims"):
        y = a.emit(a.op.flip(y, int(d) % rank))
    return y


def _in_range(a: _Args, idx, size):
    """Indices clamped to [0, size): TVM's gather reads out of bounds on a bad index where torch raises (as for
    embedding, an out-of-range index is clamped instead: no crash, no stray read)."""
    op = a.op
    hi = a.lw.operand(sympy.sympify(size) - 1, "int64")
    return a.emit(op.minimum(op.maximum(idx, a.const(0, "i64")), hi))


@form("logaddexp")
def _logaddexp(a: _Args):
    """torch's: a where a == b is infinite (no inf - inf), else max(a, b) + log1p(exp(-|a - b|)) (NaN in, NaN
    out: |a - b| is NaN)."""
    op = a.op
    dt = a.out()
    cd = _compute(dt)
    x, y = a.tensor("self", cd), a.tensor("other", cd)
    u = a.emit(op.exp(op.negative(op.abs(op.subtract(x, y)))))   # in [0, 1]: log1p(u) as Goldberg's, from log
    w = a.emit(op.add(a.const(1.0, cd), u))
    wm1 = a.emit(op.subtract(w, a.const(1.0, cd)))
    same = a.emit(op.equal(wm1, a.const(0.0, cd)))
    log1p = op.where(same, u, op.divide(op.multiply(op.log(w), u), op.where(same, a.const(1.0, cd), wm1)))
    r = a.emit(op.add(op.maximum(x, y), log1p))
    return _back(a, op.where(op.logical_and(op.isinf(x), op.equal(x, y)), x, r), cd, dt)


@form("index")
def _index(a: _Args):
    """x[i0, ..., ik-1] with integer index tensors over the leading dims (broadcast together; negative indices
    count from the end, like torch; out-of-range ones clamped, as for gather): gather_nd over the stacked indices."""
    op, lw = a.op, a.lw
    t = a.type("self")
    idx, why = leading_indices(a.node, a.values)
    if why:
        raise UnsupportedError(f"TVM export: fallback aten.index.Tensor: {why} (docs/exports.md)")
    out = list(a.node.outputs[0].type.shape)
    lead = out[:len(out) - (t.rank - len(idx))]
    cols = []
    for j, ref in enumerate(idx):
        v = a.node.inputs[ref.index]
        i = lw.cast(lw.env[v], v, "int64")
        i = a.emit(op.where(op.less(i, a.const(0, "i64")), op.add(i, lw.operand(sympy.sympify(t.shape[j]), "int64")), i))
        i = _in_range(a, i, t.shape[j])
        if list(v.type.shape) != lead:
            i = a.emit(op.broadcast_to(i, [lw.dim(d) for d in lead]))
        cols.append(a.emit(op.expand_dims(i, -1)))
    stacked = cols[0] if len(cols) == 1 else a.emit(op.concat(cols, axis=-1))
    return op.gather_nd(a.tensor("self"), stacked)


@form("index_fill")
def _index_fill(a: _Args):
    """x with the entries at the given indices along dim set to value: where over a mask along the dim."""
    op, lw = a.op, a.lw
    t = a.type("self")
    dt = a.out()
    dim = a.dim("dim")
    n = t.shape[dim]
    idx = a.emit(op.reshape(a.tensor("index", "i64"), [1, -1]))
    idx = a.emit(op.where(op.less(idx, a.const(0, "i64")), op.add(idx, lw.operand(sympy.sympify(n), "int64")), idx))
    pos = a.emit(op.expand_dims(op.arange(0, lw.dim(n), 1, dtype="int64"), -1))
    hit = a.emit(op.max(a.emit(op.astype(op.equal(pos, idx), "int32")), axis=[1]))
    shape = [1] * t.rank
    shape[dim] = lw.dim(n)
    mask = a.emit(op.reshape(op.greater(hit, a.const(0, "i32")), shape))
    return op.where(mask, a.tensor("value", dt), a.tensor("self", dt))


@form("pad")
def _pad(a: _Args):
    """F.pad in mode replicate, reflect, circular or constant: Relax's nn.pad."""
    t = a.type("self")
    widths, mode, why = pad_widths(a.values, t.rank)
    if why:
        raise UnsupportedError(f"TVM export: fallback aten.pad.default: {why} (docs/exports.md)")
    value = a.value("value")
    flat = [w for pair in widths for w in pair]
    return a.op.nn.pad(a.tensor("self"), flat, pad_mode=mode, pad_value=float(value or 0.0))


@form("embedding")
def _embedding(a: _Args):
    """The weight's rows at the indices (padding_idx and the other arguments only change the gradient); an
    out-of-range index is clamped, as for the IR's embedding."""
    return a.op.take(a.tensor("weight"), a.tensor("indices", "i64"), axis=0, mode="clip")


@form("gather")
def _gather(a: _Args):
    dim = a.dim("dim")
    idx = _in_range(a, a.tensor("index", "i64"), a.type("self").shape[dim])
    return a.op.gather_elements(a.tensor("self"), idx, axis=dim)


@form("take_along_dim")
def _take_along_dim(a: _Args):
    op, lw = a.op, a.lw
    x, idx = a.tensor("self"), a.tensor("indices", "i64")
    t, it = a.type("self"), a.type("indices")
    if a.value("dim") is None:
        idx = _in_range(a, a.emit(op.reshape(idx, [-1])), sympy.Mul(*t.shape))
        return op.gather_elements(a.emit(op.reshape(x, [-1])), idx, axis=0)
    dim = a.dim("dim")
    idx = _in_range(a, idx, t.shape[dim])
    out = list(a.node.outputs[0].type.shape)
    want_x = out[:dim] + [t.shape[dim]] + out[dim + 1:]
    if list(t.shape) != want_x:
        x = a.emit(op.broadcast_to(x, [lw.dim(d) for d in want_x]))
    if list(it.shape) != out:
        idx = a.emit(op.broadcast_to(idx, [lw.dim(d) for d in out]))
    return op.gather_elements(x, idx, axis=dim)


@form("index_select")
def _index_select(a: _Args):
    idx = a.tensor("index", "i64")
    if a.type("index").rank == 0:
        idx = a.emit(a.op.reshape(idx, [1]))
    # "clip": an out-of-range index must not read out of bounds (TVM's "fast" mode has no check)
    return a.op.take(a.tensor("self"), idx, axis=a.dim("dim"), mode="clip")


def _arg_extreme(a: _Args, x, axis: int, largest: bool, dtype):
    """torch's argmax / argmin along ``axis`` (kept, size 1): the first index of the extreme, a NaN counting as
    the extreme. Relax's own argmax skips NaN and answers -1 on a row of -inf (its start value), so it is asked
    only for the first 1 of an int32 mask: where x equals the row's max (min), or is NaN in a row holding one."""
    op = a.op
    hit = op.equal(x, a.emit((op.max if largest else op.min)(x, axis=axis, keepdims=True)))
    if dtype.is_float:
        nan = a.emit(op.isnan(x))
        any_nan = a.emit(op.greater(op.max(op.astype(nan, "int32"), axis=axis, keepdims=True), a.const(0, "i32")))
        hit = op.where(any_nan, nan, hit)
    return a.emit(op.argmax(a.emit(op.astype(a.emit(hit), "int32")), axis=axis, keepdims=True))


@form("argmax", "argmin")
def _argmax(a: _Args):
    op = a.op
    keep = bool(a.value("keepdim"))
    x, t = a.tensor("self"), a.type("self")
    if a.value("dim") is None:
        y = a.emit(op.reshape(_arg_extreme(a, a.emit(op.reshape(x, [-1])), 0, a.form == "argmax", t.dtype), []))
        y = op.reshape(y, [1] * t.rank) if keep else y
    else:
        dim = a.dim("dim")
        y = _arg_extreme(a, x, dim, a.form == "argmax", t.dtype)
        y = y if keep else op.squeeze(y, [dim])
    return op.astype(a.emit(y), RELAX_DTYPE[a.out()])


def _sort_key(a: _Args, x, t):
    """What TVM sorts by: x with NaN as +inf (torch sorts NaN above everything; TVM's comparisons skip it). Only
    the order of a NaN against a +inf in one row can still differ from torch's."""
    if not t.dtype.is_float:
        return x
    op = a.op
    return a.emit(op.where(op.isnan(x), a.const(float("inf"), t.dtype.name), x))


@form("topk")
def _topk(a: _Args):
    k = a.value("k")
    x, dim, largest = a.tensor("self"), a.dim("dim"), bool(a.value("largest"))
    key = _sort_key(a, x, a.type("self"))
    if isinstance(k, int):
        idx = a.emit(a.lw.relax.TupleGetItem(a.emit(a.op.topk(key, k=k, axis=dim, ret_type="both", largest=largest,
                                                             dtype="int64")), 1))
    else:   # k from the input's size (x.topk(T // 2)): Relax's topk takes a constant k, so the first k of a sort
        idx = a.emit(a.op.argsort(key, axis=dim, descending=largest, dtype="int64"))
        idx = a.emit(a.op.strided_slice(idx, axes=[dim], begin=[0], end=[a.lw.dim(k)], assume_inbound=True))
        shape = [a.lw.dim(d) for d in a.node.outputs[1].type.shape]
        idx = a.lw.bb.match_cast(idx, a.lw.relax.TensorType(shape, "int64"))
    return [a.op.gather_elements(x, idx, axis=dim), idx]   # the values at the indices: one order for both


@form("sort", "argsort")
def _sort(a: _Args):
    x, dim, desc = a.tensor("self"), a.dim("dim"), bool(a.value("descending"))
    idx = a.op.argsort(_sort_key(a, x, a.type("self")), axis=dim, descending=desc, dtype="int64")
    if a.form == "argsort":
        return idx
    idx = a.emit(idx)
    return [a.op.gather_elements(x, idx, axis=dim), idx]


@form("atan2")
def _atan2(a: _Args):
    dt = a.out()
    cd = _compute(dt)
    return _back(a, a.op.atan2(a.tensor("self", cd), a.tensor("other", cd)), cd, dt)


@form("remainder", "fmod")
def _remainder(a: _Args):
    """fmod: Relax's mod (C's fmod, the dividend's sign); remainder: the divisor's sign, as torch computes it
    (fmod, plus the divisor where the signs differ), so floats match torch to the bit."""
    op = a.op
    dt = a.out()
    cd = _compute(dt)
    x, y = a.tensor("self", cd), a.tensor("other", cd)
    if a.form == "fmod":
        return _back(a, op.mod(x, y), cd, dt)
    if not cd.startswith("f"):
        return op.floor_mod(x, y)
    m = a.emit(op.mod(x, y))
    zero = a.const(0, cd)
    fix = op.logical_and(op.not_equal(m, zero), op.logical_xor(op.less(m, zero), op.less(y, zero)))
    return _back(a, op.where(fix, op.add(m, y), m), cd, dt)


@form("nan_to_num")
def _nan_to_num(a: _Args):
    import torch

    from ...ir.dtypes import to_torch
    from ...ir.types import DType

    op = a.op
    dt = a.out()
    x = a.tensor("self", dt)
    if not DType(dt).is_float:
        return x
    info = torch.finfo(to_torch(DType(dt)))
    nan, pos, neg = a.value("nan"), a.value("posinf"), a.value("neginf")
    y = op.where(op.isnan(x), a.const(0.0 if nan is None else nan, dt), x)
    inf = op.isinf(x)
    y = op.where(op.logical_and(inf, op.greater(x, a.const(0.0, dt))), a.const(info.max if pos is None else pos, dt), y)
    return op.where(op.logical_and(inf, op.less(x, a.const(0.0, dt))), a.const(info.min if neg is None else neg, dt), y)


def _axes(a: _Args):
    return reduced_dims(a.values, a.type("self").rank), bool(a.value("keepdim"))


@form("any", "all")
def _any_all(a: _Args):
    op = a.op
    t = a.type("self")
    x = a.tensor("self")
    truth = x if t.dtype.name == "bool" else op.not_equal(x, a.const(0, t.dtype.name))
    axes, keep = _axes(a)
    fn = op.max if a.form == "any" else op.min
    y = a.emit(fn(a.emit(op.astype(truth, "int32")), axis=axes, keepdims=keep and axes is not None))
    return op.astype(y, RELAX_DTYPE[a.out()])


@form("prod")
def _prod(a: _Args):
    dt = a.out()
    cd = _compute(dt)
    axes, keep = _axes(a)
    return _back(a, a.op.prod(a.tensor("self", cd), axis=axes, keepdims=keep and axes is not None), cd, dt)



@form("max_dim", "min_dim")
def _max_dim(a: _Args):
    """The values at the argmax / argmin index (first one), so values and indices agree."""
    op = a.op
    dim, keep = a.dim("dim"), bool(a.value("keepdim"))
    x = a.tensor("self")
    idx = a.emit(op.astype(_arg_extreme(a, x, dim, a.form == "max_dim", a.type("self").dtype), "int64"))
    val = a.emit(op.gather_elements(x, idx, axis=dim))
    if not keep:
        idx, val = a.emit(op.squeeze(idx, [dim])), a.emit(op.squeeze(val, [dim]))
    return [val, idx]


@form("isnan", "isinf", "isfinite")
def _isnan(a: _Args):
    op = a.op
    x = a.tensor("self")
    if not a.type("self").dtype.is_float:   # an integer is never NaN or infinite
        same = op.equal(x, x)
        return same if a.form == "isfinite" else op.logical_not(same)
    return {"isnan": op.isnan, "isinf": op.isinf, "isfinite": op.isfinite}[a.form](x)


def _truth(a: _Args, name: str):
    t = a.type(name)
    x = a.tensor(name)
    return x if t.dtype.name == "bool" else a.emit(a.op.not_equal(x, a.const(0, t.dtype.name)))


@form("logical_xor")
def _logical_xor(a: _Args):
    y = a.op.logical_xor(_truth(a, "self"), _truth(a, "other"))
    return y if a.out() == "bool" else a.op.astype(a.emit(y), RELAX_DTYPE[a.out()])


@form("trunc", "frac")
def _trunc(a: _Args):
    op = a.op
    dt = a.out()
    x = a.tensor("self", dt)
    if not dt.startswith(("f", "bf")):
        return x if a.form == "trunc" else op.subtract(x, x)
    t = a.emit(op.trunc(x))
    return t if a.form == "trunc" else op.subtract(x, t)


def _floor_div(a: _Args, x, y, cd: str):
    """torch's floor division (see export/onnx_fallback.py: _floor_div): integers as Python's //; floats from
    fmod as torch computes them, NaN / inf for a zero divisor."""
    op = a.op
    if not cd.startswith("f"):
        return op.floor_divide(x, y)
    zero, one = a.const(0, cd), a.const(1, cd)
    m = a.emit(op.mod(x, y))
    div = a.emit(op.divide(op.subtract(x, m), y))
    fix = op.logical_and(op.not_equal(m, zero), op.logical_xor(op.less(m, zero), op.less(y, zero)))
    div = a.emit(op.where(fix, op.subtract(div, one), div))
    fl = a.emit(op.floor(div))
    fl = a.emit(op.where(op.greater(op.subtract(div, fl), a.const(0.5, cd)), op.add(fl, one), fl))
    true_div = a.emit(op.divide(x, y))
    fl = a.emit(op.where(op.equal(div, zero), op.multiply(zero, true_div), fl))   # a signed zero
    return op.where(op.equal(y, zero), true_div, fl)


@form("floor_divide", "div_mode")
def _div_mode(a: _Args):
    op = a.op
    dt = a.out()
    cd = _compute(dt)
    x, y = a.tensor("self", cd), a.tensor("other", cd)
    mode = "floor" if a.form == "floor_divide" else a.value("rounding_mode")
    if mode == "floor":
        q = _floor_div(a, x, y, cd)
    elif mode == "trunc" and cd.startswith("f"):
        q = op.trunc(a.emit(op.divide(x, y)))
    else:   # trunc of integers (Relax's integer divide truncates), or true division
        q = op.divide(x, y)
    return _back(a, q, cd, dt)


@form("count_nonzero")
def _count_nonzero(a: _Args):
    dims = reduced_dims(a.values, a.type("self").rank)
    return a.op.sum(a.emit(a.op.astype(_truth(a, "self"), "int64")), axis=dims, keepdims=False)


@form("one_hot")
def _one_hot(a: _Args):
    n = a.value("num_classes")
    if not isinstance(n, int) or n < 1:
        raise UnsupportedError(f"TVM export: one_hot with num_classes={n}: the export needs the number of classes; "
                               "pass num_classes=")
    y = a.emit(a.op.one_hot(a.tensor("self", "i64"), 1, 0, n, axis=-1))
    return a.op.astype(y, "int64")


@form("scatter", "scatter_add")
def _scatter(a: _Args):
    """scatter_elements; the updates take the index's shape (a scalar value broadcast, a larger src sliced, as
    torch reads only src[:index.shape]); indices clamped into range like gather's."""
    op, lw = a.op, a.lw
    t, it = a.type("self"), a.type("index")
    dt = a.out()
    dim = a.dim("dim")
    shape = [lw.dim(d) for d in it.shape]
    idx = _in_range(a, a.tensor("index", "i64"), t.shape[dim])
    if "value" in a.values:
        upd = a.emit(op.broadcast_to(a.tensor("value", dt), shape))
    else:
        upd = a.tensor("src", dt)
        if list(a.type("src").shape) != list(it.shape):
            upd = a.emit(op.strided_slice(upd, axes=list(range(it.rank)), begin=[0] * it.rank, end=shape,
                                          assume_inbound=True))
            upd = lw.bb.match_cast(upd, lw.relax.TensorType(shape, RELAX_DTYPE[dt]))
    reduction = "add" if a.form == "scatter_add" else "update"
    return op.scatter_elements(a.tensor("self", dt), idx, upd, axis=dim, reduction=reduction)


@form("roll")
def _roll(a: _Args):
    """torch.roll: per (shift, dim), the last shift % n elements moved to the front (n may be symbolic); no
    dims: over the flattened tensor, then back to the shape."""
    op, lw = a.op, a.lw
    t = a.type("self")
    x = a.tensor("self")
    shifts, dims = list(a.value("shifts")), list(a.value("dims") or [])
    shape = list(t.shape)
    if not dims:
        shape = [sympy.Mul(*t.shape)]
        x, dims = a.emit(op.reshape(x, [lw.dim(shape[0])])), [0]
    for s, d in zip(shifts, dims):
        d = int(d) % len(shape)
        n = sympy.sympify(shape[d])
        k = n - sympy.Mod(sympy.sympify(s), n)   # the first index of the moved tail (n when s % n == 0)
        tail = a.emit(op.strided_slice(x, axes=[d], begin=[lw.dim(k)], end=[lw.dim(n)], assume_inbound=True))
        head = a.emit(op.strided_slice(x, axes=[d], begin=[0], end=[lw.dim(k)], assume_inbound=True))
        x = a.emit(op.concat([tail, head], axis=d))
        x = lw.bb.match_cast(x, lw.relax.TensorType([lw.dim(e) for e in shape], RELAX_DTYPE[t.dtype.name]))
    return op.reshape(x, [lw.dim(e) for e in t.shape]) if not a.value("dims") else x


@form("bucketize")
def _bucketize(a: _Args):
    """The number of boundaries below x (at or below, right=True): each element against the 1-D boundaries."""
    op = a.op
    x = a.emit(op.expand_dims(a.tensor("self"), -1))
    bounds = a.tensor("boundaries", a.type("self").dtype.name)
    below = (op.less_equal if a.value("right") else op.less)(bounds, x)
    y = a.emit(op.sum(a.emit(op.astype(below, "int64")), axis=[-1]))
    return op.astype(y, RELAX_DTYPE[a.out()])


@form("isin")
def _isin(a: _Args):
    op = a.op
    x = a.emit(op.expand_dims(a.tensor("elements"), -1))
    test = a.emit(op.reshape(a.tensor("test_elements", a.type("elements").dtype.name), [-1]))
    hit = a.emit(op.max(a.emit(op.astype(op.equal(x, test), "int32")), axis=[-1]))
    y = a.emit(op.greater(hit, a.const(0, "i32")))
    return op.logical_not(y) if a.value("invert") else y


def _scan_kernel(a: _Args, x, axis: int, kind: str, cd: str, name: str):
    """A sequential scan along ``axis`` as one TIR kernel (te.extern, parallel over the other elements, like TVM's
    own cumsum), emitted with call_tir: Relax has no cummax / cummin / logcumsumexp. Each step is torch's:
    cummax / cummin take x where x is NaN or the running value is not NaN and x >= it (<=): ties take the LAST
    index and a NaN sticks; logcumsumexp adds x with lo, hi the smaller and larger of (run, x) (NaN if either is)
    as hi + log1p(exp(lo - hi)), unless lo == hi is infinite (the run stays: no inf - inf). Shapes may be
    symbolic; the first step reads nothing before it (a zero-length axis writes nothing)."""
    from tvm import te, tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    is_float = "float" in cd

    def build(data):
        shape = list(data.shape)
        n = shape[axis]
        before, after = 1, 1
        for i, d in enumerate(shape):
            if i < axis:
                before = before * d
            elif i > axis:
                after = after * d

        def gen(ins, outs):
            with IRBuilder() as ib:
                xs = T.buffer_proxy(ins[0])
                vs = T.buffer_proxy(outs[0])
                ix = T.buffer_proxy(outs[1]) if len(outs) > 1 else None
                with T.parallel(0, before * after) as fused:
                    base = (fused // after) * n * after + fused % after
                    with T.serial(0, n) as k:
                        cur = base + k * after
                        prev = base + tirx.max(k - 1, 0) * after
                        first = k == 0
                        xk = xs[cur]
                        if kind == "lse":
                            run = tirx.Select(first, tirx.const(-float("inf"), cd), vs[prev])
                            nan = tirx.Or(tirx.isnan(run), tirx.isnan(xk))
                            lo = tirx.Select(nan, run + xk, tirx.Select(xk < run, xk, run))
                            hi = tirx.Select(nan, run + xk, tirx.Select(xk < run, run, xk))
                            general = tirx.Or(tirx.Or(nan, lo != hi), tirx.isfinite(lo))
                            vs[cur] = tirx.Select(general, hi + tirx.log1p(tirx.exp(lo - hi)), run)
                        else:
                            run = vs[prev]
                            better = xk >= run if kind == "max" else xk <= run
                            if is_float:
                                better = tirx.Or(tirx.isnan(xk), tirx.And(tirx.Not(tirx.isnan(run)), better))
                            take = tirx.Or(first, better)
                            vs[cur] = tirx.Select(take, xk, run)
                            ix[cur] = tirx.Select(take, tirx.Cast("int64", k), ix[prev])
                return ib.get()

        outs = [shape] if kind == "lse" else [shape, shape]
        dtypes = [cd] if kind == "lse" else [cd, "int64"]
        return te.extern(outs, [data], gen, dtype=dtypes, name=name, tag=name)

    return a.lw.bb.emit_te(build, x, primfunc_name_hint=name)


@form("cummax", "cummin")
def _cummax(a: _Args):
    t = a.type("self")
    dt = a.out()
    if t.rank == 0:
        return [a.tensor("self"), a.const(0, "i64")]
    cd = "int32" if dt == "bool" else RELAX_DTYPE[_compute(dt)]
    x = a.tensor("self")
    if cd != RELAX_DTYPE[dt]:
        x = a.emit(a.op.astype(x, cd))
    y = _scan_kernel(a, x, a.dim("dim"), "max" if a.form == "cummax" else "min", cd, a.form)
    tgi = a.lw.relax.TupleGetItem
    vals, idx = a.emit(tgi(y, 0)), a.emit(tgi(y, 1))
    return [vals if cd == RELAX_DTYPE[dt] else a.op.astype(vals, RELAX_DTYPE[dt]), idx]


@form("logcumsumexp")
def _logcumsumexp(a: _Args):
    t = a.type("self")
    dt = a.out()
    cd = _compute(dt)
    x = a.tensor("self", cd)
    if t.rank == 0:
        return _back(a, x, cd, dt)
    return _back(a, _scan_kernel(a, x, a.dim("dim"), "lse", RELAX_DTYPE[cd], "logcumsumexp"), cd, dt)
