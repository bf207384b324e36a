"""Static facts of the backward Triton kernels (attention_bwd.py, feedback_bwd.py), with no GPU.

    python benchmarks/triton_static_backward.py --json     # one JSON object per kernel, then one per op
    python benchmarks/triton_static_backward.py            # the same as a Markdown table

Every backward kernel is compiled ahead of time for sm_90 (``GPUTarget("cuda", 90, 32)``, the GPU tile
configuration) in bf16 and f32, and reported as ``backends/triton/aot.compile_kernel`` reports it: registers,
spills, shared memory, wgmma shapes, asynchronous copies. Then a FLOP model of one backward call at
B = 4, T = 8192: issued FLOPs (what the kernels' tiles compute, masked tiles included) over useful FLOPs (the
minimum of a backward that recomputes the logits once: attention 2P(3d + 2dv), P = T(T+1)/2 causal pairs per
head; feedback 2P'(3 d_qk + 2 d_v), P' = T(T-1)/2: logits, the adjoint solve's G^T df, dP, dq_b and dk_b, with
dgamma = rowsum(P * dP) free), with and without the log-sum-exp kernel (which the forward can store).
Shapes: attention 8 query heads over 2 kv heads of width 128 with RoPE;
feedback widths 128 (the kernels hold a whole row of q_b, k_b, s and df
in one tile: widths up to 256), the selective scan's reverse scan (64 channels, 16 states; compile facts only), the
attention kernels that read a key-padding mask (op "attention_backward_masked": lse, dkdv, dq; compile facts only),
and the "strips" strategy at the target layer's feedback width 1024. These are estimates from the compiled code,
not measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))   # triton_static (the forward's model and rates)

ATTENTION = {"H": 8, "Hkv": 2, "d": 128, "dv": 128, "rope": True}
FEEDBACK = {"d_qk": 128, "d_v": 128, "chunk": 64, "outer": 256, "strategy": "rows"}
FEEDBACK_WIDE = {"d_qk": 1024, "d_v": 1024, "chunk": 64, "outer": 256, "strategy": "strips"}   # SessaLayer(1024)


def _cdiv(a, b):
    return -(-a // b)


def attention_flops(role: str, tu: dict, B: int, T: int) -> int:
    """Issued FLOPs of one attention-backward kernel's launches (tl.dot products only)."""
    H, d, dv = ATTENTION["H"], ATTENTION["d"], ATTENTION["dv"]
    if role in ("delta", "rope"):
        return 0
    BM, BN = tu["BLOCK_M"], tu["BLOCK_N"]
    if role in ("lse", "dq"):
        tiles = sum(_cdiv(min((m + 1) * BM, T), BN) for m in range(_cdiv(T, BM)))
        per = d if role == "lse" else 2 * d + dv          # logits; + dP and dS K
        return 2 * B * H * tiles * BM * BN * per
    tiles = sum(_cdiv(T - (n * BN // BM) * BM, BM) for n in range(_cdiv(T, BN)))   # dkdv: later row blocks
    return 2 * B * H * tiles * BM * BN * (2 * d + 2 * dv)   # logits, dV, dP^T, dK (per query head of the group)


def strips_flops(role: str, tu: dict, B: int, T: int, cfg: dict) -> int:
    """Issued FLOPs of one kernel of the "strips" strategy (feedback_bwd_wide.py)."""
    d, dv, C, CO = cfg["d_qk"], cfg["d_v"], cfg["chunk"], cfg["outer"]
    if role in ("lse", "dinv", "rowsum"):
        return feedback_flops(role, tu, B, T, cfg) if role != "rowsum" else 0
    total = 0
    for r0 in range(0, T, CO):
        r1 = min(r0 + CO, T)
        n = r1 - r0
        if role == "colprobs":
            total += _cdiv(T - r0, tu["BLOCK_M"]) * _cdiv(n, tu["BLOCK_N"]) * 2 * tu["BLOCK_M"] * tu["BLOCK_N"] * d
        elif role == "rowprobs":
            total += _cdiv(n, tu["BLOCK_M"]) * _cdiv(r1, tu["BLOCK_N"]) * 2 * tu["BLOCK_M"] * tu["BLOCK_N"] * (d + dv)
        elif role == "solve":
            m = _cdiv(n, C)
            total += _cdiv(dv, tu["BLOCK_DV"]) * (m * (m + 1) // 2) * 2 * C * C * tu["BLOCK_DV"]
        else:
            BM, BN, BK = tu["BLOCK_M"], tu["BLOCK_N"], tu["BLOCK_K"]
            m_rows, n_cols, k_len = {"update": (n, dv, T - r1), "dq": (n, d, r1), "dk": (r1, d, n)}[role]
            total += _cdiv(m_rows, BM) * _cdiv(n_cols, BN) * _cdiv(k_len, BK) * 2 * BM * BN * BK
    return B * total


def feedback_flops(role: str, tu: dict, B: int, T: int, cfg: dict = FEEDBACK) -> int:
    if cfg["strategy"] == "strips" and role not in ("lse", "dinv"):
        return strips_flops(role, tu, B, T, cfg)
    d, dv, C, CO = cfg["d_qk"], cfg["d_v"], cfg["chunk"], cfg["outer"]
    if role == "lse":
        BM, BN = tu["BLOCK_M"], tu["BLOCK_N"]
        return 2 * B * sum(_cdiv((m + 1) * BM - 1, BN) for m in range(_cdiv(T, BM))) * BM * BN * d
    if role == "dinv":
        n = B * _cdiv(T, C)
        return n * 2 * C * C * d + n * (C.bit_length() - 2) * 2 * 2 * C ** 3
    if role == "update":
        BM, BN, BDV = tu["BLOCK_M"], tu["BLOCK_N"], tu["BLOCK_DV"]
        total = 0
        for r0 in range(0, T, CO):
            r1 = min(r0 + CO, T)
            total += _cdiv(r1 - r0, BN) * _cdiv(dv, BDV) * _cdiv(T - r1, BM) * 2 * BM * BN * (d + BDV)
        return B * total
    if role == "solve":
        BDV = tu["BLOCK_DV"]
        total = 0
        for r0 in range(0, T, CO):
            n = _cdiv(min(r0 + CO, T) - r0, C)
            pairs = n * (n - 1) // 2
            total += _cdiv(dv, BDV) * (pairs * 2 * C * C * (d + BDV) + n * 2 * C * C * BDV)
        return B * total
    BM, BN = tu["BLOCK_M"], tu["BLOCK_N"]
    if role == "dq":   # pass 1: logits, alpha s; pass 2: logits, dP, dS k_b
        tiles = sum(_cdiv(min((m + 1) * BM - 1, T), BN) for m in range(_cdiv(T, BM)))
        return 2 * B * tiles * BM * BN * ((d + dv) + (2 * d + dv))
    tiles = sum(_cdiv(T - (n * BN // BM) * BM, BM) for n in range(_cdiv(T, BN)))   # dk
    return 2 * B * tiles * BM * BN * (2 * d + dv)


def sources(dtype: str) -> dict:
    from sessa_compiler.backends.triton.attention_bwd import generate_attention_backward
    from sessa_compiler.backends.triton.feedback_bwd import generate_feedback_backward

    a = ATTENTION
    att = generate_attention_backward(a["H"], a["Hkv"], a["d"], a["dv"], a["d"] ** -0.5, dtype, False, rope=a["rope"])
    # the key-padding-mask variants (the kernels that read the mask; delta and rope are the same kernels)
    masked = generate_attention_backward(a["H"], a["Hkv"], a["d"], a["dv"], a["d"] ** -0.5, dtype, False,
                                         rope=a["rope"], key_padding=True)
    masked = {role: src for role, src in masked.items() if role in ("lse", "dkdv", "dq")}
    fbs = {}
    for name, f in (("feedback_backward", FEEDBACK), ("feedback_backward_strips", FEEDBACK_WIDE)):
        fbs[name] = generate_feedback_backward(f["d_qk"], f["d_v"], f["d_qk"] ** -0.5, f["chunk"], f["outer"],
                                               {"f": dtype, "q_b": dtype, "gamma": dtype}, False,
                                               strategy=f["strategy"])
    from sessa_compiler.backends.triton.scan_bwd import generate_scan_backward

    return {"attention_backward": att, "attention_backward_masked": masked, **fbs,
            "scan_backward": generate_scan_backward(64, 16, 16, dtype)}


def records(B: int, T: int, dtypes=("bf16", "f32")) -> list:
    from sessa_compiler.backends.triton.aot import compile_kernel

    out = []
    for dt in dtypes:
        for op, srcs in sources(dt).items():
            cfg = {"attention_backward": ATTENTION, "feedback_backward": FEEDBACK,
                   "feedback_backward_strips": FEEDBACK_WIDE}.get(op)
            flops = attention_flops if op == "attention_backward" else (
                lambda role, tu, B, T, cfg=cfg: feedback_flops(role, tu, B, T, cfg) if cfg else 0)
            issued = {}
            for role, src in srcs.items():
                rec = compile_kernel(src)
                issued[role] = flops(role, src.tunables, B, T)
                rec.update({"op": op, "role": role, "dtype": dt, "issued_flops": issued[role],
                            "tunables": {k: str(v) for k, v in src.tunables.items()}})
                out.append(rec)
            if op in ("scan_backward", "attention_backward_masked"):   # compiled for the static facts only (the
                continue                     # masked attention's FLOPs: the unmasked model's plus its padded rows')
            if op == "attention_backward":
                a = ATTENTION
                useful = 2 * B * a["H"] * T * (T + 1) // 2 * (3 * a["d"] + 2 * a["dv"])
            else:
                f = cfg
                useful = 2 * B * T * (T - 1) // 2 * (3 * f["d_qk"] + 2 * f["d_v"])
            total = sum(issued.values())
            out.append({"kernel": op, "dtype": dt, "issued_flops": total, "useful_flops": useful,
                        "issued_over_useful": total / useful,
                        "issued_over_useful_lse_given": (total - issued["lse"]) / useful,
                        "config": f"B={B}, T={T}, {cfg}"})
    return out


def _rate(rec: dict) -> float:
    """The tensor-core rate a kernel's products run at, from its compiled wgmma shapes: k16 (bf16/f16 operands) at
    the bf16 rate, k8 (TF32) at half of it; no wgmma: 0 (memory-bound)."""
    from triton_static import BF16_FLOPS, TF32_FLOPS

    shapes = rec.get("wgmma_shapes") or []
    if not shapes:
        return 0.0
    return TF32_FLOPS if any(sh.endswith("k8") for sh in shapes) else BF16_FLOPS


def strip_bytes(role: str, B: int, T: int, cfg: dict = FEEDBACK_WIDE) -> int:
    """The [B, CO, T] float32 strips one kernel of the strips strategy writes and reads, summed over the outer
    chunks (the module docstring of feedback_bwd_wide.py: PT written by colprobs, read by update; P and W written
    by rowprobs, read and W rewritten by rowsum, W read by dq and dk)."""
    CO = cfg["outer"]
    per = {"colprobs": ("tail", 1), "update": ("rest", 1), "rowprobs": ("head", 2), "rowsum": ("head", 3),
           "dq": ("head", 1), "dk": ("head", 1)}.get(role)
    if per is None:
        return 0
    span, times = per
    total = 0
    for r0 in range(0, T, CO):
        r1 = min(r0 + CO, T)
        cols = {"tail": T - r0, "rest": T - r1, "head": r1}[span]
        total += 4 * B * (r1 - r0) * cols * times
    return total


def layer_training_estimate(B: int, T: int, recs: list) -> dict:
    """The target layer (triton_static.py: bf16 SessaLayer(1024, n_heads=8)) forward + backward against its forward,
    on one basis: every kernel at its own roofline (issued FLOPs at the rate of its compiled wgmma shapes, against
    the bytes it must move), the torch ops at theirs. The backward: the attention backward kernels given the
    forward's lse (delta, dK/dV, dQ, RoPE's transpose), the strips feedback backward at width 1024 with its strip
    traffic, and the torch ops' backward at twice the forward torch ops' time (each linear's dX and dW products;
    the elementwise ops' gradients read and write about twice their forward's bytes). The forward's per-launch
    model (launches, L2, occupancy, sequential chains: triton_static.py's est_ms) has no backward counterpart yet,
    so the ratio is taken between rooflines; the forward's est_ms over its roofline is printed beside it."""
    import triton_static as ts

    fwd = next(r for r in ts.records(B, T) if r.get("kernel") == "layer")
    rows = []
    for r in recs:
        if r.get("dtype") != "bf16" or "role" not in r:
            continue
        if r["op"] == "attention_backward" and r["role"] != "lse":
            nbytes = 0
            if r["role"] in ("delta", "rope"):   # out and dO (delta), q and k read and written (rope), bf16
                a = ATTENTION
                nbytes = 2 * 2 * B * T * a["H"] * (a["dv"] if r["role"] == "delta" else a["d"])
        elif r["op"] == "feedback_backward_strips" and r["role"] != "lse":
            nbytes = strip_bytes(r["role"], B, T)
        else:
            continue
        rate = _rate(r)
        flop_s = r["issued_flops"] / rate if rate else 0.0
        rows.append({"kernel": r["kernel"], "op": r["op"], "flop_ms": 1e3 * flop_s, "bytes": nbytes,
                     "ms": 1e3 * max(flop_s, nbytes / ts.BYTES_PER_S)})
    torch_bwd_ms = 2 * fwd["torch_ops_ms"]
    bwd_ms = sum(r["ms"] for r in rows) + torch_bwd_ms
    ratio = (fwd["roofline_ms"] + bwd_ms) / fwd["roofline_ms"]
    return {"kernel": "layer_training", "forward_roofline_ms": fwd["roofline_ms"], "forward_est_ms": fwd["est_ms"],
            "backward_kernels": rows, "backward_torch_ops_ms": torch_bwd_ms, "backward_roofline_ms": bwd_ms,
            "strip_bytes": sum(r["bytes"] for r in rows if r["op"] == "feedback_backward_strips"),
            "fwd_bwd_over_fwd": ratio, "target": 3.5, "met": ratio <= 3.5,
            "config": f"bf16 SessaLayer(D={ts.TARGET['D']}, H={ts.TARGET['H']}), B={B}, T={T}, sm_90"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-T", type=int, default=8192)
    ap.add_argument("--dtype", action="append", help="bf16 and/or f32 (default both)")
    ap.add_argument("--layer", action="store_true",
                    help="also the target layer's forward + backward against its forward (compiles the forward too)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    recs = records(args.B, args.T, tuple(args.dtype or ("bf16", "f32")))
    layer = layer_training_estimate(args.B, args.T, recs) if args.layer else None
    if args.json:
        for r in recs + ([layer] if layer else []):
            print(json.dumps(r), flush=True)
        return 0
    cols = ("kernel", "dtype", "num_warps", "registers", "spill_bytes", "shared_bytes", "wgmma_shapes", "cp_async",
            "issued_flops", "issued_over_useful", "issued_over_useful_lse_given")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in recs:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) or (isinstance(v, int) and v > 10 ** 6) else
                         " ".join(v) if isinstance(v, list) else str(v))
        print("| " + " | ".join(cells) + " |")
    if layer:
        print(f"\nLayer forward + backward ({layer['config']}), each kernel at its roofline:\n")
        print("| backward kernel | op | FLOPs at its rate ms | strip bytes | ms |\n|---|---|---:|---:|---:|")
        for r in layer["backward_kernels"]:
            print(f"| {r['kernel']} | {r['op']} | {r['flop_ms']:.3f} | {r['bytes']:.3g} | {r['ms']:.3f} |")
        print(f"| torch ops' backward (2x the forward's) | | | | {layer['backward_torch_ops_ms']:.3f} |")
        print(f"\nforward {layer['forward_roofline_ms']:.3f} ms at the rooflines (modelled per launch: "
              f"{layer['forward_est_ms']:.3f} ms), backward {layer['backward_roofline_ms']:.3f} ms: forward + backward "
              f"= {layer['fwd_bwd_over_fwd']:.2f}x the forward (target 3.5x: {'met' if layer['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
