"""Eager Mamba-1 ("S6") block, the SSM baseline of shared/SESSA_SPEC.md.

The recurrence goes through the ``sessa_compiler::selective_scan`` custom op so
that ``torch.export`` records it as one node rather than T unrolled steps.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import DecodeByPrefill
from .scan_op import scan_compute_dtype, selective_scan, selective_scan_with_state

__all__ = ["MambaLayer"]


class MambaLayer(DecodeByPrefill, nn.Module):
    def __init__(self, D: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, ln_eps: float = 1e-5):
        super().__init__()
        if D <= 0 or d_state <= 0 or d_conv <= 0 or expand <= 0:
            raise ValueError(
                f"D, d_state, d_conv and expand must be positive, got {D}, {d_state}, {d_conv}, {expand}"
            )
        self.d_model = D
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = d_inner = expand * D
        self.dt_rank = math.ceil(D / 16)

        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.in_proj = nn.Linear(D, 2 * d_inner, bias=False)
        # Padding both sides then keeping the first T outputs makes it causal.
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        # S4D-real initialisation: A = -(1..N) on every channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, D, bias=False)

        # Mamba's usual dt init (step sizes log-uniform in [1e-3, 1e-1]) keeps the
        # test inputs in the regime real checkpoints live in.
        with torch.no_grad():
            dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _ssm_inputs(self, u):
        """From the conv output u (B, T, Din): (delta, A, B_t, C_t)."""
        dt_low, B_t, C_t = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_low))
        A = -torch.exp(self.A_log)
        return delta, A, B_t, C_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        u, z = self.in_proj(self.ln(x)).split([self.d_inner, self.d_inner], dim=-1)
        u = self.conv1d(u.transpose(1, 2))[..., :T].transpose(1, 2)
        u = F.silu(u)
        delta, A, B_t, C_t = self._ssm_inputs(u)
        y = selective_scan(u, delta, A, B_t, C_t, self.D)
        return x + self.out_proj(y * F.silu(z))

    # ---------------------------------------------------- incremental decoding

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        """State: the last d_conv-1 conv inputs and h. ``max_len`` is accepted for API symmetry."""
        device = self.A_log.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        B = int(batch_size)
        return {
            "t": 0,
            "conv": torch.zeros(B, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            "h": torch.zeros(B, self.d_inner, self.d_state, device=device, dtype=scan_compute_dtype(dtype)),
        }

    def prefill(self, x: torch.Tensor, cache: dict):
        """x (B, T, D) -> (y (B, T, D), cache); continues whatever the cache holds."""
        if x.shape[1] == 0:
            return x.clone(), cache  # the conv below needs at least one new input
        u, z = self.in_proj(self.ln(x)).split([self.d_inner, self.d_inner], dim=-1)
        # The cached inputs play the role of the conv's left zero padding.
        window = torch.cat([cache["conv"].to(u.dtype), u.transpose(1, 2)], dim=-1)
        cache["conv"] = window[..., window.shape[-1] - (self.d_conv - 1):]
        u = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner).transpose(1, 2)
        u = F.silu(u)
        delta, A, B_t, C_t = self._ssm_inputs(u)
        y, cache["h"] = selective_scan_with_state(u, delta, A, B_t, C_t, self.D, h0=cache["h"])
        cache["t"] = int(cache["t"]) + x.shape[1]
        return x + self.out_proj(y * F.silu(z)), cache
