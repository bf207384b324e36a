"""Per-token decode latency on CPU against the memory-read floor: compiled decode_step (default options: on the
tvm backend the TVM decode kernels) with fp32 and bf16 caches, the same step through torch, the public reference
layer's decode_step, and a floor, alternating in one run, medians.

    python benchmarks/decode_cpu.py [--contexts 1024 8192 32768] [--steps 24] [--reference PATH] [--decoder]
                                    [--threads N] [--backend auto|tvm|eager] [--cache-dtype D ...] [--eager-model]

The floor is one pass over the bytes a step must read, as torch.sum (same threads) over one buffer as large as
the fp32 step's position-indexed caches at that context plus the model's weights; it is timed as one more
variant in the same alternation, so it sees the same machine load and cache state. A variant's floor is its own
bytes (bf16 caches: fewer) at that read rate, and "of floor" is that floor time over the variant's median: 100%
means the step runs as fast as reading its caches and weights once. "best" and "of floor (best)" are the same
with the fastest call of each (floor included): on a machine shared with other work the medians of two-thread
code include waits for time slices on a busy core, the best calls much less so.

The cache is filled once per context with random contents (a real prefill at 32K takes minutes in eager
PyTorch); every timed step reads the whole context, as a real step does. Each variant decodes on its own copy of
the cache, rewound after each step, so every step sees the same context length. Variants alternate in blocks of
--block timed steps, each block after one untimed step, so that a variant is timed as a decode loop runs it
(steps back to back). The reference directory defaults to $SESSA_REFERENCE_DIR (the directory holding the
public reference's ``sessa`` package); without it the reference column is left out.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.models import Decoder, SessaLayer  # noqa: E402


def fill(cache: dict, t: int, gen) -> float:
    """Random contents in every position-indexed tensor (capacity t + 1, in whatever layout); -> bytes of
    them a step at context t reads."""
    nbytes = 0
    for v in cache.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 3 and (t + 1) in v.shape:
            v.copy_(torch.randn(v.shape, generator=gen).to(v.dtype) * 0.5)
            nbytes += v.numel() * v.element_size() * t / (t + 1)
    return nbytes


def set_t(cache, t):
    if isinstance(cache, list):
        for c in cache:
            set_t(c, t)
    else:
        cache["t"] = t


def accuracy(compiled, T: int, D: int, dtypes, steps: int = 8) -> list:
    """Relative error (sessa_compiler.tolerance.relative_error) of ``steps`` decode steps after a T-position prefill
    with each cache dtype against the same steps with fp32 caches, and of the fp32 steps against the compiled
    full forward over the T + steps positions."""
    from sessa_compiler.tolerance import relative_error

    g = torch.Generator().manual_seed(T)
    x = torch.randn(1, T + steps, D, generator=g)
    with torch.no_grad():
        full = compiled(x)[:, T:]
    outs = {}
    for dt in ["float32"] + [d for d in dtypes if d != "float32"]:
        cache = compiled.init_cache(1, max_len=T + steps, dtype=getattr(torch, dt))
        _, cache = compiled.prefill(x[:, :T], cache)
        outs[dt] = torch.stack([compiled.decode_step(x[:, t], cache)[0] for t in range(T, T + steps)], dim=1)
    res = [f"- accuracy at context {T} ({steps} steps after a {T}-position prefill): fp32 step vs the full forward "
           f"{relative_error(outs['float32'], full):.1e}"]
    xs = x[:, T:]   # the residual input dominates y; the layer's own update y - x shows the caches' rounding
    res += [f"- accuracy at context {T}: {dt} caches vs the fp32 step {relative_error(o, outs['float32']):.1e} "
            f"(the update y - x: {relative_error(o - xs, outs['float32'] - xs):.1e})"
            for dt, o in outs.items() if dt != "float32"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reference", default=os.environ.get("SESSA_REFERENCE_DIR"),
                    help="directory holding the public reference's sessa package (default: $SESSA_REFERENCE_DIR)")
    ap.add_argument("--decoder", action="store_true", help="also a 4-layer Decoder 'SSSS'")
    ap.add_argument("--cache-dtype", default=["float32", "bfloat16"], nargs="+",
                    choices=["float32", "bfloat16", "float16"],
                    help="dtypes of the compiled module's key/value/feedback-key caches, one variant each")
    ap.add_argument("--backend", default="auto", help="backend of the compiled module (auto: tvm on CPU)")
    ap.add_argument("--no-torch-step", action="store_true",
                    help="leave out the compiled step through torch (options={'decode_kernels': False})")
    ap.add_argument("--eager-model", action="store_true", help="also the model's own eager decode_step")
    ap.add_argument("--block", type=int, default=4,
                    help="timed steps per variant in a row (after one untimed step), then the next variant")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--accuracy-contexts", type=int, nargs="*", default=[1024, 8192],
                    help="contexts at which the lower-precision caches are compared with the fp32 step (SessaLayer)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)   # before TVM's thread pool starts
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    models = {"SessaLayer": SessaLayer(args.D, n_heads=args.heads).eval()}
    if args.decoder:
        models["Decoder SSSS"] = Decoder(1000, args.D, "SSSS", n_heads=args.heads).eval()
    ref = None
    if args.reference:
        sys.path.insert(0, args.reference)
        from sessa import SessaLayer as RefLayer

        ref = RefLayer(args.D, n_heads=args.heads).eval()
        ref.load_state_dict(models["SessaLayer"].state_dict())
    rounds = -(-args.steps // args.block)
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch threads {torch.get_num_threads()}, "
             f"TVM threads {os.environ.get('TVM_NUM_THREADS', 'default')}, B=1 fp32 D={args.D} H={args.heads}, "
             f"backend {args.backend}, medians of {rounds * args.block} steps in blocks of {args.block}, "
             f"load average at start {os.getloadavg()[0]:.2f}",
             "| model | context | variant | median ms/token | vs reference | MB read | floor ms | of floor | best ms "
             "| of floor (best) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines))
    summary = []
    for name, model in models.items():
        is_dec = name.startswith("Decoder")
        x_ex = torch.randint(0, 1000, (1, 8)) if is_dec else torch.randn(1, 8, args.D)
        compiled = sc.compile(model, (x_ex,), backend=args.backend)
        torch_step = None if args.no_torch_step or args.backend == "eager" else sc.compile(
            model, (x_ex,), backend=args.backend, options={"decode_kernels": False})
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for T in args.contexts:
            x_t = torch.randint(0, 1000, (1,)) if is_dec else torch.randn(1, args.D)
            variants, nbytes = {}, {}
            for dt in args.cache_dtype:
                k = "compiled" if dt == "float32" else f"compiled, {dt} caches"
                cc = compiled.init_cache(1, max_len=T + 1, dtype=getattr(torch, dt))
                nbytes[k] = fill(cc, T, gen) + wbytes
                cc["t"] = T
                variants[k] = (compiled.decode_step, cc)
            if torch_step is not None:
                tc = torch_step.init_cache(1, max_len=T + 1)
                nbytes["compiled, torch step"] = fill(tc, T, gen) + wbytes
                tc["t"] = T
                variants["compiled, torch step"] = (torch_step.decode_step, tc)
            if args.eager_model:
                ec = model.init_cache(1, max_len=T + 1)
                nbytes["model eager"] = sum(fill(c, T, gen) for c in (ec if isinstance(ec, list) else [ec])) + wbytes
                set_t(ec, T)
                variants["model eager"] = (model.decode_step, ec)
            if ref is not None and not is_dec:
                rc = ref.init_cache(1, max_len=T + 1)
                nbytes["reference"] = fill(rc, T, gen) + wbytes
                rc["t"] = T
                variants["reference"] = (ref.decode_step, rc)
            fp32_bytes = nbytes.get("compiled", next(iter(nbytes.values())))
            big = torch.ones(int(fp32_bytes) // 4)
            variants["floor (one read)"] = (lambda x, c, big=big: big.sum(), None)
            times = {k: [] for k in variants}
            with torch.no_grad():
                for _ in range(2):  # warm-up
                    for k, (fn, c) in variants.items():
                        fn(x_t, c)
                        set_t(c, T) if c is not None else None
                for _ in range(rounds):
                    for k, (fn, c) in variants.items():
                        fn(x_t, c)   # untimed: the previous variant's thread pool may still be busy
                        if c is not None:
                            set_t(c, T)
                        for _ in range(args.block):
                            t0 = time.perf_counter()
                            fn(x_t, c)
                            times[k].append(time.perf_counter() - t0)
                            if c is not None:
                                set_t(c, T)
            del big
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            rate = fp32_bytes / med["floor (one read)"]          # bytes per second of one torch.sum pass
            best_rate = fp32_bytes / best["floor (one read)"]
            for k, m in med.items():
                if k == "floor (one read)":
                    line = (f"| {name} | {T} | {k} | {m * 1e3:.2f} | | {fp32_bytes / 1e6:.1f} | {m * 1e3:.2f} | "
                            f"({rate / 1e9:.1f} GB/s) | {best[k] * 1e3:.2f} | ({best_rate / 1e9:.1f} GB/s) |")
                else:
                    fl = nbytes[k] / rate
                    vs = f"{med['reference'] / m:.2f}x" if "reference" in med else ""
                    line = (f"| {name} | {T} | {k} | {m * 1e3:.2f} | {vs} | {nbytes[k] / 1e6:.1f} | {fl * 1e3:.2f} | "
                            f"{fl / m:.0%} | {best[k] * 1e3:.2f} | {nbytes[k] / best_rate / best[k]:.0%} |")
                    if k == "compiled":
                        summary.append(f"- {name} at {T}: compiled {m * 1e3:.2f} ms = {fl / m:.0%} of the read floor "
                                       f"({fl * 1e3:.2f} ms), {m / fl:.2f}x the floor"
                                       + (f", {vs} vs the reference's decode_step" if vs else ""))
                lines.append(line)
                print(line)
            sys.stdout.flush()
    if args.accuracy_contexts and len(args.cache_dtype) > 1:
        compiled = sc.compile(models["SessaLayer"], (torch.randn(1, 8, args.D),), backend=args.backend)
        for T in args.accuracy_contexts:
            summary += accuracy(compiled, T, args.D, args.cache_dtype)
    lines.append(f"# load average at end {os.getloadavg()[0]:.2f}")
    lines += summary
    print("\n".join(lines[-len(summary) - 1:]))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
