"""The core ops' backward: what a training step saves from each core op's forward and how its gradient is
computed from that, in plain blocked torch (no tensor with two sequence dims, except tri_solve's own T x T
operand). Every backend's backward kernels are tested against these, and these against autograd through
the dense float64 definitions of core.py (tests/test_backward.py).

    op          saved by the forward                  backward(grad, *saved, **attrs) -> operand grads
    attention   q, k, v, inv_freq, out, lse [B,H,T]   attention_backward  (FlashAttention-2: probabilities
                                                      recomputed per query block from lse; delta = rowsum(dO*O))
    feedback    s (its output), q_b, k_b, gamma       feedback_backward   (core.py: transposed blocked solve)
    tri_solve   A, x (its output)                     tri_solve_backward
    scan        u, delta, A, B, C, D                  scan_backward       (states recomputed by chunks)

``BACKWARD`` maps op -> (save, backward): ``save(operands, out, attrs)`` is what the forward keeps (the
attention's lse is computed here, ``attention_lse``, when the forward kernel does not return it), and
``backward(grad, saved, attrs)`` returns one gradient (or None) per operand. Backends may replace either
per op (backends/training.py holds the per-backend table); the meaning stays this one.
"""
from __future__ import annotations

import math

import torch

from ..ir.dtypes import compute_dtype
from .core import FEEDBACK_GRAD_CHUNK, _rotate, feedback_backward, key_keep, scan_ref

ATTENTION_BLOCK = 128   # query rows whose probabilities are formed at once: [B, H, block, T] memory
SCAN_CHUNK = 64         # scan steps recomputed at once by the scan backward


def _block_logits(q_rows, k_cols, row0: int, scale: float, causal: bool, keep=None, empty_rows: str = "mean"):
    """logits of query rows row0.. against key columns 0..: [B, H, rows, cols] from [B, H, *, d] operands; when
    causal, the columns past each row's position (only the last ``rows`` columns hold any) are -inf. With a
    key-padding mask ``keep`` [B, T] (bool; then the columns must be all T keys) the padded keys are -inf too,
    and with ``empty_rows="mean"`` a row with no visible key is all zeros (uniform: attention_ref's meaning; its
    probabilities' gradient then flows to all T logits, as attention_ref's does)."""
    logits = torch.matmul(q_rows, k_cols.transpose(-1, -2)) * scale
    if causal:
        rows = q_rows.shape[2]
        above = torch.ones(rows, rows, dtype=torch.bool, device=q_rows.device).triu(1)
        logits[..., row0:row0 + rows].masked_fill_(above, -math.inf)
        logits[..., row0 + rows:] = -math.inf   # all T columns (with a key-padding mask)
    if keep is not None:
        logits.masked_fill_(~keep[:, None, None, :logits.shape[-1]], -math.inf)
        if empty_rows == "mean":
            logits.masked_fill_(torch.isneginf(logits).all(-1, keepdim=True), 0.0)
    return logits


def _heads_first(q, k, v, inv_freq):
    """q, k, v as [B, H, T, d] in the compute dtype: rotated (RoPE) and with k, v expanded to q's heads (GQA)."""
    cd = compute_dtype(q.dtype)
    if inv_freq is not None:
        q, k = _rotate(q, inv_freq), _rotate(k, inv_freq)
    G = q.shape[2] // k.shape[2]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    return tuple(t.to(cd).transpose(1, 2).contiguous() for t in (q, k, v))


