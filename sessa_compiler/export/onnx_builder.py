"""A small ONNX graph builder: unique names, cached constants, symbolic dims as runtime int64 values.

Only the standard ONNX domain is used. A ``GraphBuilder`` makes the main graph; ``sub()`` makes a
Loop/Scan body that shares the name space (body names never repeat outer names) and puts its
constants and dimension computations in the main graph, which the body reads from outer scope.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import sympy
import torch
from onnx import TensorProto, helper

from ..errors import SessaCompilerError, UnsupportedError
from ..ir.dtypes import NUMPY_NAME
from ..ir.types import size_fraction

ONNX_DTYPE = {"f64": TensorProto.DOUBLE, "f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16,
              "bf16": TensorProto.BFLOAT16, "i64": TensorProto.INT64, "i32": TensorProto.INT32,
              "i16": TensorProto.INT16, "i8": TensorProto.INT8, "u8": TensorProto.UINT8,
              "bool": TensorProto.BOOL}
NUMPY_DTYPE = {k: np.dtype(v).type for k, v in NUMPY_NAME.items()}
INT64_MAX = 2**63 - 1


def out_dtype(node, i: int = 0) -> str:
    """The IR dtype name of a node's i-th output."""
    return node.outputs[i].type.dtype.name


class OnnxExportError(SessaCompilerError):
    """The IR graph could not be lowered to standard ONNX (names the op and why)."""


class OnnxUnsupportedOpError(OnnxExportError, UnsupportedError):
    """An IR op (or a fallback's torch target) has no ONNX lowering."""


def tensor_proto(name: str, data) -> TensorProto:
    """A TensorProto from a torch tensor or numpy array (bf16 stored as raw bits)."""
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().tobytes()
            return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
        data = t.numpy()
    arr = np.asarray(data)
    arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray would make 0-d 1-d)
    elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
    return helper.make_tensor(name, elem, list(arr.shape), arr.tobytes(), raw=True)


class Names:
    """One name space for a whole model (main graph and every body)."""

    def __init__(self):
        self.used: set = set()
        self.counter = itertools.count()

    def fresh(self, hint: str) -> str:
        hint = "".join(c if (c.isalnum() or c in "_.") else "_" for c in hint) or "v"
        if hint not in self.used:
            self.used.add(hint)
            return hint
        while True:
            name = f"{hint}_{next(self.counter)}"
            if name not in self.used:
                self.used.add(name)
                return name


