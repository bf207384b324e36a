"""The backward Triton kernels compile ahead of time for sm_90 (no GPU needed) at their GPU tile configurations,
in bf16 and f32: no spills, shared memory within sm_90's limit, wgmma where they call tl.dot; and the static FLOP
model of benchmarks/triton_static_backward.py (B=4, T=8192). Runs in a subprocess: the compiler needs
TRITON_INTERPRET unset."""
import json
import os
import subprocess
import sys

import pytest

import triton  # noqa: F401  (pinned in requirements/all.txt: always installed)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_SHARED_LIMIT = 232448


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static_bwd")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "triton-cache"), SESSA_COMPILER_KERNEL_DIR=str(tmp / "kernels"),
               TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_static_backward.py"), "--json"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_backward_kernel_compiles_without_spills_on_tensor_cores(records):
    kernels = [r for r in records if "role" in r]
    names = {(r["kernel"], r["dtype"]) for r in kernels}
    want = {"attention_lse", "attention_bwd_delta", "attention_bwd_dkdv", "attention_bwd_dq", "attention_rope",
            "feedback_lse", "feedback_diag_inverse", "feedback_bwd_update", "feedback_bwd_solve", "feedback_bwd_dq",
            "feedback_bwd_dk", "fbw_colprobs", "fbw_update", "fbw_solve", "fbw_rowprobs", "fbw_rowsum", "fbw_dq",
            "fbw_dk", "scan_bwd_states", "scan_bwd"}
    assert names == {(k, dt) for k in want for dt in ("bf16", "f32")}
    # the key-padding-mask variants of the attention kernels that read the mask (attention_bwd.py, key_padding=True)
    masked = {(r["role"], r["dtype"]) for r in kernels if r["op"] == "attention_backward_masked"}
    assert masked == {(role, dt) for role in ("lse", "dkdv", "dq") for dt in ("bf16", "f32")}
    for r in kernels:
        assert r["cubin_bytes"] > 0 and r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= SM90_SHARED_LIMIT, r
        if r["uses_dot"]:
            assert r["wgmma"], f"{r['kernel']} ({r['dtype']}) uses tl.dot but its PTX has no wgmma"


def test_backward_flop_model(records):
    """Issued over useful FLOPs (useful: the backward's products with the logits computed once). The attention
    backward and the feedback's strips strategy at width 1024 meet the 2.0 target; the feedback's rows strategy
    at width 128 does not (2.25 with its lse kernel, 2.05 without: the c = alpha s pass)."""
    ops = {(r["kernel"], r["dtype"]): r for r in records if "issued_over_useful" in r}
    assert set(ops) == {(k, dt) for k in ("attention_backward", "feedback_backward", "feedback_backward_strips")
                        for dt in ("bf16", "f32")}
    for (op, _), r in ops.items():
        assert r["useful_flops"] > 0 and r["issued_flops"] >= r["useful_flops"], r
        assert r["issued_over_useful_lse_given"] < r["issued_over_useful"], r
        if op in ("attention_backward", "feedback_backward_strips"):
            assert r["issued_over_useful"] <= 2.0, r
        else:
            assert r["issued_over_useful"] <= 2.5, r
