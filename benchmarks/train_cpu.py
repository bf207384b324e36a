"""Training step (forward + backward) of a Sessa layer on this CPU: time and peak memory per step.

    SESSA_REFERENCE_DIR=/work/sessa_ref python benchmarks/train_cpu.py [--T 1024 4096] [--reps 5] [--D 512]
        [--heads 8] [--threads 2] [--out benchmarks/results/train_cpu.md]

Variants (same weights, copied with load_state_dict(strict=True); loss = mean of squares of the output):
  ref eager        the public reference SessaLayer (SESSA_REFERENCE_DIR), plain torch autograd
  ref compile      torch.compile of the public reference (inductor, default mode)
  own eager        sessa_compiler.models.SessaLayer, plain torch autograd (the uncompiled module)
  sc tvm           sessa_compiler.compile(own layer, backend="tvm"): forward = TVM kernels of the core ops,
                   backward = the TVM attention and feedback backward kernels (backends/tvm/training.py);
                   ordinary ops on torch
  sc tvm 2pass     sc tvm with the attention backward's two-pass kernel (dK/dV pass, then a dQ pass that
                   recomputes S and dP) instead of the one-pass fused_dq variant: the before/after of that
                   change in one run (not in the default list)
Timing: one process, medians over reps of alternating steps (each rep runs every variant once, in turn).
Peak memory: each variant's step once more in a fresh subprocess (Linux): the resident peak (VmHWM, reset
through /proc/self/clear_refs just before the step) minus the resident size before it: what the step added.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("ref eager", "ref compile", "own eager", "sc tvm")


def make(name: str, D: int, heads: int, seed: int = 0):
    """(step function x -> loss after backward) for one variant; weights from seed."""
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(seed)
    own = SessaLayer(D, n_heads=heads).train()
    if name.startswith("ref"):
        sys.path.insert(0, os.environ.get("SESSA_REFERENCE_DIR", "/work/sessa_ref"))
        from sessa import SessaLayer as RefLayer

        ref = RefLayer(D, n_heads=heads).train()
        ref.load_state_dict(own.state_dict(), strict=True)
        fn = torch.compile(ref) if name == "ref compile" else ref
        params = list(ref.parameters())
    elif name == "own eager":
        fn, params = own, list(own.parameters())
    else:
        fn, params = sc.compile(own, backend="tvm"), list(own.parameters())

    def step(x):
        for p in params:
            p.grad = None
        loss = fn(x).pow(2).mean()
        loss.backward()
        return loss.item()
    if name != "sc tvm 2pass":
        return step
    from sessa_compiler.backends.tvm import training as tvm_training

    def two_pass_step(x):
        real = tvm_training.fused_dq_pays
        tvm_training.fused_dq_pays = lambda *a, **k: False
        try:
            return step(x)
        finally:
            tvm_training.fused_dq_pays = real
    return two_pass_step


def peak_growth(name: str, D: int, heads: int, T: int, threads: int) -> float:
    """MiB the step adds to the resident peak, measured in a fresh process after one warm-up step at T=64
    (Linux: /proc/self/status and clear_refs)."""
    code = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
torch.set_num_threads({threads})
from benchmarks.train_cpu import make
step = make({name!r}, {D}, {heads})
step(torch.randn(1, 64, {D}))
x = torch.randn(1, {T}, {D})
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")   # resets the peak (VmHWM) to the current resident size
before = status("VmRSS:")
step(x)
print((status("VmHWM:") - before) / 1024)
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if got.returncode:
        return float("nan")
    return float(got.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.memory_only:
        for T in args.T:
            for v in args.variants:
                rows.append({"T": T, "variant": v, "ms": float("nan"),
                             "peak_MiB": peak_growth(v, args.D, args.heads, T, args.threads), "loss": None})
                print(json.dumps(rows[-1]), flush=True)
    steps = {} if args.memory_only else {v: make(v, args.D, args.heads) for v in args.variants}
    for T in ([] if args.memory_only else args.T):
        x = torch.randn(1, T, args.D)
        losses = {v: s(x) for v, s in steps.items()}   # warm-up (and compile)
        times = {v: [] for v in steps}
        for _ in range(args.reps):
            for v, s in steps.items():
                t0 = time.perf_counter()
                s(x)
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        mem = {v: (float("nan") if args.no_memory else peak_growth(v, args.D, args.heads, T, args.threads))
               for v in steps}
        for v in steps:
            rows.append({"T": T, "variant": v, "ms": med[v], "peak_MiB": mem[v], "loss": losses[v]})
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    head = (f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n\n"
            f"`python benchmarks/train_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"(SessaLayer({args.D}, n_heads={args.heads}), B=1, fp32, loss = mean of squares"
            f"{'' if args.memory_only else f', median of {args.reps} alternating steps'}; peak = resident-peak growth "
            "of one step in a fresh process)\n\n"
            "| T | variant | fwd+bwd ms | peak growth MiB |\n|---|---|---|---|\n")
    table = "".join(f"| {r['T']} | {r['variant']} | {r['ms']:.0f} | {r['peak_MiB']:.0f} |\n" for r in rows)
    print(head + table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(head + table)


if __name__ == "__main__":
    main()
