"""Recognisers: rewrite ordinary-op subgraphs into the IR's attention, feedback and causal_conv1d ops.

Each recogniser starts from an anchor (a softmax whose logits come from a contraction and whose
probabilities multiply values; a triangular solve whose matrix is built from a strictly causal
softmax; a depthwise conv1d padded on the left), walks to the region's sources through layout ops,
proposes canonical ops with adapters, and accepts the proposal only when ``probe`` shows that the
original subgraph and the canonical ops agree numerically at several sequence lengths. A region
that does not match stays as ordinary ops (still correct, just not fused), and the reason is kept
for ``explain()``. The walks are deliberately loose (any diagonal scaling of the weights, either orientation of
the system, any fixed channel order of a rotation): equivalence is decided by the probe, not by spelling.
docs/recognition.md lists the idioms covered and the near misses left alone.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field

import sympy
import torch

from ..semantics import SEMANTICS, attention_ref, feedback_ref, rope_ref
from ..semantics.core import EMPTY_ROWS
from ..ir.graph import Graph, Node, Value
from ..ir.ops import ArgRef
from ..ir.ops import COMPUTE, CORE, ELEMENTWISE, OPS
from ..ir.types import DType, TensorType, dims_equal, sym
from ..ir.verify import verify_graph
from .probe import (KEYMASK_BATCH, PROBE_BATCH, PROBE_IMPLS, PROBE_LENGTHS, ProbeStats, Step, apply_steps, probe,
                    probe_memo, probe_param, region_nodes)

WALK_LAYOUT = {"reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "repeat_interleave"}
B, T = sym("B"), sym("T")
# The batch and sequence sizes the recognisers match layouts against: the symbols B and T of a graph traced with
# dynamic sizes, or the integers of a graph with static ones (torch.compile's first graph of a module); see
# recognise(). The probes then run at those sizes only, where the graph is used.
_SIZES: contextvars.ContextVar = contextvars.ContextVar("sessa_recognise_sizes", default=(B, T))


def _bt() -> tuple:
    return _SIZES.get()


@dataclass
class Report:
    """What recognition found: accepted rewrites and rejected candidates, for explain()."""

    accepted: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    probes: ProbeStats | None = None   # probes run, and reused for structurally identical regions (frontend/probe.py)
    shared: list = field(default_factory=list)   # identical layers traced once (frontend/repeated.py)


class Analysis:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.users = graph.users()
        data = set(graph.inputs)
        for n in graph.nodes:
            if any(v in data for v in n.value_inputs):
                data.update(n.outputs)
        self.data = data

    def is_data(self, x) -> bool:
        return isinstance(x, Value) and x in self.data

    def single_user(self, v: Value):
        us = self.users.get(v, [])
        return us[0] if len(us) == 1 and v not in self.graph.outputs else None

    def walk_back(self, v: Value, fits=None, allow_cast=True) -> Value:
        """Follow layout ops (and widening casts) back towards the value they rearrange.

        Returns the deepest value on that chain for which ``fits(type)`` holds (the value itself
        when none does), so a source is taken before as many layout ops as an adapter can absorb.
        """
        chain = [v]
        while chain[-1].producer is not None:
            n = chain[-1].producer
            if n.op in WALK_LAYOUT or (allow_cast and n.op == "cast" and _wider(n.output.type.dtype, n.inputs[0].type.dtype)):
                chain.append(n.inputs[0])
            else:
                break
        for c in reversed(chain):
            if fits is None or fits(c.type):
                return c
        return v

    def walk_forward(self, v: Value) -> list:
        """The chain v, then each single consumer that is a layout op or a cast."""
        chain = [v]
        while True:
            u = self.single_user(chain[-1])
            if u is None or not (u.op in WALK_LAYOUT or u.op == "cast") or len(u.outputs) != 1:
                return chain
            chain.append(u.output)


def _wider(a: DType, b: DType) -> bool:
    order = {"bf16": 0, "f16": 0, "f32": 1, "f64": 2}
    return a.is_float and b.is_float and order[a.name] >= order[b.name]


# -- logits: the contraction behind a softmax, through whatever masking and row handling follows --------
CONTRACTIONS = ("matmul", "einsum")
STOP_KINDS = (CORE, COMPUTE)  # the walk never crosses another projection, softmax or core op


def is_square_in_t(t: TensorType) -> bool:
    """A [..., T, T] value: logits or weights over (query position, key position)."""
    B, T = _bt()
    return t.rank >= 2 and dims_equal(t.shape[-1], T) and dims_equal(t.shape[-2], T)


def data_cone(A: Analysis, v: Value, stop=None) -> tuple:
    """Walk back from v through data values. Returns (contractions reached, values on the way). The walk
    stops at contractions of two data operands (collected), at compute and core ops, and at ``stop``."""
    found, seen, stack = [], set(), [v]
    while stack:
        x = stack.pop()
        if x in seen or x.producer is None or (stop is not None and x in stop):
            continue
        seen.add(x)
        n = x.producer
        if n.op in CONTRACTIONS and len(n.inputs) == 2 and all(A.is_data(i) for i in n.inputs):
            if n not in found:
                found.append(n)
            continue
        if OPS[n.op].kind in STOP_KINDS:
            continue
        stack.extend(i for i in n.value_inputs if A.is_data(i))
    return found, seen


def _literal_scale(n: Node, data: Value):
    """The factor a mul/div node with one literal operand applies to its data operand, or None."""
    lits = [x for x in n.inputs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if len(lits) != 1 or len(n.inputs) != 2:
        return None
    if n.op == "mul":
        return float(lits[0])
    if n.op == "div" and n.inputs[0] is data and lits[0]:
        return 1.0 / float(lits[0])
    return None


def logits_chain(A: Analysis, v: Value):
    """Find the contraction whose [.., T, T] product reaches v (a softmax's input, or a system matrix):
    returns (contraction node, the product of literal scales applied between them, values on the way),
    or None when there is not exactly one such contraction. The walk is structural only; recognisers
    prove a candidate with ``probe`` before they use it."""
    found, seen = data_cone(A, v)
    found = [n for n in found if is_square_in_t(n.output.type)]
    if len(found) != 1:
        return None
    L = found[0]
    # values between the contraction and v: descendants of L.output among the walked values
    between, stack = set(), [L.output]
    while stack:
        x = stack.pop()
        for u in A.users.get(x, []):
            for o in u.outputs:
                if o in seen and o not in between:
                    between.add(o)
                    stack.append(o)
    scale = 1.0
    for x in between:
        n = x.producer
        if n.op in ("mul", "div"):
            data = [i for i in n.inputs if A.is_data(i)]
            f = _literal_scale(n, data[0]) if len(data) == 1 else None
            scale *= f if f is not None else 1.0
    return L, scale, between


def walk_back_scaled(A: Analysis, v: Value, fits):
    """Like Analysis.walk_back, also through mul/div by a literal: returns (source, literal factor
    between source and v). The deepest value that fits is taken."""
    chain, factors = [v], [1.0]
    while chain[-1].producer is not None:
        n = chain[-1].producer
        data = [i for i in n.inputs if A.is_data(i)]
        if n.op in WALK_LAYOUT or (n.op == "cast" and _wider(n.output.type.dtype, n.inputs[0].type.dtype)):
            chain.append(n.inputs[0])
            factors.append(factors[-1])
        elif n.op in ("mul", "div") and len(data) == 1 and _literal_scale(n, data[0]) is not None:
            chain.append(data[0])
            factors.append(factors[-1] * _literal_scale(n, data[0]))
        else:
            break
    for c, f in zip(reversed(chain), reversed(factors)):
        if fits(c.type):
            return c, f
    return v, 1.0


def contraction_width(n: Node):
    """The size of the contracted dimension of a 2-operand matmul/einsum."""
    a, b = n.inputs
    if n.op == "matmul":
        return a.type.shape[-1]
    eq = n.attrs["equation"]
    lhs, out = eq.split("->")
    ta, tb = lhs.split(",")
    shared = [c for c in ta if c in tb and c not in out]
    if len(shared) != 1:
        return None
    return a.type.shape[ta.index(shared[0])]


# -- layout adapters ------------------------------------------------------------------------------------
def to_bthd(t: TensorType, e):
    """Candidate step lists turning a source of type t into [B, T, n, e]; each with n."""
    B, T = _bt()
    s = t.shape
    out = []
    if t.rank == 3 and dims_equal(s[0], B) and dims_equal(s[1], T) and isinstance(s[2], int) and isinstance(e, int) \
            and s[2] % e == 0:
        out.append(([Step("reshape", {"shape": [B, T, s[2] // e, e]})], s[2] // e))
    if t.rank == 4 and dims_equal(s[0], B) and dims_equal(s[3], e):
        if dims_equal(s[1], T) and isinstance(s[2], int):
            out.append(([], s[2]))
        if dims_equal(s[2], T) and isinstance(s[1], int):
            out.append(([Step("transpose", {"dim0": 1, "dim1": 2})], s[1]))
    if t.rank == 3 and dims_equal(s[1], T) and dims_equal(s[2], e):
        n = sympy.simplify(sympy.sympify(s[0]) / B)
        if n.is_Integer:
            out.append(([Step("reshape", {"shape": [B, int(n), T, e]}), Step("transpose", {"dim0": 1, "dim1": 2})], int(n)))
    return out


def from_bthd(t: TensorType, H: int, e):
    """Candidate step lists turning [B, T, H, e] into type t."""
    B, T = _bt()
    s = t.shape
    out = []
    if t.rank == 4 and all(dims_equal(a, b) for a, b in zip(s, (B, T, H, e))):
        out.append([])
    if t.rank == 3 and all(dims_equal(a, b) for a, b in zip(s, (B, T, H * e))):
        out.append([Step("reshape", {"shape": [B, T, H * e]})])
    if t.rank == 4 and all(dims_equal(a, b) for a, b in zip(s, (B, H, T, e))):
        out.append([Step("transpose", {"dim0": 1, "dim1": 2})])
    if t.rank == 3 and all(dims_equal(a, b) for a, b in zip(s, (B * H, T, e))):
        out.append([Step("transpose", {"dim0": 1, "dim1": 2}), Step("reshape", {"shape": [B * H, T, e]})])
    return out


def to_btc(t: TensorType):
    """Candidate step lists turning a source into [B, T, C] (single-head feedback operands)."""
    B, T = _bt()
    s = t.shape
    if t.rank == 3 and dims_equal(s[0], B) and dims_equal(s[1], T):
        return [[]]
    if t.rank == 4 and dims_equal(s[0], B) and dims_equal(s[2], T) and s[1] == 1:
        return [[Step("squeeze", {"dims": [1]})]]
    return []


def to_bt(t: TensorType):
    B, T = _bt()
    s = t.shape
    if t.rank == 2 and dims_equal(s[0], B) and dims_equal(s[1], T):
        return [[]]
    if t.rank == 3 and dims_equal(s[0], B) and dims_equal(s[1], T) and s[2] == 1:
        return [[Step("squeeze", {"dims": [2]})]]
    return []


# The match tolerance of a probe: float64's, whatever casts the region goes through. The probes evaluate a cast
# between float types as the identity (probe._wide_cast), so a region of a bf16 model is compared with the
# proposal by what it means; the tolerance used to be the narrowest cast's rounding (0.3 of the output's scale for
# bf16), under which ALiBi biases and temperatures passed for plain attention.
MATCH_TOL = 1e-8


def _emit_steps(g: Graph, x: Value, steps, index: int):
    """Insert the adapter ops before node position ``index``; returns (value, new index)."""
    for s in steps:
        t = _step_type(x.type, s)
        x = g.make_node(s.op, [x], s.attrs, [t], index=index).output
        index += 1
    return x, index


def _step_type(t: TensorType, s: Step) -> TensorType:
    shape = list(t.shape)
    if s.op == "reshape":
        shape = list(s.attrs["shape"])
    elif s.op == "transpose":
        a, b = s.attrs["dim0"] % t.rank, s.attrs["dim1"] % t.rank
        shape[a], shape[b] = shape[b], shape[a]
    elif s.op == "squeeze":
        shape = [d for i, d in enumerate(shape) if i not in [x % t.rank for x in s.attrs["dims"]]]
    elif s.op == "cast":
        return TensorType(s.attrs["dtype"], t.shape)
    return TensorType(t.dtype, tuple(shape))


def _insert_index(g: Graph, output: Value) -> int:
    return g.nodes.index(output.producer)


# -- attention ------------------------------------------------------------------------------------------
def recognise_attention(g: Graph, report: Report) -> int:
    count = 0
    for s in [n for n in g.nodes if n.op == "softmax"]:
        if s not in g.nodes:
            continue
        A = Analysis(g)
        if not A.is_data(s.inputs[0]) or s.attrs["dim"] not in (-1, s.output.type.rank - 1):
            continue
        lc = logits_chain(A, s.inputs[0])
        if lc is None:
            continue
        L, chain_scale, _ = lc
        # forward: probabilities (through masks/casts) into the contraction with v
        p = s.output
        P = None
        while True:
            u = A.single_user(p)
            if u is None:
                break
            if u.op in ("matmul", "einsum") and len(u.inputs) == 2 and u.inputs[0] is p:
                P = u
                break
            if OPS[u.op].kind == ELEMENTWISE and sum(A.is_data(x) for x in u.inputs) == 1:
                p = u.output
                continue
            break
        if P is None:
            continue
        d = contraction_width(L)
        if d is None:
            continue
        # k enters the contraction transposed; walking back past layout ops removes that
        (qs, fq), (ks, fk) = (walk_back_scaled(A, x, lambda t: bool(to_bthd(t, d))) for x in L.inputs)
        vs = A.walk_back(P.inputs[1], lambda t: any(to_bthd(t, e) for e in {d, P.output.type.shape[-1]}))
        ok = _try_attention(g, A, s, L, P, qs, ks, vs, d, chain_scale * fq * fk, report)
        count += ok
    return count


def _key_mask_sources(s, L) -> list:
    """Graph inputs of type [B, T] that the scores are computed from other than through the contraction L (q . k):
    key-padding mask candidates."""
    extra = _graph_inputs_behind(s.inputs[0], stop={L.output})
    return sorted((x for x in extra if to_bt(x.type) == [[]]), key=lambda x: x.name)


def _try_attention(g, A, s, L, P, qs, ks, vs, d, chain_scale, report) -> bool:
    outs = A.walk_forward(P.output)
    masks = _key_mask_sources(s, L)
    # without a key-padding mask first; then each [B, T] input behind the scores as one, for each meaning of a
    # row with no visible key (mean of v over all keys: finite fills; NaN: -inf fills)
    # (the mean has two gradients: an additive finite fill passes the emptied row's scores one, a replacing
    # masked_fill none: empty_grad)
    variants = [(None, None, True)] + [(m, e, g) for m in masks for e in EMPTY_ROWS
                                       for g in ((True, False) if e == "mean" else (True,))]
    scales = [chain_scale] + ([1.0 / math.sqrt(d)] if isinstance(d, int) and not math.isclose(chain_scale, 1 / math.sqrt(d)) else [])
    dvs = [d] + [x for x in {P.output.type.shape[-1]} if x != d and isinstance(x, int)]
    where = f"softmax %{s.output.name}"
    for qa, H in to_bthd(qs.type, d):
        for ka, Hkv in to_bthd(ks.type, d):
            if H % Hkv:
                continue
            for dv in dvs:
                for va, Hv in to_bthd(vs.type, dv):
                    if Hv != Hkv:
                        continue
                    for y in reversed(outs):
                        for oa in from_bthd(y.type, H, dv):
                            for scale in scales:
                                for m, empty, egrad in variants:
                                    def canonical(inp, binding, qa=qa, ka=ka, va=va, oa=oa, scale=scale, m=m,
                                                  empty=empty, egrad=egrad):
                                        q = apply_steps(inp[qs], qa, binding)
                                        k = apply_steps(inp[ks], ka, binding)
                                        v = apply_steps(inp[vs], va, binding)
                                        out = attention_ref(q, k, v, scale, True, None,
                                                            None if m is None else inp[m], empty or "mean",
                                                            egrad)
                                        return apply_steps(out, oa, binding)

                                    srcs = {qs: "normal", ks: "normal", vs: "normal"}
                                    if m is not None:
                                        if m in srcs:
                                            continue
                                        srcs[m] = "keymask"
                                    # a row the mask empties has the same values under an additive and a
                                    # replacing (masked_fill) mask, not the same gradient: probed too
                                    err = probe(g, srcs, y, canonical, batch=KEYMASK_BATCH if m is not None
                                                else PROBE_BATCH, grad=empty == "mean", large=True)
                                    tol = MATCH_TOL
                                    if err is not None and err <= tol:
                                        _rewrite_attention(g, qs, ks, vs, qa, ka, va, oa, y, scale, dv, H, m, empty,
                                                           egrad)
                                        masked = "" if m is None else (
                                            f", key-padding mask %{m.name} (a row with no visible key: "
                                            f"{'the mean of v over all keys' if empty == 'mean' else 'NaN'}"
                                            f"{'' if egrad else ', its scores without gradient (a replacing fill)'})")
                                        report.accepted.append(
                                            f"attention at {where}: heads={H}, kv_heads={Hkv}, head_dim={d}, "
                                            f"scale={scale:.6g}{masked} (probe error {err:.1e})")
                                        return True
    extra = _graph_inputs_behind(s.inputs[0]) - _graph_inputs_behind(qs) - _graph_inputs_behind(ks)
    if extra:
        names = ", ".join(f"%{x.name}" for x in sorted(extra, key=lambda x: x.name))
        report.rejected.append(f"attention candidate at {where}: the scores are also masked by {names}, an input of the "
                               "module, but not as a key-padding mask the attention op takes (a [B, T] 0/1 mask over "
                               "keys combined with the causal mask; a row with no visible key giving the mean of v "
                               "over all keys, as finite fills do, or NaN, as -inf fills do); the probe with random "
                               "left- and right-padded masks disagreed, so it runs as separate ops (correct on every "
                               "backend, with the [T, T] scores materialised and no fused attention kernel)")
        return False
    report.rejected.append(f"attention candidate at {where}: not causal softmax attention (a mask other than j <= t, "
                           "or scores that are not q . k times one scale); it runs as separate ops: the [T, T] "
                           "scores are materialised (O(T^2) memory) and there is no fused attention kernel")
    return False


def _mask_operand(n: Node):
    """An attention node's key-padding mask operand, or None."""
    return n.inputs[4] if n.attrs.get("key_padding", False) and len(n.inputs) > 4 else None


def _graph_inputs_behind(v: Value, stop=frozenset()) -> set:
    """The graph inputs v is computed from (not walking past the values in ``stop``)."""
    seen, stack, out = set(), [v], set()
    while stack:
        x = stack.pop()
        if x in seen or x in stop:
            continue
        seen.add(x)
        if x.producer is None:
            if x.kind == "input":
                out.add(x)
            continue
        stack.extend(x.producer.value_inputs)
    return out


def _rewrite_attention(g, qs, ks, vs, qa, ka, va, oa, y, scale, dv, H, mask=None, empty_rows=None,
                       empty_grad=True):
    idx = _insert_index(g, y)
    q, idx = _emit_steps(g, qs, qa, idx)
    k, idx = _emit_steps(g, ks, ka, idx)
    v, idx = _emit_steps(g, vs, va, idx)
    dtype = q.type.dtype
    if k.type.dtype != dtype:
        k, idx = _emit_steps(g, k, [Step("cast", {"dtype": dtype})], idx)
    if v.type.dtype != dtype:
        v, idx = _emit_steps(g, v, [Step("cast", {"dtype": dtype})], idx)
    out_t = TensorType(dtype, q.type.shape[:3] + (dv,))
    operands, attrs = [q, k, v], {"scale": float(scale), "causal": True}
    if mask is not None:
        operands += [None, mask]
        attrs.update(key_padding=True, empty_rows=empty_rows)
        if not empty_grad:
            attrs["empty_grad"] = False
    o = g.make_node("attention", operands, attrs, [out_t], index=idx).output
    idx += 1
    o, idx = _emit_steps(g, o, oa, idx)
    if o.type.dtype != y.type.dtype:
        o, idx = _emit_steps(g, o, [Step("cast", {"dtype": y.type.dtype})], idx)
    g.replace_all_uses(y, o)
    g.dead_code_elimination()


# -- feedback ---------------------------------------------------------------------------------------------
SOLVE = "aten.linalg_solve_triangular.default"
# dense spellings of the same solve: torch.linalg.solve(A, f) and torch.linalg.inv(A) @ f; taken as feedback only
# when A is shown to be unit lower triangular and the whole region probes equal to the feedback op
DENSE_SOLVES = ("aten.linalg_solve.default", "aten.linalg_solve_ex.default")
INVERSES = ("aten.linalg_inv.default", "aten.linalg_inv_ex.default")


def _arg(n: Node, i: int, name: str, default=None):
    args, kwargs = n.attrs["args"], n.attrs["kwargs"]
    return kwargs.get(name, args[i] if len(args) > i else default)


def _sliced_from(v: Value, want) -> Value | None:
    """The value v is a slice of (through slice and layout ops) for which ``want(type)`` holds, or None."""
    while not want(v.type):
        if v.producer is None or v.producer.op not in {"slice", "select"} | WALK_LAYOUT or not v.producer.inputs:
            return None
        v = v.producer.inputs[0]
    return v


def _pinned_length(v: Value):
    """The integer length of v's time axis when the graph's T is a symbol: a loop over blocks pins T by guards
    (the traced graph holds only where T equals the blocks' total), so the blocks' sizes are integers. None
    otherwise."""
    t = v.type.shape[-2] if v.type.rank >= 2 else None
    return t if isinstance(t, int) and not isinstance(_bt()[1], int) and t > 1 else None


def _blocked_anchors(g: Graph):
    """Blocked forward substitution written in Python and unrolled by torch.export: a concat over the time axis of
    blocks, each solved by ``solve_triangular`` on a diagonal block of one [.., T, T] matrix (the rest of the
    matrix entering as products with the earlier blocks). Yields (concat node, its output, matrix, right-hand side)
    with the matrix and right-hand side found by walking the slices back from the first block's solve; the probe
    decides whether the whole region is the solve."""
    B_, T_ = _bt()
    out = []
    for n in g.nodes:
        if n.op != "concat" or len(n.inputs) < 2 or n.output.type.rank < 2 \
                or n.attrs["dim"] % n.output.type.rank != n.output.type.rank - 2 \
                or not (dims_equal(n.output.type.shape[-2], T_) or _pinned_length(n.output) is not None):
            continue
        solves, seen, stack = [], set(), [n.output]
        while stack:
            x = stack.pop()
            if x in seen or x.producer is None:
                continue
            seen.add(x)
            if x.producer.op == "fallback" and x.producer.attrs["target"] == SOLVE:
                solves.append(x.producer)
            stack.extend(x.producer.value_inputs)
        if len(solves) < 2:
            continue
        first = min(solves, key=g.nodes.index)
        args = first.attrs["args"]
        if len(args) < 2 or not all(isinstance(a, ArgRef) for a in args[:2]) \
                or _arg(first, 2, "upper") is not False or _arg(first, 3, "left", True) is not True:
            continue
        square = lambda t: t.rank >= 2 and dims_equal(t.shape[-1], T_) and dims_equal(t.shape[-2], T_)  # noqa: E731
        mats = {_sliced_from(s.inputs[s.attrs["args"][0].index], square) for s in solves
                if s.attrs["args"] and isinstance(s.attrs["args"][0], ArgRef)}
        rhs = _sliced_from(first.inputs[args[1].index], lambda t: t.rank >= 2 and dims_equal(t.shape[-2], T_))
        if len(mats) == 1 and None not in mats and rhs is not None:
            out.append((n, n.output, mats.pop(), rhs))
    return out


def _feedback_anchors(g: Graph):
    """(node, its solution value, kind) for every solve that may be a feedback: kind "blocked" (a blocked
    substitution unrolled from Python, see _blocked_anchors), "triangular" (solve_triangular), "solve"
    (linalg.solve), "inverse" (linalg.inv(A) @ f) or "inverse_right" (f^T @ linalg.inv(A^T)). The candidate's
    arguments are checked later."""
    out = [(n, o, "blocked") for n, o, _, _ in _blocked_anchors(g)]
    for n in g.nodes:
        if n.op == "fallback" and n.attrs["target"] == SOLVE:
            out.append((n, n.outputs[0], "triangular"))
        elif n.op == "fallback" and n.attrs["target"] in DENSE_SOLVES:
            out.append((n, n.outputs[0], "solve"))
        elif n.op == "matmul" and len(n.inputs) == 2 and isinstance(n.inputs[0], Value) \
                and n.inputs[0].producer is not None and n.inputs[0].producer.op == "fallback" \
                and n.inputs[0].producer.attrs["target"] in INVERSES and n.inputs[0] is n.inputs[0].producer.outputs[0]:
            out.append((n, n.output, "inverse"))
        elif n.op == "matmul" and len(n.inputs) == 2 and isinstance(n.inputs[1], Value) \
                and n.inputs[1].producer is not None and n.inputs[1].producer.op == "fallback" \
                and n.inputs[1].producer.attrs["target"] in INVERSES and n.inputs[1] is n.inputs[1].producer.outputs[0]:
            out.append((n, n.output, "inverse_right"))   # f^T @ inv(M^T): the transposed system
    return out


def _system(n: Node, kind: str):
    """(matrix, right-hand side, left) of an anchor, or a reason its arguments are not understood. left=False is
    the transposed system X M = F (M = (I - diag(gamma) alpha)^T, upper triangular, time on the last axis of
    F): the probe decides whether the region is a feedback in either orientation."""
    if kind == "blocked":
        for m, o, mat, rhs in _blocked_anchors(_CURRENT_GRAPH.get()):
            if m is n:
                return mat, rhs, True
        return "the blocked substitution's matrix is not understood"
    if kind in ("inverse", "inverse_right"):
        i = 0 if kind == "inverse" else 1
        inv = n.inputs[i].producer
        a = inv.attrs["args"]
        if not a or not isinstance(a[0], ArgRef):
            return "the inverse's argument is not understood"
        return inv.inputs[a[0].index], n.inputs[1 - i], kind == "inverse"
    args = n.attrs["args"]
    if len(args) < 2 or not all(isinstance(x, ArgRef) for x in args[:2]):
        return "the solve's arguments are not understood"
    left = _arg(n, 3 if kind == "triangular" else 2, "left", True)
    upper = _arg(n, 2, "upper") if kind == "triangular" else None
    if not isinstance(left, bool) or (kind == "triangular" and not isinstance(upper, bool)):
        return "the solve's arguments are not understood"
    if kind == "triangular" and upper == left:
        return ("the solve is anti-causal (an upper-triangular system from the left or a lower-triangular one from "
                "the right: a later position feeds an earlier one)")
    return n.inputs[args[0].index], n.inputs[args[1].index], left


def _unit_lower(g: Graph, mat: Value, srcs: dict, left: bool = True, lengths=PROBE_LENGTHS) -> bool:
    """On random sources at the probe lengths, mat is [..., T, T] with the identity's diagonal and upper triangle
    (only then may a general solve or inverse be a feedback's substitution)."""
    from ..semantics import run_graph
    from .probe import _binding, _params64

    gen = torch.Generator().manual_seed(4321)
    for Tn in lengths:
        binding = _binding(g, Tn)
        inputs = {}
        for v, kind in srcs.items():
            x = torch.randn(v.type.concrete_shape(binding), generator=gen, dtype=torch.float64)
            inputs[v] = torch.tanh(x) * 0.95 if kind == "gain" else x
        try:
            (M,) = run_graph(g, [], overrides={**_params64(g, [mat], srcs), **inputs}, targets=[mat], binding=binding,
                             check_inputs=False, impls=PROBE_IMPLS)
        except Exception:  # noqa: BLE001 - a matrix that cannot be evaluated from the sources is no proof
            return False
        if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
            return False
        M, Tn = M.to(torch.float64), M.shape[-1]   # the probe's length, or a static graph's
        M = M if left else M.transpose(-2, -1)   # the transposed system: unit upper triangular
        if (torch.triu(M) - torch.eye(Tn, dtype=M.dtype)).abs().max() > 1e-12:
            return False
    return True


_CURRENT_GRAPH: contextvars.ContextVar = contextvars.ContextVar("sessa_recognise_graph", default=None)


def recognise_feedback(g: Graph, report: Report) -> int:
    token = _CURRENT_GRAPH.set(g)
    try:
        return _recognise_feedback(g, report)
    finally:
        _CURRENT_GRAPH.reset(token)


def _recognise_feedback(g: Graph, report: Report) -> int:
    count = 0
    for n, out, kind in _feedback_anchors(g):
        if n not in g.nodes:
            continue
        A = Analysis(g)
        system = _system(n, kind)
        if isinstance(system, str):
            report.rejected.append(f"feedback candidate %{out.name}: {system}")
            continue
        mat, rhs, left = system
        # the softmax inside the system matrix, and the gain entering beside it
        s = _find_softmax(mat)
        if s is None:
            report.rejected.append(f"feedback candidate %{out.name}: no softmax in the system matrix")
            continue
        lc = logits_chain(A, s.inputs[0])
        if lc is None:
            report.rejected.append(f"feedback candidate %{out.name}: the softmax's logits are not one [T, T] "
                                   "product of two data tensors (q_b @ k_b^T)")
            continue
        L, chain_scale, _ = lc
        gains = _gain_sources(A, s, mat)
        if len(gains) != 1:
            report.rejected.append(f"feedback candidate %{out.name}: expected the softmax weights to be scaled by "
                                   f"one per-row gain (gamma), found {len(gains)} data tensors entering")
            continue
        gs = _gain_root(A, gains[0])
        bound = value_bound(g, gs)
        if not bound < 1.0:
            report.rejected.append(f"feedback candidate %{out.name}: the gain %{gs.name} is not provably inside "
                                   f"(-1, 1) (bound {bound:.4g}); a bounded gain such as gamma_max * tanh(...) "
                                   "with gamma_max < 1 is what makes the recursion stable")
            continue
        (qs, fq), (ks, fk) = (walk_back_scaled(A, x, lambda t: bool(to_btc(t))) for x in L.inputs)
        fs = A.walk_back(rhs, lambda t: bool(to_btc(t)))
        pinned = _pinned_length(out) if kind == "blocked" else None
        lengths = (pinned,) if pinned is not None else PROBE_LENGTHS
        if kind != "triangular" and not _unit_lower(g, mat, {qs: "normal", ks: "normal", gs: "gain"}, left, lengths):
            report.rejected.append(f"feedback candidate %{out.name}: the matrix of this general "
                                   f"{'inverse' if kind.startswith('inverse') else 'solve'} is not unit "
                                   f"{'lower' if left else 'upper'} triangular "
                                   "(Sessa's I - diag(gamma) alpha); it stays a general solve (a torch op)")
            continue
        width = contraction_width(L)
        count += _try_feedback(g, A, n, out, kind, mat, qs, ks, fs, gs, width, chain_scale * fq * fk, report, left,
                               pinned)
    return count


def value_bound(g: Graph, v: Value, depth: int = 48) -> float:
    """An upper bound on |v| from the ops that produce it; inf when nothing bounds it. See value_range."""
    lo, hi = value_range(g, v, depth)
    return max(abs(lo), abs(hi))


_INF = (-math.inf, math.inf)
# monotone non-decreasing unary functions: value at an interval's ends (limits at +-inf)
_MONOTONE = {
    "tanh": math.tanh, "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0,
    "erf": math.erf, "exp": lambda x: math.exp(x) if x < 700 else math.inf,
    "relu": lambda x: max(x, 0.0), "atan": math.atan,
    "softplus": lambda x: math.log1p(math.exp(x)) if x < 30 else x,
}
_FALLBACK_UNARY = {"aten.sigmoid.default": "sigmoid", "aten.tanh.default": "tanh", "aten.erf.default": "erf",
                   "aten.atan.default": "atan", "aten.special_expit.default": "sigmoid"}


def _mono(f, lo: float, hi: float) -> tuple:
    def at(x):
        return f(math.copysign(1e308, x)) if math.isinf(x) else f(x)
    return at(lo), at(hi)


def _mul_iv(a: tuple, b: tuple) -> tuple:
    ps = []
    for x in a:
        for y in b:
            ps.append(0.0 if x == 0 or y == 0 else x * y)
    return min(ps), max(ps)


def value_range(g: Graph, v, depth: int = 48) -> tuple:
    """An interval (lo, hi) that holds every element of v (interval arithmetic over the ops that produce it).

    Monotone functions (tanh, sigmoid, erf, atan, exp, relu, softplus) map the interval of their argument,
    affine maps (add, sub, mul, div by bounded values), clamps and x / (|x| + c) (softsign, c >= 1) compose, so
    ``c * (2 * sigmoid(2 z) - 1)`` is bounded by |c|. Parameters count with their current values; layout ops and
    casts keep the interval. (-inf, inf) when nothing bounds it. The ends of a squashing function are never
    reached for finite input, so a bound equal to 1 is not taken as inside (-1, 1) by the callers (they test < 1).
    """
    if depth == 0:
        return _INF
    if isinstance(v, bool):
        return (float(v), float(v))
    if isinstance(v, (int, float)):
        return (float(v), float(v))
    if not isinstance(v, Value):
        return _INF
    if v.kind == "param":
        data = g.params.get(v.name)
        if data is None or not data.is_floating_point() or not data.numel():
            return _INF
        data = data.detach()
        return float(data.min()), float(data.max())
    n = v.producer
    if n is None:
        return _INF
    op = n.op
    if op == "fallback":
        target, args = n.attrs["target"], n.attrs["args"]
        if not args or not isinstance(args[0], ArgRef) or n.attrs["kwargs"]:
            return _INF
        x = value_range(g, n.inputs[args[0].index], depth - 1)
        if target in ("aten.clamp.default", "aten.hardtanh.default"):   # clamp(x, min, max): literal ends
            ends = [a if isinstance(a, (int, float)) and not isinstance(a, bool) else None for a in args[1:3]]
            ends += [None] * (2 - len(ends))
            if target == "aten.hardtanh.default":
                ends = [-1.0 if ends[0] is None else ends[0], 1.0 if ends[1] is None else ends[1]]
            lo = x[0] if ends[0] is None else max(x[0], ends[0])
            hi = x[1] if ends[1] is None else min(x[1], ends[1])
            return (lo, hi) if ends[0] is None or ends[1] is None or ends[0] <= ends[1] else _INF
        op = _FALLBACK_UNARY.get(target)
        return _INF if op is None else _mono(_MONOTONE[op], *x)
    if op in _MONOTONE:
        return _mono(_MONOTONE[op], *value_range(g, n.inputs[0], depth - 1))
    if op in WALK_LAYOUT or op in ("cast", "select", "slice", "squeeze", "unsqueeze", "tril", "triu"):
        lo, hi = value_range(g, n.inputs[0], depth - 1)
        return (min(lo, 0.0), max(hi, 0.0)) if op in ("tril", "triu") else (lo, hi)
    if op == "neg":
        lo, hi = value_range(g, n.inputs[0], depth - 1)
        return -hi, -lo
    if op == "abs":
        lo, hi = value_range(g, n.inputs[0], depth - 1)
        m = max(abs(lo), abs(hi))
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), m
    if op in ("add", "sub"):
        a, b = (value_range(g, x, depth - 1) for x in n.inputs)
        return (a[0] + b[0], a[1] + b[1]) if op == "add" else (a[0] - b[1], a[1] - b[0])
    if op == "mul":
        return _mul_iv(*(value_range(g, x, depth - 1) for x in n.inputs))
    if op in ("maximum", "minimum"):
        a, b = (value_range(g, x, depth - 1) for x in n.inputs)
        f = max if op == "maximum" else min
        return f(a[0], b[0]), f(a[1], b[1])
    if op == "div":
        num, den = n.inputs
        soft = _softsign_like(g, num, den, depth)
        if soft is not None:
            return soft
        b = value_range(g, den, depth - 1)
        if b[0] > 0 or b[1] < 0:
            return _mul_iv(value_range(g, num, depth - 1), (1.0 / b[1], 1.0 / b[0]))   # 1/inf = 0.0
        return _INF
    if op == "reciprocal":
        lo, hi = value_range(g, n.inputs[0], depth - 1)
        if lo > 0 or hi < 0:
            return (1.0 / hi if hi else -math.inf), (1.0 / lo if lo else math.inf)
        return _INF
    if op == "where" and len(n.inputs) == 3:
        a, b = (value_range(g, x, depth - 1) for x in n.inputs[1:])
        return min(a[0], b[0]), max(a[1], b[1])
    return _INF


