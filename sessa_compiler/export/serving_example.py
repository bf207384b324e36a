"""What the serving exports (export/onnx_serving.py, export/tvm_serving.py) share: how an example is read (x, then
key-padding masks, then an optional cache), the example the step's graph is traced on, which graph inputs a step
export takes and their names, and the random inputs their validations draw."""
from __future__ import annotations

import torch

from ..errors import InputError, UnsupportedError


def mask_inputs(prog, what: str) -> list:
    """The graph inputs after x that the serving exports take: key-padding masks (an ``attention_mask`` [B, T]
    operand of a recognised attention), by index; any other tensor input is refused."""
    graph = prog.graph
    masks = [i for i in prog.mask_inputs if i != 0]   # (x itself may be a mask: token ids, 0 = padding)
    others = [i for i in range(1, len(graph.inputs)) if i not in masks]
    if others:
        raise UnsupportedError(
            f"{what}: the forward takes {len(graph.inputs)} tensor inputs; exported are modules taking x (then, "
            "optionally, key-padding masks such as attention_mask [B, T] that a recognised attention reads), got "
            f"input(s) {', '.join(map(str, others))} of another kind")
    return masks


def mask_name(j: int, n: int, suffix: str) -> str:
    return f"attention_mask{suffix}" if n == 1 else f"attention_mask_{j}{suffix}"


def serving_example(example_inputs, method: str, what: str):
    """A serving export's example: (x, key-padding masks..., cache or None, squeeze). ``x`` is [B, T, ...] for the
    prefill (its masks [B, T]) and x_t with or without the sequence dim for the decode step (its masks [B] or
    [B, 1]); ``squeeze``: a decode step whose x_t has no sequence dim."""
    if method not in ("decode_step", "prefill"):
        raise InputError(f"{what}: method must be 'forward', 'decode_step' or 'prefill', got {method!r}")
    args = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    given = args.pop() if args and isinstance(args[-1], dict) else None
    first = "x_t" if method == "decode_step" else "x [B, T, ...]"
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError(f"{what}(method={method!r}): example_inputs must be the tensor {first}, then optionally "
                         "key-padding masks (attention_mask) and a cache from the compiled module's init_cache; got "
                         f"{[type(a).__name__ for a in args]}")
    x, masks = args[0], args[1:]
    if method == "prefill" and (x.dim() < 2 or x.shape[1] < 1):
        raise InputError(f"{what}(method='prefill'): x must be [B, T, ...] with T >= 1, got shape {tuple(x.shape)}")
    B = int(x.shape[0]) if x.dim() else 0
    for i, m in enumerate(masks, 1):
        want = [(B, int(x.shape[1]))] if method == "prefill" else [(B,), (B, 1)]
        if tuple(m.shape) not in want:
            raise InputError(f"{what}(method={method!r}): a step export takes x, then only key-padding masks "
                             f"(attention_mask, shape {' or '.join(map(str, want))} beside x of shape {tuple(x.shape)}); "
                             f"input {i} has shape {tuple(m.shape)}: a step export of a module with other inputs is "
                             "not supported")
    squeeze = method == "decode_step" and not (x.dim() >= 2 and x.shape[1] == 1)
    return x, masks, given, squeeze


def trace_example(x_t, masks: list, method: str, squeeze: bool):
    """The 4-position example the step's graph is traced on (T = 1 would specialise the trace): x and masks."""
    if method == "prefill":
        x_t, masks = x_t[:, :1], [m[:, :1] for m in masks]
    x3 = x_t[:, None] if squeeze else x_t
    m3 = [m[:, None] if m.dim() == 1 else m for m in masks]
    return x3.repeat_interleave(4, dim=1).contiguous(), [m.repeat_interleave(4, dim=1).contiguous() for m in m3]


def draw(like: torch.Tensor, shape, g) -> torch.Tensor:
    if like.is_floating_point():
        return torch.randn(shape, generator=g).to(like.dtype)
    return torch.randint(int(like.min()), int(like.max()) + 1, shape, generator=g, dtype=like.dtype)


def draw_masks(masks: list, batch: int, n: int, g) -> list:
    """Random key-padding masks [batch, n] in each example mask's dtype, position 0 kept (no row without a visible
    key: such rows are the module's mean over positions it has not seen yet, or NaN where they reach)."""
    out = []
    for m in masks:
        keep = torch.rand((batch, n), generator=g) < 0.7
        keep[:, 0] = True
        out.append(keep.to(m.dtype))
    return out
