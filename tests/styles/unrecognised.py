"""A block that torch.export traces with dynamic B and T but that contains no
attention, feedback solve or selective scan: the frontend must not mistake any
part of it for a Sessa op (it should fall back, visibly, op by op)."""

from __future__ import annotations

import torch
import torch.nn as nn


class OddBlock(nn.Module):
    def __init__(self, D: int):
        super().__init__()
        self.D = D
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        # A running sum over time of per-token sorted features: cumsum is a scan,
        # but not a selective (input-gated) one.
        h = h + torch.cumsum(torch.sort(h, dim=-1).values, dim=1) * 0.01
        # Time reversal and a log-normaliser over features.
        h = torch.flip(h, dims=[1])
        h = h - torch.logsumexp(h, dim=-1, keepdim=True)
        return x + torch.tanh(h)
