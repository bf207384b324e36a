"""Numerical probing: check that a candidate rewrite computes what the region it replaces computes.

A recogniser proposes "these values are the region's inputs, this value is its output, and this
chain of canonical ops computes it". The proposal is accepted only when the original subgraph and
the canonical ops agree on fresh random inputs at several sequence lengths (float64, so that a
wrong structure shows as an O(1) error, not a rounding difference). Recognisers can therefore be
loose about coding style while never producing a silent wrong answer.

Identical layers are probed once: inside ``probe_memo()`` (recognise() opens one per graph), a probe whose
region and proposal have the same structure as one already run (ops, attributes, types, literals, the *values*
of the parameters the region reads, the proposal's code and the constants it closes over, all modulo value
names) reuses that probe's result instead of evaluating again. The result is a function of exactly those
things (the random inputs come from a fixed seed and the region's types), so a reused answer is the answer
the probe would have given. A proposal that closes over something the key cannot describe is probed as usual.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import types
from dataclasses import dataclass, field

import sympy
import torch

from ..persistent_cache import tensor_digest
from ..semantics import SEMANTICS, resolve, run_graph
from ..ir.dtypes import torch_dtype
from ..ir.graph import Graph, Node, Value
from ..ir.types import sym

PROBE_LENGTHS = (1, 2, 5, 12)
PROBE_BATCH = 2
KEYMASK_BATCH = 4   # rows of a key-padding mask probe: left padding, right padding, random holes, none
OTHER_DIM = 3


@dataclass
class Step:
    """One canonical op applied to the running value: ``op(x, *extra) {attrs}``."""

    op: str
    attrs: dict = field(default_factory=dict)


def apply_steps(x, steps, binding):
    """A proposal's adapter steps on a probe's values (float casts keep the value: ``_wide_cast``)."""
    for s in steps:
        x = _STEP_IMPLS.get(s.op, SEMANTICS[s.op])(x, **resolve(s.attrs, binding))
    return x


def _binding(graph: Graph, T: int, batch: int = PROBE_BATCH, nodes=None) -> dict:
    """Sizes for every dim symbol of the graph's inputs and of ``nodes``' operands and outputs (default: every
    node; a probe passes its region's, which is all it evaluates: the whole graph's values cost ~3 ms a probe)."""
    values = graph.values() if nodes is None else \
        itertools.chain(graph.inputs, (v for n in nodes for v in (*n.value_inputs, *n.outputs)))
    names = set()
    for v in values:
        names |= v.type.symbols()
    return {n: (T if n == "T" else batch if n == "B" else OTHER_DIM) for n in names}


def region_nodes(graph: Graph, targets, stop) -> list:
    """The nodes that computing ``targets`` from ``stop`` (and the parameters) runs, in graph order."""
    needed, seen, stack = set(), set(), [t for t in targets if t not in stop]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        n = v.producer
        if n is None or n in needed:
            continue
        needed.add(n)
        stack.extend(x for x in n.value_inputs if x not in stop and x not in seen)
    return [n for n in graph.nodes if n in needed]


def _promoting(fn):
    def run(*xs, **kw):
        floats = {x.dtype for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point()}
        if len(floats) > 1:
            wide = max(floats, key=lambda d: torch.finfo(d).bits)
            xs = tuple(x.to(wide) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs)
        return fn(*xs, **kw)
    return run


# The probes run a region with its parameters in float64 (``_params64``), while values the region computes from
# integers or casts keep their float32 type: ops that, unlike elementwise ones, refuse operands of two float dtypes
# (a Hugging Face rotary table is ``inv_freq[None, :, None] @ position_ids[:, None, :].float()``) compute in the
# wider one. Given to run_graph as ``impls`` by every probe evaluation.
PROBE_IMPLS = {op: _promoting(SEMANTICS[op]) for op in ("matmul", "linear", "einsum", "conv1d") if op in SEMANTICS}


def _wide_cast(x, *, dtype):
    """A probe compares what a region means, not how it rounds: a cast from one float type to another (Hugging
    Face's ``softmax(scores.float()).to(q.dtype)`` in a bf16 model) keeps the probe's float64 value. Probing with
    the casts rounding made every bf16 region's tolerance the rounding's (0.3 of the output's scale), under which
    an ALiBi bias or a temperature of 1.1 passed for plain attention; without them the probe holds a region of any
    dtype to float64's tolerance, and the op that replaces it computes at the spec's precision for its dtype."""
    if x.is_floating_point() and dtype.is_floating_point:
        return x
    return x.to(dtype)


PROBE_IMPLS["cast"] = _wide_cast
_STEP_IMPLS = {"cast": _wide_cast}   # a proposal's adapter steps, evaluated the same way


def _params64(graph: Graph, targets=None, stop=(), nodes=None) -> dict:
    """The parameters as float64 (for the probes); with ``targets``, only those the region from ``stop`` to the
    targets reads (converting every weight of a large model for each probe costs seconds); ``nodes``: that region
    where the caller has it."""
    if targets is None:
        nodes = graph.nodes
        used = set(graph.param_values.values())
    else:
        nodes = region_nodes(graph, targets, set(stop)) if nodes is None else nodes
        used = {x for n in nodes for x in n.value_inputs if x.kind == "param"}
        used |= {t for t in targets if isinstance(t, Value) and t.kind == "param"}
    out = {}
    for name, v in graph.param_values.items():
        if v in used:
            p = graph.params[name]
            if not p.is_floating_point():
                out[v] = p
            else:
                out[v] = _moved(p) if p.requires_grad and _passes_gradient(v, nodes) else p.detach().to(torch.float64)
    return out


# ops that pass no gradient to an operand (comparisons, rounding), and where/masked_fill's condition operand
_NO_GRADIENT = {"eq", "ne", "lt", "le", "gt", "ge", "floor", "ceil", "round", "sign", "logical_not", "logical_and",
                "logical_or"}


def _passes_gradient(v: Value, nodes: list) -> bool:
    """Whether the region's ops could pass a gradient to ``v``: some use of it (through views) is not a comparison,
    a rounding, a cast to an integer or bool type, or where/masked_fill's condition (a causal mask stored as a
    trainable Parameter and compared with 0 gets no gradient in the module either: it may be built in)."""
    from ..ir.ops import VIEWS

    users: dict = {}
    for n in nodes:
        for i, x in enumerate(n.inputs):
            if isinstance(x, Value):
                users.setdefault(x, []).append((n, i))
    todo, seen = [v], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        for n, i in users.get(x, []):
            if n.op in _NO_GRADIENT or (n.op == "where" and i == 0) or (n.op == "masked_fill" and i == 1) \
                    or (n.op == "cast" and not n.outputs[0].type.dtype.is_float):
                continue
            if n.op in VIEWS:
                todo.extend(n.outputs)
                continue
            return True
    return False


def probe_param(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a probe's region reads it where it passes a gradient (_params64): what a proposal that keeps
    the parameter as an operand of its op (a causal conv's weights) must read too."""
    return _moved(p) if p.requires_grad else p.detach().to(torch.float64)


def _moved(p: torch.Tensor) -> torch.Tensor:
    """A parameter as the probes read it: float64; a trainable one moved off its values (noise of 10% of its mean
    magnitude, at least 0.02; the same draw for the same data). A proposal may build a frozen value in (a
    temperature become the attention's scale), but a trainable one must stay an operand of ordinary ops: built
    in, it gets no gradient. A per-head temperature initialised equal across heads to 1/sqrt(d) (or a bias
    initialised to zero) probed equal to plain attention at its initial values; moved, it does not."""
    x = p.detach().to(torch.float64)
    if not x.numel():
        return x
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(tuple(x.shape), generator=gen, dtype=torch.float64).to(x.device)
    return x + noise * (0.1 * x.abs().mean().item() + 0.02)


# -- the memo: one probe per distinct region structure ------------------------------------------------------
_MEMO: contextvars.ContextVar = contextvars.ContextVar("sessa_probe_memo", default=None)


@dataclass
class ProbeStats:
    """What the probes of one recognition cost: regions evaluated, and answers reused from an identical region."""

    run: int = 0
    reused: int = 0
    not_keyed: int = 0
    memo: dict = field(default_factory=dict, repr=False)


@contextlib.contextmanager
def probe_memo():
    """Within this block, probes of structurally identical regions run once (see the module docstring)."""
    stats = ProbeStats()
    token = _MEMO.set(stats)
    try:
        yield stats
    finally:
        _MEMO.reset(token)


class _NoKey(Exception):
    """The proposal closes over something the memo key cannot describe: probe it."""


def _tensor_key(t: torch.Tensor) -> tuple:   # (requires_grad: a trainable parameter is probed moved, _moved)
    return ("tensor", str(t.dtype), tuple(t.shape), tensor_digest(t), bool(t.requires_grad))


@functools.lru_cache(maxsize=4096)
def _srepr(x: sympy.Basic) -> str:
    """sympy.srepr, remembered (expressions are immutable and hashable; a memo key prints the same few dims
    thousands of times)."""
    return sympy.srepr(x)


class _Keyer:
    """Describes a region and a proposal in terms that do not name values: each value is its position."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.ids: dict = {}

    def number(self, v: Value, what):
        self.ids[v] = (len(self.ids), what)

    def value(self, v: Value):
        if v in self.ids:
            return ("v", self.ids[v][0])
        if v.kind == "param" and v.name in self.graph.params:   # a parameter the region reads: by its data
            self.number(v, "param")
            return ("param", str(v.type), _tensor_key(self.graph.params[v.name]))
        raise _NoKey(f"value %{v.name} outside the region")

    def obj(self, x, depth: int = 0):
        if depth > 12:
            raise _NoKey("too deep")
        if x is None or isinstance(x, (bool, int, float, str, complex)):
            return (type(x).__name__, repr(x))
        if isinstance(x, Value):
            return self.value(x)
        if isinstance(x, Graph):
            if x is not self.graph:
                raise _NoKey("another graph")
            return ("graph",)
        if isinstance(x, torch.Tensor):
            return _tensor_key(x)
        if isinstance(x, sympy.Basic):
            return ("sym", _srepr(x))
        if isinstance(x, (list, tuple)):
            return (type(x).__name__,) + tuple(self.obj(y, depth + 1) for y in x)
        if isinstance(x, dict):
            return ("dict",) + tuple((self.obj(k, depth + 1), self.obj(v, depth + 1)) for k, v in x.items())
        if isinstance(x, (set, frozenset)):
            return ("set",) + tuple(sorted(repr(self.obj(y, depth + 1)) for y in x))
        if isinstance(x, types.FunctionType):
            code = x.__code__
            cells = tuple(self.obj(c.cell_contents, depth + 1) for c in (x.__closure__ or ()))
            return ("fn", code.co_filename, code.co_firstlineno, code.co_code, repr(code.co_consts),
                    self.obj(x.__defaults__, depth + 1), self.obj(x.__kwdefaults__, depth + 1), cells)
        if isinstance(x, types.BuiltinFunctionType) or isinstance(x, type):
            return ("global", getattr(x, "__module__", None), x.__qualname__)
        if isinstance(x, Node):   # a node of the region (its op and attributes are in the key already)
            return ("node", tuple(self.value(o) for o in x.outputs))
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return (type(x).__qualname__,) + tuple(self.obj(getattr(x, f.name), depth + 1)
                                                   for f in dataclasses.fields(x))
        raise _NoKey(f"a {type(x).__name__}")


def _memo_key(graph: Graph, sources: dict, output: Value, canonical, tol, lengths) -> tuple:
    k = _Keyer(graph)
    head = []
    for v, kind in sources.items():
        if v in k.ids:
            raise _NoKey("a source twice")
        k.number(v, "source")
        head.append((str(v.type), kind))
    body = []
    for n in region_nodes(graph, [output], set(sources)):
        ins = []
        for x in n.inputs:
            if isinstance(x, Value):
                if x not in k.ids and x.kind == "input":   # data the sources do not cover: the probe fails
                    k.number(x, "input")
                    ins.append(("input", str(x.type)))
                else:
                    ins.append(k.value(x))
            else:
                ins.append(k.obj(x))
        attrs = tuple((a, k.obj(b)) for a, b in sorted(n.attrs.items()))
        for o in n.outputs:
            k.number(o, "node")
        body.append((n.op, tuple(ins), attrs, tuple(str(o.type) for o in n.outputs)))
    out = k.value(output) if output in k.ids or output.kind == "param" else ("unreached", str(output.type))
    return (tuple(head), tuple(body), out, k.obj(canonical), repr(tol), tuple(lengths))


def probe(graph: Graph, sources: dict, output: Value, canonical, tol: float = 1e-6, lengths=PROBE_LENGTHS,
          batch: int = PROBE_BATCH, grad: bool = False, large: bool = False):
    """Compare the region (sources -> output) with ``canonical(inputs: dict, binding) -> tensor``.

    ``sources`` maps each source Value to a sampler name: "normal", "gain" (values in (-0.95, 0.95)) or
    "keymask" (a [B, T] 0/1 mask in the source's dtype: see ``key_mask_sample``; with one, outputs that are NaN
    in both the region and the proposal, at the same places, agree).
    Returns the worst relative error, or None when the region cannot be evaluated on its own
    (it reads data that is not among the sources) or the shapes do not match. Inside ``probe_memo()``
    a structurally identical region and proposal reuse the first one's result. ``grad``: the gradients of both
    with respect to the normal/gain sources (for a random cotangent) count too, where the values alone cannot
    tell two forms apart (a row a mask empties: an additive mask passes it gradient, a masked_fill does not).
    ``large``: one more pass with the normal sources LARGE_SCALE times larger (softmax regions: logits of order
    LARGE_SCALE**2, where a clamp or a threshold on the scores acts; at unit scale it never does).
    """
    stats = _MEMO.get()
    if stats is None:
        return _probe(graph, sources, output, canonical, tol, lengths, batch, grad, large)
    try:
        key = _memo_key(graph, sources, output, canonical, tol, lengths) + (batch, grad, large)
    except _NoKey:
        stats.not_keyed += 1
        stats.run += 1
        return _probe(graph, sources, output, canonical, tol, lengths, batch, grad, large)
    if key in stats.memo:
        stats.reused += 1
        return stats.memo[key]
    stats.run += 1
    stats.memo[key] = result = _probe(graph, sources, output, canonical, tol, lengths, batch, grad, large)
    return result


def key_mask_sample(shape, gen: torch.Generator) -> torch.Tensor:
    """A [B, T] 0/1 key-padding mask (float64) whose rows cycle through: left padding (1..T padded positions, so
    some queries see no unpadded key), right padding (0..T-1 padded), random holes, no padding."""
    if len(shape) != 2:
        raise ValueError(f"a key-padding mask sample is [B, T], got {list(shape)}")
    Bn, Tn = shape
    m = torch.ones(Bn, Tn, dtype=torch.float64)
    for b in range(Bn):
        kind = b % 4
        if Tn == 0 or kind == 3:
            continue
        if kind == 0:
            m[b, :int(torch.randint(1, Tn + 1, (1,), generator=gen))] = 0
        elif kind == 1:
            m[b, Tn - int(torch.randint(0, Tn, (1,), generator=gen)):] = 0
        else:
            m[b] = (torch.rand(Tn, generator=gen, dtype=torch.float64) < 0.6).to(torch.float64)
    return m


# The longest length a size threshold is probed at (below): an attention-sized probe costs O(T^2) in float64.
THRESHOLD_PROBE_MAX = 320


def _threshold_lengths(region: list, lengths) -> list:
    """Lengths just past the constants the region's sizes compare T with: top-k attention keeps min(16, T) keys
    per row, which at the probe lengths (T <= 12) is every key, so it probes equal to plain attention; at T = 17 it
    is not. Every integer in a size or attribute that depends on T (Min(16, T), T + 16) gives one length c + 1
    past the probe lengths (at most THRESHOLD_PROBE_MAX)."""
    if len(lengths) < 2:
        return []   # (a probe at one pinned or long length)
    T = sym("T")
    found = set()

    def scan(x):
        if isinstance(x, sympy.Basic) and T in x.free_symbols:
            found.update(int(a) for a in x.atoms(sympy.Integer))
        elif isinstance(x, (list, tuple)):
            for y in x:
                scan(y)

    for n in region:
        for v in n.outputs:
            scan(list(v.type.shape))
        scan(list(n.attrs.values()))
    return sorted(c + 1 for c in found if max(lengths) < c + 1 <= THRESHOLD_PROBE_MAX)


# ``probe(large=True)``'s extra pass: normal sources this many times larger. q . k then reaches several hundred:
# a clamp of the scores at +-30 or +-50 (which unit-scale probes never reach) shows, while exp stays finite.
LARGE_SCALE = 6.0


def _probe(graph: Graph, sources: dict, output: Value, canonical, tol: float, lengths, batch: int,
           grad: bool = False, large: bool = False):
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    region = region_nodes(graph, [output], set(sources))
    if any(n.op == "detach" for n in region):
        # the module stops gradients inside the region (k.detach(), a no_grad block): a core op in its place
        # would compute the same values but pass gradients where the module does not
        return None
    params = _params64(graph, [output], sources, region)
    passes = [(T, 1.0) for T in lengths] + [(T, 1.0) for T in _threshold_lengths(region, lengths)] \
        + ([(lengths[min(2, len(lengths) - 1)], LARGE_SCALE)] if large else [])
    for T, amp in passes:
        binding = _binding(graph, T, batch, region)
        inputs = {}
        for v, kind in sources.items():
            shape = v.type.concrete_shape(binding)
            if kind == "keymask":
                inputs[v] = key_mask_sample(shape, gen).to(torch_dtype(v.type.dtype.name))
                continue
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            if kind == "gain":
                x = torch.tanh(x) * 0.95
            elif amp != 1.0:
                x = x * amp
            inputs[v] = x
        wrt = [v for v, kind in sources.items() if kind != "keymask"] if grad else []
        try:
            with torch.enable_grad() if grad else contextlib.nullcontext():
                for v in wrt:
                    inputs[v].requires_grad_(True)
                (ref,) = run_graph(graph, [], overrides={**params, **inputs}, targets=[output],
                                   binding=binding, check_inputs=False, impls=PROBE_IMPLS)
                got = canonical(inputs, binding)
                if got.shape != ref.shape:
                    return None
                if wrt:
                    cot = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.dtype)
                    gref = torch.autograd.grad(ref, [inputs[v] for v in wrt], cot, allow_unused=True)
                    ggot = torch.autograd.grad(got, [inputs[v] for v in wrt], cot.to(got.dtype), allow_unused=True)
                    for a, b in zip(gref, ggot):
                        a = torch.zeros(()) if a is None else a.detach().to(torch.float64)
                        b = torch.zeros(()) if b is None else b.detach().to(torch.float64)
                        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                            return None
                        scale = max(a.abs().max().item(), b.abs().max().item()) or 1.0
                        worst = max(worst, (a - b).abs().max().item() / scale)
                ref, got = ref.detach(), got.detach()
        except Exception:  # noqa: BLE001 - a region that cannot run on its own is simply not a match
            return None
        ref, got = ref.to(torch.float64), got.to(torch.float64)
        if "keymask" in sources.values():   # NaN where both are NaN agrees (rows with no visible key)
            if (ref.isnan() != got.isnan()).any():
                return None
            ref, got = ref.nan_to_num(0.0), got.nan_to_num(0.0)
        # a non-finite value in either is no match (got's must be finite, and then ref's too to match it): a sum
        # is finite only where every term is (one pass, no [B, T, ...] temporaries: these probes run at T = 8192)
        if not (torch.isfinite(got.sum()) and torch.isfinite(ref.sum())):
            return None
        scale = max(ref.max().item(), -ref.min().item()) or 1.0
        diff = got - ref
        worst = max(worst, diff.abs_().max().item() / scale)
    if not _masks_hold_at_length(graph, sources, region, lengths):
        return None
    return worst


# The short probes see position pairs at most max(PROBE_LENGTHS) - 1 apart: a mask that differs from causal only
# further apart (a sliding window of 16 or of 4096, chunked attention, attention sinks) probes equal there. The
# region's position masks are therefore also evaluated at this length (or, where the region cannot run there, at
# the largest length it can: a buffer's size, then halving), where each must still be one value below the
# diagonal, one on it and one above, the values it has at the probes' lengths.
MASK_CHECK_LENGTH = 4100


def _position_values(graph: Graph, sources: dict, region: list):
    """The region's values computed from sizes, constants and buffers alone that an op reads together with the
    probe's data: square [..., T, T] masks, and position factors whose dims are all T or 1 ([T], [T, 1], [1, T]:
    a per-query scale such as log-n scaling, a bias on key positions; and scalars, [] or [1]: a scale computed
    from the length, clamp(log(T) / log(64), min=1), which is 1 at every probe length)."""
    T = sym("T")
    # data: what the probe's draws flow into. A key-padding mask source is not data here: a mask built from it and
    # from positions (Hugging Face's chunked-attention mask shifts its chunks by each row's left padding) is
    # evaluated with that source all ones (_eval_masks), where it must still be a position mask
    data = {v for v, kind in sources.items() if kind != "keymask"}
    for n in region:
        if any(x in data for x in n.value_inputs):
            data.update(n.outputs)
    masks, factors = [], []
    for n in region:
        if not any(x in data for x in n.value_inputs):
            continue
        for x in n.value_inputs:
            shape = x.type.shape
            if x in data or x in masks or x in factors:
                continue
            # (square [.., T, T] only: a slice such as [T, T - 1] has no diagonal to hold the check to)
            if len(shape) >= 2 and all(d == T for d in shape[-2:]):
                masks.append(x)
            elif all(d == T or d == 1 for d in shape):   # ([T], [T, 1], and scalars: log(n) of a length)
                factors.append(x)
    return masks, factors


def _masks_hold_at_length(graph: Graph, sources: dict, region: list, lengths) -> bool:
    """Whether every position mask of the region (``_position_values``) is, at T = MASK_CHECK_LENGTH, constant
    below, on and above the diagonal with the values it has at the longest probe length, and every position
    factor that is one value at that length is the same one value there. A mask that depends on position pairs
    only through their order (causal, strictly causal, full) passes at any length; a window, a chunk or a band
    shows at the first pair beyond it, and a factor that starts at position 16 or 2048 at the first position
    past it. Where the region cannot run at that length (a mask buffer of fewer positions), the check runs at
    the largest size of a buffer the masks read that it runs at, then at halved lengths."""
    masks, factors = _position_values(graph, sources, region)
    if not masks and not factors:
        return True
    short = max(lengths)
    if short < 2:
        return True
    values = masks + factors
    keymasks = [v for v, kind in sources.items() if kind == "keymask"]
    nodes = region_nodes(graph, values, set(keymasks))
    at_short = _eval_masks(graph, values, nodes, short, keymasks)
    if at_short is None:
        return True   # (the probe itself ran there: not expected)
    sizes = sorted({d for n in nodes for x in n.value_inputs if x.kind == "param" for d in x.type.shape
                    if isinstance(d, int) and short + 1 < d < MASK_CHECK_LENGTH}, reverse=True)
    tried = set()
    for length in [MASK_CHECK_LENGTH] + sizes + [MASK_CHECK_LENGTH // 2 ** i for i in range(1, 12)]:
        if length <= short + 1 or length in tried:
            continue
        tried.add(length)
        at_long = _eval_masks(graph, values, nodes, length, keymasks)
        if at_long is None:
            continue
        k = len(masks)
        return (all(_triangle_values(a) is not None and _triangle_values(a) == _triangle_values(b)
                    for a, b in zip(at_short[:k], at_long[:k]))
                and all(_one_value(a) is None or _one_value(a) == _one_value(b)
                        for a, b in zip(at_short[k:], at_long[k:])))
    return True   # the region runs at no longer length: the module cannot be called there either


def _one_value(m: torch.Tensor):
    """m's one value (NaN as "nan"), or None when it holds two."""
    flat = m.reshape(-1)
    if not flat.numel() or not _all_equal(flat, flat[:1]):
        return None
    x = flat[0].item()
    return "nan" if x != x else x


