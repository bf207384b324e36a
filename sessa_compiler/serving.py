"""Serving: ``init_cache`` / ``prefill`` / ``decode_step`` / ``generate`` derived from the traced forward.

The step is derived from the recognised forward IR ("incrementalisation") rather than traced from the
module's own ``decode_step``: those keep the position as a Python int, and modules written by others keep
caches in layouts of their own. Every op of the forward graph is either

- *position-wise* along the sequence axis: it runs unchanged on the new positions only, or
- *sequence-mixing*: ``attention``, ``feedback``, ``scan``, ``causal_conv1d`` and ``rope``. Each of these
  gets an incremental form that reads and appends to explicit state in the cache: rotated keys and
  values (attention), feedback keys k_b and solved states s (feedback), the recurrent state h (scan), the
  last K-1 inputs (causal_conv1d), the position (rope).

A few ops can never be incrementalised (``tri_solve`` with explicit T x T weights, non-causal attention,
a general ``conv1d`` over time); a graph holding one has no serving methods (UnsupportedError naming the
op). Reads of a table by absolute position (``table[:T]``, ``arange(T)``) read the step's own positions
(``position_reads``). Every other op is assumed position-wise, and that assumption is *checked numerically* before the
first step runs: prefill of 3 positions, one decode step, then a prefill of 2 more on the non-empty cache
must equal the full forward on the same 6 positions to the spec's tolerance. A module whose forward
depends on absolute position in a way the IR does not say (a reduction over time, positions computed by
``arange(T)`` and not folded into RoPE) fails that check with an UnsupportedError instead of decoding
wrongly.

Attention with a key-padding mask (an ``attention_mask`` input) caches the mask of every position too; the mask
is not the feedback's (the recognised feedback op has none), so padded positions are mixed there as the module
mixes them. Rows with no visible key are served where they stay out of later rows (docs/serving.md).

The cache is a dict the compiler owns: ``{"t": int, "max_len": int | None, <state name>: tensor, ...}``,
one for the whole module (a Decoder's original keeps a list of per-layer dicts). State tensors are
preallocated to ``max_len`` positions along dim 1 and written in place; with ``max_len=None`` they grow by
doubling. Writing past ``max_len`` raises CacheOverflowError before anything is written.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F

from .backends.base import CompileContext
from .ir.dtypes import compute_dtype
from .semantics import FACTORIES, SEMANTICS, bind_symbols, resolve
from .semantics.core import key_keep
from .ir.dtypes import to_torch
from .errors import InputError, IRError, SessaCompilerError, TraceError, UnsupportedError
from .frontend.trace import other_integer_dtypes
from .ir.graph import Graph, Value
from .ir.ops import VIEWS
from .tolerance import TOLERANCE, relative_error

SERVING_METHODS = ("init_cache", "prefill", "decode_step", "generate")
STATEFUL = ("attention", "feedback", "scan", "causal_conv1d", "rope")
CHECK_LEN, CHECK_PREFILL = 6, 3


class CacheOverflowError(InputError):
    """A prefill or decode step that would write past the cache's capacity (``max_len``)."""


# -- incremental forms of the sequence-mixing ops --------------------------------------------------------------
def _rotate_at(x: torch.Tensor, inv_freq: torch.Tensor, t0: int) -> torch.Tensor:
    """Interleaved RoPE of x [B, n, H, d] at positions t0..t0+n-1, left in the compute dtype."""
    cd = compute_dtype(x.dtype)
    pos = torch.arange(t0, t0 + x.shape[1], device=x.device, dtype=cd)
    angles = pos[:, None] * inv_freq.to(cd)[None, :]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    xe, xo = x[..., 0::2].to(cd), x[..., 1::2].to(cd)
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


def _rotation_pos(inv_freq: torch.Tensor, pos: torch.Tensor, cd) -> torch.Tensor:
    """_rotation_at for the position held by ``pos`` (int32 [1] on the device): no host value in the ops."""
    angles = pos.to(cd) * inv_freq.to(cd)
    return torch.complex(angles.cos(), angles.sin())


def _rotation_at(inv_freq: torch.Tensor, t0: int, cd) -> torch.Tensor:
    """cos + i sin of the angles t0 * inv_freq (complex, [d/2]): one position's RoPE as a complex product."""
    angles = inv_freq.to(cd) * t0
    return torch.complex(angles.cos(), angles.sin())


def _rotate_one(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE of x [B, 1, H, d] (compute dtype) by ``rot`` (_rotation_at): pairs (x0, x1) as complex
    numbers times cos + i sin, the same products as _rotate_at in a few torch calls."""
    xc = torch.view_as_complex(x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2)))
    return torch.view_as_real(xc * rot).flatten(-2)


# Flash attention over a cache on CPU (torch's fused kernel: parallel over batch x heads, online softmax); None
# where this torch has no such op.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _visible(t0: int, n: int, device, strict: bool) -> torch.Tensor:
    """[n, t0+n] bool: key j is visible to new row i (global position t0+i): j <= t0+i, or j < t0+i."""
    rows = torch.arange(t0, t0 + n, device=device)[:, None]
    cols = torch.arange(t0 + n, device=device)[None, :]
    return cols < rows if strict else cols <= rows


def step_attention(state: dict, t0: int, q, k, v, inv_freq=None, mask=None, *, scale, causal, rope=False,
                   key_padding=False, empty_rows="mean", empty_grad=True, kernels=None, empty_rows_reach=None):
    """Keys and values are cached [B, Hkv, L, d] (head-major), so each head reads contiguous rows. ``kernels``:
    the TVM decode kernels (backends/tvm/decode.py), used for one-position steps on CPU tensors.

    With ``key_padding`` the new positions' key-padding mask ``mask`` [B, n] is cached too (state["mask"] [B, L],
    bool), and key j is visible to new row i when j <= t0 + i and its cached mask is set
    (semantics.core.attention_ref). A row with no visible key takes, with empty_rows="mean", the mean of v over
    every key cached so far (t0 + n: the module's meaning on the sequence up to this chunk's end), with "nan" NaN.
    ``empty_rows_reach``: why such a row cannot be served (an op that carries it into later rows), or None."""
    cd = compute_dtype(q.dtype)
    B, n, H, d = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    if key_padding:
        return _step_masked_attention(state, t0, q, k, v, inv_freq, mask, scale=scale, rope=rope,
                                      empty_rows=empty_rows, reach=empty_rows_reach, kernels=kernels)
    if (n == 1 and kernels is not None and cd == torch.float32 and q.device.type == "cpu"
            and kernels.supports_attention(state["k"], state["v"])):   # split-K over the cache, written in place
        out = kernels.attention(q[:, 0], k[:, 0], v[:, 0], inv_freq if rope else None, state["k"], state["v"], t0,
                                scale, rope)
        return out[:, None].to(v.dtype)
    pos = state.get("_pos")
    if pos is not None and n == 1 and _use_triton(q) and cd == torch.float32:
        # the position from the device (cache["_pos"]): every op and launch is the same at every position. RoPE,
        # the cache writes and the attention in three launches
        out = _triton_decode().attention_decode_step(q[:, 0], k[:, 0], v[:, 0], inv_freq if rope else None,
                                                     state["k"], state["v"], pos, scale, out_dtype=v.dtype)
        return out[:, None]
    one_cpu = n == 1 and q.device.type == "cpu" and cd in (torch.float32, torch.float64)
    if rope and one_cpu:
        rot = _rotation_at(inv_freq, t0, cd)
        q, k = _rotate_one(q.to(cd), rot), _rotate_one(k.to(cd), rot)
    elif rope:
        q, k = _rotate_at(q, inv_freq, t0), _rotate_at(k, inv_freq, t0)
    K, V = state["k"], state["v"]
    K[:, :, t0:t0 + n] = k.transpose(1, 2).to(K.dtype)
    V[:, :, t0:t0 + n] = v.transpose(1, 2).to(V.dtype)
    if n == 1 and _use_triton(q) and cd == torch.float32:   # split-K over the cache
        out = _triton_decode().attention_decode(q[:, 0].to(cd), K, V, t0 + 1, scale)
        return out[:, None].to(v.dtype)
    if one_cpu and _FLASH_CPU is not None and B * Hkv >= torch.get_num_threads():
        # one new row sees every cached position (no mask), so a kv head's whole query group is g query rows; the
        # op runs one task per batch row and kv head, so fewer of those than threads stay on the matmul path
        qh = q.to(cd).reshape(B, Hkv, g, d)
        out = _FLASH_CPU(qh, K[:, :, :t0 + 1].to(cd), V[:, :, :t0 + 1].to(cd), 0.0, False, scale=scale)[0]
        return out.reshape(B, 1, H, V.shape[-1]).to(v.dtype)
    keys, vals = K[:, :, :t0 + n].to(cd), V[:, :, :t0 + n].to(cd)
    # rows (head-in-group, new position) against the group's keys
    qh = q.to(cd).reshape(B, n, Hkv, g, d).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * n, d)
    logits = (qh @ keys.transpose(-1, -2)) * scale                    # [B, Hkv, g*n, t0+n]
    if n > 1:
        logits = logits.view(B, Hkv, g, n, t0 + n).masked_fill(~_visible(t0, n, q.device, strict=False), -math.inf)
        logits = logits.view(B, Hkv, g * n, t0 + n)
    out = torch.softmax(logits, dim=-1) @ vals                         # [B, Hkv, g*n, dv]
    dv = vals.shape[-1]
    return out.view(B, Hkv, g, n, dv).permute(0, 3, 1, 2, 4).reshape(B, n, H, dv).to(v.dtype)


def empty_row_error(reach: str) -> UnsupportedError:
    return UnsupportedError(
        "serving: the attention_mask leaves a row with no visible key (a prompt padded on the left, or a row padded "
        "from its first position): the module gives such a row the mean of v over every position of the sequence "
        "(a softmax over a row of equal finite fills), so its value depends on the tokens after it, and " + reach +
        " carries it into later rows: the module's outputs at real tokens then depend on later tokens, and no "
        "prefill + decode_step equals the module on the whole sequence. Pad such prompts on the right (a padded "
        "position after a real one is served), or serve each prompt in its own batch row without padding")


def _empty_rows(keep_cached: torch.Tensor, keep_new: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether a new row sees no unpadded key (no keep among the cached positions nor at new position 0)."""
    return ~(keep_cached.any(dim=1) | keep_new[:, 0])


