"""Static proofs of the Triton kernels at the target configuration, with no GPU.

    python benchmarks/triton_static.py --json      # one JSON object per kernel, then one for the layer
    python benchmarks/triton_static.py             # a Markdown table, the layer's breakdown and the what-ifs

Target: a bf16 ``SessaLayer(1024, n_heads=8)`` (head dim 128), B = 4, T = 8192. The layer is traced,
run through the Triton pipeline, and every kernel it generates is compiled ahead of time for sm_90
(``triton.compile`` with ``GPUTarget("cuda", 90, 32)``), with the launch configs a CUDA call gets
(the shipped sm_90 defaults) and the same divisibility specialisation the launcher gets at run time; the attention kernel with RoPE folded in is compiled too. For each
kernel it reports the launch configuration, registers and spills (``cuobjdump -res-usage``), shared
memory, the ``wgmma`` shapes, asynchronous copies and vector loads in the PTX, and its own roofline
estimate: issued FLOPs (what the kernel's tiles compute, masked tiles included) over 790 TFLOP/s
(bf16 dense; tf32 products at half that, 3xTF32 at a sixth) against the bytes it must move (each operand and result
once) over 4.3 TB/s. ``useful_flops`` is the op's own minimum (causal logits once, P @ s once).
Also compiled: the general ``tri_solve`` on explicit bf16 [B, T, T] weights with the feedback's f as b
(a fallback, not part of the layer; its grid is batch x column tiles, so its FLOP rate is scaled by
the fraction of the 132 SMs that grid fills). The layer line adds the ops that run in torch
(matmuls at the same roofline, the rest by bytes). That per-kernel roofline is kept as ``roofline_ms``:
a lower bound.

The estimate (``est_ms``) models what the roofline leaves out:
- every launch: its grid and, per CTA in the order the hardware issues them, tensor-core FLOPs, exp and
  ALU work of the softmax and masks, the bytes it moves between L2 and the SM (from the tile schedule:
  a tile re-read by every CTA that needs it is counted every time), and latency chains it cannot overlap
  (the solve's inner blocks: each dependent load waited on before its product);
- occupancy (``ctas_per_sm``) from the compiled registers and shared memory; CTAs are list-scheduled
  onto the 132 SMs in issue order (so a grid under 132 CTAs, or the heaviest CTAs issued last, shows);
- a kernel takes the longest of that schedule, its HBM bytes (re-reads where the working set exceeds
  the 50 MB L2, e.g. the fp32 s re-read by every outer chunk's update) and its L2 bytes at the L2 rate;
- launches on one stream: the host pays a cost per launch, the device a gap between dependent kernels
  (``launch_ms``); ``est_graph_ms`` replays the same launches as a CUDA graph.
The rates the device was not measured for (L2 bandwidth and latency, clocks, host costs) are named
constants below. The layer's feedback runs the one-pass kernels (feedback_online.py); the lse-first
fallback (a log-sum-exp pass, an inverse pass, then the solve) is compiled and modelled as a variant, and
``lse_first_feedback_ms`` is the layer with it. These are estimates from the compiled code, not measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BF16_FLOPS = 790e12
TF32_FLOPS = BF16_FLOPS / 2
BYTES_PER_S = 4.3e12
SMS = 132   # H200 streaming multiprocessors (tri_solve's grid fills fewer)
TARGET = {"B": 4, "T": 8192, "D": 1024, "H": 8}
VIEW_OPS = {"reshape", "split", "slice", "squeeze", "unsqueeze", "permute", "transpose", "expand", "view"}
ESIZE = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "bool": 1}


def _dim(x, B, T) -> int:
    import sympy

    return int(sympy.sympify(str(x)).subs({"B": B, "T": T}))


def _bytes(value, B, T) -> int:
    return math.prod(_dim(x, B, T) for x in value.type.shape) * ESIZE.get(value.type.dtype.name, 4)


def _cdiv(a, b):
    return -(-a // b)


def _rate(tunables: dict, kind: str) -> float:
    """FLOP/s of a kernel's products: ``kind`` "dot" (inputs: dot_dtype/dot_precision) or "solve"."""
    if kind == "dot" and tunables.get("dot_dtype", "tl.float32") != "tl.float32":
        return BF16_FLOPS
    prec = tunables.get("dot_precision" if kind == "dot" else "solve_precision", "tf32")
    return TF32_FLOPS / 3 if prec == "tf32x3" else TF32_FLOPS


