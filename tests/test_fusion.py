"""Fusion: the fuse pass (golden text, convexity), the fused IR on the eager backend, every generated
fused kernel under the interpreter (poisoned outputs, canaries) and AOT for sm_90, and compile() end to end."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import json
import os
import subprocess
import sys

import pytest
import torch

import sessa_compiler.backends.triton.fused  # noqa: F401  (eager implementation of `fused`)
from sessa_compiler.api import relative_error
from sessa_compiler.semantics import SEMANTICS, run_graph
from sessa_compiler.errors import IRError
from sessa_compiler.ir import parse
from sessa_compiler.passes import PassManager
from sessa_compiler.passes.fuse import Fuse, fuse_groups, is_convex

BLOCK_IR = """\
graph blk(%x: f32[B, T, 32], %h: f32[B, T, 64]) {
  param %ln.weight: f32[32]
  param %ln.bias: f32[32]
  param %w: f32[32, 32]
  %a: f32[B, T, 32], %g: f32[B, T, 32] = split(%h) {sizes=[32, 32], dim=-1}
  %act: f32[B, T, 32] = gelu(%a) {approximate='none'}
  %gated: f32[B, T, 32] = mul(%act, %g)
  %proj: f32[B, T, 32] = linear(%gated, %w)
  %res: f32[B, T, 32] = add(%x, %proj)
  %y: f32[B, T, 32] = layer_norm(%res, %ln.weight, %ln.bias) {normalized_shape=[32], eps=1e-05}
  return %res, %y
}
"""

BLOCK_FUSED_IR = """\
graph blk(%x: f32[B, T, 32], %h: f32[B, T, 64]) {
  param %ln.weight: f32[32]
  param %ln.bias: f32[32]
  param %w: f32[32, 32]
  %a: f32[B, T, 32], %g: f32[B, T, 32] = split(%h) {sizes=[32, 32], dim=-1}
  %gated: f32[B, T, 32] = fused(%a, %g) {group=0, kernel='pointwise', bytes_saved=256*B*T, body=['graph group0(%a: f32[B, T, 32], %g: f32[B, T, 32]) {', "%act: f32[B, T, 32] = gelu(%a) {approximate='none'}", '%gated: f32[B, T, 32] = mul(%act, %g)', 'return %gated', '}']}
  %proj: f32[B, T, 32] = linear(%gated, %w)
  %res: f32[B, T, 32], %y: f32[B, T, 32] = fused(%x, %proj, %ln.weight, %ln.bias) {group=1, kernel='rowwise', bytes_saved=128*B*T, body=['graph group1(%x: f32[B, T, 32], %proj: f32[B, T, 32], %ln.weight: f32[32], %ln.bias: f32[32]) {', '%res: f32[B, T, 32] = add(%x, %proj)', '%y: f32[B, T, 32] = layer_norm(%res, %ln.weight, %ln.bias) {normalized_shape=[32], eps=1e-05}', 'return %res, %y', '}']}
  return %res, %y
}
"""

# every kind of fused kernel: gating on split views (strided rows), layer-norm with a residual and a
# softplus epilogue at a width that is not a power of two (masked columns), a tanh-gamma chain on
# [B, T, 1] ending in a squeeze, and a cast
KERNELS_IR = """\
graph k(%x: {dt}[B, T, 48], %h: {dt}[B, T, 96], %p: {dt}[B, T, 48], %s: {dt}[B, T, 1]) {{
  param %ln.weight: {dt}[48]
  param %ln.bias: {dt}[48]
  param %w: {dt}[48, 48]
  param %gb: {dt}[]
  %a: {dt}[B, T, 48], %g: {dt}[B, T, 48] = split(%h) {{sizes=[48, 48], dim=-1}}
  %act: {dt}[B, T, 48] = gelu(%a) {{approximate='tanh'}}
  %sg: {dt}[B, T, 48] = silu(%g)
  %gated: {dt}[B, T, 48] = mul(%act, %sg)
  %proj: {dt}[B, T, 48] = linear(%gated, %w)
  %res: {dt}[B, T, 48] = add(%x, %proj)
  %y: {dt}[B, T, 48] = layer_norm(%res, %ln.weight, %ln.bias) {{normalized_shape=[48], eps=1e-05}}
  %sp: {dt}[B, T, 48] = softplus(%p) {{beta=1, threshold=20}}
  %e: {dt}[B, T, 48] = sub(%y, %sp)
  %pre: {dt}[B, T, 1] = add(%gb, %s)
  %th: {dt}[B, T, 1] = tanh(%pre)
  %gm: {dt}[B, T, 1] = mul(%th, 0.999)
  %gamma: {dt}[B, T] = squeeze(%gm) {{dims=[2]}}
  %lo: {dt}[B, T, 48] = maximum(%e, -0.5)
  %hi: {dt}[B, T, 48] = minimum(%lo, 0.7)
  %rl: {dt}[B, T, 48] = relu(%hi)
  %e2: {dt}[B, T, 48] = mul(%e, %e)
  %sq: {dt}[B, T, 48] = add(%e2, %rl)
  %r: {dt}[B, T, 48] = rsqrt(%sq)
  %c: f16[B, T, 48] = cast(%r) {{dtype=dtype.f16}}
  %out: {dt}[B, T, 48] = sigmoid(%c)
  return %res, %out, %gamma
}}
"""
DT = {"f32": torch.float32, "bf16": torch.bfloat16}


def fused(text: str):
    g = parse(text)
    pm = PassManager([Fuse()])
    pm.run(g)
    return g, pm.records[0]


def params_for(g, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(v.type.concrete_shape({}), generator=gen) * 0.3 + (1.0 if "weight" in name else 0.0))
            .to(dtype) for name, v in g.param_values.items()}


def inputs_for(g, B, T, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(v.type.concrete_shape({"B": B, "T": T}), generator=gen).to(dtype) for v in g.inputs]


# -- the pass ---------------------------------------------------------------------------------------------
def test_fuse_golden_and_round_trip():
    g, p = fused(BLOCK_IR)
    assert str(g) == BLOCK_FUSED_IR
    assert str(parse(BLOCK_FUSED_IR)) == BLOCK_FUSED_IR
    assert p.rewrites == 2 and p.decisions == ["group 0 (pointwise): gelu %act, mul %gated -> 1 kernel, saves 256*B*T bytes",
                           "group 1 (rowwise): add %res, layer_norm %y -> 1 kernel, saves 128*B*T bytes"]


def test_fused_ir_runs_on_eager_and_matches_the_original():
    for text in (BLOCK_IR, KERNELS_IR.format(dt="f32")):
        original = parse(text)
        g, _ = fused(text)
        assert g.ops().count("fused") >= 2
        params = params_for(original)
        for B, T in ((1, 1), (2, 13)):
            xs = inputs_for(original, B, T)
            for a, b in zip(run_graph(original, xs, params), run_graph(g, xs, params)):
                assert relative_error(b, a) <= 1e-6


BAD_IR = """\
graph bad(%x: f32[B, T, 16]) {
  param %w: f32[16, 16]
  %e: f32[B, T, 16] = exp(%x)
  %p: f32[B, T, 16] = linear(%e, %w)
  %y: f32[B, T, 16] = add(%e, %p)
  return %y
}
"""


def test_convexity_check_rejects_a_group_that_leaves_and_reenters():
    g = parse(BAD_IR)
    e, lin, add = g.nodes
    nxg = g.to_networkx()
    assert not is_convex(nxg, {e, add}) and is_convex(nxg, {e}) and is_convex(nxg, {e, lin, add})
    with pytest.raises(IRError, match=r"not convex: the path %e -> %p -> %y leaves the group"):
        fuse_groups(g, [[e, add]])
    g2, p = fused(BAD_IR)      # the pass never builds it
    assert g2.ops() == ["exp", "linear", "add"] and "not convex: %e + %y" in p.rejected


def test_groups_that_feed_each_other_both_ways_are_rejected():
    g = parse("""\