def _step_masked_attention(state: dict, t0: int, q, k, v, inv_freq, mask, *, scale, rope, empty_rows, reach,
                           kernels=None):
    """step_attention with a key-padding mask. One position runs the split-K kernel with the cached mask: on CUDA
    the Triton decode kernel, on CPU the TVM one (``kernels``, float32); everything else runs through torch."""
    cd = compute_dtype(q.dtype)
    B, n, H, d = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    if mask is None:
        raise InputError("serving: op 'attention' (key-padding mask): expected the mask of the new positions, "
                         "got none")
    keep_new = key_keep(mask).to(q.device)
    K, V, M = state["k"], state["v"], state["mask"]
    pos = state.get("_pos")
    triton_ok = n == 1 and _use_triton(q) and cd == torch.float32
    if pos is not None and triton_ok:   # the position from the device, as in step_attention (the mask written too)
        out = _triton_decode().attention_decode_step(q[:, 0], k[:, 0], v[:, 0], inv_freq if rope else None, K, V,
                                                     pos, scale, keep=M, keep_new=keep_new[:, 0],
                                                     empty_nan=empty_rows == "nan", out_dtype=v.dtype)
        return out[:, None]
    if reach is not None and bool(_empty_rows(M[:, :t0], keep_new).any()):
        raise empty_row_error(reach)
    if (n == 1 and kernels is not None and cd == torch.float32 and q.device.type == "cpu"
            and kernels.supports_attention(K, V) and kernels.supports_mask(M)):   # TVM split-K, in place
        M[:, t0] = keep_new[:, 0]
        out = kernels.attention(q[:, 0], k[:, 0], v[:, 0], inv_freq if rope else None, K, V, t0, scale, rope, keep=M)
        if empty_rows == "nan":   # the kernel averages a row with no real key; the op gives NaN there
            out[~M[:, :t0 + 1].any(dim=1)] = math.nan
        return out[:, None].to(v.dtype)
    if rope:
        q, k = _rotate_at(q, inv_freq, t0), _rotate_at(k, inv_freq, t0)
    K[:, :, t0:t0 + n] = k.transpose(1, 2).to(K.dtype)
    V[:, :, t0:t0 + n] = v.transpose(1, 2).to(V.dtype)
    M[:, t0:t0 + n] = keep_new
    if triton_ok:   # split-K over the cache; a row with no visible key: every logit -1e30, the mean of v (or NaN)
        out = _triton_decode().attention_decode(q[:, 0].to(cd), K, V, t0 + 1, scale, keep=M,
                                                empty_nan=empty_rows == "nan")
        return out[:, None].to(v.dtype)
    keys, vals = K[:, :, :t0 + n].to(cd), V[:, :, :t0 + n].to(cd)
    qh = q.to(cd).reshape(B, n, Hkv, g, d).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * n, d)
    logits = (qh @ keys.transpose(-1, -2)) * scale                    # [B, Hkv, g*n, t0+n]
    keep = _visible(t0, n, q.device, strict=False)[None, None, None] & M[:, None, None, None, :t0 + n]
    # "mean": a finite fill, so a row with no visible key is uniform over all t0 + n keys (attention_ref)
    fill = -math.inf if empty_rows == "nan" else torch.finfo(cd).min
    logits = logits.view(B, Hkv, g, n, t0 + n).masked_fill(~keep, fill).view(B, Hkv, g * n, t0 + n)
    out = torch.softmax(logits, dim=-1) @ vals                         # [B, Hkv, g*n, dv]
    dv = vals.shape[-1]
    return out.view(B, Hkv, g, n, dv).permute(0, 3, 1, 2, 4).reshape(B, n, H, dv).to(v.dtype)


def step_feedback(state: dict, t0: int, f, q_b, k_b, gamma, *, scale, kernels=None):
    cd = compute_dtype(f.dtype)
    n = f.shape[1]
    KB, S = state["k_b"], state["s"]
    if (n == 1 and kernels is not None and cd == torch.float32 and f.device.type == "cpu"
            and kernels.supports_feedback(KB, S)):   # split-K over the cache, k_b and s written in place
        s = kernels.feedback(f[:, 0], q_b[:, 0], k_b[:, 0], gamma[:, 0], KB, S, t0, scale)
        return s[:, None].to(f.dtype)
    pos = state.get("_pos")
    if pos is not None and n == 1 and _use_triton(q_b) and cd == torch.float32:
        # the position from the device: the cache slots written and the positions read (t = 0 mixes nothing), the
        # key's write and s = f + gamma * mixed inside the two launches
        s = _triton_decode().feedback_decode_step(f[:, 0], q_b[:, 0], k_b[:, 0], gamma[:, 0], KB, S, pos, scale)
        return s[:, None]
    KB[:, t0:t0 + n] = k_b.to(KB.dtype)
    if n == 1:  # one new row: it sees exactly the cached positions, no mask and no solve
        s = f.to(cd)
        if t0 > 0 and _use_triton(q_b) and cd == torch.float32:
            mixed = _triton_decode().feedback_decode(q_b[:, 0], KB, S, t0, scale)          # split-K over the cache
            s = s + gamma.to(cd)[..., None] * mixed[:, None]
        elif t0 > 0 and f.device.type == "cpu":   # the same in fewer torch calls: gamma folded into the weights
            logits = torch.bmm(q_b.to(cd) * scale, KB[:, :t0].to(cd).transpose(1, 2))      # [B, 1, t0]
            weights = torch.softmax(logits, dim=-1) * gamma.to(cd)[..., None]
            s = torch.baddbmm(s, weights, S[:, :t0].to(cd))
        elif t0 > 0:
            logits = (q_b.to(cd) @ KB[:, :t0].to(cd).transpose(1, 2)) * scale             # [B, 1, t0]
            s = s + gamma.to(cd)[..., None] * (torch.softmax(logits, dim=-1) @ S[:, :t0].to(cd))
        S[:, t0:t0 + 1] = s.to(S.dtype)
        return s.to(f.dtype)
    keys = KB[:, :t0 + n].to(cd)
    logits = (q_b.to(cd) @ keys.transpose(1, 2)) * scale             # [B, n, t0+n]
    keep = _visible(t0, n, f.device, strict=True)
    logits = logits.masked_fill(~keep, -math.inf)
    if t0 == 0:  # global row 0 has no predecessor: a finite row, zeroed below (no NaN anywhere)
        logits[:, 0, 0] = 0.0
    alpha = torch.softmax(logits, dim=-1) * keep
    g = gamma.to(cd)[..., None]
    rhs = f.to(cd)
    if t0 > 0:
        rhs = rhs + g * (alpha[:, :, :t0] @ S[:, :t0].to(cd))
    if n > 1:
        system = torch.eye(n, dtype=cd, device=f.device) - g * alpha[:, :, t0:]
        s = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    else:
        s = rhs
    S[:, t0:t0 + n] = s.to(S.dtype)
    return s.to(f.dtype)


ONE_TORCH_THREAD_IN_KERNEL_STEPS = True

# Tests set this to run the Triton decode kernels on CPU tensors under Triton's interpreter.
TRITON_DECODE_ON_CPU = False


def device_position(cache: dict, device) -> torch.Tensor:
    """cache["_pos"]: the number of cached positions as an int32 [1] tensor on ``device``, which the Triton decode
    step reads (slot written, positions read, RoPE angle) instead of the host int cache["t"], so that its ops
    and launches are the same at every position (a CUDA graph can record one step and replay it). Kept equal
    to cache["t"]: the step advances it on the device; cache["_pos_t"] remembers the value it holds, and a
    cache whose "t" was changed otherwise (a prefill, a user) gets it rewritten here, before any step."""
    pos = cache.get("_pos")
    if not isinstance(pos, torch.Tensor) or pos.device != device:
        pos = cache["_pos"] = torch.zeros(1, dtype=torch.int32, device=device)
        cache["_pos_t"] = 0
    if cache.get("_pos_t") != cache["t"]:
        pos.fill_(int(cache["t"]))
        cache["_pos_t"] = int(cache["t"])
    return pos