def attention_lse(q, k, v, scale: float, causal: bool = True, inv_freq=None, block: int = ATTENTION_BLOCK,
                  with_out: bool = True, mask=None, empty_rows: str = "mean"):
    """(out, lse): attention_ref's output and each row's log-sum-exp of its logits [B, H, T], by query blocks
    ([B, H, block, T] at a time). ``out`` is in q's dtype (None when with_out is False: only the lse, one
    product per block), ``lse`` in the compute dtype."""
    qh, kh, vh = _heads_first(q, k, v, inv_freq)
    B, H, T, _ = qh.shape
    out = torch.empty(B, H, T, vh.shape[3], dtype=qh.dtype, device=q.device) if with_out else None
    lse = torch.empty(B, H, T, dtype=qh.dtype, device=q.device)
    keep = None if mask is None else key_keep(mask).to(q.device)
    for a in range(0, T, block):
        b = min(a + block, T)
        cols = b if causal and keep is None else T
        logits = _block_logits(qh[:, :, a:b], kh[:, :, :cols], a, scale, causal, keep, empty_rows)
        m = logits.logsumexp(-1)                                    # [B, H, rows]
        lse[:, :, a:b] = m
        if with_out:
            torch.matmul(logits.sub_(m[..., None]).exp_(), vh[:, :, :cols], out=out[:, :, a:b])
    return (out.transpose(1, 2).to(q.dtype) if with_out else None), lse


def _unrotate(dx, inv_freq):
    """The rotation's transpose (rotation by minus the angles) applied to a gradient w.r.t. rotated q or k."""
    return _rotate(dx, -inv_freq) if inv_freq is not None else dx


def attention_backward(grad, q, k, v, inv_freq, out, lse, scale: float, causal: bool = True,
                       block: int = ATTENTION_BLOCK, mask=None, empty_rows: str = "mean", empty_grad: bool = True):
    """(dq, dk, dv) of attention_ref given dout, FlashAttention-2 style: per query block the probabilities are
    recomputed from the saved lse (P = exp(S - lse)), dV += P^T dO, dS = P * (dO V^T - delta) with
    delta = rowsum(dO * O), dQ = scale dS K, dK += scale dS^T Q; then GQA sums dK, dV over each kv head's
    query group and RoPE applies the rotation's transpose to dQ and dK. Memory: [B, H, block, T] at a time.
    Results in the compute dtype (the caller casts to the operands' dtypes). ``empty_grad=False``: a row with
    no visible key (empty_rows="mean") passes no gradient to the scores (dS = 0 there), as a masked_fill does."""
    qh, kh, vh = _heads_first(q, k, v, inv_freq)
    cd = qh.dtype
    do = grad.to(cd).transpose(1, 2).contiguous()                    # [B, H, T, d]
    B, H, T, _ = qh.shape
    delta = (grad.to(cd) * out.to(cd)).sum(-1).transpose(1, 2)       # [B, H, T]
    lse = lse.to(cd)
    dq, dk, dv = torch.empty_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
    keep = None if mask is None else key_keep(mask).to(q.device)
    blind = None   # [B, T]: rows that see no key, whose scores get no gradient (empty_grad=False)
    if keep is not None and empty_rows == "mean" and not empty_grad:
        blind = ~(keep.cumsum(-1) > 0) if causal else ~keep.any(-1, keepdim=True).expand(B, T)
    for a in range(0, T, block):
        b = min(a + block, T)
        cols = b if causal and keep is None else T
        p = _block_logits(qh[:, :, a:b], kh[:, :, :cols], a, scale, causal, keep, empty_rows)
        p = p.sub_(lse[:, :, a:b, None]).exp_()
        dob = do[:, :, a:b]
        dv[:, :, :cols] += torch.matmul(p.transpose(-1, -2), dob)
        ds = torch.matmul(dob, vh[:, :, :cols].transpose(-1, -2)).sub_(delta[:, :, a:b, None]).mul_(p)
        if blind is not None:
            ds.masked_fill_(blind[:, None, a:b, None], 0.0)
        torch.matmul(ds, kh[:, :, :cols], out=dq[:, :, a:b])
        dk[:, :, :cols] += torch.matmul(ds.transpose(-1, -2), qh[:, :, a:b])
    dq, dk, dv = (t.transpose(1, 2) for t in (dq.mul_(scale), dk.mul_(scale), dv))
    Hkv = k.shape[2]
    if Hkv != H:
        dk = dk.reshape(B, T, Hkv, H // Hkv, -1).sum(3)
        dv = dv.reshape(B, T, Hkv, H // Hkv, -1).sum(3)
    return _unrotate(dq, inv_freq), _unrotate(dk, inv_freq), dv


# -- the attention's gradient as torch.library autograd (library.py registers it) -------------------------------
def attention_setup_context(ctx, inputs, output):
    """register_autograd's setup_context for an attention op (q, k, v, inv_freq, scale, causal) -> out: saves
    the operands and the output (the backward recomputes the row log-sum-exps from them)."""
    q, k, v, inv_freq, scale, causal = inputs
    ctx.scale, ctx.causal, ctx.rope = scale, causal, inv_freq is not None
    ctx.dtypes = (q.dtype, k.dtype, v.dtype)
    ctx.save_for_backward(q, k, v, inv_freq if inv_freq is not None else q.new_empty(0), output)


def attention_autograd(ctx, grad):
    """register_autograd's backward for an attention op: attention_backward (FlashAttention-2 style, [B, H,
    block, T] at a time, never [B, H, T, T]) from the saved output and the lse of one blocked pass; no
    gradient for inv_freq, scale or causal."""
    q, k, v, inv_freq, out = ctx.saved_tensors
    inv_freq = inv_freq if ctx.rope else None
    lse = attention_lse(q, k, v, ctx.scale, ctx.causal, inv_freq, with_out=False)[1]
    grads = attention_backward(grad.contiguous(), q, k, v, inv_freq, out, lse, ctx.scale, ctx.causal)
    return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None, None, None)


def tri_solve_backward(grad, A, x, upper: bool = False, unitriangular: bool = False):
    """(dA, db) of x = A^-1 b for triangular A: db = A^-T grad, dA = -db x^T on A's triangle (off the diagonal
    when unitriangular); A's leading dims summed where it was broadcast against b."""
    cd = compute_dtype(grad.dtype)
    A_, g = A.to(cd), grad.to(cd)
    db = torch.linalg.solve_triangular(A_.transpose(-1, -2), g, upper=not upper, unitriangular=unitriangular)
    return tri_solve_weight_grad(db, A, x, upper, unitriangular), db


def tri_solve_weight_grad(db, A, x, upper: bool = False, unitriangular: bool = False):
    """dA = -db x^T on A's triangle (off the diagonal when unitriangular), A's leading dims summed where it was
    broadcast against b: the weights' gradient of a triangular solve given db = A^-T grad."""
    x_ = x.to(db.dtype)
    dA = -(db @ x_.transpose(-1, -2))
    dA = dA.triu(1 if unitriangular else 0) if upper else dA.tril(-1 if unitriangular else 0)
    while dA.dim() > A.dim():
        dA = dA.sum(0)
    for i, n in enumerate(A.shape):
        if n == 1 and dA.shape[i] != 1:
            dA = dA.sum(i, keepdim=True)
    return dA


def _scan_chunk(h, u, dt, A, B, C, D):
    """One chunk of the selective scan from state h: (y, last state), steps in order (differentiable)."""
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]) + D * u[:, t])
    return torch.stack(ys, dim=1), h