def _softsign_like(g: Graph, num, den, depth: int):
    """x / (|x| + c) with c >= 1 (torch's softsign, or written out): inside (-1, 1) (None when den is not that)."""
    if not isinstance(den, Value) or den.producer is None or den.producer.op != "add":
        return None
    terms = den.producer.inputs
    # num = x, or x times a bounded factor (0.9 * x / (1 + |x|))
    factors = [(num, (1.0, 1.0))]
    if isinstance(num, Value) and num.producer is not None and num.producer.op == "mul":
        a, b = num.producer.inputs
        factors += [(a, value_range(g, b, depth - 1)), (b, value_range(g, a, depth - 1))]
    for a, c in ((terms[0], terms[1]), (terms[1], terms[0])):
        if not (isinstance(a, Value) and a.producer is not None and a.producer.op == "abs"):
            continue
        for x, f in factors:
            if a.producer.inputs[0] is x and value_range(g, c, depth - 1)[0] >= 1.0:
                return _mul_iv((-1.0, 1.0), f)
    return None


def _find_softmax(v: Value):
    """The softmax nearest to the system matrix (breadth first), through elementwise, layout and torch ops (e.g.
    row 0 zeroed by index assignment, padded or concatenated) and through contractions (a diagonal scaling
    written ``diag_embed(gamma) @ alpha``)."""
    from collections import deque

    seen, queue = set(), deque([v])
    while queue:
        v = queue.popleft()
        if v in seen or v.producer is None:
            continue
        seen.add(v)
        n = v.producer
        if n.op == "softmax":
            return n
        if (OPS[n.op].kind in (ELEMENTWISE, "layout", "fallback") and n.op != "split") or n.op in CONTRACTIONS:
            queue.extend(n.value_inputs)
    return None


