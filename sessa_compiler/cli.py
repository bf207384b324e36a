"""The ``sessa-compiler`` command line: compile, explain, export, tune, bench.

A model is one of ours (``--model sessa|mamba|transformer|decoder`` with size options) or any
module (``--module package.module:Class`` with ``--kwargs '{"D": 64}'``), optionally loading weights
from a state_dict file (``--weights file.pt``, loaded with ``weights_only=True``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from .errors import SessaCompilerError
from .timing import median_ms

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["sessa", "mamba", "transformer", "decoder"], default="sessa")
    g.add_argument("--module", help="package.module:Class of any torch.nn.Module (overrides --model)")
    g.add_argument("--kwargs", default="{}", help="JSON constructor arguments for --module")
    g.add_argument("--weights", help="a state_dict file to load (torch.load with weights_only=True)")
    g.add_argument("--D", type=int, default=64, help="model width")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None)
    g.add_argument("--layers", default="SMT", help="decoder layer kinds, e.g. SSMT")
    g.add_argument("--vocab", type=int, default=256)
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--T", type=int, default=64, help="sequence length of the example input")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--seed", type=int, default=0)


def build_model(a) -> tuple:
    from . import models

    torch.manual_seed(a.seed)
    if a.module:
        mod_name, _, cls_name = a.module.partition(":")
        if not cls_name:
            raise SessaCompilerError(f"--module expects package.module:Class, got {a.module!r}")
        cls = getattr(importlib.import_module(mod_name), cls_name)
        model = cls(**json.loads(a.kwargs))
    elif a.model == "sessa":
        model = models.SessaLayer(a.D, n_heads=a.heads, n_kv_heads=a.kv_heads)
    elif a.model == "mamba":
        model = models.MambaLayer(a.D)
    elif a.model == "transformer":
        model = models.TransformerLayer(a.D, a.heads, a.kv_heads)
    else:
        model = models.Decoder(a.vocab, a.D, a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads)
    if a.weights:
        model.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True), strict=True)
    model = model.to(DTYPES[a.dtype]).eval()
    return model, make_input(model, a, a.T)


def make_input(model, a, T: int) -> torch.Tensor:
    from .models import Decoder

    if isinstance(model, Decoder):
        return torch.randint(0, model.embed.num_embeddings, (a.batch, T))
    width = a.D
    if a.module:
        width = json.loads(a.kwargs).get("D", a.D)
    return torch.randn(a.batch, T, width).to(DTYPES[a.dtype])


# -- subcommands ------------------------------------------------------------------------------------
def cmd_compile(a) -> int:
    from . import compile as sc_compile
    from .tolerance import TOLERANCE, relative_error

    model, x = build_model(a)
    start = time.perf_counter()
    compiled = sc_compile(model, (x,), backend=a.backend)
    print(f"compiled {type(model).__name__} with backend {compiled.backend} in {time.perf_counter() - start:.2f} s")
    worst = 0.0
    with torch.no_grad():
        for T in sorted({1, 17, a.T}):
            xt = make_input(model, a, T)
            err = relative_error(compiled(xt), model(xt))
            worst = max(worst, err)
            print(f"  T={T}: max abs error / max abs reference = {err:.2e}")
    tol = TOLERANCE.get(DTYPES[a.dtype], 0.0)
    print(f"validation {'passed' if worst <= tol else 'FAILED'} (tolerance {tol:.0e})")
    if a.ir:
        Path(a.ir).write_text(str(compiled.graph))
        print(f"IR written to {a.ir}")
    return 0 if worst <= tol else 1


def cmd_explain(a) -> int:
    from . import compile as sc_compile

    model, x = build_model(a)
    compiled = sc_compile(model, (x,), backend=a.backend)
    print(compiled.explain())
    print()
    print(compiled.graph)
    return 0


def cmd_export(a) -> int:
    import sessa_compiler as sc

    model, x = build_model(a)
    fn = {"onnx": "export_onnx", "tvm": "export_tvm"}[a.format]
    if not hasattr(sc, fn):
        raise SessaCompilerError(f"export {a.format}: not available in this build (sessa_compiler.{fn} is missing)")
    getattr(sc, fn)(model, (x,), a.path)
    print(f"exported {type(model).__name__} to {a.path} ({a.format})")
    return 0


def cmd_tune(a) -> int:
    import sessa_compiler as sc

    if not hasattr(sc, "tune"):
        raise SessaCompilerError("tune: no backend with tunable kernels is built yet (Triton and TVM backends pending)")
    from .tune import cache_dir

    model, x = build_model(a)
    budget = f"{a.trials} trials" if a.trials else a.budget
    results = sc.tune(model, (x,), backend=a.backend, budget=budget)
    for r in results:
        print(f"{r.kernel}: {r.config} ({'cache hit' if r.from_cache else f'{r.median_ms:.3f} ms, {r.tried} tried'}"
              + (f", {len(r.rejected)} rejected" if r.rejected else "") + ")")
    print(f"{len(results)} kernels; cache: {cache_dir()}")
    return 0


def cmd_bench(a) -> int:
    from . import compile as sc_compile
    from .backends import available_backends

    model, x = build_model(a)
    backends = a.backends.split(",") if a.backends else available_backends()
    compiled = {}
    for b in backends:
        try:
            c = sc_compile(model, (x,), backend=b)
            with torch.no_grad():
                c(x)
            compiled[b] = c
        except SessaCompilerError as e:  # e.g. a GPU backend on a CPU-only machine
            print(f"skipped backend {b}: {e}", file=sys.stderr)
    lengths = [int(t) for t in a.lengths.split(",")]
    rows = []
    with torch.no_grad():
        for T in lengths:
            xt = make_input(model, a, T)
            ref = median_ms(model, xt, a.repeats)
            row = {"T": T, "eager module (ms)": ref}
            for b, c in compiled.items():
                row[f"{b} (ms)"] = median_ms(c, xt, a.repeats)
            rows.append(row)
    cols = list(rows[0])
    stamp = time.strftime("%Y-%m-%d")
    print(f"# {type(model).__name__} {a.dtype} B={a.batch}, medians of {a.repeats}; {stamp}; "
          f"{torch.get_num_threads()} threads")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cols[1:]:
            ax.plot(lengths, [r[c] for r in rows], marker="o", label=c.replace(" (ms)", ""))
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("time per forward (ms)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{type(model).__name__}, {a.dtype}, B={a.batch} ({stamp})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"plot written to {a.plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sessa-compiler", description="Compile, explain, export, tune and benchmark Sessa models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model and validate it against eager PyTorch")
    add_model_args(c)
    c.add_argument("--backend", default="auto")
    c.add_argument("--ir", help="write the IR text to this file")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("explain", help="print what was recognised, fallbacks, backend and the IR")
    add_model_args(e)
    e.add_argument("--backend", default="auto")
    e.set_defaults(fn=cmd_explain)

    x = sub.add_parser("export", help="export to ONNX or a TVM library")
    x.add_argument("format", choices=["onnx", "tvm"])
    x.add_argument("path")
    add_model_args(x)
    x.set_defaults(fn=cmd_export)

    t = sub.add_parser("tune", help="autotune the kernels of a model for this device")
    add_model_args(t)
    t.add_argument("--backend", default="triton", choices=["triton", "tvm"],
                   help="triton (CUDA, or CPU tensors in Triton's interpreter) or tvm (CPU: the TVM kernels' schedules)")
    t.add_argument("--budget", type=float, default=60.0, help="seconds, shared among the kernels")
    t.add_argument("--trials", type=int, default=None, help="candidates per kernel instead of a time budget")
    t.set_defaults(fn=cmd_tune)

    b = sub.add_parser("bench", help="time backends against the eager module over sequence lengths")
    add_model_args(b)
    b.add_argument("--backends", default=None, help="comma-separated (default: every available backend)")
    b.add_argument("--lengths", default="64,128,256")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--plot", help="write a PNG plot of time vs sequence length")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except SessaCompilerError as e:
        print(f"sessa-compiler {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