def scan_backward(grad, u, delta, A, B, C, D, chunk: int = SCAN_CHUNK):
    """Gradients of scan_ref w.r.t. (u, delta, A, B, C, D): the chunk boundary states are recomputed in a
    forward sweep (O(T/chunk) states kept), then chunks are differentiated last to first, each recomputing its
    steps from its start state (O(chunk) states alive at once) and passing dh back to the chunk before."""
    cd = compute_dtype(u.dtype)
    ins = [t.detach().to(cd) for t in (u, delta, A, B, C, D)]
    u_, dt, A_, B_, C_, D_ = ins
    g = grad.to(cd)
    batch, T, Din = u.shape
    starts = list(range(0, T, chunk))
    states = []
    h = torch.zeros(batch, Din, A.shape[1], dtype=cd, device=u.device)
    with torch.no_grad():
        for a in starts:
            states.append(h)
            b = min(a + chunk, T)
            _, h = _scan_chunk(h, u_[:, a:b], dt[:, a:b], A_, B_[:, a:b], C_[:, a:b], D_)
    du, ddt, dB, dC = (torch.zeros_like(t) for t in (u_, dt, B_, C_))
    dA, dD = torch.zeros_like(A_), torch.zeros_like(D_)
    dh = torch.zeros_like(h)
    for a, h0 in zip(reversed(starts), reversed(states)):
        b = min(a + chunk, T)
        with torch.enable_grad():
            leaves = [h0.requires_grad_(True), *(t.detach().requires_grad_(True) for t in
                      (u_[:, a:b], dt[:, a:b], A_, B_[:, a:b], C_[:, a:b], D_))]
            y, h1 = _scan_chunk(*leaves)
            got = torch.autograd.grad((y, h1), leaves, (g[:, a:b], dh))
        dh = got[0]
        du[:, a:b], ddt[:, a:b], dB[:, a:b], dC[:, a:b] = got[1], got[2], got[4], got[5]
        dA += got[3]
        dD += got[6]
    return du, ddt, dA, dB, dC, dD


