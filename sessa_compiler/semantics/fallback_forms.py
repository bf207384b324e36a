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
    "aten.index.Tensor": "index",                     # x[i0, i1, ...]: integer indices over the leading dims
    "aten.index_fill.int_Scalar": "index_fill",       # (self, dim, index, value)
    "aten.pad.default": "pad",                        # (self, pad, mode, value): replicate / reflect / circular
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


def leading_indices(node, values: dict) -> tuple[list, str]:
    """(the index operands, '') of x[i0, i1, ...] (aten.index.Tensor) when they are integer tensors over the
    leading dims; ([], why not) otherwise (a bool mask has a data-dependent shape; an index after a skipped dim
    moves the dims around)."""
    idx = list(values["indices"])
    if not idx or any(i is None for i in idx):
        return [], ("indices that skip a dim (x[:, i]): write it with torch.gather / index_select, or index the "
                    "leading dims")
    for i in idx:
        if not node.inputs[i.index].type.dtype.name.startswith(("i", "u")):
            return [], "a boolean mask index (x[mask]) has a data-dependent shape: use torch.where(mask, ...) instead"
    return idx, ""


def pad_widths(values: dict, rank: int) -> tuple[list, str, str]:
    """([(before, after)] per dim, mode, '') of F.pad(x, pad, mode) (pad lists the last dim first), or
    ([], mode, why not): the exports take non-negative widths in the modes other than 'constant'."""
    pad, mode = list(values["pad"]), values.get("mode") or "constant"
    if len(pad) % 2 or len(pad) // 2 > rank or any(not isinstance(p, int) or p < 0 for p in pad):
        return [], mode, f"pad widths {pad} (the exports take non-negative int widths in mode {mode!r})"
    if mode not in ("replicate", "reflect", "circular", "constant"):
        return [], mode, f"mode {mode!r}"
    widths = [(0, 0)] * rank
    for j in range(len(pad) // 2):
        widths[rank - 1 - j] = (pad[2 * j], pad[2 * j + 1])
    return widths, mode, ""
