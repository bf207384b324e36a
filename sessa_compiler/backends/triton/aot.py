"""Ahead-of-time compilation of generated kernels for a GPU target, with no GPU present.

Used by CI (tests/test_triton_aot.py) to prove that every generated kernel compiles for sm_90 with
the real compiler (the interpreter accepts code the compiler rejects) and that kernels built around
``tl.dot`` use tensor-core instructions. Run in a process where TRITON_INTERPRET is unset:

    python -m sessa_compiler.backends.triton.aot            # prints one JSON line per kernel
"""
from __future__ import annotations

import json
import os
import re
import sys


def compile_kernel(src, arch: int = 90) -> dict:
    """Compile one KernelSource for ``GPUTarget("cuda", arch, 32)``; returns a summary of its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .codegen import KERNEL_CACHE

    fn = KERNEL_CACHE.load(src, interpret=False).fn
    names = list(src.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if src.signature[n].startswith("*")}
    ast = ASTSource(fn=fn, signature=dict(src.signature), constexprs={}, attrs=attrs)
    compiled = triton.compile(ast, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": src.num_warps, "num_stages": src.num_stages})
    ptx = compiled.asm["ptx"]
    return {"kernel": src.name, "ir_op": src.ir_op, "uses_dot": src.uses_dot,
            "wgmma": bool(re.search(r"\bwgmma\.", ptx)), "mma": bool(re.search(r"\bmma\.sync", ptx)),
            "ptx_lines": ptx.count("\n"), "cubin_bytes": len(compiled.asm.get("cubin", b""))}


SAMPLE_IR = """\
graph sample(%f: {dt}[B, T, 128], %qb: {dt}[B, T, 128], %kb: {dt}[B, T, 128], %g: {dt}[B, T], %q: {dt}[B, T, 4, 64], %k: {dt}[B, T, 2, 64], %v: {dt}[B, T, 2, 64], %u: {dt}[B, T, 32], %dt: {dt}[B, T, 32], %Bm: {dt}[B, T, 16], %Cm: {dt}[B, T, 16]) {{
  param %inv_freq: f32[32]
  param %A: f32[32, 16]
  param %Dskip: f32[32]
  %att: {dt}[B, T, 4, 64] = attention(%q, %k, %v, %inv_freq) {{scale=0.125, causal=True, rope=True}}
  %att2: {dt}[B, T, 4, 64] = attention(%q, %k, %v) {{scale=0.125, causal=True}}
  %lse: f32[B, T] = feedback_lse(%qb, %kb) {{scale=0.088}}
  %dinv: f32[B, ceiling(T/64), 64, 64] = feedback_diag_inverse(%qb, %kb, %g, %lse) {{scale=0.088, chunk_size=64}}
  %s: {dt}[B, T, 128] = feedback_chunked(%f, %qb, %kb, %g, %lse, %dinv) {{scale=0.088, chunk_size=64}}
  %y: {dt}[B, T, 32] = scan_chunked(%u, %dt, %A, %Bm, %Cm, %Dskip) {{chunk_size=16}}
  return %att, %att2, %s, %y
}}
"""


def sample_sources(dtype: str = "bf16") -> list:
    """The kernels of a graph with every core op (RoPE on and off, GQA), at GPU settings."""
    from ...ir import parse
    from .backend import TritonProgram, _generator, _operand_names

    graph = parse(SAMPLE_IR.format(dt=dtype))
    srcs = []
    for strategy in ("sequential", "associative"):
        prog = TritonProgram(graph, None, interpret=False, scan_strategy=strategy)
        for node in graph.nodes:
            if _generator(node) is None or (strategy == "associative" and node.op != "scan_chunked"):
                continue
            dtypes = {n: v.type.dtype.name for n, v in zip(_operand_names(node), node.inputs)}
            srcs.extend(prog.source_for(node, dtypes, interpret=False).all_kernels())
    return srcs


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    dtypes = (argv or sys.argv[1:]) or ["bf16", "f32"]
    failed = 0
    for dt in dtypes:
        for src in sample_sources(dt):
            try:
                rec = compile_kernel(src)
            except Exception as e:  # report every kernel, fail at the end
                rec = {"kernel": src.name, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
                failed += 1
            rec.update({"dtype": dt, "tunables": {k: str(v) for k, v in src.tunables.items()}})
            print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
