"""A causal language model with Sessa mixers, in the idiom of Hugging Face model files.

Written for the tests (not taken from any library). What makes it look like model code from the popular
libraries rather than like the reference layer:

- a config object carrying every size, read in ``__init__`` and in ``forward``;
- ``forward(input_ids, attention_mask=None, labels=None, return_dict=True, **kwargs)`` returning an output
  dataclass that is an ``OrderedDict`` subclass (fields set to None are left out of the dict, like
  transformers' ``ModelOutput``), or a tuple with ``return_dict=False``; the dataclass is *not* registered as
  a pytree node;
- the loss computed inside ``forward`` from ``labels``: logits and labels shifted by one position,
  ``F.cross_entropy(..., ignore_index=-100)`` over the flattened ``(B*(T-1), V)`` logits;
- Python size arithmetic: ``max(0, T - max_position_embeddings)`` on the traced length (a symbolic
  ``Max`` in the graph), ``//`` and ``%`` on the head width, a loop over the layers whose bound is a ``min``;
- ``.to(device=..., dtype=...)`` conversions that change nothing at trace time;
- RMSNorm computed in float32 (``hidden.pow(2).mean(-1, keepdim=True)``, ``torch.rsqrt``);
- RoPE by ``rotate_half`` (first half / second half of each head), the angles from
  ``inv_freq[None, :, None] @ position_ids[:, None, :]``;
- causal attention written out: ``q @ k^T * scaling`` plus an additive mask filled with
  ``torch.finfo(dtype).min`` above the diagonal, softmax in float32, GQA by ``expand``+``reshape``
  (``repeat_kv``);
- the MLP's projections as GPT-2-style ``Conv1D`` layers: ``torch.addmm(bias, x.view(-1, width), weight)``
  on the flattened ``(B*T, width)`` activations;
- the Sessa feedback after the attention: ``s = f + gamma * softmax_{j<t}(q_b k_b^T / sqrt(D)) s`` solved by
  ``torch.linalg.solve_triangular(I - gamma * alpha, f, unitriangular=True)``, the empty row 0 of the strict
  softmax cleared with ``torch.where(isnan)``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class SessaLMConfig:
    model_type = "sessa_lm"

    def __init__(self, vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6,
                 rope_theta=10000.0, gamma_max=0.9, attention_dropout=0.0, use_return_dict=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.gamma_max = gamma_max
        self.attention_dropout = attention_dropout
        self.use_return_dict = use_return_dict
        for k, v in kwargs.items():
            setattr(self, k, v)


class ModelOutput(OrderedDict):
    """A dict of the non-None fields that also reads as attributes and, by position, as a tuple."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def to_tuple(self):
        return tuple(self[k] for k in self.keys())


@dataclass
class SessaCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple] = None


class Conv1D(nn.Module):
    """A linear layer stored transposed (nx, nf), applied with addmm on the flattened rows."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class SessaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class SessaRotaryEmbedding(nn.Module):
    def __init__(self, config: SessaLMConfig):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def rotate_half(x):
    split = x.shape[-1] // 2 + x.shape[-1] % 2
    x1 = x[..., :split]
    x2 = x[..., split:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep: int):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class SessaMixer(nn.Module):
    """Causal attention (the forward path f), then the feedback solve s = f + gamma * alpha s."""

    def __init__(self, config: SessaLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.fb_proj = nn.Linear(self.hidden_size, 2 * self.hidden_size)
        self.gamma_proj = nn.Linear(self.hidden_size, 1)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        bsz, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) * self.scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_weights = F.dropout(attn_weights, p=self.config.attention_dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
        f = self.o_proj(attn_output)

        q_b, k_b = self.fb_proj(hidden_states).split(self.hidden_size, dim=-1)
        scores = torch.matmul(q_b, k_b.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        strict = torch.ones(q_len, q_len, dtype=torch.bool, device=hidden_states.device).tril(diagonal=-1)
        scores = scores.masked_fill(~strict, float("-inf"))
        alpha = torch.softmax(scores, dim=-1)
        alpha = torch.where(torch.isnan(alpha), torch.zeros_like(alpha), alpha)
        gamma = self.config.gamma_max * torch.tanh(self.gamma_proj(hidden_states))
        eye = torch.eye(q_len, dtype=hidden_states.dtype, device=hidden_states.device)
        system = eye - gamma * alpha
        return torch.linalg.solve_triangular(system, f, upper=False, unitriangular=True)


class SessaMLP(nn.Module):
    def __init__(self, config: SessaLMConfig):
        super().__init__()
        self.c_fc = Conv1D(2 * config.intermediate_size, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class SessaDecoderLayer(nn.Module):
    def __init__(self, config: SessaLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = SessaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = SessaMixer(config, layer_idx)
        self.post_attention_layernorm = SessaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SessaMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.mixer(hidden_states, position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class SessaPreTrainedModel(nn.Module):
    config_class = SessaLMConfig

    def __init__(self, config):
        super().__init__()
        self.config = config

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.2)
            if module.bias is not None:
                module.bias.data.normal_(std=0.1)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=1.0)


class SessaModel(SessaPreTrainedModel):
    def __init__(self, config: SessaLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SessaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SessaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SessaRotaryEmbedding(config)

    def _causal_mask(self, attention_mask, inputs_embeds):
        """The additive (B, 1, T, T) mask: finfo.min above the diagonal and at masked key positions."""
        dtype, device = inputs_embeds.dtype, inputs_embeds.device
        bsz, seq_len = inputs_embeds.shape[:2]
        min_dtype = torch.finfo(dtype).min
        causal = torch.full((seq_len, seq_len), fill_value=min_dtype, dtype=dtype, device=device)
        causal = torch.triu(causal, diagonal=1)
        causal = causal[None, None, :, :].expand(bsz, 1, -1, -1)
        if attention_mask is not None:
            padding = (1.0 - attention_mask[:, None, None, :].to(dtype=dtype)) * min_dtype
            causal = (causal + padding).clamp(min=min_dtype)
        return causal

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False, **kwargs):
        inputs_embeds = self.embed_tokens(input_ids)
        inputs_embeds = inputs_embeds.to(device=input_ids.device, dtype=self.embed_tokens.weight.dtype)
        seq_len = input_ids.shape[1]
        # positions past max_position_embeddings reuse the last ones (size arithmetic with min/max, %, //)
        past = max(0, seq_len - self.config.max_position_embeddings)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)
        causal_mask = self._causal_mask(attention_mask, inputs_embeds)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        n_layers = min(len(self.layers), self.config.num_hidden_layers)
        for decoder_layer in self.layers[:n_layers]:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask,
                                          position_embeddings=position_embeddings, **kwargs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states


class SessaForCausalLM(SessaPreTrainedModel):
    def __init__(self, config: SessaLMConfig):
        super().__init__(config)
        self.model = SessaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def loss_function(self, logits, labels, vocab_size, ignore_index=-100):
        logits = logits.float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        shift_logits = shift_logits.view(-1, vocab_size)
        shift_labels = shift_labels.view(-1).to(shift_logits.device)
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=True, output_hidden_states=False,
                **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        hidden_states, all_hidden = self.model(input_ids, attention_mask=attention_mask,
                                               output_hidden_states=output_hidden_states, **kwargs)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size)
        if not return_dict:
            output = (logits,) + ((all_hidden,) if all_hidden is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SessaCausalLMOutput(loss=loss, logits=logits, hidden_states=all_hidden)
