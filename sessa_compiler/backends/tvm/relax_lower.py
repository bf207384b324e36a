"""IR graph -> one Relax function ("main") over symbolic batch and sequence length, for export.

Every IR op must lower: core ops become `call_tir` to the generated TIR kernels (the same PrimFuncs
and schedules compile(backend="tvm") uses), linear layers to a generated scheduled matmul kernel
(kernels/linear.py), the rest map to Relax ops (legalised to TIR by TVM's default CPU pipeline,
unscheduled: elementwise ops, norms and reshapes are cheap next to the matmuls). Parameters are function arguments (read from the weights file at load time),
not constants baked into the library. An op without a lowering raises UnsupportedError naming it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import sympy

from ...ir.dtypes import TVM_NAME as RELAX_DTYPE
from ...ir.dtypes import comparison_name, compute_name
from ...errors import UnsupportedError
from ...ir.graph import Graph, Value
from ...ir.types import size_fraction
from .build import primfunc, tri_solve_spec
from .lowering import KERNEL_OPS, kernel_dtype, lower_node



class _Lowerer:
    def __init__(self, graph: Graph, lanes: int, schedules):
        self.graph = graph
        self.lanes, self.schedules = lanes, schedules
        self.symbols: dict = {}
        self.env: dict = {}
        self.kernels: dict = {}   # KernelSpec -> GlobalVar

    # tvm is imported when something is lowered, not to ask what lowers (can_lower, why_not: a warm compile asks
    # that before loading its cached library, without importing tvm)
    @functools.cached_property
    def relax(self):
        from tvm import relax

        return relax

    @functools.cached_property
    def tirx(self):
        from tvm import tirx

        return tirx

    @functools.cached_property
    def bb(self):
        return self.relax.BlockBuilder()

    # -- shapes -------------------------------------------------------------------------------------
    def dim(self, d):
        if isinstance(d, int):
            return d
        expr = sympy.sympify(d)
        if expr.is_Integer:
            return int(expr)
        return self._expr(expr)

    def _expr(self, e):
        tirx = self.tirx
        if e.has(sympy.Float):   # a size used as a float (T * 0.5): a float64 expression of the int64 sizes
            return self._float_expr(e)
        if e.is_Integer:
            return tirx.IntImm("int64", int(e))
        if e.is_Symbol:
            if e.name not in self.symbols:
                self.symbols[e.name] = tirx.Var(e.name, "int64")
            return self.symbols[e.name]
        if e.is_Add:
            out = self._expr(e.args[0])
            for a in e.args[1:]:
                out = out + self._expr(a)
            return out
        if e.is_Mul:
            out = self._expr(e.args[0])
            for a in e.args[1:]:
                out = out * self._expr(a)
            return out
        if isinstance(e, sympy.floor) and e.args[0].is_Mul:
            num, den = e.args[0].as_numer_denom()
            return tirx.floordiv(self._expr(num), self._expr(den))
        kind = type(e).__name__
        if kind in ("Max", "Min"):   # max(0, T - 256), min(T, n) from Python size arithmetic
            out = self._expr(e.args[0])
            for a in e.args[1:]:
                out = (tirx.max if kind == "Max" else tirx.min)(out, self._expr(a))
            return out
        if kind in ("FloorDiv", "Mod", "PythonMod") and len(e.args) == 2:
            a, b = (self._expr(x) for x in e.args)
            return tirx.floordiv(a, b) if kind == "FloorDiv" else tirx.floormod(a, b)
        if e.is_Pow and e.exp.is_Integer and int(e.exp) > 0:
            base = self._expr(e.base)
            out = base
            for _ in range(int(e.exp) - 1):
                out = out * base
            return out
        raise UnsupportedError(f"TVM export: dimension expression {e} has no TVM form")

    def _float_expr(self, e):
        """A size used as a float (T * 0.5): size_fraction's quotient, in float64."""
        num, den = size_fraction(e)
        return self.tirx.Cast("float64", self._expr(num)) / self.tirx.Cast("float64", self._expr(den))

    def ttype(self, v: Value):
        return self.relax.TensorType([self.dim(d) for d in v.type.shape], RELAX_DTYPE[v.type.dtype.name])

    # -- building -----------------------------------------------------------------------------------
    def build(self):
        relax, bb = self.relax, self.bb
        graph = self.graph
        unsupported = sorted({self.why_not(n) + graph.source_of(n) for n in graph.nodes if not self.can_lower(n)})
        if unsupported:
            raise UnsupportedError(
                f"TVM export needs the whole graph in TVM, but these IR ops have no TVM lowering: "
                f"{', '.join(unsupported)}; run the model with compile(backend='tvm') instead (those ops run "
                "through torch there), or rewrite the module so they are recognised")
        inputs = [relax.Var(f"in_{v.name}", self.ttype(v)) for v in graph.inputs]
        params = [relax.Var(f"p_{i}", self.ttype(v)) for i, v in enumerate(graph.param_values.values())]
        try:
            with bb.function("main", inputs + params):
                with bb.dataflow():
                    for v, r in zip(graph.inputs, inputs):
                        self.env[v] = r
                    for v, r in zip(graph.param_values.values(), params):
                        self.env[v] = r
                    for node in graph.nodes:
                        self._lower_checked(node)
                    outs = [self.env[v] for v in graph.outputs]
                    result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
                bb.emit_func_output(result)
        except BaseException:
            self._close_blocks()  # else TVM warns "BlockBuilder destroyed with remaining blocks!" on stderr
            raise
        return bb.get()

    def _lower_checked(self, node) -> None:
        """lower(node); a failure inside it (a case the lowering does not expect) names the op and line."""
        try:
            self.lower(node)
        except UnsupportedError as e:
            where = self.graph.source_of(node)
            if where and where not in str(e):
                e.args = (f"{e} (op {node.op} %{node.outputs[0].name}{where})",)
            raise
        except Exception as e:  # noqa: BLE001 - an internal failure, reported with the op and line
            target = f"fallback({node.attrs.get('target')})" if node.op == "fallback" else node.op
            raise UnsupportedError(
                f"TVM (Relax) lowering: op {target} %{node.outputs[0].name}{self.graph.source_of(node)} has no TVM "
                f"lowering for this case ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); rewrite that line with "
                "ordinary tensor ops (compile(backend='tvm') still runs it, in hybrid mode)") from e

    def _close_blocks(self) -> None:
        """End the blocks a failed lowering left open (the caller reports the failure itself)."""
        for _ in range(16):
            try:
                self.bb._end_block()
            except Exception:  # noqa: BLE001 - none left
                break

    def kernel_spec(self, node):
        """The TVM kernel a core-op node lowers to, or None. Triangular weights shared across the right-hand
        side's leading dims (compile(backend="tvm") runs those on torch) are broadcast first."""
        spec = lower_node(node, self.lanes, self.schedules).spec
        if spec is None:
            spec = self._mixed_float_spec(node)
        if spec is None and node.op == "tri_solve":
            A, b = (x.type for x in node.inputs)
            if A.rank < b.rank and A.dtype == b.dtype and isinstance(b.shape[-1], int) and kernel_dtype(b.dtype.name):
                spec = tri_solve_spec(b.shape[-1], node.attrs["unitriangular"], kernel_dtype(b.dtype.name),
                                      self.schedules.get("tri_solve"), self.lanes)
        return spec

    def _mixed_float_spec(self, node):
        """A node whose float operands differ in dtype (e.g. float16 f with float32 q_b, k_b, gamma, as a half
        model that computes its feedback logits in float32 writes it) means the op in the compute dtype of its
        leading operand (semantics/core.py); its kernel is that of the node with every operand in that dtype
        (``lower`` casts them)."""
        from ...ir.graph import Node
        from ...ir.types import DType, TensorType

        values = [x for x in node.inputs if isinstance(x, Value)]
        if len(values) != len(node.inputs) or not all(v.type.dtype.is_float for v in values):
            return None
        if len({v.type.dtype.name for v in values}) == 1:
            return None
        lead = values[1 if node.op == "tri_solve" else 0].type.dtype
        cd = DType(compute_name(lead.name))
        same = Node(node.op, [Value(v.name, TensorType(cd, v.type.shape), "input") for v in values], dict(node.attrs),
                    list(node.outputs))
        return lower_node(same, self.lanes, self.schedules).spec

    def why_not(self, node) -> str:
        """Why ``node`` has no TVM lowering (for the error naming it)."""
        reason = lower_node(node, self.lanes, self.schedules).reason if node.op in KERNEL_OPS else ""
        if node.op == "fallback":
            from ...ir.ops import FALLBACK_ADVICE, GENERIC_FALLBACK_ADVICE

            target = node.attrs["target"]
            return f"fallback({target}) ({FALLBACK_ADVICE.get(target, GENERIC_FALLBACK_ADVICE)})"
        return f"{node.op} ({reason})" if reason else node.op

    def can_lower(self, node) -> bool:
        if node.op in KERNEL_OPS:
            if self.kernel_spec(node) is not None:
                return True
            # no kernel for this node (e.g. non-causal attention): attention has a composite Relax form
            return node.op == "attention" and _composite_attention_ok(node)
        if node.op == "fallback":   # the aten targets of semantics/fallback_forms.py
            from .relax_fallback import lowers

            return lowers(node)
        return node.op in SIMPLE or node.op in COMPLEX

    def size_scalar(self, x, dtype: str):
        """[1] of ``dtype`` holding a size expression, computed in int64 (float64 for a size used as a float)."""
        op, e = self.relax.op, self._expr(sympy.sympify(x))
        own = "float64" if x.has(sympy.Float) else "int64"
        one = op.arange(e, e + 0.5, 1.0, dtype=own) if own == "float64" else op.arange(e, e + 1, 1, dtype=own)
        return one if dtype == own else op.astype(one, dtype)

    def operand(self, x, dtype: str):
        if isinstance(x, Value):
            return self.env[x]
        if isinstance(x, sympy.Basic) and not x.is_Number:   # a size (pos <= T): a 0-d tensor holding it
            return self.bb.emit(self.relax.op.reshape(self.size_scalar(x, dtype), []))
        if isinstance(x, sympy.Basic):
            x = int(x) if x.is_Integer else float(x)
        return self.relax.const(x, dtype)

    def lower(self, node):
        bb, relax = self.bb, self.relax
        if node.op in KERNEL_OPS:
            spec = self.kernel_spec(node)
            if spec is None:   # can_lower allowed it: attention without a kernel
                self.env[node.outputs[0]] = bb.emit(_composite_attention(self, node))
                return
            if spec not in self.kernels:
                self.kernels[spec] = bb.add_func(primfunc(spec), spec.symbol)
            # the kernels compute in spec.dtype (at least float32): half-precision operands are cast to it and
            # the result back, as compile(backend="tvm") does around the same kernels
            args = [self.cast(self.env[x], x, spec.dtype) if x is not None else None for x in node.inputs]
            out_dtype = RELAX_DTYPE[node.outputs[0].type.dtype.name]
            if node.op == "tri_solve":
                x = self._tri_solve(node, spec, *args)
                self.env[node.outputs[0]] = x if out_dtype == spec.dtype else bb.emit(relax.op.astype(x, out_dtype))
                return
            if node.op == "attention":
                if not node.attrs.get("rope", False):   # inv_freq is not read when rope is off
                    args = args[:3] + [relax.const(np.zeros(max(spec.params["head_dim"] // 2, 1), dtype=spec.dtype),
                                                   spec.dtype)] + args[4:5]   # (the key-padding mask)
            shape = [self.dim(d) for d in node.outputs[0].type.shape]
            out = bb.emit(relax.call_tir(self.kernels[spec], args, out_ty=relax.TensorType(shape, spec.dtype)))
            self.env[node.outputs[0]] = out if out_dtype == spec.dtype else bb.emit(relax.op.astype(out, out_dtype))
            return
        if node.op == "fallback":
            from .relax_fallback import lower_fallback

            for v, e in zip(node.outputs, lower_fallback(self, node)):
                self.env[v] = bb.emit(e)
            return
        if node.op in PROMOTING and node.outputs[0].type.dtype.is_float:
            # torch promotes mixed operand dtypes (f32 * f64 is f64; the IR's output type says which); Relax
            # wants equal dtypes: each operand in the output's dtype
            want = RELAX_DTYPE[node.outputs[0].type.dtype.name]
            ops = [self.cast(self.env[x], x, want) if isinstance(x, Value) else self._literal(node, x, want)
                   for x in node.inputs]
        else:
            # an absent optional operand (LayerNorm without weight or bias) stays None
            ops = [self.operand(x, self._operand_dtype(node)) if x is not None else None for x in node.inputs]
        fn = SIMPLE.get(node.op)
        if node.op in NAN_PROPAGATING and node.outputs[0].type.dtype.is_float:
            expr = _nan_propagating(relax.op, fn(relax.op, *ops, **node.attrs), ops)
        elif fn is not None:
            expr = fn(relax.op, *ops, **node.attrs)
        else:
            expr = COMPLEX[node.op](self, node, ops)
        if isinstance(expr, list):   # multi-output ops (split)
            for v, e in zip(node.outputs, expr):
                self.env[v] = bb.emit(e)
            return
        self.env[node.outputs[0]] = bb.emit(expr)

    def cast(self, expr, v: Value, dtype: str):
        """``expr`` (the Relax value of IR value ``v``) in ``dtype``."""
        have = RELAX_DTYPE[v.type.dtype.name]
        return expr if have == dtype else self.bb.emit(self.relax.op.astype(expr, dtype))

    def _tri_solve(self, node, spec, A, b):
        """The kernel solves lower systems over [nb, T, T]: flatten the leading dims, reverse the sequence
        of an upper system, and undo both on the result."""
        relax, bb = self.relax, self.bb
        bt = node.inputs[1].type
        Tn, N = self.dim(bt.shape[-2]), self.dim(bt.shape[-1])
        lead = 1
        for d in bt.shape[:-2]:
            lead = lead * self.dim(d)
        if node.inputs[0].type.rank < bt.rank:   # weights shared across b's leading dims
            A = bb.emit(relax.op.broadcast_to(A, [self.dim(d) for d in bt.shape[:-2]] + [Tn, Tn]))
        A3 = bb.emit(relax.op.reshape(A, [lead, Tn, Tn]))
        b3 = bb.emit(relax.op.reshape(b, [lead, Tn, N]))
        if node.attrs["upper"]:
            A3 = bb.emit(relax.op.flip(bb.emit(relax.op.flip(A3, 1)), 2))
            b3 = bb.emit(relax.op.flip(b3, 1))
        out_ty = relax.TensorType([lead, Tn, N], spec.dtype)
        x = bb.emit(relax.call_tir(self.kernels[spec], [A3, b3], out_ty=out_ty))
        if node.attrs["upper"]:
            x = bb.emit(relax.op.flip(x, 1))
        return bb.emit(relax.op.reshape(x, [self.dim(d) for d in bt.shape]))

    def _literal(self, node, x, dtype: str):
        """A literal operand of a promoting op. A float zero is a one-element tensor, not a scalar: legalised
        into TIR, ``x * 0.0`` and ``x + 0.0`` were folded by TVM's simplifier to 0 and x, where torch gives NaN
        for a NaN or infinite x (a residual branch switched off by a config gate of 0.0) and +0.0 for -0.0."""
        if (isinstance(x, (int, float, sympy.Number)) and not isinstance(x, bool) and float(x) == 0.0
                and dtype in ("float32", "float64", "float16") and node.outputs[0].type.rank >= 1):
            return self.relax.const(np.zeros((1,), dtype=dtype), dtype)
        return self.operand(x, dtype)

    def _operand_dtype(self, node) -> str:
        for x in node.inputs:
            if isinstance(x, Value):
                return RELAX_DTYPE[x.type.dtype.name]
        return "float32"


def _erf_gelu(op, x, approximate="none"):
    return op.nn.gelu(x) if approximate == "none" else op.nn.gelu_tanh(x)


def _softplus(lw, node, ops):
    """torch's softplus: x where beta x > threshold, else log1p(exp(beta x)) / beta (_log1p, as the log1p op)
    (Relax's softplus is log(1 + exp(beta x)) / beta: 6% off at x = -16 and 0 below about -17, where the log of it,
    Mamba's log-step, is -inf)."""
    op, x, dt = lw.relax.op, ops[0], _out_dtype(node)
    beta, threshold = float(node.attrs.get("beta", 1)), float(node.attrs.get("threshold", 20))
    bx = x if beta == 1 else op.multiply(x, lw.relax.const(beta, dt))
    lp = _log1p(lw, op.exp(bx), dt)
    val = lp if beta == 1 else op.divide(lp, lw.relax.const(beta, dt))
    return op.where(op.greater(bx, lw.relax.const(threshold, dt)), x, val)


# ops whose TIR form (LLVM maxnum/minnum) drops a NaN operand, where torch returns NaN (clamp lowers to these)
NAN_PROPAGATING = frozenset({"maximum", "minimum", "relu"})


def _nan_propagating(op, expr, operands):
    """expr, but NaN wherever an operand is NaN (torch.maximum / minimum / relu / clamp propagate NaN)."""
    for x in operands:
        expr = op.where(op.isnan(x), x, expr)
    return expr


# elementwise binary ops whose operands torch promotes to one dtype (the IR's output dtype)
PROMOTING = frozenset({"add", "sub", "mul", "div", "pow", "maximum", "minimum"})

SIMPLE = {
    "matmul": lambda op, a, b: op.matmul(a, b),
    "gelu": _erf_gelu,
    "tanh": lambda op, x: op.tanh(x), "exp": lambda op, x: op.exp(x), "neg": lambda op, x: op.negative(x),
    "log": lambda op, x: op.log(x), "sqrt": lambda op, x: op.sqrt(x), "rsqrt": lambda op, x: op.rsqrt(x),
    "sigmoid": lambda op, x: op.sigmoid(x), "silu": lambda op, x: op.nn.silu(x), "relu": lambda op, x: op.nn.relu(x),
    "abs": lambda op, x: op.abs(x), "sin": lambda op, x: op.sin(x), "cos": lambda op, x: op.cos(x),
    "erf": lambda op, x: op.erf(x), "detach": lambda op, x: x,
    "add": lambda op, a, b: op.add(a, b), "sub": lambda op, a, b: op.subtract(a, b),
    "mul": lambda op, a, b: op.multiply(a, b), "div": lambda op, a, b: op.divide(a, b),
    "pow": lambda op, a, b: op.power(a, b), "maximum": lambda op, a, b: op.maximum(a, b),
    "minimum": lambda op, a, b: op.minimum(a, b),
    "softmax": lambda op, x, dim: op.nn.softmax(x, axis=dim),
    "log_softmax": lambda op, x, dim: op.nn.log_softmax(x, axis=dim),
    "permute": lambda op, x, dims: op.permute_dims(x, list(dims)),
    "unsqueeze": lambda op, x, dim: op.expand_dims(x, dim),
    # "clip": an out-of-range token id must not read out of bounds (TVM's default "fast" mode would
    # segfault); it is clamped to the vocabulary instead of raising like torch does
    "embedding": lambda op, w, idx: op.take(w, idx, axis=0, mode="clip"),
}


def _layer_norm(lw, node, ops):
    relax = lw.relax
    x = ops[0]
    n = len(node.attrs["normalized_shape"])
    shape = [int(s) for s in node.attrs["normalized_shape"]]
    dtype = RELAX_DTYPE[node.inputs[0].type.dtype.name]
    w = ops[1] if len(ops) > 1 and node.inputs[1] is not None else relax.const(np.ones(shape, dtype=dtype), dtype)
    b = ops[2] if len(ops) > 2 and node.inputs[2] is not None else relax.const(np.zeros(shape, dtype=dtype), dtype)
    axes = list(range(-n, 0))
    if dtype == "float32" or dtype == "float16":
        return relax.op.nn.layer_norm(x, w, b, axes=axes, epsilon=float(node.attrs["eps"]))
    # TVM's layer_norm supports float32/float16 only: spell it out for float64
    op, emit = relax.op, lw.bb.emit
    xc = emit(op.subtract(x, op.mean(x, axis=axes, keepdims=True)))
    var = emit(op.mean(op.multiply(xc, xc), axis=axes, keepdims=True))
    y = emit(op.multiply(xc, op.rsqrt(op.add(var, relax.const(float(node.attrs["eps"]), dtype)))))
    return op.add(op.multiply(y, w), b)


def _split(lw, node, ops):
    """Relax's split at the pieces' boundaries; a zero-width piece (Hugging Face Mamba2's d_mlp = 0), which TVM's
    split refuses (its indices must increase), is an empty tensor of its own."""
    relax = lw.relax
    sizes = [int(s) for s in node.attrs["sizes"]]
    wide = [i for i, s in enumerate(sizes) if s]
    idx, acc = [], 0
    for i in wide[:-1]:
        acc += sizes[i]
        idx.append(acc)
    if len(wide) > 1:
        tup = lw.bb.emit(relax.op.split(ops[0], idx, axis=node.attrs["dim"]))
        pieces = {i: relax.TupleGetItem(tup, k) for k, i in enumerate(wide)}
    else:
        pieces = {i: ops[0] for i in wide}
    return [pieces[i] if i in pieces else relax.op.zeros([lw.dim(d) for d in node.outputs[i].type.shape],
                                                         RELAX_DTYPE[node.outputs[i].type.dtype.name])
            for i in range(len(sizes))]


def _reshape(lw, node, ops):
    return lw.relax.op.reshape(ops[0], [lw.dim(d) for d in node.outputs[0].type.shape])


def _squeeze(lw, node, ops):
    x = node.inputs[0].type
    axes = [d % x.rank for d in node.attrs["dims"] if x.shape[d % x.rank] == 1]
    return lw.relax.op.squeeze(ops[0], axes) if axes else ops[0]


def _transpose(lw, node, ops):
    rank = node.inputs[0].type.rank
    perm = list(range(rank))
    a, b = node.attrs["dim0"] % rank, node.attrs["dim1"] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return lw.relax.op.permute_dims(ops[0], perm)


def _causal_conv1d(lw, node, ops):
    op = lw.relax.op
    x, w = ops[0], ops[1]
    C, K = (int(s) for s in node.inputs[1].type.shape)
    xt = lw.bb.emit(op.permute_dims(x, [0, 2, 1]))                        # [B, C, T]
    xp = lw.bb.emit(op.nn.pad(xt, [0, 0, 0, 0, K - 1, 0]))
    w3 = lw.bb.emit(op.expand_dims(w, 1))                                  # [C, 1, K]
    y = lw.bb.emit(op.nn.conv1d(xp, w3, groups=C))
    if len(ops) > 2 and node.inputs[2] is not None:
        y = lw.bb.emit(op.add(y, op.reshape(ops[2], [C, 1])))
    return op.permute_dims(y, [0, 2, 1])


def _linear(lw, node, ops):
    """A generated, scheduled TIR matmul (TVM's default CPU pipeline would leave naive loops)."""
    from .build import linear_spec
    relax = lw.relax
    x, w = node.inputs[0].type, node.inputs[1].type
    N, K = (int(s) for s in w.shape)
    has_bias = len(ops) > 2 and node.inputs[2] is not None
    dtype = RELAX_DTYPE[x.dtype.name]
    if dtype not in ("float32", "float64") or x.rank < 1:
        return relax.op.linear(ops[0], ops[1], ops[2] if has_bias else None)
    spec = linear_spec(K, N, has_bias, dtype, lw.schedules.get("linear"), lw.lanes)
    if spec not in lw.kernels:
        lw.kernels[spec] = lw.bb.add_func(primfunc(spec), spec.symbol)
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * lw.dim(d)
    x2 = lw.bb.emit(relax.op.reshape(ops[0], [rows, K]))
    b = ops[2] if has_bias else relax.const(np.zeros(N, dtype=dtype), dtype)
    y2 = lw.bb.emit(relax.call_tir(lw.kernels[spec], [x2, ops[1], b], out_ty=relax.TensorType([rows, N], dtype)))
    return relax.op.reshape(y2, [lw.dim(d) for d in node.outputs[0].type.shape])


def _slice(lw, node, ops):
    x = node.inputs[0].type
    dim = node.attrs["dim"] % x.rank
    size = x.shape[dim]   # an int or a sympy expression of the dims (B, T, ...)
    start, end, step = node.attrs.get("start", 0), node.attrs.get("end"), node.attrs.get("step", 1)
    start = 0 if start is None else start
    if end is None or (isinstance(end, int) and end >= 2 ** 62):
        end = size
    length = node.outputs[0].type.shape[dim]   # the IR's (torch's) length: exact under the trace's guards
    if length == 0:   # a bound past the dim (x[:, 3:] at T = 2): an empty slice, from no read at all
        return lw.relax.op.zeros([lw.dim(d) for d in node.outputs[0].type.shape],
                                 RELAX_DTYPE[node.outputs[0].type.dtype.name])
    if isinstance(size, int) and isinstance(start, int) and isinstance(end, int):   # clamped as Python does
        start, end, _ = slice(start, end, step).indices(size)
        if step > 0:
            end = max(end, start)
    elif isinstance(start, int) and start < 0 and step == 1 and length is not None:
        # counted from the end, and never before 0 (x[:, -3:] at T = 2): the IR's length back from the end
        end = size if isinstance(end, int) and end >= size else end
        end = size + end if isinstance(end, int) and end < 0 else end
        start = end - length
    # negative ends count from the end of the dim (x[..., :-1]); resolved here so the output shape stays exact
    start = size + start if isinstance(start, int) and start < 0 else start
    end = size + end if isinstance(end, int) and end < 0 else end
    if step == 1 and length is not None:   # the end as far from the start as the IR's length (x[:, 2:-2] at T = 4)
        end = start + length
    begin_e, end_e = lw.dim(start), lw.dim(end)
    out = lw.relax.op.strided_slice(ops[0], axes=[dim], begin=[begin_e], end=[end_e], strides=[int(step)])
    if all(isinstance(d, int) for d in node.outputs[0].type.shape):
        return out
    # the IR's shapes are torch's (export guards the sizes where a symbolic end would pass the dim): in bounds,
    # so Relax may take the length as end - begin instead of a clamped form it cannot compare
    out = lw.relax.op.strided_slice(ops[0], axes=[dim], begin=[begin_e], end=[end_e], strides=[int(step)],
                                    assume_inbound=True)
    # Relax infers a symbolic slice's length in its own form (clamped to the dim): where it cannot prove it equal
    # to the IR's length, state the IR's (checked at run time), so x[:, 1:] - x[:, :-1] has operands of one shape
    from tvm.sym.analyzer import Analyzer

    out = lw.bb.emit(out)
    shape = [lw.dim(d) for d in node.outputs[0].type.shape]
    have = getattr(getattr(out, "ty", None), "shape", None)
    analyzer = Analyzer()
    if have is not None and hasattr(have, "values") and len(have.values) == len(shape) and all(
            analyzer.can_prove_equal(a, b) for a, b in zip(have.values, shape)):
        return out
    return lw.bb.match_cast(out, lw.relax.TensorType(shape, _out_dtype(node)))


def _cast(lw, node, ops):
    return lw.relax.op.astype(ops[0], RELAX_DTYPE[node.attrs["dtype"].name])


def _reduce(kind):
    def lower(lw, node, ops):
        op = lw.relax.op
        fn = {"sum": op.sum, "mean": op.mean, "amax": op.max}[kind]
        dims = node.attrs.get("dims")
        axis, keep = (None if dims is None else list(dims)), bool(node.attrs.get("keepdim", False))
        x = ops[0]
        want = RELAX_DTYPE[node.outputs[0].type.dtype.name]
        if kind != "amax" and RELAX_DTYPE[node.inputs[0].type.dtype.name] != want:
            x = lw.bb.emit(op.astype(x, want))   # a sum of a bool / int32 mask counts in int64 (torch's promotion)
        out = fn(x, axis=axis, keepdims=keep)
        if kind == "amax" and node.inputs[0].type.dtype.is_float:
            # TIR's max starts from the lowest finite value, so elements that are all -inf give that value: -inf
            # there (a masked row of logits); it drops NaN: torch.amax returns NaN where the reduced elements
            # hold one (a sum is NaN there)
            dt = RELAX_DTYPE[node.inputs[0].type.dtype.name]
            neg_inf = lw.relax.const(float("-inf"), dt)
            above = op.max(op.astype(op.not_equal(ops[0], neg_inf), "int32"), axis=axis, keepdims=keep)
            out = op.where(op.greater(above, lw.relax.const(0, "int32")), out, neg_inf)
            nan_sum = op.sum(op.where(op.isnan(ops[0]), ops[0], op.zeros_like(ops[0])), axis=axis, keepdims=keep)
            out = op.where(op.isnan(nan_sum), nan_sum, out)
        return out
    return lower


def _concat(lw, node, ops):
    return lw.relax.op.concat(ops, axis=node.attrs["dim"])


def _out_dtype(node) -> str:
    return RELAX_DTYPE[node.outputs[0].type.dtype.name]


def _einsum(lw, node, ops):
    return lw.relax.op.einsum(ops, node.attrs["equation"])


def _band(kind):
    def lower(lw, node, ops):
        return getattr(lw.relax.op, kind)(ops[0], int(node.attrs["diagonal"]))
    return lower


def _expand(lw, node, ops):
    shape = [lw.dim(d) for d in node.outputs[0].type.shape]
    return lw.relax.op.broadcast_to(ops[0], shape)


def _eye(lw, node, ops):
    n = lw.dim(node.outputs[0].type.shape[0])
    return lw.relax.op.eye(n, dtype=_out_dtype(node))


def _full(lw, node, ops):
    relax = lw.relax
    dtype = _out_dtype(node)
    value = node.attrs["value"]
    shape = [lw.dim(d) for d in node.outputs[0].type.shape]
    if isinstance(value, sympy.Basic) and value.free_symbols:   # a size (torch.full((), T)): arange(v, v + 1)
        one = lw.size_scalar(value, dtype)
        return relax.op.broadcast_to(relax.op.reshape(one, [1] * len(shape)), shape)
    value = bool(value) if dtype == "bool" else float(value) if "float" in dtype else int(value)
    return _filled(relax, shape, value, dtype)


def _filled(relax, shape, value, dtype):
    """A tensor of ``shape`` holding ``value``. TVM 0.27's legalisation of ``full`` fails on an infinite or NaN
    fill (topi.full tests ``"float" in dtype`` on a PrimType: TypeError), so those broadcast a scalar constant."""
    if isinstance(value, float) and not math.isfinite(value):
        return relax.op.broadcast_to(relax.const(value, dtype), shape)
    return relax.op.full(shape, relax.const(value, dtype), dtype=dtype)


def _arange(lw, node, ops):
    a = node.attrs
    return lw.relax.op.arange(lw.dim(a["start"]), lw.dim(a["end"]), lw.dim(a["step"]), dtype=_out_dtype(node))


def _masked_fill(lw, node, ops):
    relax = lw.relax
    x, mask, value = node.inputs
    fill = lw.env[value] if isinstance(value, Value) else relax.const(value, _out_dtype(node))
    return relax.op.where(lw.env[mask], fill, lw.env[x])


def _where(lw, node, ops):
    relax = lw.relax
    dtype = _out_dtype(node)
    c, a, b = (lw.operand(x, dtype) for x in node.inputs)
    return relax.op.where(c, a, b)


def _compare(kind):
    def lower(lw, node, ops):
        dtype = RELAX_DTYPE[comparison_name(*node.inputs)]   # torch's promotion: mask < 0.5 is not mask < 0
        xa, xb = (lw.cast(lw.env[x], x, dtype) if isinstance(x, Value) else lw.operand(x, dtype) for x in node.inputs)
        return getattr(lw.relax.op, kind)(xa, xb)
    return lower


def _select(lw, node, ops):
    relax = lw.relax
    t = node.inputs[0].type
    dim = node.attrs["dim"] % t.rank
    index = lw.dim(node.attrs["index"])
    if isinstance(index, int) and index < 0:
        index = lw.dim(t.shape[dim]) + index
    part = relax.op.strided_slice(ops[0], axes=[dim], begin=[index], end=[index + 1], strides=[1])
    return relax.op.squeeze(lw.bb.emit(part), [dim])


def _stack(lw, node, ops):
    return lw.relax.op.stack(ops, axis=int(node.attrs["dim"]))


def _repeat_interleave(lw, node, ops):
    return lw.relax.op.repeat(ops[0], int(node.attrs["repeats"]), axis=int(node.attrs["dim"]))


def _rotate(lw, x, inv_freq, shape, cd):
    """Interleaved rotary embedding of x [B, T, H, d] (in compute dtype ``cd``) at positions 0..T-1; the result
    stays in ``cd`` (semantics/core.py: _rotate)."""
    op, emit = lw.relax.op, lw.bb.emit
    pos = emit(op.arange(0, shape[1], 1, dtype=cd))                                          # [T]
    ang = emit(op.multiply(op.expand_dims(pos, 1), op.expand_dims(inv_freq, 0)))             # [T, d/2]
    cos = emit(op.expand_dims(op.expand_dims(op.cos(ang), 0), 2))                            # [1, T, 1, d/2]
    sin = emit(op.expand_dims(op.expand_dims(op.sin(ang), 0), 2))
    d = shape[3]
    pairs = emit(op.reshape(x, shape[:3] + [d // 2, 2]))
    xe = emit(op.squeeze(op.strided_slice(pairs, [4], [0], [1]), [4]))
    xo = emit(op.squeeze(op.strided_slice(pairs, [4], [1], [2]), [4]))
    re = emit(op.subtract(op.multiply(xe, cos), op.multiply(xo, sin)))
    ro = emit(op.add(op.multiply(xe, sin), op.multiply(xo, cos)))
    return emit(op.reshape(op.stack([re, ro], axis=4), shape))


def _rope(lw, node, ops):
    x, f = node.inputs
    cd = RELAX_DTYPE[compute_name(x.type.dtype.name)]
    if not isinstance(x.type.shape[3], int):
        raise UnsupportedError(f"TVM export: rope needs a static head width, got {x.type}")
    shape = [lw.dim(d) for d in x.type.shape]
    y = _rotate(lw, lw.cast(ops[0], x, cd), lw.cast(ops[1], f, cd), shape, cd)
    return lw.relax.op.astype(y, _out_dtype(node))


def _composite_attention_ok(node) -> bool:
    """Attention without a TVM kernel (non-causal, value width != query width) as Relax matmuls and softmax:
    head counts and head widths must be static."""
    q, k = node.inputs[0].type, node.inputs[1].type
    return all(isinstance(d, int) for d in (q.shape[2], k.shape[2], q.shape[3])) and q.shape[2] % k.shape[2] == 0


def _composite_attention(lw, node):
    """softmax(q k^T * scale [+ causal mask]) v per head, GQA by repeating k and v, in at least float32 (the
    meaning of semantics/core.py: attention_ref)."""
    relax = lw.relax
    op, emit = relax.op, lw.bb.emit
    qv, kv, vv = node.inputs[:3]
    cd = RELAX_DTYPE[compute_name(qv.type.dtype.name)]
    q, k, v = (lw.cast(lw.env[x], x, cd) for x in (qv, kv, vv))
    H, Hkv = qv.type.shape[2], kv.type.shape[2]
    if node.attrs.get("rope", False):
        f = node.inputs[3]
        inv = lw.cast(lw.env[f], f, cd)
        q = _rotate(lw, q, inv, [lw.dim(d) for d in qv.type.shape], cd)
        k = _rotate(lw, k, inv, [lw.dim(d) for d in kv.type.shape], cd)
    if H != Hkv:
        k = emit(op.repeat(k, H // Hkv, axis=2))
        v = emit(op.repeat(v, H // Hkv, axis=2))
    qh, kh, vh = (emit(op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v))           # [B, H, T, d]
    logits = emit(op.multiply(op.matmul(qh, op.permute_dims(kh, [0, 1, 3, 2])),
                              relax.const(float(node.attrs["scale"]), cd)))             # [B, H, T, T]
    mask = node.inputs[4] if node.attrs.get("key_padding", False) else None
    if mask is not None:   # padded keys -inf; a row with no visible key: the mean of v over all keys, or NaN
        m = lw.env[mask]
        keep = m if mask.type.dtype.name == "bool" else \
            emit(op.not_equal(m, relax.const(0, RELAX_DTYPE[mask.type.dtype.name])))
        allowed = emit(op.expand_dims(keep, [1, 2]))                                     # [B, 1, 1, T]
        if node.attrs.get("causal", False):
            T = lw.dim(qv.type.shape[1])
            lower = emit(op.tril(op.ones([T, T], "bool"), 0))
            allowed = emit(op.logical_and(allowed, lower))                               # [B, 1, T, T]
        has = emit(op.greater(op.max(op.astype(allowed, "int32"), axis=[-1], keepdims=True),
                              relax.const(0, "int32")))                                  # [B, 1, T, 1]
        neg = relax.const(float("-inf"), cd)
        logits = emit(op.where(allowed, logits, neg))
        if node.attrs.get("empty_rows", "mean") == "mean":
            logits = emit(op.where(has, logits, relax.const(0.0, cd)))                  # uniform over all keys
            out = emit(op.matmul(op.nn.softmax(logits, axis=-1), vh))
        else:
            out = emit(op.matmul(op.nn.softmax(logits, axis=-1), vh))
            out = emit(op.where(has, out, relax.const(float("nan"), cd)))
        return op.astype(op.permute_dims(out, [0, 2, 1, 3]), _out_dtype(node))
    if node.attrs.get("causal", False):
        T = lw.dim(qv.type.shape[1])
        future = emit(op.triu(_filled(relax, [T, T], float("-inf"), cd), 1))
        logits = emit(op.add(logits, future))
    out = emit(op.matmul(op.nn.softmax(logits, axis=-1), vh))                            # [B, H, T, dv]
    return op.astype(op.permute_dims(out, [0, 2, 1, 3]), _out_dtype(node))


def _conv1d(lw, node, ops):
    op = lw.relax.op
    a = node.attrs
    pad = [int(p) for p in a["padding"]]
    y = lw.bb.emit(op.nn.conv1d(ops[0], ops[1], strides=[int(s) for s in a["stride"]],
                                padding=pad * 2 if len(pad) == 1 else pad,
                                dilation=[int(d) for d in a["dilation"]], groups=int(a["groups"])))
    if len(ops) > 2 and node.inputs[2] is not None:
        y = op.add(y, op.reshape(ops[2], [int(node.inputs[2].type.shape[0]), 1]))
    return y


def _reciprocal(lw, node, ops):
    return lw.relax.op.divide(lw.relax.const(1.0, _out_dtype(node)), ops[0])


def _rounding(kind):
    def lower(lw, node, ops):
        op, x = lw.relax.op, ops[0]
        if not node.outputs[0].type.dtype.is_float:
            return x   # an integer tensor is its own floor, ceil and round
        if kind != "round":
            return getattr(op, kind)(x)
        # half to even, as torch.round: TIR's round rounds halves away from zero on some targets
        c = lw.relax.const
        dt = _out_dtype(node)
        r = op.floor(op.add(x, c(0.5, dt)))
        tie = op.equal(op.subtract(r, x), c(0.5, dt))
        odd = op.equal(op.subtract(r, op.multiply(op.floor(op.multiply(r, c(0.5, dt))), c(2.0, dt))), c(1.0, dt))
        r = op.where(op.logical_and(tie, odd), op.subtract(r, c(1.0, dt)), r)
        big = op.greater_equal(op.abs(x), c(2.0 ** 52 if dt == "float64" else 2.0 ** 23, dt))   # already integers
        return op.where(big, x, r)
    return lower


def _sign(lw, node, ops):
    op, x = lw.relax.op, ops[0]
    if not node.outputs[0].type.dtype.is_float:
        return op.sign(x)
    return op.where(op.isnan(x), lw.relax.const(0.0, _out_dtype(node)), op.sign(x))   # torch.sign(NaN) = 0


def _log1p(lw, x, dt: str):
    """Goldberg's log1p from log: log(u) * x / (u - 1) with u = 1 + x, x itself where u rounds to 1."""
    op, one = lw.relax.op, lw.relax.const(1.0, dt)
    u = op.add(x, one)
    body = op.multiply(op.log(u), op.divide(x, op.subtract(u, one)))
    body = op.where(op.equal(u, lw.relax.const(math.inf, dt)), u, body)   # log1p(inf) = inf, log1p(-inf) NaN
    return op.where(op.equal(u, one), x, body)


def _expm1_log1p(lw, node, ops):
    """Accurate near 0 (see export/onnx_lower.py): Kahan's expm1 and Goldberg's log1p from exp and log."""
    op, x, dt = lw.relax.op, ops[0], _out_dtype(node)
    if node.op == "log1p":
        return _log1p(lw, x, dt)
    one = lw.relax.const(1.0, dt)
    u = op.exp(x)
    um1 = op.subtract(u, one)
    body = op.multiply(um1, op.divide(x, op.log(u)))   # x / log(u) ~ 1: no overflow
    body = op.where(op.isinf(u), u, body)
    body = op.where(op.equal(um1, lw.relax.const(-1.0, dt)), lw.relax.const(-1.0, dt), body)
    return op.where(op.equal(u, one), x, body)


def _exp2_log2(lw, node, ops):
    op, x, dt = lw.relax.op, ops[0], _out_dtype(node)
    if node.op == "exp2":
        return op.power(lw.relax.const(2.0, dt), x)
    return op.divide(op.log(x), lw.relax.const(math.log(2.0), dt))


COMPLEX = {"floor": _rounding("floor"), "ceil": _rounding("ceil"), "round": _rounding("round"), "sign": _sign,
           "expm1": _expm1_log1p, "log1p": _expm1_log1p, "exp2": _exp2_log2, "log2": _exp2_log2,
           "einsum": _einsum, "tril": _band("tril"), "triu": _band("triu"), "expand": _expand, "eye": _eye,
           "full": _full, "arange": _arange, "masked_fill": _masked_fill, "where": _where, "select": _select,
           "stack": _stack, "repeat_interleave": _repeat_interleave, "reciprocal": _reciprocal,
           "rope": _rope, "conv1d": _conv1d, "softplus": _softplus,
           "eq": _compare("equal"), "ne": _compare("not_equal"), "lt": _compare("less"), "le": _compare("less_equal"),
           "gt": _compare("greater"), "ge": _compare("greater_equal"),
           "logical_and": lambda lw, node, ops: lw.relax.op.logical_and(*ops),
           "logical_or": lambda lw, node, ops: lw.relax.op.logical_or(*ops),
           "logical_not": lambda lw, node, ops: lw.relax.op.logical_not(ops[0]),
           "linear": _linear, "layer_norm": _layer_norm, "split": _split, "reshape": _reshape, "squeeze": _squeeze,
           "transpose": _transpose, "slice": _slice, "causal_conv1d": _causal_conv1d, "cast": _cast, "concat": _concat,
           "sum": _reduce("sum"), "mean": _reduce("mean"), "amax": _reduce("amax")}


# IR ops with no Relax lowering, and why (sessa_compiler/op_registry.py reads this; tests/test_op_coverage.py
# fails on an op that is neither lowered nor listed here)
_PASS_MADE = ("made only by the Triton pipeline's passes; TVM lowers the traced graph, which never "
              "holds it")
GAPS = {
    "feedback_lse": _PASS_MADE, "feedback_diag_inverse": _PASS_MADE, "feedback_chunked": _PASS_MADE,
    "scan_chunked": _PASS_MADE, "fused": _PASS_MADE,
}


def graph_to_relax(graph: Graph, lanes: int = 8, schedules=None):
    """(IRModule with "main"(inputs..., params...), the Relax symbol names of the dims)."""
    lw = _Lowerer(graph, lanes, schedules or {})
    mod = lw.build()
    return mod, sorted(lw.symbols)


def unsupported_ops(graph: Graph, lanes: int = 8, schedules=None) -> list:
    lw = _Lowerer(graph, lanes, schedules or {})
    return sorted({n.op for n in graph.nodes if not lw.can_lower(n)})


def unsupported_nodes(graph: Graph, lanes: int = 8, schedules=None) -> list:
    """Each node without a TVM lowering: 'op %value, traced from file:line (`code`)'."""
    lw = _Lowerer(graph, lanes, schedules or {})
    return [f"{lw.why_not(n)} %{n.outputs[0].name}{graph.source_of(n)}" for n in graph.nodes if not lw.can_lower(n)]


def _prefix(graph: Graph, k: int) -> Graph:
    """The graph of the first ``k`` nodes with every value they compute as an output (nothing is dead), sharing
    the nodes, inputs and parameters of ``graph``: what a failed build is bisected on."""
    g = Graph(graph.name)
    g.inputs, g.param_values, g.params, g.sources = graph.inputs, graph.param_values, graph.params, graph.sources
    g.nodes = list(graph.nodes[:k])
    g.outputs = [v for n in g.nodes for v in n.outputs]
    return g


def locate_build_failure(graph: Graph, build, lanes: int = 8, schedules=None, max_builds: int = 12) -> str:
    """The IR op whose Relax form makes TVM's build of ``graph`` fail ('op NAME %value, traced from file:line
    (`code`)'), or '' when it cannot be told: TVM's error names its own functions and variables, not ours, so
    the graph is bisected over its node prefixes (each with every value an output) with ``build(mod)``
    (tvm.compile), at most ``max_builds`` builds; the first prefix that fails ends at the op."""
    nodes = graph.nodes

    def fails(k: int) -> bool:
        try:
            build(graph_to_relax(_prefix(graph, k), lanes, schedules)[0])
        except Exception:  # noqa: BLE001 - any failure of the prefix's build is the failure looked for
            return True
        return False

    lo, hi = 0, len(nodes)   # invariant: prefix lo builds (0: nothing), prefix hi fails
    if not nodes or not fails(hi):
        return ""
    builds = 1
    while hi - lo > 1:
        if builds >= max_builds:
            return ""
        mid = (lo + hi) // 2
        builds += 1
        if fails(mid):
            hi = mid
        else:
            lo = mid
    node = nodes[hi - 1]
    name = f"fallback({node.attrs.get('target')})" if node.op == "fallback" else node.op
    return f"op {name} %{node.outputs[0].name}{graph.source_of(node)}"
