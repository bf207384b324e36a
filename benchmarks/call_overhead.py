"""Per-call cost of reading a compiled module's weights live (the check that makes reassigned parameters,
buffers and load_state_dict(assign=True) visible): median over repeats, for SessaLayer(512, n_heads=8).

    python benchmarks/call_overhead.py
"""
from __future__ import annotations

import platform
import statistics
import time

import torch

import sessa_compiler as sc
from sessa_compiler.api import _Live
from sessa_compiler.models import SessaLayer


def main(repeats: int = 2000) -> None:
    model = SessaLayer(512, n_heads=8).eval()
    compiled = sc.compile(model, backend="eager")
    with torch.no_grad():
        compiled(torch.randn(1, 64, 512))
    live = _Live(model, compiled.graph)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params = live.read(model)
        live.mismatch(params)
        times.append(time.perf_counter() - t0)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}: reading {len(live.paths)} parameters live and checking their types: "
          f"median {statistics.median(times) * 1e6:.0f} us per call over {repeats} repeats")


if __name__ == "__main__":
    main()
