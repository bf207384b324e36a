"""The meaning of the ordinary IR ops (compute, elementwise, layout, reduction, factory, fallback) in torch.

``ORDINARY`` maps an op name to a function ``fn(*operands, **attrs)``; attributes arrive resolved
(symbolic dims bound, IR dtypes as torch dtypes; see ``interpret.resolve``). Factory ops and
``fallback`` also receive ``device``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..ir.ops import ArgRef

ORDINARY: dict = {}

# -- compute ---------------------------------------------------------------------------------------
ORDINARY["linear"] = lambda x, w, b=None: F.linear(x, w, b)
ORDINARY["matmul"] = torch.matmul
ORDINARY["einsum"] = lambda *xs, equation: torch.einsum(equation, *xs)
ORDINARY["layer_norm"] = lambda x, w=None, b=None, *, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps)
ORDINARY["softmax"] = lambda x, *, dim: torch.softmax(x, dim)
ORDINARY["log_softmax"] = lambda x, *, dim: torch.log_softmax(x, dim)


def embedding(w, idx):
    """Rows of w; a token id outside [0, rows) is the caller's error (torch raises IndexError on CPU)."""
    try:
        return F.embedding(idx, w)
    except IndexError as e:
        raise InputError(f"embedding: token ids must lie in [0, {w.shape[0]}), the vocabulary of the embedding "
                         f"table; got an id outside it ({e})") from e


ORDINARY["embedding"] = embedding
ORDINARY["conv1d"] = lambda x, w, b=None, *, stride, padding, dilation, groups: F.conv1d(x, w, b, stride, padding,
                                                                                         dilation, groups)


def causal_conv1d(x, w, b=None):
    """Depthwise causal convolution over T: x [B, T, C], weight [C, K], left-padded by K - 1."""
    K = w.shape[1]
    if x.shape[1] == 0:  # an empty sequence: conv1d rejects an input shorter than its kernel
        return torch.empty_like(x)
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w[:, None, :], b, groups=w.shape[0])
    return y.transpose(1, 2)


ORDINARY["causal_conv1d"] = causal_conv1d

# -- elementwise (the unary names are ir.ops.UNARY; a test checks each has an entry here) -------------
ORDINARY.update({"neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
                 "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "relu": torch.relu,
                 "abs": torch.abs, "sin": torch.sin, "cos": torch.cos, "logical_not": torch.logical_not,
                 "erf": torch.erf, "reciprocal": torch.reciprocal, "floor": torch.floor, "ceil": torch.ceil,
                 "round": torch.round, "sign": torch.sign, "expm1": torch.expm1, "log1p": torch.log1p,
                 "exp2": torch.exp2, "log2": torch.log2,
                 # the value itself, with no gradient: x.detach() and a @torch.no_grad() region's operands (the
                 # forward-only kernels and the exports compute it as the identity)
                 "detach": torch.Tensor.detach})
ORDINARY["gelu"] = lambda x, approximate="none": F.gelu(x, approximate=approximate)
ORDINARY["softplus"] = lambda x, beta=1, threshold=20: F.softplus(x, beta, threshold)
ORDINARY.update({"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
                 "logical_and": torch.logical_and,
                 "logical_or": torch.logical_or, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt,
                 "le": torch.le, "gt": torch.gt, "ge": torch.ge})


def _extremum(tensor_fn, scalar_fn):
    """maximum/minimum of two tensors, or of a tensor and a scalar literal (clamp lowers to these); NaN propagates."""
    def fn(a, b):
        if not isinstance(b, torch.Tensor):
            return scalar_fn(a, b)
        if not isinstance(a, torch.Tensor):
            return scalar_fn(b, a)
        return tensor_fn(a, b)
    return fn


ORDINARY["maximum"] = _extremum(torch.maximum, torch.clamp_min)
ORDINARY["minimum"] = _extremum(torch.minimum, torch.clamp_max)
ORDINARY["where"] = torch.where
ORDINARY["masked_fill"] = lambda x, m, v: x.masked_fill(m, v)
ORDINARY["cast"] = lambda x, *, dtype: x.to(dtype)
ORDINARY["tril"] = lambda x, *, diagonal: torch.tril(x, diagonal)
ORDINARY["triu"] = lambda x, *, diagonal: torch.triu(x, diagonal)

