"""Small modules, one per aten op that issue 22 lists for the exports, each on x of shape (B, T, 8)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Op(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 6, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(6, generator=g) * 0.1)
        self.w3 = nn.Parameter(torch.randn(8, 2, 3, generator=g) * 0.3)


class Addmm(_Op):   # GPT-2's Conv1D: the (B*T, 8) rows are an expression of B and T
    def forward(self, x):
        return torch.addmm(self.b, x.view(-1, x.size(-1)), self.w).view(x.shape[0], x.shape[1], 6)


class Baddbmm(_Op):
    def forward(self, x):
        return torch.baddbmm(self.b.view(1, 1, 6), x, self.w.expand(x.shape[0], 8, 6), beta=0.5, alpha=2.0)


class Tensordot(_Op):
    def forward(self, x):
        return torch.tensordot(x, self.w3, dims=([2], [0])).flatten(2)


class VarMean(_Op):
    def forward(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) + x.var(dim=1, keepdim=True, correction=0)


class Narrow(_Op):
    def forward(self, x):
        return x.narrow(-1, 2, 4) * 2 + x.narrow(1, 0, x.shape[1] - 1).sum(1, keepdim=True)[..., :4]


class Split(_Op):
    def forward(self, x):
        a, b, c = torch.tensor_split(x, 3, dim=-1)
        d, e = torch.split(x, [3, 5], dim=-1)
        return torch.cat([c, b[..., :2] * a[..., :2], d * e[..., :3]], dim=-1)


class DiagEmbed(_Op):
    def forward(self, x):
        return torch.diag_embed(x[..., :3]).flatten(2) + 1.0


class Pad(_Op):
    def forward(self, x):
        y = F.pad(x, (1, 2), value=0.5)              # along the width
        z = F.pad(x, (0, 0, 2, 0))[:, : x.shape[1]]    # along T, then back to T positions (a causal shift)
        return y[..., :8] + z


class SymbolicSlices(_Op):
    def forward(self, x):
        diff = x[:, 1:] - x[:, :-1]                     # slices along T whose ends are T - 1
        half = x[:, : x.shape[1] // 2 + 1].mean(1, keepdim=True)
        return torch.cat([x[:, :1], diff], dim=1) + half


class ClampTransposeSum(_Op):
    """clamp in its spellings (scalar bounds, one bound, a tensor bound, clamp_min/clamp_max), .mT and the
    reductions over every element (x.sum(), x.mean())."""

    def __init__(self):
        super().__init__()
        self.register_buffer("floor", -torch.linspace(0.1, 0.4, 8))

    def forward(self, x):
        y = x.clamp(-0.5, 0.7) + torch.clamp(x, min=self.floor) + x.clamp(max=0.2) + x.clamp_min(0.1).clamp_max(0.6)
        gram = y.mT @ y                                   # [B, 8, 8]
        return y * gram.mean() + x.sum() / x.numel() + torch.clamp(gram, min=-1.0).sum((1, 2))[:, None, None]


class NormsAndActivations(_Op):
    """Norms and activations that modern model code calls by their own aten op: F.normalize / x.norm /
    linalg.vector_norm (p = 1, 2, 3, inf), F.rms_norm (with and without weight), square, hardtanh, leaky_relu,
    hardswish, hardsigmoid, mish, logsigmoid, glu, logsumexp, amin, x.max() / x.min(), repeat."""

    def forward(self, x):
        norm = torch.linalg.vector_norm
        y = F.normalize(x, dim=-1) + x.norm(dim=-1, keepdim=True) + norm(x, 1, dim=(1, 2), keepdim=True)
        y = y + norm(x, float("inf"), dim=-1, keepdim=True) + norm(x, 3.0, dim=-1, keepdim=True)
        y = y + F.rms_norm(x, (8,), self.b.repeat(2)[:8] + 1) + F.rms_norm(x, (8,), eps=1e-6) + x.square()
        y = y + F.hardtanh(x, -0.5, 0.5) + F.leaky_relu(x, 0.2) + F.hardswish(x) + F.hardsigmoid(x) + F.mish(x)
        y = y + F.logsigmoid(x) + F.glu(torch.cat([x, x * 2], -1), -1) + x.clip(-1, 1)
        y = y + torch.logsumexp(x, -1, keepdim=True) + torch.logsumexp(x, (1, 2))[:, None, None]
        return y + x.amin(-1, keepdim=True) + x.max() + x.min() + x.repeat(1, 1, 2)[..., 8:] + x.norm()


class RoundingAndExpLog(_Op):
    """torch.floor, ceil, round, sign, expm1, log1p, exp2, log2; x.detach() (the IR's detach)."""

    def forward(self, x):
        y = torch.floor(x) + torch.ceil(x * 0.5) + torch.round(x * 3) + torch.sign(x) + x.detach() * 0.5
        return y + torch.expm1(x * 0.1) + torch.log1p(x.abs()) + torch.exp2(x * 0.5) + torch.log2(x.abs() + 1)


class ComplexBuffer(_Op):
    """A float model carrying a complex constant (a LLaMA-style freqs_cis table), sliced to T."""

    def __init__(self):
        super().__init__()
        ang = torch.outer(torch.arange(128).float(), 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(ang), ang))

    def forward(self, x):
        t = x.shape[1]
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        rotated = z * self.freqs_cis[:t].view(1, t, 4)
        return torch.view_as_real(rotated).flatten(2).type_as(x)