graph two(%x: f32[B, T, 16]) {
  param %w: f32[16, 16]
  %a1: f32[B, T, 16] = exp(%x)
  %b1: f32[B, T, 16] = tanh(%x)
  %p: f32[B, T, 16] = linear(%a1, %w)
  %q: f32[B, T, 16] = linear(%b1, %w)
  %a2: f32[B, T, 16] = mul(%q, %a1)
  %b2: f32[B, T, 16] = mul(%p, %b1)
  return %a2, %b2
}
""")
    a1, b1, _, _, a2, b2 = g.nodes
    with pytest.raises(IRError, match="both ways"):
        fuse_groups(g, [[a1, a2], [b1, b2]])  # each convex, but A -> p -> B and B -> q -> A


# -- generated kernels under the interpreter ----------------------------------------------------------------
CANARY, PAD = 1234.5, 64


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_every_fused_kernel_matches_eager_under_the_interpreter(dt):
    triton_env.require_interpreter()
    from sessa_compiler.backends.triton.codegen import KERNEL_CACHE
    from sessa_compiler.backends.triton.fused import generate_fused, launch_fused

    dtype = DT[dt]
    g, _ = fused(KERNELS_IR.format(dt=dt))
    nodes = [n for n in g.nodes if n.op == "fused"]
    assert sorted(n.attrs["kernel"] for n in nodes) == ["pointwise", "pointwise", "rowwise"]
    params = params_for(g, dtype)
    tol = 1e-5 if dt == "f32" else 3e-2
    for B, T in ((1, 1), (1, 13), (2, 37)):  # 74 rows: two programs of 64 rows, the second masked
        xs = inputs_for(g, B, T, dtype)
        for node in nodes:
            operands = run_graph(g, xs, params, targets=node.inputs)
            ref = SEMANTICS["fused"](*operands, group=0, kernel=node.attrs["kernel"], body=node.attrs["body"])
            ref = ref if isinstance(ref, tuple) else (ref,)
            dtypes = {f"in{i}": {torch.float32: "f32", torch.bfloat16: "bf16"}[x.dtype] for i, x in enumerate(operands)}
            kernel = KERNEL_CACHE.load(generate_fused(node, dtypes, True), True)
            bufs, outs = [], []
            for r in ref:
                buf = torch.full((r.numel() + PAD,), float("nan"), dtype=r.dtype)
                buf[r.numel():] = CANARY
                bufs.append(buf)
                outs.append(buf[:r.numel()].view(r.shape))
            got = launch_fused(kernel, node, operands, out=outs)
            got = got if isinstance(got, tuple) else (got,)
            for buf, o, r, x in zip(bufs, outs, ref, got):
                assert x.data_ptr() == o.data_ptr()
                assert bool((buf[r.numel():] == CANARY).all()), f"{kernel.source.name} wrote past its output"
                assert torch.isfinite(o).all(), f"{kernel.source.name} left poisoned elements at B={B}, T={T}"
                err = relative_error(o.double(), r.double())
                assert err <= tol, (kernel.source.name, dt, B, T, err)


def test_fused_kernel_source_is_readable_and_shared_across_groups():
    from sessa_compiler.backends.triton.fused import generate_fused

    g, _ = fused(KERNELS_IR.format(dt="f32"))
    node = next(n for n in g.nodes if n.op == "fused" and n.attrs["kernel"] == "rowwise")
    src = generate_fused(node, {f"in{i}": "f32" for i in range(len(node.inputs))}, False)
    assert src.source.startswith("# sessa_compiler generated Triton kernel `fused_add_layer_norm")
    assert "# IR op: fused (rowwise: add -> layer_norm" in src.source and "N=48" in src.source
    assert "do_not_specialize=['R'" in src.source  # rows (B*T) are a runtime argument
    # the same ops in a different group / with other value names give the same kernel source
    renamed = parse(str(g).replace("%res", "%residual").replace("group=", "group=1").replace("group1", "group11"))
    node2 = next(n for n in renamed.nodes if n.op == "fused" and n.attrs["kernel"] == "rowwise")
    assert generate_fused(node2, {f"in{i}": "f32" for i in range(len(node2.inputs))}, False).body == src.body


# -- ahead of time for sm_90 ------------------------------------------------------------------------------------
AOT_SCRIPT = """
import json, sys
from sessa_compiler.ir import parse
from sessa_compiler.passes import PassManager
from sessa_compiler.passes.fuse import Fuse
from sessa_compiler.backends.triton.aot import compile_kernel
from sessa_compiler.backends.triton.fused import generate_fused
text = sys.stdin.read()
for dt in sys.argv[1:]:
    g = parse(text.format(dt=dt))
    PassManager([Fuse()]).run(g)
    for n in g.nodes:
        if n.op == "fused":
            src = generate_fused(n, {f"in{i}": x.type.dtype.name for i, x in enumerate(n.inputs)}, False)
            try:
                rec = compile_kernel(src)
            except Exception as e:
                rec = {"kernel": src.name, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            rec["dtype"] = dt
            print(json.dumps(rec), flush=True)
"""


def test_every_fused_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, "bf16", "f32"], input=KERNELS_IR, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert not [r for r in records if "error" in r], records
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records) == 6  # three groups x two dtypes
    for r in records:
        assert r["cubin_bytes"] > 0 and not r["uses_dot"]


# -- end to end ---------------------------------------------------------------------------------------------------
def test_compile_sessa_layer_with_fusion_matches_eager():
    triton_env.require_interpreter()
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(0)
    model = SessaLayer(32, n_heads=2).eval()
    compiled = sc.compile(model, backend="triton", options={"feedback_chunk_size": 16})
    with torch.no_grad():
        for T in (1, 17):
            x = torch.randn(2, T, 32)
            out = compiled(x)
            ref = run_graph(compiled.graph, [x], compiled.graph.params)[0]
            assert relative_error(out, ref) <= 1e-4
    prog = compiled._backend.program(compiled.graph)
    assert "fused" in prog.graph.ops()
    text = compiled.explain()
    assert "-> fuse" in text and "fusion groups (1;" in text
    assert "group 0 (pointwise) -> %squeeze: add %add_2, tanh %tanh, mul %mul_8, squeeze %squeeze" in text
    assert "saves 24*B*T bytes" in text
    assert set(compiled._backend.fused_kernel_sources(compiled.graph)) == {"group0"}
    unfused = sc.compile(model, torch.randn(1, 3, 32), backend="triton", options={"fuse": False})
    assert "fused" not in unfused._backend.program(unfused.graph).graph.ops()


UNARY_IR = """\
graph u(%x: {dt}[B, T, 32]) {{
  %a: {dt}[B, T, 32] = floor(%x)
  %b: {dt}[B, T, 32] = ceil(%a)
  %c: {dt}[B, T, 32] = round(%x)
  %d: {dt}[B, T, 32] = sign(%x)
  %e: {dt}[B, T, 32] = expm1(%x)
  %f: {dt}[B, T, 32] = abs(%x)
  %g: {dt}[B, T, 32] = log1p(%f)
  %h: {dt}[B, T, 32] = exp2(%d)
  %i: {dt}[B, T, 32] = log2(%f)
  %s1: {dt}[B, T, 32] = add(%b, %c)
  %s2: {dt}[B, T, 32] = mul(%e, %g)
  %s3: {dt}[B, T, 32] = add(%h, %i)
  %s4: {dt}[B, T, 32] = add(%s1, %s2)
  %y: {dt}[B, T, 32] = add(%s3, %s4)
  return %y
}}
"""


def test_rounding_and_exp_log_helpers_compile_for_sm90(tmp_path):
    """floor/ceil/round/sign/expm1/log1p/exp2/log2 in one pointwise group: the helpers (_round, _expm1, _log1p)
    compile ahead of time for sm_90 in f32 and bf16."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, "bf16", "f32"], input=UNARY_IR, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert not [r for r in records if "error" in r], records
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records) == 2 and all(r["cubin_bytes"] > 0 and r["spill_bytes"] == 0 for r in records), records
