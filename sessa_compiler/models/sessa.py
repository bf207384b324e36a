"""Eager SessaLayer / SessaMixer: the numerical oracle (shared/SESSA_SPEC.md).

Parameter and buffer names are those of the public reference implementation,
so its checkpoints load with ``load_state_dict(strict=True)``. The forward is
written to be traceable by ``torch.export`` with dynamic batch and sequence
length: no loop over T, no data-dependent branches, no ``.item()``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import DecodeByPrefill, resolve_heads

__all__ = ["SessaMixer", "SessaLayer"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64; bf16/fp16 are widened to float32, where the
    # feedback solve (condition up to 1/(1-gamma_max)) is still accurate.
    # Plain Python on purpose: torch.promote_types would be recorded by torch.export.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ensure_capacity(cache: dict, keys, needed: int) -> None:
    """Grow the time axis (dim 1) of the cached tensors to hold ``needed`` positions."""
    have = cache[keys[0]].shape[1]
    if needed <= have:
        return
    extra = max(needed - have, have)  # doubling keeps token-by-token decoding amortised O(1)
    for key in keys:
        old = cache[key]
        pad = old.new_zeros(old.shape[0], extra, *old.shape[2:])
        cache[key] = torch.cat([old, pad], dim=1)


class SessaMixer(nn.Module):
    """Forward causal attention f, then the feedback solve (I - gamma*alpha) s = f."""

    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        use_forward_rope: bool = True,
        gamma_max: float = 0.999,
    ):
        super().__init__()
        if not 0.0 < float(gamma_max) < 1.0:
            raise ValueError(f"gamma_max must lie in the open interval (0, 1), got {gamma_max}")
        n_kv_heads = resolve_heads(D, n_heads, n_kv_heads)
        head_dim = D // n_heads
        if use_forward_rope and head_dim % 2 != 0:
            raise ValueError(
                f"RoPE rotates pairs of channels, so the head width D/n_heads={head_dim} must be even; "
                "use an even head width or use_forward_rope=False"
            )
        if max_len is not None and max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")

        self.D = D
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.use_forward_rope = bool(use_forward_rope)
        self.gamma_max = float(gamma_max)

        kv_dim = n_kv_heads * head_dim
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, kv_dim)
        self.v_proj = nn.Linear(D, kv_dim)
        self.proj_fb = nn.Linear(D, 2 * D)
        # With one head concat_heads is already the output; the reference has no
        # parameter there, so neither do we (strict checkpoint loading).
        self.out_proj = nn.Identity() if n_heads == 1 else nn.Linear(D, D, bias=False)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)

        if self.use_forward_rope:
            i = torch.arange(head_dim // 2, dtype=torch.float32)
            self.register_buffer("rope_inv_freq", 10000.0 ** (-2.0 * i / head_dim))
        else:
            self.register_buffer("rope_inv_freq", None)

        if max_len is not None:
            # True = masked. f includes the diagonal, the feedback excludes it.
            full = torch.ones(max_len, max_len, dtype=torch.bool)
            self.register_buffer("causal_mask_f_full", full.triu(1))
            self.register_buffer("causal_mask_fb_full", full.triu(0))
        else:
            self.register_buffer("causal_mask_f_full", None)
            self.register_buffer("causal_mask_fb_full", None)

    def _apply(self, fn, *args, **kwargs):
        # model.to(bfloat16) would round the RoPE frequencies, and the angles
        # p * omega at large p with them; keep the frequencies at least float32.
        saved = self.rope_inv_freq
        super()._apply(fn, *args, **kwargs)
        freq = self.rope_inv_freq
        if freq is not None and freq.dtype in (torch.float16, torch.bfloat16):
            self.rope_inv_freq = saved.to(device=freq.device, dtype=torch.float32)
        return self

    # ---------------------------------------------------------------- helpers

    def _masks(self, T: int, device):
        """(mask_f, mask_fb) for a full sequence, True = masked."""
        if self.causal_mask_f_full is not None:
            if T > self.max_len:
                raise ValueError(f"sequence length {T} exceeds max_len={self.max_len}")
            return self.causal_mask_f_full[:T, :T], self.causal_mask_fb_full[:T, :T]
        ones = torch.ones(T, T, dtype=torch.bool, device=device)
        return ones.triu(1), ones.triu(0)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Interleaved RoPE on x (B, T, heads, d) at the given positions (T,)."""
        ct = _compute_dtype(x.dtype)
        theta = positions.to(ct)[:, None] * self.rope_inv_freq.to(ct)[None, :]  # (T, d/2)
        # Each angle turns one (even, odd) channel pair, so repeat it for both.
        cos = theta.cos().repeat_interleave(2, dim=-1)[:, None, :]            # (T, 1, d)
        sin = theta.sin().repeat_interleave(2, dim=-1)[:, None, :]
        xc = x.to(ct)
        partner = torch.stack((-xc[..., 1::2], xc[..., 0::2]), dim=-1).flatten(-2)
        return (xc * cos + partner * sin).to(x.dtype)

    def _forward_attention(self, q, k, v, mask_f):
        """softmax(q k^T / sqrt(d)) v with GQA; q (B,Tq,H,d), k/v (B,Tk,Hkv,d), mask (Tq,Tk)."""
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=2)  # query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=2)
        logits = torch.einsum("bthd,bshd->bhts", q, k) * self.head_dim ** -0.5
        logits = logits.masked_fill(mask_f, float("-inf"))  # every row keeps its diagonal
        return torch.einsum("bhts,bshd->bthd", logits.softmax(dim=-1), v)

    def _feedback_weights(self, q_b, k_b, mask_fb):
        """Strictly causal alpha (B,Tq,Tk) in q_b's dtype; rows with no predecessor are 0."""
        logits = torch.einsum("btd,bsd->bts", q_b, k_b) * self.D ** -0.5
        # Row 0 has nothing to attend to: a -inf fill would give softmax 0/0 = NaN.
        # A finite fill keeps the graph NaN-free; the masked_fill after the
        # softmax then zeroes every masked entry, which is all of row 0.
        logits = logits.masked_fill(mask_fb, torch.finfo(logits.dtype).min)
        return logits.softmax(dim=-1).masked_fill(mask_fb, 0.0)

    def _gamma(self, bar_a, ct):
        raw = self.gamma_bias.to(ct) + self.gamma_ctx(bar_a).to(ct)  # (B, T, 1)
        return self.gamma_max * torch.tanh(raw)

    def _project(self, bar_a, positions):
        B, T, _ = bar_a.shape
        q = self.q_proj(bar_a).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(bar_a).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(bar_a).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_forward_rope:
            q = self._rope(q, positions)
            k = self._rope(k, positions)
        return q, k, v

    # ---------------------------------------------------------------- forward

    def forward(self, bar_a: torch.Tensor) -> torch.Tensor:
        B, T, D = bar_a.shape
        if D != self.D:
            raise ValueError(f"expected last dimension D={self.D}, got {D}")
        mask_f, mask_fb = self._masks(T, bar_a.device)

        q, k, v = self._project(bar_a, torch.arange(T, device=bar_a.device))
        f = self.out_proj(self._forward_attention(q, k, v, mask_f).reshape(B, T, D))

        ct = _compute_dtype(bar_a.dtype)
        q_b, k_b = self.proj_fb(bar_a).to(ct).split([D, D], dim=-1)
        alpha = self._feedback_weights(q_b, k_b, mask_fb)
        B_fb = self._gamma(bar_a, ct) * alpha  # (B, T, T), strictly lower triangular
        # unitriangular=True ignores the (zero) diagonal of -B_fb: this solves (I - B_fb) s = f.
        s = torch.linalg.solve_triangular(-B_fb, f.to(ct), upper=False, unitriangular=True)
        return s.to(bar_a.dtype)

    # ---------------------------------------------------- incremental decoding

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        """Empty cache; ``max_len`` (or the layer's) preallocates, otherwise it grows on demand."""
        param = self.q_proj.weight
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        length = max_len if max_len is not None else (self.max_len or 0)
        B, L = int(batch_size), int(length)
        return {
            "t": 0,
            "k_f": torch.zeros(B, L, self.n_kv_heads, self.head_dim, device=device, dtype=dtype),
            "v_f": torch.zeros(B, L, self.n_kv_heads, self.head_dim, device=device, dtype=dtype),
            "k_b": torch.zeros(B, L, self.D, device=device, dtype=dtype),
            # Past outputs feed every later solve: keep them at solve precision.
            "s": torch.zeros(B, L, self.D, device=device, dtype=_compute_dtype(dtype)),
        }

    def _extend(self, bar_a: torch.Tensor, cache: dict) -> torch.Tensor:
        """Append a chunk (B, Tn, D) after cache["t"] positions; returns its s (B, Tn, D)."""
        B, Tn, D = bar_a.shape
        if D != self.D:
            raise ValueError(f"expected last dimension D={self.D}, got {D}")
        t0 = int(cache["t"])
        t1 = t0 + Tn
        _ensure_capacity(cache, ("k_f", "v_f", "k_b", "s"), t1)
        device = bar_a.device
        pos_q = torch.arange(t0, t1, device=device)
        pos_k = torch.arange(t1, device=device)

        q, k, v = self._project(bar_a, pos_q)
        cache["k_f"][:, t0:t1] = k
        cache["v_f"][:, t0:t1] = v
        mask_f = pos_k[None, :] > pos_q[:, None]
        attn = self._forward_attention(q, cache["k_f"][:, :t1], cache["v_f"][:, :t1], mask_f)
        f = self.out_proj(attn.reshape(B, Tn, D))

        ct = _compute_dtype(bar_a.dtype)
        q_b, k_b = self.proj_fb(bar_a).to(ct).split([D, D], dim=-1)
        cache["k_b"][:, t0:t1] = k_b.to(cache["k_b"].dtype)
        mask_fb = pos_k[None, :] >= pos_q[:, None]
        alpha = self._feedback_weights(q_b, cache["k_b"][:, :t1].to(ct), mask_fb)  # (B, Tn, t1)
        B_fb = self._gamma(bar_a, ct) * alpha
        # Past outputs are known: move them to the right-hand side, then solve
        # the chunk's own (Tn x Tn) strictly lower block.
        rhs = f.to(ct) + B_fb[:, :, :t0] @ cache["s"][:, :t0].to(ct)
        s = torch.linalg.solve_triangular(-B_fb[:, :, t0:], rhs, upper=False, unitriangular=True)
        cache["s"][:, t0:t1] = s.to(cache["s"].dtype)
        cache["t"] = t1
        return s.to(bar_a.dtype)

    def prefill(self, bar_a: torch.Tensor, cache: dict) -> dict:
        """Process bar_a (B, T, D) into the cache (also valid on a non-empty cache)."""
        self._extend(bar_a, cache)
        return cache

    def decode_step(self, bar_a_t: torch.Tensor, cache: dict):
        """One position: bar_a_t (B, D) or (B, 1, D) -> (s_t of the same rank, cache)."""
        was_3d = bar_a_t.dim() == 3
        if was_3d and bar_a_t.shape[1] != 1:
            raise ValueError(f"decode_step expects (B, D) or (B, 1, D), got {tuple(bar_a_t.shape)}")
        if bar_a_t.dim() not in (2, 3):
            raise ValueError(f"decode_step expects (B, D) or (B, 1, D), got {tuple(bar_a_t.shape)}")
        s = self._extend(bar_a_t if was_3d else bar_a_t[:, None, :], cache)
        return (s if was_3d else s[:, 0]), cache


class SessaLayer(DecodeByPrefill, nn.Module):
    """Pre-norm residual block: y = x + W_out(Mixer(gelu(a)) * g), (a, g) = W_in(LN(x))."""

    def __init__(
        self,
        D: int,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        ln_eps: float = 1e-5,
        use_forward_rope: bool = True,
        gamma_max: float = 0.999,
    ):
        super().__init__()
        self.D = D
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = SessaMixer(
            D,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            max_len=max_len,
            use_forward_rope=use_forward_rope,
            gamma_max=gamma_max,
        )
        self.W_out = nn.Linear(D, D)

    def _gate_inputs(self, x):
        a, g = self.W_in(self.ln(x)).split([self.D, self.D], dim=-1)
        return F.gelu(a), g  # exact (erf) GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bar_a, g = self._gate_inputs(x)
        return x + self.W_out(self.mixer(bar_a) * g)

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        return self.mixer.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len)

    def prefill(self, x: torch.Tensor, cache: dict):
        """x (B, T, D) -> (y (B, T, D), cache)."""
        bar_a, g = self._gate_inputs(x)
        s = self.mixer._extend(bar_a, cache)
        return x + self.W_out(s * g), cache
