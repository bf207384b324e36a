"""TVM backend: generated TVM (TIR) kernels with CPU schedules for the core ops.

Importing this package does not import tvm; building a kernel does.
    TVMBackend        compile(module, backend="tvm")
    build, KernelSpec one kernel per (op, static sizes, dtype, schedule), cached per target
    schedules         the tunables of each kernel and their variant spaces (for autotuning)
"""
from .backend import TVMBackend
from .build import KernelSpec, attention_spec, build, feedback_spec, kernel_source, scan_spec
from .schedules import AttentionSchedule, FeedbackSchedule, ScanSchedule

__all__ = ["TVMBackend", "KernelSpec", "build", "kernel_source", "feedback_spec", "attention_spec", "scan_spec",
           "FeedbackSchedule", "AttentionSchedule", "ScanSchedule"]