def _gain_sources(A: Analysis, s: Node, mat: Value) -> list:
    """Data values that enter the path from the softmax to the system matrix from outside it."""
    # nodes on a path softmax -> mat
    desc, stack = set(), [s.output]
    while stack:
        v = stack.pop()
        for u in A.users.get(v, []):
            for o in u.outputs:
                if o not in desc:
                    desc.add(o)
                    stack.append(o)
    on_path, stack = set(), [mat]
    while stack:
        v = stack.pop()
        if v in on_path or v.producer is None or (v not in desc and v is not s.output):
            continue
        on_path.add(v)
        if v is not s.output:
            stack.extend(v.producer.value_inputs)
    gains = []
    for v in on_path - {s.output}:
        for x in v.producer.value_inputs:
            if A.is_data(x) and x not in on_path and x is not s.output and x not in desc:
                if x not in gains:
                    gains.append(x)
    return gains


def _gain_root(A: Analysis, x: Value, depth: int = 8) -> Value:
    """The per-row gain behind the value that scales the softmax weights: x itself when it is [B, T] (or
    [B, T, 1]), else the one data operand of a diagonal scaling built from it (``diag_embed(g)``,
    ``eye * g[..., None]``, ``g.unsqueeze(-1).expand(B, T, T)``), walked through layout ops and casts. The probe
    proves the choice; a value that is not a gain simply fails it."""
    fits = lambda t: bool(to_bt(t))   # noqa: E731
    v = x
    for _ in range(depth):
        if fits(v.type) or v.producer is None:
            break
        n = v.producer
        data = [i for i in n.value_inputs if A.is_data(i)]
        crosses = n.op in WALK_LAYOUT or n.op in ("cast", "unsqueeze", "mul", "div", "where", "masked_fill") or (
            n.op == "fallback" and n.attrs["target"] in ("aten.diag_embed.default", "aten.diagflat.default"))
        if not crosses or len(data) != 1:
            break
        v = data[0]
    return A.walk_back(v, fits) if fits(v.type) else A.walk_back(x, fits)


