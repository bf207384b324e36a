"""The IR interpreter: runs a graph node by node with the torch meaning of each op (``table.SEMANTICS``).

It is the definition every backend is checked against; the eager backend (backends/eager.py) is a
runner over it, and the frontend's numerical probes use it directly.
"""
from __future__ import annotations

from typing import Mapping

import sympy
import torch

from ..ir.dtypes import to_torch
from ..errors import InputError, IRError, SessaCompilerError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import FACTORY, FALLBACK, OPS
from ..ir.ops_fused import parse_body
from ..ir.types import DType, eval_number
from .table import SEMANTICS

# ops that create tensors (factories) and the fallback op are told the device to create them on
FACTORIES = frozenset(name for name, d in OPS.items() if d.kind == FACTORY)
_DEVICE_OPS = FACTORIES | {name for name, d in OPS.items() if d.kind == FALLBACK}


def resolve(x, binding: Mapping[str, int]):
    """Turn symbolic attribute values into concrete Python values for one call."""
    if isinstance(x, sympy.Basic):
        return eval_number(x, binding)
    if isinstance(x, list):
        return [resolve(y, binding) for y in x]
    if isinstance(x, tuple):
        return tuple(resolve(y, binding) for y in x)
    if isinstance(x, dict):
        return {k: resolve(v, binding) for k, v in x.items()}
    if isinstance(x, DType):
        return to_torch(x)
    return x


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


def symbolic_binding(graph: Graph, inputs) -> dict:
    """Each dimension symbol bound to the inputs' sizes as they come, with no check and no int(): under a
    symbolic trace (torch.export) the sizes are SymInts and stay symbolic (eval_dim computes with them)."""
    binding: dict = {}
    for v, x in zip(graph.inputs, inputs):
        for d, n in zip(v.type.shape, x.shape):
            if isinstance(d, sympy.Symbol):
                binding.setdefault(d.name, n)
    return binding


def run_node(node: Node, env: dict, binding: dict, device, impls: Mapping | None = None):
    operands = [env[x] if isinstance(x, Value) else resolve(x, binding) for x in node.inputs]
    attrs = resolve(node.attrs, binding)
    if node.op in _DEVICE_OPS:
        attrs["device"] = device
    fn = (impls or {}).get(node.op) or SEMANTICS.get(node.op)
    if fn is None:
        raise IRError(f"op '{node.op}' has no eager implementation")
    try:
        out = fn(*operands, **attrs)
    except SessaCompilerError:
        raise
    except Exception as e:  # name the op that failed, keep the original as the cause
        if type(e).__module__.startswith("torch.utils.checkpoint"):
            raise   # non-reentrant checkpointing stops its recomputation by raising through the ops: not a failure
        outs = ", ".join("%" + v.name for v in node.outputs)
        raise SessaCompilerError(f"eager backend: op '{node.op}' ({outs}) failed: {type(e).__name__}: {e}") from e
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(node.outputs):
        raise IRError(f"op '{node.op}' produced {len(outs)} outputs, the node declares {len(node.outputs)}")
    for v, t in zip(node.outputs, outs):
        env[v] = t


def run_graph(graph: Graph, inputs, params: Mapping | None = None, *, overrides: Mapping | None = None,
              targets=None, binding: dict | None = None, check_inputs: bool = True, impls: Mapping | None = None):
    """Execute the graph. ``overrides`` pins values (Value -> tensor) and ``targets`` picks which values
    to return (default: the graph outputs); only the nodes those targets need are run. ``impls`` (op ->
    callable) replace ops' SEMANTICS entries (e.g. the torch.library custom ops)."""
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
            run_node(node, env, binding, device, impls)
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


def fused(*operands, group, kernel, body, bytes_saved=None):
    """A fused group (ir/ops_fused.py) means its body's ops, one by one."""
    outs = run_graph(parse_body(body), list(operands), {})
    return tuple(outs) if len(outs) != 1 else outs[0]


SEMANTICS["fused"] = fused
