"""Causal attention (FlashAttention-style online softmax), generated from an ``attention`` node.

GQA is an index map (query head h reads kv head h // G, no copies); with ``rope=True`` the
interleaved rotary embedding is applied while Q and K tiles are loaded: the even and odd lanes of
each pair are loaded as two half-width tiles, rotated in fp32 registers, and the logits are the sum
of two half-width products. Without RoPE the generated kernel has one full-width product instead.
"""
from __future__ import annotations

from ...errors import UnsupportedError
from ...ir.graph import Node
from .codegen import AOT_POINTER, KernelSource, dot_block, dot_policy


def generate_attention(node: Node, dtypes: dict, interpret: bool) -> KernelSource:
    q, k, v = node.inputs[:3]
    H, Hkv, d = q.type.shape[2], k.type.shape[2], q.type.shape[3]
    dv = v.type.shape[3]
    for name, x in (("query heads", H), ("kv heads", Hkv), ("head width", d), ("value width", dv)):
        if not isinstance(x, int):
            raise UnsupportedError(f"op 'attention': the {name} must be static to generate a kernel, got {x}")
    if not node.attrs["causal"]:
        raise UnsupportedError("op 'attention': only causal attention has a Triton kernel")
    rope = bool(node.attrs.get("rope", False))
    dt = dtypes["q"]
    pol = dot_policy(dt, interpret)
    dd, prec = pol["dot_dtype"], pol["dot_precision"]
    block_m, block_n = 64, 64
    block_dv = dot_block(dv, 256)
    consts = dict(H=H, GROUP=H // Hkv, SCALE=node.attrs["scale"], BLOCK_M=block_m, BLOCK_N=block_n, D_V=dv,
                  BLOCK_DV=block_dv)
    if rope:
        consts.update(HALF=d // 2, BLOCK_HALF=dot_block(d // 2, 128))
    else:
        consts.update(D=d, BLOCK_D=dot_block(d, 256))
    body = "".join(f"{a} = tl.constexpr({b!r})\n" for a, b in consts.items()) + "\n\n"
    rope_arg = ", INV_FREQ" if rope else ""
    body += ("@triton.jit\n"
             f"def attention_fwd(Q, K, V{rope_arg}, OUT, T, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,\n"
             "                  stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh):\n"
             "    # out[t] = softmax_{j<=t}(q_t . k_j * SCALE) @ v for one (row block, batch x query head)\n"
             "    pid_m = tl.program_id(0)\n"
             "    bh = tl.program_id(1)\n"
             "    b = (bh // H).to(tl.int64)\n"
             "    h = bh % H\n"
             "    kvh = h // GROUP   # GQA: query head h reads kv head h // GROUP\n"
             "    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)\n"
             "    q_base = Q + b * stride_qb + h * stride_qh\n"
             "    k_base = K + b * stride_kb + kvh * stride_kh\n"
             "    v_base = V + b * stride_vb + kvh * stride_vh\n"
             "    dvs = tl.arange(0, BLOCK_DV)\n")
    if rope:
        body += ("    i = tl.arange(0, BLOCK_HALF)   # pair index: lanes 2i (even) and 2i+1 (odd)\n"
                 "    imask = i < HALF\n"
                 "    inv_freq = tl.load(INV_FREQ + i, mask=imask, other=0.0).to(tl.float32)\n"
                 "    ang = rows[:, None].to(tl.float32) * inv_freq[None, :]\n"
                 "    cos_q, sin_q = tl.cos(ang), tl.sin(ang)\n"
                 "    qmask = (rows[:, None] < T) & imask[None, :]\n"
                 "    qe = tl.load(q_base + rows[:, None] * stride_qt + 2 * i[None, :], mask=qmask, other=0.0).to(tl.float32)\n"
                 "    qo = tl.load(q_base + rows[:, None] * stride_qt + 2 * i[None, :] + 1, mask=qmask, other=0.0).to(tl.float32)\n"
                 f"    q_even = ((qe * cos_q - qo * sin_q) * SCALE).to({dd})\n"
                 f"    q_odd = ((qe * sin_q + qo * cos_q) * SCALE).to({dd})\n")
    else:
        dmask = "" if d == consts["BLOCK_D"] else " & (ds[None, :] < D)"
        body += ("    ds = tl.arange(0, BLOCK_D)\n"
                 f"    q = tl.load(q_base + rows[:, None] * stride_qt + ds[None, :], mask=(rows[:, None] < T){dmask}, other=0.0)\n"
                 f"    q = (q.to(tl.float32) * SCALE).to({dd})\n")
    body += ("    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)\n"
             "    l_i = tl.zeros([BLOCK_M], tl.float32)\n"
             "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)\n"
             "    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)\n"
             "    for n0 in range(0, hi, BLOCK_N):\n"
             "        cols = n0 + tl.arange(0, BLOCK_N)\n")
    if rope:
        body += ("        kmask = imask[:, None] & (cols[None, :] < T)\n"
                 "        ke = tl.load(k_base + cols[None, :] * stride_kt + 2 * i[:, None], mask=kmask, other=0.0).to(tl.float32)\n"
                 "        ko = tl.load(k_base + cols[None, :] * stride_kt + 2 * i[:, None] + 1, mask=kmask, other=0.0).to(tl.float32)\n"
                 "        ang_k = cols[None, :].to(tl.float32) * inv_freq[:, None]\n"
                 "        cos_k, sin_k = tl.cos(ang_k), tl.sin(ang_k)\n"
                 f"        k_even = (ke * cos_k - ko * sin_k).to({dd})\n"
                 f"        k_odd = (ke * sin_k + ko * cos_k).to({dd})\n"
                 f"        logits = tl.dot(q_even, k_even, out_dtype=tl.float32, input_precision=\"{prec}\")\n"
                 f"        logits += tl.dot(q_odd, k_odd, out_dtype=tl.float32, input_precision=\"{prec}\")\n")
    else:
        dmask_t = "" if d == consts["BLOCK_D"] else " & (ds[:, None] < D)"
        body += (f"        kt = tl.load(k_base + cols[None, :] * stride_kt + ds[:, None], mask=(cols[None, :] < T){dmask_t}, other=0.0)\n"
                 f"        logits = tl.dot(q, kt.to(tl.float32).to({dd}), out_dtype=tl.float32, input_precision=\"{prec}\")\n")
    vmask = "" if dv == block_dv else " & (dvs[None, :] < D_V)"
    body += ("        z = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < T), logits, float(\"-inf\"))\n"
             "        m_new = tl.maximum(m_i, tl.max(z, axis=1))\n"
             "        alpha = tl.exp(m_i - m_new)\n"
             "        p = tl.exp(z - m_new[:, None])\n"
             "        l_i = l_i * alpha + tl.sum(p, axis=1)\n"
             f"        v = tl.load(v_base + cols[:, None] * stride_vt + dvs[None, :], mask=(cols[:, None] < T){vmask}, other=0.0)\n"
             f"        acc = acc * alpha[:, None] + tl.dot(p.to({dd}), v.to(tl.float32).to({dd}), out_dtype=tl.float32, "
             f"input_precision=\"{prec}\")\n"
             "        m_i = m_new\n"
             "    out = acc / l_i[:, None]\n"
             "    o_base = OUT + b * stride_ob + h * stride_oh\n"
             f"    tl.store(o_base + rows[:, None] * stride_ot + dvs[None, :], out.to(OUT.dtype.element_ty), "
             f"mask=(rows[:, None] < T){vmask})\n")
    ptr = AOT_POINTER[dt]
    sig = {"Q": ptr, "K": ptr, "V": ptr}
    if rope:
        sig["INV_FREQ"] = AOT_POINTER[dtypes["inv_freq"]]
    sig["OUT"] = ptr
    sig["T"] = "i32"
    for t in "qkvo":
        sig.update({f"stride_{t}b": "i64", f"stride_{t}t": "i32", f"stride_{t}h": "i32"})
    spec = {"H": H, "Hkv": Hkv, "d": d, "d_v": dv, "rope": rope, "dtype": dt, "scale": node.attrs["scale"]}
    tun = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DV": block_dv,
           **({"BLOCK_HALF": consts["BLOCK_HALF"]} if rope else {"BLOCK_D": consts["BLOCK_D"]}),
           "dot_dtype": dd, "dot_precision": prec}
    return KernelSource("attention_fwd", "attention", spec, tun, body, sig,
                        do_not_specialize=("T", "stride_qb", "stride_kb", "stride_vb", "stride_ob"))


def launch_attention(kernel, q, k, v, inv_freq=None, out=None):
    import torch

    B, T, H, _ = q.shape
    if out is None:
        out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    src = kernel.source
    extra = (inv_freq,) if src.specialisation["rope"] else ()
    grid = (-(-T // src.tunables["BLOCK_M"]), B * H)
    kernel.fn[grid](q, k, v, *extra, out, T, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                    num_warps=src.num_warps, num_stages=src.num_stages)
    kernel.launches += 1
    return out
