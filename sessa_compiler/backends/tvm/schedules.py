"""Schedules: the tunables of each generated kernel, their defaults per shape, and the variant space.

A schedule is a small frozen dataclass; its fields are exactly the knobs the kernel generator reads
(tile sizes, chunk size, vector width, register-tile rows). ``space(...)`` lists the valid variants
for a shape (what an autotuner searches and what the tests check one by one: TVM can miscompile
silently, so every variant is compared with the reference); ``default(...)`` picks one by rule.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields


class Schedule:
    def as_dict(self) -> dict:
        return asdict(self)

    def tag(self) -> str:
        """Short stable name, used in kernel names and cache keys: chunk64_key16_..."""
        return "_".join(f"{f.name}{getattr(self, f.name)}" for f in fields(self))


@dataclass(frozen=True)
class FeedbackSchedule(Schedule):
    """Chunked forward substitution of (I - diag(gamma) alpha) s = f.

    chunk: rows solved per sequential step (the diagonal block); key_block: logits columns per
    parallel task (vector lanes of the logits tile); rows: logits register-tile rows; col_block:
    columns of s per parallel task in the inter-chunk GEMM and the substitution; gemm_rows:
    register-tile rows of that GEMM.
    """

    chunk: int = 64
    key_block: int = 16
    rows: int = 4
    col_block: int = 16
    gemm_rows: int = 4

    def check(self, width: int) -> None:
        if self.chunk % self.key_block or self.chunk % self.rows or self.chunk % self.gemm_rows:
            raise ValueError(f"feedback schedule {self}: chunk must be a multiple of key_block, rows and gemm_rows")
        if width % self.col_block:
            raise ValueError(f"feedback schedule {self}: width {width} is not a multiple of col_block")


@dataclass(frozen=True)
class AttentionSchedule(Schedule):
    """Flash-style causal attention: one parallel task per (batch, head, query block).

    q_block: query rows per task; k_block: keys per online-softmax step (lanes of the logits tile);
    rows: register-tile rows of both tile products; v_lanes: head-width lanes of the P @ V tile.
    """

    q_block: int = 32
    k_block: int = 16
    rows: int = 4
    v_lanes: int = 16

    def check(self, head_dim: int) -> None:
        if self.q_block % self.k_block or self.q_block % self.rows:
            raise ValueError(f"attention schedule {self}: q_block must be a multiple of k_block and rows")
        if head_dim % self.v_lanes:
            raise ValueError(f"attention schedule {self}: head width {head_dim} is not a multiple of v_lanes")


@dataclass(frozen=True)
class ScanSchedule(Schedule):
    """Selective scan: parallel over (batch, channel blocks), sequential over time, lanes = channels."""

    channel_block: int = 16

    def check(self, channels: int) -> None:
        if channels % self.channel_block:
            raise ValueError(f"scan schedule {self}: {channels} channels are not a multiple of channel_block")


@dataclass(frozen=True)
class TriSolveSchedule(Schedule):
    """Triangular solve with explicit weights: parallel over (batch, column blocks), rows in order,
    lanes = columns."""

    col_block: int = 8

    def check(self, width: int) -> None:
        if width % self.col_block:
            raise ValueError(f"tri_solve schedule {self}: width {width} is not a multiple of col_block")


def default_tri_solve(width: int, lanes: int = 8) -> TriSolveSchedule:
    """The widest vector of columns (at most the register width) that divides the right-hand side."""
    block = lanes
    while width % block:
        block //= 2
    return TriSolveSchedule(col_block=max(block, 1))


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """y = x W^T + b (export only): panels of `col_block` output columns (vector lanes), tasks of
    `row_block` rows, register tile `rows` x `col_block`."""

    col_block: int = 16
    rows: int = 4
    row_block: int = 64

    def check(self, out_features: int) -> None:
        if out_features % self.col_block or self.row_block % self.rows:
            raise ValueError(f"linear schedule {self}: out_features {out_features} must be a multiple of "
                             "col_block, and row_block a multiple of rows")


def default_linear(out_features: int, lanes: int = 8) -> LinearSchedule:
    return LinearSchedule(col_block=_largest_dividing(out_features, (2 * lanes, lanes, 4, 2, 1)), rows=4, row_block=64)


def _largest_dividing(n: int, options) -> int:
    for o in options:
        if n % o == 0:
            return o
    return 1


def default_feedback(width: int, lanes: int = 8) -> FeedbackSchedule:
    # measured on znver3 (AVX2), T=2048, D=512, one thread: (64, 16, 4, 16, 4) 62 ms, (128, 32, 2, 16, 4) 62 ms,
    # (64, 32, 2, 32, 2) 70 ms, (64, 16, 2, 16, 4) 86 ms
    col = _largest_dividing(width, (2 * lanes, lanes, 4, 2, 1))
    return FeedbackSchedule(chunk=64, key_block=2 * lanes, rows=4, col_block=col, gemm_rows=4)


def default_feedback_bwd(width: int, lanes: int = 8) -> FeedbackSchedule:
    """The feedback backward kernel's default (kernels/feedback_bwd.py): larger chunks and column blocks than
    the forward's. Measured on the 2-core AMD EPYC (znver4, AVX-512) VM, one thread, width 512, float32:
    T = 1024 33.7 ms vs 43.5 ms with the forward's (64, 32, 4, 32, 4); T = 4096 529 vs 695 ms."""
    col = _largest_dividing(width, (4 * lanes, 2 * lanes, lanes, 4, 2, 1))
    return FeedbackSchedule(chunk=128, key_block=2 * lanes, rows=4, col_block=col, gemm_rows=4)


def default_attention(head_dim: int, lanes: int = 8) -> AttentionSchedule:
    # measured on znver3 (AVX2), T=2048, H=8, d=64, one thread: (64, 32, 2, 32) 81 ms,
    # (64, 16, 4, 16) 86 ms, (32, 16, 4, 16) 112 ms, (64, 64, 4, 16) 133 ms
    v = _largest_dividing(head_dim, (4 * lanes, 2 * lanes, lanes, 4, 2, 1))
    return AttentionSchedule(q_block=64, k_block=4 * lanes, rows=2 if v >= 4 * lanes else 4, v_lanes=v)


def default_scan(channels: int, lanes: int = 8) -> ScanSchedule:
    return ScanSchedule(channel_block=_largest_dividing(channels, (2 * lanes, lanes, 4, 2, 1)))


def feedback_space(width: int) -> list:
    out = []
    # Block sizes up to 64 cover the defaults of every vector width (4 x 16 lanes with AVX-512).
    for chunk, kb, rows, col, gr in itertools.product((16, 32, 64, 128), (8, 16, 32, 64), (1, 2, 4),
                                                      (4, 8, 16, 32, 64), (1, 2, 4)):
        s = FeedbackSchedule(chunk, kb, rows, col, gr)
        try:
            s.check(width)
        except ValueError:
            continue
        out.append(s)
    return out


def attention_space(head_dim: int) -> list:
    out = []
    for qb, kb, rows, vl in itertools.product((16, 32, 64), (8, 16, 32, 64), (1, 2, 4), (4, 8, 16, 32, 64)):
        s = AttentionSchedule(qb, kb, rows, vl)
        try:
            s.check(head_dim)
        except ValueError:
            continue
        out.append(s)
    return out


def scan_space(channels: int) -> list:
    return [ScanSchedule(c) for c in (1, 2, 4, 8, 16, 32, 64) if channels % c == 0]