class GraphBuilder:
    def __init__(self, opset: int, names: Names | None = None, root: GraphBuilder | None = None):
        self.opset = opset
        self.names = names or Names()
        self.root = root or self
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []
        if root is None:
            self._consts: dict = {}
            self._dims: dict = {}           # sympy expr -> name of an int64 [1] tensor
            self.symbol_sources: dict = {}  # symbol name -> (input name, axis) or an int (static)
            self.cache: dict = {}           # shared per-model values (masks, rope tables)

    def sub(self) -> GraphBuilder:
        return GraphBuilder(self.opset, self.names, self.root)

    # -- nodes -----------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, outputs: int | list = 1, hint: str | None = None, **attrs):
        """Append a node; returns its output name (or a list when ``outputs`` > 1 or is a list)."""
        if isinstance(outputs, list):
            outs = outputs
        else:
            base = hint or op_type.lower()
            outs = [self.names.fresh(base) for _ in range(outputs)]
        ins = ["" if x is None else x for x in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, outs, name=self.names.fresh("n_" + op_type), **attrs))
        if isinstance(outputs, int) and outputs == 1:
            return outs[0]
        return outs

    # -- constants (always in the main graph) ---------------------------------------------------------------
    def initializer(self, data, hint: str) -> str:
        root = self.root
        name = root.names.fresh(hint)
        root.initializers.append(tensor_proto(name, data))
        return name

    def const(self, value, dtype: str = "f32", shape=None, hint: str = "c") -> str:
        """A cached constant of the given IR dtype name; ``shape=None`` keeps numpy's shape of ``value``."""
        root = self.root
        if dtype == "bf16":
            t = torch.tensor(value, dtype=torch.bfloat16)
            if shape is not None:
                t = t.reshape(shape)
            key = ("bf16", tuple(t.shape), tuple(t.flatten().float().tolist()))
            if key not in root._consts:
                root._consts[key] = root.initializer(t, hint)
            return root._consts[key]
        arr = np.asarray(value, dtype=NUMPY_DTYPE[dtype])
        if shape is not None:
            arr = arr.reshape(shape)
        key = (dtype, arr.shape, arr.tobytes())
        if key not in root._consts:
            root._consts[key] = root.initializer(arr, hint)
        return root._consts[key]

    def i64(self, *values) -> str:
        """A 1-D int64 constant."""
        return self.const(list(values), "i64", hint="i64")

    def scalar(self, value, dtype: str) -> str:
        return self.const(value, dtype, shape=(), hint="s")

    # -- symbolic dims --------------------------------------------------------------------------------------
    def dim(self, expr) -> str:
        """An int64 tensor of shape [1] holding the runtime value of an int or sympy expression."""
        root = self.root
        if isinstance(expr, (int, np.integer)) or (isinstance(expr, sympy.Basic) and expr.is_Integer):
            return self.i64(int(expr))
        expr = sympy.sympify(expr)
        if expr in root._dims:
            return root._dims[expr]
        out = root._lower_expr(expr)
        root._dims[expr] = out
        return out

    def dim_scalar(self, expr) -> str:
        """The same as a 0-d int64 tensor."""
        if isinstance(expr, (int, np.integer)) or (isinstance(expr, sympy.Basic) and expr.is_Integer):
            return self.scalar(int(expr), "i64")
        key = ("dim_scalar", sympy.sympify(expr))
        root = self.root
        if key not in root.cache:
            root.cache[key] = root.op("Squeeze", root.dim(expr), root.i64(0), hint="dim0d")
        return root.cache[key]

    def size_value(self, expr, dtype: str) -> str:
        """A size expression as a 0-d tensor of ``dtype``: its int64 value, or for a size used as a float (T * 0.5)
        the exact fraction of two int64 sizes computed in float64."""
        if not expr.has(sympy.Float):
            return self.cast(self.dim_scalar(expr), "i64", dtype)
        num, den = size_fraction(expr)
        num, den = (self.cast(self.dim_scalar(n), "i64", "f64") for n in (num, den))
        value = self.op("Div", num, den, hint="size_float")
        return self.cast(value, "f64", dtype)

    def shape_tensor(self, dims) -> str:
        """A 1-D int64 shape from a list of ints / sympy dims (constant runs are folded)."""
        parts, run = [], []
        for d in dims:
            if isinstance(d, (int, np.integer)) or (isinstance(d, sympy.Basic) and d.is_Integer):
                run.append(int(d))
                continue
            if run:
                parts.append(self.i64(*run))
                run = []
            parts.append(self.dim(d))
        if run:
            parts.append(self.i64(*run))
        if not parts:
            return self.const([], "i64", hint="empty_shape")
        return parts[0] if len(parts) == 1 else self.op("Concat", *parts, axis=0, hint="shape")

    def _lower_expr(self, e) -> str:
        if e.is_Integer:
            return self.i64(int(e))
        if e.is_Symbol:
            src = self.symbol_sources.get(e.name)
            if src is None:
                raise OnnxExportError(f"dimension symbol {e} is not bound by any graph input")
            if isinstance(src, int):
                return self.i64(src)
            inp, axis = src
            return self.op("Shape", inp, start=axis, end=axis + 1, hint=f"dim_{e.name}")
        if e.is_Add:
            terms = [self.dim(a) for a in e.args]
            return self._fold("Add", terms)
        if e.is_Mul:
            coeff, _ = e.as_coeff_Mul()
            if coeff.is_Rational and not coeff.is_Integer:
                raise OnnxExportError(f"dimension {e} is not an integer expression")
            factors = [self.dim(a) for a in sympy.Mul.make_args(e)]
            return self._fold("Mul", factors)
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den.is_Integer and int(den) > 0:
                return self.op("Div", self.dim(sympy.expand(num)), self.i64(int(den)), hint="floordiv")
        if isinstance(e, sympy.ceiling):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den.is_Integer and int(den) > 0:
                return self.op("Div", self.dim(sympy.expand(num + den - 1)), self.i64(int(den)), hint="ceildiv")
        if isinstance(e, sympy.Mod) and e.args[1].is_Integer:
            return self.op("Mod", self.dim(e.args[0]), self.i64(int(e.args[1])), hint="mod")
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self.op("Max" if isinstance(e, sympy.Max) else "Min", *[self.dim(a) for a in e.args])
        if e.is_Pow and e.exp.is_Integer and int(e.exp) > 0:
            return self._fold("Mul", [self.dim(e.base)] * int(e.exp))
        raise OnnxExportError(f"cannot compute dimension expression {e} at run time "
                              "(supported: + * // % min max of ints and the symbols B, T)")

    def _fold(self, op: str, names: list) -> str:
        acc = names[0]
        for n in names[1:]:
            acc = self.op(op, acc, n, hint="dim")
        return acc

    # -- helpers -----------------------------------------------------------------------------------------
    def cast(self, x: str, have: str, want: str) -> str:
        return x if have == want else self.op("Cast", x, to=ONNX_DTYPE[want], hint="cast")

    def graph(self, name: str, inputs: list, outputs: list):
        return helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers,
                                 value_info=self.value_info)


def value_info(name: str, dtype: str, shape) -> object:
    """A ValueInfoProto; symbolic dims become dim_params (``B``, ``T``, ``T+1``)."""
    dims = None
    if shape is not None:
        dims = []
        for d in shape:
            if d is None:
                dims.append(None)
            elif isinstance(d, (int, np.integer)) or (isinstance(d, sympy.Basic) and d.is_Integer):
                dims.append(int(d))
            else:
                dims.append(str(d).replace(" ", ""))
    return helper.make_tensor_value_info(name, ONNX_DTYPE[dtype], dims)


NEG_INF = -math.inf
