"""The fixed costs of one compiled decode step on CPU (tvm backend, TVM decode kernels): per step, how many Python
function calls, torch operator calls (and of those, allocations), TVM kernel calls the step makes, how cProfile
splits the step's time between the TVM kernels, torch's operators and Python, and the step's latency, each with
the step's glue as before (``serving.DECODE_FAST = False``) and now (True), alternating in one process.

    python benchmarks/decode_overhead.py [--contexts 16 1024 8192] [--steps 400] [--block 20] [--out FILE]

The counts do not depend on the machine's load; the times do (the load average is printed with them). Times are
medians and minima over --steps steps per variant, in blocks of --block steps alternating between the variants
(each block after one untimed step), beside a floor: one torch.sum over as many bytes as the step's caches and
weights (both threads), timed in the same alternation. The cache is filled with random contents.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sessa_compiler as sc  # noqa: E402
from sessa_compiler import serving  # noqa: E402
from sessa_compiler.backends.tvm import decode as tvm_decode  # noqa: E402
from sessa_compiler.models import SessaLayer  # noqa: E402


class TorchOps(TorchDispatchMode):
    """Counts the aten operators a block of code runs (views included) and, of those, the ones giving new
    storage (allocations: every op that is neither a view nor in place)."""

    def __init__(self):
        super().__init__()
        self.ops = self.allocs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.__name__.split(".")[0]
        if name not in VIEWS and not name.endswith("_"):
            self.allocs += 1
        return func(*args, **(kwargs or {}))


# aten ops that return a view (no new storage)
VIEWS = {"view", "reshape", "_reshape_alias", "select", "slice", "squeeze", "unsqueeze", "split_with_sizes",
         "split", "detach", "alias", "as_strided", "transpose", "permute", "expand", "narrow", "t", "unbind",
         "view_as_real", "view_as_complex", "_unsafe_view"}


class KernelTimer:
    """Wraps each TVM decode function so that cProfile books its time under ``tvm_kernel`` and calls are counted."""

    def __init__(self):
        self.calls = 0
        orig = tvm_decode.DecodeKernels._build
        timer = self

        def build(kernels, key, make):
            fn = orig(kernels, key, make)

            def tvm_kernel(*args):
                timer.calls += 1
                return fn(*args)
            return tvm_kernel
        tvm_decode.DecodeKernels._build = build


def counts(step, reps: int = 20) -> dict:
    """Per-step counts and the cProfile split of ``step`` (already warm)."""
    calls = [0, 0]

    def prof(frame, event, arg):
        if event == "call":
            calls[0] += 1
        elif event == "c_call":
            calls[1] += 1
    sys.setprofile(prof)
    step()
    sys.setprofile(None)
    mode = TorchOps()
    with mode:
        step()
    kt = TIMER.calls
    kernels = next(iter(STATE["compiled"]._serving.programs.values())).decode_kernels
    par = kernels.parallel_calls
    step()
    tvm_calls = TIMER.calls - kt
    par = kernels.parallel_calls - par
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        step()
    pr.disable()
    st = pstats.Stats(pr).stats
    total = kernel = torch_t = 0.0
    for (file, _, name), (_, _, tt, ct, _) in st.items():
        total += tt
        if name == "tvm_kernel":
            kernel += tt
        elif file == "~" and "torch" in name:
            torch_t += tt
    return {"py_calls": calls[0], "c_calls": calls[1], "torch_ops": mode.ops, "allocs": mode.allocs,
            "tvm_calls": tvm_calls, "parallel": par, "prof_ms": total / reps * 1e3, "kernel_ms": kernel / reps * 1e3,
            "torch_ms": torch_t / reps * 1e3, "glue_ms": (total - kernel - torch_t) / reps * 1e3}


TIMER = None
STATE = {}


def main():
    global TIMER
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[16, 1024, 8192])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--no-counts", action="store_true", help="times only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if not args.no_counts:
        TIMER = KernelTimer()
    model = SessaLayer(args.D, n_heads=args.heads).eval()
    compiled = STATE["compiled"] = sc.compile(model, (torch.randn(1, 8, args.D),))
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, SessaLayer({args.D}, n_heads={args.heads}), "
             f"B=1 fp32, tvm backend, torch threads {torch.get_num_threads()}, load average at start "
             f"{os.getloadavg()[0]:.2f}"]
    count_rows, time_rows = [], []
    for T in args.contexts:
        cache = compiled.init_cache(1, max_len=T + 1)
        nbytes = wbytes
        for v in cache.values():
            if isinstance(v, torch.Tensor) and v.dim() >= 3 and (T + 1) in v.shape:
                v.copy_(torch.randn(v.shape, generator=gen) * 0.5)
                nbytes += v.numel() * v.element_size() * T / (T + 1)
        cache["t"] = T
        x = torch.randn(1, args.D, generator=gen)
        big = torch.ones(int(nbytes) // 4)

        def step(fast, cache=cache, x=x, T=T):
            serving.DECODE_FAST = fast
            compiled.decode_step(x, cache)
            cache["t"] = T

        variants = {"before (DECODE_FAST=False)": lambda: step(False), "now (DECODE_FAST=True)": lambda: step(True),
                    "floor (one read)": lambda: big.sum()}
        with torch.no_grad():
            outs = {}
            for k, fn in list(variants.items())[:2]:
                fn()
                serving.DECODE_FAST = k.startswith("now")
                outs[k] = compiled.decode_step(x, cache)[0]
                cache["t"] = T
            a, b = outs.values()
            assert torch.equal(a, b), "the two paths differ"
            if not args.no_counts:
                for k, fn in list(variants.items())[:2]:
                    c = counts(fn)
                    count_rows.append(f"| {T} | {k} | {c['py_calls']} | {c['c_calls']} | {c['torch_ops']} | "
                                      f"{c['allocs']} | {c['tvm_calls']} | {c['parallel']} | {c['prof_ms']:.3f} | "
                                      f"{c['kernel_ms']:.3f} | "
                                      f"{c['torch_ms']:.3f} | {c['glue_ms']:.3f} |")
                    print(count_rows[-1], flush=True)
            times = {k: [] for k in variants}
            for _ in range(-(-args.steps // args.block)):
                for k, fn in variants.items():
                    fn()
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
        floor = statistics.median(times["floor (one read)"])
        floor_best = min(times["floor (one read)"])
        for k, v in times.items():
            m, b = statistics.median(v), min(v)
            time_rows.append(f"| {T} | {k} | {m * 1e3:.3f} | {m / floor:.2f}x | {b * 1e3:.3f} | "
                             f"{b / floor_best:.2f}x |")
            print(time_rows[-1], flush=True)
        del big
    serving.DECODE_FAST = True
    lines.append(f"# load average at end {os.getloadavg()[0]:.2f}")
    if count_rows:
        lines += ["", "Per step (load-independent counts; the profile's times are cProfile's, inflated by it):", "",
                  "| context | glue | Python calls | C calls | torch ops | allocations | TVM calls | of those parallel "
                  "| profiled ms | in TVM kernels | in torch ops | Python glue |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += count_rows
    lines += ["", "Latency (loaded machine; medians and minima over alternating blocks):", "",
              "| context | variant | median ms | vs floor median | best ms | vs floor best |",
              "|---:|---|---:|---:|---:|---:|"] + time_rows
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