def _try_feedback(g, A, n, out, kind, mat, qs, ks, fs, gs, width, chain_scale, report, left=True, pinned=None) -> bool:
    """Probe the region against the feedback op with Sessa's scale 1/sqrt(width); rewrite when it matches.
    A region that computes something else (another scale, a mask that lets a row see itself, a softmax over
    another axis) is left alone, with the reason in words for explain(). ``pinned``: the length a blocked loop pins
    T to (its output's integer time axis): probed there only, and the feedback's output sliced to that type."""
    lengths = (pinned,) if pinned is not None else PROBE_LENGTHS
    B_ = _bt()[0]

    def fits_out(t):   # feedback output is [B, T, C]; y must be too
        if pinned is None:
            return to_btc(t) == [[]]
        return t.rank == 3 and dims_equal(t.shape[0], B_) and t.shape[1] == pinned
    outs = A.walk_forward(out)
    where = f"{'inverse @' if kind.startswith('inverse') else 'blocked solve' if kind == 'blocked' else 'solve'} " \
            f"%{out.name}"
    if not isinstance(width, int):
        report.rejected.append(f"feedback candidate at {where}: the logits' contracted width {width} is not static")
        return False
    sessa_scale = 1.0 / math.sqrt(width)
    srcs = {fs: "normal", qs: "normal", ks: "normal", gs: "gain"}
    tol = MATCH_TOL
    other_scale_matches = False
    # the logits' operands in both orders: k_b q_b^T with the softmax over the other axis is the transposed system
    cands = [(qs_, ks_, qa, ka, fa, ga, y) for qs_, ks_ in ((qs, ks), (ks, qs)) for qa in to_btc(qs_.type)
             for ka in to_btc(ks_.type) for fa in to_btc(fs.type) for ga in to_bt(gs.type) for y in reversed(outs)
             if fits_out(y.type)]
    for qs_, ks_, qa, ka, fa, ga, y in cands:
        def canonical(inp, binding, scale=sessa_scale, qs_=qs_, ks_=ks_, qa=qa, ka=ka, fa=fa, ga=ga):
            return feedback_ref(apply_steps(inp[fs], fa, binding), apply_steps(inp[qs_], qa, binding),
                                apply_steps(inp[ks_], ka, binding), apply_steps(inp[gs], ga, binding), scale)

        err = probe(g, srcs, y, canonical, lengths=lengths, large=True)
        if err is not None and err <= tol:
            idx = _insert_index(g, y)
            f, idx = _emit_steps(g, fs, fa, idx)
            q, idx = _emit_steps(g, qs_, qa, idx)
            k, idx = _emit_steps(g, ks_, ka, idx)
            gm, idx = _emit_steps(g, gs, ga, idx)
            o = g.make_node("feedback", [f, q, k, gm], {"scale": sessa_scale}, [f.type], index=idx).output
            idx += 1
            if pinned is not None:   # T == pinned wherever this graph runs: the slice only restates the type
                o = g.make_node("slice", [o], {"dim": 1, "start": 0, "end": pinned, "step": 1},
                                [TensorType(o.type.dtype, (o.type.shape[0], pinned, o.type.shape[2]))], index=idx).output
                idx += 1
            if o.type.dtype != y.type.dtype:
                o, idx = _emit_steps(g, o, [Step("cast", {"dtype": y.type.dtype})], idx)
            g.replace_all_uses(y, o)
            g.dead_code_elimination()
            how = {"triangular": "", "solve": ", from a general solve", "inverse": ", from an explicit inverse",
                   "inverse_right": ", from an explicit inverse",
                   "blocked": ", from a blocked substitution written in Python"}[kind] + ("" if left else ", transposed system")
            report.accepted.append(f"feedback at {where}: width={width}, scale=1/sqrt({width}){how} "
                                   f"(probe error {err:.1e})")
            return True
        if not math.isclose(chain_scale, sessa_scale) and not other_scale_matches:
            other = probe(g, srcs, y, lambda inp, b, c=canonical: c(inp, b, scale=chain_scale), lengths=lengths)
            other_scale_matches = other is not None and other <= tol
    if other_scale_matches:
        why = (f"its logits are scaled by {chain_scale:.6g}, but Sessa's feedback scales q_b . k_b by "
               f"1/sqrt(D) = {sessa_scale:.6g}")
    else:
        why = _diagnose_feedback(g, n if kind == "triangular" else None, mat, srcs, left)
    instead = "solved as a general triangular system instead (see tri_solve)" if kind in ("triangular", "blocked") else \
        "left as the general solve it is written as (a torch op)"
    report.rejected.append(f"feedback candidate at {where}: not Sessa's feedback: {why}; it is {instead}")
    return False


