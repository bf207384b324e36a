"""Backends: eager (the IR interpreter, the definition); triton and tvm are planned."""
from __future__ import annotations

from ..errors import UnsupportedError
from .eager import EagerBackend

PLANNED = {"triton": "the Triton backend (GPU kernels) is not implemented yet",
           "tvm": "the TVM backend (CPU schedules) is not implemented yet"}


def available_backends() -> list:
    return ["eager"]


def get_backend(name: str):
    if name in ("auto", "eager"):
        # "auto" picks the best available backend for the device; eager is the only one built so far
        return EagerBackend()
    if name in PLANNED:
        raise UnsupportedError(f"backend '{name}': {PLANNED[name]}; available: {', '.join(available_backends())}")
    raise UnsupportedError(f"unknown backend '{name}'; expected one of auto, eager, triton, tvm")
