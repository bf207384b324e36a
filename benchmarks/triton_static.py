"""Static proofs of the Triton kernels at the target configuration, with no GPU.

    python benchmarks/triton_static.py --json      # one JSON object per kernel, then one for the layer
    python benchmarks/triton_static.py             # the same as a Markdown table

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
(matmuls at the same roofline, the rest by bytes).
These are estimates from the compiled code, not measurements.
"""
from __future__ import annotations

import argparse
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
    out, kernel_nodes = [], {id(n) for n, _, _ in jobs}
    for node, top, where in jobs:
        for src in top.all_kernels():
            rec = compile_kernel(src)
            issued, useful, t_flops = kernel_flops(src, B, T)
            nbytes = kernel_bytes(src, node, B, T)
            rec.update({"ir_value": node.outputs[0].name, "in": where, "issued_flops": issued, "useful_flops": useful,
                        "bytes": nbytes, "est_ms": 1e3 * max(t_flops, nbytes / BYTES_PER_S),
                        "bound": "compute" if t_flops >= nbytes / BYTES_PER_S else "memory",
                        "dtypes": prog.declared_dtypes(node) if node in prog.graph.nodes else {}})
            out.append(rec)
    # the rest of the layer runs in torch: matmuls at the roofline, other ops by their bytes
    torch_flops = torch_bytes = 0
    for node in prog.graph.nodes:
        if id(node) in kernel_nodes or node.op in VIEW_OPS:
            continue
        if node.op in ("linear", "matmul"):
            w = node.inputs[1]
            k_dim = _dim(w.type.shape[-1], B, T) if node.op == "linear" else _dim(w.type.shape[-2], B, T)
            torch_flops += 2 * _bytes(node.output, B, T) // ESIZE[node.output.type.dtype.name] * k_dim
        torch_bytes += sum(_bytes(v, B, T) for v in list(node.inputs) + list(node.outputs) if hasattr(v, "type"))
    layer = [r for r in out if r["in"] == "layer"]
    issued = sum(r["issued_flops"] for r in layer) + torch_flops
    useful = sum(r["useful_flops"] for r in layer) + torch_flops
    torch_ms = 1e3 * max(torch_flops / BF16_FLOPS, torch_bytes / BYTES_PER_S)
    out.append({"kernel": "layer", "in": "layer", "issued_flops": issued, "useful_flops": useful,
                "issued_over_useful": issued / useful, "torch_ops_ms": torch_ms,
                "est_ms": sum(r["est_ms"] for r in layer) + torch_ms,
                "config": f"bf16 SessaLayer(D={TARGET['D']}, H={TARGET['H']}), B={B}, T={T}, sm_90"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel (then the layer) per line")
    ap.add_argument("-B", type=int, default=TARGET["B"])
    ap.add_argument("-T", type=int, default=TARGET["T"])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    recs = records(args.B, args.T)
    if args.json:
        for r in recs:
            print(json.dumps(r), flush=True)
        return 0
    cols = ("kernel", "in", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "wgmma_shapes",
            "cp_async", "vector_loads", "issued_flops", "useful_flops", "est_ms")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in recs:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) or (isinstance(v, int) and v > 10 ** 6) else
                         " ".join(v) if isinstance(v, list) else str(v))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
