"""Per-token decode latency on CPU: compiled decode_step vs the model's eager decode_step (and the public
reference layer's, when it is importable), alternating in one run, medians.

    python benchmarks/decode_cpu.py [--contexts 1024 8192] [--steps 24] [--reference PATH] [--decoder]
                                    [--threads N] [--backend auto|tvm|eager] [--torch-step] [--cache-dtype D]

The cache is filled once per context by writing random rotated keys/values, feedback keys and solved
states directly (a real prefill at 8K takes minutes in eager PyTorch); every timed step then reads the
whole cache, as a real step does. Each variant decodes on its own copy of the cache, and the copies are
rewound after each step, so every step sees the same context length. Variants alternate in blocks of --block
timed steps, each block after one untimed step, so that a variant is timed as a decode loop runs it (steps back
to back) and not while the previous variant's thread pool is still busy (torch's OpenMP workers spin after a
parallel region). A pause between steps (--pause-ms) measures steps that wake idle cores instead: on this VM
that costs several milliseconds per step. Also prints the achieved memory bandwidth: bytes of
cache read per step / median time, and as a fraction of a 256 MB read with the same threads.
"""
import argparse
import os
import statistics
import sys
import time

import torch

import sessa_compiler as sc
from sessa_compiler.models import Decoder, SessaLayer


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reference", default=None,
                    help="directory holding the public reference's sessa module (sessa.py or the sessa package)")
    ap.add_argument("--decoder", action="store_true", help="also a 4-layer Decoder 'SSSS'")
    ap.add_argument("--cache-dtype", default=["float32"], nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="dtypes of the compiled module's key/value/feedback-key caches, one compiled variant each "
                         "(the eager ones stay fp32)")
    ap.add_argument("--backend", default="auto", help="backend of the compiled module (auto: tvm on CPU)")
    ap.add_argument("--decode-kernels", action="store_true",
                    help="compile with options={'decode_kernels': True}: the TVM split-K cache reads and matrix-vector "
                         "linears in decode steps (off by default)")
    ap.add_argument("--torch-step", action="store_true",
                    help="also the compiled step with backend='eager' (every op through torch)")
    ap.add_argument("--block", type=int, default=4,
                    help="timed steps per variant in a row (after one untimed step), then the next variant")
    ap.add_argument("--pause-ms", type=float, default=0.0, help="idle time before each variant's block")
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
    big = torch.ones(64 * 2**20)   # 256 MB: what one read of memory costs with these threads (sum)
    big.sum()
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        reads.append(time.perf_counter() - t0)
    read_gbs = big.numel() * 4 / statistics.median(reads) / 1e9
    del big
    print(f"# memory read rate (torch.sum over 256 MB, same threads): {read_gbs:.1f} GB/s")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch threads {torch.get_num_threads()}, "
          f"TVM threads {os.environ.get('TVM_NUM_THREADS', 'default')}, B=1 fp32 D={args.D} H={args.heads}, compiled "
          f"backend {args.backend}, compiled caches {' and '.join(args.cache_dtype)}, "
          f"medians of {-(-args.steps // args.block) * args.block} steps in blocks of {args.block}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| model | context | variant | median ms/token | speed-up vs eager | cache GB/s (fraction of read rate) |")
    print("|---|---:|---|---:|---:|---:|")
    for name, model in models.items():
        is_dec = name.startswith("Decoder")
        x_ex = torch.randint(0, 1000, (1, 8)) if is_dec else torch.randn(1, 8, args.D)
        compiled = sc.compile(model, (x_ex,), backend=args.backend,
                              options={"decode_kernels": True} if args.decode_kernels else None)
        torch_step = sc.compile(model, (x_ex,), backend="eager") if args.torch_step else None
        for T in args.contexts:
            x_t = torch.randint(0, 1000, (1,)) if is_dec else torch.randn(1, args.D)
            variants = {}
            nbytes = {}
            for dt in args.cache_dtype:
                k = "compiled" if dt == "float32" else f"compiled, {dt} caches"
                cc = compiled.init_cache(1, max_len=T + 1, dtype=getattr(torch, dt))
                nbytes[k] = fill(cc, T, gen)
                cc["t"] = T
                variants[k] = (compiled.decode_step, cc)
            if torch_step is not None:
                tc = torch_step.init_cache(1, max_len=T + 1)
                nbytes["compiled, torch step"] = fill(tc, T, gen)
                tc["t"] = T
                variants["compiled, torch step"] = (torch_step.decode_step, tc)
            ec = model.init_cache(1, max_len=T + 1)
            nbytes["model eager"] = sum(fill(c, T, gen) for c in (ec if isinstance(ec, list) else [ec]))
            set_t(ec, T)
            variants["model eager"] = (model.decode_step, ec)
            if ref is not None and not is_dec:
                rc = ref.init_cache(1, max_len=T + 1)
                nbytes["reference eager"] = fill(rc, T, gen)
                rc["t"] = T
                variants["reference eager"] = (ref.decode_step, rc)
            times = {k: [] for k in variants}
            with torch.no_grad():
                for _ in range(2):  # warm-up
                    for k, (fn, c) in variants.items():
                        fn(x_t, c)
                        set_t(c, T)
                for _ in range(-(-args.steps // args.block)):
                    for k, (fn, c) in variants.items():
                        # one untimed step first: the previous variant's thread pool may still be busy (torch's
                        # OpenMP workers spin for a while after each parallel region), and a real decode loop
                        # runs its own steps back to back
                        time.sleep(args.pause_ms / 1e3)
                        fn(x_t, c)
                        set_t(c, T)
                        for _ in range(args.block):
                            t0 = time.perf_counter()
                            fn(x_t, c)
                            times[k].append(time.perf_counter() - t0)
                            set_t(c, T)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, m in med.items():
                print(f"| {name} | {T} | {k} | {m * 1e3:.2f} | {med['model eager'] / m:.2f}x"
                      + (f" ({med['reference eager'] / m:.2f}x vs reference)"
                         if k.startswith("compiled") and "reference eager" in med else "")
                      + f" | {nbytes[k] / m / 1e9:.1f} ({nbytes[k] / m / 1e9 / read_gbs:.0%}) |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