def _use_triton(x: torch.Tensor) -> bool:
    return (x.is_cuda or TRITON_DECODE_ON_CPU) and _triton_decode() is not None


def _triton_decode():
    """backends/triton/decode.py when triton imports (CUDA tensors), else None."""
    try:
        from .backends.triton import decode
    except ImportError:
        return None
    return decode


def step_scan(state: dict, t0: int, u, delta, A, Bm, Cm, Dv):
    cd = compute_dtype(u.dtype)
    u_, dt, A_, B_, C_, D_ = (t.to(cd) for t in (u, delta, A, Bm, Cm, Dv))
    h = state["h"].to(cd)
    ys = []
    for i in range(u.shape[1]):
        h = torch.exp(dt[:, i, :, None] * A_) * h + (dt[:, i] * u_[:, i])[..., None] * B_[:, i, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_[:, i]) + D_ * u_[:, i])
    state["h"].copy_(h)
    return torch.stack(ys, dim=1).to(u.dtype)


def step_causal_conv1d(state: dict, t0: int, x, w, b=None):
    K = w.shape[1]
    past = state["x"]
    xx = torch.cat([past.to(x.dtype), x], dim=1)  # [B, K-1+n, C]
    y = F.conv1d(xx.transpose(1, 2), w[:, None, :], b, groups=w.shape[0]).transpose(1, 2)
    if K > 1:
        past.copy_(xx[:, xx.shape[1] - (K - 1):])
    return y


def step_rope(state: dict, t0: int, x, inv_freq):
    pos = state.get("_pos")
    if pos is not None and x.shape[1] == 1 and _use_triton(x):
        cd = compute_dtype(x.dtype)
        return _rotate_one(x.to(cd), _rotation_pos(inv_freq, pos, cd)).to(x.dtype)
    return _rotate_at(x, inv_freq, t0).to(x.dtype)


STEPS = {"attention": step_attention, "feedback": step_feedback, "scan": step_scan,
         "causal_conv1d": step_causal_conv1d, "rope": step_rope}


# -- reads by absolute position ----------------------------------------------------------------------------------
def step_position_slice(state: dict, t0: int, x, *, dim, start, end, step, name):
    """``x[start:end]`` along ``dim`` of a value that has no sequence dim (a table: Qwen's log-n scales, a
    position-embedding buffer ``wpe[:T]``), at the positions this step serves: ``x[start + t0:end + t0]``."""
    if end + t0 > x.shape[dim]:
        raise CacheOverflowError(f"serving: position {end + t0 - 1} is past the {x.shape[dim] - start} positions of "
                                 f"%{name}, which the forward reads by position (a slice of a table along its "
                                 "sequence dim): the module itself cannot run that long")
    return torch.ops.aten.slice.Tensor(x, dim, start + t0, end + t0, step)


def step_position_arange(state: dict, t0: int, *, start, end, step, dtype, device, name):
    """``arange(start, start + T)``: the positions themselves, offset to the ones this step serves."""
    return torch.arange(start + t0, end + t0, step, dtype=dtype, device=device)


POSITION_STEPS = {"slice": step_position_slice, "arange": step_position_arange}


def position_reads(graph: Graph) -> dict:
    """node -> what it reads by absolute position: a ``slice`` of a value without the sequence symbol T (a table,
    a buffer) whose extent is T (``start`` free of T, ``end = start + T``, step 1), and ``arange(start, start + T)``.
    On the full forward they give the rows of positions 0..T-1; a step serving positions t0..t0+n-1 must read those,
    not rows 0..n-1 (which the check before the first step cannot tell apart where the table's first rows are
    equal: a log-n scale that is 1 up to the training length)."""
    import sympy

    T = graph.inputs[0].type.shape[1] if graph.inputs and graph.inputs[0].type.rank >= 2 else None
    if not isinstance(T, sympy.Basic):
        return {}

    def has_t(e) -> bool:
        return isinstance(e, sympy.Basic) and T in e.free_symbols

    def extent_t(start, end, step) -> bool:
        return step == 1 and not has_t(start) and has_t(end) and sympy.simplify(end - start - T) == 0

    out = {}
    for node in graph.nodes:
        a = node.attrs
        if node.op == "slice" and isinstance(node.inputs[0], Value) \
                and not any(has_t(d) for d in node.inputs[0].type.shape) and extent_t(a["start"], a["end"], a["step"]):
            out[node] = "slice"
        elif node.op == "arange" and extent_t(a["start"], a["end"], a["step"]):
            out[node] = "arange"
    return out


# -- one-position decode steps as CUDA graphs -------------------------------------------------------------------
def decode_graphable(xs: list, cache: dict) -> bool:
    """Whether a decode step may be recorded: one position, CUDA tensors on the Triton decode path, no autograd,
    a cache of fixed capacity (max_len: no growth, so its tensors keep their storage), not inside a capture."""
    if not xs or not all(isinstance(x, torch.Tensor) and x.is_cuda and x.is_contiguous() for x in xs):
        return False
    if xs[0].dim() < 2 or xs[0].shape[1] != 1 or cache.get("max_len") is None or not _use_triton(xs[0]):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return False
    return not torch.cuda.is_current_stream_capturing()


class DecodeGraphs:
    """Record the one-position decode step into a CUDA graph on its second call with a signature (inputs'
    shapes and dtypes, the cache tensors' storage), replay it on later calls.

    Sound because that step's launches and ops do not depend on the position (it reads cache["_pos"] on the
    device; tests/test_triton_decode.py checks the plan at several positions). A replay copies the inputs into
    static buffers, replays (the recorded steps advance cache["_pos"] on the device), then advances the host's
    cache["t"]; the cache's capacity is checked on the host before, as an eager step does. Capturing records
    without running, so the host position is put back after the capture and the step runs by a first replay."""

    def __init__(self, prog, max_graphs: int = 8):
        import collections

        self.prog, self.max_graphs = prog, max_graphs
        self.recorded = collections.OrderedDict()
        self.captures = self.replays = 0

    def __call__(self, xs: list, cache: dict) -> list:
        if "t" not in cache or not decode_graphable(xs, cache):
            return self.prog.run(xs, cache)
        device_position(cache, xs[0].device)   # cache["_pos"] exists (part of the key); a "t" changed outside: set
        key = (tuple((tuple(x.shape), x.dtype, x.device) for x in xs),
               tuple((k, v.data_ptr(), tuple(v.shape), v.dtype) for k, v in sorted(cache.items())
                     if isinstance(v, torch.Tensor)))
        rec = self.recorded.get(key)
        if rec is None:
            rec = self.recorded[key] = {"calls": 0, "graph": None}
            while len(self.recorded) > self.max_graphs:
                self.recorded.popitem(last=False)
        self.recorded.move_to_end(key)
        rec["calls"] += 1
        if rec["calls"] == 1:
            return self.prog.run(xs, cache)   # compiles the kernels, makes cache["_pos"]
        self.prog._check_cache(cache, int(xs[0].shape[0]), 1, xs[0].device)   # overflow: raised before anything
        if rec["graph"] is None:
            self._record(rec, xs, cache)
        for static, x in zip(rec["inputs"], xs):
            static.copy_(x)
        rec["graph"].replay()
        self.replays += 1
        cache["t"] = cache["_pos_t"] = int(cache["t"]) + 1
        return [o.clone() for o in rec["outputs"]]

    def _record(self, rec: dict, xs: list, cache: dict) -> None:
        statics = [x.clone() for x in xs]
        t0 = int(cache["t"])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = self.prog.run(statics, cache)
        cache["t"] = cache["_pos_t"] = t0   # recorded, not run: nothing advanced
        rec.update(graph=graph, inputs=statics, outputs=list(outs))
        self.captures += 1


DECODE_CUDA_GRAPHS = True   # False: every decode step launches from Python

# True: a one-position step on the TVM decode kernels skips the per-step work whose answer cannot have changed:
# the cache's checks while its state tensors are the objects last checked (the capacity check always runs), the
# kernel resolution of each linear node (LinearSite, which also keeps its output buffers where no graph output can
# share them), the call-structure check of the traced forward while the call has the same structure, the pytree
# rebuild of a single-tensor output, a list comprehension per op to gather operands. False: every step does all of
# it (what the steps did before; benchmarks/decode_overhead.py alternates both in one process).
DECODE_FAST = True

# ops whose eager result never shares storage with an operand (torch allocates it)
FRESH_OPS = frozenset({"add", "sub", "mul", "div", "neg", "exp", "tanh", "sigmoid", "silu", "relu", "gelu",
                       "layer_norm", "linear"})


def _taker(operands: list):
    """How a plan entry gathers its operands from the step's values without a Python frame per op (with
    DECODE_FAST): its one Value, an operator.itemgetter of its Values, or None (a literal among them, or
    DECODE_FAST off: the list comprehension)."""
    if not DECODE_FAST or not operands or not all(isinstance(x, Value) for x in operands):
        return None
    return operands[0] if len(operands) == 1 else operator.itemgetter(*operands)


