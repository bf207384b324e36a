"""Before/after for benchmarks/first_call.py on a loaded machine: two source trees of sessa_compiler (e.g. a
`git archive` of the base commit and this checkout), run alternately in one script so that both meet the same
load. Per run and tree: a cold process (empty compile cache) then a warm one (same cache directory), each a new
process running that tree's own ``benchmarks/first_call.py --child``; the order of the trees alternates from
run to run. Prints medians per tree, the per-run totals, and the load average (``os.getloadavg``) around each run.

    git archive <base> | tar -x -C /tmp/base
    python3 benchmarks/first_call_ab.py --base /tmp/base [--runs 5] [--layers 12]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("import", "compile", "first_call", "total")


def run(tree: str, cache: str, n_layers: int) -> dict:
    env = dict(os.environ, SESSA_COMPILER_CACHE_DIR=cache, SESSA_COMPILER_COMPILE_CACHE="1", PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, os.path.join(tree, "benchmarks", "first_call.py"), "--child",
                           str(n_layers)], env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the source tree to compare against")
    ap.add_argument("--new", default=ROOT, help="the source tree measured (default: this checkout)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    trees = {"before": os.path.abspath(args.base), "after": os.path.abspath(args.new)}
    rows = {name: {"cold": [], "warm": []} for name in trees}
    loads = []
    for i in range(args.runs):
        order = list(trees) if i % 2 == 0 else list(trees)[::-1]
        for name in order:
            with tempfile.TemporaryDirectory() as cache:
                load_before = os.getloadavg()[0]
                cold = run(trees[name], cache, args.layers)
                warm = run(trees[name], cache, args.layers)
                loads.append((load_before, os.getloadavg()[0]))
            rows[name]["cold"].append(cold)
            rows[name]["warm"].append(warm)
            print(f"run {i + 1} {name:>6}: cold {cold['total']:6.2f} s ({cold['cache']}), warm {warm['total']:5.2f} s "
                  f"({warm['cache']}); load {loads[-1][0]:.2f} -> {loads[-1][1]:.2f}", flush=True)
    print(f"\nDecoder(1000, 512, layers='S'*{args.layers}, n_heads=8), B=1, T=64, backend auto; medians of {args.runs} "
          "new processes each; seconds after `import torch`")
    print(f"{'tree':>6} | {'cold total':>10} {'(import':>8} {'compile':>8} {'call)':>7} | {'warm total':>10} "
          f"{'(import':>8} {'compile':>8} {'call)':>7} | warm totals")
    for name in trees:
        med = {k: {f: statistics.median(r[f] for r in rows[name][k]) for f in FIELDS} for k in ("cold", "warm")}
        c, w = med["cold"], med["warm"]
        print(f"{name:>6} | {c['total']:>10.2f} {c['import']:>8.2f} {c['compile']:>8.2f} {c['first_call']:>7.2f} | "
              f"{w['total']:>10.2f} {w['import']:>8.2f} {w['compile']:>8.2f} {w['first_call']:>7.2f} | "
              + " ".join(f"{r['total']:.2f}" for r in rows[name]["warm"]))
    flat = [x for pair in loads for x in pair]
    print(f"load average (1 min) {min(flat):.2f}-{max(flat):.2f} during the runs, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
