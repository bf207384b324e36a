"""Decode-step kernels for the feedback's and attention's reads of their caches (flash-decoding style split-K).

For one new position at t (after t cached positions), per batch row b:

    mixed[b] = softmax_{j < t}(q_b[b] . k_b[b, j] * scale) @ s[b, :t]

``feedback_decode_partial`` runs one program per (batch row, chunk of ``chunk_for(W)`` cached positions): it reads its
chunk of keys and solved states once (in their cache dtype, accumulating in fp32) and writes the chunk's
max logit, sum of exponentials and weighted state sum. ``feedback_decode_combine`` merges the chunks per
batch row (log-sum-exp rescaling). The caches are read in place through their strides (capacity max_len;
only the first t positions are touched). The step then is s_t = f_t + gamma_t * mixed (serving.py).
``attention_decode_*`` do the same for attention over head-major caches [B, Hkv, L, d]: one program per
(batch row x kv head, chunk), all G = H / Hkv query heads of the group at once.

The step forms with the position on the device (what a CUDA graph records: serving.py), ``attention_decode_step``
and ``feedback_decode_step``, also do the step's small work inside the launches: RoPE, the new key, value and mask
flag written to the caches' slot (``attention_decode_write``, then the split-K pair reads positions 0..t), the new
feedback key written by the partial kernel (its programs read only the slots before t) and s = f + gamma * mixed
written to the states' slot by the combine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



def chunk_for(width: int) -> int:
    """Cached positions per program: a [chunk, width] fp32 tile of about 8K elements (64 per thread at 4 warps)."""
    return max(16, min(64, 8192 // triton.next_power_of_2(width)))


@triton.jit
def feedback_decode_partial(q_ptr, kb_ptr, s_ptr, pm_ptr, pl_ptr, pa_ptr, t_ptr, stride_kb_b, stride_kb_l,
                            stride_s_b, stride_s_l, stride_q_b, scale, W: tl.constexpr, BW: tl.constexpr,
                            CHUNK: tl.constexpr, kn_ptr=None, stride_kn_b=0, WRITE: tl.constexpr = False):
    # t (cached positions) is read from the device: chunks at or past it store empty partials (m = -1e30,
    # l = 0, acc = 0), so a grid sized for the cache capacity serves every position. WRITE: the new key kn[b]
    # goes to the cache's slot t (program c = 0), which no program of this launch reads (rows < t)
    t = tl.load(t_ptr)
    b = tl.program_id(0)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    cols = tl.arange(0, BW)
    row_ok = rows < t
    col_ok = cols < W
    both = row_ok[:, None] & col_ok[None, :]
    if WRITE:
        if c == 0:
            kn = tl.load(kn_ptr + b * stride_kn_b + cols, mask=col_ok, other=0.0)
            tl.store(kb_ptr + b * stride_kb_b + t * stride_kb_l + cols, kn.to(kb_ptr.dtype.element_ty), mask=col_ok)
    q = tl.load(q_ptr + b * stride_q_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    kb = tl.load(kb_ptr + b * stride_kb_b + rows[:, None] * stride_kb_l + cols[None, :], mask=both,
                 other=0.0).to(tl.float32)
    logits = tl.sum(kb * q[None, :], axis=1) * scale
    logits = tl.where(row_ok, logits, -1.0e30)
    m = tl.max(logits, axis=0)
    p = tl.where(row_ok, tl.exp(logits - m), 0.0)
    s = tl.load(s_ptr + b * stride_s_b + rows[:, None] * stride_s_l + cols[None, :], mask=both,
                other=0.0).to(tl.float32)
    acc = tl.sum(p[:, None] * s, axis=0)
    tl.store(pm_ptr + b * nc + c, m)
    tl.store(pl_ptr + b * nc + c, tl.sum(p, axis=0))
    tl.store(pa_ptr + (b * nc + c) * W + cols, acc, mask=col_ok)


COMBINE_TILE = 8192   # partial elements per loop step of a combine (a [chunks, columns] tile, one vector load)
COMBINE_BLOCK_W = 128  # state columns per feedback_decode_combine program


def combine_chunks(columns: int) -> int:
    """Partials one combine loop step loads: a [chunks, columns] tile of about COMBINE_TILE elements."""
    return max(1, min(64, COMBINE_TILE // triton.next_power_of_2(columns)))


@triton.jit
def feedback_decode_combine(pm_ptr, pl_ptr, pa_ptr, out_ptr, nc, W: tl.constexpr, BWC: tl.constexpr,
                            BC: tl.constexpr, f_ptr=None, stride_f_b=0, g_ptr=None, stride_g_b=0, s_ptr=None,
                            stride_s_b=0, stride_s_l=0, t_ptr=None, EPILOGUE: tl.constexpr = False):
    # one program per (batch row, BWC state columns); BC partials per loop step, loaded as one tile. EPILOGUE:
    # the step's s = f + gamma * mixed, written to out (out's dtype) and to the states' slot t (their dtype)
    b = tl.program_id(0)
    cols = tl.program_id(1) * BWC + tl.arange(0, BWC)
    col_ok = cols < W
    cs = tl.arange(0, BC)
    m = tl.full([BC], -1.0e30, dtype=tl.float32)
    for c0 in range(0, nc, BC):
        m = tl.maximum(m, tl.load(pm_ptr + b * nc + c0 + cs, mask=c0 + cs < nc, other=-1.0e30))
    mx = tl.max(m, axis=0)
    total = tl.zeros([BC], dtype=tl.float32)
    acc = tl.zeros([BWC], dtype=tl.float32)
    for c0 in range(0, nc, BC):
        c = c0 + cs
        ok = c < nc
        w = tl.where(ok, tl.exp(tl.load(pm_ptr + b * nc + c, mask=ok, other=-1.0e30) - mx), 0.0)
        total += tl.load(pl_ptr + b * nc + c, mask=ok, other=0.0) * w
        pa = tl.load(pa_ptr + (b * nc + c)[:, None] * W + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                     other=0.0)
        acc += tl.sum(pa * w[:, None], axis=0)
    den = tl.sum(total, axis=0)
    mixed = tl.where(den > 0.0, acc / tl.maximum(den, 1e-30), 0.0)   # t = 0: 0
    if EPILOGUE:
        t = tl.load(t_ptr)
        f = tl.load(f_ptr + b * stride_f_b + cols, mask=col_ok, other=0.0).to(tl.float32)
        res = f + tl.load(g_ptr + b * stride_g_b).to(tl.float32) * mixed
        tl.store(s_ptr + b * stride_s_b + t * stride_s_l + cols, res.to(s_ptr.dtype.element_ty), mask=col_ok)
        tl.store(out_ptr + b * W + cols, res.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(out_ptr + b * W + cols, mixed, mask=col_ok)


def _position(t, capacity: int, chunk: int, device, name: str):
    """(int32 device tensor holding t, number of chunks in the grid). ``t`` an int: checked, grid over t's
    chunks. ``t`` a device tensor (int32 [1]): read by the kernels, grid over the capacity's chunks, so the
    launch (grid, arguments) does not depend on the position: no host read, CUDA-graph capturable; its value
    must lie in 0..capacity (the kernels cannot check it; t = 0 gives a zero result)."""
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.int32 or t.numel() != 1 or t.device != device:
            raise ValueError(f"{name}: a position tensor must be int32 with one element on {device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
        return t, max(1, triton.cdiv(capacity, chunk))
    if t < 1 or capacity < t:
        raise ValueError(f"{name}: t={t} must be in 1..{capacity}")
    return torch.full((1,), t, dtype=torch.int32, device=device), triton.cdiv(t, chunk)


def feedback_decode(q_b: torch.Tensor, k_b_cache: torch.Tensor, s_cache: torch.Tensor, t,
                    scale: float) -> torch.Tensor:
    """q_b [B, W]; caches [B, L, W] (L >= t >= 1, last dim contiguous) -> mixed [B, W] in float32. ``t``: an int,
    or an int32 device tensor [1] (0 <= t <= L; see ``_position``)."""
    B, W = q_b.shape
    t_dev, nc = _position(t, min(k_b_cache.shape[1], s_cache.shape[1]), chunk_for(W), q_b.device, "feedback_decode")
    return _feedback_split_k(q_b, k_b_cache, s_cache, t_dev, nc, scale,
                             torch.empty(B, W, device=q_b.device, dtype=torch.float32), "feedback_decode")


def _feedback_split_k(q_b, k_b_cache, s_cache, t_dev, nc: int, scale: float, out, name: str, partial=None,
                      combine=None):
    """The feedback's partial and combine launches over ``nc`` chunks, into ``out`` [B, W]; ``partial`` and
    ``combine``: the step form's extra arguments (the new key's write, the epilogue)."""
    if k_b_cache.stride(2) != 1 or s_cache.stride(2) != 1:
        raise ValueError(f"{name}: the caches' last dim must be contiguous")
    q = _rows(q_b)
    B, W = q.shape
    f32 = dict(device=q.device, dtype=torch.float32)
    pm, pl, pa = torch.empty(B, nc, **f32), torch.empty(B, nc, **f32), torch.empty(B, nc, W, **f32)
    BW = triton.next_power_of_2(W)
    feedback_decode_partial[(B, nc)](q, k_b_cache, s_cache, pm, pl, pa, t_dev, k_b_cache.stride(0), k_b_cache.stride(1),
                                     s_cache.stride(0), s_cache.stride(1), q.stride(0), float(scale), W=W, BW=BW,
                                     CHUNK=chunk_for(W), **(partial or {}))
    BWC = min(BW, COMBINE_BLOCK_W)
    feedback_decode_combine[(B, triton.cdiv(W, BWC))](pm, pl, pa, out, nc, W=W, BWC=BWC, BC=combine_chunks(BWC),
                                                      **(combine or {}))
    return out


@triton.jit
def attention_decode_partial(q_ptr, k_ptr, v_ptr, pm_ptr, pl_ptr, pa_ptr, t_ptr, stride_k_b, stride_k_h,
                             stride_k_l, stride_v_b, stride_v_h, stride_v_l, scale, HKV: tl.constexpr,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr,
                             DVP: tl.constexpr, CHUNK: tl.constexpr, keep_ptr=None, stride_keep_b=0,
                             KEEP: tl.constexpr = False, T_ADD: tl.constexpr = 0):
    t = tl.load(t_ptr) + T_ADD     # positions to read, from the device (chunks past it: empty partials)
    bh = tl.program_id(0)          # batch row x kv head
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, GP)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, DP)
    e = tl.arange(0, DVP)
    row_ok = rows < t
    q = tl.load(q_ptr + (bh * G + g[:, None]) * D + d[None, :], mask=(g[:, None] < G) & (d[None, :] < D),
                other=0.0).to(tl.float32)                                                       # [GP, DP]
    k = tl.load(k_ptr + b * stride_k_b + h * stride_k_h + rows[:, None] * stride_k_l + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)            # [CHUNK, DP]
    logits = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                          # [GP, CHUNK]
    if KEEP:   # key-padding mask: a padded key's logit is -1e30, weight exp(-1e30 - m) = 0 beside any real key;
        # a row with no real key has every logit -1e30: each chunk's weights are 1, the combine averages v
        kept = tl.load(keep_ptr + b * stride_keep_b + rows, mask=row_ok, other=0) != 0
        logits = tl.where(row_ok[None, :] & kept[None, :], logits, -1.0e30)
    else:
        logits = tl.where(row_ok[None, :], logits, -1.0e30)
    m = tl.max(logits, axis=1)
    p = tl.where(row_ok[None, :], tl.exp(logits - m[:, None]), 0.0)
    v = tl.load(v_ptr + b * stride_v_b + h * stride_v_h + rows[:, None] * stride_v_l + e[None, :],
                mask=row_ok[:, None] & (e[None, :] < DV), other=0.0).to(tl.float32)           # [CHUNK, DVP]
    acc = tl.sum(p[:, :, None] * v[None, :, :], axis=1)                                      # [GP, DVP]
    part = (bh * nc + c) * GP + g
    tl.store(pm_ptr + part, m)
    tl.store(pl_ptr + part, tl.sum(p, axis=1))
    tl.store(pa_ptr + part[:, None] * DVP + e[None, :], acc)


@triton.jit
def attention_decode_combine(pm_ptr, pl_ptr, pa_ptr, out_ptr, nc, G: tl.constexpr, GP: tl.constexpr,
                             DV: tl.constexpr, DVP: tl.constexpr, BC: tl.constexpr, EMPTY_NAN: tl.constexpr = False):
    # one program per (batch row x kv head); BC partials per loop step, loaded as one [BC, GP, DVP] tile
    bh = tl.program_id(0)
    g = tl.arange(0, GP)
    e = tl.arange(0, DVP)
    cs = tl.arange(0, BC)
    m = tl.full([BC, GP], -1.0e30, dtype=tl.float32)
    for c0 in range(0, nc, BC):
        ok = (c0 + cs) < nc
        m = tl.maximum(m, tl.load(pm_ptr + (bh * nc + c0 + cs)[:, None] * GP + g[None, :], mask=ok[:, None],
                                  other=-1.0e30))
    mx = tl.max(m, axis=0)
    total = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, DVP], dtype=tl.float32)
    for c0 in range(0, nc, BC):
        ok = (c0 + cs) < nc
        part = (bh * nc + c0 + cs)[:, None] * GP + g[None, :]                  # [BC, GP]
        w = tl.where(ok[:, None], tl.exp(tl.load(pm_ptr + part, mask=ok[:, None], other=-1.0e30) - mx[None, :]), 0.0)
        total += tl.sum(tl.load(pl_ptr + part, mask=ok[:, None], other=0.0) * w, axis=0)
        pa = tl.load(pa_ptr + part[:, :, None] * DVP + e[None, None, :], mask=ok[:, None, None], other=0.0)
        acc += tl.sum(pa * w[:, :, None], axis=0)
    out = tl.where(total[:, None] > 0.0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
    if EMPTY_NAN:   # no real key (every logit the padding's -1e30): NaN, as a softmax over -inf fills gives
        out = tl.where(mx[:, None] > -1.0e29, out, float("nan"))
    tl.store(out_ptr + (bh * G + g[:, None]) * DV + e[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g[:, None] < G) & (e[None, :] < DV))


@triton.jit
def attention_decode_write(q_ptr, k_ptr, v_ptr, f_ptr, kc_ptr, vc_ptr, qo_ptr, t_ptr, stride_q_b, stride_q_h,
                           stride_k_b, stride_k_h, stride_v_b, stride_v_h, stride_kc_b, stride_kc_h, stride_kc_l,
                           stride_vc_b, stride_vc_h, stride_vc_l, H: tl.constexpr, HKV: tl.constexpr,
                           D: tl.constexpr, HALFP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                           ROPE: tl.constexpr, kn_ptr=None, km_ptr=None, stride_km_b=0, MASK: tl.constexpr = False):
    """The step's prologue at the position t read from the device, one program per (batch row, query head):
    q[b, h] (rotated by t * inv_freq, interleaved pairs, when ROPE) to qo [B, H, D] float32; program h < HKV also
    writes k[b, h] (rotated) and v[b, h] to the caches' slot t, and with MASK program h = 0 the new position's
    key-padding flag kn[b] to km[b, t]. What the torch ops (angles, cos, sin, complex products, casts, three
    index_copy_) did in about a dozen launches."""
    t = tl.load(t_ptr)
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALFP)
    ok = i < D // 2
    q_row = q_ptr + b * stride_q_b + h * stride_q_h
    qe = tl.load(q_row + 2 * i, mask=ok, other=0.0).to(tl.float32)
    qo = tl.load(q_row + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
    if ROPE:
        angle = t.to(tl.float32) * tl.load(f_ptr + i, mask=ok, other=0.0).to(tl.float32)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        qr = qe * cos - qo * sin
        qo = qe * sin + qo * cos
        qe = qr
    out_row = qo_ptr + (b * H + h) * D
    tl.store(out_row + 2 * i, qe, mask=ok)
    tl.store(out_row + 2 * i + 1, qo, mask=ok)
    if D % 2 == 1:   # an odd width (no RoPE): its last element
        tl.store(out_row + D - 1, tl.load(q_row + D - 1).to(tl.float32))
    if h < HKV:
        k_row = k_ptr + b * stride_k_b + h * stride_k_h
        ke = tl.load(k_row + 2 * i, mask=ok, other=0.0).to(tl.float32)
        ko = tl.load(k_row + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
        if ROPE:
            kr = ke * cos - ko * sin
            ko = ke * sin + ko * cos
            ke = kr
        slot = kc_ptr + b * stride_kc_b + h * stride_kc_h + t * stride_kc_l
        tl.store(slot + 2 * i, ke.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(slot + 2 * i + 1, ko.to(kc_ptr.dtype.element_ty), mask=ok)
        if D % 2 == 1:
            tl.store(slot + D - 1, tl.load(k_row + D - 1).to(tl.float32).to(kc_ptr.dtype.element_ty))
        e = tl.arange(0, DVP)
        v = tl.load(v_ptr + b * stride_v_b + h * stride_v_h + e, mask=e < DV, other=0.0).to(tl.float32)
        tl.store(vc_ptr + b * stride_vc_b + h * stride_vc_h + t * stride_vc_l + e, v.to(vc_ptr.dtype.element_ty),
                 mask=e < DV)
        if MASK:
            if h == 0:
                tl.store(km_ptr + b * stride_km_b + t, tl.load(kn_ptr + b))


def attention_chunk_for(g: int, d: int) -> int:
    """Cached positions per program: a [group, chunk, d] fp32 product of about 8K elements."""
    return max(16, min(64, 8192 // (triton.next_power_of_2(g) * triton.next_power_of_2(d))))


def _keep_args(keep, batch: int, capacity: int) -> dict:
    if keep is None:
        return {}
    if keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] < capacity or keep.stride(1) != 1:
        raise ValueError(f"attention_decode: keep must be [B, L] = [{batch}, >= {capacity}] with contiguous "
                         f"positions, got {tuple(keep.shape)} strides {keep.stride()}")
    return {"keep_ptr": keep.view(torch.uint8) if keep.dtype == torch.bool else keep,
            "stride_keep_b": keep.stride(0), "KEEP": True}


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, t,
                     scale: float, keep: torch.Tensor | None = None, empty_nan: bool = False,
                     out_dtype: torch.dtype = torch.float32, t_add: int = 0) -> torch.Tensor:
    """q [B, H, d] (already rotated); caches [B, Hkv, L, d] (head-major, L >= t >= 1, last dim contiguous);
    query head h reads kv head h // (H / Hkv) -> [B, H, dv] in ``out_dtype``. ``t``: an int, or an int32 device
    tensor [1] (see ``_position``); ``t_add`` more positions are read than it holds (the step form: the new one).
    ``keep`` [B, L] (bool or integer, nonzero = a real key): a key-padding mask of the cached positions; a row with
    no real key among the first t gives the mean of v over them (the attention op's empty_rows="mean"), with
    ``empty_nan`` NaN (empty_rows="nan")."""
    B, H, D = q.shape
    Hkv, DV = k_cache.shape[1], v_cache.shape[3]
    if H % Hkv or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("attention_decode: H must be a multiple of Hkv and the caches' last dim contiguous")
    G = H // Hkv
    GP, DP, DVP = triton.next_power_of_2(G), triton.next_power_of_2(D), triton.next_power_of_2(DV)
    chunk = attention_chunk_for(G, D)
    t_dev, nc = _position(t, min(k_cache.shape[2], v_cache.shape[2]), chunk, q.device, "attention_decode")
    f32 = dict(device=q.device, dtype=torch.float32)
    pm, pl = torch.empty(B * Hkv, nc, GP, **f32), torch.empty(B * Hkv, nc, GP, **f32)
    pa = torch.empty(B * Hkv, nc, GP, DVP, **f32)
    out = torch.empty(B, H, DV, device=q.device, dtype=out_dtype)
    attention_decode_partial[(B * Hkv, nc)](
        q.contiguous(), k_cache, v_cache, pm, pl, pa, t_dev, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(scale), HKV=Hkv, G=G, GP=GP, D=D, DP=DP,
        DV=DV, DVP=DVP, CHUNK=chunk, T_ADD=t_add, **_keep_args(keep, B, k_cache.shape[2]))
    attention_decode_combine[(B * Hkv,)](pm, pl, pa, out, nc, G=G, GP=GP, DV=DV, DVP=DVP,
                                         BC=combine_chunks(GP * DVP), EMPTY_NAN=keep is not None and empty_nan)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim (a copy only where it is not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def feedback_decode_step(f: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, gamma: torch.Tensor,
                         k_b_cache: torch.Tensor, s_cache: torch.Tensor, pos: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """One decode step of the feedback at the position held by ``pos`` (int32 [1] on the device, 0 <= t < L):
    writes k_b [B, W] to k_b_cache[:, t], s = f + gamma * softmax(q_b . k_b_cache[:, :t] * scale) @ s_cache[:, :t]
    (s = f at t = 0) to s_cache[:, t], and returns s [B, W] in f's dtype. Two launches whatever t is (the key's
    write in the partial kernel, the epilogue in the combine)."""
    B, W = q_b.shape
    _, nc = _position(pos, min(k_b_cache.shape[1], s_cache.shape[1]), chunk_for(W), q_b.device,
                      "feedback_decode_step")
    kn, f = _rows(k_b), _rows(f)
    return _feedback_split_k(
        q_b, k_b_cache, s_cache, pos, nc, scale, torch.empty(B, W, device=f.device, dtype=f.dtype),
        "feedback_decode_step", partial={"kn_ptr": kn, "stride_kn_b": kn.stride(0), "WRITE": True},
        combine={"f_ptr": f, "stride_f_b": f.stride(0), "g_ptr": gamma, "stride_g_b": gamma.stride(0), "s_ptr": s_cache,
                 "stride_s_b": s_cache.stride(0), "stride_s_l": s_cache.stride(1), "t_ptr": pos, "EPILOGUE": True})


def attention_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor | None,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                          keep: torch.Tensor | None = None, keep_new: torch.Tensor | None = None,
                          empty_nan: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One decode step of attention at the position held by ``pos`` (int32 [1] on the device, 0 <= t < L): q
    [B, H, d], k [B, Hkv, d], v [B, Hkv, dv] (any float dtype); RoPE at angle t * inv_freq where ``inv_freq``
    is given; k and v written to the caches' slot t (and ``keep_new`` [B] to ``keep`` [B, L] with a key-padding
    mask), then every query head attends over positions 0..t -> [B, H, dv] in ``out_dtype``. Three launches
    whatever t is (attention_decode_write, then attention_decode's two)."""
    B, H, D = q.shape
    Hkv, DV = k_cache.shape[1], v_cache.shape[3]
    if (H % Hkv or k.shape != (B, Hkv, D) or v.shape != (B, Hkv, DV) or k_cache.stride(3) != 1
            or v_cache.stride(3) != 1 or (inv_freq is not None and (D % 2 or inv_freq.numel() != D // 2))):
        raise ValueError(f"attention_decode_step: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and "
                         f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit")
    _position(pos, min(k_cache.shape[2], v_cache.shape[2]), 1, q.device, "attention_decode_step")   # before writing
    q, k, v = _rows(q), _rows(k), _rows(v)
    qr = torch.empty(B, H, D, device=q.device, dtype=torch.float32)
    mask = {}
    if keep is not None:
        keep_new = keep_new.contiguous()   # one flag per batch row, read at b
        mask = {"kn_ptr": keep_new.view(torch.uint8) if keep_new.dtype == torch.bool else keep_new,
                "km_ptr": keep.view(torch.uint8) if keep.dtype == torch.bool else keep, "stride_km_b": keep.stride(0),
                "MASK": True}
    attention_decode_write[(B, H)](
        q, k, v, _rows(inv_freq) if inv_freq is not None else q, k_cache, v_cache, qr, pos, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), H=H, HKV=Hkv, D=D,
        HALFP=triton.next_power_of_2(max(D // 2, 1)), DV=DV, DVP=triton.next_power_of_2(DV), ROPE=inv_freq is not None,
        **mask)
    return attention_decode(qr, k_cache, v_cache, pos, scale, keep, empty_nan, out_dtype=out_dtype, t_add=1)


_EPILOGUE_ARGS = {"f_ptr": None, "stride_f_b": 0, "g_ptr": None, "stride_g_b": 0, "s_ptr": None, "stride_s_b": 0,
                  "stride_s_l": 0, "t_ptr": None}   # feedback_decode_combine without its epilogue


def aot_compile(arch: int = 90, W: int = 512) -> list:
    """Compile both kernels for ``GPUTarget("cuda", arch, 32)`` with no GPU present; -> one summary per kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    BW = triton.next_power_of_2(W)
    jobs = [
        (feedback_decode_partial,
         {"q_ptr": "*fp32", "kb_ptr": "*bf16", "s_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32",
          "pa_ptr": "*fp32", "t_ptr": "*i32", "stride_kb_b": "i32", "stride_kb_l": "i32", "stride_s_b": "i32",
          "stride_s_l": "i32", "stride_q_b": "i32",
          "scale": "fp32", "W": "constexpr", "BW": "constexpr", "CHUNK": "constexpr",
          "kn_ptr": "constexpr", "stride_kn_b": "constexpr", "WRITE": "constexpr"},
         {"W": W, "BW": BW, "CHUNK": chunk_for(W), "kn_ptr": None, "stride_kn_b": 0, "WRITE": False}),
        (feedback_decode_combine,
         {"pm_ptr": "*fp32", "pl_ptr": "*fp32", "pa_ptr": "*fp32", "out_ptr": "*fp32", "nc": "i32",
          "W": "constexpr", "BWC": "constexpr", "BC": "constexpr",
          **{n: "constexpr" for n in _EPILOGUE_ARGS}, "EPILOGUE": "constexpr"},
         {"W": W, "BWC": min(BW, COMBINE_BLOCK_W), "BC": combine_chunks(min(BW, COMBINE_BLOCK_W)),
          **_EPILOGUE_ARGS, "EPILOGUE": False}),
    ]
    G, D = 4, 64
    attn = {"q_ptr": "*fp32", "k_ptr": "*bf16", "v_ptr": "*bf16", "pm_ptr": "*fp32", "pl_ptr": "*fp32",
            "pa_ptr": "*fp32", "t_ptr": "*i32", "stride_k_b": "i32", "stride_k_h": "i32", "stride_k_l": "i32",
            "stride_v_b": "i32", "stride_v_h": "i32", "stride_v_l": "i32", "scale": "fp32", "HKV": "constexpr",
            "G": "constexpr", "GP": "constexpr", "D": "constexpr", "DP": "constexpr", "DV": "constexpr",
            "DVP": "constexpr", "CHUNK": "constexpr", "KEEP": "constexpr", "T_ADD": "constexpr"}
    attn_c = {"HKV": 2, "G": G, "GP": G, "D": D, "DP": D, "DV": D, "DVP": D, "CHUNK": attention_chunk_for(G, D),
              "T_ADD": 0}
    comb = {"pm_ptr": "*fp32", "pl_ptr": "*fp32", "pa_ptr": "*fp32", "out_ptr": "*fp32", "nc": "i32",
            "G": "constexpr", "GP": "constexpr", "DV": "constexpr", "DVP": "constexpr", "BC": "constexpr",
            "EMPTY_NAN": "constexpr"}
    comb_c = {"G": G, "GP": G, "DV": D, "DVP": D, "BC": combine_chunks(G * D)}
    jobs += [   # without and with a key-padding mask (keep: uint8 [B, L])
        (attention_decode_partial, {**attn, "keep_ptr": "constexpr", "stride_keep_b": "constexpr"},
         {**attn_c, "keep_ptr": None, "stride_keep_b": 0, "KEEP": False}),
        (attention_decode_combine, comb, {**comb_c, "EMPTY_NAN": False}),
        (attention_decode_partial, {**attn, "keep_ptr": "*u8", "stride_keep_b": "i32"}, {**attn_c, "KEEP": True}),
        (attention_decode_combine, comb, {**comb_c, "EMPTY_NAN": True}),
    ]
    # the step forms (attention_decode_step, feedback_decode_step): the prologue with and without RoPE and with a
    # mask, the partials reading t + 1 positions or writing the new key, the combines' epilogues in bf16
    write = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "f_ptr": "*fp32", "kc_ptr": "*bf16",
             "vc_ptr": "*bf16", "qo_ptr": "*fp32", "t_ptr": "*i32", **{n: "i32" for n in (
                 "stride_q_b", "stride_q_h", "stride_k_b", "stride_k_h", "stride_v_b", "stride_v_h", "stride_kc_b",
                 "stride_kc_h", "stride_kc_l", "stride_vc_b", "stride_vc_h", "stride_vc_l")},
             **{n: "constexpr" for n in ("H", "HKV", "D", "HALFP", "DV", "DVP", "ROPE", "MASK")}}
    write_c = {"H": 2 * G, "HKV": 2, "D": D, "HALFP": D // 2, "DV": D, "DVP": D}
    jobs += [
        (attention_decode_write, {**write, "kn_ptr": "constexpr", "km_ptr": "constexpr", "stride_km_b": "constexpr"},
         {**write_c, "ROPE": True, "MASK": False, "kn_ptr": None, "km_ptr": None, "stride_km_b": 0}),
        (attention_decode_write, {**write, "kn_ptr": "*u8", "km_ptr": "*u8", "stride_km_b": "i32"},
         {**write_c, "ROPE": False, "MASK": True}),
        (attention_decode_partial, {**attn, "keep_ptr": "constexpr", "stride_keep_b": "constexpr"},
         {**attn_c, "keep_ptr": None, "stride_keep_b": 0, "KEEP": False, "T_ADD": 1}),
        (attention_decode_combine, {**comb, "out_ptr": "*bf16"}, {**comb_c, "EMPTY_NAN": False}),
        (feedback_decode_partial, {**jobs[0][1], "kn_ptr": "*bf16", "stride_kn_b": "i32"},
         {k: v for k, v in {**jobs[0][2], "WRITE": True}.items() if k not in ("kn_ptr", "stride_kn_b")}),
        (feedback_decode_combine, {**jobs[1][1], "out_ptr": "*bf16", "f_ptr": "*bf16", "stride_f_b": "i32",
                                   "g_ptr": "*bf16", "stride_g_b": "i32", "s_ptr": "*fp32", "stride_s_b": "i32",
                                   "stride_s_l": "i32", "t_ptr": "*i32"},
         {k: v for k, v in {**jobs[1][2], "EPILOGUE": True}.items() if k not in _EPILOGUE_ARGS}),
    ]
    out = []
    for fn, signature, constexprs in jobs:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        out.append({"kernel": fn.__name__, "ptx_lines": compiled.asm["ptx"].count("\n"),
                    "cubin_bytes": len(compiled.asm.get("cubin", b""))})
    return out


if __name__ == "__main__":  # python -m sessa_compiler.backends.triton.decode  (TRITON_INTERPRET unset)
    import json

    for record in aot_compile():
        print(json.dumps(record))
