"""Causal attention (FlashAttention-style online softmax), generated from an ``attention`` node.

With ``key_padding=True`` the kernel also reads the key-padding mask (int32 [B, T], nonzero = keep: padded keys
are -inf) and, for ``empty_rows="mean"``, the mean of v over all keys ([B, Hkv, d_v], float32, computed by the
launcher), which a row with no visible key gives; with ``empty_rows="nan"`` such a row is 0 / 0 = NaN.

GQA is an index map (query head h reads kv head h // G, no copies). With ``rope=True`` a small
kernel first rotates q (folding in the softmax scale) and k once each into contiguous copies
(interleaved pairs, angles in fp32): each K tile is rotated once instead of once per query block,
and the attention kernel always has one full-width product per tile.
"""
from __future__ import annotations

from ...ir.dtypes import torch_dtype
from ...errors import UnsupportedError
from ...ir.graph import Node
from .codegen import AOT_POINTER, KernelSource, dot_block, dot_policy


def _rope_kernel(d: int, rotated_dtype: str, spec: dict) -> KernelSource:
    """Rotates q or k once, before attention: x [B, T, Hx, d] (row-strided) -> contiguous rotated copy,
    times ``mult`` (the softmax scale for q, 1 for k). Lanes 2i and 2i+1 are a pair."""
    half = d // 2
    block_half = dot_block(half, 128)
    body = "".join(f"{a} = tl.constexpr({b!r})\n" for a, b in dict(D=d, HALF=half, BLOCK_HALF=block_half,
                                                                    BLOCK_M=32).items()) + "\n\n"
    imask = "" if half == block_half else " & (i[None, :] < HALF)"
    body += ("@triton.jit\n"
             "def rope_rotate(X, INV_FREQ, OUT, T, HX, mult, stride_xb, stride_xt, stride_xh):\n"
             "    # out[t, 2i], out[t, 2i+1] = rotation of (x[t, 2i], x[t, 2i+1]) by t * inv_freq[i], times mult\n"
             "    pid_m = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // HX).to(tl.int64)\n"
             "    h = bh % HX\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    i = tl.arange(0, BLOCK_HALF)\n"
             f"    mask = (rows[:, None] < T){imask}\n"
             "    inv_freq = tl.load(INV_FREQ + i, mask=i < HALF, other=0.0).to(tl.float32)\n"
             "    ang = rows[:, None].to(tl.float32) * inv_freq[None, :]\n"
             "    cos, sin = tl.cos(ang), tl.sin(ang)\n"
             "    x = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt + 2 * i[None, :]\n"
             "    xe = tl.load(x, mask=mask, other=0.0).to(tl.float32)\n"
             "    xo = tl.load(x + 1, mask=mask, other=0.0).to(tl.float32)\n"
             "    o = OUT + ((b * T + rows[:, None]) * HX + h) * D + 2 * i[None, :]\n"
             "    tl.store(o, ((xe * cos - xo * sin) * mult).to(OUT.dtype.element_ty), mask=mask)\n"
             "    tl.store(o + 1, ((xe * sin + xo * cos) * mult).to(OUT.dtype.element_ty), mask=mask)\n")
    ptr = AOT_POINTER[spec["dtype"]]
    return KernelSource("rope_rotate", "attention", {**spec, "rotated_dtype": rotated_dtype},
                        {"BLOCK_M": 32, "BLOCK_HALF": block_half}, body,
                        {"X": ptr, "INV_FREQ": AOT_POINTER[spec["inv_freq_dtype"]], "OUT": AOT_POINTER[rotated_dtype],
                         "T": "i32", "HX": "i32", "mult": "fp32", "stride_xb": "i64", "stride_xt": "i32",
                         "stride_xh": "i32"},
                        do_not_specialize=("T",), num_warps=4, num_stages=2, uses_dot=False)


SHARED_BUDGET = 200 * 1024   # bytes of shared memory a tile config may plan for (sm_90 allows 227 KB a block)


