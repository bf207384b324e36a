"""The aten ops that stay ``fallback`` nodes in the IR and that both exports lower: one table.

A ``fallback`` node calls a torch op by name (semantics/ordinary.py: ``fallback``), so its meaning is torch's
own op and nothing here restates it: compile runs it through torch on every backend. ``FORMS`` names, for
each aten target, the form export_onnx (export/onnx_fallback.py) and export_tvm
(backends/tvm/relax_fallback.py) lower it to; each export has one lowering per form, and
tests/test_export_fallbacks.py checks that both cover every form. A fallback outside this table is lowered by
export_onnx when it knows it otherwise (or torch.onnx can), and is refused by export_tvm with an error naming
the op, the source line and what to change.

``bind(node)`` gives a fallback's arguments by the op's schema names, defaults filled in (``ArgRef`` for a
tensor operand, Python values for the rest), so each lowering reads like the torch signature.
"""
from __future__ import annotations

from .ordinary import resolve_target

FORMS = {
    "aten.cumsum.default": "cumsum",                  # (self, dim, *, dtype): integral -> int64, like torch
    "aten.cumprod.default": "cumprod",
    "aten.gather.default": "gather",                  # (self, dim, index)
    "aten.take_along_dim.default": "take_along_dim",  # (self, indices, dim): indices broadcast against self
    "aten.index_select.default": "index_select",      # (self, dim, index)
    "aten.argmax.default": "argmax", "aten.argmin.default": "argmin",   # (self, dim=None, keepdim)
    "aten.topk.default": "topk",                      # (self, k, dim=-1, largest, sorted)
    "aten.sort.default": "sort", "aten.sort.stable": "sort",             # (self, dim=-1, descending)
    "aten.argsort.default": "argsort", "aten.argsort.stable": "argsort",
    "aten.flip.default": "flip",                      # (self, dims)
    "aten.atan2.default": "atan2",
    "aten.remainder.Scalar": "remainder", "aten.remainder.Tensor": "remainder",   # sign of the divisor
    "aten.fmod.Scalar": "fmod", "aten.fmod.Tensor": "fmod",                       # sign of the dividend
    "aten.nan_to_num.default": "nan_to_num",
    "aten.any.default": "any", "aten.any.dim": "any", "aten.any.dims": "any",
    "aten.all.default": "all", "aten.all.dim": "all", "aten.all.dims": "all",
    "aten.prod.default": "prod", "aten.prod.dim_int": "prod",
    "aten.max.dim": "max_dim", "aten.min.dim": "min_dim",               # (values, indices) over one dim
    "aten.cummax.default": "cummax", "aten.cummin.default": "cummin",   # (values, indices): ties -> LAST index
    "aten.logcumsumexp.default": "logcumsumexp",      # (self, dim): running log-sum-exp, torch's step
    "aten.logaddexp.default": "logaddexp",            # max + log1p(exp(-|a - b|)); a where a == b is infinite
    "aten.embedding.default": "embedding",            # (weight, indices, padding_idx, ...): rows; padding_idx,
                                                      # scale_grad_by_freq, sparse change the gradient only
    "aten.isnan.default": "isnan", "aten.isinf.default": "isinf", "aten.isfinite.default": "isfinite",
    "aten.logical_xor.default": "logical_xor",
    "aten.trunc.default": "trunc", "aten.frac.default": "frac",
    "aten.floor_divide.default": "floor_divide", "aten.floor_divide.Scalar": "floor_divide",
    "aten.div.Tensor_mode": "div_mode", "aten.div.Scalar_mode": "div_mode",   # rounding_mode None/trunc/floor
    "aten.count_nonzero.default": "count_nonzero", "aten.count_nonzero.dim_IntList": "count_nonzero",
    "aten.one_hot.default": "one_hot",                # (self, num_classes): int64
    "aten.scatter.src": "scatter", "aten.scatter.value": "scatter",      # (self, dim, index, src | value)
    "aten.scatter_add.default": "scatter_add",
    "aten.roll.default": "roll",                      # (self, shifts, dims)
    "aten.bucketize.Tensor": "bucketize",             # (self, boundaries, *, out_int32, right)
    "aten.isin.Tensor_Tensor": "isin",                # (elements, test_elements, *, assume_unique, invert)
}


def bind(node) -> dict:
    """A fallback node's arguments by schema name (defaults filled in): ``ArgRef`` operands, Python values."""
    schema = resolve_target(node.attrs["target"])._schema
    args, kwargs = list(node.attrs["args"]), dict(node.attrs["kwargs"])
    values: dict = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            values[a.name] = args[i]
        elif a.name in kwargs:
            values[a.name] = kwargs[a.name]
        elif a.has_default_value():
            values[a.name] = a.default_value
    return values


def reduced_dims(values: dict, rank: int) -> list | None:
    """The dims an any / all / prod / argmax reduces, non-negative; None for every element."""
    dim = values.get("dim")
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(int(d) % max(rank, 1) for d in dims)