def _diagnose_feedback(g, n, mat, srcs, left=True) -> str:
    """Why a solve's weights are not gamma[t] * softmax_{j<t}(...): checked on random inputs, in words."""
    from ..semantics import run_graph
    from .probe import _binding, _params64

    Tn = 6
    gen = torch.Generator().manual_seed(99)
    inputs = {}
    try:   # (sizes derived from the probe's length can be negative in a blocked solve's symbolic blocks)
        binding = _binding(g, Tn)
        for v, kind in srcs.items():
            x = torch.randn(v.type.concrete_shape(binding), generator=gen, dtype=torch.float64)
            inputs[v] = torch.tanh(x) * 0.95 if kind == "gain" else x
    except Exception as e:  # noqa: BLE001 - the explanation is best effort
        return f"the system could not be evaluated at a probe length ({type(e).__name__}: {str(e)[:120]})"
    gain = next(v for v, kind in srcs.items() if kind == "gain")
    try:
        (M,) = run_graph(g, [], overrides={**_params64(g, [mat], srcs), **inputs}, targets=[mat], binding=binding,
                         check_inputs=False, impls=PROBE_IMPLS)
    except Exception as e:  # noqa: BLE001 - the explanation is best effort
        return f"the system matrix could not be evaluated on its own ({type(e).__name__})"
    M = M.to(torch.float64)
    M = M if left else M.transpose(-2, -1)
    if M.dim() < 2 or M.shape[-1] != M.shape[-2] or not M.numel():
        return "the system matrix is not square"
    Tn = M.shape[-1]   # a static graph's size, or the probe's
    unit = n is not None and n.attrs["kwargs"].get("unitriangular", False)
    eye = torch.eye(Tn, dtype=torch.float64)
    if not unit and not torch.allclose(torch.diagonal(M, dim1=-2, dim2=-1), torch.ones(Tn, dtype=torch.float64)):
        return ("the system's diagonal is not 1 (Sessa solves (I - gamma*alpha) s = f with alpha zero on the "
                "diagonal: does the mask let row t see itself?)")
    W = torch.tril(-M if unit else eye - M, diagonal=-1)
    if torch.triu(M, diagonal=1).abs().max() > 0:
        return "the system has weights above the diagonal (a future position feeds back)"
    gam = inputs[gain].reshape(W.shape[0], Tn) if inputs[gain].numel() == W.shape[0] * Tn else None
    if gam is not None:
        sums = W.sum(-1)[:, 1:] / gam[:, 1:]
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
            return ("the weights of row t do not sum to gamma[t] over the earlier positions j < t: the softmax "
                    "includes position t (a mask that is not strictly causal) or runs over another axis")
        if W[:, 0].abs().max() > 0:
            return "row 0 has weights (Sessa's row 0 has no past)"
    return "its weights differ from gamma[t] * softmax_{j<t}(q_b[t] . k_b[j] / sqrt(D))"


# -- causal depthwise conv1d --------------------------------------------------------------------------
def _time_axes(t: TensorType, C) -> list:
    """The axes (1 or 2) of a rank-3 type that can be the sequence of a [B, T, C] or [B, C, T] layout."""
    T = _bt()[1]
    return [ax for ax in (1, 2) if t.rank == 3 and dims_equal(t.shape[ax], T) and t.shape[3 - ax] == C]


