"""The Mamba-1 selective scan as one opaque op.

``torch.export`` keeps a ``torch.library.custom_op`` as a single node, so the
tracer sees the whole recurrence as ``sessa_compiler.selective_scan`` instead of
T unrolled steps; the compiler's frontend maps that node to the IR's ``scan``.

Shapes: u, delta (B, T, Din); A (Din, N); B, C (B, T, N); D (Din,).

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) outer B_t      h_{-1} = 0
    y_t = h_t @ C_t + D * u_t

The recurrence is accumulated in float32 (float64 when u is float64) and the
output is returned in u's dtype.
"""

import torch

__all__ = ["selective_scan", "selective_scan_with_state", "scan_compute_dtype"]


def scan_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64; bf16/fp16 would lose the state after a few steps.
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_with_state(u, delta, A, B, C, D, h0=None):
    """Eager scan that also returns the final state h (B, Din, N).

    ``h0`` (B, Din, N) continues a previous chunk; this is what the incremental
    decoding caches use. ``h`` is returned in the compute dtype so a cache
    never rounds the state to bf16 between steps.
    """
    ct = scan_compute_dtype(u.dtype)
    u_, delta_, A_, B_, C_, D_ = (t.to(ct) for t in (u, delta, A, B, C, D))
    batch, T, d_inner = u.shape
    n_state = A.shape[-1]
    h = (torch.zeros(batch, d_inner, n_state, dtype=ct, device=u.device)
         if h0 is None else h0.to(ct))
    y = torch.empty(batch, T, d_inner, dtype=ct, device=u.device)
    for t in range(T):
        decay = torch.exp(delta_[:, t, :, None] * A_)                       # (B, Din, N)
        inject = (delta_[:, t] * u_[:, t])[:, :, None] * B_[:, t, None, :]  # (B, Din, N)
        h = decay * h + inject
        y[:, t] = (h * C_[:, t, None, :]).sum(-1) + D_ * u_[:, t]
    return y.to(u.dtype), h


@torch.library.custom_op("sessa_compiler::selective_scan", mutates_args=())
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    y, _ = selective_scan_with_state(u, delta, A, B, C, D)
    return y


@selective_scan.register_fake
def _selective_scan_fake(u, delta, A, B, C, D):
    return u.new_empty(u.shape)  # contiguous, as the real op returns (empty_like would copy u's strides)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    # Differentiate the eager loop itself: slow but obviously right, and it keeps
    # MambaLayer trainable without a hand-written adjoint scan.
    # Under create_graph=True (a gradient penalty) the gradients must be differentiable again: detached inputs made
    # them constants in the operands (second-order gradients off by 0.73), so each operand goes in through an alias
    # of its own, still connected, and each slot gets its partial derivative.
    create = torch.is_grad_enabled()
    inputs = [t.view_as(t) if create and t.requires_grad else t.detach().requires_grad_(True)
              for t in ctx.saved_tensors]
    with torch.enable_grad():
        y, _ = selective_scan_with_state(*inputs)
    return torch.autograd.grad(y, inputs, grad_y, allow_unused=True, create_graph=create)


selective_scan.register_autograd(_backward, setup_context=_setup_context)
