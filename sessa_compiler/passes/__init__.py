"""Passes over the IR (one file each) and the pass manager that runs them as per-backend pipelines."""
from .chunk_feedback import ChunkFeedback, FeedbackCost
from .chunk_scan import ChunkScan
from .manager import PRINT_IR_ENV, Pass, PassManager, PassRecord, PassResult
from .pipeline import PIPELINES, build_pipeline, run_pipeline
from .simplify import Simplify, simplify

__all__ = [
           "PIPELINES",
           "PRINT_IR_ENV",
           "ChunkFeedback",
           "ChunkScan",
           "FeedbackCost",
           "Pass",
           "PassManager",
           "PassRecord",
           "PassResult",
           "Simplify",
           "build_pipeline",
           "run_pipeline",
           "simplify",
]