# -- the table: op -> (save, backward) ---------------------------------------------------------------------
def attention_mask_operand(operands, attrs):
    """The key-padding mask among an attention node's operands (operand 4 when key_padding=True), or None."""
    return operands[4] if attrs.get("key_padding", False) and len(operands) > 4 else None


def _save_attention(operands, out, attrs, lse=None):
    q, k, v, *rest = operands
    inv_freq = rest[0] if rest and attrs.get("rope", False) else None
    mask = attention_mask_operand(operands, attrs)
    if lse is None:  # the forward kernel did not return it: one blocked pass over the logits (no product with v)
        lse = attention_lse(q, k, v, attrs["scale"], attrs["causal"], inv_freq, with_out=False, mask=mask,
                            empty_rows=attrs.get("empty_rows", "mean"))[1]
    return (q, k, v, inv_freq, out, lse, mask)


def _attention_bwd(grad, saved, attrs):
    q, k, v, inv_freq, out, lse, mask = saved
    return attention_backward(grad, q, k, v, inv_freq, out, lse, attrs["scale"], attrs["causal"], mask=mask,
                              empty_rows=attrs.get("empty_rows", "mean"), empty_grad=attrs.get("empty_grad", True))


def _save_feedback(operands, out, attrs, lse=None):
    f, q_b, k_b, gamma = operands
    return (out, q_b, k_b, gamma)


FEEDBACK_LONG_CHUNK = 128   # the feedback backward's row chunk from T = 512 on (fewer, larger products)


def feedback_chunk(T: int) -> int:
    """Rows of the weights the feedback backward forms at once for length T: [B, chunk, T] blocks. 128 from
    T = 512 on (1-thread CPU, D = c = 512: 97 vs 134 ms at T = 1024, 1.37 vs 1.74 s at T = 4096; 256 was no
    faster), else FEEDBACK_GRAD_CHUNK."""
    return FEEDBACK_LONG_CHUNK if T >= 512 else FEEDBACK_GRAD_CHUNK


def _feedback_bwd(grad, saved, attrs):
    s, q_b, k_b, gamma = saved
    return feedback_backward(grad, s, q_b, k_b, gamma, attrs["scale"], feedback_chunk(s.shape[1]))


def _save_tri_solve(operands, out, attrs, lse=None):
    return (operands[0], out)


def _tri_solve_bwd(grad, saved, attrs):
    A, x = saved
    return tri_solve_backward(grad, A, x, attrs["upper"], attrs["unitriangular"])


def _save_scan(operands, out, attrs, lse=None):
    return tuple(operands)


def _scan_bwd(grad, saved, attrs):
    return scan_backward(grad, *saved)


BACKWARD = {"attention": (_save_attention, _attention_bwd), "feedback": (_save_feedback, _feedback_bwd),
            "tri_solve": (_save_tri_solve, _tri_solve_bwd), "scan": (_save_scan, _scan_bwd)}

__all__ = ["BACKWARD", "attention_lse", "attention_backward", "attention_autograd", "attention_setup_context", "feedback_backward", "tri_solve_backward", "tri_solve_weight_grad",
           "scan_backward", "scan_ref", "ATTENTION_BLOCK", "SCAN_CHUNK", "feedback_chunk"]
