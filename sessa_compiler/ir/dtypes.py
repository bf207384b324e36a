"""The one module that maps IR dtypes to other libraries' dtypes, and the one rule for the compute dtype.

IR dtype names ("f32", "bf16", ...) are those of ir/types.py. This module imports torch only when a torch
dtype is asked for, so torch-free code (the IR, passes, export writers) can use its tables.
"""
from __future__ import annotations

import functools

from ..errors import UnsupportedError
from .types import DType

# IR name -> numpy's (and TVM's / Relax's) dtype name. numpy has no bfloat16 (``NUMPY_NAME`` leaves it out);
# TVM does.
TVM_NAME = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
            "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool"}
NUMPY_NAME = {k: v for k, v in TVM_NAME.items() if k != "bf16"}
ITEMSIZE = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "bool": 1,
            "c64": 8, "c128": 16}
HALF = ("bf16", "f16")


def compute_name(name: str) -> str:
    """The IR dtype name a value of dtype ``name`` is computed in: float64 stays float64, every other
    float (and anything else) is computed in float32 -- the spec's "accumulate in at least float32"."""
    return "f64" if name == "f64" else "f32"


def compute_dtype(dtype):
    """``compute_name`` for torch dtypes: float64 stays float64, everything else is computed in float32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _torch_table() -> dict:
    import torch

    return {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
            "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
            "u8": torch.uint8, "bool": torch.bool, "c64": torch.complex64, "c128": torch.complex128}


def torch_dtype(name: str):
    """The torch dtype of an IR dtype name (or of a numpy/TVM name such as "float32")."""
    table = _torch_table()
    if name in table:
        return table[name]
    back = {v: k for k, v in TVM_NAME.items()}
    return table[back[name]]


def to_torch(d):
    """The torch dtype of an IR DType."""
    return _torch_table()[d.name]


def from_torch(d):
    """The IR DType of a torch dtype."""

    back = {v: k for k, v in _torch_table().items()}
    if d not in back:
        raise UnsupportedError(f"dtype {d} has no IR equivalent; supported: {', '.join(map(str, back))}")
    return DType(back[d])


def comparison_name(a, b) -> str:
    """The IR dtype name torch compares ``a`` and ``b`` in (torch.result_type): each an IR value (by its dtype and
    rank: a 0-d tensor weighs like a scalar of its kind) or a literal (Python or sympy; a size expression is an
    integer, or a float where it is a size used as one). An integer tensor against a float scalar is compared in
    the default float dtype: ``mask < 0.5`` is not ``mask < 0``."""
    import sympy
    import torch

    def rep(x):
        t = getattr(x, "type", None)
        if t is not None:
            return torch.empty((1,) * t.rank, dtype=to_torch(t.dtype))
        if isinstance(x, sympy.Basic):
            if x in (sympy.true, sympy.false):
                return bool(x)
            if not x.is_Number:
                return 1 if x.is_integer else 1.0
            return int(x) if x.is_Integer else float(x)
        return x

    return from_torch(torch.result_type(rep(a), rep(b))).name
