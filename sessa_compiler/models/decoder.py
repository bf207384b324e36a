"""A token decoder stacking Sessa ("S"), Mamba ("M") and Transformer ("T") blocks."""

import torch
import torch.nn as nn

from .mamba import MambaLayer
from .sessa import SessaLayer
from .transformer import TransformerLayer

__all__ = ["Decoder"]


class Decoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        D: int,
        layers: str,
        n_heads: int = 1,
        n_kv_heads: int | None = None,
        max_len: int | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        mlp_ratio: int = 4,
        ln_eps: float = 1e-5,
        use_rope: bool = True,
        gamma_max: float = 0.999,
    ):
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        unknown = sorted(set(layers) - set("SMT"))
        if unknown or not layers:
            raise ValueError(
                f"layers must be a non-empty string of 'S' (Sessa), 'M' (Mamba), 'T' (Transformer); "
                f"got {layers!r}" + (f" with unknown kinds {unknown}" if unknown else "")
            )
        self.vocab_size = vocab_size
        self.D = D
        self.layer_kinds = layers
        self.max_len = max_len

        def make(kind):
            if kind == "S":
                return SessaLayer(D, n_heads=n_heads, n_kv_heads=n_kv_heads, max_len=max_len,
                                  ln_eps=ln_eps, use_forward_rope=use_rope, gamma_max=gamma_max)
            if kind == "M":
                return MambaLayer(D, d_state=d_state, d_conv=d_conv, expand=expand, ln_eps=ln_eps)
            return TransformerLayer(D, n_heads=n_heads, n_kv_heads=n_kv_heads, mlp_ratio=mlp_ratio,
                                    use_rope=use_rope, ln_eps=ln_eps)

        self.embed = nn.Embedding(vocab_size, D)
        self.layers = nn.ModuleList(make(kind) for kind in layers)
        self.ln_f = nn.LayerNorm(D, eps=ln_eps)
        self.lm_head = nn.Linear(D, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) long -> logits (B, T, vocab_size)."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))

    # ---------------------------------------------------- incremental decoding

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> list:
        """One cache per layer, in stack order."""
        return [layer.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len)
                for layer in self.layers]

    def prefill(self, tokens: torch.Tensor, caches: list):
        """tokens (B, T) -> (logits (B, T, V), caches)."""
        x = self.embed(tokens)
        for layer, cache in zip(self.layers, caches):
            x, _ = layer.prefill(x, cache)
        return self.lm_head(self.ln_f(x)), caches

    def decode_step(self, token: torch.Tensor, caches: list):
        """token (B,) or (B, 1) -> (logits (B, V) or (B, 1, V), caches)."""
        tokens = token if token.dim() == 2 else token[:, None]
        logits, caches = self.prefill(tokens, caches)
        return (logits if token.dim() == 2 else logits[:, 0]), caches

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: tokens (B, T), T >= 1 -> (B, T + max_new_tokens)."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"generate expects a non-empty prompt (B, T), got {tuple(tokens.shape)}")
        if max_new_tokens <= 0:
            return tokens
        caches = self.init_cache(tokens.shape[0], device=tokens.device,
                                 max_len=tokens.shape[1] + max_new_tokens)
        logits, caches = self.prefill(tokens, caches)
        out = [tokens]
        next_token = logits[:, -1].argmax(dim=-1)
        for step in range(max_new_tokens):
            out.append(next_token[:, None])
            if step + 1 < max_new_tokens:
                logits, caches = self.decode_step(next_token, caches)
                next_token = logits.argmax(dim=-1)
        return torch.cat(out, dim=1)
