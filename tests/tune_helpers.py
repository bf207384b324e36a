"""Helpers shared by the tuning tests of every backend.

`model()`, `example(t)`, `T`: the layer (feedback and attention with RoPE) and input every tuning test
uses (each of their tests gets its own tuning cache: the `cache_dir` fixture in conftest.py).

`wrong_first(op, wrong, injected)`: a kernel hook for `sc.tune(kernel_hook=...)` that puts a candidate
config first in `op`'s search space which returns at once with a wrong answer (1% off the reference),
recording each time it runs in `injected`.


`run_compile(cache_dir, backend, options, autotune)` compiles `model()` on `example()` in a fresh Python
process whose tuning cache is `cache_dir`, counts the configs
the tuner timed, and returns what a warm-start test checks: compile and tuning seconds, cache hits,
the chosen configs, the relative error against the module, and explain().
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import torch

from sessa_compiler.models import SessaLayer

ROOT = Path(__file__).resolve().parent.parent
T = 24


def model():
    torch.manual_seed(0)
    return SessaLayer(32, n_heads=2).eval()  # feedback + attention (with RoPE) kernels


def example(t=T):
    torch.manual_seed(1)
    return torch.randn(2, t, 32)

SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    from tests import triton_env  # TRITON_INTERPRET before triton is imported
    import torch
    import sessa_compiler as sc
    from sessa_compiler.autotune import tuner
    from tests.tune_helpers import model, example
    runs = []
    orig = tuner._time
    tuner._time = lambda k, c, r: runs.append(c) or orig(k, c, r)
    m, x = model(), example()
    start = time.perf_counter()
    compiled = sc.compile(m, (x,), backend={backend!r}, options={options!r}, autotune={autotune!r})
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        ref = m(x)
        err = float((compiled(x) - ref).abs().max() / ref.abs().max())
    print(json.dumps({{"compile_s": compile_s, "tune_s": compiled.tune_seconds, "timed": len(runs), "err": err,
                      "hits": [r.from_cache for r in compiled.tune_results],
                      "configs": sorted(json.dumps(r.config, sort_keys=True) for r in compiled.tune_results),
                      "explain": compiled.explain()}}))
""")


def run_compile(cache_dir, backend: str, options: dict | None, autotune: dict) -> dict:
    # both processes trace (traced graphs are not cached): the warm one differs from the cold one by its tuning cache
    # only, so its tuning seconds are cache lookups, not also the imports a trace would have made first
    env = {**os.environ, "SESSA_COMPILER_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1",
           "SESSA_COMPILER_COMPILE_CACHE": "libraries"}
    code = SCRIPT.format(root=str(ROOT), backend=backend, options=options, autotune=autotune)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=False, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wrong_first(op: str, wrong: dict, injected: list):
    def hook(k, node):
        if node.op != op:
            return k
        right_run = k.run
        bad = k.reference() * 1.01

        def run(config):
            if config == wrong:
                injected.append(config)
                return bad
            return right_run(config)

        return replace(k, space=[wrong] + k.space, run=run)

    return hook
