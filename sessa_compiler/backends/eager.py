"""The eager backend: an interpreter that runs the IR with torch ops.

It is the semantic definition of every IR op and the oracle for every other backend. It runs in
float64 as well as in float32/bf16.
"""
from __future__ import annotations

from typing import Callable, Mapping

import sympy
import torch
import torch.nn.functional as F

from ..dtypes import to_torch
from ..errors import InputError, IRError, SessaCompilerError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import ArgRef
from ..ir.types import DType, eval_dim
from ..ir.ops_fused import parse_body
from ..semantics import chunked
from .base import Backend
from .reference import attention_ref, feedback_ref, rope_ref, scan_ref, tri_solve_ref

Impl = Callable[..., object]
IMPLS: dict[str, Impl] = {}


def impl(*names):
    def deco(fn):
        for n in names:
            IMPLS[n] = fn
        return fn
    return deco


def resolve(x, binding: Mapping[str, int]):
    """Turn symbolic attribute values into concrete Python values for one call."""
    if isinstance(x, sympy.Basic):
        return eval_dim(x, binding)
    if isinstance(x, list):
        return [resolve(y, binding) for y in x]
    if isinstance(x, tuple):
        return tuple(resolve(y, binding) for y in x)
    if isinstance(x, dict):
        return {k: resolve(v, binding) for k, v in x.items()}
    if isinstance(x, DType):
        return to_torch(x)
    return x


# -- core ops -------------------------------------------------------------------------------------
@impl("attention")
def _attention(q, k, v, inv_freq=None, *, scale, causal, rope=False):
    return attention_ref(q, k, v, scale, causal, inv_freq if rope else None)


@impl("feedback")
def _feedback(f, q_b, k_b, gamma, *, scale):
    return feedback_ref(f, q_b, k_b, gamma, scale)


@impl("tri_solve")
def _tri_solve(A, b, *, upper, unitriangular):
    return tri_solve_ref(A, b, upper, unitriangular)


# the blocked forms passes introduce (ir/ops_chunked.py), defined in semantics/chunked.py
IMPLS.update({"feedback_lse": chunked.feedback_lse, "feedback_diag_inverse": chunked.feedback_diag_inverse,
              "feedback_chunked": chunked.feedback_chunked, "scan_chunked": chunked.scan_chunked})


@impl("fused")
def _fused(*operands, group, kernel, body, bytes_saved=None):
    """A fused group (ir/ops_fused.py) means its body's ops, one by one."""
    outs = run_graph(parse_body(body), list(operands), {})
    return tuple(outs) if len(outs) != 1 else outs[0]


@impl("scan")
def _scan(u, delta, A, B, C, D):
    return scan_ref(u, delta, A, B, C, D)


@impl("rope")
def _rope(x, inv_freq):
    return rope_ref(x, inv_freq)


# -- compute ---------------------------------------------------------------------------------------
IMPLS["linear"] = lambda x, w, b=None: F.linear(x, w, b)
IMPLS["matmul"] = torch.matmul
IMPLS["einsum"] = lambda *xs, equation: torch.einsum(equation, *xs)
IMPLS["layer_norm"] = lambda x, w=None, b=None, *, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps)
IMPLS["softmax"] = lambda x, *, dim: torch.softmax(x, dim)
IMPLS["log_softmax"] = lambda x, *, dim: torch.log_softmax(x, dim)
IMPLS["embedding"] = lambda w, idx: F.embedding(idx, w)
IMPLS["conv1d"] = lambda x, w, b=None, *, stride, padding, dilation, groups: F.conv1d(x, w, b, stride, padding, dilation, groups)


@impl("causal_conv1d")
def _causal_conv1d(x, w, b=None):
    K = w.shape[1]
    if x.shape[1] == 0:  # an empty sequence: conv1d rejects an input shorter than its kernel
        return torch.empty_like(x)
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w[:, None, :], b, groups=w.shape[0])
    return y.transpose(1, 2)


# -- elementwise -------------------------------------------------------------------------------------
for _name, _fn in {"neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
                   "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "relu": torch.relu,
                   "abs": torch.abs, "sin": torch.sin, "cos": torch.cos, "logical_not": torch.logical_not,
                   "erf": torch.erf, "reciprocal": torch.reciprocal}.items():
    IMPLS[_name] = _fn
IMPLS["gelu"] = lambda x, approximate="none": F.gelu(x, approximate=approximate)
IMPLS["softplus"] = lambda x, beta=1, threshold=20: F.softplus(x, beta, threshold)
for _name, _fn in {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
                   "maximum": torch.maximum, "minimum": torch.minimum, "logical_and": torch.logical_and,
                   "logical_or": torch.logical_or, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt,
                   "le": torch.le, "gt": torch.gt, "ge": torch.ge}.items():
    IMPLS[_name] = _fn
