"""Small modules of the aten ops with no IR op (they stay ``fallback`` nodes, run by torch in compile) that Hugging
Face-style model code uses and both exports lower (semantics/fallback_forms.py). Each takes inputs(B, T)."""
from __future__ import annotations

import torch
import torch.nn as nn


def float_input(B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100 * T + B)
    return (torch.randn(B, T, 8, generator=g) * 1.5,)


class Scans(nn.Module):
    """cumsum of floats, of a bool mask (int64, torch's promotion), with dtype=; cumprod of floats and ints."""

    def forward(self, x):
        count = (x > 0).cumsum(1)                               # bool -> int64
        widths = (x > 0).int().cumprod(-1)                      # int32 -> int64
        return (x.cumsum(-1), count, torch.cumsum(x, 1, dtype=torch.float64), (1 + 0.1 * x).cumprod(1), widths,
                count * 2 - 1)


class Gathers(nn.Module):
    """gather / take_along_dim with indices computed in the graph (argmax, a modulo), index_select by a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cols", torch.tensor([0, 2, 3, 7]))

    def forward(self, x):
        lp = torch.log_softmax(x, -1)
        idx = x.argsort(-1)[..., :3]                            # [B, T, 3] int64
        row = x.argmax(1, keepdim=True)                         # [B, 1, 8]: gather along T
        return (torch.gather(lp, -1, idx), torch.take_along_dim(x, row, dim=1), torch.index_select(x, -1, self.cols),
                torch.take_along_dim(lp, idx[:, :1], dim=-1), x.index_select(1, torch.zeros(1, dtype=torch.long)))


class ArgReductions(nn.Module):
    """argmax / argmin over one dim (kept or not) and over every element; any / all; prod."""

    def forward(self, x):
        pos = x > 0
        return (x.argmax(-1), x.argmin(1, keepdim=True), x.argmax(), pos.any(-1), pos.all(1, keepdim=True),
                pos.any(), (x.abs() > 0.1).all(), (1 + 0.1 * x).prod(-1), x.prod(1, keepdim=True), pos.long().prod(-1))


class TopkSort(nn.Module):
    """topk along the width and along T, sort ascending / descending (values and indices)."""

    def forward(self, x):
        v, i = x.topk(3, dim=-1)
        v2, i2 = x.topk(2, dim=1, largest=False)
        s, j = x.sort(dim=-1, descending=True)
        s2, j2 = torch.sort(x, dim=1)
        return v, i, v2, i2, s, j, s2, j2


class Elementwise(nn.Module):
    """atan2 (every quadrant), remainder / fmod by a scalar and by a tensor (floats and ints), nan_to_num."""

    def forward(self, x):
        y = x.flip(-1)
        xi = (x * 4).long()
        inf_nan = torch.log(x) / x.sign()                     # NaN below 0, -inf at 0
        return (torch.atan2(x, y), torch.remainder(x, 0.7), torch.remainder(x, y), torch.fmod(x, -0.7),
                torch.fmod(x, y), torch.remainder(xi, 3), torch.remainder(xi, -3), torch.fmod(xi, 3),
                torch.nan_to_num(inf_nan), torch.nan_to_num(inf_nan / x, nan=1.0, posinf=9.0, neginf=-9.0))


class MaxMinPredicates(nn.Module):
    """max / min over a dim (values and indices), isnan / isinf / isfinite, logical_xor, trunc / frac,
    count_nonzero, one_hot of a greedy token."""

    def forward(self, x):
        v, i = x.max(-1)
        v2, i2 = torch.min(x, 1, keepdim=True)
        odd = torch.log(x) / x.sign()                       # NaN below 0, -inf at 0
        xi = (x * 3).long()
        return (v, i, v2, i2, torch.isnan(odd), torch.isinf(odd), torch.isfinite(odd), torch.isinf(xi),
                torch.logical_xor(x > 0, xi), torch.trunc(x * 2), torch.frac(x * 2), torch.count_nonzero(xi, dim=-1),
                torch.count_nonzero(xi), torch.nn.functional.one_hot(x.argmax(-1), 8))


class Divisions(nn.Module):
    """floor division (x // y, floor_divide, div(rounding_mode='floor')) and truncating division of floats and
    integers, by a scalar and by a tensor, both signs."""

    def forward(self, x):
        y = x.flip(-1) * 0.5
        xi = (x * 4).long()
        yi = torch.where(xi.flip(-1) == 0, 3, xi.flip(-1))
        return (x // y, torch.floor_divide(x, 0.7), torch.div(x, y, rounding_mode="floor"),
                torch.div(x, -0.3, rounding_mode="trunc"), torch.div(x, y, rounding_mode="trunc"), xi // 3, xi // -3,
                xi // yi, torch.div(xi, yi, rounding_mode="trunc"), torch.div(xi, -3, rounding_mode="trunc"),
                xi % x.shape[1], torch.div(xi, x.shape[1], rounding_mode="floor"))   # by a size: symbolic T


class ScatterRoll(nn.Module):
    """scatter of a value and of a src (one-hot of the greedy token by scatter), scatter_add, roll along T (a
    symbolic size), along the width, by two dims and over every element."""

    def forward(self, x):
        top = x.topk(2, dim=-1).indices                         # [B, T, 2]
        hot = torch.zeros_like(x).scatter(-1, top, 1.0)
        src = torch.zeros_like(x).scatter(-1, top, x * 2)        # src larger than the index: its [.., :2]
        acc = torch.zeros_like(x[..., :3]).scatter_add(-1, top % 3, x[..., :2])
        return (hot, src, acc, x.roll(1, 1), x.roll(-3, -1), torch.roll(x, (2, 9), (1, 2)), x.roll(5),
                x.roll(x.shape[1] + 1, 1))


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """T5's relative-position buckets (bidirectional), as transformers writes them."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    relative_position = torch.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / torch.log(torch.tensor(max_distance / max_exact))
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))   # aten.min.other: the IR's minimum
    return buckets + torch.where(is_small, relative_position, large)


