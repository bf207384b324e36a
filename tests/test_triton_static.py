"""Static proofs of the generated kernels at the target configuration (bf16 SessaLayer(1024, 8 heads),
B=4, T=8192), from sm_90 ahead-of-time compiles: `benchmarks/triton_static.py --json`, run once per
test session in a subprocess (the compiler needs TRITON_INTERPRET unset)."""
import json
import os
import re
import subprocess
import sys

import pytest

import triton  # noqa: F401  (pinned in requirements/all.txt: always installed)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("kernel", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes", "wgmma_shapes", "cp_async",
          "vector_loads", "issued_flops", "useful_flops", "est_ms")
SM90_SHARED_LIMIT = 232448   # bytes of shared memory one block may use on sm_90 (227 KB)
TENSOR_CORE_KERNELS = ("attention_fwd", "feedback_lse", "feedback_diag_inverse", "feedback_probs", "feedback_update",
                       "feedback_solve")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "triton-cache"), SESSA_COMPILER_KERNEL_DIR=str(tmp / "kernels"),
               TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_static.py"), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert recs and recs[-1]["kernel"] == "layer"
    return recs


def kernels(records):
    return [r for r in records if r["kernel"] != "layer"]


def test_every_kernel_reports_every_field(records):
    names = {r["kernel"] for r in kernels(records)}
    assert set(TENSOR_CORE_KERNELS) <= names and "rope_rotate" in names
    for r in kernels(records):
        missing = [f for f in FIELDS if f not in r]
        assert not missing, (r["kernel"], missing)
        assert r["registers"] > 0 and r["est_ms"] >= 0


def test_no_spills_and_shared_memory_fits(records):
    for r in kernels(records):
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} bytes per thread"
        assert r["shared_bytes"] <= SM90_SHARED_LIMIT, (r["kernel"], r["shared_bytes"])


def test_attention_and_feedback_use_full_width_wgmma_and_async_copies(records):
    for r in kernels(records):
        if r["kernel"] not in TENSOR_CORE_KERNELS:
            continue
        assert r["wgmma_shapes"], f"{r['kernel']}: no wgmma"
        widths = [int(re.match(r"m64n(\d+)k\d+", s).group(1)) for s in r["wgmma_shapes"]]
        assert min(widths) >= 64, f"{r['kernel']}: half-width wgmma {r['wgmma_shapes']}"
        assert r["cp_async"] > 0, f"{r['kernel']}: no asynchronous copies (loads not pipelined)"


def test_layer_estimate_meets_the_static_targets(records):
    layer = records[-1]
    assert layer["issued_over_useful"] <= 1.5, layer
    assert layer["est_ms"] <= 4.4, layer


def test_tri_solve_variant_is_listed_with_tensor_cores(records):
    """The general triangular solve (a fallback, not in the layer): compiled at the target, on tensor cores,
    issuing about the substitution's own FLOPs (the diagonal-block inverses are the only extra work)."""
    solve = {r["kernel"]: r for r in kernels(records) if r["kernel"].startswith("tri_solve")}
    assert set(solve) == {"tri_solve_fwd", "tri_solve_diag_inverse"}
    for r in solve.values():
        assert r["in"].startswith("variant: tri_solve") and r["wgmma_shapes"], r
    fwd = solve["tri_solve_fwd"]
    assert fwd["useful_flops"] > 0 and fwd["issued_flops"] <= 1.05 * fwd["useful_flops"], fwd
