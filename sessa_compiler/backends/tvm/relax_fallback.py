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
from ...semantics.fallback_forms import FORMS, bind, reduced_dims

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


@form("argmax", "argmin")
def _argmax(a: _Args):
    fn = a.op.argmax if a.form == "argmax" else a.op.argmin
    keep = bool(a.value("keepdim"))
    x = a.tensor("self")
    if a.value("dim") is None:
        y = a.emit(fn(a.emit(a.op.reshape(x, [-1])), axis=0))
        y = a.op.reshape(y, [1] * a.type("self").rank) if keep else y
    else:
        y = fn(x, axis=a.dim("dim"), keepdims=keep)
    return a.op.astype(a.emit(y), RELAX_DTYPE[a.out()])


@form("topk")
def _topk(a: _Args):
    k = a.value("k")
    x, dim, largest = a.tensor("self"), a.dim("dim"), bool(a.value("largest"))
    if isinstance(k, int):
        both = a.emit(a.op.topk(x, k=k, axis=dim, ret_type="both", largest=largest, dtype="int64"))
        return [a.lw.relax.TupleGetItem(both, 0), a.lw.relax.TupleGetItem(both, 1)]
    # k from the input's size (x.topk(T // 2)): Relax's topk takes a constant k, so the first k of a sort
    idx = a.emit(a.op.argsort(x, axis=dim, descending=largest, dtype="int64"))
    idx = a.emit(a.op.strided_slice(idx, axes=[dim], begin=[0], end=[a.lw.dim(k)], assume_inbound=True))
    shape = [a.lw.dim(d) for d in a.node.outputs[1].type.shape]
    idx = a.lw.bb.match_cast(idx, a.lw.relax.TensorType(shape, "int64"))
    return [a.op.gather_elements(x, idx, axis=dim), idx]


@form("sort", "argsort")
def _sort(a: _Args):
    x, dim, desc = a.tensor("self"), a.dim("dim"), bool(a.value("descending"))
    idx = a.op.argsort(x, axis=dim, descending=desc, dtype="int64")
    if a.form == "argsort":
        return idx
    idx = a.emit(idx)
    return [a.op.gather_elements(x, idx, axis=dim), idx]   # the values at the indices: one order for both


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

