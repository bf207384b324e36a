"""The canonicalisation pass: ``simplify`` (passes/simplify.py) wrapped as a named Pass."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from .manager import Pass
from .simplify import simplify


@dataclass
class Simplify(Pass):
    """Fold identity/cancelling layout ops and merge common subexpressions, to a fixed point."""

    name = "simplify"

    def run(self, graph: Graph) -> int:
        return simplify(graph)