def _fit_tiles(d: int, dv: int, esize: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_stages): the largest tiles whose shared memory fits SHARED_BUDGET.

    Estimate (checked against sm_90 compiles of bf16 and f32 at head widths 64-256): every stage
    holds a K and a V tile, and Q plus one layout-conversion buffer stay resident."""
    for bm, bn, stages in ((128, 64, 3), (128, 64, 2), (64, 64, 2), (64, 32, 2), (32, 32, 1)):
        if stages * bn * (d + dv) * esize + 2 * bm * max(d, dv) * esize <= SHARED_BUDGET:
            return bm, bn, stages
    return 32, 32, 1


def generate_attention(node: Node, dtypes: dict, interpret: bool, block_m: int | None = None,
                       block_n: int | None = None) -> KernelSource:
    """The attention kernel; with ``rope=True`` a ``rope_rotate`` part rotates q (times the scale) and k
    once into contiguous copies, so each K tile is rotated once, not once per query block."""
    q, k, v = node.inputs[:3]
    H, Hkv, d = q.type.shape[2], k.type.shape[2], q.type.shape[3]
    dv = v.type.shape[3]
    for name, x in (("query heads", H), ("kv heads", Hkv), ("head width", d), ("value width", dv)):
        if not isinstance(x, int):
            raise UnsupportedError(f"op 'attention': the {name} must be static to generate a kernel, got {x}")
    if not node.attrs["causal"]:
        raise UnsupportedError("op 'attention': only causal attention has a Triton kernel")
    rope = bool(node.attrs.get("rope", False))
    kp = bool(node.attrs.get("key_padding", False))
    empty = node.attrs.get("empty_rows", "mean") if kp else None
    if rope and d % 2:
        raise UnsupportedError(f"op 'attention': RoPE needs an even head width, got {d}")
    dt = dtypes["q"]
    pol = dot_policy(dt, interpret)
    dd, prec = pol["dot_dtype"], pol["dot_precision"]
    # 128 query rows at 8 warps: each warpgroup gets 64 rows and the full tile width (m64n64 for the
    # logits, m64n<d_v> for P @ V); 64-row tiles at 8 warps would split N in half
    block_dv = dot_block(dv, 256)
    stages = 3
    if block_m is None and block_n is None:
        block_m, block_n, stages = _fit_tiles(dot_block(d, 256), block_dv, 4 if dt == "f32" else 2)
    block_m, block_n = block_m or 128, block_n or 64
    num_warps = 8 if block_m >= 128 else 4
    qdt = ("f32" if dd == "tl.float32" else dt) if rope else dt   # the rotated copies keep the dot's dtype
    consts = dict(H=H, HKV=Hkv, GROUP=H // Hkv, SCALE=1.0 if rope else node.attrs["scale"], BLOCK_M=block_m,
                  BLOCK_N=block_n, D_V=dv, BLOCK_DV=block_dv, D=d, BLOCK_D=dot_block(d, 256))
    body = "".join(f"{a} = tl.constexpr({b!r})\n" for a, b in consts.items()) + "\n\n"
    body += ("@triton.jit\n"
             f"def attention_fwd(Q, K, V, OUT, LSE, {'MASK, VMEAN, ' if kp else ''}T, stride_qb, stride_qt, stride_qh, "
             "stride_kb, stride_kt,\n"
             "                  stride_kh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh):\n"
             "    # out[t] = softmax_{j<=t}(q_t . k_j * SCALE) @ v for one (batch x query head, row block);\n"
             "    # LSE[b, h, t] = log sum_{j<=t} exp(q_t . k_j * SCALE) (fp32, contiguous [B, H, T])\n"
             "    bh = tl.program_id(0)\n"
             "    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)   # heaviest row blocks launch first\n"
             "    b = (bh // H).to(tl.int64)\n"
             "    h = bh % H\n"
             "    kvh = h // GROUP   # GQA: query head h reads kv head h // GROUP\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    q_base = Q + b * stride_qb + h * stride_qh\n"
             "    k_base = K + b * stride_kb + kvh * stride_kh\n"
             "    v_base = V + b * stride_vb + kvh * stride_vh\n"
             "    dvs = tl.arange(0, BLOCK_DV)\n")
    dmask = "" if d == consts["BLOCK_D"] else " & (ds[None, :] < D)"
    scale_q = "" if rope else ".to(tl.float32) * SCALE"   # rotated q comes scaled
    body += ("    ds = tl.arange(0, BLOCK_D)\n"
             f"    q = tl.load(q_base + rows[:, None] * stride_qt + ds[None, :], mask=(rows[:, None] < T){dmask}, other=0.0)\n"
             f"    q = (q{scale_q}).to({dd})\n"
             "    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)\n"
             "    l_i = tl.zeros([BLOCK_M], tl.float32)\n"
             "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)\n"
             "    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)\n"
             "    lo = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N   # tiles left of lo are below the diagonal: no mask\n")
    dmask_t = "" if d == consts["BLOCK_D"] else " & (ds[:, None] < D)"
    vmask = "" if dv == block_dv else " & (dvs[None, :] < D_V)"
    for n_lo, n_hi, masked in (("0", "lo", False), ("lo", "hi", True)):
        kmask = "(cols[None, :] < T)" if masked else "(cols[None, :] >= 0)"
        vrow = "(cols[:, None] < T)" if masked else "(cols[:, None] >= 0)"
        kload = f", mask={kmask}{dmask_t}, other=0.0" if masked or dmask_t else ""
        vload = f", mask={vrow}{vmask}, other=0.0" if masked or vmask else ""
        body += (f"    for n0 in range({n_lo}, {n_hi}, BLOCK_N):\n"
                 "        cols = n0 + tl.arange(0, BLOCK_N)\n"
                 f"        kt = tl.load(k_base + cols[None, :] * stride_kt + ds[:, None]{kload})\n"
                 f"        logits = tl.dot(q, kt.to({dd}), out_dtype=tl.float32, input_precision=\"{prec}\")\n")
        if masked:   # the diagonal tiles (and the ragged last one)
            body += ("        z = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < T), logits, "
                     "float(\"-inf\"))\n")
        else:
            body += "        z = logits\n"
        if kp:   # key-padding mask [B, T] (int32, nonzero = keep): padded keys are -inf
            body += ("        keep = tl.load(MASK + b * T + cols, mask=cols < T, other=0)\n"
                     "        z = tl.where(keep[None, :] != 0, z, float(\"-inf\"))\n")
        body += ("        m_new = tl.maximum(m_i, tl.max(z, axis=1))\n"
                 "        alpha = tl.exp(m_i - m_new)\n"
                 "        p = tl.exp(z - m_new[:, None])\n"
                 "        l_i = l_i * alpha + tl.sum(p, axis=1)\n"
                 f"        v = tl.load(v_base + cols[:, None] * stride_vt + dvs[None, :]{vload})\n"
                 f"        acc = acc * alpha[:, None] + tl.dot(p.to({dd}), v.to({dd}), out_dtype=tl.float32, "
                 f"input_precision=\"{prec}\")\n"
                 "        m_i = m_new\n")
    # a row with no visible key: log T with empty_rows="mean" (the uniform row's, as semantics.backward.attention_lse
    # gives it), -inf with "nan"
    empty_lse = "tl.log(T.to(tl.float32))" if empty == "mean" else "float(\"-inf\")"
    lse_expr = f"tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), {empty_lse})" if kp else "m_i + tl.log(l_i)"
    if empty == "mean":   # rows with no visible key: the mean of v over all T keys (VMEAN [B, HKV, D_V], fp32)
        body += ("    vmean = tl.load(VMEAN + (b * HKV + kvh) * D_V + dvs, mask=dvs < D_V, other=0.0)\n"
                 "    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], vmean[None, :])\n")
    else:   # no key-padding mask (every row sees key 0), or empty_rows="nan": an empty row is 0 / 0 = NaN
        body += "    out = acc / l_i[:, None]\n"
    body += (
             f"    tl.store(LSE + bh * T + rows, {lse_expr}, mask=rows < T)\n"
             "    o_base = OUT + b * stride_ob + h * stride_oh\n"
             f"    tl.store(o_base + rows[:, None] * stride_ot + dvs[None, :], out.to(OUT.dtype.element_ty), "
             f"mask=(rows[:, None] < T){vmask})\n")
    ptr = AOT_POINTER[dt]
    qk_ptr = AOT_POINTER[qdt]
    sig = {"Q": qk_ptr, "K": qk_ptr, "V": ptr, "OUT": ptr, "LSE": "*fp32"}
    if kp:
        sig.update({"MASK": "*i32", "VMEAN": "*fp32"})
    sig["T"] = "i32"
    for t in "qkvo":
        sig.update({f"stride_{t}b": "i64", f"stride_{t}t": "i32", f"stride_{t}h": "i32"})
    spec = {"H": H, "Hkv": Hkv, "d": d, "d_v": dv, "rope": rope, "dtype": dt, "scale": node.attrs["scale"]}
    if kp:
        spec.update({"key_padding": True, "empty_rows": empty})
    tun = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DV": block_dv, "BLOCK_D": consts["BLOCK_D"],
           "dot_dtype": dd, "dot_precision": prec, "order": "heaviest row blocks first", "mask": "diagonal tiles only"}
    parts = ()
    if rope:
        parts = (_rope_kernel(d, qdt, {"d": d, "dtype": dt, "inv_freq_dtype": dtypes["inv_freq"]}),)
    return KernelSource("attention_fwd", "attention", spec, tun, body, sig, do_not_specialize=("T",),
                        num_warps=num_warps, num_stages=stages, parts=parts)


def attention_grid(kernel, B: int, T: int) -> tuple:
    """(batch x query heads, row blocks): axis 1 is walked from the last (heaviest, most columns) row block."""
    return (B * kernel.source.specialisation["H"], -(-T // kernel.source.tunables["BLOCK_M"]))


def launch_attention(kernel, q, k, v, inv_freq=None, out=None, lse=None, return_lse=False, mask=None):
    """Launches the attention (after ``rope_rotate`` of q and k when the kernel has RoPE).

    ``lse`` (optional, preallocated): the row log-sum-exps the backward consumes, float32, contiguous
    ``[B, H, T]`` (query head h of batch b at ``lse[b, h]``), ``lse[b, h, t] = log sum_{j<=t} exp(scale *
    q_t . k_j)`` with q and k after RoPE (on a row with no visible key: log T for empty_rows="mean", the log-sum-exp of
    the uniform row, -inf for "nan"). ``mask`` [B, T]: the key-padding
    mask of a kernel generated with key_padding=True (nonzero = keep). Returns ``out``, or ``(out, lse)``."""
    import torch

    B, T, H, _ = q.shape
    if out is None:
        out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    elif lse.shape != (B, H, T) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise UnsupportedError(f"op 'attention': lse must be a contiguous float32 [B, H, T] = [{B}, {H}, {T}] "
                               f"tensor, got {lse.dtype} {tuple(lse.shape)}")
    src = kernel.source
    if src.specialisation["rope"]:   # rotate q (times the scale) and k once
        rot = kernel.parts["rope_rotate"]
        rdt = torch_dtype(rot.source.specialisation["rotated_dtype"])
        rotated = []
        for x, mult in ((q, src.specialisation["scale"]), (k, 1.0)):
            y = torch.empty(x.shape, dtype=rdt, device=x.device)
            rot.fn[(-(-T // rot.source.tunables["BLOCK_M"]), B * x.shape[2])](
                x, inv_freq, y, T, x.shape[2], mult, *x.stride()[:3],
                num_warps=rot.source.num_warps, num_stages=rot.source.num_stages)
            rotated.append(y)
        q, k = rotated
    extra = ()
    if src.specialisation.get("key_padding", False):
        if mask is None or tuple(mask.shape) != (B, T):
            raise UnsupportedError(f"op 'attention': the kernel has a key-padding mask: expected a [{B}, {T}] mask, "
                                   f"got {None if mask is None else tuple(mask.shape)}")
        keep = (mask != 0).to(device=q.device, dtype=torch.int32).contiguous()
        vmean = v.float().mean(dim=1).contiguous()   # [B, Hkv, dv]: what a row with no visible key gives
        extra = (keep, vmean)
    elif mask is not None:
        raise UnsupportedError("op 'attention': a key-padding mask was given to a kernel generated without one")
    kernel.fn[attention_grid(kernel, B, T)](q, k, v, out, lse, *extra, T, *q.stride()[:3], *k.stride()[:3],
                                            *v.stride()[:3], *out.stride()[:3],
                                            num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return (out, lse) if return_lse else out
