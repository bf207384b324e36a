"""Near misses of the recognised ops that a probe used to let through: each must stay ordinary ops (the module's
outputs at every length, including lengths far from the probes'), and the plain form beside it must still be
recognised. Found by writing modules that differ from causal attention / Sessa's feedback only where a probe
might not look:

- a bf16/fp16 module (HF's ``softmax(scores.float()).to(x.dtype)``) whose scores carry an ALiBi bias or a
  temperature: probes evaluated the casts, and their rounding set the tolerance to 0.3 of the output's scale;
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sessa_compiler.frontend import trace_with_report
from model_helpers import op_counts


def _alibi_slopes(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return torch.tensor([start ** (i + 1) for i in range(n)])


class HalfAttention(nn.Module):
    """Attention in a 16-bit model, HF style: scores upcast to float32, softmax, cast back. ``bias``: "alibi"
    (Falcon/MPT: a slope per head times the key position), "temperature" (logits divided by a buffer holding 1.1), or None (plain)."""

    def __init__(self, bias=None, d=32, n_heads=4):
        super().__init__()
        self.h, self.hd, self.bias = n_heads, d // n_heads, bias
        self.qkv, self.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("slopes", _alibi_slopes(n_heads), persistent=False)
        self.register_buffer("temperature", torch.tensor(1.1))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.h, self.hd).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.hd)
        if self.bias == "alibi":
            scores = scores + self.slopes[:, None, None] * torch.arange(1 - T, 1, device=x.device)[None, None, :]
        elif self.bias == "temperature":
            scores = scores / self.temperature
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1).to(x.dtype)
        return self.dense((probs @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", ["alibi", "temperature", None])
def test_a_half_precision_attention_with_a_bias_is_not_taken_for_plain_attention(dtype, bias):
    torch.manual_seed(0)
    m = HalfAttention(bias).to(dtype).eval()
    x = torch.randn(2, 9, 32).to(dtype)
    tr = trace_with_report(m, (x,))
    attention = op_counts(tr.graph).get("attention", 0)
    if bias is None:   # the plain form: the casts do not hide it
        assert attention == 1, tr.report.rejected
    elif bias == "alibi":
        assert attention == 0, tr.report.accepted
    else:   # a temperature is attention at another scale: taken only with that scale
        assert all("scale=0.321412" in a for a in tr.report.accepted if a.startswith("attention")), tr.report.accepted
    # what runs is the module, at a length past the probes'
    from sessa_compiler.backends.eager import run_graph
    x = torch.randn(2, 40, 32).to(dtype)
    with torch.no_grad():
        want = m(x)
        (got,) = run_graph(tr.graph, [x])
    assert (got.double() - want.double()).abs().max() <= 2e-2 * want.double().abs().max()
