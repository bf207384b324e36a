"""The TVM decode kernels against the torch ops they replace, one at a time on the same tensors (CPU, float32):
the SessaLayer(512, n_heads=8) input projection as a matrix-vector product, the attention over an 8-head cache
and the feedback over a width-512 cache at one context length (fp32 caches, and bf16 ones: the TVM kernels widen
them in registers, torch needs a float32 copy first). Blocks of 10 timed calls per variant, rotating;
prints the median and the best call, and each op against its own floor: one torch.sum pass (same threads) over a
buffer as large as the bytes the op must read (weights; keys and values; feedback keys and states), timed in the
same rotation.

    python benchmarks/decode_kernels_cpu.py [--context 8192] [--threads N]
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from sessa_compiler.backends.tvm.decode import DecodeKernels

    dk = DecodeKernels()
    T = args.context
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 1, 512, generator=g), torch.randn(1024, 512, generator=g), torch.randn(1024, generator=g)
    q, inv = torch.randn(1, 8, 64, generator=g), torch.rand(32, generator=g)
    K, V = torch.randn(1, 8, T + 1, 64, generator=g), torch.randn(1, 8, T + 1, 64, generator=g)
    KB, S = torch.randn(1, T + 1, 512, generator=g), torch.randn(1, T + 1, 512, generator=g)
    f, gamma = torch.randn(1, 512, generator=g), torch.rand(1, generator=g)
    Kh, Vh, KBh = K.bfloat16(), V.bfloat16(), KB.bfloat16()

    def torch_attention():
        logits = q.reshape(1, 8, 1, 64) @ K[:, :, :T + 1].transpose(-1, -2) * 0.125
        return torch.softmax(logits, -1) @ V[:, :, :T + 1]

    def torch_feedback():
        return torch.softmax((f[:, None] @ KB[:, :T].transpose(1, 2)) * 0.04, -1) @ S[:, :T]

    variants = {
        "linear 512->1024, TVM": lambda: dk.linear(F.linear, x, w, b),
        "linear 512->1024, torch": lambda: F.linear(x, w, b),
        f"attention over {T}, TVM": lambda: dk.attention(q, q, q, inv, K, V, T, 0.125, True),
        f"attention over {T}, torch": torch_attention,
        f"attention over {T}, TVM, bf16 cache": lambda: dk.attention(q, q, q, inv, Kh, Vh, T, 0.125, True),
        f"attention over {T}, torch, bf16 cache": lambda: torch.softmax(
            q.reshape(1, 8, 1, 64) @ Kh[:, :, :T + 1].float().transpose(-1, -2) * 0.125, -1) @ Vh[:, :, :T + 1].float(),
        f"feedback over {T}, TVM": lambda: dk.feedback(f, f, f, gamma, KB, S, T, 0.04),
        f"feedback over {T}, torch": torch_feedback,
        f"feedback over {T}, TVM, bf16 keys": lambda: dk.feedback(f, f, f, gamma, KBh, S, T, 0.04),
    }
    nbytes = {
        "linear": w.numel() * 4,
        "attention": (K.numel() + V.numel()) * 4,
        "attention bf16": (K.numel() + V.numel()) * 2,
        "feedback": (KB.numel() + S.numel()) * 4,
        "feedback bf16": KB.numel() * 2 + S.numel() * 4,
    }
    floors = {}
    for name, n in nbytes.items():
        buf = torch.ones(n // 4)
        floors[name] = buf
        variants[f"floor: one read of {name}'s {n / 1e6:.1f} MB"] = buf.sum

    def floor_of(k):
        if k.startswith("floor") or "torch" in k:
            return None
        base = k.split(" ")[0]
        return f"{base} bf16" if "bf16" in k else base

    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            fn()
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch threads {torch.get_num_threads()}, "
          f"TVM threads {os.environ.get('TVM_NUM_THREADS')}, load average {os.getloadavg()[0]:.1f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    fl = {name: next(k for k in times if k.startswith(f"floor: one read of {name}'s")) for name in nbytes}
    print("| op | median ms | best ms | floor ms (median) | of floor (median) | of floor (best) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in times.items():
        f = floor_of(k)
        extra = (f" {med[fl[f]] * 1e3:.3f} | {med[fl[f]] / med[k]:.0%} | {min(times[fl[f]]) / min(v):.0%} |"
                 if f in fl else " | | |")
        print(f"| {k} | {med[k] * 1e3:.3f} | {min(v) * 1e3:.3f} |" + extra)


if __name__ == "__main__":
    main()