# -- layout ----------------------------------------------------------------------------------------
ORDINARY["reshape"] = lambda x, *, shape: x.reshape(shape)
ORDINARY["permute"] = lambda x, *, dims: x.permute(dims)
ORDINARY["transpose"] = lambda x, *, dim0, dim1: x.transpose(dim0, dim1)
ORDINARY["unsqueeze"] = lambda x, *, dim: x.unsqueeze(dim)
ORDINARY["squeeze"] = lambda x, *, dims: x.squeeze(tuple(dims))
ORDINARY["expand"] = lambda x, *, shape: x.expand(shape)
ORDINARY["slice"] = lambda x, *, dim, start, end, step: torch.ops.aten.slice.Tensor(x, dim, start, end, step)
ORDINARY["select"] = lambda x, *, dim, index: x.select(dim, index)
# sizes is a list of ints (ops.py): the aten op directly (torch.split reaches it through two Python functions:
# about 3 us more per call, twice in every Sessa layer decode step)
ORDINARY["split"] = lambda x, *, sizes, dim: tuple(x.split_with_sizes(sizes, dim))
ORDINARY["concat"] = lambda *xs, dim: torch.cat(xs, dim)
ORDINARY["stack"] = lambda *xs, dim: torch.stack(xs, dim)
ORDINARY["repeat_interleave"] = lambda x, *, repeats, dim: x.repeat_interleave(repeats, dim)

# -- reductions and factories --------------------------------------------------------------------------
ORDINARY["sum"] = lambda x, dims=None, keepdim=False: torch.sum(x, dims, keepdim) if dims is not None else x.sum()
ORDINARY["mean"] = lambda x, dims=None, keepdim=False: torch.mean(x, dims, keepdim) if dims is not None else x.mean()
ORDINARY["amax"] = lambda x, dims=None, keepdim=False: torch.amax(x, dims or [], keepdim)

ORDINARY["arange"] = lambda *, start, end, step, dtype, device: torch.arange(start, end, step, dtype=dtype, device=device)
ORDINARY["full"] = lambda *, shape, value, dtype, device: torch.full(shape, value, dtype=dtype, device=device)
ORDINARY["eye"] = lambda *, n, dtype, device: torch.eye(n, dtype=dtype, device=device)


# -- fallback: a torch op called by name -------------------------------------------------------------
def resolve_target(target: str):
    """'aten.cumsum.default' -> torch.ops.aten.cumsum.default."""
    ns, _, rest = target.partition(".")
    obj = getattr(torch.ops, ns)
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


def draws_random(target: str) -> bool:
    """Whether the torch op ``target`` draws from a random generator (randn_like, bernoulli, dropout...: torch's
    ``nondeterministic_seeded`` tag): two calls with the same operands give different values, and each call moves
    the generator, so no two are one. An op this torch does not have counts as drawing."""
    try:
        return torch.Tag.nondeterministic_seeded in resolve_target(target).tags
    except (AttributeError, RuntimeError):
        return True


def fill_refs(x, operands):
    """A fallback node's args/kwargs with each ``arg(i)`` placeholder replaced by operand i."""
    if isinstance(x, ArgRef):
        return operands[x.index]
    if isinstance(x, list):
        return [fill_refs(y, operands) for y in x]
    if isinstance(x, tuple):
        return tuple(fill_refs(y, operands) for y in x)
    if isinstance(x, dict):
        return {k: fill_refs(v, operands) for k, v in x.items()}
    return x


def fallback(*operands, target, args, kwargs, device=None):
    kwargs = dict(kwargs)
    if "device" in kwargs and device is not None:
        kwargs["device"] = device
    return resolve_target(target)(*fill_refs(args, operands), **fill_refs(kwargs, operands))


ORDINARY["fallback"] = fallback
