"""The pass pipeline of each backend, as a short list of named passes.

    eager:  simplify
    triton: simplify -> sink-casts -> chunk-feedback -> chunk-scan [-> fuse]   (the Triton backend passes fuse=True)
    onnx:   simplify -> chunk-feedback -> chunk-scan                           (export_onnx, before lowering)

``run_pipeline(graph, "triton", print_ir=True)`` rewrites ``graph`` in place and returns the
PassManager (its ``records`` say what each pass did and decided).
"""
from __future__ import annotations

from ..errors import UnsupportedError
from ..ir.graph import Graph
from .chunk_feedback import ChunkFeedback
from .chunk_scan import ChunkScan
from .fuse import Fuse
from .manager import PassManager
from .simplify import Simplify
from .sink_casts import SinkCasts


def eager_pipeline(**_options) -> list:
    return [Simplify()]


def triton_pipeline(*, feedback_chunk_size=None, scan_chunk_size=None, fuse=False, **_options) -> list:
    passes = [Simplify(), SinkCasts(), ChunkFeedback(chunk_size=feedback_chunk_size), ChunkScan(chunk_size=scan_chunk_size)]
    return passes + [Fuse()] if fuse else passes


def onnx_pipeline(*, feedback_chunk_size=None, scan_chunk_size=None, **_options) -> list:
    """The ONNX export lowers the blocked ops these passes make (export/onnx_core.py)."""
    return [Simplify(), ChunkFeedback(chunk_size=feedback_chunk_size), ChunkScan(chunk_size=scan_chunk_size)]


PIPELINES = {"eager": eager_pipeline, "triton": triton_pipeline, "onnx": onnx_pipeline}


def build_pipeline(backend: str, *, print_ir: bool | None = None, stream=None, **options) -> PassManager:
    if backend not in PIPELINES:
        raise UnsupportedError(f"no pass pipeline for backend '{backend}'; known: {', '.join(sorted(PIPELINES))}")
    return PassManager(PIPELINES[backend](**options), print_ir=print_ir, stream=stream)


def run_pipeline(graph: Graph, backend: str, *, print_ir: bool | None = None, stream=None, **options) -> PassManager:
    pm = build_pipeline(backend, print_ir=print_ir, stream=stream, **options)
    pm.run(graph)
    return pm
