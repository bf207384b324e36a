"""The eager backend: runs the IR with the interpreter of sessa_compiler.semantics (every op's meaning).

It is the oracle for every other backend. It runs in float64 as well as in float32/bf16; the graphs of
bf16/f16 models (a half input or parameter) are computed in float32 and rounded once at their outputs
(``run_half_in_float32``); a float32 model's own 16-bit roundings run as they are.
"""
from __future__ import annotations

import torch

from ..ir.dtypes import HALF, to_torch
from ..ir.graph import Graph
from ..ir.verify import verify_graph
from ..ir.types import DType
# The interpreter and every op's meaning live in sessa_compiler.semantics; the names are re-exported here
# for the backends that run the ops they do not generate kernels for through it.
from ..semantics import bind_symbols, resolve, run_graph, run_node  # noqa: F401
from .base import Backend




def half_model(graph: Graph) -> bool:
    """Whether the graph is a half-precision model's: a bf16/fp16 input or parameter. A float32 model's own
    16-bit values (an explicit ``x.to(torch.bfloat16).float()`` round trip, fake quantisation, the casts of a
    graph traced under torch.autocast) are roundings the module makes, kept as they are: widening them dropped
    them (errors 1.6e-3 relative on a float32 model, where the spec allows 1e-5)."""
    return any(v.type.dtype.name in HALF for v in list(graph.inputs) + list(graph.param_values.values()))


def widened(graph: Graph) -> Graph | None:
    """A copy of ``graph`` that computes every bf16/f16 value in float32, or None when it has none (or when a
    fallback op names a dtype, which the copy could not honour). Rounding a half-precision layer once at
    its outputs instead of at every stored tensor keeps it within the spec's tolerance at settings where
    the module itself misses it (docs/spec.md, "Half precision at extreme settings")."""
    from ..ir.types import TensorType

    if not half_model(graph):
        return None
    if any(n.op == "fallback" and "dtype" in repr(n.attrs) for n in graph.nodes):
        return None
    wide = graph.clone()
    f32 = DType("f32")
    for v in wide.values():
        if v.type.dtype.name in HALF:
            v.type = TensorType(f32, v.type.shape)
    for n in wide.nodes:
        n.attrs = {k: f32 if isinstance(a, DType) and a.name in HALF else a for k, a in n.attrs.items()}
    verify_graph(wide)
    return wide


def run_half_in_float32(graph: Graph, cache: dict, inputs, params):
    """Run a graph with half-precision values in float32 (inputs and parameters widened, outputs rounded back
    to their declared dtypes once); a graph without half values runs as it is."""
    if not half_model(graph):
        return run_graph(graph, inputs, params)
    key = str(graph)  # the graph may be edited between calls: widen what is there now
    if key not in cache:
        cache.clear()
        cache[key] = widened(graph)
    wide = cache[key]
    if wide is None:
        return run_graph(graph, inputs, params)
    return call_widened(graph, lambda i, p: run_graph(wide, i, p), inputs, params)


