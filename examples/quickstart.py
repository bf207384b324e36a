"""Compile an example Sessa model, validate it against eager PyTorch, and show what was compiled.

    python examples/quickstart.py [--backend auto] [--T 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.models import SessaLayer


def median_ms(fn, x, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = SessaLayer(args.D, n_heads=args.heads, n_kv_heads=args.kv_heads).eval()
    x = torch.randn(args.batch, args.T, args.D)

    start = time.perf_counter()
    compiled = sc.compile(model, (x[:, :8],), backend=args.backend, validate=True)
    print(f"traced and compiled in {time.perf_counter() - start:.2f} s\n")
    print(compiled.explain())
    print("\nIR (core ops):")
    for line in str(compiled.graph).splitlines():
        if any(f"= {op}(" in line for op in ("attention", "feedback", "scan")):
            print("  " + line.strip())

    print("\nvalidation against the eager PyTorch module (validate=True raises on a mismatch):")
    with torch.no_grad():
        for T in (1, 17, args.T):
            xt = torch.randn(args.batch, T, args.D)
            err = relative_error(compiled(xt), model(xt))
            print(f"  T={T:5d}: max abs error / max abs reference = {err:.2e} (spec allows 1e-4 in float32)")

        compiled.validate = False
        eager_ms = median_ms(model, x)
        compiled_ms = median_ms(compiled, x)
    print(f"\ntiming, B={args.batch} T={args.T} D={args.D} float32 on {torch.get_num_threads()} CPU threads "
          f"(median of 5): eager module {eager_ms:.1f} ms, compiled (backend {compiled.backend}) "
          f"{compiled_ms:.1f} ms, ratio {eager_ms / compiled_ms:.2f}x")
    print("note: only the eager backend (the IR interpreter, the reference) exists so far; fast backends are planned.")


if __name__ == "__main__":
    main()
