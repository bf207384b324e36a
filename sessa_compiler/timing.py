"""Wall-clock timing for benchmarks: the median of repeated calls after a warm-up."""
from __future__ import annotations

import statistics
import time


def median_ms(fn, x, repeats: int = 5) -> float:
    fn(x)  # warm-up: first calls build kernels and fill caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
