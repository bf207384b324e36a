"""What the backends read from a call's input shapes: its sequence length (tuned configs are per shape class)."""
from __future__ import annotations

import torch

from ..ir.graph import Graph
from .eager import bind_symbols


def sequence_length(graph: Graph, inputs) -> int:
    """The sequence length T of a call (the symbol T bound from the inputs; else dim 1 of the first input of
    rank >= 2; else 1): tuned configs are looked up per shape class of T."""
    binding = bind_symbols(graph, list(inputs))
    if "T" in binding:
        return int(binding["T"])
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[1])
    return 1
