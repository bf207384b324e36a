"""Cost of compile plus the first call with the default backend on CPU (auto -> TVM), in new processes:
cold (an empty compile cache: trace, recognise, TVM build) and warm (a second process with the same
SESSA_COMPILER_CACHE_DIR: the traced graph and the built library come from the cache). Medians.

    python3 benchmarks/first_call.py [--runs 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child() -> None:
    start = time.perf_counter()
    import torch

    sys.path.insert(0, ROOT)
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer

    imported = time.perf_counter()
    m = SessaLayer(512, n_heads=8).eval()
    x = torch.randn(1, 64, 512)
    t0 = time.perf_counter()
    c = sc.compile(m, (x,))
    with torch.no_grad():
        c(x)
    t1 = time.perf_counter()
    with torch.no_grad():
        c(x)
    t2 = time.perf_counter()
    print(json.dumps({"import": imported - start, "compile_and_first_call": t1 - t0, "next_call_ms": 1e3 * (t2 - t1),
                      "cache": c.trace_cache, "backend": c.backend}))


def run(cache: str) -> dict:
    env = dict(os.environ, SESSA_COMPILER_CACHE_DIR=cache, SESSA_COMPILER_COMPILE_CACHE="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child()
    cold, warm = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(run(cache))
            warm.append(run(cache))
    for name, rows in (("cold", cold), ("warm", warm)):
        med = statistics.median(r["compile_and_first_call"] for r in rows)
        imp = statistics.median(r["import"] for r in rows)
        nxt = statistics.median(r["next_call_ms"] for r in rows)
        print(f"SessaLayer(512, n_heads=8), T=64, backend {rows[0]['backend']}, {name} cache "
              f"({', '.join(sorted({r['cache'] for r in rows}))}): compile + first call {med:.2f} s "
              f"(median of {len(rows)} new processes; import torch + sessa_compiler {imp:.2f} s before it), "
              f"next call {nxt:.1f} ms")
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
