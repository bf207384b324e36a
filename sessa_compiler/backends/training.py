"""Training through the compiler: a call that needs gradients runs the IR graph with each core op as one
torch.autograd.Function whose forward is the backend's kernel and whose backward is a backward kernel;
ordinary ops run as torch ops and torch autograd differentiates them. The eager interpreter never
differentiates a core op (tests/test_training.py patches the dense references to raise during a step).

What each core op saves and how its gradient is defined: semantics/backward.py (``BACKWARD``). A backend's
own backward kernels replace those definitions per op through ``register_backward`` (e.g. the Triton
attention and feedback backward kernels):

    register_backward("triton", "attention", save=..., backward=...)

``save(operands, out, attrs, lse)`` -> the tuple the backward reads (lse: what the forward kernel returned
besides its output, or None); ``backward(grad, saved, attrs)`` -> one gradient (or None) per operand, in any
float dtype (cast here to the operands' dtypes). A backend opts into this path by implementing
``Backend.prepare_training(graph, ctx)`` with ``training_runner(graph, kernels, backend_name)``, where
``kernels`` maps each core node it has a forward kernel for to ``kernel(*operands) -> out | (out, lse)``;
core nodes without one run the blocked torch forward below (never a T x T tensor either).
"""
from __future__ import annotations

import collections

import torch

from ..ir.graph import Graph, Value
from ..semantics import SEMANTICS, bind_symbols, resolve, run_node
from ..semantics.backward import BACKWARD, attention_lse

TRAIN_CORE_OPS = tuple(BACKWARD)          # the core ops that get an autograd.Function
_BACKEND_BACKWARD: dict = collections.defaultdict(dict)   # backend name -> op -> (save, backward)


def register_backward(backend: str, op: str, save=None, backward=None) -> None:
    """Use ``save``/``backward`` (either may be None: keep semantics.backward's) for ``op`` in ``backend``'s
    training steps."""
    if op not in BACKWARD:
        from ..errors import UnsupportedError
        raise UnsupportedError(f"register_backward: op '{op}' has no backward slot; expected one of "
                               f"{', '.join(BACKWARD)}")
    base_save, base_bwd = _BACKEND_BACKWARD[backend].get(op, BACKWARD[op])
    _BACKEND_BACKWARD[backend][op] = (save or base_save, backward or base_bwd)


def backward_for(backend: str, op: str) -> tuple:
    """(save, backward) of ``op`` in ``backend``'s training steps."""
    return _BACKEND_BACKWARD.get(backend, {}).get(op, BACKWARD[op])


def describe_backward(backend: str) -> str:
    own = sorted(_BACKEND_BACKWARD.get(backend, {}))
    return (f"{backend}'s own for {', '.join(own)}, the others " if own else "") + \
        "semantics.backward's blocked torch"


def _no_autocast(tensors):
    """Core kernels compute in their own dtype (at least float32): autocast off inside them."""
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    return torch.autocast(device, enabled=False)


_TENSOR = object()   # an operand slot the forward saved as a tensor (_CoreOp's ctx.fixed)


class _CoreOp(torch.autograd.Function):
    """One core op: forward = the given kernel (no autograd inside), backward = the table's backward."""

    @staticmethod
    def forward(ctx, op, kernel, attrs, backend, *operands):
        with _no_autocast(operands):
            return _CoreOp._forward(ctx, op, kernel, attrs, backend, operands)

    @staticmethod
    def _forward(ctx, op, kernel, attrs, backend, operands):
        res = kernel(*operands)
        out, lse = res if isinstance(res, tuple) else (res, None)
        save, bwd = backward_for(backend, op)
        ctx.op_info = (bwd, attrs, [x.dtype if isinstance(x, torch.Tensor) else None for x in operands])
        if any(ctx.needs_input_grad[4:]):
            saved = save(operands, out, attrs, lse)
            ctx.layout = [x is None for x in saved]
            # the operands too (mostly tensors the backward saves anyway: no copies), for a backward under
            # create_graph=True, which differentiates the op's definition again (below)
            ctx.op, ctx.fixed = op, [_TENSOR if isinstance(x, torch.Tensor) else x for x in operands]
            ctx.save_for_backward(*(x for x in saved if x is not None),
                                  *(x for x in operands if isinstance(x, torch.Tensor)))
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():   # create_graph=True: gradients that are differentiable again
            return _CoreOp._differentiable_backward(ctx, grad)
        bwd, attrs, dtypes = ctx.op_info
        it = iter(ctx.saved_tensors)
        saved = tuple(None if none else next(it) for none in ctx.layout)
        with _no_autocast([grad]):
            grads = list(bwd(grad.contiguous(), saved, attrs))
        grads += [None] * (len(dtypes) - len(grads))
        missing = [i for i, (g, need) in enumerate(zip(grads, ctx.needs_input_grad[4:])) if need and g is None]
        if missing:   # an operand the backward kernels give no gradient for (a trainable RoPE frequency table)
            grads = _CoreOp._through_definition(ctx, grad, grads, missing)
        out = []
        for g, dt, need in zip(grads, dtypes, ctx.needs_input_grad[4:]):
            out.append(g.to(dt) if (g is not None and need) else None)
        return (None, None, None, None, *out)

    @staticmethod
    def _through_definition(ctx, grad, grads: list, missing: list) -> list:
        """``grads`` with the gradients of the operands at ``missing`` that the backward does not give (e.g. an
        ``nn.Parameter`` of RoPE inverse frequencies folded into attention: the backward kernels differentiate
        q, k and v only) computed by autograd through the op's meaning (semantics: the dense reference, T x T;
        the price of the rare trainable table only). They came back None: the parameter silently did not train."""
        _, attrs, _ = ctx.op_info
        it = iter(ctx.saved_tensors[sum(not none for none in ctx.layout):])
        operands = [next(it) if fixed is _TENSOR else fixed for fixed in ctx.fixed]
        leaves = [x.detach().requires_grad_(i in missing) if isinstance(x, torch.Tensor) else x
                  for i, x in enumerate(operands)]
        with torch.enable_grad(), _no_autocast([grad]):
            out = SEMANTICS[ctx.op](*leaves, **attrs)
            got = torch.autograd.grad(out, [leaves[i] for i in missing], grad, allow_unused=True)
        grads = list(grads)
        for i, g in zip(missing, got):
            grads[i] = g
        return grads

    @staticmethod
    def _differentiable_backward(ctx, grad):
        """The gradients as functions of the operands and ``grad`` that autograd can differentiate again
        (second-order gradients, a gradient penalty): the op's meaning (semantics, the dense reference) run on
        the saved operands, which are still connected to their graph, and differentiated with create_graph.
        It forms what the reference forms (T x T weights): the price of the rare higher-order step only."""
        _, attrs, dtypes = ctx.op_info
        it = iter(ctx.saved_tensors[sum(not none for none in ctx.layout):])
        operands = [next(it) if fixed is _TENSOR else fixed for fixed in ctx.fixed]
        needs = ctx.needs_input_grad[4:]
        # each operand through an alias of its own: autograd.grad then gives the partial derivative in each slot.
        # On the operands themselves it gave total ones, counting again the path from one operand into another
        # that the outer graph counts already (a scan's delta computed from its input u; q passed as k too).
        with torch.enable_grad():
            operands = [x.view_as(x) if isinstance(x, torch.Tensor) and x.requires_grad else x for x in operands]
            wanted = [x for x, need in zip(operands, needs) if need]
            out = SEMANTICS[ctx.op](*operands, **attrs)
            got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True, create_graph=True))
        grads = [next(got) if need else None for need in needs]
        return (None, None, None, None, *(g.to(dt) if g is not None else None for g, dt in zip(grads, dtypes)))


