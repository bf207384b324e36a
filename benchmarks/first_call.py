"""Cost of compile plus the first call of Decoder(1000, 512, layers="S" * N, n_heads=8) at B=1, T=64 with the default
backend on CPU (auto -> TVM), each in a new process: cold (an empty compile cache: trace, recognise, TVM build) and
warm (a second process with the same SESSA_COMPILER_CACHE_DIR: the traced graph and the built library come from the
cache). Cold and warm alternate, sizes interleave; medians. Times start after ``import torch`` (the import of
sessa_compiler is in them, and shown apart). The growth columns show how the cost scales with the number of
identical layers (identical layers are traced, recognised and built once, so it grows sublinearly).

    python3 benchmarks/first_call.py [--runs 3] [--layers 1 4 12 24] [--backend auto]
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


def child(n_layers: int, backend: str) -> None:
    import torch

    start = time.perf_counter()
    sys.path.insert(0, ROOT)
    import sessa_compiler as sc
    from sessa_compiler.models import Decoder

    imported = time.perf_counter()
    torch.manual_seed(0)
    m = Decoder(1000, 512, layers="S" * n_layers, n_heads=8).eval()
    x = torch.randint(0, 1000, (1, 64))
    t0 = time.perf_counter()
    c = sc.compile(m, (x,), backend=backend)
    t1 = time.perf_counter()
    with torch.no_grad():
        c(x)
    t2 = time.perf_counter()
    with torch.no_grad():
        c(x)
    t3 = time.perf_counter()
    print(json.dumps({"import": imported - start, "compile": t1 - t0, "first_call": t2 - t1,
                      "total": (imported - start) + (t2 - t0), "next_call_ms": 1e3 * (t3 - t2),
                      "cache": c.trace_cache, "backend": c.backend}))


def run(cache: str, n_layers: int, backend: str) -> dict:
    env = dict(os.environ, SESSA_COMPILER_CACHE_DIR=cache, SESSA_COMPILER_COMPILE_CACHE="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n_layers), "--backend", backend],
                          env=env, check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.stderr.strip():
        print(f"N={n_layers} ({result['cache']}): stderr: {proc.stderr.strip()[-400:]}", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4, 12, 24])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.backend)
    rows = {n: {"cold": [], "warm": []} for n in args.layers}
    loads = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for n in args.layers:
            with tempfile.TemporaryDirectory() as cache:
                rows[n]["cold"].append(run(cache, n, args.backend))
                rows[n]["warm"].append(run(cache, n, args.backend))
            loads.append(os.getloadavg()[0])
    med = {n: {k: {f: statistics.median(r[f] for r in rs) for f in ("import", "compile", "first_call", "total")}
               for k, rs in kinds.items()} for n, kinds in rows.items()}
    first = args.layers[0]
    backend = rows[first]["cold"][0]["backend"]
    print(f"Decoder(1000, 512, layers='S'*N, n_heads=8), B=1, T=64, backend {args.backend} -> {backend}; "
          f"median of {args.runs} new process(es) each; seconds after `import torch`")
    print(f"{'N':>3} | {'cold total':>10} {'(import':>8} {'compile':>8} {'call)':>7} | {'warm total':>10} {'(import':>8} "
          f"{'compile':>8} {'call)':>7} | cold / cold(N={first}) | warm / warm(N={first})")
    for n in args.layers:
        c, w = med[n]["cold"], med[n]["warm"]
        caches = {r["cache"] for k in ("cold", "warm") for r in rows[n][k]}
        print(f"{n:>3} | {c['total']:>10.2f} {c['import']:>8.2f} {c['compile']:>8.2f} {c['first_call']:>7.2f} | "
              f"{w['total']:>10.2f} {w['import']:>8.2f} {w['compile']:>8.2f} {w['first_call']:>7.2f} | "
              f"{c['total'] / med[first]['cold']['total']:>8.2f}x for {n / first:g}x layers | "
              f"{w['total'] / med[first]['warm']['total']:>8.2f}x" + ("" if caches == {"miss", "hit"} else f"  {caches}"))
    if len(args.layers) > 1:
        lo, hi = args.layers[0], args.layers[-1]
        for kind in ("cold", "warm"):
            slope = (med[hi][kind]["total"] - med[lo][kind]["total"]) / (hi - lo)
            print(f"{kind}: {slope:.3f} s per added layer between N={lo} and N={hi}; "
                  f"N={lo} costs {med[lo][kind]['total']:.2f} s")
    print(f"load average {min(loads):.2f}-{max(loads):.2f} during the run, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