# -- the serving program ------------------------------------------------------------------------------------
class StateSpec:
    """One cache tensor: ``shape`` after the batch dim; ``seq`` is the position dim (its capacity is max_len),
    or None for a fixed-size state."""

    def __init__(self, key: str, shape: tuple, dtype: torch.dtype, seq: int | None, compute: bool = False,
                 fixed: bool = False):
        self.key, self.shape, self.dtype, self.seq, self.compute = key, shape, dtype, seq, compute
        self.fixed = fixed   # its dtype is not init_cache's dtype (a key-padding mask stays bool)

    def full_shape(self, batch: int, cap: int) -> tuple:
        if self.seq is None:
            return (batch,) + self.shape
        s = (batch,) + self.shape
        return s[:self.seq] + (cap,) + s[self.seq:]


def _static(node, i, what) -> tuple:
    t = node.inputs[i].type
    dims = t.shape[2:] if what == "seq" else t.shape
    if not all(isinstance(d, int) for d in dims):
        raise UnsupportedError(f"serving: op '{node.op}' (%{node.outputs[0].name}) has a symbolic {what} width "
                               f"{t}; caches need fixed widths")
    return tuple(dims)


class ServingProgram:
    """The incremental form of one traced forward graph: runs the new positions of a prefill or a decode
    step against a compiler-owned cache, op by op on the eager interpreter."""

    def __init__(self, graph: Graph):
        self.graph = g = graph
        self._check_structure()
        self.states: dict = {}  # node -> {role: StateSpec}
        for node in graph.nodes:
            if node.op in STATEFUL and node.op != "rope":
                self.states[node] = self._state_specs(node)
        self.checked = False
        self.position_reads = position_reads(graph)   # node -> "slice" | "arange": read at the step's positions
        # graph inputs that are a key-padding mask operand (a decode step given none gets ones: a real token)
        self.mask_inputs = sorted({g.inputs.index(n.inputs[4]) for n in graph.nodes
                                   if n.op == "attention" and n.attrs.get("key_padding", False)
                                   and n.inputs[4] in g.inputs})
        self.empty_rows_reach = self._empty_rows_reach()
        self.decode_kernels = None   # backends/tvm/decode.py DecodeKernels: one-position steps on CPU (tvm backend)
        self.decode_graphs = None    # DecodeGraphs: one-position Triton decode steps recorded into CUDA graphs
        self._plans: dict = {}
        self._bindings: dict = {}
        self._token = object()   # names this program in a cache's "_checked" memo (_checked_cache)
        self._state_specs_order = [spec for specs in self.states.values() for spec in specs.values()]
        self._state_order = [spec.key for spec in self._state_specs_order]

    # -- what can be served ------------------------------------------------------------------------------
    def _check_structure(self) -> None:
        g = self.graph
        if not g.inputs:
            raise UnsupportedError("serving: the traced forward has no tensor inputs")
        T = None
        for v in g.inputs + list(g.outputs):
            where = "input" if v in g.inputs else "output"
            if v.type.rank < 2 or isinstance(v.type.shape[1], int):
                raise UnsupportedError(f"serving: {where} %{v.name}: {v.type} has no symbolic sequence dim 1; "
                                       "serving needs every input and output laid out [B, T, ...]")
            if T is None:
                T = v.type.shape[1]
            elif v.type.shape[1] != T:
                raise UnsupportedError(f"serving: {where} %{v.name}: {v.type} has sequence dim {v.type.shape[1]}, "
                                       f"other inputs/outputs have {T}")
        for node in g.nodes:
            why = None
            if node.op == "tri_solve":
                why = "a triangular solve with explicit T x T weights has no incremental form"
            elif node.op == "attention" and not node.attrs["causal"]:
                why = "non-causal attention reads future positions"
            elif node.op == "conv1d":
                why = "a general conv1d over time may read future positions (only causal_conv1d is served)"
            if why:
                raise UnsupportedError(f"serving: op '{node.op}' (%{node.outputs[0].name}): {why}; this module "
                                       "has no compiled prefill/decode_step")

    def no_position_reads(self, what: str) -> None:
        """Refuse a step export of a graph that reads a table by absolute position (the exported steps take no
        position for it; the compiled prefill/decode_step do)."""
        if self.position_reads:
            node = next(iter(self.position_reads))
            raise UnsupportedError(f"{what}: op '{node.op}' (%{node.outputs[0].name}) reads by absolute position "
                                   f"({'a slice of a table along its sequence dim' if node.op == 'slice' else 'arange(T)'}"
                                   "), which the exported step cannot offset yet; the compiled module's prefill and "
                                   "decode_step serve it")

    def state_keys(self) -> set:
        return {spec.key for specs in self.states.values() for spec in specs.values()}

    @property
    def masked(self) -> bool:
        """Whether some attention of the graph has a key-padding mask (its cache keeps the mask)."""
        return any(n.op == "attention" and n.attrs.get("key_padding", False) for n in self.states)

    def _empty_rows_reach(self) -> dict:
        """attention node -> why its rows with no visible key cannot be served, for each key-padding attention with
        empty_rows="mean" whose output reaches other positions: such a row is the mean of v over the whole
        sequence (it depends on later tokens), harmless while it only flows position-wise or as a key or value
        that the same mask hides; an op mixing positions (feedback, scan, causal_conv1d, an attention reading it
        as unmasked keys or values) carries it into later rows."""
        consumers: dict = {}
        for node in self.graph.nodes:
            for i, x in enumerate(node.inputs):
                if isinstance(x, Value):
                    consumers.setdefault(x, []).append((node, i))

        def reach(att):
            todo, seen = list(att.outputs), set(att.outputs)
            while todo:
                for node, i in consumers.get(todo.pop(), []):
                    if node.op in ("feedback", "scan", "causal_conv1d", "conv1d", "tri_solve"):
                        return f"op '{node.op}' (%{node.outputs[0].name})"
                    if node.op == "attention" and i in (1, 2):
                        if node.attrs.get("key_padding", False) and node.inputs[4] is att.inputs[4]:
                            continue   # keys and values the same mask hides at these positions
                        return f"op 'attention' (%{node.outputs[0].name}), reading it as keys or values"
                    for o in node.outputs:
                        if o not in seen:
                            seen.add(o)
                            todo.append(o)
            return None

        out = {}
        for att in self.graph.nodes:
            if (att.op == "attention" and att.attrs.get("key_padding", False)
                    and att.attrs.get("empty_rows", "mean") == "mean"):
                why = reach(att)
                if why is not None:
                    out[att] = why
        return out

    def check_empty_rows(self, inputs: list, cache: dict) -> None:
        """Before anything is written: refuse new rows with no visible key where such a row reaches later rows
        (empty_rows_reach), for masks that are graph inputs (a derived mask is checked in the step)."""
        t0 = int(cache["t"])
        for att, why in self.empty_rows_reach.items():
            m = att.inputs[4]
            if m not in self.graph.inputs:
                continue
            keep_new = key_keep(inputs[self.graph.inputs.index(m)])
            cached = cache[self.states[att]["mask"].key][:, :t0].to(keep_new.device)
            if bool(_empty_rows(cached, keep_new).any()):
                raise empty_row_error(why)

    def _state_specs(self, node) -> dict:
        name = node.outputs[0].name
        if node.op == "attention":
            k, v = node.inputs[1].type, node.inputs[2].type
            (hkv, dk), (_, dv) = _static(node, 1, "seq"), _static(node, 2, "seq")
            specs = {"k": StateSpec(f"{name}.k", (hkv, dk), to_torch(k.dtype), 2),
                     "v": StateSpec(f"{name}.v", (hkv, dv), to_torch(v.dtype), 2)}
            if node.attrs.get("key_padding", False):   # the key-padding mask of every cached position
                specs["mask"] = StateSpec(f"{name}.mask", (), torch.bool, 1, fixed=True)
            return specs
        if node.op == "feedback":
            return {"k_b": StateSpec(f"{name}.k_b", _static(node, 2, "seq"), to_torch(node.inputs[2].type.dtype), 1),
                    "s": StateSpec(f"{name}.s", _static(node, 0, "seq"), to_torch(node.inputs[0].type.dtype), 1,
                                   compute=True)}
        if node.op == "scan":
            din, n = _static(node, 2, "param")
            return {"h": StateSpec(f"{name}.h", (din, n), to_torch(node.inputs[0].type.dtype), None, compute=True)}
        if node.op == "causal_conv1d":
            c, k = _static(node, 1, "param")
            return {"x": StateSpec(f"{name}.x", (k - 1, c), to_torch(node.inputs[0].type.dtype), None)}
        raise AssertionError(node.op)

    # -- caches --------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"init_cache: batch_size must be a positive int, got {batch_size!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0):
            raise InputError(f"init_cache: max_len must be None or an int >= 0, got {max_len!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"init_cache: dtype must be None or a floating torch.dtype, got {dtype!r}")
        params = [p for p in self.graph.params.values() if isinstance(p, torch.Tensor)]
        if device is None:
            device = params[0].device if params else torch.device("cpu")
        cache = {"t": 0, "max_len": max_len}
        cap = max_len if max_len is not None else 0
        for specs in self.states.values():
            for spec in specs.values():
                dt = spec.dtype if spec.fixed else (dtype or spec.dtype)
                if spec.compute:  # solved states and scan states feed every later step: solve precision
                    dt = compute_dtype(dt)
                cache[spec.key] = torch.zeros(spec.full_shape(batch_size, cap), dtype=dt, device=device)
        return cache

    def _check_cache(self, cache, batch: int, n: int, device=None) -> None:
        if not isinstance(cache, dict) or "t" not in cache or "max_len" not in cache:
            raise InputError(f"cache: expected the dict this compiled module's init_cache returns "
                             f"(keys 't', 'max_len' and state tensors), got {type(cache).__name__}"
                             + (f" with keys {sorted(map(str, cache))}" if isinstance(cache, dict) else ""))
        for specs in self.states.values():
            for spec in specs.values():
                x = cache.get(spec.key)
                if not isinstance(x, torch.Tensor):
                    raise InputError(f"cache: state {spec.key!r} is missing (expected a tensor; was the cache made by "
                                     "another module's init_cache?)")
                if x.shape[0] != batch:
                    raise InputError(f"cache: state {spec.key!r} has batch {x.shape[0]}, the input has batch {batch}")
                if device is not None and x.device != device:
                    raise InputError(f"cache: state {spec.key!r} is on {x.device}, the input on {device}; make the "
                                     "cache with init_cache(..., device=...) on the input's device")
                want = spec.full_shape(batch, x.shape[spec.seq] if spec.seq is not None else 0)
                if tuple(x.shape) != want:
                    raise InputError(f"cache: state {spec.key!r} has shape {tuple(x.shape)}, expected {want}")
        t, max_len = cache["t"], cache["max_len"]
        if max_len is not None and t + n > max_len:
            raise CacheOverflowError(f"cache: {n} new position(s) after {t} cached would need {t + n} positions, "
                                     f"but the cache holds max_len={max_len}; make it with a larger max_len")

    def _checked_cache(self, cache, batch: int, n: int, device) -> int:
        """_check_cache for a decode step, skipped where the cache's state tensors are the very objects that passed
        it last time for this program, batch and device (cache["_checked"]; the capacity check always runs). ->
        the positions every state tensor holds (a step within them needs no _reserve)."""
        memo = cache.get("_checked") if isinstance(cache, dict) else None
        if (memo is not None and memo[0] is self._token and memo[1] == batch and memo[2] == device
                and "t" in cache and "max_len" in cache):
            for k, (x, shape) in zip(self._state_order, memo[3]):
                if cache.get(k) is not x or x.shape != shape:
                    break
            else:
                max_len = cache["max_len"]
                if max_len is None or cache["t"] + n <= max_len:
                    return memo[4]
        self._check_cache(cache, batch, n, device)
        tensors = tuple(cache[k] for k in self._state_order)
        cap = min((int(x.shape[spec.seq]) for x, spec in zip(tensors, self._state_specs_order)
                   if spec.seq is not None), default=1 << 62)
        cache["_checked"] = (self._token, batch, device, tuple((x, x.shape) for x in tensors), cap)
        return cap

    def _reserve(self, cache: dict, need: int) -> None:
        """Grow caches made with max_len=None (doubling) so that ``need`` positions fit."""
        for specs in self.states.values():
            for spec in specs.values():
                if spec.seq is None:
                    continue
                x = cache[spec.key]
                have = x.shape[spec.seq]
                if have < need:
                    if cache["max_len"] is not None:
                        raise CacheOverflowError(f"cache: state {spec.key!r} holds {have} positions, "
                                                 f"{need} are needed (max_len={cache['max_len']})")
                    grown = x.new_zeros(spec.full_shape(x.shape[0], max(need, 2 * have)))
                    grown.narrow(spec.seq, 0, have).copy_(x)
                    cache[spec.key] = grown

    # -- running ------------------------------------------------------------------------------------------
    def _binding(self, inputs) -> dict:
        """bind_symbols (every input's rank, dtype and shape checked), memoised per input signature."""
        key = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in inputs)
        binding = self._bindings.get(key)
        if binding is None:
            binding = bind_symbols(self.graph, inputs)
            if len(self._bindings) < 64:
                self._bindings[key] = binding
        return binding

    def _plan(self, binding: dict, device) -> list:
        """The graph's nodes with symbolic attributes and literals resolved for one binding: per node
        (stateful, fn, operands, attrs, outputs, node, state specs, taker); operands are Values or resolved literals,
        the taker gathers them from the step's values (_taker)."""
        fast = DECODE_FAST and self.decode_kernels is not None
        key = (tuple(sorted(binding.items())), str(device), DECODE_FAST)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = []
        groups = self._linear_groups() if self.decode_kernels is not None else {}
        shared = self._may_share_outputs() if fast else set()
        for node in self.graph.nodes:
            if node in groups:   # linear layers of one input in one TVM launch, at the first one's place
                members = groups[node]
                if not members:
                    continue
                operands = [node.inputs[0]]
                for m in members:
                    operands += [m.inputs[1], m.inputs[2] if len(m.inputs) > 2 else None]
                own = not any(m.outputs[0] in shared for m in members)
                fn = (self.decode_kernels.site(SEMANTICS["linear"], fused=True, own_outputs=own) if fast
                      else functools.partial(self.decode_kernels.linears, SEMANTICS["linear"]))
                plan.append((False, fn, operands, {}, [m.outputs[0] for m in members], node, (), _taker(operands)))
                continue
            operands = [x if isinstance(x, Value) else resolve(x, binding) for x in node.inputs]
            if node.op in STEPS:
                specs = tuple((role, spec.key) for role, spec in self.states.get(node, {}).items())
                attrs = dict(node.attrs)
                if node.op in ("attention", "feedback") and self.decode_kernels is not None:
                    attrs["kernels"] = self.decode_kernels
                if node in self.empty_rows_reach:
                    attrs["empty_rows_reach"] = self.empty_rows_reach[node]
                plan.append((True, STEPS[node.op], operands, attrs, node.outputs, node, specs, _taker(operands)))
                continue
            fn = SEMANTICS.get(node.op)
            if fn is None:
                raise IRError(f"op '{node.op}' has no eager implementation")
            if node.op == "linear" and self.decode_kernels is not None:
                fn = (self.decode_kernels.site(fn, own_outputs=node.outputs[0] not in shared) if fast
                      else functools.partial(self.decode_kernels.linear, fn))
            attrs = resolve(node.attrs, binding)
            if node.op in FACTORIES or node.op == "fallback":
                attrs["device"] = device
            if node in self.position_reads:   # (its step takes the position: t0)
                plan.append((True, POSITION_STEPS[node.op], operands, {**attrs, "name": node.outputs[0].name},
                             node.outputs, node, (), _taker(operands)))
                continue
            plan.append((False, fn, operands, attrs, node.outputs, node, (), _taker(operands)))
        if len(self._plans) < 64:
            self._plans[key] = plan
        return plan

    def _may_share_outputs(self) -> set:
        """Values a graph output may share storage with: the outputs, and back from them through every op that
        may return its operand or a view of it (every op outside FRESH_OPS: views, reshapes, splits, casts, the
        stateful ops, which may return an operand, as the feedback at position 0 returns f). A linear site whose
        outputs are outside this set reuses its output buffers from step to step (LinearSite)."""
        shared = set(self.graph.outputs)
        for node in reversed(self.graph.nodes):
            if node.op not in FRESH_OPS and any(o in shared for o in node.outputs):
                shared.update(x for x in node.inputs if isinstance(x, Value))
        return shared

    def _linear_groups(self) -> dict:
        """Linear layers reading the same value, with parameter weights and biases (so all operands exist where
        the first one runs): first node -> the group's nodes (at most MAX_FUSED), every other member -> []."""
        from .backends.tvm.kernels.decode import MAX_FUSED

        params = set(self.graph.param_values.values())
        by_input: dict = {}
        for node in self.graph.nodes:
            if node.op == "linear" and all(x is None or x in params for x in node.inputs[1:]):
                by_input.setdefault(node.inputs[0], []).append(node)
        groups: dict = {}
        for nodes in by_input.values():
            for i in range(0, len(nodes), MAX_FUSED):
                chunk = nodes[i:i + MAX_FUSED]
                if len(chunk) > 1:
                    groups[chunk[0]] = chunk
                    groups.update({m: [] for m in chunk[1:]})
        return groups

    def run(self, inputs: list, cache: dict, params=None) -> list:
        """The outputs at the new positions (inputs [B, n, ...]) given ``cache`` (extended in place)."""
        g = self.graph
        params = g.params if params is None else params
        binding = self._binding(inputs)
        batch, n = int(inputs[0].shape[0]), int(inputs[0].shape[1])
        if n == 0:
            raise InputError("prefill/decode_step: the input has no positions (sequence length 0)")
        device = inputs[0].device
        if DECODE_FAST and n == 1 and self.decode_kernels is not None:
            cap = self._checked_cache(cache, batch, n, device)
        else:
            cap = None
            self._check_cache(cache, batch, n, device)
        t0 = int(cache["t"])
        if self.empty_rows_reach:
            self.check_empty_rows(inputs, cache)
        if cap is None or t0 + n > cap:
            self._reserve(cache, t0 + n)
        pos = device_position(cache, device) if n == 1 and _use_triton(inputs[0]) else None
        env: dict = dict(zip(g.inputs, inputs))
        for name, v in g.param_values.items():
            env[v] = params[name]
        node = None
        # A one-position step on the TVM decode kernels (its cache reads and linears run there) keeps torch's small
        # ops on this thread: exp, erf, tanh and gelu go through MKL's vector math even on a few hundred numbers, and
        # each such call wakes torch's OpenMP team (on a busy core: a scheduler time slice). The setting is
        # process-wide, so torch ops of other threads during the step run on one thread too. Prefill chunks keep
        # torch's threads: their attention over the cache runs through torch.
        threads = torch.get_num_threads() if (self.decode_kernels is not None and ONE_TORCH_THREAD_IN_KERNEL_STEPS
                                              and device.type == "cpu" and n == 1
                                              and batch <= self.decode_kernels.rows) else 1
        own = 0
        try:
            if threads > 1:
                torch.set_num_threads(1)
                own = self.decode_kernels.own_threads(threads)   # the kernels' parallel loops keep torch's count
            with torch.no_grad():
                for stateful, fn, operands, attrs, outputs, node, specs, take in self._plan(binding, device):
                    if take is None:
                        args = [env[x] if isinstance(x, Value) else x for x in operands]
                    elif take.__class__ is Value:
                        args = (env[take],)
                    else:
                        args = take(env)
                    if stateful:
                        state = {role: cache[key] for role, key in specs}
                        if pos is not None:
                            state["_pos"] = pos
                        out = fn(state, t0, *args, **attrs)
                    else:
                        out = fn(*args, **attrs)
                    if len(outputs) == 1:
                        env[outputs[0]] = out
                    else:
                        if len(out) != len(outputs):
                            raise IRError(f"op '{node.op}' produced {len(out)} outputs, "
                                          f"the node declares {len(outputs)}")
                        env.update(zip(outputs, out))
        except SessaCompilerError:
            raise
        except Exception as e:  # name the op that failed, keep the original as the cause
            outs = ", ".join("%" + v.name for v in node.outputs) if node is not None else "?"
            raise SessaCompilerError(f"serving: op '{node.op if node else '?'}' ({outs}) failed at position {t0}: "
                                     f"{type(e).__name__}: {e}") from e
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
                self.decode_kernels.own_threads(own)
        cache["t"] = t0 + n
        if pos is not None:   # advanced on the device, as a replayed graph does
            pos.add_(n)
            cache["_pos_t"] = t0 + n
        return [env[v] for v in g.outputs]

    # -- prefill through the forward kernels ------------------------------------------------------------------
    def state_sources(self) -> list:
        """The values a prefill from an empty cache needs from the forward besides its outputs (the cached
        ops' operands and the feedback's solved states); None when the forward cannot fill the cache (a scan:
        its final state is no value of the graph)."""
        if any(n.op == "scan" for n in self.states):
            return None
        out = []
        for node in self.states:
            if node.op == "attention":
                out += [x for x in node.inputs[1:5] if isinstance(x, Value)]
            elif node.op == "feedback":
                out += [node.inputs[2], node.outputs[0]]
            elif node.op == "causal_conv1d":
                out.append(node.inputs[0])
        seen, uniq = set(), []
        for v in out:
            if v not in seen:
                seen.add(v)
                uniq.append(v)
        return uniq

    def fill_from_forward(self, cache: dict, values: dict, n: int) -> None:
        """Write the states of positions 0..n-1 into an empty cache from the forward's values (Value -> tensor)."""
        self._reserve(cache, n)
        with torch.no_grad():
            for node, specs in self.states.items():
                if node.op == "attention":
                    k, v = values[node.inputs[1]], values[node.inputs[2]]
                    if node.attrs.get("rope"):
                        k = _rotate_at(k, values[node.inputs[3]], 0)
                    K, V = cache[specs["k"].key], cache[specs["v"].key]
                    K[:, :, :n] = k.transpose(1, 2).to(K.dtype)
                    V[:, :, :n] = v.transpose(1, 2).to(V.dtype)
                    if "mask" in specs:
                        cache[specs["mask"].key][:, :n] = key_keep(values[node.inputs[4]])
                elif node.op == "feedback":
                    cache[specs["k_b"].key][:, :n] = values[node.inputs[2]].to(cache[specs["k_b"].key].dtype)
                    cache[specs["s"].key][:, :n] = values[node.outputs[0]].to(cache[specs["s"].key].dtype)
                elif node.op == "causal_conv1d":
                    past = cache[specs["x"].key]
                    keep = past.shape[1]
                    if keep:
                        x = values[node.inputs[0]]
                        xx = torch.cat([past.new_zeros((x.shape[0], keep, x.shape[2])), x.to(past.dtype)], dim=1)
                        past.copy_(xx[:, xx.shape[1] - keep:])
        cache["t"] = n

    # -- the numerical check of the position-wise assumption ----------------------------------------------------
    def _token_range(self, i: int):
        """The rows of the embedding table graph input ``i`` indexes (through views and casts), or None."""
        users = self.graph.users()
        stack, seen = [self.graph.inputs[i]], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            for n in users.get(v, ()):
                if n.op == "embedding" and n.inputs[1] is v and isinstance(n.inputs[0].type.shape[0], int):
                    return n.inputs[0].type.shape[0]
                if n.op in VIEWS or n.op == "cast":
                    stack.extend(n.outputs)
        return None

    def check(self, example_inputs, params=None) -> None:
        """Prefill + decode + chunked prefill must equal the full forward (see the module docstring)."""
        from .semantics import run_graph

        if self.checked:
            return
        gen = torch.Generator().manual_seed(0)
        xs = []
        for i, x in enumerate(example_inputs):
            if i in self.mask_inputs:   # a key-padding mask: padded keys in the cache, none before a row's first key
                keep = torch.rand((x.shape[0], CHECK_LEN), generator=gen) < 0.6
                keep[:, 0] = True
                xs.append(keep.to(x.device, x.dtype))
                continue
            idx = torch.randint(0, x.shape[1], (CHECK_LEN,), generator=gen).to(x.device)
            y = x.index_select(1, idx)
            vocab = self._token_range(i) if not y.is_floating_point() and y.dtype != torch.bool else None
            if vocab is not None:
                # token ids: another token at every position (an example of one repeated token, the usual
                # zeros(B) step example, makes a position-mixing op look position-wise: a softmax or a mean over
                # equal rows is each row)
                y = torch.randint(0, vocab, tuple(y.shape), generator=gen).to(y.device, y.dtype)
            if y.is_floating_point():
                noise = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device, y.dtype)
                y = y + noise * (x.float().std().item() if x.numel() > 1 else 1.0)
            xs.append(y)
        params = self.graph.params if params is None else params
        # with the trainable parameters moved off their values: the check is made once, and must hold for the
        # weights training will give (a learned position table initialised to zeros reads as position-wise)
        pgen = torch.Generator().manual_seed(1)
        params = {n: _perturbed(t, pgen) for n, t in params.items()}
        chunks = ((0, CHECK_PREFILL), (CHECK_PREFILL, CHECK_PREFILL + 1), (CHECK_PREFILL + 1, CHECK_LEN))
        with torch.no_grad():
            full = run_graph(self.graph, xs, params)
            # a key-padding mask's rows with no visible key (empty_rows="mean") are the module's value on the
            # sequence so far: each chunk against the forward on the positions up to its end (for a causal graph,
            # the full forward's)
            prefix = {b: run_graph(self.graph, [x[:, :b] for x in xs], params) for _, b in chunks[:-1]} \
                if self.masked else {}
            cache = self.init_cache(int(xs[0].shape[0]), device=xs[0].device, max_len=CHECK_LEN)
            parts = []
            for a, b in chunks:
                parts.append(self.run([x[:, a:b] for x in xs], cache, params))
        for i, ref in enumerate(full):
            got = torch.cat([p[i] for p in parts], dim=1)
            if prefix:
                ref = torch.cat([(prefix[b][i] if b in prefix else ref)[:, a:b] for a, b in chunks], dim=1)
            err = relative_error(got, ref)
            tol = TOLERANCE.get(ref.dtype, 0.0)
            if not err <= tol:
                raise UnsupportedError(
                    f"serving: the incremental form of this graph differs from its full forward at output {i} "
                    f"(%{self.graph.outputs[i].name}): relative error {err:.3e} > {tol:.0e} (prefill {CHECK_PREFILL}, "
                    f"one decode step, prefill {CHECK_LEN - CHECK_PREFILL - 1} on {CHECK_LEN} positions). "
                    "Some op outside attention/feedback/scan/causal_conv1d/rope depends on absolute position or "
                    "mixes positions (a reduction over time, positions from arange(T) not folded into RoPE, or an "
                    "attention no recogniser took: explain() lists the candidates not recognised and why); this "
                    "module has no compiled prefill/decode_step")
        self.checked = True