def _torch_forward(op: str, attrs: dict):
    """The blocked torch forward of a core op that has no backend kernel (no T x T tensor)."""
    if op == "attention":
        inv = attrs.get("rope", False)
        return lambda q, k, v, *rest: attention_lse(
            q, k, v, attrs["scale"], attrs["causal"], rest[0] if inv and rest else None,
            mask=rest[1] if attrs.get("key_padding", False) else None, empty_rows=attrs.get("empty_rows", "mean"))
    if op == "feedback":
        from ..semantics.chunked import feedback_chunked, feedback_diag_inverse, feedback_lse
        from ..semantics.core import FEEDBACK_GRAD_CHUNK

        def fb(f, q_b, k_b, gamma):
            lse = feedback_lse(q_b, k_b, scale=attrs["scale"])
            dinv = feedback_diag_inverse(q_b, k_b, gamma, lse, scale=attrs["scale"], chunk_size=FEEDBACK_GRAD_CHUNK)
            return feedback_chunked(f, q_b, k_b, gamma, lse, dinv, scale=attrs["scale"],
                                    chunk_size=FEEDBACK_GRAD_CHUNK)
        return fb
    fn = SEMANTICS[op]
    return lambda *operands: fn(*operands, **attrs)


def core_function(op: str, kernel=None, attrs: dict | None = None, backend: str = "torch"):
    """``fn(*operands) -> out``: the core op ``op`` as an autograd.Function with ``kernel`` as its forward
    (default: the blocked torch forward) and the backend's backward."""
    attrs = dict(attrs or {})
    kernel = kernel or _torch_forward(op, attrs)
    return lambda *operands: _CoreOp.apply(op, kernel, attrs, backend, *operands)


def training_runner(graph: Graph, kernels: dict, backend: str, stats: collections.Counter | None = None,
                    contiguous: bool = False):
    """A runner(inputs, params) for calls that need gradients: core nodes as _CoreOp (forward = kernels[node]
    when given), every other node through the interpreter's torch op (autograd records it). ``contiguous``: the
    backend's kernels read dense operands, so a strided operand of a node with a kernel (e.g. q_b and k_b, the
    halves of one linear layer's output) is made contiguous once, here, and that copy is what the forward kernel
    reads and the backward saves (instead of a copy in each)."""
    stats = stats if stats is not None else collections.Counter()

    def run(inputs, params):
        binding = bind_symbols(graph, inputs)
        env: dict = dict(zip(graph.inputs, inputs))
        for name, v in graph.param_values.items():
            env[v] = params[name]
        device = inputs[0].device if inputs else torch.device("cpu")
        for node in graph.nodes:
            if node.op not in TRAIN_CORE_OPS:
                run_node(node, env, binding, device)
                continue
            operands = [env[x] if isinstance(x, Value) else resolve(x, binding) for x in node.inputs]
            attrs = resolve(node.attrs, binding)
            kernel = kernels.get(node)
            if kernel is None:
                kernel = _torch_forward(node.op, attrs)
                stats["torch_forward_core_ops"] += 1
            else:
                stats["kernel_forward_core_ops"] += 1
                if contiguous:
                    for i, x in enumerate(operands):
                        if isinstance(x, torch.Tensor) and not x.is_contiguous():
                            operands[i] = x.contiguous()
                            stats["contiguous_operands"] += 1
            env[node.outputs[0]] = _CoreOp.apply(node.op, kernel, attrs, backend, *operands)
        stats["training_runs"] += 1
        return [env[v] for v in graph.outputs]

    return run


__all__ = ["register_backward", "backward_for", "core_function", "training_runner", "describe_backward",
           "TRAIN_CORE_OPS"]