def widen(x):
    """bf16/fp16 tensors widened to float32; anything else as it is."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x


def call_widened(graph: Graph, run_wide, inputs, params) -> list:
    """One call of a half-precision ``graph`` through ``run_wide``, a runner of its float32 copy (widened):
    the inputs are checked against the declared (half) types, inputs and parameters widened, and the outputs
    rounded back to their declared dtypes once."""
    bind_symbols(graph, inputs)
    outs = run_wide([widen(x) for x in inputs], {k: widen(v) for k, v in params.items()})
    return [o.to(to_torch(v.type.dtype)) if v.type.dtype.name in HALF else o for o, v in zip(outs, graph.outputs)]


def empty_operand_sizes(graph: Graph) -> list:
    """The element counts (expressions of the sizes) of a reduction's or contraction's operands that can be empty
    while no input is and the op's output is not: a reduction over ``h[:, 1:]`` at T = 1, a loss over
    ``logits[:, :-1]``. Where one is 0, a generated kernel's reduction never runs its initialisation (TVM:
    ``T.init()`` sits inside the empty loop) and returns whatever its buffer held. A count that is a product of
    sizes is 0 only where an input is empty (checked apart); a count that is 0 for every size (a static empty
    slice) is the literal 0."""
    import sympy

    from ..ir.ops import COMPUTE, CORE, OPS, REDUCTION

    counts: dict = {}   # shape -> (element count, whether it is a product of sizes): shapes repeat

    def count(v):
        shape = tuple(v.type.shape)
        hit = counts.get(shape)
        if hit is None:
            if all(isinstance(d, int) or d.is_Symbol for d in shape):
                n = 1
                for d in shape:
                    n = n * d
                hit = (n, n != 0)
            else:
                n = sympy.expand(sympy.Mul(*shape))
                hit = (n, n != 0 and all(f.is_Number or f.is_Symbol or (f.is_Pow and f.base.is_Symbol)
                                         for f in sympy.Mul.make_args(n)))
            counts[shape] = hit
        return hit

    sizes = {}
    for node in graph.nodes:
        # reductions and contractions (a sum, a linear over K = 0, attention over no keys), not a concatenation or
        # a broadcast with an empty piece, whose outputs are right
        if not node.outputs or getattr(OPS.get(node.op), "kind", None) not in (REDUCTION, COMPUTE, CORE):
            continue
        out, _ = count(node.outputs[0])
        if out == 0:
            continue
        for v in node.value_inputs:
            n, product = count(v)
            if not product and n != out:
                sizes[n] = None
    return list(sizes)


def eager_when_empty(graph: Graph, runner, sizes: list):
    """``runner``, except that calls with an empty input (T = 0 or B = 0), or whose sizes make one of ``sizes``
    (``empty_operand_sizes``: the caller runs a graph where one is 0 at every size on the interpreter) 0, run on
    the interpreter: there is nothing to compute, generated kernels need at least one row (TVM rejects zero-size
    strides), and their reductions over nothing return an uninitialised buffer instead of torch's 0 (sum) or NaN
    (mean)."""
    import functools

    from ..ir.types import eval_dim

    def empty(inputs) -> bool:
        if any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in inputs):
            return True
        if not sizes:
            return False
        binding = bind_symbols(graph, inputs)
        return any(eval_dim(n, binding) == 0 for n in sizes)

    @functools.wraps(runner)
    def run(inputs, params):
        return run_graph(graph, inputs, params) if empty(inputs) else runner(inputs, params)
    return run


class EagerBackend(Backend):
    """Runs a graph node by node with torch: slow, exact, the definition."""

    name = "eager"
    differentiable = True   # runs torch ops: autograd records them

    def __init__(self, *, print_ir: bool | None = None):
        self.print_ir = print_ir  # None: SESSA_COMPILER_PRINT_IR decides

    def prepare(self, graph: Graph, ctx=None):  # ctx: a CompileContext (eager runs no pipeline: unused)
        from ..passes.manager import show_ir

        # No pass rewrites the graph here (edits to compiled.graph between calls take effect); print_ir
        # prints the IR that runs, in the same format as the Triton backend's pass-by-pass listing.
        show_ir(graph, "run by the eager backend (no pass rewrites it)", self.print_ir)
        cache: dict = {}
        return lambda inputs, params: run_half_in_float32(graph, cache, inputs, params)

    def describe(self, graph: Graph) -> str:
        half = (" bf16/fp16 values are computed in float32 and the outputs rounded once." if widened(graph) is not None
                else "")
        feedback = "; feedback as a dense triangular solve" if any(n.op == "feedback" for n in graph.nodes) else ""
        return (f"backend eager: {len(graph.nodes)} ops interpreted one by one with torch "
                f"(no fused kernels{feedback}).{half}")
