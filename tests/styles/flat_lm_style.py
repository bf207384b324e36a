"""A small Sessa language model written with flat parameters, as a from-scratch research script would be.

Not the reference's module tree: every weight is a flat ``nn.Parameter`` on one module (embedding, one Sessa
block, an untied head), used through ``torch.einsum``; ``load_sessa_layer`` copies a reference SessaLayer's
state_dict into it so tests can compare with the spec. Spelled differently from every other style here:

- token ids in, logits out; the block is pre-norm (``F.layer_norm`` with flat weights) like SessaLayer;
- RoPE in the GPT-J convention (rotate every two channels) from a precomputed complex buffer
  ``freqs_cis`` [max_len, d/2] (complex128, angles in float64 from the float32 frequencies), sliced to T;
- GQA by ``torch.stack([k] * group, dim=3).flatten(2, 3)`` on the (B, T, heads, d) layout;
- attention scores by ``einsum("bthd,bshd->bhts")`` with ``masked_fill`` of a ``tril`` mask's complement;
- the gain ``gamma_max * (2 * sigmoid(2 z) - 1)`` (= gamma_max * tanh(z)), ``nan_to_num`` for row 0;
- the feedback solved by blocked forward substitution in Python: the sequence is cut into blocks of
  ``block`` positions (a static trip count: T must be a multiple of ``block``), each block solved by
  ``solve_triangular`` on its diagonal block after subtracting the earlier blocks' contribution, the blocks
  concatenated. torch.export unrolls the loop, so the graph is static in T.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FlatSessaLM(nn.Module):
    def __init__(self, vocab=32, D=16, n_heads=4, n_kv_heads=2, max_len=64, block=4, gamma_max=0.999):
        super().__init__()
        self.D, self.H, self.Hkv, self.hd = D, n_heads, n_kv_heads, D // n_heads
        self.block, self.gamma_max = block, gamma_max
        p = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.3)   # noqa: E731
        self.embed = p(vocab, D)
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        self.w_in, self.b_in = p(2 * D, D), p(2 * D)
        self.wq, self.bq = p(D, D), p(D)
        self.wk, self.bk = p(self.Hkv * self.hd, D), p(self.Hkv * self.hd)
        self.wv, self.bv = p(self.Hkv * self.hd, D), p(self.Hkv * self.hd)
        self.wo = p(D, D)
        self.w_fb, self.b_fb = p(2 * D, D), p(2 * D)
        self.w_gamma, self.gamma_bias = p(1, D), nn.Parameter(torch.tensor(1.0))
        self.w_out, self.b_out = p(D, D), p(D)
        self.head = p(vocab, D)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(ang), ang), persistent=False)

    def load_sessa_layer(self, sd: dict):
        """Take a reference SessaLayer's weights (state_dict keys of sessa_compiler.models.SessaLayer)."""
        m = "mixer."
        pairs = {"ln_w": "ln.weight", "ln_b": "ln.bias", "w_in": "W_in.weight", "b_in": "W_in.bias",
                 "wq": m + "q_proj.weight", "bq": m + "q_proj.bias", "wk": m + "k_proj.weight",
                 "bk": m + "k_proj.bias", "wv": m + "v_proj.weight", "bv": m + "v_proj.bias",
                 "wo": m + "out_proj.weight", "w_fb": m + "proj_fb.weight", "b_fb": m + "proj_fb.bias",
                 "w_gamma": m + "gamma_ctx.weight", "gamma_bias": m + "gamma_bias",
                 "w_out": "W_out.weight", "b_out": "W_out.bias"}
        with torch.no_grad():
            for mine, theirs in pairs.items():
                getattr(self, mine).copy_(sd[theirs])
        return self

    def gptj_rope(self, x):   # x (B, T, heads, d), rotate every two
        T = x.shape[1]
        c = self.freqs_cis[:T]
        cos, sin = c.real.to(x.dtype)[None, :, None, :], c.imag.to(x.dtype)[None, :, None, :]
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)

    def block_forward(self, x):
        B, T, D = x.shape
        h = torch.einsum("btd,ed->bte", F.layer_norm(x, (D,), self.ln_w, self.ln_b), self.w_in) + self.b_in
        a, gate = F.gelu(h[..., :D]), h[..., D:]
        q = (torch.einsum("btd,ed->bte", a, self.wq) + self.bq).unflatten(-1, (self.H, self.hd))
        k = (torch.einsum("btd,ed->bte", a, self.wk) + self.bk).unflatten(-1, (self.Hkv, self.hd))
        v = (torch.einsum("btd,ed->bte", a, self.wv) + self.bv).unflatten(-1, (self.Hkv, self.hd))
        q, k = self.gptj_rope(q), self.gptj_rope(k)
        grp = self.H // self.Hkv
        k = torch.stack([k] * grp, dim=3).flatten(2, 3)
        v = torch.stack([v] * grp, dim=3).flatten(2, 3)
        sc = torch.einsum("bthd,bshd->bhts", q, k) / self.hd ** 0.5
        keep = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        w = sc.masked_fill(~keep, float("-inf")).softmax(-1)
        f = torch.einsum("bhts,bshd->bthd", w, v).flatten(2)
        f = torch.einsum("btd,ed->bte", f, self.wo)

        fb = torch.einsum("btd,ed->bte", a, self.w_fb) + self.b_fb
        lg = torch.einsum("btd,bsd->bts", fb[..., :D], fb[..., D:]) / D ** 0.5
        past = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
        alpha = torch.nan_to_num(lg.masked_fill(~past, float("-inf")).softmax(-1))
        z = torch.einsum("btd,od->bto", a, self.w_gamma) + self.gamma_bias
        gamma = self.gamma_max * (2.0 * torch.sigmoid(2.0 * z) - 1.0)
        M = torch.eye(T, dtype=x.dtype, device=x.device) - gamma * alpha
        n = self.block
        out = []
        for i in range(0, T, n):   # blocked forward substitution
            r = f[:, i:i + n]
            if i:
                r = r - M[:, i:i + n, :i] @ torch.cat(out, dim=1)
            out.append(torch.linalg.solve_triangular(M[:, i:i + n, i:i + n], r, upper=False))
        s = torch.cat(out, dim=1)
        y = torch.einsum("btd,ed->bte", s * gate, self.w_out) + self.b_out
        return y + x

    def forward(self, ids):
        x = self.embed[ids]
        return torch.einsum("btd,vd->btv", self.block_forward(x), self.head)