def _conv_sources(A: Analysis, x: Value, C) -> list:
    """Where a depthwise conv1d's input may come from: its input before layout ops, and, when the input is
    zeros concatenated before the sequence (F.pad(x, (K - 1, 0)) lowers so), the padded value."""
    fits = lambda t: t.rank == 3 and C in (t.shape[1], t.shape[2])    # noqa: E731
    out = [A.walk_back(x, fits, allow_cast=False)]
    p = x.producer
    if p is not None and p.op == "concat" and len(p.inputs) == 2 and p.inputs[0].producer is not None \
            and p.inputs[0].producer.op == "full" and p.inputs[0].producer.attrs.get("value") == 0:
        out.append(A.walk_back(p.inputs[1], fits, allow_cast=False))
    return list(dict.fromkeys(out))


def _fold_causal_conv(g: Graph, n, xs: Value, y: Value, ax_in: int, ax_out: int, report: Report) -> bool:
    """Replace ``y`` by causal_conv1d of ``xs`` (sequence on axis ``ax_in`` of xs, ``ax_out`` of y) with conv1d
    ``n``'s weights, when the probe says they are equal."""
    w = n.inputs[1]
    bias = n.inputs[2] if len(n.inputs) > 2 else None
    C, K = w.type.shape[0], w.type.shape[2]

    def canonical(inp, binding):
        # (the op reads the weights as operands: as the probe's region reads them, a trainable one moved)
        wt = probe_param(g.params[w.name])[:, 0, :]
        bt = probe_param(g.params[bias.name]) if bias is not None else None
        src = inp[xs] if ax_in == 1 else inp[xs].transpose(1, 2)
        out = SEMANTICS["causal_conv1d"](src, wt, bt)
        return out if ax_out == 1 else out.transpose(1, 2)

    err = probe(g, {xs: "normal"}, y, canonical)
    if err is None or err > 1e-9:
        return False
    idx = _insert_index(g, y)
    flip = [Step("transpose", {"dim0": 1, "dim1": 2})]
    src, idx = _emit_steps(g, xs, flip if ax_in == 2 else [], idx)
    wv = g.make_node("reshape", [w], {"shape": [C, K]}, [TensorType(w.type.dtype, (C, K))], index=idx).output
    ins = [src, wv] + ([bias] if bias is not None else [])
    o = g.make_node("causal_conv1d", ins, {}, [src.type], index=idx + 1).output
    o, _ = _emit_steps(g, o, flip if ax_out == 2 else [], idx + 2)
    g.replace_all_uses(y, o)
    g.dead_code_elimination()
    layout = "[B, T, C]" if ax_in == 1 else "channels first [B, C, T]"
    report.accepted.append(f"causal_conv1d at conv1d %{n.output.name}: channels={C}, width={K}, input {layout}")
    return True


def recognise_causal_conv1d(g: Graph, report: Report) -> int:
    """A depthwise conv1d whose output, after slicing to the first T positions (padding K - 1 on both sides) or
    on an input padded by K - 1 zeros on the left, is the causal conv1d of its source: [B, T, C] (transposed
    around the conv, as the models of this package write it) or channels-first [B, C, T] (as mamba_simple
    does: ``conv1d(x)[..., :L]`` on x of (B, D, L)). The probe decides; transposes adapt the layouts."""
    count = 0
    for n in [n for n in g.nodes if n.op == "conv1d"]:
        if n not in g.nodes:
            continue
        A = Analysis(g)
        x, w = n.inputs[0], n.inputs[1]
        if w.type.rank != 3 or w.type.shape[1] != 1 or not isinstance(w.type.shape[2], int):
            continue
        C, K = w.type.shape[0], w.type.shape[2]
        if n.attrs["groups"] != C or list(n.attrs["stride"]) != [1] or list(n.attrs["dilation"]) != [1]:
            continue
        chain = [n.output]
        while True:
            u = A.single_user(chain[-1])
            if u is None or u.op not in ("slice", "transpose", "permute"):
                break
            chain.append(u.output)
        # every source, output along the slice/transpose chain (outermost first) and layout of each: the first
        # the probe accepts is rewritten
        tries = ((xs, y, ax_in, ax_out) for xs in _conv_sources(A, x, C) for y in reversed(chain)
                 for ax_in in _time_axes(xs.type, C) for ax_out in _time_axes(y.type, C))
        done = any(_fold_causal_conv(g, n, *t, report) for t in tries)
        count += done
        if not done:
            report.rejected.append(f"conv1d %{n.output.name}: a depthwise conv1d (channels={C}, width={K}) that "
                                   "is not a causal conv1d of its input (padding K - 1 on the left only, the first "
                                   "T outputs kept); it runs as an ordinary conv1d")
    return count


def recognise(g: Graph, sizes: tuple | None = None) -> Report:
    """Run every recogniser; the graph is rewritten in place. Returns what was found.

    sizes: the (batch, sequence) sizes layouts are matched against; default: the symbols B and T of a graph traced
    with dynamic sizes. A graph with static sizes passes its integers: it is used at those sizes only, so the
    probes check each rewrite there."""
    token = _SIZES.set(tuple(sizes)) if sizes is not None else None
    try:
        with probe_memo() as stats:   # identical layers: one probe per distinct region structure
            report = _recognise(g)
        report.probes = ProbeStats(stats.run, stats.reused, stats.not_keyed)   # the counts, not the memo
        return report
    finally:
        if token is not None:
            _SIZES.reset(token)


def _recognise(g: Graph) -> Report:
    report = Report()
    recognise_feedback(g, report)
    recognise_attention(g, report)
    fold_gqa(g, report)
    fold_rope(g, report)
    recognise_causal_conv1d(g, report)
    generic_solves(g, report)
    for target in sorted({n.attrs["target"] for n in g.nodes if n.op == "fallback"}):
        report.rejected.append(f"{target} has no IR equivalent: it runs as a torch op on every backend (no kernel, "
                               "a copy at each boundary); export_tvm cannot take it and export_onnx only through "
                               "torch.onnx's exporter")
    g.remove_unused_params()
    verify_graph(g)
    return report


# -- grouped-query attention: k/v heads repeated before attention ------------------------------------------
def _before_repeat(A: Analysis, v: Value, d):
    """The value a repeat_interleave on v's layout chain repeats, and its adapters to [B, T, Hkv, d]."""
    x = v
    while x.producer is not None and (x.producer.op in WALK_LAYOUT or _is_index_select(x.producer)
                                      or (x.producer.op == "stack" and len(set(x.producer.inputs)) == 1)):
        n = x.producer
        if n.op == "repeat_interleave" or n.op == "fallback" or n.op == "stack":   # the kv heads gathered by an
            # index, or stacked copies of one value (the probe shows it repeats)
            src = n.inputs[n.attrs["args"][0].index] if n.op == "fallback" else n.inputs[0]
            pre = A.walk_back(src, lambda t: bool(to_bthd(t, d)))
            return pre, to_bthd(pre.type, d)
        x = n.inputs[0]
    return None, []


def _is_index_select(n: Node) -> bool:
    """index_select(x, dim, index) on a data x with an index that is not data (e.g. arange(H) // group)."""
    args = n.attrs.get("args") if n.op == "fallback" else None
    return n.op == "fallback" and n.attrs["target"] == "aten.index_select.default" and len(args) == 3 \
        and isinstance(args[0], ArgRef) and isinstance(args[2], ArgRef) and len(n.outputs) == 1


def fold_gqa(g: Graph, report: Report) -> int:
    """attention(q, repeat(k), repeat(v)) -> attention(q, k, v) with fewer kv heads, when it probes equal."""
    count = 0
    for n in [n for n in g.nodes if n.op == "attention"]:
        A = Analysis(g)
        q, k, v = n.inputs[:3]
        d, dv = k.type.shape[3], v.type.shape[3]
        ks, kas = _before_repeat(A, k, d)
        vs, vas = _before_repeat(A, v, dv)
        if ks is None or vs is None:
            continue
        for ka, hk in kas:
            for va, hv in vas:
                if hk != hv or hk == k.type.shape[2] or q.type.shape[2] % hk:
                    continue
                extra = n.inputs[3:]
                m = _mask_operand(n)

                def canonical(inp, binding, ka=ka, va=va, m=m):
                    inv = g.params[extra[0].name].to(torch.float64) if n.attrs.get("rope") else None
                    return attention_ref(inp[q], apply_steps(inp[ks], ka, binding), apply_steps(inp[vs], va, binding),
                                         n.attrs["scale"], True, inv, None if m is None else inp[m],
                                         n.attrs.get("empty_rows", "mean"))

                srcs = {q: "normal", ks: "normal", vs: "normal"}
                if m is not None:
                    if m in srcs:
                        continue
                    srcs[m] = "keymask"
                err = probe(g, srcs, n.output, canonical, batch=PROBE_BATCH if m is None else KEYMASK_BATCH,
                            large=True)
                if err is None or err > MATCH_TOL:
                    continue
                idx = g.nodes.index(n)
                nk, idx = _emit_steps(g, ks, ka, idx)
                nv, idx = _emit_steps(g, vs, va, idx)
                n.inputs = [q, nk, nv] + list(extra)
                g.dead_code_elimination()
                report.accepted.append(f"grouped-query attention %{n.output.name}: kv heads {k.type.shape[2]} -> {hk} "
                                       f"(repeat removed; probe error {err:.1e})")
                count += 1
                break
            else:
                continue
            break
    return count


# -- rotary embeddings folded into attention -------------------------------------------------------------
def _dominating_sources(A: Analysis, v: Value, limit: int = 8) -> list:
    """Values every data path back from v passes through, nearest first (immediate dominators)."""
    import networkx as nx

    dg = nx.DiGraph()
    dg.add_node(v)
    stack, seen = [v], {v}
    while stack:
        x = stack.pop()
        if x.producer is None:
            continue
        for y in x.producer.value_inputs:
            if A.is_data(y):
                dg.add_edge(x, y)
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
    sink = object()  # every data path back from v ends at a graph input: join them in one sink
    for x in list(dg.nodes):
        if x.producer is None:
            dg.add_edge(x, sink)
    if sink not in dg:
        return []
    idom = nx.immediate_dominators(dg, v)
    chain, x = [], idom[sink]
    while x is not v:
        chain.append(x)
        x = idom[x]
    return chain[::-1][:limit]


