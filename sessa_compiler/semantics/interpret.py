"""The IR interpreter: runs a graph node by node with the torch meaning of each op (``table.SEMANTICS``).

It is the definition every backend is checked against; the eager backend (backends/eager.py) is a
runner over it, and the frontend's numerical probes use it directly.
"""
from __future__ import annotations

from typing import Mapping

import sympy
import torch

from ..dtypes import to_torch
from ..errors import InputError, IRError, SessaCompilerError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import FACTORY, FALLBACK, OPS
from ..ir.types import DType, eval_dim, eval_dim_traceable
from .table import SEMANTICS

# ops that create tensors (factories) and the fallback op are told the device to create them on
FACTORIES = frozenset(name for name, d in OPS.items() if d.kind == FACTORY)
_DEVICE_OPS = FACTORIES | {name for name, d in OPS.items() if d.kind == FALLBACK}


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


def _resolve_traceable(x, binding: Mapping):
    if isinstance(x, sympy.Basic):
        return eval_dim_traceable(x, binding)
    if isinstance(x, (list, tuple)):
        return type(x)(_resolve_traceable(y, binding) for y in x)
    if isinstance(x, dict):
        return {k: _resolve_traceable(v, binding) for k, v in x.items()}
    if isinstance(x, DType):
        return to_torch(x)
    return x


def run_graph_traceable(graph: Graph, inputs, params: Mapping, impls: Mapping | None = None) -> list:
    """Run the graph with torch ops only, where the inputs' sizes may be symbolic (torch.export traces this):
    symbols are bound to the sizes as they come (SymInts stay symbolic) and no input check converts them to
    ints. ``impls`` (op -> callable) replace the ops' SEMANTICS entries (e.g. the torch.library custom ops)."""
    binding: dict = {}
    for v, x in zip(graph.inputs, inputs):
        for d, n in zip(v.type.shape, x.shape):
            if isinstance(d, sympy.Symbol):
                binding.setdefault(d.name, n)
    env: dict = dict(zip(graph.inputs, inputs))
    device = inputs[0].device if inputs else None
    for name, v in graph.param_values.items():
        env[v] = params[name]
    impls = dict(impls or {})
    for node in graph.nodes:
        operands = [env[x] if isinstance(x, Value) else _resolve_traceable(x, binding) for x in node.inputs]
        attrs = _resolve_traceable(node.attrs, binding)
        if node.op in _DEVICE_OPS:
            attrs["device"] = device
        out = (impls.get(node.op) or SEMANTICS[node.op])(*operands, **attrs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for v, o in zip(node.outputs, outs):
            env[v] = o
    return [env[v] for v in graph.outputs]


def run_node(node: Node, env: dict, binding: dict, device):
    operands = [env[x] if isinstance(x, Value) else resolve(x, binding) for x in node.inputs]
    attrs = resolve(node.attrs, binding)
    if node.op in _DEVICE_OPS:
        attrs["device"] = device
    fn = SEMANTICS.get(node.op)
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
