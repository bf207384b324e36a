"""The pass manager: named passes over a Graph, run in order, with the IR printable after each.

A pass is a small class whose dataclass fields are its options (xDSL's habit)::

    @dataclass
    class ChunkFeedback(Pass):
        name = "chunk-feedback"
        chunk_size: int | None = None
        def run(self, graph) -> PassResult: ...   # rewrites in place; the rewrites made, what it decided

``PassManager([Simplify(), ChunkFeedback(chunk_size=64)]).run(graph)`` verifies the graph after
every pass and, when asked (``print_ir=True`` or the environment variable
``SESSA_COMPILER_PRINT_IR=1``), prints the IR after each pass to ``stream`` (stderr by default).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import ClassVar, TextIO

from ..errors import IRError
from ..ir.graph import Graph
from ..ir.verify import verify_graph

PRINT_IR_ENV = "SESSA_COMPILER_PRINT_IR"


def print_ir_from_env() -> bool:
    return os.environ.get(PRINT_IR_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def show_ir(graph: Graph, title: str, print_ir: bool | None = None, stream: TextIO | None = None) -> None:
    """Print ``graph`` under a ``// ----- IR <title> -----`` header when print_ir is on (None: the
    environment variable decides): the one format every backend prints its IR in."""
    if print_ir_from_env() if print_ir is None else print_ir:
        out = stream or sys.stderr
        out.write(f"// ----- IR {title} -----\n{graph}")
        out.flush()


@dataclass
class Pass:
    """Base class of every pass. Subclasses set ``name`` and implement ``run(graph) -> int``."""

    name: ClassVar[str] = "pass"

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}{{{opts}}}" if opts else self.name


@dataclass
class PassResult:
    """What one run of a pass did: the number of rewrites, what it decided (chunk sizes and why, fusion
    groups) and what it considered and left (a fusion that would not be convex), as readable lines.
    A pass keeps nothing of a run on itself: the PassManager files the result in its records."""

    rewrites: int
    decisions: list = dataclasses.field(default_factory=list)
    rejected: list = dataclasses.field(default_factory=list)


@dataclass
class PassRecord:
    """What one pass did: shown by explain() and by the debug printer."""

    pass_: str
    rewrites: int
    seconds: float
    nodes_after: int
    name: str = ""                                      # the pass's name (pass_ also shows its options)
    decisions: list = dataclasses.field(default_factory=list)  # PassResult.decisions
    rejected: list = dataclasses.field(default_factory=list)   # PassResult.rejected

    def __str__(self) -> str:
        return f"{self.pass_}: {self.rewrites} rewrite(s), {self.nodes_after} ops after, {self.seconds * 1e3:.1f} ms"


class PassManager:
    """Runs passes in order over one graph (in place), verifying after each."""

    def __init__(self, passes, *, print_ir: bool | None = None, stream: TextIO | None = None,
                 verify: bool = True):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {type(p).__name__} {p!r}")
        self.print_ir = print_ir_from_env() if print_ir is None else print_ir
        self.stream = stream
        self.verify = verify
        self.records: list[PassRecord] = []

    def _print(self, title: str, graph: Graph) -> None:
        show_ir(graph, title, True, self.stream)

    def run(self, graph: Graph) -> Graph:
        if self.print_ir:
            self._print("before any pass", graph)
        for p in self.passes:
            start = time.perf_counter()
            result = p.run(graph)
            if self.verify:
                try:
                    verify_graph(graph)
                except IRError as e:
                    raise IRError(f"the IR is invalid after pass '{p}': {e}") from e
            rec = PassRecord(str(p), result.rewrites, time.perf_counter() - start, len(graph.nodes), p.name,
                             list(result.decisions), list(result.rejected))
            self.records.append(rec)
            if self.print_ir:
                self._print(f"after {p} ({rec.rewrites} rewrite(s))", graph)
        return graph

    def __str__(self) -> str:
        return " -> ".join(str(p) for p in self.passes)
