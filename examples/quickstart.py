"""Compile an example Sessa model, validate it against eager PyTorch, and show what was compiled.

    python examples/quickstart.py [--backends eager,tvm] [--T 512]

On a CPU machine this compiles with the eager backend (the IR interpreter, the reference) and the TVM
backend (generated CPU kernels); with a CUDA device it also compiles with the Triton backend.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.models import SessaLayer
from sessa_compiler.timing import MAX_SPREAD, ratio, time_alternating


def default_backends(device) -> list:
    names = ["eager"]
    if device.type == "cpu" and importlib.util.find_spec("tvm") is not None:
        names.append("tvm")
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=None, help="comma-separated; default: what this machine can run")
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per variant, the variants in turns")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = SessaLayer(args.D, n_heads=args.heads, n_kv_heads=args.kv_heads).to(device).eval()
    x = torch.randn(args.batch, args.T, args.D, device=device)
    backends = args.backends.split(",") if args.backends else default_backends(device)

    compiled_by_backend = {}
    with torch.no_grad():
        for name in backends:
            start = time.perf_counter()
            print(f"=== backend {name}: tracing and building (seconds on a first run) ...", flush=True)
            compiled = sc.compile(model, (x[:, :8],), backend=name, validate=True)
            compiled(x[:, :8])  # builds kernels on first use
            print(f"=== backend {name}: traced and built in {time.perf_counter() - start:.1f} s")
            print(compiled.explain())
            print("validation against the eager PyTorch module (validate=True raises on a mismatch):")
            for T in (1, 17, args.T):
                xt = torch.randn(args.batch, T, args.D, device=device)
                err = relative_error(compiled(xt), model(xt))
                print(f"  T={T:5d}: max abs error / max abs reference = {err:.2e} (spec allows 1e-4 in float32)")
            compiled.validate = False
            compiled_by_backend[name] = compiled
            print()
        variants = {"eager PyTorch module": model, **{f"compiled, {n}": c for n, c in compiled_by_backend.items()}}
        timings = time_alternating(variants, x, repeats=args.repeats)

    print("IR core ops:")
    for line in str(compiled.graph).splitlines():
        if any(f"= {op}(" in line for op in ("attention", "feedback", "scan")):
            print("  " + line.strip())
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntiming, SessaLayer D={args.D} H={args.heads} Hkv={args.kv_heads}, B={args.batch} T={args.T} float32, "
          f"{where}, {time.strftime('%Y-%m-%d')}: median and quartiles of {args.repeats} calls each, the variants "
          "in turns")
    base = timings["eager PyTorch module"]
    for name, t in timings.items():
        line = f"  {name:22s} {t}"
        if t is not base:
            r = ratio(base, t)
            line += (f"  {r:.2f}x the eager module" if r is not None else
                     f"  no ratio: spread {max(base.spread, t.spread):.0%} > {MAX_SPREAD:.0%} (a busy machine?)")
        print(line)


if __name__ == "__main__":
    main()
