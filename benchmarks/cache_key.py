"""Cost of the compile cache's key and manifest (docs/caching.md): a 12-layer Decoder traced with the cache off,
traced under the manifest recorder (cache on, miss), then the warm path of a new CompiledModule (primary key,
entry load, manifest validation). Usage: PYTHONPATH=$PWD python3 benchmarks/cache_key.py [--layers SSSSSSSSSSSS]"""
import argparse
import os
import tempfile
import time

import torch

import sessa_compiler as sc
from sessa_compiler import compile_cache
from sessa_compiler.api import _modes
from sessa_compiler.models import Decoder


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="S" * 12)
    p.add_argument("--D", type=int, default=64)
    a = p.parse_args()
    os.environ["SESSA_COMPILER_CACHE_DIR"] = tempfile.mkdtemp()
    torch.manual_seed(0)
    m = Decoder(1000, a.D, a.layers, n_heads=4).eval()
    x = torch.randint(0, 1000, (1, 32))
    for label, env in (("trace, cache off", "0"), ("trace under the recorder (miss)", "1")):
        os.environ["SESSA_COMPILER_COMPILE_CACHE"] = env
        t = time.perf_counter()
        c = sc.compile(m, x, backend="eager")
        print(f"{label}: {time.perf_counter() - t:.2f} s ({c.trace_cache})")
    for _ in range(3):
        t0 = time.perf_counter()
        key = compile_cache.module_key(m, (x,), None, _modes(m))
        t1 = time.perf_counter()
        entry_traced = compile_cache.load(key, m)
        t2 = time.perf_counter()
        print(f"warm: primary key {1e3 * (t1 - t0):.1f} ms, load + validate {1e3 * (t2 - t1):.1f} ms "
              f"({'hit' if entry_traced is not None else 'miss'})")
    import pickle

    with open(compile_cache._path(key), "rb") as f:
        manifest = pickle.load(f)["manifest"]
    t = time.perf_counter()
    why = compile_cache.check_manifest(manifest)
    print(f"manifest check alone: {1e3 * (time.perf_counter() - t):.2f} ms, "
          f"{ {k: len(v) for k, v in manifest.items()} }, {why or 'holds'}")
    t = time.perf_counter()
    c = sc.compile(m, x, backend="eager")
    print(f"compile from the cache (new CompiledModule): {time.perf_counter() - t:.2f} s ({c.trace_cache})")


if __name__ == "__main__":
    main()
