"""The ``fused`` op: a convex group of elementwise / layout / norm ops that one generated kernel computes.

Produced by the fusion pass (passes/fuse.py). The group's ops are kept in ``body`` as the IR text
of a small graph, one string per line, whose inputs are the operands (same names and types) and
whose outputs are the node's outputs, so the fused IR prints, parses back and reads like the code
it replaced::

    %add_2: f32[B, T, 32], %ln: f32[B, T, 32] = fused(%x, %proj, %ln.weight, %ln.bias) {group=0, kernel='rowwise',
        bytes_saved=256*B*T, body=['graph group0(%x: f32[B, T, 32], %proj: f32[B, T, 32], ...) {',
        '%add_2: f32[B, T, 32] = add(%x, %proj)',
        '%ln: f32[B, T, 32] = layer_norm(%add_2, %ln.weight, %ln.bias) {normalized_shape=[32], eps=1e-05}',
        'return %add_2, %ln', '}']}

(one line in the real text). Its semantics are the body's: the eager backend runs
the body op by op (semantics/table.py: fused), the Triton backend one kernel per group.

Row space: every value of a group is a tile of one [rows, N] grid, where rows are the leading dims
``L`` (e.g. [B, T]) and N the static width. ``classify`` places a shape in that grid: ``row``
(L + [N]), ``rowscalar`` (L + [1] or L), ``vec`` ([N], broadcast over rows) or ``scalar``.
"""
from __future__ import annotations

import functools

from ..errors import IRError
from .graph import Graph, print_graph
from .ops import NUM, fail, register
from .text import parse
from .types import TensorType, dims_equal

FUSED = "fused"               # op kind
FUSED_KERNELS = ("rowwise", "pointwise")


@functools.lru_cache(maxsize=512)
def _parse_body(lines: tuple) -> Graph:
    return parse("\n".join(lines))


def parse_body(node_or_lines) -> Graph:
    """The group's ops as a Graph (cached: do not mutate it). Takes a fused node or its ``body``."""
    lines = node_or_lines.attrs["body"] if hasattr(node_or_lines, "attrs") else node_or_lines
    try:
        return _parse_body(tuple(lines))
    except IRError as e:
        raise IRError(f"op 'fused': body does not parse: {e}") from e


def body_lines(body: Graph) -> list:
    """A body Graph as the ``body`` attribute: its printed text, one string per line, indentation dropped."""
    return [ln.strip() for ln in print_graph(body).splitlines()]


# -- the row space -----------------------------------------------------------------------------------
def classify(shape: tuple, L: tuple, N: int):
    """Where a value of ``shape`` sits in the [rows = L, N] grid: row | rowscalar | vec | scalar | None."""
    r = len(L)
    if len(shape) == r + 1 and all(dims_equal(a, b) for a, b in zip(shape[:-1], L)):
        if dims_equal(shape[-1], N):
            return "rowscalar" if N == 1 else "row"
        if shape[-1] == 1:
            return "rowscalar"
    if len(shape) == r and all(dims_equal(a, b) for a, b in zip(shape, L)) and r > 0:
        return "rowscalar"
    if all(d == 1 for d in shape):
        return "scalar"
    if len(shape) <= r + 1 and dims_equal(shape[-1], N) and all(d == 1 for d in shape[:-1]):
        return "vec"
    return None


def candidate_spaces(types) -> list:
    """(L, N) pairs suggested by value types whose last dim is static, widest first."""
    out = []
    for t in types:
        if t.rank >= 1 and isinstance(t.shape[-1], int) and t.rank >= 2:
            space = (tuple(t.shape[:-1]), t.shape[-1])
            if not any(len(s[0]) == len(space[0]) and s[1] == space[1] and
                       all(dims_equal(a, b) for a, b in zip(s[0], space[0])) for s in out):
                out.append(space)
    return sorted(out, key=lambda s: -s[1])


def row_space(body: Graph):
    """The (L, N) grid a group's body lives in, or None when no single grid holds every value.

    Produced values must be ``row`` or ``rowscalar`` (a kernel writes per row), reads may also be
    ``vec`` or ``scalar``; layer_norm must normalise a full row of width N.
    """
    types = [v.type for v in body.inputs] + [o.type for n in body.nodes for o in n.outputs]
    for L, N in candidate_spaces(types):
        if all(classify(t.shape, L, N) is not None for t in types) and all(
                classify(o.type.shape, L, N) in ("row", "rowscalar") for n in body.nodes for o in n.outputs) and all(
                classify(n.inputs[0].type.shape, L, N) == "row" and list(n.attrs["normalized_shape"]) == [N]
                for n in body.nodes if n.op == "layer_norm"):
            return L, N
    return None


def fused_infer(node):
    body = parse_body(node)
    if len(body.inputs) != len(node.inputs):
        fail(node, f"body takes {len(body.inputs)} inputs, the node has {len(node.inputs)} operands")
    for i, (x, b) in enumerate(zip(node.inputs, body.inputs)):
        if not hasattr(x, "type") or not x.type.same_as(b.type):
            fail(node, f"operand {i} is {getattr(x, 'type', x)} but the body's input %{b.name} is {b.type}")
    if body.param_values:
        fail(node, "a fused body takes parameters as inputs, not as 'param' lines")
    if node.attrs["kernel"] not in FUSED_KERNELS:
        fail(node, f"kernel must be one of {FUSED_KERNELS}, got {node.attrs['kernel']!r}")
    for op in body.nodes:
        if op.op == "fused":
            fail(node, "a fused group cannot contain another fused group")
    if len(body.outputs) != len(node.outputs):
        fail(node, f"body returns {len(body.outputs)} values, the node declares {len(node.outputs)} outputs")
    for out, ret in zip(node.outputs, body.outputs):
        if out.name != ret.name:
            fail(node, f"output %{out.name} must be named like the body's return value %{ret.name}")
    if row_space(body) is None:
        fail(node, "the body's values do not fit one [rows, N] grid (see ir/ops_fused.py: row_space)")
    return [TensorType(v.type.dtype, v.type.shape) for v in body.outputs]


register(FUSED, FUSED, (1, None), {"group": (True, (int,)), "kernel": (True, (str,)),
                                   "bytes_saved": (False, NUM), "body": (True, (list, tuple))},
         fused_infer, n_outputs=None,
         doc="a convex group of elementwise/layout/norm ops computed by one kernel; body = the ops as IR "
             "text over the operands' names, ending with 'return'")
