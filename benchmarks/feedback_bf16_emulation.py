"""The one-pass feedback forward's bf16 rounding points, emulated in torch, against the float64 oracle.

    python benchmarks/feedback_bf16_emulation.py [--T 1024] [--D 128]

The GPU kernels (backends/triton/feedback_online.py, bf16 models) round three things the interpreter cannot
(its bf16 arithmetic is broken, so CI runs those products in fp32): the stored probabilities
P = exp(z - m_tile) per 128-column key tile, the operands of the update's products (P rescaled, and the bf16
output rows of s from earlier outer chunks of 256 rows), and the output. Everything else is fp32 (TF32
products in the inner-block solve are not emulated: TF32 keeps 3 more mantissa bits than bf16). This replays
that order of operations on bf16 inputs and reports the relative error against float64 (the spec's bf16
tolerance is 3e-2), next to the same algorithm with fp32 P and s.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_pass(f, q, k, gamma, scale, low: bool, CO=256, PN=128):
    """The kernels' algorithm in torch (float32 arithmetic; bf16 rounding where the GPU kernels round)."""
    B, T, Dv = f.shape
    bf = (lambda x: x.to(torch.bfloat16).float()) if low else (lambda x: x)
    qf, kf, ff, gf = q.float(), k.float(), f.float(), gamma.float()
    s = torch.zeros(B, T, Dv)
    out = torch.zeros(B, T, Dv)
    for r0 in range(0, T, CO):
        rows = torch.arange(r0, min(r0 + CO, T))
        z = (qf[:, rows] @ kf[:, :rows[-1] + 1].transpose(1, 2)) * scale          # [B, n, ncols]
        cols = torch.arange(z.shape[-1])
        z = z.masked_fill(cols[None, None, :] >= rows[None, :, None], float("-inf"))
        nt = -(-z.shape[-1] // PN)
        zt = torch.nn.functional.pad(z, (0, nt * PN - z.shape[-1]), value=float("-inf")).view(B, len(rows), nt, PN)
        m_t = zt.amax(-1).clamp_min(-1e30)
        p = bf(torch.exp(zt - m_t[..., None]))                                      # stored P
        l_t = torch.exp(zt - m_t[..., None]).sum(-1)
        m = m_t.amax(-1)
        l = (l_t * torch.exp(m_t - m[..., None])).sum(-1)
        w = (p * (gf[:, rows, None] * torch.exp(m_t - m[..., None]) / l.clamp_min(1e-30)[..., None])[..., None]
             ).reshape(B, len(rows), nt * PN)[..., :z.shape[-1]]
        w = torch.where(l[..., None] > 0, w, torch.zeros_like(w))
        acc = ff[:, rows] + (bf(w[..., :r0]) @ bf(out[:, :r0]) if low else w[..., :r0] @ s[:, :r0])
        for t in range(len(rows)):   # the inner blocks' substitution (exact here: the inverses are exact)
            acc[:, t] += (w[:, t, r0:r0 + t, None] * s[:, r0:r0 + t]).sum(1)
            s[:, r0 + t] = acc[:, t]
        out[:, rows] = bf(s[:, rows])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args(argv)
    from sessa_compiler.semantics import feedback_ref

    torch.manual_seed(0)
    B, T, D = 2, args.T, args.D
    for label, sign in (("gamma near +gamma_max", 1.0), ("gamma near -gamma_max", -1.0), ("gamma random", 0.0)):
        f, q, k = (torch.randn(B, T, D).to(torch.bfloat16) for _ in range(3))
        g = 0.999 * torch.tanh(sign * 9.0 + (3.0 if sign == 0 else 0.2) * torch.randn(B, T))
        gamma = g.to(torch.bfloat16)
        ref = feedback_ref(f.double(), q.double(), k.double(), gamma.double(), D ** -0.5)
        for low in (True, False):
            out = one_pass(f, q, k, gamma, D ** -0.5, low)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            print(f"T={T} D={D} {label}: {'bf16 P and update' if low else 'fp32 P and update'}: rel err {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