def _perturbed(t, gen: torch.Generator):
    """A trainable floating parameter plus noise (10% of its mean magnitude, and at least 0.02 in scale); any
    other value as it is."""
    if not (isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()) or t.numel() == 0:
        return t
    with torch.no_grad():
        noise = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float32).to(t.device, t.dtype)
        return t.detach() + noise * (0.1 * t.detach().abs().float().mean().item() + 0.02)


# -- the compiled module's methods -----------------------------------------------------------------------------
def _state_keys(cache: dict) -> set:
    return {k for k, v in cache.items() if isinstance(v, torch.Tensor) and not k.startswith("_")}


def _one_at_a_time(method):
    """A serving method runs under its compiled module's lock, as a forward call does: one call at a time per
    compiled module (kernels' argument buffers, the decode plan's memos and a TVM VM are not re-entrant; calls
    from several threads crashed the process). Calls nest (generate -> prefill -> forward): the lock is an RLock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.compiled._lock:
            return method(self, *args, **kwargs)
    return locked


def _contiguous(example, kwargs: dict) -> tuple:
    """A serving call's tensors as a forward call to trace them (a strided example trips torch.export lowering)."""
    return tuple(x.contiguous() for x in example), {k: v.contiguous() for k, v in kwargs.items()}


class Serving:
    """The serving methods of one CompiledModule (bound to it; created on first use)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.programs: dict = {}  # id(graph) -> ServingProgram
        self.traced: dict = {}    # id(graph) -> the Traced it came from (its output structure)
        self.forward_runners: dict = {}  # id(graph) -> (backend runner of the forward with state outputs, extras)
        self._fits: dict = {}   # call structure -> (the Traced it was checked against, whether it fits)
        self._single: dict = {}  # id(Traced) -> (it, whether the module returns one tensor)

    @property
    def original(self):
        return self.compiled.original

    def _program(self, example=None, kwargs=None, cache=None, check: bool = True) -> ServingProgram:
        """The serving program of the traced graph for this call: the one ``cache`` was made for (cache["_graph"]),
        else the current trace when the call's structure (positional inputs, keyword names) fits it, else the
        trace of this call (traced as the compiled module's forward traces another signature)."""
        c = self.compiled
        kwargs = kwargs or {}
        prog = self.programs.get(cache.get("_graph")) if isinstance(cache, dict) else None
        if check and (prog is not None or c._traced is not None):
            # the module as it is now, as a forward call checks it: weights reassigned since the last call are
            # read; a changed attribute, hook, forward, train/eval mode or parameter type traces again
            graph = prog.graph if prog is not None else c._traced.graph
            why, params = c._state_for(graph)
            if why is None:
                graph.params.update(params)
                if prog is not None:
                    return prog
            elif example is None:
                raise InputError(f"compiled {type(self.original).__name__}: {why}; call it (or prefill) once to "
                                 "trace it again")
            else:
                c._prepare_call(*_contiguous(example, kwargs))
                example = None   # traced for this call's structure now
        if c._traced is None:
            if example is None:
                raise TraceError(f"compiled {type(self.original).__name__}: not traced yet; call it once, pass "
                                 "example_inputs to compile(), or call prefill first")
            c._trace(*_contiguous(example, kwargs))
        elif example is not None and (not self._fits_trace(example, kwargs) or other_integer_dtypes(
                c._traced.graph, c._traced.tensor_inputs(tuple(example), kwargs))):
            c._prepare_call(*_contiguous(example, kwargs))
        graph = c._traced.graph
        prog = self.programs.get(id(graph))
        if prog is None:
            self.traced[id(graph)] = c._traced
            prog = self.programs[id(graph)] = ServingProgram(graph)
            backend = getattr(c._backend, "current", c._backend)   # "auto": the backend it resolved to
            if backend.name == "tvm" and backend.decode_kernels:   # opt-in: TVM kernels for CPU decode steps
                from .backends.tvm.decode import DecodeKernels

                prog.decode_kernels = DecodeKernels(backend.target)
        if not prog.checked:
            ctx = c._contexts.get(id(graph))
            prog.check((ctx.example_inputs if ctx is not None else None) or example, graph.params)
        return prog

    def _single_tensor(self, traced) -> bool:
        """Whether the traced module returns one tensor (its unflatten of [y] is y), remembered per Traced."""
        hit = self._single.get(id(traced))
        if hit is None or hit[0] is not traced:
            hit = self._single[id(traced)] = (traced, not traced.none_outputs and not traced.constant_outputs
                                              and traced.out_spec is not None
                                              and traced.out_spec.is_leaf())
        return hit[1]

    def _fits_trace(self, example, kwargs) -> bool:
        """Whether the call (tensor positionals and tensor keywords, as _inputs and _keywords leave them) fits the
        current trace: call_mismatch (a pytree flatten of the call) once per trace, number of positionals and
        keyword names, remembered with DECODE_FAST (only the structure can differ between such calls)."""
        traced = self.compiled._traced
        key = (len(example), tuple(sorted(kwargs)))
        if DECODE_FAST and all(isinstance(v, torch.Tensor) for v in kwargs.values()):
            hit = self._fits.get(key)
            if hit is not None and hit[0] is traced:
                return hit[1]
        fits = traced.call_mismatch(tuple(example), kwargs) is None
        self._fits[key] = (traced, fits)
        return fits

    @_one_at_a_time
    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: int | None = None) -> dict:
        if self.compiled._traced is None:
            # allocated at the first prefill, when the graph (and so the state shapes) are known
            return {"t": 0, "max_len": max_len, "_pending": (batch_size, device, dtype)}
        # the current trace's state layout, where the module still fits that trace; else (parameters converted
        # by .double() since, an attribute changed) or where the last forward call was not a servable one (a
        # loss from labels=...), allocated at the first prefill, which traces the call it is given
        pending = {"t": 0, "max_len": max_len, "_pending": (batch_size, device, dtype)}
        if self.compiled._state_for(self.compiled._traced.graph)[0] is not None:
            return pending
        try:
            prog = self._program(check=False)
        except UnsupportedError:
            return pending
        return prog.init_cache(batch_size, device=device, dtype=dtype, max_len=max_len)

    def _materialise(self, cache, prog: ServingProgram) -> dict:
        if isinstance(cache, dict) and "_pending" in cache:
            batch, device, dtype = cache.pop("_pending")
            cache.update(prog.init_cache(batch, device=device, dtype=dtype, max_len=cache["max_len"]))
        elif isinstance(cache, dict) and cache.get("t") == 0 and _state_keys(cache) != prog.state_keys() and any(
                _state_keys(cache) == other.state_keys() for other in self.programs.values()):
            # an empty cache made for another trace of the module (init_cache before a prefill with an
            # attention_mask, or the other way round: the masked graph caches the mask too): made again for this one
            tensors = [v for v in cache.values() if isinstance(v, torch.Tensor)]
            if tensors:
                low = [v.dtype for k, v in cache.items() if k.endswith((".k", ".k_b")) and isinstance(v, torch.Tensor)]
                fresh = prog.init_cache(int(tensors[0].shape[0]), device=tensors[0].device,
                                        dtype=low[0] if low else None, max_len=cache.get("max_len"))
                cache.clear()
                cache.update(fresh)
        if isinstance(cache, dict) and prog.masked:   # later steps find this graph (and its mask input) from it
            cache["_graph"] = id(prog.graph)
        return cache

    def _decoders_own(self, methods) -> list:
        """Which of ``methods`` a Decoder subclass defines itself (the original is a Decoder; else [])."""
        from .models.decoder import Decoder

        if not isinstance(self.original, Decoder):
            return []
        return [m for m in methods if getattr(type(self.original), m, None) is not getattr(Decoder, m)]

    def _not_overridden(self, what: str) -> None:
        """The compiled prefill/decode_step are Decoder's (the forward on the new positions). A Decoder subclass
        that defines its own (a banned token, a temperature, other outputs) would get Decoder's from them: refused.
        (Other modules' own methods are not read at all: the steps are derived from their forward, as documented.)"""
        own = self._decoders_own(("prefill", "decode_step"))
        if own:
            name = type(self.original).__name__
            raise UnsupportedError(f"{what}: the compiled prefill/decode_step are Decoder's (the forward on the new "
                                   f"positions), and {name}.{own[0]} is its own: not compiled. Run "
                                   f"compiled.original.{what}(...) (uncompiled), or decode over compiled(...)")

    def _keywords(self, what: str, kwargs: dict) -> dict:
        """Tensor keyword arguments of the forward (an attention_mask); anything else is refused."""
        bad = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        if bad:
            self._no_keywords(what, bad)
        return kwargs

    def _graph_inputs(self, prog: ServingProgram, xs: list, kwargs: dict) -> list:
        """The graph's inputs for a prefill or step: the call's tensor leaves; a call on a masked graph's cache
        given none of its masks gets ones (new tokens are real tokens)."""
        inputs = list(xs) + [v for _, v in sorted(kwargs.items())]
        g = prog.graph
        if prog.mask_inputs and len(inputs) == len(g.inputs) - len(prog.mask_inputs):
            for i in prog.mask_inputs:
                v = g.inputs[i]
                inputs.insert(i, torch.ones((xs[0].shape[0], xs[0].shape[1]), dtype=to_torch(v.type.dtype),
                                            device=xs[0].device))
        return inputs

    def _inputs(self, args, what: str) -> list:
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise InputError(f"{what}: expected tensor inputs, got {[type(a).__name__ for a in args]}")
        return list(args)

    def _no_keywords(self, what: str, kwargs: dict) -> None:
        if kwargs:
            raise InputError(f"compiled {what}: keyword arguments ({', '.join(sorted(kwargs))}) are not taken; the "
                             f"compiled {what} runs the step derived from the forward, whatever kernel options the "
                             "original offers")

    @_one_at_a_time
    def prefill(self, *args, **kwargs):
        """prefill(x, cache) -> (y, cache): the outputs at x's positions, after those already cached. Tensor
        keyword arguments of the forward (``attention_mask=`` [B, T]: 1 = a real token, 0 = padding) are given
        as to the forward; the cache keeps the mask of every position."""
        self._not_overridden("prefill")
        kwargs = self._keywords("prefill", kwargs)
        if len(args) < 2:
            raise InputError(f"prefill takes (inputs..., cache), got {len(args)} argument(s)")
        *xs, cache = args
        xs = self._inputs(xs, "prefill")
        prog = self._program(tuple(xs), kwargs, cache)
        cache = self._materialise(cache, prog)
        xs = self._graph_inputs(prog, xs, kwargs)
        outs = self._prefill_by_forward(prog, xs, cache)
        if outs is None:
            outs = prog.run(xs, cache)
        return self.traced.get(id(prog.graph), self.compiled._traced).unflatten(outs), cache

    def _prefill_by_forward(self, prog: ServingProgram, xs: list, cache) -> list | None:
        """From an empty cache on a kernel backend: run the forward kernels on a copy of the graph that also
        returns the values the cache needs, then write them into the cache. None where this does not apply
        (eager backend, a non-empty cache, a scan in the graph): the derived step runs instead."""
        c = self.compiled
        if c._backend.name == "eager" or not isinstance(cache, dict) or cache.get("t") != 0:
            return None
        sources = prog.state_sources()
        if sources is None:
            return None
        batch, n = int(xs[0].shape[0]), int(xs[0].shape[1])
        if n == 0:
            return None
        prog._binding(xs)                  # the input checks
        prog._check_cache(cache, batch, n, xs[0].device)
        if prog.empty_rows_reach:
            prog.check_empty_rows(xs, cache)
        entry = self.forward_runners.get(id(prog.graph))
        if entry is None:
            graph = prog.graph
            wide = graph.clone()
            wide.params = graph.params
            extra = [v for v in sources if v.kind == "node" and v not in graph.outputs]
            wide.outputs = [wide.value(v.name) for v in list(graph.outputs) + extra]
            ctx = c._contexts.get(id(graph))  # the same example inputs: the same configs
            wide_ctx = CompileContext(example_inputs=ctx.example_inputs, options=ctx.options) if ctx else None
            entry = self.forward_runners[id(graph)] = (c._backend.prepare(wide, wide_ctx), extra)
        runner, extra = entry
        with torch.no_grad():
            outs = list(runner(list(xs), prog.graph.params))
        g = prog.graph
        values = dict(zip(g.outputs, outs[:len(g.outputs)]))
        values.update(zip(extra, outs[len(g.outputs):]))
        values.update(zip(g.inputs, xs))
        values.update({v: g.params[name] for name, v in g.param_values.items()})
        prog.fill_from_forward(cache, values, n)
        return outs[:len(g.outputs)]

    @_one_at_a_time
    def decode_step(self, *args, **kwargs):
        """decode_step(x_t, cache) -> (y_t, cache); x_t without the sequence dim gives y_t without it. A module
        prefilled with a key-padding mask takes the step's token as a real one (mask 1) unless a mask is given
        (``attention_mask=`` [B] or [B, 1])."""
        self._not_overridden("decode_step")
        kwargs = self._keywords("decode_step", kwargs)
        if len(args) < 2:
            raise InputError(f"decode_step takes (inputs..., cache), got {len(args)} argument(s)")
        *xs, cache = args
        xs = self._inputs(xs, "decode_step")
        c = self.compiled
        known = self.programs.get(cache.get("_graph")) if isinstance(cache, dict) else None
        graph = known.graph if known is not None else (c._traced.graph if c._traced is not None else None)
        if graph is not None:
            squeeze = xs[0].dim() == graph.inputs[0].type.rank - 1
        else:  # not traced yet: (B, 1, ...) is one position with the sequence dim, anything else lacks it
            squeeze = not (xs[0].dim() >= 2 and xs[0].shape[1] == 1)
        if squeeze:
            xs = [x[:, None] for x in xs]
            kwargs = {k: v[:, None] for k, v in kwargs.items()}
        elif xs[0].dim() < 2 or xs[0].shape[1] != 1:
            raise InputError(f"decode_step: input 0 must be one position: shape (B, ...) without the sequence dim, "
                             f"or (B, 1, ...); got {tuple(xs[0].shape)}")
        prog = self._program(tuple(xs), kwargs, cache)
        cache = self._materialise(cache, prog)
        xs = self._graph_inputs(prog, xs, kwargs)
        # (a read by absolute position takes the step's position on the host: not recorded into a CUDA graph)
        if DECODE_CUDA_GRAPHS and getattr(c._backend, "cuda_graphs", True) and not prog.position_reads \
                and not (DECODE_FAST and xs[0].is_cpu and not TRITON_DECODE_ON_CPU):
            if getattr(prog, "decode_graphs", None) is None:
                prog.decode_graphs = DecodeGraphs(prog)
            outs = prog.decode_graphs(xs, cache)
        else:
            outs = prog.run(xs, cache)
        if squeeze:
            outs = [o[:, 0] for o in outs]
        traced = self.traced.get(id(prog.graph), c._traced)
        if DECODE_FAST and len(outs) == 1 and self._single_tensor(traced):
            return outs[0], cache
        return traced.unflatten(outs), cache

    @_one_at_a_time
    def generate(self, tokens: torch.Tensor = None, max_new_tokens: int = None, **kwargs) -> torch.Tensor:
        """Greedy decoding as Decoder.generate: tokens (B, T), T >= 1 -> (B, T + max_new_tokens). (Keywords of
        other generate methods, Hugging Face's input_ids=, get the refusal below, not a TypeError.)"""
        from .models.decoder import Decoder

        # a Decoder subclass with its own generate decodes its own way; with its own prefill, decode_step or
        # init_cache, Decoder.generate runs those (a banned token, a temperature), which the compiled steps do not
        own = self._decoders_own(("generate", "prefill", "decode_step", "init_cache"))
        if not isinstance(self.original, Decoder) or own:
            name = type(self.original).__name__
            method = f"{name}.{own[0]}" if isinstance(self.original, Decoder) else f"{name}.generate"
            raise UnsupportedError(f"generate is compiled for sessa_compiler.models.Decoder (greedy argmax); "
                                   f"{method} may decode otherwise and is not compiled: run the module's own "
                                   f"with compiled.original.generate(...) (its forward calls are then uncompiled), or "
                                   f"write the decoding loop over compiled(...)"
                                   + ("" if isinstance(self.original, Decoder) else
                                      f", or over compiled.prefill/decode_step where {name} defines them"))
        if kwargs:
            raise InputError(f"generate(tokens, max_new_tokens) takes no keyword {sorted(kwargs)[0]!r}")
        if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] == 0
                or tokens.is_floating_point()):
            raise InputError(f"generate: tokens must be a non-empty integer tensor (B, T), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InputError(f"generate: max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens <= 0:
            return tokens
        from .progress import progress

        first = not self.__dict__.get("_generated")
        self._generated = True
        name = type(self.original).__name__
        cache = self.init_cache(tokens.shape[0], device=tokens.device, max_len=tokens.shape[1] + max_new_tokens)
        with progress(f"sessa_compiler: first generate of {name}: deriving, checking and building the prefill "
                      "and decode steps", first):
            logits, cache = self.prefill(tokens, cache)
            out = [tokens]
            nxt = logits[:, -1].argmax(dim=-1)
            if max_new_tokens > 1:
                logits, cache = self.decode_step(nxt, cache)
        for step in range(max_new_tokens):
            out.append(nxt[:, None])
            if step + 1 < max_new_tokens:
                if step > 0:
                    logits, cache = self.decode_step(nxt, cache)
                nxt = logits.argmax(dim=-1)
        return torch.cat(out, dim=1)


def serving_method(compiled, name: str):
    """The compiled ``name`` (one of SERVING_METHODS) when the original module defines it."""
    if not callable(getattr(compiled.original, name, None)):
        raise AttributeError(f"compiled {type(compiled.original).__name__} has no '{name}': the original module "
                             f"defines none (serving methods are offered where the original has them)")
    serving = compiled.__dict__.get("_serving")
    if serving is None:
        with compiled._lock:   # one Serving per compiled module, also when threads ask at once
            serving = compiled.__dict__.get("_serving")
            if serving is None:
                serving = compiled.__dict__["_serving"] = Serving(compiled)
    return getattr(serving, name)
