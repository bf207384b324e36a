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
import subprocess
import sys
import tempfile


def aot_attrs(src) -> dict:
    """What Triton's launcher specialises at run time, for ``ASTSource(attrs=...)``: every pointer, and
    every integer not in ``do_not_specialize``, as divisible by 16 (the batch and row strides of
    tensors whose widths are multiples of 16; Triton specialises an int on "divisible by 16" only,
    so a new T does not recompile)."""
    names = list(src.signature)
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
            if src.signature[n].startswith("*") or n not in src.do_not_specialize}


def compile_for(src, arch: int = 90):
    """``triton.compile`` of one KernelSource for ``GPUTarget("cuda", arch, 32)`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .codegen import KERNEL_CACHE

    fn = KERNEL_CACHE.load(src, interpret=False).fn
    ast = ASTSource(fn=fn, signature=dict(src.signature), constexprs={}, attrs=aot_attrs(src))
    return triton.compile(ast, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": src.num_warps, "num_stages": src.num_stages})


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame and local (spill) bytes per thread, from ``cuobjdump -res-usage``
    (shipped inside the triton wheel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "spill_bytes": int(fields["LOCAL"])}


def ptx_summary(ptx: str) -> dict:
    """What the PTX shows: tensor-core shapes, asynchronous copies, vector and scalar global loads."""
    shapes = sorted({f"m{m}n{n}k{k}" for m, n, k in re.findall(r"\bwgmma\.mma_async\S*?\.m(\d+)n(\d+)k(\d+)", ptx)},
                    key=lambda s: int(re.search(r"n(\d+)", s).group(1)))
    return {"wgmma": bool(re.search(r"\bwgmma\.", ptx)), "mma": bool(re.search(r"\bmma\.sync", ptx)),
            "wgmma_shapes": shapes,
            "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)),
            "vector_loads": len(re.findall(r"\bld\.global(?:\.[a-z0-9_:]+)*\.v[248]\.", ptx)),
            "scalar_loads": len(re.findall(r"\bld\.global(?![^\s;]*\.v[248]\.)", ptx))}


def compile_kernel(src, arch: int = 90) -> dict:
    """Compile one KernelSource for sm_``arch``; returns a summary of its PTX and resources."""
    compiled = compile_for(src, arch)
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm.get("cubin", b"")
    return {"kernel": src.name, "ir_op": src.ir_op, "uses_dot": src.uses_dot, **ptx_summary(ptx),
            "num_warps": src.num_warps, "num_stages": src.num_stages, **resource_usage(cubin),
            "shared_bytes": int(compiled.metadata.shared), "ptx_lines": ptx.count("\n"), "cubin_bytes": len(cubin)}


SAMPLE_IR = """\
graph sample(%f: {dt}[B, T, 128], %qb: {dt}[B, T, 128], %kb: {dt}[B, T, 128], %g: {dt}[B, T], %q: {dt}[B, T, 4, 128], %k: {dt}[B, T, 2, 128], %v: {dt}[B, T, 2, 128], %u: {dt}[B, T, 32], %dt: {dt}[B, T, 32], %Bm: {dt}[B, T, 16], %Cm: {dt}[B, T, 16], %W: {dt}[B, T, T], %W2: {dt}[T, T], %mask: i64[B, T]) {{
  param %inv_freq: f32[64]
  param %A: f32[32, 16]
  param %Dskip: f32[32]
  %att: {dt}[B, T, 4, 128] = attention(%q, %k, %v, %inv_freq) {{scale=0.088, causal=True, rope=True}}
  %att2: {dt}[B, T, 4, 128] = attention(%q, %k, %v) {{scale=0.088, causal=True}}
  %att3: {dt}[B, T, 4, 128] = attention(%q, %k, %v, None, %mask) {{scale=0.088, causal=True, key_padding=True, empty_rows="mean"}}
  %lse: f32[B, T] = feedback_lse(%qb, %kb) {{scale=0.088}}
  %dinv: f32[B, ceiling(T/64), 64, 64] = feedback_diag_inverse(%qb, %kb, %g, %lse) {{scale=0.088, chunk_size=64}}
  %s: {dt}[B, T, 128] = feedback_chunked(%f, %qb, %kb, %g, %lse, %dinv) {{scale=0.088, chunk_size=64}}
  %y: {dt}[B, T, 32] = scan_chunked(%u, %dt, %A, %Bm, %Cm, %Dskip) {{chunk_size=16}}
  %x: {dt}[B, T, 128] = tri_solve({solve_w}, %f) {{upper={solve_upper}, unitriangular={solve_upper}}}
  %xt: {dt}[B, T, 128] = tri_solve({solve_w}, %f) {{upper={solve_lower}, unitriangular={solve_upper}}}
  return %att, %att2, %att3, %s, %y, %x, %xt
}}
"""


def sample_sources(dtype: str = "bf16") -> list:
    """The kernels of a graph with every core op (RoPE on and off, GQA, a key-padding mask; tri_solve), at GPU
    settings."""
    from ...ir import parse
    from .backend import TritonProgram, _generator, _operand_names
    from .feedback import generate_solve

    # tri_solve: lower non-unit on [B, T, T] weights for bf16, upper unit on broadcast [T, T] weights for f32,
    # and each one's transposed orientation (what the tri_solve backward solves: training.py)
    upper = dtype == "f32"
    graph = parse(SAMPLE_IR.format(dt=dtype, solve_w="%W2" if upper else "%W", solve_upper=upper,
                                   solve_lower=not upper))
    srcs = []
    for strategy in ("sequential", "associative"):
        prog = TritonProgram(graph, None, interpret=False, scan_strategy=strategy)
        for node in graph.nodes:
            if _generator(node) is None or (strategy == "associative" and node.op != "scan_chunked"):
                continue
            dtypes = {n: v.type.dtype.name for n, v in zip(_operand_names(node), node.inputs)
                      if v is not None and n != "mask"}
            srcs.extend(prog.source_for(node, dtypes, interpret=False).all_kernels())
            if node.op == "feedback_chunked" and strategy == "sequential":   # the lse-first fallback's kernels
                srcs.extend(generate_solve(node, dtypes, interpret=False).all_kernels())
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
