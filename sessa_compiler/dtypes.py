"""Mapping between IR dtypes and torch dtypes (the only place that knows both)."""
from __future__ import annotations

import torch

from .errors import UnsupportedError
from .ir.types import DType

_TO_TORCH = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
             "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
             "u8": torch.uint8, "bool": torch.bool, "c64": torch.complex64, "c128": torch.complex128}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}


def compute_name(name: str) -> str:
    """The IR dtype name a value of dtype ``name`` is computed in: float64 stays float64, every other
    float (and anything else) is computed in float32 -- the spec's "accumulate in at least float32"."""
    return "f64" if name == "f64" else "f32"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """``compute_name`` for torch dtypes: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_torch(d: DType) -> torch.dtype:
    return _TO_TORCH[d.name]


def from_torch(d: torch.dtype) -> DType:
    if d not in _FROM_TORCH:
        raise UnsupportedError(f"dtype {d} has no IR equivalent; supported: {', '.join(map(str, _FROM_TORCH))}")
    return DType(_FROM_TORCH[d])
