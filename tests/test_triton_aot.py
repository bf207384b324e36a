"""Every generated kernel compiles ahead of time for sm_90 (no GPU needed) and uses tensor cores
where it calls tl.dot. Runs in a subprocess: the compiler needs TRITON_INTERPRET unset."""
import json
import os
import subprocess
import sys

import pytest

import triton  # noqa: F401  (pinned in requirements/all.txt: always installed)


def test_every_kernel_compiles_for_sm90_with_tensor_cores(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "sessa_compiler.backends.triton.aot", "bf16", "f32"], env=env,
                          capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in records if "error" in r]
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = {(r["kernel"], r["tunables"].get("strategy", "")) for r in records}
    assert {k for k, _ in kernels} == {"attention_fwd", "feedback_lse", "feedback_diag_inverse", "feedback_solve",
                                       "feedback_probs", "feedback_update", "feedback_probs_online",
                                       "feedback_update_online", "feedback_solve_online", "scan_chunked", "rope_rotate",
                                       "tri_solve_fwd", "tri_solve_diag_inverse"}
    # per dtype: attention with (+ rope_rotate) and without RoPE and with a key-padding mask, the one-pass
    # feedback's three kernels, the lse-first fallback's five (its lse and inverse kernels also serve the
    # backward), two scans, and the two tri_solve kernels twice (bf16: a lower non-unit system; f32: an upper
    # unit one with broadcast weights; and each in the transposed orientation the tri_solve backward solves)
    assert len(records) == 36
    for r in records:
        assert r["cubin_bytes"] > 0
        assert r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= 232448, r   # what one block may use on sm_90: more fails to launch
        if r["uses_dot"]:
            assert r["wgmma"] or r["mma"], f"{r['kernel']} uses tl.dot but its PTX has no mma/wgmma"
        # 64-row tiles at 4 warps are warpgroup tiles: Hopper's wgmma, not the older mma.sync
        if r["uses_dot"]:
            assert r["wgmma"], r