def _static_params(g: Graph, A: Analysis, v: Value, stop: set) -> list:
    seen, stack, params = set(), [v], []
    while stack:
        x = stack.pop()
        if x in seen or x in stop:
            continue
        seen.add(x)
        if x.kind == "param":
            params.append(x)
        if x.producer is not None:
            stack.extend(x.producer.value_inputs)
    return params


def fold_rope(g: Graph, report: Report) -> int:
    """attention(rope(xq), rope(xk), v) -> attention(xq, xk, v, inv_freq) {rope=True}, when it probes equal."""
    count = 0
    for n in [n for n in g.nodes if n.op == "attention" and not n.attrs.get("rope", False)]:
        A = Analysis(g)
        q, k, v = n.inputs[:3]
        d = q.type.shape[3]
        if not isinstance(d, int) or d % 2:
            continue
        rq, rk = A.walk_back(q), A.walk_back(k)
        if rq.producer is None or rk.producer is None or OPS[rq.producer.op].kind == "compute" \
                or OPS[rk.producer.op].kind == "compute":
            continue  # q and k come straight from projections: nothing rotates them
        # candidates in the attention's dtype: a widened copy (bf16 -> f32 around the rotation) is not one
        cands_q = [x for x in _dominating_sources(A, rq) if to_bthd(x.type, d) and x.type.dtype == q.type.dtype]
        cands_k = [x for x in _dominating_sources(A, rk) if to_bthd(x.type, d) and x.type.dtype == k.type.dtype]
        if not cands_q or not cands_k:
            continue
        default_name = f"rope_inv_freq_default_{d}"
        done = False
        # the nearest dominating value is not always the unrotated one (in bf16 it is the rotated value cast
        # back), so every candidate pair is tried, nearest first
        for xq in cands_q:
            for xk in cands_k:
                if _fold_rope_at(g, A, n, q, k, v, d, xq, xk, rq, default_name, report):
                    done = True
                    count += 1
                    break
            if done:
                break
        # (said only where arithmetic lies between q or k and the values they come from: a fused projection's
        # split and reshapes before plain attention rotate nothing)
        rotating = ("mul", "add", "sub", "neg", "fallback")   # (complex RoPE runs as fallback ops)
        if not done and any(x.op in rotating for x in region_nodes(g, [q, k], set(cands_q + cands_k))):
            report.rejected.append(f"rope around attention %{n.output.name}: q and k are transformed before attention, "
                                   "but not by a rotary embedding at positions 0..T-1 (interleaved pairs, or half-split pairs (i, i + d/2)) "
                                   "with a frequency table it reads or computes; the transform "
                                   "runs as separate ops before the attention kernel")
    return count


# -- the general form: a triangular solve whose weights are not a factorable feedback -------------------
def generic_solves(g: Graph, report: Report) -> int:
    """Every remaining ``solve_triangular`` becomes the IR's ``tri_solve`` (explicit weights, blocked
    substitution on every backend and export), so that no module fails to export because of one. A solve
    from the right (``left=False``) is the transposed solve from the left."""
    count = 0
    for n in [n for n in g.nodes if n.op == "fallback" and n.attrs["target"] == SOLVE]:
        args, kwargs = n.attrs["args"], n.attrs["kwargs"]
        upper, left = kwargs.get("upper"), kwargs.get("left", True)
        unit = kwargs.get("unitriangular", False)
        if not all(isinstance(x, bool) for x in (upper, left, unit)) or len(args) != 2 \
                or not all(isinstance(a, ArgRef) for a in args):
            report.rejected.append(f"triangular solve %{n.output.name}: arguments not understood ({args}, {kwargs}); "
                                   "it runs as a torch op and cannot be exported")
            continue
        A, b = n.inputs[args[0].index], n.inputs[args[1].index]
        if A.type.dtype != b.type.dtype or A.type.rank > b.type.rank or A.type.rank < 2:
            report.rejected.append(f"triangular solve %{n.output.name}: weights {A.type} and right-hand side "
                                   f"{b.type} need one dtype and no broadcast of the right-hand side; it runs as "
                                   "a torch op and cannot be exported")
            continue
        idx = g.nodes.index(n)
        if not left:  # X A = B  <=>  A^T X^T = B^T
            A, idx = _emit_steps(g, A, [Step("transpose", {"dim0": -2, "dim1": -1})], idx)
            b, idx = _emit_steps(g, b, [Step("transpose", {"dim0": -2, "dim1": -1})], idx)
            upper = not upper
        x = g.make_node("tri_solve", [A, b], {"upper": upper, "unitriangular": unit}, [b.type], index=idx).output
        idx += 1
        if not left:
            x, idx = _emit_steps(g, x, [Step("transpose", {"dim0": -2, "dim1": -1})], idx)
        g.replace_all_uses(n.output, x)
        g.dead_code_elimination()
        lead = "x".join(str(d) for d in A.type.shape)
        report.accepted.append(
            f"general triangular solve at %{n.output.name} -> tri_solve ({'upper' if upper else 'lower'}"
            f"{', unit diagonal' if unit else ''}{', from the right' if not left else ''}): its weights stay an "
            f"explicit [{lead}] tensor (O(T^2) memory, no fused feedback kernel), solved by blocked substitution")
        count += 1
    return count