def kernel_flops(src, B: int, T: int) -> tuple:
    """(issued FLOPs, useful FLOPs, seconds at the roofline) of one kernel's launches for a call at (B, T)."""
    sp, tu, name = src.specialisation, src.tunables, src.name
    if name == "attention_fwd":
        H, d, dv, BM, BN = sp["H"], sp["d"], sp["d_v"], tu["BLOCK_M"], tu["BLOCK_N"]
        tiles = sum(_cdiv(min((p + 1) * BM, T), BN) for p in range(_cdiv(T, BM)))
        issued = 2 * B * H * tiles * BM * BN * (d + dv)
        return issued, 2 * B * H * T * (T + 1) // 2 * (d + dv), issued / _rate(tu, "dot")
    if name == "feedback_lse":
        D, BM, BN = sp["D_qk"], tu["BLOCK_M"], tu["BLOCK_N"]
        tiles = sum(_cdiv((p + 1) * BM - 1, BN) for p in range(_cdiv(T, BM)))
        issued = 2 * B * tiles * BM * BN * D
        return issued, 0, issued / _rate(tu, "dot")   # recomputes logits the probabilities use: no useful work
    if name == "feedback_diag_inverse":
        D, C = sp["D_qk"], sp["chunk_size"]
        n = B * _cdiv(T, C)
        logits, inverse = n * 2 * C * C * D, n * (int(math.log2(C)) - 1) * 2 * 2 * C ** 3
        return logits + inverse, n * C * (C - 1) * D, logits / _rate(tu, "dot") + inverse / _rate(tu, "solve")
    if name in ("feedback_probs", "feedback_update", "feedback_solve"):
        C, CO = sp["chunk_size"], tu["CO"]
        D, Dv = sp["D_qk"], sp["D_v"]
        issued = useful = 0
        for r0 in range(0, T, CO):
            rows = range(r0, min(r0 + CO, T))
            if name == "feedback_probs":
                BN = tu["BLOCK_N"]
                issued += 2 * CO * _cdiv(min(r0 + CO, T), BN) * BN * D
                useful += sum(2 * (t // C) * C * D for t in rows)
            elif name == "feedback_update":
                issued += 2 * CO * r0 * _cdiv(Dv, tu["BLOCK_N"]) * tu["BLOCK_N"]
                useful += 2 * len(rows) * r0 * Dv
            else:
                n_inner = _cdiv(len(rows), C)
                issued += sum(2 * (i + 1) * C * C * Dv for i in range(n_inner))   # earlier inner blocks + inverse
                useful += sum(2 * ((t // C) * C - r0) * Dv + (t % C) * Dv for t in rows)
        rate = _rate(tu, "dot" if name == "feedback_probs" else "solve")
        return B * issued, B * useful, B * issued / rate
    if name in ("feedback_probs_online", "feedback_update_online", "feedback_solve_online"):
        C, CO, D, Dv = sp["chunk_size"], tu["CO"], sp["D_qk"], sp["D_v"]
        issued = useful = extra = 0
        for r0 in range(0, T, CO):
            rows = range(r0, min(r0 + CO, T))
            if name == "feedback_probs_online":   # tiles left of each row block's last row: every causal logit once
                BM, BN = tu["BLOCK_M"], tu["BLOCK_N"]
                for m in range(CO // BM):
                    issued += 2 * BM * BN * D * _cdiv(r0 + (m + 1) * BM - 1, BN)
                useful += sum(2 * t * D for t in rows)
            elif name == "feedback_update_online":
                issued += 2 * CO * r0 * _cdiv(Dv, tu["BLOCK_N"]) * tu["BLOCK_N"]
                useful += 2 * len(rows) * r0 * Dv
                extra += (CO // C) * (int(math.log2(C)) - 1) * 2 * 2 * C ** 3   # the diagonal inverses (overhead)
            else:
                n_inner = _cdiv(len(rows), C)
                issued += sum(2 * (i + 1) * C * C * Dv for i in range(n_inner))
                useful += sum(2 * ((t // C) * C - r0) * Dv + (t % C) * Dv for t in rows)
        if name == "feedback_update_online":
            rate = BF16_FLOPS if tu["update_dtype"] != "tl.float32" else _rate(tu, "solve")
            return B * (issued + extra), B * useful, B * issued / rate + B * extra / _rate(tu, "solve")
        rate = _rate(tu, "dot" if name == "feedback_probs_online" else "solve")
        return B * issued, B * useful, B * issued / rate
    if name in ("tri_solve_fwd", "tri_solve_diag_inverse"):
        BM, N, nb = tu["BM"], sp["N"], B   # the variant's weights are [B, T, T]
        n_blocks = _cdiv(T, BM)
        if name == "tri_solve_diag_inverse":   # log2(BM) - 1 squarings, two BM^3 products each; overhead only
            issued, useful, programs = nb * n_blocks * (int(math.log2(BM)) - 1) * 2 * 2 * BM ** 3, 0, nb * n_blocks
        else:   # block i: i reductions over solved blocks and one product by its inverse, per column tile
            BN = tu["BLOCK_N"]
            programs = nb * _cdiv(N, BN)
            issued = programs * sum(i + 1 for i in range(n_blocks)) * 2 * BM * BM * BN
            useful = nb * T * T * N   # substitution: T^2/2 multiply-adds per column
        # only `programs` of the SMs work (the solve's grid is batch x column tiles): the rate scales down
        busy = min(1.0, programs / SMS)
        return issued, useful, issued / (_rate(tu, "solve") * busy)
    return 0, 0, 0.0   # elementwise / scan: no tensor-core work


def kernel_bytes(src, node, B: int, T: int) -> int:
    """Each operand and result once; the feedback solve's workspace traffic counted per outer chunk."""
    own = sum(_bytes(v, B, T) for v in list(node.inputs) + list(node.outputs) if hasattr(v, "type"))
    if src.name in ("feedback_probs", "feedback_update", "feedback_solve"):
        CO, Dv = src.tunables["CO"], src.specialisation["D_v"]
        p_bytes = sum(4 * B * CO * min(r0 + CO, T) for r0 in range(0, T, CO))   # P written once, read once
        return (p_bytes if src.name == "feedback_probs" else p_bytes // 2 + 2 * 4 * B * T * Dv)
    if src.name in ("feedback_probs_online", "feedback_update_online", "feedback_solve_online"):
        tu, sp = src.tunables, src.specialisation
        CO, Dv, D, C = tu["CO"], sp["D_v"], sp["D_qk"], sp["chunk_size"]
        pb = 2 if tu.get("p_dtype", "fp32") != "fp32" else 4
        chunks = range(0, T, CO)
        p_bytes = sum(pb * B * CO * min(r0 + CO, T) for r0 in chunks)   # P written once, read once
        if src.name == "feedback_probs_online":   # q and k once per chunk, P and the per-tile max / sum written
            return sum(2 * B * (CO + min(r0 + CO, T)) * D for r0 in chunks) + p_bytes + 8 * B * CO * T // 128
        if src.name == "feedback_update_online":   # P, f, S out, the inverses out (s of earlier rows: L2 or HBM)
            return p_bytes + 2 * B * T * Dv + 4 * B * T * Dv + 4 * B * T * C
        return 2 * 4 * B * T * Dv + 2 * B * T * Dv + 4 * B * T * C
    if src.name.startswith("tri_solve"):   # one triangle of A, b, x (and its fp32 copy for 16-bit b), the inverses
        A, b = node.inputs
        BM, N = src.tunables["BM"], src.specialisation["N"]
        dinv = 4 * B * _cdiv(T, BM) * BM * BM
        if src.name == "tri_solve_diag_inverse":
            return B * _cdiv(T, BM) * BM * BM * ESIZE[A.type.dtype.name] // 2 + dinv
        fp32_x = 2 * 4 * B * T * N if b.type.dtype.name != "f32" else 0
        return _bytes(A, B, T) // 2 + 2 * _bytes(b, B, T) + fp32_x + dinv
    if src.name == "rope_rotate":
        return 0   # counted with the attention kernel below
    if src.name == "attention_fwd" and src.specialisation["rope"]:
        q, k = node.inputs[0], node.inputs[1]
        own += 2 * (_bytes(q, B, T) + _bytes(k, B, T))   # the rotated copies: written once, read once
    return own



# -- the honest model: launches, occupancy, tile schedule, L2 traffic, sequential chains ----------------------
# Device (H200 SXM, sm_90). Rates that were not measured here are assumptions, named once:
CLOCK_HZ = 1.755e9          # sustained SM clock under load (assumed; boost is 1.98 GHz)
L2_BYTES = 50 * 2 ** 20     # L2 capacity
L2_BYTES_PER_S = 7.0e12     # L2 -> SM bandwidth, all SMs together (assumed: ~5.5 TB/s measured on a 114-SM H100
                            # PCIe at <= 1.755 GHz, chipsandcheese 2023, scaled to 132 SMs)
SM_L2_BYTES_PER_CLK = 64    # what one SM's L1 can take from L2 per clock when few SMs compete (assumed)
L2_LATENCY_S = 0.3e-6       # one dependent round trip: tile load from L2 (~260-480 cycles near/far) then its use
SFU_PER_SM_CLK = 16         # exp2 (MUFU) results per SM per clock
ALU_PER_SM_CLK = 128        # fp32 ALU operations per SM per clock
REGS_PER_SM, SHARED_PER_SM, MAX_CTAS_PER_SM, MAX_WARPS_PER_SM = 65536, 233472, 32, 64
HOST_LAUNCH_S = {"triton": 10e-6, "torch": 5e-6}   # Python + driver per launch without a graph (a review of the sm_90 launch path: 9-12 us)
DEVICE_GAP_S = 2.0e-6       # gap between dependent kernels in one stream, eager launches (same review: 1.5-3 us)
GRAPH_GAP_S = 1.0e-6        # the same inside a replayed CUDA graph (assumed)
GRAPH_LAUNCH_S = 10e-6      # host cost of one graph replay (assumed)
SOFTMAX_ALU = 5             # fp32 ops per logit of an online softmax (max, sum, rescale, convert), assumed
MASK_ALU = 4                # two compares, and, select per masked logit, assumed


class Work:
    """What one CTA does: tensor-core FLOPs (at ``rate`` for the whole chip), exp and ALU ops, bytes it loads
    from / stores to L2, and ``serial_s`` of latency on a dependency chain it cannot overlap."""
    __slots__ = ("tc", "rate", "sfu", "alu", "l2", "serial_s")

    def __init__(self, tc=0.0, rate=BF16_FLOPS, sfu=0.0, alu=0.0, l2=0.0, serial_s=0.0):
        self.tc, self.rate, self.sfu, self.alu, self.l2, self.serial_s = tc, rate, sfu, alu, l2, serial_s

    def seconds(self, share: int, active_sms: int = SMS) -> float:
        """SM time of this CTA while ``active_sms`` SMs draw on L2 (an SM runs its CTAs' work back to back at
        its full rate, work-conserving): tensor cores, exp and ALU serialise (Triton's generated loops wait
        on each product before the softmax), L2 traffic overlaps them; the dependency chain ``serial_s``
        adds, hidden by the other ``share - 1`` resident CTAs in proportion."""
        compute = (self.tc / (self.rate / SMS) + self.sfu / (SFU_PER_SM_CLK * CLOCK_HZ)
                   + self.alu / (ALU_PER_SM_CLK * CLOCK_HZ))
        l2_rate = min(SM_L2_BYTES_PER_CLK * CLOCK_HZ, L2_BYTES_PER_S / max(1, active_sms))
        return max(compute, self.l2 / l2_rate) + self.serial_s / share


class Launch:
    """One kernel launch: its grid, its CTAs' work in the order the hardware issues them, the HBM bytes."""

    def __init__(self, grid: tuple, ctas: list, hbm: float, serial_note: str = ""):
        self.grid, self.ctas, self.hbm = grid, ctas, hbm   # ctas: [(count, Work)] in issue order

    @property
    def n_ctas(self) -> int:
        return sum(c for c, _ in self.ctas)

    def seconds(self, ctas_per_sm: int) -> dict:
        import heapq

        n = self.n_ctas
        share = max(1, min(ctas_per_sm, -(-n // SMS)))
        slots = [0.0] * min(n, SMS)
        flops = l2 = serial = 0.0
        for count, w in self.ctas:   # greedy, in issue order: each CTA goes to the SM with the least work
            t = w.seconds(share, min(n, SMS))
            for _ in range(count):
                heapq.heappush(slots, heapq.heappop(slots) + t)
            flops += count * w.tc
            l2 += count * w.l2
            serial = max(serial, w.serial_s)
        makespan = max(slots) if slots else 0.0
        t = max(makespan, self.hbm / BYTES_PER_S, l2 / L2_BYTES_PER_S)
        return {"s": t, "l2": l2, "flops": flops, "serial_s": serial, "fill": min(1.0, n / (SMS * share)),
                "bound": "schedule" if t == makespan else ("hbm" if t == self.hbm / BYTES_PER_S else "l2")}


def ctas_per_sm(rec: dict) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory (1 KB reserved
    per CTA) and warps."""
    warps = rec["num_warps"]
    regs = warps * (-(-rec["registers"] * 32 // 256) * 256)
    by_regs = REGS_PER_SM // max(1, regs)
    by_shared = SHARED_PER_SM // (rec["shared_bytes"] + 1024) if rec["shared_bytes"] else MAX_CTAS_PER_SM
    return max(0, min(by_regs, by_shared, MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // warps))


def _attention_launches(src, B, T):
    sp, tu = src.specialisation, src.tunables
    H, d, dv, BM, BN = sp["H"], sp["d"], sp["d_v"], tu["BLOCK_M"], tu["BLOCK_N"]
    es = 4 if tu["dot_dtype"] == "tl.float32" else 2
    nM = _cdiv(T, BM)
    diag_only = tu.get("mask") == "diagonal tiles only"
    works = []
    for m in range(nM):
        hi = min((m + 1) * BM, T)
        tiles = _cdiv(hi, BN)
        masked = tiles - (m * BM) // BN if diag_only else tiles
        elems = tiles * BM * BN
        works.append(Work(tc=2 * BM * BN * (d + dv) * tiles, rate=_rate(tu, "dot"), sfu=elems,
                          alu=elems * SOFTMAX_ALU + masked * BM * BN * MASK_ALU,
                          l2=es * (BM * d + tiles * BN * (d + dv) + BM * dv) + 4 * BM))
    if tu.get("order") == "heaviest row blocks first":   # grid (B*H, nM), axis 1 walked from the last row block
        ctas = [(B * H, works[m]) for m in reversed(range(nM))]
        grid = (B * H, nM)
    else:                                                 # grid (nM, B*H): each head's blocks lightest first
        ctas = [(1, works[m]) for _ in range(B * H) for m in range(nM)]
        grid = (nM, B * H)
    hbm = 2 * B * T * H * (2 * d + 2 * dv) + 4 * B * H * T   # q, k, v, out once (+ lse): K/V of a head stay in L2
    return [Launch(grid, ctas, hbm)]


def _lse_launches(src, B, T):
    sp, tu = src.specialisation, src.tunables
    D, BM, BN, BK = sp["D_qk"], tu["BLOCK_M"], tu["BLOCK_N"], tu["BLOCK_K"]
    ctas = []
    nM = _cdiv(T, BM)
    if tu.get("order") == "heaviest row blocks first":   # grid (B, nM), axis 1 walked from the last row block
        order, grid = [m for m in reversed(range(nM)) for _b in range(B)], (B, nM)
    else:                                                 # grid (nM, B): each batch row's blocks lightest first
        order, grid = [m for _b in range(B) for m in range(nM)], (nM, B)
    for m in order:
        tiles = _cdiv((m + 1) * BM - 1, BN)
        q_loads = 1 if tu["q_hoisted"] else tiles   # q re-read per column tile when the width does not fit
        ctas.append((1, Work(tc=2 * BM * BN * D * tiles, rate=_rate(tu, "dot"), sfu=tiles * BM * BN,
                             alu=tiles * BM * BN * (SOFTMAX_ALU + MASK_ALU),
                             l2=2 * (q_loads * BM * D + tiles * BN * D) + 4 * BM)))
    return [Launch(grid, ctas, 2 * 2 * B * T * D + 4 * B * T)]


def _diag_inverse_launches(src, B, T):
    sp, tu = src.specialisation, src.tunables
    D, C = sp["D_qk"], sp["chunk_size"]
    squarings = int(math.log2(C)) - 1
    w = Work(tc=2 * C * C * D, rate=_rate(tu, "dot"), sfu=C * C, alu=C * C * 8, l2=2 * 2 * C * D + 4 * C * C + 8 * C)
    inv = Work(tc=squarings * 2 * 2 * C ** 3, rate=_rate(tu, "solve"))
    both = Work(tc=w.tc + 0, rate=w.rate, sfu=w.sfu, alu=w.alu, l2=w.l2,
                serial_s=inv.seconds(1) + squarings * 2 * L2_LATENCY_S / 4)   # the squarings chain (on-chip)
    n = _cdiv(T, C)
    return [Launch((n, B), [(n * B, both)], 2 * 2 * B * T * D + 4 * B * n * C * C + 8 * B * T)]


def _online_chunk_launches(src, parts, B, T):
    """The one-pass solve (feedback_online.py), per outer chunk: probabilities (split-K max/sum), the combine with
    the update (rescaled P @ s) and the lse / diagonal inverses, the inner blocks. As generated: P's dtype, the
    update's dtype, grids in their issue order (axis 0 fastest)."""
    from sessa_compiler.backends.triton.feedback import update_splits

    sp, tu = src.specialisation, src.tunables
    ps, us = parts["feedback_probs_online"], parts["feedback_update_online"]
    D, Dv, C, CO = sp["D_qk"], sp["D_v"], sp["chunk_size"], tu["CO"]
    pm, pn = ps.tunables["BLOCK_M"], ps.tunables["BLOCK_N"]
    um, un, uk = us.tunables["BLOCK_M"], us.tunables["BLOCK_N"], us.tunables["BLOCK_K"]
    bdv = tu["BLOCK_DV"]
    es = 2 if ps.tunables["dot_dtype"] != "tl.float32" else 4   # q, k element bytes
    pb = 2 if tu["p_dtype"] != "fp32" else 4                     # bytes per stored probability
    low = us.tunables["update_dtype"] != "tl.float32"
    sb = 2 if low else 4                                         # bytes per element of s the update reads
    urate = BF16_FLOPS if low else _rate({"solve_precision": us.tunables["update_precision"]}, "solve")
    srate = _rate({"solve_precision": tu["solve_precision"]}, "solve")
    nv = _cdiv(Dv, un)
    base = (CO // um) * nv * B
    squarings = int(math.log2(C)) - 1
    nts = _cdiv(T, pn)
    out = {"feedback_probs_online": [], "feedback_update_online": [], "feedback_solve_online": []}
    for r0 in range(0, T, CO):
        ncols = min(r0 + CO, T)
        nt = _cdiv(ncols, pn)
        # 1. probabilities: one PM x PN logit tile per CTA (tiles right of a row block's last row only write M, L)
        full = Work(tc=2 * pm * pn * D, rate=_rate(ps.tunables, "dot"), sfu=pm * pn,
                    alu=pm * pn * (SOFTMAX_ALU + MASK_ALU), l2=es * (pm + pn) * D + pb * pm * pn + 8 * pm)
        empty = Work(l2=8 * pm)
        ctas = [(1, full if n * pn < r0 + (m + 1) * pm - 1 else empty)
                for _b in range(B) for n in range(nt) for m in range(CO // pm)]
        out["feedback_probs_online"].append(Launch((CO // pm, nt, B), ctas,
                                                   es * B * (CO + ncols) * D + pb * B * CO * ncols + 8 * B * CO * nt))
        # 2. combine + update (axis 1 > 0) or combine + lse + inverses (axis 1 == 0, split 0), issue order
        splits, per = update_splits(base, r0, uk, 264)
        k_per = [max(0, min(r0, (q + 1) * per) - q * per) for q in range(splits)] if r0 else [0]
        combine_l2, combine_sfu = 8 * um * nt, um * nt
        inv_one = Work(tc=squarings * 2 * 2 * C ** 3, rate=srate).seconds(1)
        inverse = Work(tc=(um // C) * squarings * 2 * 2 * C ** 3, rate=srate, sfu=combine_sfu + um * C,
                       alu=um * C * 4, l2=combine_l2 + pb * um * C + 4 * um * C + 8 * um,
                       serial_s=(um // C) * (inv_one + 2 * L2_LATENCY_S))   # combine load, P load, squarings chain
        ctas = []
        for q, k in enumerate(k_per):
            upd = Work(tc=2 * um * un * k, rate=urate, sfu=combine_sfu + um * k // uk, alu=um * k * 2,
                       l2=combine_l2 + pb * um * k + sb * un * k + 4 * um * k // uk + 4 * um * un + 2 * um * un,
                       serial_s=2 * L2_LATENCY_S)   # the combine's loads, then the pipelined K loop
            for _b in range(B):
                ctas.append((CO // um, inverse if q == 0 else Work()))
                ctas.append(((CO // um) * nv, upd))
        s_prev = sb * B * r0 * Dv
        p_chunk = pb * B * CO * T
        hbm = 2 * B * CO * Dv + 4 * B * CO * Dv + (s_prev if s_prev + p_chunk > L2_BYTES else 0) + \
            (splits - 1) * 4 * B * CO * Dv + 4 * B * CO * C + 4 * B * CO
        out["feedback_update_online"].append(Launch((CO // um, 1 + nv, B * splits), ctas, hbm))
        # 3. inner blocks in sequence: S (+ partial sums) and the lse / gamma, the earlier blocks' (P, s) tiles in
        # a pipelined loop (cp.async, two stages: one exposed load per block), the inverse's product, store, barrier
        n_inner = _cdiv(min(CO, T - r0), C)
        chain = l2b = flops = 0.0
        for i in range(n_inner):
            l2b += 4 * C * bdv * splits + 8 * C + i * (pb * C * C + 4 * C * bdv + 4 * C) + 4 * C * C + 6 * C * bdv
            flops += 2 * C * C * bdv * (i + 1)
            chain += (2 + (splits - 1) + (1 if i else 0)) * L2_LATENCY_S
        w = Work(tc=flops, rate=srate, sfu=n_inner * C, alu=sum(i for i in range(n_inner)) * C * C, l2=l2b,
                 serial_s=chain)
        nprog = _cdiv(Dv, bdv) * B
        out["feedback_solve_online"].append(Launch((_cdiv(Dv, bdv), B), [(nprog, w)],
                                                   2 * 4 * B * CO * Dv + 2 * B * CO * Dv))
    return out


def _feedback_chunk_launches(src, parts, B, T, design=None):
    """The two-level solve: per outer chunk, probabilities, update (split over earlier rows), inner blocks.
    ``design`` (None: the generated kernels) may override p_bytes, update_bf16, pipelined_solve, online_alu."""
    from sessa_compiler.backends.triton.feedback import update_splits

    sp, tu = src.specialisation, src.tunables
    ps, us = parts["feedback_probs"], parts["feedback_update"]
    D, Dv, C, CO = sp["D_qk"], sp["D_v"], sp["chunk_size"], tu["CO"]
    pm, pn, pk = ps.tunables["BLOCK_M"], ps.tunables["BLOCK_N"], ps.tunables["BLOCK_K"]
    um, un, uk = us.tunables["BLOCK_M"], us.tunables["BLOCK_N"], us.tunables["BLOCK_K"]
    bdv = tu["BLOCK_DV"]
    base = (CO // um) * _cdiv(Dv, un) * B
    out = {"feedback_probs": [], "feedback_update": [], "feedback_solve": []}
    d = design or {}
    pb = d.get("p_bytes", 4)                  # bytes per stored probability
    sb = 2 if d.get("update_bf16") else 4     # bytes per element of s the update reads
    p_chunk = pb * B * CO * T
    for r0 in range(0, T, CO):
        ncols = min(r0 + CO, T)
        # probabilities: logits over the full width (q and k re-read per K step), P stored
        nprog = (CO // pm) * _cdiv(ncols, pn) * B
        w = Work(tc=2 * pm * pn * D, rate=_rate(ps.tunables, "dot"), sfu=pm * pn,
                 alu=pm * pn * (4 + MASK_ALU + d.get("online_alu", 0)),
                 l2=2 * (pm + pn) * D + pb * pm * pn + 8 * pm)
        out["feedback_probs"].append(Launch((CO // pm, _cdiv(ncols, pn), B), [(nprog, w)],
                                            2 * B * (CO + ncols) * D + pb * B * CO * ncols))
        # update: S[rows] = f + P[:, :r0] @ S[:r0] (TF32 unless f is 16-bit and the policy says otherwise)
        splits, per = update_splits(base, r0, uk, 264)
        rate = BF16_FLOPS if d.get("update_bf16") else _rate({"solve_precision": us.tunables["solve_precision"]},
                                                              "solve")
        k_per = [max(0, min(r0, (q + 1) * per) - q * per) for q in range(splits)] if r0 else [0]
        ctas = [(base, Work(tc=2 * um * un * k, rate=rate, l2=pb * um * k + sb * un * k + 4 * um * un + 2 * um * un,
                            serial_s=L2_LATENCY_S)) for k in k_per]
        s_prev = sb * B * r0 * Dv
        hbm = 2 * B * CO * Dv + 4 * B * CO * Dv + (s_prev if s_prev + p_chunk > L2_BYTES else 0) + \
            (splits - 1) * 4 * B * CO * Dv
        out["feedback_update"].append(Launch((CO // um, _cdiv(Dv, un), B * splits), ctas, hbm))
        # inner blocks in sequence: per block (1 + partial sums) loads, i earlier blocks (P tile + s tile, each
        # load waited on before its product), the inverse's product, the store and a barrier
        n_inner = _cdiv(min(CO, T - r0), C)
        chain = l2b = flops = 0.0
        for i in range(n_inner):
            loads = 4 * C * bdv * (1 + splits - 1) + i * (pb * C * C + 4 * C * bdv) + 4 * C * C + 4 * C * bdv
            dots = 2 * C * C * bdv * (i + 1)
            chain += (2 if d.get("pipelined_solve") else 2 + (splits - 1) + i + 1) * L2_LATENCY_S
            l2b += loads
            flops += dots
        w = Work(tc=flops, rate=_rate({"solve_precision": tu["solve_precision"]}, "solve"), l2=l2b, serial_s=chain)
        nprog = _cdiv(Dv, bdv) * B
        out["feedback_solve"].append(Launch((_cdiv(Dv, bdv), B), [(nprog, w)], 2 * 4 * B * CO * Dv + 2 * B * CO * Dv))
    return out


def _stream_launch(nbytes: float, n_ctas: int = 4 * SMS):
    """A memory-bound elementwise kernel: its bytes over HBM bandwidth (the grid fills the chip)."""
    w = Work(l2=nbytes / n_ctas)
    return Launch((n_ctas,), [(n_ctas, w)], nbytes)


def model_launches(src, node, B, T, parts=None) -> list:
    """The launches one call of ``src`` makes at (B, T), in issue order."""
    if src.name == "attention_fwd":
        return _attention_launches(src, B, T)
    if src.name == "rope_rotate":   # q and k: read once, written once
        q, k = node.inputs[0], node.inputs[1]
        return [_stream_launch(2 * _bytes(x, B, T)) for x in (q, k)]
    if src.name == "feedback_lse":
        return _lse_launches(src, B, T)
    if src.name == "feedback_diag_inverse":
        return _diag_inverse_launches(src, B, T)
    if src.name.startswith("fused_"):
        return [_stream_launch(kernel_bytes(src, node, B, T))]
    return []


def timeline(launches: list, graph: bool) -> dict:
    """Issue every launch in order from one host thread onto one stream: the host pays HOST_LAUNCH_S per
    launch (one GRAPH_LAUNCH_S for a replayed graph); the device starts a kernel when it has been issued
    and the previous one has finished plus a gap. Returns the end time and what the launches added."""
    host = GRAPH_LAUNCH_S if graph else 0.0
    end = 0.0
    busy = 0.0
    for kind, dur in launches:
        if not graph:
            host += HOST_LAUNCH_S[kind]
        start = max(host, end + (GRAPH_GAP_S if graph else DEVICE_GAP_S) if end else host)
        end = start + dur
        busy += dur
    return {"end_s": end, "busy_s": busy, "launch_s": end - busy}


def target_graph():
    import torch

    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(0)
    m = SessaLayer(TARGET["D"], n_heads=TARGET["H"]).to(torch.bfloat16).eval()
    return sc.trace(m, (torch.randn(1, 8, TARGET["D"], dtype=torch.bfloat16),))


def rope_attention_node(graph):
    """The layer's attention with RoPE folded in (what the recogniser gives when it folds it)."""
    from sessa_compiler.ir import parse

    att = next(n for n in graph.nodes if n.op == "attention")
    q, k, v = att.inputs[:3]
    H, Hkv, d = q.type.shape[2], k.type.shape[2], q.type.shape[3]
    dt = q.type.dtype.name
    g = parse(f"""graph a(%q: {dt}[B, T, {H}, {d}], %k: {dt}[B, T, {Hkv}, {d}], %v: {dt}[B, T, {Hkv}, {d}]) {{
  param %inv: f32[{d // 2}]
  %o: {dt}[B, T, {H}, {d}] = attention(%q, %k, %v, %inv) {{scale={d ** -0.5}, causal=True, rope=True}}
  return %o
}}""")
    return g.nodes[0]


def tri_solve_node(graph):
    """The general form of the layer's feedback: tri_solve on explicit [B, T, T] weights, b the feedback's f
    (what a feedback the recogniser cannot factor becomes)."""
    from sessa_compiler.ir import parse

    fb = next(n for n in graph.nodes if n.op in ("feedback", "feedback_chunked"))
    f = fb.inputs[0]
    dt, width = f.type.dtype.name, f.type.shape[2]
    g = parse(f"""graph s(%A: {dt}[B, T, T], %f: {dt}[B, T, {width}]) {{
  %x: {dt}[B, T, {width}] = tri_solve(%A, %f) {{upper=False, unitriangular=False}}
  return %x
}}""")
    return g.nodes[0]


def sm90_program(graph, T: int):
    """The program a CUDA call at length T on an sm_90 device gets with nothing tuned: the shipped
    sm_90 defaults (autotune/defaults.json), else the cost model, as the backend resolves them."""
    from sessa_compiler.autotune.cache import shape_class
    from sessa_compiler.autotune.defaults import default_config
    from sessa_compiler.backends.triton.backend import TritonBackend
    from sessa_compiler.backends.triton.prepare import attach_launch_configs, tunable_nodes

    per_node, options = {}, {}
    for node in tunable_nodes(graph):
        cfg = default_config("cuda:NVIDIA H200:sm_90", "triton", node.op, shape_class(T)) or {}
        per_node[node.output.name] = (cfg, "default" if cfg else "cost model")
        if node.op == "feedback" and "chunk_size" in cfg:
            options["feedback_chunk_size"] = cfg["chunk_size"]
    prog = TritonBackend(interpret=False).build_program(graph, options)
    attach_launch_configs(prog, per_node)
    return prog


def _torch_op_seconds(node, B, T) -> float:
    """An op that runs in torch (cuBLAS matmuls, elementwise): its FLOPs at the bf16 rate against its bytes
    (optimistic: cuBLAS at the roofline)."""
    flops = 0
    if node.op in ("linear", "matmul"):
        w = node.inputs[1]
        k_dim = _dim(w.type.shape[-1], B, T) if node.op == "linear" else _dim(w.type.shape[-2], B, T)
        flops = 2 * _bytes(node.output, B, T) // ESIZE[node.output.type.dtype.name] * k_dim
    nbytes = sum(_bytes(v, B, T) for v in list(node.inputs) + list(node.outputs) if hasattr(v, "type"))
    return flops, nbytes, max(flops / BF16_FLOPS, nbytes / BYTES_PER_S)


FALLBACK = "variant: lse-first feedback (the fallback: lse pass, inverse pass, then the solve)"


def _users(graph, node) -> list:
    return [n for n in graph.nodes if any(o in n.inputs for o in node.outputs)]


def records(B: int, T: int) -> list:
    from sessa_compiler.backends.triton.aot import compile_kernel
    from sessa_compiler.backends.triton.backend import KERNEL_DTYPES

    graph = target_graph()
    prog = sm90_program(graph, T)
    jobs = []
    for node in prog.kernel_nodes:
        dtypes = prog.declared_dtypes(node)
        if all(dt in KERNEL_DTYPES for dt in dtypes.values()):
            jobs.append((node, prog.source_for(node, dtypes, interpret=False), "layer"))
    rope = rope_attention_node(prog.graph)
    jobs.append((rope, prog.source_for(rope, {"q": "bf16", "k": "bf16", "v": "bf16", "inv_freq": "f32"}, False),
                 "variant: RoPE folded into attention"))
    solve = tri_solve_node(prog.graph)
    jobs.append((solve, prog.source_for(solve, {"A": "bf16", "b": "bf16"}, False),
                 "variant: tri_solve, the general (unfactored) feedback"))
    fallback = {}   # the one-pass feedback node -> its lse and inverse nodes: the lse-first kernels, modelled too
    for chunked, (lse_node, dinv_node) in prog.one_pass.items():
        from sessa_compiler.backends.triton.feedback import generate_solve

        knobs = {k: v for k, v in (prog.node_configs.get(chunked) or {}).items() if k == "outer_chunk"}
        for n, src in ((lse_node, prog.source_for(lse_node, prog.declared_dtypes(lse_node), False)),
                       (dinv_node, prog.source_for(dinv_node, prog.declared_dtypes(dinv_node), False)),
                       (chunked, generate_solve(chunked, prog.declared_dtypes(chunked), False, **knobs))):
            jobs.append((n, src, FALLBACK))
        fallback[id(chunked)] = []
    out, kernel_nodes = [], {id(n) for n, _, w in jobs if w != FALLBACK}
    kernel_nodes |= {id(n) for pair in prog.one_pass.values() for n in pair}   # made by the one-pass kernels
    node_launches = {}   # id(node) -> [(launcher, seconds, serial seconds)] in issue order (layer kernels only)
    for node, top, where in jobs:
        compiled = {}
        for src in top.all_kernels():
            rec = compile_kernel(src)
            issued, useful, t_flops = kernel_flops(src, B, T)
            nbytes = kernel_bytes(src, node, B, T)
            rec.update({"ir_value": node.outputs[0].name, "in": where, "issued_flops": issued, "useful_flops": useful,
                        "bytes": nbytes, "roofline_ms": 1e3 * max(t_flops, nbytes / BYTES_PER_S),
                        "bound": "compute" if t_flops >= nbytes / BYTES_PER_S else "memory",
                        "ctas_per_sm": ctas_per_sm(rec),
                        "dtypes": prog.declared_dtypes(node) if node in prog.graph.nodes else {}})
            compiled[src.name] = (src, rec)
            out.append(rec)
        # the model: every launch of this node's kernels, in issue order
        if top.name == "feedback_solve_online":
            names = ("feedback_probs_online", "feedback_update_online", "feedback_solve_online")
            per = _online_chunk_launches(top, {p.name: p for p in top.parts}, B, T)
            seq = [(name, per[name][c]) for c in range(len(per[names[2]])) for name in names]
        elif top.name == "feedback_solve":
            per = _feedback_chunk_launches(top, {p.name: p for p in top.parts}, B, T)
            seq = [(name, per[name][c]) for c in range(len(per["feedback_solve"]))
                   for name in ("feedback_probs", "feedback_update", "feedback_solve")]
        elif top.name.startswith("tri_solve"):
            seq = []   # a variant outside the layer: its roofline row only
        else:
            seq = [(src.name, lnc) for src in top.all_kernels() for lnc in model_launches(src, node, B, T)]
            seq = [x for x in seq if x[0] != top.name] + [x for x in seq if x[0] == top.name]   # parts run first
        timed = []
        for name, lnc in seq:
            r = lnc.seconds(compiled[name][1]["ctas_per_sm"])
            timed.append((name, lnc, r))
        if where == FALLBACK:   # lse, inverses, then the lse-first solve: in place of the one-pass launches
            key = next(k for k in fallback if k == id(node) or any(id(x) == k for x in _users(prog.graph, node)))
            fallback[key] += [("triton", r["s"], r["serial_s"]) for _, _, r in timed]
        if top.name == "attention_fwd" and where == "layer":   # the model on the old attention schedule
            old_src = dataclasses.replace(top, tunables={**top.tunables, "order": None, "mask": None})
            old_t = _attention_launches(old_src, B, T)[0].seconds(compiled["attention_fwd"][1]["ctas_per_sm"])
            compiled["attention_fwd"][1]["est_ms_lightest_first_mask_every_tile"] = 1e3 * old_t["s"]
        for name, (src, rec) in compiled.items():
            mine = [(lnc, r) for n, lnc, r in timed if n == name]
            if not mine:   # a variant outside the layer (tri_solve): its roofline only
                rec.update({"est_ms": rec["roofline_ms"], "limited_by": ["roofline only: not modelled"]})
                continue
            big = max(mine, key=lambda x: x[0].n_ctas)[0]
            rec.update({"launches": len(mine), "grid": list(big.grid), "ctas": sum(lnc.n_ctas for lnc, _ in mine),
                        "l2_bytes": sum(r["l2"] for _, r in mine), "hbm_bytes": sum(lnc.hbm for lnc, _ in mine),
                        "min_fill": min(r["fill"] for _, r in mine),
                        "serial_ms": 1e3 * sum(r["serial_s"] for _, r in mine),
                        "est_ms": 1e3 * sum(r["s"] for _, r in mine),
                        "limited_by": sorted({r["bound"] for _, r in mine})})
        if where == "layer":
            node_launches[id(node)] = [("triton", r["s"], r["serial_s"]) for _, _, r in timed]
    # the layer in graph order: kernels as modelled, torch ops one launch each at their roofline
    seq, alt, torch_flops, torch_ms = [], [], 0, 0.0
    for node in prog.graph.nodes:
        if id(node) in node_launches:
            seq += node_launches[id(node)]
            alt += fallback.get(id(node), node_launches[id(node)])
        elif id(node) not in kernel_nodes and node.op not in VIEW_OPS:
            flops, _, sec = _torch_op_seconds(node, B, T)
            torch_flops += flops
            torch_ms += 1e3 * sec
            seq.append(("torch", sec, 0.0))
            alt.append(("torch", sec, 0.0))
    lse_first = timeline([(k, d) for k, d, _ in alt], graph=False)
    lse_first_graph = timeline([(k, d) for k, d, _ in alt], graph=True)
    eager = timeline([(k, d) for k, d, _ in seq], graph=False)
    graphed = timeline([(k, d) for k, d, _ in seq], graph=True)
    layer = [r for r in out if r["in"] == "layer"]
    issued = sum(r["issued_flops"] for r in layer) + torch_flops
    useful = sum(r["useful_flops"] for r in layer) + torch_flops
    roofline = sum(r["roofline_ms"] for r in layer) + torch_ms
    floor = 1e3 * useful / BF16_FLOPS   # the layer's own FLOPs at the bf16 rate
    out.append({"kernel": "layer", "in": "layer", "issued_flops": issued, "useful_flops": useful,
                "issued_over_useful": issued / useful, "torch_ops_ms": torch_ms, "launches": len(seq),
                "roofline_ms": roofline, "useful_flops_ms": floor, "device_ms": 1e3 * eager["busy_s"],
                "critical_path_ms": 1e3 * sum(c for _, _, c in seq),
                "launch_ms": 1e3 * eager["launch_s"], "est_ms": 1e3 * eager["end_s"],
                "graph_launch_ms": 1e3 * graphed["launch_s"], "est_graph_ms": 1e3 * graphed["end_s"],
                "pct_of_floor": 100 * floor / (1e3 * eager["end_s"]),
                "lse_first_feedback_ms": 1e3 * lse_first["end_s"],
                "lse_first_feedback_graph_ms": 1e3 * lse_first_graph["end_s"],
                "feedback_ms": 1e3 * sum(d for k, d, _ in node_launches[next(iter(fallback))]) if fallback else 0.0,
                "feedback_lse_first_ms": 1e3 * sum(d for _, d, _ in next(iter(fallback.values()))) if fallback else 0.0,
                "config": f"bf16 SessaLayer(D={TARGET['D']}, H={TARGET['H']}), B={B}, T={T}, sm_90"})
    return out


# -- the decode step : launches counted on CPU, bytes at the target context ----------------
DECODE = {"B": 4, "context": 8192, "small": 64}
MIN_KERNEL_S = 2.0e-6   # what a tiny kernel takes on the device (launch latency, one partial wave), assumed
NO_KERNEL = {"view", "_unsafe_view", "slice", "select", "transpose", "t", "expand", "unsqueeze", "squeeze", "permute",
             "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "empty", "empty_strided",
             "empty_like", "lift_fresh", "_reshape_alias", "reshape", "narrow", "chunk", "view_as_real",
             "view_as_complex"}


def decode_plan() -> dict:
    """One decode step of the target layer on CPU with the Triton decode kernels (interpreter), at a small
    context: every torch op that launches a kernel on CUDA and every Triton launch, with the bytes it touches
    (for the cache-reading launches, bytes per cached position). Needs TRITON_INTERPRET=1 (a subprocess)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import sessa_compiler as sc
    import triton.runtime.interpreter as interpreter
    from sessa_compiler import serving
    from sessa_compiler.models import SessaLayer

    serving.TRITON_DECODE_ON_CPU = True
    B, small = DECODE["B"], DECODE["small"]
    torch.manual_seed(0)
    m = SessaLayer(TARGET["D"], n_heads=TARGET["H"]).to(torch.bfloat16).eval()
    compiled = sc.compile(m, backend="eager")
    cache = compiled.init_cache(B, max_len=small + 2)
    x = torch.randn(B, TARGET["D"], dtype=torch.bfloat16)
    with torch.no_grad():   # the first step also checks the serving program against the forward: not recorded
        _, cache = compiled.decode_step(x, cache)
    caches = {}
    for k, v in cache.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 3:
            v.normal_()
            caches[v.data_ptr()] = float(v.numel() * v.element_size()) / (small + 2)   # bytes per cached position
    cache["t"] = small
    serving.device_position(cache, x.device)   # the device copy of the position set before the step, not in it
    events, state = [], {"in_launch": False}

    def nbytes(xs):
        return int(sum(a.numel() * a.element_size() for a in xs if isinstance(a, torch.Tensor)))

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not state["in_launch"] and name not in NO_KERNEL:
                outs = out if isinstance(out, (tuple, list)) else [out]
                events.append({"kind": "torch", "name": name, "bytes": nbytes(list(args) + list(outs))})
            return out

    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        # the split-K partials read every cached position; the other kernels that take a cache write one slot
        reads = self.fn.__name__.endswith("_partial")
        per_pos = sum(caches.get(a.data_ptr(), 0) for a in tensors) if reads else 0.0
        other = nbytes([a for a in tensors if a.data_ptr() not in caches])
        g = grid(kwargs) if callable(grid) else grid
        events.append({"kind": "triton", "name": self.fn.__name__, "bytes": other,
                       "bytes_per_position": float(per_pos), "grid": [int(x) for x in g],
                       "consts": {k: int(v) for k, v in kwargs.items() if k in ("CHUNK", "BC")}})
        state["in_launch"] = True
        try:
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            state["in_launch"] = False

    interpreter.InterpretedFunction.run = run
    try:
        with torch.no_grad(), Rec():
            compiled.decode_step(x, cache)
    finally:
        interpreter.InterpretedFunction.run = real
    weights = int(sum(p.numel() * p.element_size() for p in m.parameters()))
    return {"events": events, "weight_bytes": weights, "cache_bytes_per_position": sum(caches.values())}


def decode_records(B: int, context: int) -> dict:
    """The decode step's estimate at ``context``: its launches (counted by ``decode_plan`` in a subprocess),
    the memory floor (weights and caches read once), each launch at max(its bytes over HBM bandwidth,
    MIN_KERNEL_S), issued eagerly and as the CUDA graph decode_step records (serving.DecodeGraphs)."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--decode-plan"], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    scale = B / DECODE["B"]
    seq, chunk, serial = [], None, 0.0
    for e in plan["events"]:
        nbytes = scale * (e["bytes"] + e.get("bytes_per_position", 0) * context)
        chain = 0.0
        if e["name"].endswith("_partial"):     # grid (rows, chunks of CHUNK cached positions): fills the chip
            chunk = e["consts"]["CHUNK"]
        elif e["name"].endswith("_combine"):   # reads every chunk's partials; a dependent step per BC of them
            n_small, n_ctx = -(-DECODE["small"] // chunk), -(-context // chunk)
            nbytes = scale * e["bytes"] * n_ctx / n_small
            chain = 2 * -(-n_ctx // e["consts"]["BC"]) * L2_LATENCY_S   # the max pass, then the sum pass
            serial += chain
        seq.append(("torch" if e["kind"] == "torch" else "triton", max(MIN_KERNEL_S, nbytes / BYTES_PER_S) + chain))
    floor = plan["weight_bytes"] + scale * plan["cache_bytes_per_position"] * context
    eager, graphed = timeline(seq, graph=False), timeline(seq, graph=True)
    return {"kernel": "decode_step", "config": f"bf16 SessaLayer(D={TARGET['D']}, H={TARGET['H']}), B={B}, "
            f"context {context}", "launches": len(seq),
            "triton_launches": sum(e["kind"] == "triton" for e in plan["events"]),
            "torch_launches": sum(e["kind"] == "torch" for e in plan["events"]),
            "floor_bytes": floor, "floor_ms": 1e3 * floor / BYTES_PER_S, "device_ms": 1e3 * eager["busy_s"],
            "est_ms": 1e3 * eager["end_s"], "est_graph_ms": 1e3 * graphed["end_s"],
            "graph_over_floor": graphed["end_s"] / (floor / BYTES_PER_S), "critical_path_ms": 1e3 * serial,
            "ops": sorted({e["name"] for e in plan["events"]})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel (then the layer) per line")
    ap.add_argument("-B", type=int, default=TARGET["B"])
    ap.add_argument("-T", type=int, default=TARGET["T"])
    ap.add_argument("--decode-plan", action="store_true", help=argparse.SUPPRESS)   # the subprocess of decode_records
    ap.add_argument("--no-decode", action="store_true", help="skip the decode step's estimate")
    args = ap.parse_args(argv)
    if args.decode_plan:
        print(json.dumps(decode_plan()))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    recs = records(args.B, args.T)
    if not args.no_decode:
        recs.append(decode_records(args.B, args.T))
    if args.json:
        for r in recs:
            print(json.dumps(r), flush=True)
        return 0
    cols = ("kernel", "in", "num_warps", "registers", "shared_bytes", "ctas_per_sm", "wgmma_shapes", "launches",
            "grid", "min_fill", "issued_flops", "hbm_bytes", "l2_bytes", "serial_ms", "limited_by", "roofline_ms",
            "est_ms")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in recs:
        if r["kernel"] in ("layer", "decode_step"):
            continue
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) or (isinstance(v, int) and v > 10 ** 6) else
                         " ".join(str(x) for x in v) if isinstance(v, list) else str(v))
        print("| " + " | ".join(cells) + " |")
    layer = next(r for r in recs if r["kernel"] == "layer")
    print(f"\nLayer ({layer['config']}): {layer['launches']} launches; kernels and torch ops on the device "
          f"{layer['device_ms']:.3f} ms (of which sequential chains {layer['critical_path_ms']:.3f} ms), "
          f"launches add {layer['launch_ms']:.3f} ms: estimate {layer['est_ms']:.3f} ms "
          f"({layer['pct_of_floor']:.0f}% of the {layer['useful_flops_ms']:.3f} ms the layer's own FLOPs take at "
          f"the bf16 rate); replayed as a CUDA graph {layer['est_graph_ms']:.3f} ms (launches add "
          f"{layer['graph_launch_ms']:.3f} ms). Old lower bound (each kernel at its roofline, no launches): "
          f"{layer['roofline_ms']:.3f} ms; issued/useful FLOPs {layer['issued_over_useful']:.3f}.")
    att = next(r for r in recs if r["kernel"] == "attention_fwd")
    print(f"\nAttention on the old schedule (lightest row blocks first, the mask on every tile): "
          f"{att['est_ms_lightest_first_mask_every_tile']:.3f} ms; as generated: {att['est_ms']:.3f} ms.")
    print(f"Feedback: one pass {layer['feedback_ms']:.3f} ms; the lse-first fallback (lse pass, inverse pass, "
          f"fp32 P, TF32 update) {layer['feedback_lse_first_ms']:.3f} ms, the layer with it "
          f"{layer['lse_first_feedback_ms']:.3f} ms ({layer['lse_first_feedback_graph_ms']:.3f} ms as a CUDA graph).")
    dec = next((r for r in recs if r["kernel"] == "decode_step"), None)
    if dec:
        print(f"\nDecode step ({dec['config']}): {dec['launches']} launches ({dec['triton_launches']} Triton, "
              f"{dec['torch_launches']} torch ops), memory floor {dec['floor_bytes'] / 1e6:.0f} MB = "
              f"{dec['floor_ms'] * 1e3:.0f} us; the combines' loops {dec['critical_path_ms'] * 1e3:.0f} us; "
              f"estimate {dec['est_ms'] * 1e3:.0f} us with every launch from Python, "
              f"{dec['est_graph_ms'] * 1e3:.0f} us replayed as a CUDA graph ({dec['graph_over_floor']:.2f}x the "
              "floor; on CUDA the second decode_step with a cache of fixed max_len is recorded, later ones replay).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
