"""The closed set of IR ops, each with its attribute schema and shape rule (the verifier's spec).

An op's ``infer`` returns the expected output types given the node (or raises IRError naming the
op); ``None`` in a returned type's place means "not checked" (the declared type is trusted).
Semantics live in sessa_compiler/semantics (one dict, SEMANTICS), the definition of every op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import sympy

from ..errors import IRError
from .graph import Node, Value
from .types import ArgRef, DType, TensorType, dims_equal, format_dim, is_zero  # noqa: F401  (ArgRef is re-exported)

# Op kinds: used by passes (fusion groups) and by .explain().
CORE = "core"              # attention, feedback, scan, rope: what the compiler exists for
COMPUTE = "compute"        # linear, matmul, einsum, conv1d, embedding, layer_norm, softmax
ELEMENTWISE = "elementwise"
LAYOUT = "layout"          # reshape, permute, ... : no arithmetic
REDUCTION = "reduction"
FACTORY = "factory"        # arange, full, eye, ...: no tensor inputs
FALLBACK = "fallback"


@dataclass
class OpDef:
    name: str
    kind: str
    n_inputs: tuple  # (min, max); max None = unbounded
    attrs: dict = field(default_factory=dict)  # name -> (required: bool, allowed python types)
    infer: Optional[Callable[[Node], list]] = None
    n_outputs: Optional[int] = 1  # None = variable
    doc: str = ""


OPS: dict[str, OpDef] = {}


NUM = (int, float, sympy.Basic)
INTS = (list, tuple)


def register(name, kind, n_inputs, attrs=None, infer=None, n_outputs=1, doc=""):
    OPS[name] = OpDef(name, kind, n_inputs, attrs or {}, infer, n_outputs, doc)


def fail(node: Node, msg: str):
    outs = ", ".join("%" + v.name for v in node.outputs) or "?"
    raise IRError(f"op '{node.op}' ({outs}): {msg}")


def tin(node: Node, i: int) -> TensorType:
    x = node.inputs[i]
    if not isinstance(x, Value):
        fail(node, f"operand {i} must be a tensor value, got literal {x!r}")
    return x.type


def shape_str(shape) -> str:
    return "[" + ", ".join(format_dim(d) for d in shape) + "]"


def norm_dim(node, dim, rank):
    if not -rank <= dim < max(rank, 1):
        fail(node, f"dim {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


def need_eq(node, a, b, what):
    if not dims_equal(a, b):
        fail(node, f"{what}: expected {format_dim(a)}, got {format_dim(b)}")


def broadcast(node, shapes):
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        chosen = 1
        for d in dims:
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(chosen, int) and chosen == 1:
                chosen = d
            elif not dims_equal(chosen, d):
                fail(node, f"shapes {' and '.join(shape_str(s) for s in shapes)} do not broadcast")
        out.append(chosen)
    return tuple(out)


# -- shape rules --------------------------------------------------------------------------------
def same_as_first(node):
    return [tin(node, 0)]


def elementwise_infer(node):
    shapes = [v.type.shape for v in node.value_inputs]
    if not shapes:
        fail(node, "needs at least one tensor operand")
    return [(None, broadcast(node, shapes))]


def compare_infer(node):
    return [(DType("bool"), elementwise_infer(node)[0][1])]


def linear_infer(node):
    x, w = tin(node, 0), tin(node, 1)
    if w.rank != 2:
        fail(node, f"weight must be 2-D (out, in), got {w}")
    need_eq(node, w.shape[1], x.shape[-1], "input features (weight dim 1 vs x last dim)")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = tin(node, 2)
        if b.rank != 1 or not dims_equal(b.shape[0], w.shape[0]):
            fail(node, f"bias must be [{format_dim(w.shape[0])}], got {b}")
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[0],))]


def matmul_infer(node):
    a, b = tin(node, 0), tin(node, 1)
    if a.rank < 1 or b.rank < 1:
        fail(node, "operands must have rank >= 1")
    if a.rank == 1 or b.rank == 1:
        return [(a.dtype, None)]
    need_eq(node, a.shape[-1], b.shape[-2], f"contraction dim of {a} @ {b}")
    batch = broadcast(node, [a.shape[:-2], b.shape[:-2]])
    return [TensorType(a.dtype, batch + (a.shape[-2], b.shape[-1]))]


def einsum_infer(node):
    eq = node.attrs["equation"].replace(" ", "")
    if "->" not in eq or "." in eq:
        return [(None, None)]
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(node.inputs):
        fail(node, f"equation {eq!r} has {len(terms)} operands, node has {len(node.inputs)}")
    sizes: dict = {}
    for i, term in enumerate(terms):
        t = tin(node, i)
        if len(term) != t.rank:
            fail(node, f"operand {i} subscript {term!r} needs rank {len(term)}, got {t}")
        for ch, d in zip(term, t.shape):
            if ch in sizes and not (d == 1 or sizes[ch] == 1 or dims_equal(sizes[ch], d)):
                fail(node, f"index {ch!r} has sizes {format_dim(sizes[ch])} and {format_dim(d)}")
            if ch not in sizes or sizes[ch] == 1:
                sizes[ch] = d
    return [TensorType(tin(node, 0).dtype, tuple(sizes[c] for c in out))]


def layer_norm_infer(node):
    x = tin(node, 0)
    shape = tuple(node.attrs["normalized_shape"])
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i] is not None:
            t = tin(node, i)
            if t.rank != len(shape) or not all(dims_equal(a, b) for a, b in zip(t.shape, shape)):
                fail(node, f"affine operand {i} must be {shape_str(shape)}, got {t}")
    if len(shape) > x.rank or not all(dims_equal(a, b) for a, b in zip(x.shape[x.rank - len(shape):], shape)):
        fail(node, f"normalized_shape {shape_str(shape)} does not end {x}")
    return [x]


def softmax_infer(node):
    x = tin(node, 0)
    norm_dim(node, node.attrs["dim"], x.rank)
    return [x]


def reduce_infer(node):
    x = tin(node, 0)
    dims = node.attrs.get("dims")
    dims = range(x.rank) if dims is None else [norm_dim(node, d, x.rank) for d in dims]
    keep = node.attrs.get("keepdim", False)
    shape = tuple(1 if i in dims else d for i, d in enumerate(x.shape)) if keep else \
        tuple(d for i, d in enumerate(x.shape) if i not in dims)
    return [(None, shape)]


def reshape_infer(node):
    x = tin(node, 0)
    shape = tuple(node.attrs["shape"])
    if -1 in shape:
        return [(x.dtype, None)]
    nx_ = sympy.Mul(*[sympy.sympify(d) for d in x.shape])
    ny = sympy.Mul(*[sympy.sympify(d) for d in shape])
    if not is_zero(nx_ - ny):
        fail(node, f"cannot reshape {x} ({nx_} elements) to {shape_str(shape)} ({ny} elements)")
    return [TensorType(x.dtype, shape)]


def permute_infer(node):
    x = tin(node, 0)
    dims = [norm_dim(node, d, x.rank) for d in node.attrs["dims"]]
    if sorted(dims) != list(range(x.rank)):
        fail(node, f"dims {node.attrs['dims']} are not a permutation of rank {x.rank}")
    return [TensorType(x.dtype, tuple(x.shape[d] for d in dims))]


def transpose_infer(node):
    x = tin(node, 0)
    a, b = (norm_dim(node, node.attrs[k], x.rank) for k in ("dim0", "dim1"))
    s = list(x.shape)
    s[a], s[b] = s[b], s[a]
    return [TensorType(x.dtype, tuple(s))]


def unsqueeze_infer(node):
    x = tin(node, 0)
    d = norm_dim(node, node.attrs["dim"], x.rank + 1)
    return [TensorType(x.dtype, x.shape[:d] + (1,) + x.shape[d:])]


def squeeze_infer(node):
    x = tin(node, 0)
    dims = [norm_dim(node, d, x.rank) for d in node.attrs["dims"]]
    return [TensorType(x.dtype, tuple(s for i, s in enumerate(x.shape) if not (i in dims and s == 1)))]


def expand_infer(node):
    x = tin(node, 0)
    shape = list(node.attrs["shape"])
    lead = len(shape) - x.rank
    if lead < 0:
        fail(node, f"cannot expand {x} to fewer dims {shape_str(shape)}")
    for i, d in enumerate(x.shape):
        if shape[lead + i] == -1:
            shape[lead + i] = d
        elif not (d == 1 or dims_equal(d, shape[lead + i])):
            fail(node, f"cannot expand dim {i} of {x} to {format_dim(shape[lead + i])}")
    return [TensorType(x.dtype, tuple(shape))]


def slice_infer(node):
    x = tin(node, 0)
    d = norm_dim(node, node.attrs["dim"], x.rank)
    start, end, step = node.attrs.get("start", 0), node.attrs.get("end"), node.attrs.get("step", 1)
    size = x.shape[d]
    if end is None or (isinstance(end, int) and end >= 2**62):
        end = size
    if isinstance(size, int) and isinstance(start, int) and isinstance(end, int):   # as Python clamps them
        n = len(range(size)[slice(start, end, step)])
        s = list(x.shape)
        s[d] = n
        return [TensorType(x.dtype, tuple(s))]
    # a bound that counts from the end stops at 0 (x[:, -3:] at T = 2 is the whole sequence)
    if isinstance(start, int) and start < 0:
        start = sympy.Max(size + start, 0)
    if isinstance(end, int) and end < 0:
        end = sympy.Max(size + end, 0)
    # symbolic min(end, size): trust the declared dim when it cannot be decided
    n = sympy.simplify((sympy.Min(sympy.sympify(end), sympy.sympify(size)) - start + step - 1) // step)
    if not n.is_Integer and n.has(sympy.Min, sympy.Max, sympy.floor):
        return [(x.dtype, None)]
    s = list(x.shape)
    s[d] = n
    return [TensorType(x.dtype, tuple(s))]


def select_infer(node):
    x = tin(node, 0)
    d = norm_dim(node, node.attrs["dim"], x.rank)
    return [TensorType(x.dtype, x.shape[:d] + x.shape[d + 1:])]


def split_infer(node):
    x = tin(node, 0)
    d = norm_dim(node, node.attrs["dim"], x.rank)
    sizes = node.attrs["sizes"]
    total = (sum(sizes) if all(type(s) is int for s in sizes)   # static sizes (the usual case): no sympy
             else sympy.Add(*[sympy.sympify(s) for s in sizes]))
    need_eq(node, x.shape[d], total, f"sum of split sizes along dim {node.attrs['dim']}")
    if len(node.outputs) != len(sizes):
        fail(node, f"{len(sizes)} split sizes but {len(node.outputs)} outputs")
    return [TensorType(x.dtype, x.shape[:d] + (s,) + x.shape[d + 1:]) for s in sizes]


def concat_infer(node):
    ts = [v.type for v in node.value_inputs]
    d = norm_dim(node, node.attrs["dim"], ts[0].rank)
    for t in ts[1:]:
        if t.rank != ts[0].rank or not all(dims_equal(a, b) for i, (a, b) in enumerate(zip(t.shape, ts[0].shape)) if i != d):
            fail(node, f"operands {ts[0]} and {t} differ outside dim {d}")
    s = list(ts[0].shape)
    s[d] = sympy.Add(*[sympy.sympify(t.shape[d]) for t in ts])
    return [TensorType(ts[0].dtype, tuple(s))]


def stack_infer(node):
    ts = [v.type for v in node.value_inputs]
    for t in ts[1:]:
        if not t.same_as(ts[0]):
            fail(node, f"stack needs equal operand types, got {ts[0]} and {t}")
    d = norm_dim(node, node.attrs["dim"], ts[0].rank + 1)
    return [TensorType(ts[0].dtype, ts[0].shape[:d] + (len(ts),) + ts[0].shape[d:])]


def repeat_interleave_infer(node):
    x = tin(node, 0)
    d = norm_dim(node, node.attrs["dim"], x.rank)
    s = list(x.shape)
    s[d] = s[d] * node.attrs["repeats"]
    return [TensorType(x.dtype, tuple(s))]


def cast_infer(node):
    return [TensorType(node.attrs["dtype"], tin(node, 0).shape)]


def factory_infer(node):
    return [(node.attrs.get("dtype"), None)]


def embedding_infer(node):
    w, idx = tin(node, 0), tin(node, 1)
    if w.rank != 2:
        fail(node, f"weight must be 2-D (vocab, dim), got {w}")
    if idx.dtype.is_float:
        fail(node, f"indices must be integers, got {idx}")
    return [TensorType(w.dtype, idx.shape + (w.shape[1],))]


def conv1d_infer(node):
    x, w = tin(node, 0), tin(node, 1)
    if x.rank != 3 or w.rank != 3:
        fail(node, f"expects x [B, C, T] and weight [Cout, C/groups, K], got {x} and {w}")
    return [(x.dtype, None)]


def causal_conv1d_infer(node):
    x, w = tin(node, 0), tin(node, 1)
    if x.rank != 3 or w.rank != 2:
        fail(node, f"expects x [B, T, C] and weight [C, K], got {x} and {w}")
    need_eq(node, w.shape[0], x.shape[2], "channels (weight dim 0 vs x dim 2)")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        need_eq(node, tin(node, 2).shape[0], x.shape[2], "bias size")
    return [x]


def rope_infer(node):
    x, f = tin(node, 0), tin(node, 1)
    if x.rank != 4:
        fail(node, f"expects x [B, T, H, d], got {x}")
    if f.rank != 1:
        fail(node, f"inv_freq must be 1-D [d/2], got {f}")
    need_eq(node, x.shape[3], 2 * f.shape[0], "head width d = 2 * len(inv_freq)")
    return [x]


def attention_infer(node):
    q, k, v = tin(node, 0), tin(node, 1), tin(node, 2)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.rank != 4:
            fail(node, f"{name} must be [B, T, heads, d], got {t}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(node, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    need_eq(node, q.shape[0], k.shape[0], "batch of k")
    need_eq(node, q.shape[1], k.shape[1], "sequence length of k")
    need_eq(node, q.shape[3], k.shape[3], "head width of k")
    if not all(dims_equal(a, b) for a, b in zip(k.shape, v.shape[:3])):
        fail(node, f"k {k} and v {v} disagree on [B, T, Hkv]")
    hq, hkv = q.shape[2], k.shape[2]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        fail(node, f"query heads {hq} is not a multiple of key/value heads {hkv}")
    if node.attrs.get("rope", False):
        if len(node.inputs) < 4:
            fail(node, "rope=True needs a fourth operand inv_freq [d/2]")
        need_eq(node, q.shape[3], 2 * tin(node, 3).shape[0], "head width d = 2 * len(inv_freq)")
    if node.attrs.get("key_padding", False):
        if len(node.inputs) < 5:
            fail(node, "key_padding=True needs a fifth operand mask [B, T] (operand 3: inv_freq, or None)")
        m = tin(node, 4)
        if m.rank != 2:
            fail(node, f"the key-padding mask must be [B, T], got {m}")
        need_eq(node, m.shape[0], q.shape[0], "batch of the key-padding mask")
        need_eq(node, m.shape[1], k.shape[1], "length of the key-padding mask")
        if node.attrs.get("empty_rows", "mean") not in ("mean", "nan"):
            fail(node, f"empty_rows must be 'mean' or 'nan', got {node.attrs['empty_rows']!r}")
    elif len(node.inputs) > 4 and node.inputs[4] is not None:
        fail(node, "a fifth operand (a key-padding mask) needs key_padding=True")
    return [TensorType(q.dtype, q.shape[:3] + (v.shape[3],))]


def feedback_infer(node):
    f, qb, kb, g = (tin(node, i) for i in range(4))
    for name, t in (("f", f), ("q_b", qb), ("k_b", kb)):
        if t.rank != 3:
            fail(node, f"{name} must be [B, T, width], got {t}")
    if g.rank != 2:
        fail(node, f"gamma must be [B, T], got {g}")
    for name, t in (("q_b", qb), ("k_b", kb)):
        need_eq(node, f.shape[0], t.shape[0], f"batch of {name}")
        need_eq(node, f.shape[1], t.shape[1], f"sequence length of {name}")
    need_eq(node, qb.shape[2], kb.shape[2], "width of k_b vs q_b")
    need_eq(node, f.shape[0], g.shape[0], "batch of gamma")
    need_eq(node, f.shape[1], g.shape[1], "sequence length of gamma")
    return [f]


def tri_solve_infer(node):
    A, b = tin(node, 0), tin(node, 1)
    if A.rank < 2 or b.rank < 2:
        fail(node, f"weights and right-hand side must have rank >= 2, got {A} and {b}")
    need_eq(node, A.shape[-1], A.shape[-2], "weights must be square in their last two dims")
    need_eq(node, A.shape[-1], b.shape[-2], "weights' size vs the right-hand side's rows")
    if A.rank > b.rank:
        fail(node, f"weights {A} have more leading dims than the right-hand side {b}")
    for i, d in enumerate(A.shape[:-2]):
        need_eq(node, d, b.shape[b.rank - A.rank + i], f"leading dim {i} of the weights")
    if A.dtype != b.dtype:
        fail(node, f"weights and right-hand side dtypes differ: {A.dtype} vs {b.dtype}")
    return [b]


def scan_infer(node):
    u, delta, A, Bm, Cm, Dv = (tin(node, i) for i in range(6))
    if u.rank != 3 or A.rank != 2 or Bm.rank != 3 or Dv.rank != 1:
        fail(node, f"expects u [B, T, Din], delta like u, A [Din, N], B/C [B, T, N], D [Din]; "
                   f"got {u}, {delta}, {A}, {Bm}, {Cm}, {Dv}")
    if not delta.same_as(u) and not all(dims_equal(a, b) for a, b in zip(delta.shape, u.shape)):
        fail(node, f"delta {delta} must match u {u}")
    need_eq(node, A.shape[0], u.shape[2], "A rows = Din")
    need_eq(node, Bm.shape[2], A.shape[1], "B width = N")
    need_eq(node, Cm.shape[2], A.shape[1], "C width = N")
    need_eq(node, Dv.shape[0], u.shape[2], "D size = Din")
    return [u]


def fallback_infer(node):
    return [(None, None)] * len(node.outputs)


# -- the table ----------------------------------------------------------------------------------
register("attention", CORE, (3, 5), {"scale": (True, (float,)), "causal": (True, (bool,)),
                                     "rope": (False, (bool,)), "key_padding": (False, (bool,)),
                                     "empty_rows": (False, (str,)), "empty_grad": (False, (bool,))},
         attention_infer,
         doc="softmax_{j<=t}(q_t.k_j*scale) @ v; q [B,T,H,d], k/v [B,T,Hkv,d], head h reads kv h//(H/Hkv); "
             "rope=True rotates q and k (interleaved pairs, position = index along T) with operand 3 inv_freq; "
             "key_padding=True: operand 4 is a key-padding mask [B, T] (nonzero = keep; operand 3 is None "
             "without rope); a row with no visible key gives the mean of v over all keys (empty_rows='mean') "
             "or NaN (empty_rows='nan'); empty_grad=False: such a row's scores get no gradient (a masked_fill with a "
             "finite value; default True: an additive finite mask's gradient); see semantics.core.attention_ref")
register("feedback", CORE, (4, 4), {"scale": (True, (float,))}, feedback_infer,
         doc="s[t] = f[t] + gamma[t] * softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; s[0] = f[0]")
register("tri_solve", CORE, (2, 2), {"upper": (True, (bool,)), "unitriangular": (True, (bool,))}, tri_solve_infer,
         doc="x with A x = b for triangular A [..., T, T] (explicit weights) and b [..., T, N]: the general "
             "form of feedback when its weights cannot be factored into the feedback op (T x T in memory)")
register("scan", CORE, (6, 6), {}, scan_infer,
         doc="Mamba-1 selective scan: h_t = exp(delta_t*A) h_{t-1} + (delta_t*u_t) (x) B_t; y_t = h_t C_t + D u_t")
register("rope", CORE, (2, 2), {}, rope_infer,
         doc="interleaved rotary embedding of x [B,T,H,d] at positions 0..T-1")

register("linear", COMPUTE, (2, 3), {}, linear_infer)
register("matmul", COMPUTE, (2, 2), {}, matmul_infer)
register("einsum", COMPUTE, (1, None), {"equation": (True, (str,))}, einsum_infer)
register("layer_norm", COMPUTE, (1, 3), {"normalized_shape": (True, INTS), "eps": (True, (float,))},
         layer_norm_infer)
register("softmax", COMPUTE, (1, 1), {"dim": (True, (int,))}, softmax_infer)
register("log_softmax", COMPUTE, (1, 1), {"dim": (True, (int,))}, softmax_infer)
register("embedding", COMPUTE, (2, 2), {}, embedding_infer)
register("conv1d", COMPUTE, (2, 3), {"stride": (True, INTS), "padding": (True, INTS),
                                     "dilation": (True, INTS), "groups": (True, (int,))}, conv1d_infer)
register("causal_conv1d", COMPUTE, (2, 3), {}, causal_conv1d_infer,
         doc="depthwise causal conv over T: x [B,T,C], weight [C,K], left-padded by K-1")

# The elementwise op families: the one place their names are listed (frontend, passes and every target's
# registry read them from here; tests/test_op_coverage.py checks each target covers them or says why not).
UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "relu", "abs", "sin", "cos",
         "logical_not", "softplus", "gelu", "erf", "reciprocal", "floor", "ceil", "round", "sign", "expm1", "log1p",
         "exp2", "log2", "detach")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "logical_and", "logical_or")
COMPARE = ("eq", "ne", "lt", "le", "gt", "ge")
LOGICAL = ("logical_not", "logical_and", "logical_or")   # bool in, bool out
for _name in UNARY:
    register(_name, ELEMENTWISE, (1, 1),
             {"approximate": (False, (str,))} if _name == "gelu" else
             ({"beta": (False, NUM), "threshold": (False, NUM)} if _name == "softplus" else {}),
             elementwise_infer)
for _name in BINARY:
    register(_name, ELEMENTWISE, (2, 2), {}, elementwise_infer)
for _name in COMPARE:
    register(_name, ELEMENTWISE, (2, 2), {}, compare_infer)
register("where", ELEMENTWISE, (3, 3), {}, elementwise_infer)
register("masked_fill", ELEMENTWISE, (3, 3), {}, elementwise_infer)
register("cast", ELEMENTWISE, (1, 1), {"dtype": (True, (DType,))}, cast_infer)
register("tril", ELEMENTWISE, (1, 1), {"diagonal": (True, (int,))}, same_as_first)
register("triu", ELEMENTWISE, (1, 1), {"diagonal": (True, (int,))}, same_as_first)

# layout ops whose output is a view of their one input (not concat, stack, repeat_interleave: new tensors)
VIEWS = frozenset({"reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select"})


def view_root(v):
    """The IR value ``v`` is a view of through VIEWS ops (``v`` itself when it is computed, an input or a
    parameter)."""
    while v.producer is not None and v.producer.op in VIEWS:
        v = v.producer.inputs[0]
    return v


register("reshape", LAYOUT, (1, 1), {"shape": (True, INTS)}, reshape_infer)
register("permute", LAYOUT, (1, 1), {"dims": (True, INTS)}, permute_infer)
register("transpose", LAYOUT, (1, 1), {"dim0": (True, (int,)), "dim1": (True, (int,))}, transpose_infer)
register("unsqueeze", LAYOUT, (1, 1), {"dim": (True, (int,))}, unsqueeze_infer)
register("squeeze", LAYOUT, (1, 1), {"dims": (True, INTS)}, squeeze_infer)
register("expand", LAYOUT, (1, 1), {"shape": (True, INTS)}, expand_infer)
register("slice", LAYOUT, (1, 1), {"dim": (True, (int,)), "start": (True, NUM), "end": (True, NUM),
                                   "step": (True, (int,))}, slice_infer)
register("select", LAYOUT, (1, 1), {"dim": (True, (int,)), "index": (True, NUM)}, select_infer)
register("split", LAYOUT, (1, 1), {"sizes": (True, INTS), "dim": (True, (int,))}, split_infer, n_outputs=None)
register("concat", LAYOUT, (1, None), {"dim": (True, (int,))}, concat_infer)
register("stack", LAYOUT, (1, None), {"dim": (True, (int,))}, stack_infer)
register("repeat_interleave", LAYOUT, (1, 1), {"repeats": (True, (int,)), "dim": (True, (int,))},
         repeat_interleave_infer)

for _name in ("sum", "mean", "amax"):
    register(_name, REDUCTION, (1, 1), {"dims": (False, INTS), "keepdim": (False, (bool,))}, reduce_infer)

register("arange", FACTORY, (0, 0), {"start": (True, NUM), "end": (True, NUM), "step": (True, NUM),
                                     "dtype": (True, (DType,))}, factory_infer)
register("full", FACTORY, (0, 0), {"shape": (True, INTS), "value": (True, NUM + (bool,)),
                                   "dtype": (True, (DType,))}, factory_infer)
register("eye", FACTORY, (0, 0), {"n": (True, NUM), "dtype": (True, (DType,))}, factory_infer)

register("fallback", FALLBACK, (0, None), {"target": (True, (str,)), "args": (True, INTS),
                                           "kwargs": (True, (dict,))}, fallback_infer, n_outputs=None,
         doc="calls the torch op `target`; args/kwargs hold literals and arg(i) placeholders for operand i")


# the core ops as written by the frontend (ir/ops_chunked.py adds their blocked forms, also of kind CORE)
CORE_OPS = tuple(name for name, d in OPS.items() if d.kind == CORE)


def literal_ok(node: Node, i: int, x) -> bool:
    """Literal scalars are allowed as operands of elementwise ops only."""
    return OPS[node.op].kind == ELEMENTWISE and isinstance(x, (int, float, bool, sympy.Basic))



# What to change when a fallback's torch op has no form in an export (export_onnx / export_tvm name it)
_DENSE_SOLVE = ("a dense linear solve has no ONNX or TVM form: if the matrix is lower triangular with a unit "
                "diagonal (the Sessa feedback), write torch.linalg.solve_triangular(A, b, upper=False, "
                "unitriangular=True) so the compiler recognises it; if the matrix is a constant, precompute its "
                "inverse as a buffer and multiply by it; else keep the solve outside the exported module")
FALLBACK_ADVICE = {
    "aten.linalg_solve.default": _DENSE_SOLVE, "aten.linalg_solve_ex.default": _DENSE_SOLVE,
    "aten._linalg_solve_ex.default": _DENSE_SOLVE, "aten.linalg_inv.default": _DENSE_SOLVE,
    "aten.linalg_inv_ex.default": _DENSE_SOLVE,
}
GENERIC_FALLBACK_ADVICE = ("rewrite that line with ops the IR has (docs/exports.md lists them) or move it out of the "
                           "exported module")