def _all_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a == b everywhere (broadcast), NaN equal to NaN."""
    eq = a == b
    if a.is_floating_point():
        eq |= a.isnan() & b.isnan()
    return bool(eq.all())


def _eval_masks(graph: Graph, masks: list, nodes: list, T: int, keymasks=()):
    """The masks at length T, batch 1; key-padding mask sources all ones (every key a real one)."""
    binding = _binding(graph, T, 1, nodes)
    try:
        with torch.no_grad():
            ones = {v: torch.ones(v.type.concrete_shape(binding), dtype=torch_dtype(v.type.dtype.name))
                    for v in keymasks}
            return run_graph(graph, [], overrides=ones, targets=masks, binding=binding, check_inputs=False,
                             impls=PROBE_IMPLS)
    except Exception:   # noqa: BLE001 - the region cannot run at this length (a buffer of fewer positions)
        return None


def _triangle_values(m: torch.Tensor):
    """(below, on, above) the diagonal of every [T, T] slice of m, each one value per slice (a tuple of
    per-slice values, NaN as a string so that equal NaNs compare equal), or None when a part holds two.
    Constant on each part is the same as: equal along every diagonal (m[1:, 1:] == m[:-1, :-1], one pass) with
    a constant first column below the diagonal and first row above it."""
    m = m.reshape(-1, m.shape[-2], m.shape[-1])
    T = m.shape[-1]
    if m.shape[-2] != T or T < 2:
        return None

    col, row = m[:, 1:, 0], m[:, 0, 1:]
    if not (_all_equal(m[:, 1:, 1:], m[:, :-1, :-1]) and _all_equal(col, col[:, :1])
            and _all_equal(row, row[:, :1])):
        return None
    return tuple(tuple("nan" if x != x else x for x in v.tolist()) for v in (m[:, 1, 0], m[:, 0, 0], m[:, 0, 1]))