class BucketsAndMembership(nn.Module):
    """T5's relative-position buckets over T x T positions, bucketize against a boundary buffer (left and right),
    isin against a list of token ids (and inverted)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("edges", torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0]))
        self.register_buffer("special", torch.tensor([0, 3, 7]))

    def forward(self, x):
        T = x.shape[1]
        pos = torch.arange(T, dtype=torch.long)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])
        ids = x.argmax(-1)
        return (buckets, torch.bucketize(x, self.edges), torch.bucketize(x.round(), self.edges, right=True),
                torch.isin(ids, self.special), torch.isin(ids, self.special, invert=True),
                torch.max(x, x.flip(1)))


class HFPositionsAndLabelLogProbs(nn.Module):
    """What Hugging Face model code does around a decoder: position ids from the attention mask (cumsum, a
    masked_fill of the padding), the logits' greedy token (argmax) and the log-prob of the labels (gather)."""

    def __init__(self, vocab: int = 11, d: int = 8, max_pos: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = nn.Parameter(torch.randn(vocab, d, generator=g) * 0.5)
        self.pos = nn.Parameter(torch.randn(max_pos, d, generator=g) * 0.5)
        self.head = nn.Parameter(torch.randn(vocab, d, generator=g) * 0.5)

    def forward(self, input_ids, attention_mask, labels):
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        h = torch.nn.functional.embedding(input_ids, self.tok) + torch.nn.functional.embedding(position_ids, self.pos)
        logits = torch.tanh(h) @ self.head.T
        logp = torch.log_softmax(logits, dim=-1)
        token_logp = torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)
        seq_logp = (token_logp * attention_mask).sum(-1)
        return position_ids, logits.argmax(-1), token_logp, seq_logp


def hf_inputs(B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100 * T + B)
    ids = torch.randint(0, 11, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : T // 2] = 0                  # left padding on row 0
    if B > 1:
        mask[1, T - 2:] = 0                # right padding on row 1
    labels = torch.randint(0, 11, (B, T), generator=g)
    return ids, mask, labels


# (module class, inputs(B, T))
class RunningExtremes(nn.Module):
    """cummax / cummin (values and indices) and logcumsumexp along T, along the last dim and along B; a running
    max of int64 ids; a logcumsumexp of log-probabilities (a prefix log-likelihood)."""

    def forward(self, x):
        v, i = torch.cummax(x, dim=1)
        w, j = x.cummin(-1)
        ids = (x * 3).long()
        return (v, i, w, j, torch.cummax(x, 0).indices, torch.logcumsumexp(x, 1), torch.logcumsumexp(x, dim=-1),
                torch.logcumsumexp(x, 0), ids.cummax(1).values, ids.cummin(1).indices,
                torch.logcumsumexp(torch.log_softmax(x, -1), 1))


LOWERED = [(RunningExtremes, float_input), (Scans, float_input), (Gathers, float_input), (ArgReductions, float_input), (TopkSort, float_input),
           (Elementwise, float_input), (MaxMinPredicates, float_input), (Divisions, float_input),
           (ScatterRoll, float_input), (BucketsAndMembership, float_input),
           (HFPositionsAndLabelLogProbs, hf_inputs)]
