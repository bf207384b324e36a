"""Long-context scaling on CPU: forward time and peak memory of SessaLayer(512, n_heads=8), B=1, fp32, from T=1K to
64K: this compiler (``sc.compile``, the tvm backend on CPU) against the public reference layer's eager forward and
its ``torch.compile``, same weights.

    python benchmarks/scaling_cpu.py [--quick] [--lengths 1024 2048 ...] [--budget-s 60] [--out PATH]

The reference is loaded from ``$SESSA_REFERENCE_DIR`` (or --reference), the directory holding its ``sessa`` package;
without it only our column runs. Peak memory is the process's resident high-water mark during the call above its
resident size just before the first call at that length (Linux: ``/proc/self/clear_refs`` resets the mark), so it
counts every allocation the forward makes (activations, T x T score matrices, workspaces, pools that keep their
buffers), not the weights or the input. Every variant is built and compiled on a 64-position input first. A variant is not run at
a length where its time (extrapolated as T^2 from its previous length) or memory (a power law through its two
previous lengths, exponent clamped to [1, 2]) would exceed --budget-s or 80% of the memory available then: the
table says which and the prediction. Timing: one warm-up call per length, then the median of --reps calls (a
warm-up past 5 s is the measurement; one call past 10 s ends the reps). torch.compile compiles with dynamic shapes
on a 64-position input before any measurement. --quick: lengths 1K, 4K, 16K, 32K and a 25 s budget (about 5 minutes in all).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.models import SessaLayer  # noqa: E402
from sessa_compiler.tolerance import relative_error  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, x, reps: int):
    """(median seconds, peak bytes above the resident size before the first call at this length)."""
    with torch.no_grad():
        gc.collect()
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                       # reset the high-water mark to the current resident size
        t0 = time.perf_counter()
        fn(x)   # warm-up, counted for memory: memory pools that keep their buffers grow here
        first = time.perf_counter() - t0
        times = [first] if first > 5 else []   # a long call: its first run is the measurement
        for _ in range(reps if not times else 0):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
            if times[-1] > 10:
                break
        peak = _status("VmHWM") - base
    return statistics.median(times), max(peak, 0)


def predict(points: list, T: int):
    """Time and memory at T from the last (T, seconds, bytes) points: time as T^2 (every variant's forward is
    quadratic in T), memory as a power law through the last two points with its exponent clamped to [1, 2]."""
    if not points:
        return 0.0, 0.0
    if len(points) == 1:
        T1, s1, m1 = points[-1]
        return s1 * (T / T1) ** 2, m1 * (T / T1) ** 2
    (T0, s0, m0), (T1, s1, m1) = points[-2], points[-1]

    p = math.log(max(m1, 1) / max(m0, 1)) / math.log(T1 / T0)
    return s1 * (T / T1) ** 2, max(m1, 1) * (T / T1) ** min(max(p, 1.0), 2.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="skip a call predicted to take longer (default 120)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reference", default=os.environ.get("SESSA_REFERENCE_DIR"))
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lengths = args.lengths or ([1024, 4096, 16384, 32768] if args.quick
                               else [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    budget = args.budget_s or (25.0 if args.quick else 120.0)
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   "scaling_cpu_quick.md" if args.quick else "scaling_cpu.md")
    D, H = 512, 8
    torch.manual_seed(0)
    ours_model = SessaLayer(D, n_heads=H).eval()
    variants = {"ours (sc.compile)": sc.compile(ours_model, (torch.randn(1, 16, D),))}
    if args.reference:
        sys.path.insert(0, args.reference)
        from sessa import SessaLayer as RefLayer

        ref = RefLayer(D, n_heads=H).eval()
        ref.load_state_dict(ours_model.state_dict(), strict=True)
        variants["reference eager"] = ref
        if not args.no_torch_compile:
            variants["reference torch.compile"] = torch.compile(ref, dynamic=True)
    with torch.no_grad():   # builds and compiles (torch.compile: dynamic shapes, so once) before any measurement
        for f in variants.values():
            f(torch.randn(1, 64, D))
    started = time.time()
    lines = ["# Long-context scaling on CPU: SessaLayer(512, n_heads=8) forward, B=1, fp32", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- command: `python benchmarks/scaling_cpu.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
             f"{mem_available() / 2**30:.1f} GiB available at start, load average {os.getloadavg()[0]:.2f} at start",
             f"- per call: warm-up, then median of {args.reps} (one call past 10 s); skipped where predicted over "
             f"{budget:.0f} s or 80% of available memory",
             ""]
    if "reference eager" in variants:   # the same function: check once at a short length
        x = torch.randn(1, 256, D)
        with torch.no_grad():
            errs = {k: relative_error(f(x), variants["reference eager"](x)) for k, f in variants.items()}
        lines.append("- relative error vs reference eager at T=256: "
                     + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
        lines.append("")
    header = "| T | " + " | ".join(f"{k} ms | {k} peak MB" for k in variants) + " |"
    if "reference eager" in variants:
        header += " ours vs reference |"
    if "reference torch.compile" in variants:
        header += " ours vs torch.compile |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    print("\n".join(lines))
    points = {k: [] for k in variants}
    notes = []
    for T in lengths:
        x = torch.randn(1, T, D)
        row, res = [str(T)], {}
        for k, fn in variants.items():
            s_pred, m_pred = predict(points[k], T)
            avail = mem_available()
            if points[k] and m_pred > 0.8 * avail:
                row += ["OOM*", f"~{m_pred / 1e6:.0f}*"]
                notes.append(f"{k} at T={T}: not run, predicted peak {m_pred / 2**30:.1f} GiB > 80% of "
                             f"{avail / 2**30:.1f} GiB available")
                continue
            if points[k] and s_pred > budget:
                row += [f"~{s_pred * 1e3:.0f}*", "*"]
                notes.append(f"{k} at T={T}: not run, predicted {s_pred:.0f} s > budget {budget:.0f} s")
                continue
            try:
                s, m = measure(fn, x, args.reps)
            except (RuntimeError, MemoryError) as e:   # an allocation the machine cannot serve
                row += ["failed", ""]
                notes.append(f"{k} at T={T}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                points[k].append((T, float("inf"), float("inf")))
                continue
            points[k].append((T, s, m))
            res[k] = s
            row += [f"{s * 1e3:.1f}", f"{m / 1e6:.0f}"]
        ours = res.get("ours (sc.compile)")
        for other in ("reference eager", "reference torch.compile"):
            if other in variants:
                row.append(f"{res[other] / ours:.2f}x" if ours and other in res else "")
        line = "| " + " | ".join(row) + " |"
        lines.append(line)
        print(line, flush=True)
        del x
        gc.collect()
    lines += [""] + [f"- {n}" for n in notes]
    lines.append(f"- `*`: not run (see the notes); total wall time {time.time() - started:.0f} s, load average "
                 f"{os.getloadavg()[0]:.2f} at end")
    print("\n".join(lines[-len(notes) - 1:]))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
