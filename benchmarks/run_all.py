"""Reproduce every performance table in the README with one command.

    python benchmarks/run_all.py            # CPU tables; the GPU check too when a CUDA device is present

Writes benchmarks/results/onnx_cpu.md, benchmarks/results/tvm_cpu.md, prints the Triton static
table (benchmarks/triton_static.py) and (on a GPU)
benchmarks/results_gpu.md, each stamped with date, machine and command.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = [
    ("onnx_cpu", [sys.executable, str(HERE / "onnx_cpu.py"), "--threads", "1", "--repeats", "5"]),
    ("tvm_cpu", [sys.executable, str(HERE / "tvm_cpu.py"), "--reps", "7"]),
    ("first_call", [sys.executable, str(HERE / "first_call.py")]),
    ("triton_static", [sys.executable, str(HERE / "triton_static.py")]),   # sm_90 compiles: no GPU needed
    # exits 1 when it finds a mismatch or crash (the README's fuzz table lists them)
    ("fuzz", [sys.executable, str(HERE / "fuzz.py"), "--structures", "24", "--draws", "8", "--max-T", "129"]),
    # set SESSA_REFERENCE_DIR (the directory holding the public reference's sessa package) for its rows
    ("decode_cpu", [sys.executable, str(HERE / "decode_cpu.py"), "--threads", "1", "--contexts", "1024", "8192",
                    "32768", "--decoder"]),
    ("scaling_cpu", [sys.executable, str(HERE / "scaling_cpu.py"), "--quick"]),
]


def main() -> int:
    import torch

    runs = list(RUNS)
    if torch.cuda.is_available():
        runs.append(("gpu_check", [sys.executable, str(HERE / "gpu_check.py")]))
    else:
        print("no CUDA device: skipping benchmarks/gpu_check.py (the Triton table)")
    failed = []
    for name, cmd in runs:
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