# fixed channel orders under which a rotation equals the spec's interleaved one: the identity, and the half-split
# (rotate_half / NeoX) convention, whose pairs (i, i + d/2) are the interleaved pairs of x.reshape(2, d/2).mT
def _channel_orders(d: int, H: int, Hkv: int):
    """(name, steps for q [B, T, H, d], steps for k [B, T, Hkv, d]) per channel order."""
    B, T = _bt()

    def half(h):
        return [Step("reshape", {"shape": [B, T, h, 2, d // 2]}), Step("transpose", {"dim0": -2, "dim1": -1}),
                Step("reshape", {"shape": [B, T, h, d]})]
    return (("interleaved", [], []), ("half-split", half(H), half(Hkv)))


def _frequency_options(g: Graph, A: Analysis, rq: Value, xq: Value, d: int, default_name: str, dtype) -> list:
    """The inverse frequencies a rotation may use, as (name or Value, tensor, how): a rank-1 [d/2] parameter the
    rotation reads (in its own dtype), a [d/2] vector it computes from constants (evaluated as the module computes
    it, in its dtype, e.g. float64 frequencies from arange), and the standard 10000^(-2i/d) in float32 and (float64
    models) float64."""
    out = []
    for x in _rotation_values(rq, xq):
        if x.type.rank == 1 and x.type.shape[0] == d // 2 and x.type.dtype.is_float and not A.is_data(x):
            if x.kind == "param":
                out.append((x, g.params[x.name], f"%{x.name}"))
            elif x.producer is not None:
                try:
                    (val,) = run_graph_values(g, x)
                    out.append(((f"rope_inv_freq_{x.name}", x.type.dtype.name), val, f"the module's %{x.name}"))
                except Exception:  # noqa: BLE001 - a vector that cannot be evaluated on its own is no candidate
                    pass
    out += _frequencies_from_tables(g, _stored_tables(rq, xq, d), d)
    for dt, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        if tag == "f32" or dtype.name == "f64":
            out.append(((f"{default_name}_{tag}", tag), 10000.0 ** (-torch.arange(0, d, 2, dtype=dt) / d),
                        f"the default 10000^(-2i/d) in {tag}"))
    return out


def _rotation_values(rq: Value, xq: Value) -> list:
    """Every value the rotation producing rq is computed from, walking back and stopping at xq (the rotated input)."""
    out, seen, stack = [], set(), [rq]
    while stack:
        x = stack.pop()
        if x in seen or x is xq:
            continue
        seen.add(x)
        out.append(x)
        if x.producer is not None:
            stack.extend(x.producer.value_inputs)
    return out


def _stored_tables(rq: Value, xq: Value, d: int) -> list:
    """The stored [L, d] (or [L, d/2]) float tables the rotation producing rq reads (cos/sin caches)."""
    return [x for x in _rotation_values(rq, xq)
            if x.kind == "param" and x.type.rank == 2 and x.type.shape[1] in (d, d // 2) and x.type.dtype.is_float
            and isinstance(x.type.shape[0], int) and x.type.shape[0] >= 2]


def _table_tol(tables: list) -> float:
    """The match tolerance stored cos/sin tables allow: the folded rotation recomputes cos(p f) and sin(p f), so
    a module that reads them rounded to float32 (or a half type) differs from it by that rounding (stored data,
    unlike a cast inside the region, which the probes evaluate without rounding); float64 tables add nothing."""
    tol = 0.0
    for t in tables:
        tol = max(tol, {"f64": 0.0, "f32": 1e-5, "f16": 3e-2, "bf16": 3e-2}[t.type.dtype.name] * 10)
    return tol


def _frequencies_from_tables(g: Graph, tables: list, d: int) -> list:
    """Inverse frequencies recovered from stored cos/sin tables [L, d] (halves repeated, or pairs interleaved) or
    [L, d/2]: for a (cos, sin) pair of the same shape, the angle atan2(sin, cos) at every position, unwrapped and
    fitted as p * f (least squares over all L positions, rounded to the tables' dtype), kept only when cos(p f)
    and sin(p f) reproduce both tables at every position. The probe still decides whether the rotation uses it."""
    out = []
    for c in tables:
        for s in tables:
            if c is s or c.type.shape != s.type.shape or c.type.dtype != s.type.dtype:
                continue
            C, S = (g.params[x.name].detach().to(torch.float64) for x in (c, s))
            L = C.shape[0]
            cols = [slice(0, d // 2), slice(0, d, 2)] if C.shape[1] == d else [slice(None)]
            for sel in cols:
                cc, ss = C[:, sel], S[:, sel]
                ang = torch.atan2(ss, cc)                                   # [L, d/2], wrapped into (-pi, pi]
                step = torch.remainder(ang[1:] - ang[:-1] + math.pi, 2 * math.pi) - math.pi
                unwrapped = torch.cat((ang[:1], ang[:1] + step.cumsum(0)), 0)
                pos = torch.arange(L, dtype=torch.float64)[:, None]
                f = (pos * unwrapped).sum(0) / (pos * pos).sum(0)
                f = f.to(g.params[c.name].dtype)
                fd = f.to(torch.float64)
                eps = torch.finfo(g.params[c.name].dtype).eps
                tol = 16 * eps * (1 + L * fd.abs().max().item())
                if ((torch.cos(pos * fd) - cc).abs().max() <= tol and (torch.sin(pos * fd) - ss).abs().max() <= tol
                        and not any(torch.equal(f, o[1]) for o in out)):
                    out.append(((f"rope_inv_freq_{c.name}", c.type.dtype.name), f,
                                f"the stored tables %{c.name}, %{s.name} (atan2 at every position)"))
    return out


def run_graph_values(g: Graph, v: Value):
    from ..semantics import run_graph
    return run_graph(g, [], targets=[v], binding={n: 1 for n in v.type.symbols()}, check_inputs=False)


# positions the RoPE probe also checks, far beyond the short probes: there the angle t * inv_freq shows a
# frequency table of lower precision than the module's (an error of ~t * ulp(inv_freq)). The float64 probe holds
# a few [H, T, T] score tensors: T is lowered for many heads to keep each near 2^23 elements (64 MiB; 2048 for
# one head, 1448 for 4, 1024 for 8, never under 512): a bounded cost per attention at compile time.
LONG_PROBE = 2048


def _long_length(heads) -> int:
    h = heads if isinstance(heads, int) and heads > 0 else 1
    return max(512, min(LONG_PROBE, int(math.sqrt(2 ** 23 / h))))


# The rotation-level long probe must match this much closer than the attention-level tolerance to stand for it:
# attention's logits are q . k * scale, so an angle error of the rotated q or k (relative eps) moves a logit by
# about eps * |q| |k| * scale, ~ eps * sqrt(d) for unit-variance draws (at most 16 for d <= 256)
_ROTATION_MARGIN = 64


def _long_rotation_err(g, n, xq, xk, cand, long_t: int, tol: float):
    """The long-position check of a rotary candidate at the rotation itself: the attention's q and k operands
    (regions from xq and xk, [B, T, H, d]) against the candidate's rotation of xq and xk (its layout steps, channel
    order, then the interleaved rotation, the order undone), at T = long_t, batch 1. It costs O(T d), where the
    same check through the attention is O(H T^2 d) in float64 (0.9 s of a cold compile for an 8-head layer at
    T = 1024). The worst of the two errors when both are within tol / _ROTATION_MARGIN, else None: then the
    attention-level probe decides (a module whose q and k differ from the candidate's in a way attention does not
    see, such as a rotation by a constant angle on both)."""
    worst = _rotation_err(g, n, xq, xk, cand, long_t)
    return None if worst is None or worst > tol / _ROTATION_MARGIN else worst


# Positions the rotation itself is also checked at, once it matched the candidate up to _long_length: a module
# whose positions stop growing (clamped at 799, compressed past 1500) rotates as plain RoPE up to there. The
# check is O(T H d) in float64: T is lowered where H d is large, to keep [T, H d] near 2^24 elements.
ROTATION_FAR = 8192


def _far_rotation_ok(g, n, xq, xk, cand, long_t: int, tol: float) -> bool:
    """Whether the rotation of a candidate that matched up to long_t (_long_rotation_err) also matches at the
    longest length up to ROTATION_FAR that the region runs at (a buffer of fewer positions: halving)."""
    hd = 1
    for s in n.inputs[0].type.shape[2:]:
        hd *= s if isinstance(s, int) else 1
    far = min(ROTATION_FAR, max(long_t, 2 ** 24 // max(hd, 1)))
    while far > long_t:
        err = _rotation_err(g, n, xq, xk, cand, far)
        if err is not None:
            return err <= tol / _ROTATION_MARGIN
        far //= 2
    return True   # the region runs no longer than long_t: the module cannot be called there either


def _rotation_err(g, n, xq, xk, cand, long_t: int):
    """The worst error of q's and k's rotation against the candidate's at T = long_t (None: the region does not
    run there)."""
    qa, ka, order, data = cand[0], cand[1], cand[2], cand[4].to(torch.float64)
    d = n.inputs[0].type.shape[3]
    # the channel order as a permutation of the last dim (perm[i]: the channel that lands at i), and its inverse
    pq = next(steps for name, steps, _ in _channel_orders(d, 1, 1) if name == order)
    b, t = (s if isinstance(s, int) else 1 for s in _bt())   # (a graph from dynamo may fix B or T: its sizes)
    channels = torch.arange(d, dtype=torch.float64).reshape(1, 1, 1, d).expand(b, t, 1, d)
    perm = apply_steps(channels, pq, {"B": b, "T": t})[0, 0]
    undo = torch.argsort(perm.reshape(d).long())
    worst = 0.0
    for x, steps, out in ((xq, qa, n.inputs[0]), (xk, ka, n.inputs[1])):
        def canonical(inp, binding, x=x, steps=steps):
            return rope_ref(apply_steps(inp[x], steps, binding), data)[..., undo]

        batch = out.type.shape[0] if isinstance(out.type.shape[0], int) else 1   # (dynamo fixes B: its size)
        err = probe(g, {x: "normal"}, out, canonical, lengths=(long_t,), batch=batch)
        if err is None:
            return None
        worst = max(worst, err)
    return worst


def _fold_rope_at(g, A, n, q, k, v, d, xq, xk, rq, default_name, report) -> bool:
    """Try attention(P xq, P xk, v) {rope=True} in place of attention(q, k, v) for a fixed channel order P;
    True when it probed equal. Of the frequency tables that probe equal, the one closest to the module at long
    positions is taken (the module's own table when it has one)."""
    if isinstance(q.type.shape[1], int) and q.type.shape[1] < 2:
        return False   # a static length of one: every rotation is the identity there, so no probe can tell
    options = _frequency_options(g, A, rq, xq, d, default_name, q.type.dtype)
    srcs = {xq: "normal", xk: "normal", v: "normal"}
    m = _mask_operand(n)
    if m is not None:
        if m in srcs:
            return False
        srcs[m] = "keymask"
    batch = PROBE_BATCH if m is None else KEYMASK_BATCH
    tol = max(MATCH_TOL, _table_tol(_stored_tables(rq, xq, d)))
    passing = []
    for qa, H in to_bthd(xq.type, d):
        for ka, Hkv in to_bthd(xk.type, d):
            if H != q.type.shape[2] or Hkv != k.type.shape[2]:
                continue
            for order, pq, pk in _channel_orders(d, H, Hkv):
                for param, data, how in options:
                    def canonical(inp, binding, qa=qa + pq, ka=ka + pk, data=data, m=m):
                        return attention_ref(apply_steps(inp[xq], qa, binding), apply_steps(inp[xk], ka, binding),
                                             inp[v], n.attrs["scale"], True, data.to(torch.float64),
                                             None if m is None else inp[m], n.attrs.get("empty_rows", "mean"))

                    err = probe(g, srcs, n.output, canonical, batch=batch, large=True)
                    if err is not None and err <= tol:
                        passing.append((qa + pq, ka + pk, order, param, data, how, err, canonical))
            if passing:
                break
        if passing:
            break
    if not passing:
        return False
    unique = []   # tables equal in value need one long probe: the first (the module's own) stands for them
    for cand in passing:
        if not any(u[4].shape == cand[4].shape and u[0] == cand[0] and u[1] == cand[1]
                   and torch.equal(u[4].to(torch.float64), cand[4].to(torch.float64)) for u in unique):
            unique.append(cand)
    passing = unique
    best, best_err, where = None, math.inf, "at its static length"
    static = isinstance(_bt()[1], int)   # a static graph runs at its own length only: the probes ran there
    long_t = _long_length(q.type.shape[2])
    for cand in passing:
        long_err = None if static else _long_rotation_err(g, n, xq, xk, cand, long_t, tol)
        if long_err is not None and not _far_rotation_ok(g, n, xq, xk, cand, long_t, tol):
            continue   # plain RoPE up to long_t, not beyond (positions clamped or compressed further on)
        if long_err is None and not static:
            long_err = probe(g, srcs, n.output, cand[-1], lengths=(long_t,), batch=1 if m is None else KEYMASK_BATCH)
        err = cand[6] if long_err is None else long_err   # a module that cannot run that long: short probes only
        if err <= tol and err < best_err:
            best, best_err = cand, err
            where = where if static else f"at positions up to {long_t - 1}" if long_err is not None else \
                f"at positions up to {max(PROBE_LENGTHS) - 1} (the region does not run at {long_t})"
    if best is None:
        return False
    qa, ka, order, param, data, how, err, _ = best
    if isinstance(param, tuple):
        name, tag = param
        if name not in g.param_values:
            g.add_param(name, TensorType(DType(tag), (d // 2,)), data)
        param = g.param_values[name]
    idx = g.nodes.index(n)
    nq, idx = _emit_steps(g, xq, qa, idx)
    nk, idx = _emit_steps(g, xk, ka, idx)
    n.inputs = [nq, nk, v, param] + ([m] if m is not None else [])
    n.attrs["rope"] = True
    g.dead_code_elimination()
    report.accepted.append(f"rope folded into attention %{n.output.name}: {order}"
                           f"{' (channels reordered to interleaved pairs)' if order != 'interleaved' else ''}, "
                           f"inv_freq from {how} (probe error {best_err:.1e}, {where})")
    return True
