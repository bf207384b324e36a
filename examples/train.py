"""Train a small Sessa decoder LM through the compiled module (CPU, TVM backend) and plot its loss.

    python examples/train.py [--steps 200] [--T 128] [--backend tvm] [--compare] [--plot loss.png]

The task is a toy one: predict the next token of sequences that repeat a random pattern, so the loss falls
quickly. Each step: AdamW, cross-entropy on next-token prediction, forward and backward through
``sessa_compiler.compile(model, backend=...)`` (the TVM kernels run the core ops' forward, the blocked
backward kernels their gradients; docs/training.md). With --compare an uncompiled copy with the same
initial weights and batches trains beside it and both loss curves are plotted.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.models import Decoder  # noqa: E402


def batches(vocab: int, B: int, T: int, seed: int):
    """Sequences of a random pattern (period 3..8) repeated: inputs and next-token targets."""
    g = torch.Generator().manual_seed(seed)
    while True:
        rows = []
        for _ in range(B):
            period = int(torch.randint(3, 9, (1,), generator=g))
            pattern = torch.randint(0, vocab, (period,), generator=g)
            rows.append(pattern.repeat(T // period + 2)[:T + 1])
        seq = torch.stack(rows)
        yield seq[:, :-1], seq[:, 1:]


def train(steps: int = 200, T: int = 128, B: int = 4, vocab: int = 64, D: int = 64, layers: str = "ST",
          backend: str = "tvm", compare: bool = False, lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """Loss per step of the compiled model (and of an uncompiled copy when compare): (losses, reference)."""
    torch.manual_seed(seed)
    model = Decoder(vocab, D, layers, n_heads=4, n_kv_heads=2).train()
    plain = copy.deepcopy(model) if compare else None
    compiled = sc.compile(model, backend=backend)
    runs = [(compiled, model, torch.optim.AdamW(model.parameters(), lr=lr), [])]
    if plain is not None:
        runs.append((plain, plain, torch.optim.AdamW(plain.parameters(), lr=lr), []))
    data = batches(vocab, B, T, seed)
    bar = tqdm(range(steps), desc=f"train ({backend})", disable=not progress)
    for _ in bar:
        x, y = next(data)
        for fn, _module, opt, losses in runs:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(x).reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        bar.set_postfix(loss=f"{runs[0][3][-1]:.3f}")
    return runs[0][3], (runs[1][3] if compare else None), compiled


def plot(losses, reference, path: str, backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, label=f"sessa_compiler.compile(backend={backend!r})")
    if reference is not None:
        ax.plot(reference, "--", label="uncompiled module")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--backend", default="tvm")
    ap.add_argument("--compare", action="store_true", help="train an uncompiled copy beside it")
    ap.add_argument("--plot", default="train_loss.png")
    args = ap.parse_args(argv)
    losses, reference, compiled = train(args.steps, args.T, args.B, backend=args.backend, compare=args.compare)
    plot(losses, reference, args.plot, args.backend)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; plot: {args.plot}; "
          f"backward recomputed on eager: {compiled.grad_recomputes} calls")


if __name__ == "__main__":
    main()
