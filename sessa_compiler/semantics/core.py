"""The meaning of the core ops (attention, feedback, tri_solve, scan, rope) in plain torch: the semantic
definition each fast kernel is tested against.

Readable rather than fast; every function runs in float64 as well as in float32/bf16, and
accumulates in at least float32 (``dtypes.compute_dtype``).
"""
from __future__ import annotations

import math

import torch

from ..ir.dtypes import compute_dtype


def rope_ref(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding of x [B, T, H, d] at positions 0..T-1 (angles in >= float32)."""
    return _rotate(x, inv_freq).to(x.dtype)


def _rotate(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """rope_ref's result left in the compute dtype, so attention rounds only once."""
    cd = compute_dtype(x.dtype)
    T = x.shape[1]
    angles = torch.arange(T, device=x.device, dtype=cd)[:, None] * inv_freq.to(cd)[None, :]  # [T, d/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    xe, xo = x[..., 0::2].to(cd), x[..., 1::2].to(cd)
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


EMPTY_ROWS = ("mean", "nan")   # what a query row with no visible unpadded key gives (the key-padding mask)


def key_keep(mask: torch.Tensor) -> torch.Tensor:
    """A key-padding mask [B, T] (bool, or numeric: nonzero = keep) as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def attention_ref(q, k, v, scale: float, causal: bool = True, inv_freq=None, mask=None,
                  empty_rows: str = "mean", empty_grad: bool = True) -> torch.Tensor:
    """softmax_{j <= t}(q_t . k_j * scale) @ v with GQA; q [B,T,H,d], k/v [B,T,Hkv,d] -> [B,T,H,dv].

    ``mask`` [B, T] (bool, or numeric with nonzero = keep): a key-padding mask; key j is visible to query t
    when j <= t (causal) and mask[b, j] is set. A row with no visible key (a query at or before the last
    left padding position) gives, with ``empty_rows="mean"``, the mean of v over *all* T keys: what a
    softmax over a row whose every logit is the same finite minimum gives (the additive
    ``torch.finfo(dtype).min`` masks of Hugging Face model code, or masked_fill with a finite value); with
    ``empty_rows="nan"``, NaN (what masked_fill with -inf gives). The gradient of such a row is the one autograd
    gives through an additive finite mask (scores + finfo.min): the softmax's Jacobian at the uniform row, over
    all T keys (masked_fill with a finite value gives the scores no gradient there instead: ``empty_grad=False``)."""
    cd = compute_dtype(q.dtype)
    out_dtype = q.dtype
    if inv_freq is not None:
        q, k = _rotate(q, inv_freq), _rotate(k, inv_freq)
    H, Hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q.to(cd), k.to(cd)) * scale
    T = q.shape[1]
    keep = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    if mask is not None:
        if empty_rows not in EMPTY_ROWS:
            raise ValueError(f"op 'attention': empty_rows must be one of {EMPTY_ROWS}, got {empty_rows!r}")
        keep = keep[None, None] & key_keep(mask)[:, None, None, :].to(q.device)   # [B, 1, T, T]
    masked = logits.masked_fill(~keep, -math.inf)
    if mask is not None and empty_rows == "mean":
        # rows with no visible key: uniform over all keys in value; in gradient, what autograd gives through a
        # finite additive mask (scores + finfo.min): the softmax's Jacobian at that uniform row
        empty = ~keep.any(-1, keepdim=True)
        masked = torch.where(empty, logits - logits.detach() if empty_grad else torch.zeros_like(masked), masked)
    logits = masked
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.to(cd)).to(out_dtype)


def feedback_ref(f, q_b, k_b, gamma, scale: float) -> torch.Tensor:
    """Solve (I - diag(gamma) alpha) s = f, alpha = strictly causal softmax(q_b k_b^T * scale), row 0 = 0."""
    cd = compute_dtype(f.dtype)
    T = f.shape[1]
    logits = torch.einsum("btc,bsc->bts", q_b.to(cd), k_b.to(cd)) * scale
    strict = torch.ones(T, T, dtype=torch.bool, device=f.device).tril(-1)
    # Row 0 has no predecessor: give it a harmless finite row, then zero it (no NaN anywhere).
    logits = logits.masked_fill(~strict, -math.inf)
    if T > 0:  # an empty sequence has no row 0 (and nothing to solve)
        logits[:, 0, 0] = 0.0
    alpha = torch.softmax(logits, dim=-1) * strict
    system = torch.eye(T, dtype=cd, device=f.device) - gamma.to(cd)[..., None] * alpha
    s = torch.linalg.solve_triangular(system, f.to(cd), upper=False, unitriangular=True)
    return s.to(f.dtype)


def scan_ref(u, delta, A, B, C, D) -> torch.Tensor:
    """Mamba-1 selective scan, one step at a time: the plain definition."""
    cd = compute_dtype(u.dtype)
    u_, dt, A_, B_, C_, D_ = (t.to(cd) for t in (u, delta, A, B, C, D))
    batch, T, Din = u.shape
    h = torch.zeros(batch, Din, A.shape[1], dtype=cd, device=u.device)
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A_) * h + (dt[:, t] * u_[:, t])[..., None] * B_[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_[:, t]) + D_ * u_[:, t])
    y = torch.stack(ys, dim=1) if ys else u_.new_zeros(u.shape)
    return y.to(u.dtype)


def tri_solve_ref(A: torch.Tensor, b: torch.Tensor, upper: bool = False, unitriangular: bool = False) -> torch.Tensor:
    """x with A x = b for triangular A [..., T, T] (leading dims broadcast against b's), in at least float32."""
    cd = compute_dtype(b.dtype)
    x = torch.linalg.solve_triangular(A.to(cd), b.to(cd), upper=upper, left=True, unitriangular=unitriangular)
    return x.to(b.dtype)


def tri_solve_rows(A: torch.Tensor, b: torch.Tensor, upper: bool = False, unitriangular: bool = False,
                   block: int = 16) -> torch.Tensor:
    """The same solve as ``tri_solve_ref``, by blocked substitution (the algorithm the TVM kernel and the
    ONNX Loop use): blocks of rows in order, each block's right-hand side reduced by the solved rows before
    it, then solved row by row. Written out so that its result can be compared with LAPACK's."""
    out_dtype, cd = b.dtype, compute_dtype(b.dtype)
    A, b = A.to(cd), b.to(cd)
    A = A.expand(*b.shape[:-2], *A.shape[-2:])
    T = b.shape[-2]
    x = torch.zeros_like(b)
    starts = list(range(0, T, block))
    for r0 in (reversed(starts) if upper else starts):
        r1 = min(r0 + block, T)
        done = slice(r1, T) if upper else slice(0, r0)
        rhs = b[..., r0:r1, :] - A[..., r0:r1, done] @ x[..., done, :]
        rows = range(r1 - 1, r0 - 1, -1) if upper else range(r0, r1)
        for t in rows:
            near = slice(t + 1, r1) if upper else slice(r0, t)
            acc = rhs[..., t - r0, :] - (A[..., t, near].unsqueeze(-2) @ x[..., near, :]).squeeze(-2)
            x[..., t, :] = acc if unitriangular else acc / A[..., t, t].unsqueeze(-1)
    return x.to(out_dtype)


# -- the IR ops' entries in semantics.SEMANTICS: operands positional, attributes by keyword ------------------
def _attention(q, k, v, inv_freq=None, mask=None, *, scale, causal, rope=False, key_padding=False,
               empty_rows="mean", empty_grad=True):
    return attention_ref(q, k, v, scale, causal, inv_freq if rope else None, mask if key_padding else None,
                         empty_rows, empty_grad)


def _feedback(f, q_b, k_b, gamma, *, scale):
    return feedback_ref(f, q_b, k_b, gamma, scale)


def _tri_solve(A, b, *, upper, unitriangular):
    return tri_solve_ref(A, b, upper, unitriangular)


CORE_SEMANTICS = {"attention": _attention, "feedback": _feedback, "tri_solve": _tri_solve,
                  "scan": scan_ref, "rope": rope_ref}


# -- the feedback's gradient: a transposed blocked solve (library.py and the Triton op register it) --------
FEEDBACK_GRAD_CHUNK = 64  # rows of the weights formed at once by the feedback backward


def _weights(q_rows, k_cols, row0: int, scale: float) -> torch.Tensor:
    """alpha[row0 + i, j] = softmax over j < row0 + i of q.k*scale (zero elsewhere; a row with no
    predecessor is all zero): [B, rows, cols] in the compute dtype, for cols = row0 + rows (only the last
    ``rows`` columns hold masked entries)."""
    rows = q_rows.shape[1]
    logits = torch.matmul(q_rows, k_cols.transpose(1, 2)).mul_(scale)
    later = torch.ones(rows, rows, dtype=torch.bool, device=q_rows.device).triu()   # j >= i: not a predecessor
    logits[..., row0:row0 + rows].masked_fill_(later, -math.inf)
    if row0 == 0 and rows:
        logits[:, 0, :] = 0.0            # row 0 has no predecessor: a finite row (no NaN), zeroed below
    alpha = torch.softmax(logits, dim=-1)
    if row0 == 0 and rows:
        alpha[:, 0, :] = 0.0
    return alpha


def feedback_backward(grad_s, s, q_b, k_b, gamma, scale: float, chunk: int = FEEDBACK_GRAD_CHUNK):
    """Gradients (df, dq_b, dk_b, dgamma) of s = (I - diag(gamma) alpha)^-1 f given ds, in the compute dtype.

    One sweep over row chunks, last chunk first, forming each chunk's weights alpha [B, chunk, T] once:
    df = (I - diag(gamma) alpha)^-T ds by backward substitution (the chunk solves its diagonal block, then
    pushes its contribution to all earlier rows); with the chunk's df known, c = alpha @ s gives
    dgamma = df . c, and through the softmax P = gamma * alpha * (df.s^T - dgamma), dq_b = scale * P @ k_b,
    dk_b += scale * P^T @ q_b. Extra memory O(B*T*(D + chunk)): no T x T matrix."""
    cd = compute_dtype(s.dtype)
    ds, s, q, k, g = (t.to(cd) for t in (grad_s, s, q_b, k_b, gamma))
    T = s.shape[1]
    acc = ds.clone()      # ds plus the contributions of later rows: [B, T, D]
    df = torch.empty_like(acc)
    dq, dk = torch.empty_like(q), torch.zeros_like(k)
    dgamma = torch.empty_like(g)
    s_t = s.transpose(1, 2)
    eye = None
    for a in reversed(range(0, T, chunk)):
        b = min(a + chunk, T)
        alpha = _weights(q[:, a:b], k[:, :b], a, scale)           # [B, rows, b]
        ga = alpha * g[:, a:b, None]
        if eye is None or eye.shape[0] != b - a:
            eye = torch.eye(b - a, dtype=cd, device=s.device)
        # the diagonal block of I - G*alpha, transposed: backward substitution
        dfa = torch.linalg.solve_triangular((eye - ga[:, :, a:b]).transpose(1, 2), acc[:, a:b], upper=True,
                                            unitriangular=True)
        df[:, a:b] = dfa
        if a:
            acc[:, :a].baddbmm_(ga[:, :, :a].transpose(1, 2), dfa)
        dg = torch.linalg.vecdot(dfa, torch.bmm(alpha, s[:, :b]))
        dgamma[:, a:b] = dg
        p = torch.bmm(dfa, s_t[:, :, :b]).sub_(dg[..., None]).mul_(ga)
        torch.bmm(p, k[:, :b], out=dq[:, a:b])
        dk[:, :b].baddbmm_(p.transpose(1, 2), q[:, a:b], alpha=scale)
    dq.mul_(scale)
    return df, dq, dk, dgamma


def feedback_setup_context(ctx, inputs, output):
    """register_autograd's setup_context for a feedback op (f, q_b, k_b, gamma, scale) -> s: saves s, not f."""
    f, q_b, k_b, gamma, scale = inputs
    ctx.scale = scale
    ctx.dtypes = (f.dtype, q_b.dtype, k_b.dtype, gamma.dtype)
    ctx.save_for_backward(output, q_b, k_b, gamma)


def feedback_autograd(ctx, grad):
    """register_autograd's backward for a feedback op: feedback_backward from the saved output, in the
    operands' dtypes (torch.ops.sessa_compiler.feedback and the Triton op register the same pair)."""
    s, q_b, k_b, gamma = ctx.saved_tensors
    grads = feedback_backward(grad, s, q_b, k_b, gamma, ctx.scale)
    return (*(x.to(dt) for x, dt in zip(grads, ctx.dtypes)), None)
