"""``trace(module, example_inputs) -> Graph``: torch.export with dynamic batch and sequence length,
lowered to the IR, then the recognisers."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.export import Dim

from ..errors import TraceError
from ..ir.graph import Graph
from ..passes.simplify import simplify
from .lower import Lowerer, register_custom_lowerings
from .recognise import Report, recognise


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise TraceError("trace needs example inputs (a tensor or a tuple of tensors)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TraceError(f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    return example_inputs


def _dynamic_dims(x: torch.Tensor) -> dict:
    # dim 0 is the batch, dim 1 the sequence: the two sizes a Sessa model is used at many values of
    return {d: Dim.AUTO for d in range(min(x.dim(), 2))}


def _grow(x: torch.Tensor) -> torch.Tensor:
    """torch.export specialises dims of size 0 or 1: trace on a copy grown to size >= 2 there."""
    for d in range(min(x.dim(), 2)):
        if x.shape[d] < 2:
            reps = [1] * x.dim()
            reps[d] = 2 if x.shape[d] == 1 else 0
            if x.shape[d] == 0:
                raise TraceError(f"cannot trace with an empty dimension {d} (shape {tuple(x.shape)})")
            x = x.repeat(*reps)
    return x


def _mutates(ep) -> bool:
    for n in ep.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


def export_program(module: torch.nn.Module, example_inputs) -> torch.export.ExportedProgram:
    args = _as_tuple(example_inputs)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TraceError(f"example input {i} must be a tensor, got {type(a).__name__}")
    traced_args = tuple(_grow(a) for a in args)
    dynamic = tuple(_dynamic_dims(a) for a in traced_args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, traced_args, dynamic_shapes=dynamic, strict=False)
            if _mutates(ep):  # functionalise only when needed: it costs as much as the export itself
                ep = ep.run_decompositions({})
    except Exception as e:
        raise TraceError(f"torch.export could not trace {type(module).__name__}: {type(e).__name__}: {e}") from e
    return ep


@dataclass
class Traced:
    graph: Graph
    report: Report
    out_spec: object  # pytree spec of the module's outputs


def trace_with_report(module: torch.nn.Module, example_inputs, *, recognisers: bool = True) -> Traced:
    register_custom_lowerings()
    ep = export_program(module, example_inputs)
    args = _as_tuple(example_inputs)
    dim_names = {}
    for i, a in enumerate(args):
        if a.dim() >= 1:
            dim_names[(i, 0)] = "B"
        if a.dim() >= 2:
            dim_names[(i, 1)] = "T"
    lowerer = Lowerer(ep, dim_names, name=type(module).__name__)
    graph = lowerer.run()
    report = recognise(graph) if recognisers else Report()
    report.accepted[:0] = lowerer.notes
    simplify(graph)
    return Traced(graph, report, ep.call_spec.out_spec)


def trace(module: torch.nn.Module, example_inputs) -> Graph:
    """Trace a module into the IR with dynamic batch (``B``) and sequence length (``T``)."""
    return trace_with_report(module, example_inputs).graph
