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
                       "feedback_solve", "feedback_probs_online", "feedback_update_online", "feedback_solve_online")
FALLBACK = "variant: lse-first feedback"   # the lse-first feedback kernels, compiled and modelled beside the layer


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
    assert recs and recs[-2]["kernel"] == "layer" and recs[-1]["kernel"] == "decode_step"
    return recs


def kernels(records):
    return [r for r in records if r["kernel"] not in ("layer", "decode_step")]


def layer_row(records):
    return next(r for r in records if r["kernel"] == "layer")


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
        if r["kernel"] == "feedback_update_online":   # its 64 x 64 inverse squarings split over two warpgroups
            assert max(widths) >= 128, r["wgmma_shapes"]
            continue
        assert min(widths) >= 64, f"{r['kernel']}: half-width wgmma {r['wgmma_shapes']}"
        assert r["cp_async"] > 0, f"{r['kernel']}: no asynchronous copies (loads not pipelined)"


MODEL_FIELDS = ("launches", "l2_bytes", "hbm_bytes", "grid", "ctas_per_sm", "est_ms")


def layer_kernels(records):
    return [r for r in kernels(records) if r["in"] == "layer"]


def test_layer_lower_bound_meets_the_static_targets(records):
    """The old estimate (each kernel at its roofline, no launches) stays as the lower bound."""
    layer = layer_row(records)
    assert layer["issued_over_useful"] <= 1.5, layer
    assert layer["roofline_ms"] <= 4.4, layer


def test_model_fields_and_launch_counts(records):
    """Every layer kernel has the model's fields; the one-pass feedback launches three kernels per outer chunk
    (T / 256 = 32 each) and nothing else (no lse or inverse pass), RoPE rotates q and k (two launches), and the
    layer counts them all plus the torch ops."""
    rows = {r["kernel"]: r for r in layer_kernels(records)}
    for r in rows.values():
        missing = [f for f in MODEL_FIELDS if f not in r]
        assert not missing, (r["kernel"], missing)
        assert r["launches"] >= 1 and r["ctas_per_sm"] >= 1 and r["est_ms"] > 0
        assert r["est_ms"] >= 0.999 * r["roofline_ms"], r   # the model never beats the roofline
    for k in ("feedback_probs_online", "feedback_update_online", "feedback_solve_online"):
        assert rows[k]["launches"] == 8192 // 256, rows[k]
    assert not {"feedback_lse", "feedback_diag_inverse", "feedback_probs", "feedback_update"} & set(rows)
    assert rows["rope_rotate"]["launches"] == 2 and rows["attention_fwd"]["launches"] == 1
    layer = layer_row(records)
    assert layer["launches"] > sum(r["launches"] for r in rows.values()) >= 100, layer


