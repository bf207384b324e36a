"""Chunk ``feedback`` into its blocked form (see ir/ops_chunked.py for the ops' semantics).

    %s = feedback(%f, %q_b, %k_b, %gamma) {scale}
becomes
    %s_lse  = feedback_lse(%q_b, %k_b) {scale}
    %s_dinv = feedback_diag_inverse(%q_b, %k_b, %gamma, %s_lse) {scale, chunk_size}
    %s      = feedback_chunked(%f, %q_b, %k_b, %gamma, %s_lse, %s_dinv) {scale, chunk_size}

The first two are fully parallel; only the third walks the chunks in order. No op here has a
T x T result: the largest new value is the stack of diagonal-block inverses, [B, T/C, C, C].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..ir.graph import Graph
from ..ir.ops_chunked import accumulation_dtype, n_chunks
from ..ir.types import TensorType
from .manager import Pass, PassResult
from .rewrite import insert_before, replace_node, static_dim

CHUNK_CANDIDATES = (16, 32, 64)


@dataclass(frozen=True)
class FeedbackCost:
    """A first-order model of the chunked feedback kernels (the Triton backend's two-level solve).

    The C-row diagonal blocks are the inner steps of the solve: T/C of them run in sequence, so the
    sequential latency is (T/C) * step_latency. FLOPs: the logits (twice: the log-sum-exp pass and
    the probabilities) and P @ s do not depend on C; each diagonal block's inverse costs
    log2 C pairs of C x C products, and applying it a C x C by C x d_v product. Tiles must fit the
    register file: the C x block_dv accumulator and three C x C fp32 tiles of the inverse. The
    autotuning issue replaces these constants with measurements.
    """

    assumed_T: int = 4096
    block_dv: int = 64
    step_latency_s: float = 1.5e-6          # one chunk step: loads of dinv, barrier, loop overhead
    flops_per_s: float = 2.0e14             # sustained tensor-core rate of one kernel on an H100-class GPU
    register_budget_bytes: int = 3 * 64 * 64 * 4

    def seconds(self, C: int, T: int, d_qk: int, d_v: int) -> float:
        off_diag = T * T * (2 * d_qk + d_v)                    # 2 * (T^2 / 2) * (...)
        diag_inverse = (T / C) * (2 * C * C * d_qk + 2 * C ** 3 * 2 * math.log2(C))
        apply_inverse = 2 * T * C * d_v
        return math.ceil(T / C) * self.step_latency_s + (off_diag + diag_inverse + apply_inverse) / self.flops_per_s

    def fits(self, C: int) -> bool:
        return 3 * C * C * 4 <= self.register_budget_bytes and C * self.block_dv * 4 <= self.register_budget_bytes

    def choose(self, T: int, d_qk: int, d_v: int) -> tuple:
        scored = [(self.seconds(C, T, d_qk, d_v), C) for C in CHUNK_CANDIDATES if self.fits(C)]
        best = min(scored)
        return best[1], scored


@dataclass
class ChunkFeedback(Pass):
    """Rewrite every ``feedback`` into lse + diagonal-block inverses + blocked substitution.

    ``chunk_size=None`` lets the cost model choose; the result's decisions say which size and why.
    """

    name = "chunk-feedback"
    chunk_size: int | None = None
    cost: FeedbackCost = field(default_factory=FeedbackCost, repr=False, compare=False)

    def options(self) -> dict:
        return {"chunk_size": self.chunk_size}

    def run(self, graph: Graph) -> PassResult:
        count, decisions = 0, []
        for node in [n for n in graph.nodes if n.op == "feedback"]:
            f, qb, kb, gamma = node.inputs
            scale = node.attrs["scale"]
            T = f.type.shape[1]
            d_qk, d_v = static_dim(qb.type.shape[2], 1024), static_dim(f.type.shape[2], 1024)
            if self.chunk_size is None:
                C, scored = self.cost.choose(static_dim(T, self.cost.assumed_T), d_qk, d_v)
                why = ", ".join(f"C={c}: {s * 1e6:.0f} us" for s, c in sorted(scored, key=lambda x: x[1]))
                decisions.append(f"%{node.output.name}: chunk_size={C} by the cost model ({why})")
            else:
                C = self.chunk_size
                decisions.append(f"%{node.output.name}: chunk_size={C} (given)")
            acc = accumulation_dtype(f.type.dtype)
            base = node.output.name
            lse = insert_before(graph, node, "feedback_lse", [qb, kb], {"scale": scale},
                                TensorType(acc, qb.type.shape[:2]), f"{base}_lse")
            dinv_type = TensorType(acc, (qb.type.shape[0], n_chunks(T, C), C, C))
            dinv = insert_before(graph, node, "feedback_diag_inverse", [qb, kb, gamma, lse],
                                 {"scale": scale, "chunk_size": C}, dinv_type, f"{base}_dinv")
            replace_node(graph, node, "feedback_chunked", [f, qb, kb, gamma, lse, dinv],
                         {"scale": scale, "chunk_size": C})
            count += 1
        return PassResult(count, decisions)