IMPLS["where"] = torch.where
IMPLS["masked_fill"] = lambda x, m, v: x.masked_fill(m, v)
IMPLS["cast"] = lambda x, *, dtype: x.to(dtype)
IMPLS["tril"] = lambda x, *, diagonal: torch.tril(x, diagonal)
IMPLS["triu"] = lambda x, *, diagonal: torch.triu(x, diagonal)

# -- layout ----------------------------------------------------------------------------------------
IMPLS["reshape"] = lambda x, *, shape: x.reshape(shape)
IMPLS["permute"] = lambda x, *, dims: x.permute(dims)
IMPLS["transpose"] = lambda x, *, dim0, dim1: x.transpose(dim0, dim1)
IMPLS["unsqueeze"] = lambda x, *, dim: x.unsqueeze(dim)
IMPLS["squeeze"] = lambda x, *, dims: x.squeeze(tuple(dims))
IMPLS["expand"] = lambda x, *, shape: x.expand(shape)
IMPLS["slice"] = lambda x, *, dim, start, end, step: torch.ops.aten.slice.Tensor(x, dim, start, end, step)
IMPLS["select"] = lambda x, *, dim, index: x.select(dim, index)
IMPLS["split"] = lambda x, *, sizes, dim: tuple(torch.split(x, sizes, dim))
IMPLS["concat"] = lambda *xs, dim: torch.cat(xs, dim)
IMPLS["stack"] = lambda *xs, dim: torch.stack(xs, dim)
IMPLS["repeat_interleave"] = lambda x, *, repeats, dim: x.repeat_interleave(repeats, dim)

# -- reductions and factories --------------------------------------------------------------------------
IMPLS["sum"] = lambda x, dims=None, keepdim=False: torch.sum(x, dims, keepdim) if dims is not None else x.sum()
IMPLS["mean"] = lambda x, dims=None, keepdim=False: torch.mean(x, dims, keepdim) if dims is not None else x.mean()
IMPLS["amax"] = lambda x, dims=None, keepdim=False: torch.amax(x, dims or [], keepdim)


def _factory(fn):
    def run(*, device, **kw):
        return fn(device=device, **kw)
    return run


IMPLS["arange"] = _factory(lambda start, end, step, dtype, device: torch.arange(start, end, step, dtype=dtype, device=device))
IMPLS["full"] = _factory(lambda shape, value, dtype, device: torch.full(shape, value, dtype=dtype, device=device))
IMPLS["eye"] = _factory(lambda n, dtype, device: torch.eye(n, dtype=dtype, device=device))


def resolve_target(target: str):
    """'aten.cumsum.default' -> torch.ops.aten.cumsum.default."""
    ns, _, rest = target.partition(".")
    obj = getattr(torch.ops, ns)
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


def _fill_refs(x, operands):
    if isinstance(x, ArgRef):
        return operands[x.index]
    if isinstance(x, list):
        return [_fill_refs(y, operands) for y in x]
    if isinstance(x, tuple):
        return tuple(_fill_refs(y, operands) for y in x)
    if isinstance(x, dict):
        return {k: _fill_refs(v, operands) for k, v in x.items()}
    return x


@impl("fallback")
def _fallback(*operands, target, args, kwargs, device=None):
    kwargs = dict(kwargs)
    if "device" in kwargs and device is not None:
        kwargs["device"] = device
    return resolve_target(target)(*_fill_refs(args, operands), **_fill_refs(kwargs, operands))


FACTORIES = {"arange", "full", "eye"}


def bind_symbols(graph: Graph, inputs) -> dict:
    """Bind each dimension symbol from the input shapes, and check every input against its type."""
    binding: dict = {}
    if len(inputs) != len(graph.inputs):
        raise InputError(f"graph {graph.name} takes {len(graph.inputs)} inputs ({', '.join('%' + v.name for v in graph.inputs)}), "
                         f"got {len(inputs)}")
    for v, x in zip(graph.inputs, inputs):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input %{v.name}: expected a tensor {v.type}, got {type(x).__name__}")
        if x.dim() != v.type.rank:
            raise InputError(f"input %{v.name}: expected rank {v.type.rank} ({v.type}), got shape {tuple(x.shape)}")
        if x.dtype != to_torch(v.type.dtype):
            raise InputError(f"input %{v.name}: expected dtype {to_torch(v.type.dtype)} ({v.type}), got {x.dtype}")
        for d, n in zip(v.type.shape, x.shape):
            if isinstance(d, sympy.Symbol):
                if binding.setdefault(d.name, int(n)) != int(n):
                    raise InputError(f"input %{v.name}: dimension {d} is {binding[d.name]} elsewhere but {n} here "
                                     f"(expected {v.type}, got shape {tuple(x.shape)})")
    for v, x in zip(graph.inputs, inputs):
        want = v.type.concrete_shape(binding)
        if tuple(x.shape) != want:
            raise InputError(f"input %{v.name}: expected shape {want} ({v.type}), got {tuple(x.shape)}")
    return binding


