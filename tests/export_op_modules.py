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


EXPORTED = [Addmm, Baddbmm, Tensordot, VarMean, Narrow, Split, DiagEmbed, Pad, SymbolicSlices, ComplexBuffer]
REFUSED = [LinalgSolve, LinalgInv]
