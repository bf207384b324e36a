"""``fallback`` ops (torch ops the frontend did not map to an IR op) in standard ONNX.

A small table keyed by the torch target; the arguments are bound to the op's schema names (defaults
filled in), so each entry reads like the torch signature. A target outside the table is exported on its
own by torch.onnx.export (dynamo, dynamic B/T) and spliced in when that yields plain standard ONNX;
otherwise the export fails with an OnnxUnsupportedOpError naming the target.
"""
from __future__ import annotations

from collections.abc import Callable

import sympy
import torch

from ..ir.graph import Node, Value
from ..ir.ops import ArgRef
from .onnx_builder import INT64_MAX, ONNX_DTYPE, OnnxExportError, OnnxUnsupportedOpError, out_dtype

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
        from ..semantics import resolve_target

        self.L, self.node = L, node
        schema = resolve_target(node.attrs["target"])._schema
        args, kwargs = list(node.attrs["args"]), dict(node.attrs["kwargs"])
        self.values: dict = {}
        for i, a in enumerate(schema.arguments):
            if i < len(args):
                self.values[a.name] = args[i]
            elif a.name in kwargs:
                self.values[a.name] = kwargs[a.name]
            elif a.has_default_value():
                self.values[a.name] = a.default_value

    def value(self, name: str):
        return self.values.get(name)

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


@fallback("aten.cumsum.default")
def _cumsum(L, node, a: Args):
    dt = out_dtype(node)
    cd = "f32" if dt in ("f16", "bf16") else dt  # onnxruntime's CumSum has no half kernels
    x = a.tensor("self", cd)
    y = L.b.op("CumSum", x, L.b.scalar(a.dims("dim", a.type("self").rank)[0], "i64"), hint="cumsum")
    return [L.b.cast(y, cd, dt)]


@fallback("aten.flip.default")
def _flip(L, node, a: Args):
    b = L.b
    axes = a.dims("dims", a.type("self").rank)
    k = len(axes)
    return [b.op("Slice", a.tensor("self"), b.i64(*([-1] * k)), b.i64(*([-INT64_MAX] * k)), b.i64(*axes),
                 b.i64(*([-1] * k)), hint="flip")]


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


@fallback("aten.sort.default")
def _sort(L, node, a: Args):
    b = L.b
    t = a.type("self")
    dim = a.dims("dim", t.rank)[0]
    k = b.op("Shape", a.tensor("self"), start=dim, end=dim + 1)
    values, indices = b.op("TopK", a.tensor("self"), k, axis=dim, largest=int(bool(a.value("descending"))),
                           sorted=1, outputs=2, hint="sort")
    return [values, indices]


@fallback("aten.clamp.default")
def _clamp(L, node, a: Args):
    dt = out_dtype(node)
    lo, hi = a.value("min"), a.value("max")
    b = L.b
    return [b.op("Clip", a.tensor("self", dt), None if lo is None else b.scalar(lo, dt),
                 None if hi is None else b.scalar(hi, dt), hint="clamp")]


@fallback("aten.argmax.default", "aten.argmin.default")
def _argmax(L, node, a: Args):
    b = L.b
    t = a.type("self")
    x = a.tensor("self")
    op = "ArgMax" if node.attrs["target"].startswith("aten.argmax") else "ArgMin"
    if a.value("dim") is None:
        return [b.op(op, b.op("Reshape", x, b.i64(-1)), axis=0, keepdims=int(bool(a.value("keepdim"))))]
    return [b.op(op, x, axis=a.dims("dim", t.rank)[0], keepdims=int(bool(a.value("keepdim"))), select_last_index=0)]


SIMPLE = {"aten.floor.default": "Floor", "aten.ceil.default": "Ceil", "aten.round.default": "Round",
          "aten.sign.default": "Sign", "aten.atan.default": "Atan", "aten.sinh.default": "Sinh",
          "aten.cosh.default": "Cosh", "aten.asin.default": "Asin", "aten.acos.default": "Acos",
          "aten.tan.default": "Tan", "aten.isnan.default": "IsNaN"}


def _simple(L, node, a: Args):
    dt = out_dtype(node)
    return [L.b.op(SIMPLE[node.attrs["target"]], a.tensor("self", None if dt == "bool" else dt))]


for _t in SIMPLE:
    FALLBACKS[_t] = _simple


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
            f"({', '.join(sorted(FALLBACKS))}) and torch.onnx.export failed on it ({_summary(e)}). "
            "Write that part of the model with ops the exporter supports (see `explain()` for the ops that "
            "fell back), or export to TVM instead (sessa_compiler.export_tvm)") from e
    finally:
        quiet.setLevel(level)
    g = model.graph
    bad = [n.op_type for n in g.node if n.domain not in ("", "ai.onnx") or any(a.g.node or a.graphs for a in n.attribute)]
    if bad or len(g.input) != len(tensor_at) or len(g.output) != len(node.outputs):
        raise OnnxUnsupportedOpError(f"fallback op {target} ({outs}): torch.onnx.export made a graph this exporter "
                                     f"cannot splice in (ops {bad}, {len(g.input)} inputs, {len(g.output)} outputs)")
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


def lower_fallback(L, node: Node) -> list:
    target = node.attrs["target"]
    fn = FALLBACKS.get(target)
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