def run_node(node: Node, env: dict, binding: dict, device):
    operands = [env[x] if isinstance(x, Value) else resolve(x, binding) for x in node.inputs]
    attrs = resolve(node.attrs, binding)
    if node.op in FACTORIES or node.op == "fallback":
        attrs["device"] = device
    fn = IMPLS.get(node.op)
    if fn is None:
        raise IRError(f"op '{node.op}' has no eager implementation")
    try:
        out = fn(*operands, **attrs)
    except SessaCompilerError:
        raise
    except Exception as e:  # name the op that failed, keep the original as the cause
        outs = ", ".join("%" + v.name for v in node.outputs)
        raise SessaCompilerError(f"eager backend: op '{node.op}' ({outs}) failed: {type(e).__name__}: {e}") from e
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(node.outputs):
        raise IRError(f"op '{node.op}' produced {len(outs)} outputs, the node declares {len(node.outputs)}")
    for v, t in zip(node.outputs, outs):
        env[v] = t


def run_graph(graph: Graph, inputs, params: Mapping | None = None, *, overrides: Mapping | None = None,
              targets=None, binding: dict | None = None, check_inputs: bool = True):
    """Execute the graph. ``overrides`` pins values (Value -> tensor) and ``targets`` picks which values
    to return (default: the graph outputs); only the nodes those targets need are run."""
    params = graph.params if params is None else params
    if binding is None:
        binding = bind_symbols(graph, inputs) if check_inputs else {}
    env: dict = {}
    device = None
    for v, x in zip(graph.inputs, inputs):
        env[v] = x
        device = device or x.device
    for name, v in graph.param_values.items():
        if name not in params:
            raise IRError(f"parameter %{name} has no data")
        env[v] = params[name]
    if overrides:
        env.update(overrides)
        device = device or next(iter(overrides.values())).device
    targets = list(graph.outputs if targets is None else targets)
    needed = _needed_nodes(graph, targets, set(env))
    for node in graph.nodes:
        if node in needed:
            run_node(node, env, binding, device)
    return [env[t] for t in targets]


def _needed_nodes(graph: Graph, targets, known: set) -> set:
    needed: set = set()
    stack = [t for t in targets if t not in known]
    while stack:
        v = stack.pop()
        n = v.producer
        if n is None:
            if v not in known:
                raise IRError(f"value %{v.name} has no producer and no value")
            continue
        if n in needed:
            continue
        needed.add(n)
        stack.extend(x for x in n.value_inputs if x not in known)
    return needed


HALF = ("bf16", "f16")


def _has_half(graph: Graph) -> bool:
    return any(v.type.dtype.name in HALF for v in graph.values())


def widened(graph: Graph) -> Graph | None:
    """A copy of ``graph`` that computes every bf16/f16 value in float32, or None when it has none (or when a
    fallback op names a dtype, which the copy could not honour). Rounding a half-precision layer once at
    its outputs instead of at every stored tensor keeps it within the spec's tolerance at settings where
    the module itself misses it (docs/spec.md, "Half precision at extreme settings")."""
    from ..ir.types import TensorType

    if not _has_half(graph):
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
    wide.verify()
    return wide


def run_half_in_float32(graph: Graph, cache: dict, inputs, params):
    """Run a graph with half-precision values in float32 (inputs and parameters widened, outputs rounded back
    to their declared dtypes once); a graph without half values runs as it is."""
    if not _has_half(graph):
        return run_graph(graph, inputs, params)
    key = str(graph)  # the graph may be edited between calls: widen what is there now
    if key not in cache:
        cache.clear()
        cache[key] = widened(graph)
    wide = cache[key]
    if wide is None:
        return run_graph(graph, inputs, params)
    bind_symbols(graph, inputs)  # the declared (half) dtypes and shapes are what callers must pass

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t

    outs = run_graph(wide, [up(x) for x in inputs], {k: up(v) for k, v in params.items()})
    return [o.to(to_torch(v.type.dtype)) if v.type.dtype.name in HALF else o for o, v in zip(outs, graph.outputs)]


def eager_when_empty(graph: Graph, runner):
    """``runner``, except that calls with an empty input (T = 0 or B = 0) run on the interpreter: there is
    nothing to compute, and generated kernels need at least one row (TVM rejects zero-size strides)."""
    import functools

    @functools.wraps(runner)
    def run(inputs, params):
        if any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in inputs):
            return run_graph(graph, inputs, params)
        return runner(inputs, params)
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
        return (f"backend eager: {len(graph.nodes)} ops interpreted one by one with torch "
                f"(no fused kernels; feedback as a dense triangular solve).{half}")