class LinalgSolve(_Op):
    """A dense solve that is not the feedback: no ONNX / TVM form (a clear error names it)."""

    def forward(self, x):
        a = torch.eye(8) * 3 + self.w[:, :1] @ self.w[:, :1].T
        return torch.linalg.solve(a, x.transpose(1, 2)).transpose(1, 2)


class LinalgInv(_Op):
    def forward(self, x):
        a = torch.eye(8) * 3 + self.w[:, :1] @ self.w[:, :1].T
        return x @ torch.linalg.inv(a)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 8)

    def forward(self, x):
        return self.emb((x[..., 0] > 0).long() + (x[..., 1] > 1).long()) + x


class TriSolve(nn.Module):
    """A triangular solve with a constant matrix (not the Sessa feedback): the IR's tri_solve."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.register_buffer("lower", torch.eye(8) * 2 + torch.tril(torch.randn(8, 8, generator=g) * 0.2, -1))

    def forward(self, x):
        return torch.linalg.solve_triangular(self.lower, x.unsqueeze(-1), upper=False).squeeze(-1)


EXPORTED = [Addmm, Baddbmm, Tensordot, VarMean, Narrow, Split, DiagEmbed, Pad, SymbolicSlices, ClampTransposeSum,
            NormsAndActivations, RoundingAndExpLog, ComplexBuffer]
REFUSED = [LinalgSolve, LinalgInv]


class KitchenSink(nn.Module):
    """Many ordinary ops at once (for the coverage-matrix export test): norms, activations, comparisons and
    logic, masks, factories, reductions, layout ops, einsum, conv1d, embedding-free."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, generator=g) * 0.3)

    def forward(self, x):
        B, T, D = x.shape
        h = self.norm(x)
        a = F.gelu(h) + F.gelu(h, approximate="tanh") + F.softplus(h) + F.relu(h) + torch.sigmoid(h) + F.silu(h)
        a = a + torch.exp(-h.abs()) + torch.log(h.abs() + 1) + torch.sqrt(h.abs()) + torch.rsqrt(h.abs() + 1)
        a = a + torch.erf(h) + torch.tanh(h) + torch.sin(h) * torch.cos(h) + torch.reciprocal(h.abs() + 1)
        a = a + torch.maximum(h, x) - torch.minimum(h, x) + h.pow(2) / 3 - (-h)
        pos = torch.arange(T, device=x.device)
        keep = (pos[:, None] >= pos[None, :]) & ~(pos[:, None] > pos[None, :] + 3) | (pos[:, None] == pos[None, :])
        keep = keep & (pos[:, None] != -1) & (pos[:, None] <= T) & (pos[None, :] < T + 1) & (pos[None, :] >= 0)
        scores = torch.einsum("btd,bsd->bts", a, h).masked_fill(~keep, float("-inf"))
        mixed = torch.softmax(scores, dim=-1) @ h + torch.log_softmax(scores, dim=-1).amax(-1, True)
        band = torch.tril(torch.ones(T, T)) - torch.triu(torch.ones(T, T), 1) + torch.eye(T)
        mixed = mixed + (band @ h) * 0.1 + torch.zeros(B, T, D) + torch.full((1, 1, D), 0.5)
        conv = self.conv(mixed.transpose(1, 2)).transpose(1, 2)
        parts = torch.stack([conv, mixed], dim=2).sum(2).unsqueeze(-1).squeeze(-1)
        rep = parts.view(B, T, 2, 4).permute(0, 2, 1, 3).repeat_interleave(2, dim=1).mean(1)
        sel = parts.select(2, 0).unsqueeze(-1) + parts[:, :, 1:5].expand(B, T, 4)[..., :1]
        out = torch.where(parts > 0, parts, 0.1 * parts) + torch.cat([rep, rep], -1) + sel
        return out.to(torch.float64).to(torch.float32) @ self.w