def test_occupancy_follows_registers_and_shared_memory(records):
    for r in layer_kernels(records):
        regs = r["num_warps"] * -(-r["registers"] * 32 // 256) * 256
        limit = min(65536 // regs, 233472 // (r["shared_bytes"] + 1024) if r["shared_bytes"] else 32,
                    64 // r["num_warps"], 32)
        assert r["ctas_per_sm"] == limit, r
    att = next(r for r in layer_kernels(records) if r["kernel"] == "attention_fwd")
    assert att["ctas_per_sm"] == 1   # 191 registers x 256 threads, 128 KB of shared memory


def test_l2_traffic_follows_the_tile_schedule(records):
    """feedback_lse re-reads its q row block for every 128-column tile (the width does not fit one tile): the
    L2 -> SM bytes are B * sum over row blocks of tiles * (128 + 128) rows * 1024 * 2 bytes, about 4.4 GB,
    thirty times the bytes it must move (6.5 GB with the 64-column tiles it had before)."""
    rows = {r["kernel"]: r for r in kernels(records) if r["in"].startswith(FALLBACK)}
    lse = rows["feedback_lse"]
    tiles = sum(-(-((m + 1) * 128 - 1) // 128) for m in range(8192 // 128))
    want = 4 * (tiles * (128 + 128) * 1024 * 2 + 64 * 128 * 4)
    assert abs(lse["l2_bytes"] - want) <= 1e-6 * want, (lse["l2_bytes"], want)
    assert lse["l2_bytes"] > 25 * lse["hbm_bytes"]
    # the update reads P and every earlier row of the fp32 s for every outer chunk: s (134 MB) exceeds the L2
    upd = rows["feedback_update"]
    assert upd["hbm_bytes"] > 10 * 4 * 4 * 8192 * 1024 and upd["l2_bytes"] > 8e9, upd
    # the one-pass update reads bf16 P and the bf16 output rows of s: less than two thirds of those bytes
    online = {r["kernel"]: r for r in layer_kernels(records)}
    assert online["feedback_update_online"]["l2_bytes"] < 0.67 * upd["l2_bytes"], online["feedback_update_online"]
    assert online["feedback_update_online"]["hbm_bytes"] < 0.6 * upd["hbm_bytes"], online["feedback_update_online"]
    # the probabilities kernel computes each causal logit tile once: no more tensor-core work than the fallback's
    assert online["feedback_probs_online"]["issued_flops"] <= rows["feedback_probs"]["issued_flops"]


def test_layer_estimate_counts_launches_and_sequential_chains(records):
    """The honest estimate: kernels from the tile schedule, the solve's sequential chains, launches (host
    cost and device gaps). Above the old lower bound; a regression ceiling above the estimate with the one-pass
    feedback (4.70 ms, 2026-12-06; 6.11 ms with the lse-first feedback, which is modelled beside it). The
    target (3.3 ms) is not reached: see benchmarks/results/triton_static.md."""
    layer = layer_row(records)
    for f in ("launch_ms", "critical_path_ms", "est_ms", "est_graph_ms", "device_ms"):
        assert layer[f] > 0, (f, layer)
    assert abs(layer["est_ms"] - layer["device_ms"] - layer["launch_ms"]) < 1e-6 and layer["launch_ms"] >= 0.1
    assert layer["est_ms"] > layer["roofline_ms"]
    assert layer["est_graph_ms"] < layer["est_ms"]   # replaying a graph removes the host cost per launch
    assert layer["critical_path_ms"] >= 0.1, layer   # 32 chunks x 4 inner blocks of dependent loads
    assert layer["est_ms"] <= 4.9, layer
    assert 5.8 <= layer["lse_first_feedback_ms"] <= 6.5, layer   # the lse-first path, as estimated before
    assert layer["feedback_ms"] < 0.7 * layer["feedback_lse_first_ms"], layer
    assert layer["est_ms"] < layer["lse_first_feedback_ms"] - 1.0, layer


def test_tri_solve_variant_is_listed_with_tensor_cores(records):
    """The general triangular solve (a fallback, not in the layer): compiled at the target, on tensor cores,
    issuing about the substitution's own FLOPs (the diagonal-block inverses are the only extra work)."""
    solve = {r["kernel"]: r for r in kernels(records) if r["kernel"].startswith("tri_solve")}
    assert set(solve) == {"tri_solve_fwd", "tri_solve_diag_inverse"}
    for r in solve.values():
        assert r["in"].startswith("variant: tri_solve") and r["wgmma_shapes"], r
    fwd = solve["tri_solve_fwd"]
    assert fwd["useful_flops"] > 0 and fwd["issued_flops"] <= 1.05 * fwd["useful_flops"], fwd


def test_decode_step_launches_and_floor(records):
    """The decode step at context 8192, B=4: launches counted from one step under the interpreter (five Triton
    launches: the attention's prologue and the two split-K pairs; the torch ops between them), the floor from the
    weights and the caches."""
    dec = records[-1]
    assert dec["triton_launches"] == 5 and 10 <= dec["torch_launches"] <= 80, dec
    caches = 8192 * 4 * (2 * 8 * 128 * 2)   # attention K and V, bf16, at least; the feedback's caches add
    assert dec["floor_bytes"] > caches + 9e6, dec
    assert dec["floor_ms"] < dec["est_graph_ms"] < dec["est_ms"], dec
    # recorded as a CUDA graph on CUDA (serving.DecodeGraphs): 1.81x the floor on 2026-12-08 (24 launches: RoPE,
    # the cache writes and the feedback's update inside the decode kernels; 2.55x with 48 before). The target:
    assert dec["launches"] <= 26 and dec["graph_over_floor"] <= 2.0, dec
