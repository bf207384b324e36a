"""Wall-clock timing for benchmarks: medians and spreads of repeated calls, variants alternating.

A single median hides noise: on a shared machine one run may give 38x and a quiet rerun 1.4x. So the
variants being compared are timed in turns (round r starts at variant r, so none always follows the same
one), each reports its median and interquartile range, and a ratio is printed only when both spreads are
small enough for it to mean something.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

# A ratio is shown only when each variant's interquartile range is within this fraction of its median.
MAX_SPREAD = 0.10


def median_ms(fn, x, repeats: int = 5) -> float:
    fn(x)  # warm-up: first calls build kernels and fill caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class Timing:
    """The times of one variant in ms."""

    name: str
    times_ms: list

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def quartiles(self) -> tuple:
        if len(self.times_ms) < 2:
            return self.median, self.median
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        lo, hi = self.quartiles
        return (hi - lo) / self.median if self.median > 0 else 0.0

    def __str__(self) -> str:
        lo, hi = self.quartiles
        return f"{self.median:.2f} ms (quartiles {lo:.2f}-{hi:.2f}, {len(self.times_ms)} runs)"


def time_alternating(fns: dict, x, repeats: int = 7, warmup: int = 1) -> dict:
    """Time each callable of ``fns`` (name -> fn) on ``x`` ``repeats`` times, the variants in turns."""
    for fn in fns.values():
        for _ in range(warmup):  # first calls build kernels and fill caches
            fn(x)
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[n](x)
            times[n].append((time.perf_counter() - start) * 1e3)
    return {n: Timing(n, t) for n, t in times.items()}


def ratio(base: Timing, other: Timing, max_spread: float = MAX_SPREAD) -> float | None:
    """base / other (how many times faster other is), or None when either spread is too large for it."""
    if max(base.spread, other.spread) > max_spread or other.median <= 0:
        return None
    return base.median / other.median
