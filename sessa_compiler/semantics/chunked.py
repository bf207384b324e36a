"""The meaning of the blocked core ops of ir/ops_chunked.py, in plain torch.

The eager backend runs them (they are entries of ``semantics.SEMANTICS``), so a chunked graph runs on eager
and chunking is validated independently of Triton. They follow the blocked algorithm
(chunk by chunk, no T x T tensor) but use torch's triangular solve for the diagonal blocks: the
Triton kernels invert those blocks differently (repeated squaring), so the two check each other.
"""
from __future__ import annotations

import math

import torch

from ..ir.dtypes import compute_dtype


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 1 (time) with zeros up to ``rows``."""
    if x.shape[1] == rows:
        return x
    pad = x.new_zeros((x.shape[0], rows - x.shape[1]) + tuple(x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def feedback_lse(q_b, k_b, *, scale: float, row_block: int = 256) -> torch.Tensor:
    """lse[t] = log sum_{j<t} exp(q_b[t].k_b[j] * scale); lse[0] = 0. Row blocks keep memory O(T)."""
    cd = compute_dtype(q_b.dtype)
    B, T, _ = q_b.shape
    q, k = q_b.to(cd), k_b.to(cd)
    out = torch.zeros(B, T, dtype=cd, device=q_b.device)
    for r0 in range(1, T, row_block):
        r1 = min(T, r0 + row_block)
        logits = torch.einsum("btc,bsc->bts", q[:, r0:r1], k[:, :r1 - 1]) * scale
        rows = torch.arange(r0, r1, device=q_b.device)[:, None]
        cols = torch.arange(r1 - 1, device=q_b.device)[None, :]
        out[:, r0:r1] = torch.logsumexp(logits.masked_fill(cols >= rows, -math.inf), dim=-1)
    return out


def _block_probs(q_rows, k_cols, gamma_rows, lse_rows, scale, r0, c0, strict_diag: bool):
    """B[t, j] = gamma[t] exp(q[t].k[j]*scale - lse[t]) for the given row and column ranges."""
    logits = torch.einsum("btc,bsc->bts", q_rows, k_cols) * scale
    p = torch.exp(logits - lse_rows[..., None]) * gamma_rows[..., None]
    if strict_diag:
        rows = torch.arange(q_rows.shape[1], device=p.device)[:, None] + r0
        cols = torch.arange(k_cols.shape[1], device=p.device)[None, :] + c0
        p = p.masked_fill(cols >= rows, 0.0)
    return p


def feedback_diag_inverse(q_b, k_b, gamma, lse, *, scale: float, chunk_size: int) -> torch.Tensor:
    cd = lse.dtype
    B, T, _ = q_b.shape
    C = chunk_size
    nC = -(-T // C)
    q, k = _pad_rows(q_b.to(cd), nC * C), _pad_rows(k_b.to(cd), nC * C)
    # padded rows get gamma = 0: identity rows in the inverse
    g, l_ = _pad_rows(gamma.to(cd), nC * C), _pad_rows(lse, nC * C)
    qc, kc = q.view(B * nC, C, q.shape[-1]), k.view(B * nC, C, k.shape[-1])   # (-1 is ambiguous when B = 0)
    blocks = _block_probs(qc, kc, g.view(B * nC, C), l_.view(B * nC, C), scale, 0, 0, strict_diag=True)
    eye = torch.eye(C, dtype=cd, device=q_b.device).expand(B * nC, C, C)
    inv = torch.linalg.solve_triangular(eye - blocks, eye, upper=False, unitriangular=True)
    return inv.view(B, nC, C, C)


def feedback_chunked(f, q_b, k_b, gamma, lse, dinv, *, scale: float, chunk_size: int) -> torch.Tensor:
    cd = lse.dtype
    T = f.shape[1]
    C = chunk_size
    q, k, g, fc = q_b.to(cd), k_b.to(cd), gamma.to(cd), f.to(cd)
    s = torch.empty_like(fc)
    for c, r0 in enumerate(range(0, T, C)):
        r1 = min(T, r0 + C)
        acc = fc[:, r0:r1]
        if r0 > 0:
            p = _block_probs(q[:, r0:r1], k[:, :r0], g[:, r0:r1], lse[:, r0:r1], scale, r0, 0, strict_diag=False)
            acc = acc + p @ s[:, :r0]
        s[:, r0:r1] = dinv[:, c, :r1 - r0, :r1 - r0] @ acc
    return s.to(f.dtype)


def scan_chunked(u, delta, A, B, C, D, *, chunk_size: int) -> torch.Tensor:
    """Within a chunk: h_t = exp(cum_t) h_in + sum_{s<=t} exp(cum_t - cum_s) b_s, cum = cumsum(delta*A)."""
    cd = compute_dtype(u.dtype)
    u_, dt, A_, B_, C_, D_ = (t.to(cd) for t in (u, delta, A, B, C, D))
    batch, T, Din = u.shape
    h = torch.zeros(batch, Din, A.shape[1], dtype=cd, device=u.device)
    ys = []
    for r0 in range(0, T, chunk_size):
        r1 = min(T, r0 + chunk_size)
        L = r1 - r0
        cum = torch.cumsum(dt[:, r0:r1, :, None] * A_, dim=1)                      # [b, L, Din, N]
        b = (dt[:, r0:r1] * u_[:, r0:r1])[..., None] * B_[:, r0:r1, None, :]       # [b, L, Din, N]
        seg = cum[:, :, None] - cum[:, None, :]                                   # [b, t, s, Din, N]
        causal = torch.ones(L, L, dtype=torch.bool, device=u.device).tril()[None, :, :, None, None]
        decay = torch.where(causal, torch.exp(seg.masked_fill(~causal, 0.0)), torch.zeros((), dtype=cd, device=u.device))
        hs = torch.exp(cum) * h[:, None] + torch.einsum("btsdn,bsdn->btdn", decay, b)
        ys.append(torch.einsum("btdn,btn->btd", hs, C_[:, r0:r1]) + D_ * u_[:, r0:r1])
        h = hs[:, -1]
    y = torch.cat(ys, dim=1) if ys else u_.new_zeros(u.shape)
    return y.to(u.dtype)


