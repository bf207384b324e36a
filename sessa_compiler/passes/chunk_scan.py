"""Chunk ``scan`` into ``scan_chunked``: parallel inside a chunk, the state carried between chunks."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from .manager import Pass, PassResult
from .rewrite import replace_node, static_dim

# A chunk's working set is a [chunk, channels, N] tile of decays and inputs per program; keep it
# within about 8K fp32 elements per operand with a 16-channel block.
TILE_ELEMENTS = 8192
CHANNEL_BLOCK = 16


def choose_scan_chunk(d_state: int) -> int:
    for c in (64, 32, 16):
        if c * CHANNEL_BLOCK * max(d_state, 1) <= TILE_ELEMENTS:
            return c
    return 16


@dataclass
class ChunkScan(Pass):
    name = "chunk-scan"
    chunk_size: int | None = None

    def options(self) -> dict:
        return {"chunk_size": self.chunk_size}

    def run(self, graph: Graph) -> PassResult:
        count, decisions = 0, []
        for node in [n for n in graph.nodes if n.op == "scan"]:
            d_state = static_dim(node.inputs[2].type.shape[1], 16)
            C = self.chunk_size or choose_scan_chunk(d_state)
            how = "given" if self.chunk_size else f"tile budget {TILE_ELEMENTS} elements, N={d_state}"
            decisions.append(f"%{node.output.name}: scan chunk_size={C} ({how})")
            replace_node(graph, node, "scan_chunked", node.inputs, {"chunk_size": C})
            count += 1
        return PassResult(count, decisions)
