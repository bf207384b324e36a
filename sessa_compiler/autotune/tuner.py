"""Search a kernel's tunables: every candidate is checked against the reference before it may win.

Backends describe each tunable kernel as a ``TunableKernel``; ``tune_kernel`` runs the candidates
(within a budget of seconds or trials), rejects any whose output differs from the eager reference
beyond the spec's tolerance (a fast wrong config is never chosen), picks the fastest by the median of
repeated timings, and stores the winner in the persistent cache. A cache hit skips tuning entirely.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SessaCompilerError
from .cache import CacheKey, TuningCache, make_key

try:  # progress bars are a convenience: the GPU machines have only torch, triton and numpy
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised by tests/test_triton_minimal_env.py
    class tqdm:  # noqa: N801 - the subset of tqdm's interface used here, showing nothing
        def __init__(self, iterable=(), **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix_str(self, *args, **kwargs):
            pass

        def update(self, n=1):
            pass

        def close(self):
            pass


@dataclass
class TunableKernel:
    name: str
    backend: str
    source: str  # kernel source (or a description that changes whenever the generated code does)
    space: list  # candidate configs (dicts)
    run: Callable[[dict], Any]  # run with one config, return the output(s) to compare
    reference: Callable[[], Any]  # the eager reference output(s)
    seq_len: int
    tolerance: float
    device: Any = None
    timer: Callable[[Callable[[], Any]], float] | None = None  # seconds for one call; default perf_counter


@dataclass
class TuneResult:
    kernel: str
    config: dict
    from_cache: bool
    median_ms: float | None = None
    tried: int = 0
    rejected: list = field(default_factory=list)  # (config, reason)


class TuningError(SessaCompilerError):
    pass


def _error(out, ref) -> float:
    import torch

    from ..tolerance import relative_error

    outs = out if isinstance(out, (list, tuple)) else [out]
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    return max(relative_error(torch.as_tensor(o), torch.as_tensor(r)) for o, r in zip(outs, refs))


def wall_clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time(k: TunableKernel, config: dict, repeats: int) -> float:
    timer = k.timer or wall_clock
    return statistics.median(timer(lambda: k.run(config)) for _ in range(repeats)) * 1e3


def tune_kernel(k: TunableKernel, *, cache: TuningCache | None = None, budget_s: float | None = None,
                max_trials: int | None = None, repeats: int = 5, progress: bool = True) -> TuneResult:
    cache = cache or TuningCache()
    key: CacheKey = make_key(k.backend, k.name, k.source, k.space, k.seq_len, k.device)
    hit = cache.get(key)
    if hit is not None:
        return TuneResult(k.name, hit, True)
    with cache.lock(key):
        hit = cache.get(key)  # another process may have tuned it while we waited
        if hit is not None:
            return TuneResult(k.name, hit, True)
        ref = k.reference()
        start = time.perf_counter()
        best, best_ms, tried, rejected = None, float("inf"), 0, []
        # a bar on a terminal only (disable=None: off when stderr is not a tty), counting configs tried
        bar = tqdm(total=len(k.space), desc=f"tuning {k.name}", disable=None if progress else True, leave=False)
        for config in k.space:
            if (budget_s is not None and time.perf_counter() - start > budget_s) or \
                    (max_trials is not None and tried >= max_trials):
                break
            tried += 1
            bar.update(1)
            try:
                err = _error(k.run(config), ref)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is rejected
                rejected.append((config, f"{type(e).__name__}: {e}"))
                continue
            if not err <= k.tolerance:
                rejected.append((config, f"error {err:.2e} > {k.tolerance:.0e}"))
                continue
            ms = _time(k, config, repeats)
            if ms < best_ms:
                best, best_ms = config, ms
        bar.close()
        if best is None:
            raise TuningError(f"tuning {k.name}: none of the {tried} configs tried matched the reference "
                              f"({'; '.join(f'{c}: {r}' for c, r in rejected[:3])})")
        cache.put(key, best, median_ms=best_ms, candidates=tried)
        return TuneResult(k.name, best, False, best_ms, tried, rejected)
