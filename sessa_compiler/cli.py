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

from .errors import ConfigError, SessaCompilerError
from .timing import median_ms

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("auto", "eager", "triton", "tvm")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of ours, or any module)")
    g.add_argument("--model", choices=["sessa", "mamba", "transformer", "decoder"], default="sessa",
                   help="which reference model to build (ignored with --module)")
    g.add_argument("--module", metavar="PACKAGE.MODULE:CLASS",
                   help="any torch.nn.Module class, importable from the current directory (overrides --model)")
    g.add_argument("--kwargs", default="{}", metavar="JSON",
                   help="constructor arguments for --module, a JSON object such as '{\"D\": 64}'")
    g.add_argument("--weights", metavar="FILE",
                   help="a state_dict file to load strictly (torch.load with weights_only=True)")
    g.add_argument("--D", type=_positive, default=64, help="model width")
    g.add_argument("--heads", type=_positive, default=4, help="query heads (must divide --D)")
    g.add_argument("--kv-heads", type=_positive, default=None, help="key/value heads (must divide --heads; default: --heads)")
    g.add_argument("--layers", default="SMT", help="decoder layer kinds: S(essa), M(amba), T(ransformer), e.g. SSMT")
    g.add_argument("--vocab", type=_positive, default=256, help="decoder vocabulary size")
    g.add_argument("--batch", type=_positive, default=2, help="batch size of the example input")
    g.add_argument("--T", type=_positive, default=64, help="sequence length of the example input")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the model and its input")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def _kwargs(a) -> dict:
    try:
        kwargs = json.loads(a.kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--kwargs is not valid JSON ({e.msg} at column {e.colno}): {a.kwargs!r}; "
                          "expected an object such as '{\"D\": 64}'") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--kwargs must be a JSON object of constructor arguments, got {type(kwargs).__name__}: "
                          f"{a.kwargs!r}")
    return kwargs


def _module_class(spec: str):
    mod_name, _, cls_name = spec.partition(":")
    if not mod_name or not cls_name:
        raise ConfigError(f"--module expects package.module:Class (e.g. mypkg.layers:MyLayer), got {spec!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the console script does not put the current directory on the path
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"--module {spec!r}: cannot import {mod_name!r} ({e}); run from the directory that holds "
                          "it, or install its package") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"--module {spec!r}: {mod_name} has no attribute {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ConfigError(f"--module {spec!r}: {cls_name} is not a torch.nn.Module class")
    return cls


def build_model(a) -> tuple:
    from . import models

    torch.manual_seed(a.seed)
    if a.module:
        cls, kwargs = _module_class(a.module), _kwargs(a)
        what = f"{cls.__name__}(**{kwargs})"
        build = lambda: cls(**kwargs)  # noqa: E731
    elif a.model == "sessa":
        what = f"SessaLayer(D={a.D}, n_heads={a.heads}, n_kv_heads={a.kv_heads}) from --D/--heads/--kv-heads"
        build = lambda: models.SessaLayer(a.D, n_heads=a.heads, n_kv_heads=a.kv_heads)  # noqa: E731
    elif a.model == "mamba":
        what = f"MambaLayer(D={a.D}) from --D"
        build = lambda: models.MambaLayer(a.D)  # noqa: E731
    elif a.model == "transformer":
        what = f"TransformerLayer(D={a.D}, n_heads={a.heads}, n_kv_heads={a.kv_heads}) from --D/--heads/--kv-heads"
        build = lambda: models.TransformerLayer(a.D, a.heads, a.kv_heads)  # noqa: E731
    else:
        what = (f"Decoder(vocab={a.vocab}, D={a.D}, layers={a.layers!r}, n_heads={a.heads}, n_kv_heads={a.kv_heads}) "
                "from --vocab/--D/--layers/--heads/--kv-heads")
        build = lambda: models.Decoder(a.vocab, a.D, a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads)  # noqa: E731
    try:
        model = build()
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"cannot build {what}: {e}") from None
    if a.weights:
        path = Path(a.weights)
        if not path.is_file():
            raise ConfigError(f"--weights {a.weights!r}: {'is a directory' if path.is_dir() else 'no such file'}; "
                              "expected a state_dict saved with torch.save(model.state_dict(), path)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as e:  # noqa: BLE001 - a bad file or mismatched keys: the user's input, said in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--weights {a.weights!r} does not load into {type(model).__name__}: {first}") from None
    model = model.to(DTYPES[a.dtype]).eval()
    return model, make_input(model, a, a.T)


def make_input(model, a, T: int) -> torch.Tensor:
    from .models import Decoder

    if isinstance(model, Decoder):
        return torch.randint(0, model.embed.num_embeddings, (a.batch, T))
    width = a.D
    if a.module:
        width = _kwargs(a).get("D", a.D)
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

    parent = Path(a.path).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"export {a.format}: the directory {str(parent)!r} for {a.path!r} does not exist; "
                          "create it first")
    model, x = build_model(a)
    fn = {"onnx": "export_onnx", "tvm": "export_tvm"}[a.format]
    if not hasattr(sc, fn):
        raise SessaCompilerError(f"export {a.format}: not available in this build (sessa_compiler.{fn} is missing)")
    getattr(sc, fn)(model, (x,), a.path)
    print(f"exported {type(model).__name__} to {a.path} ({a.format})")
    return 0


def cmd_tune(a) -> int:
    import sessa_compiler as sc

    from .autotune import cache_dir

    model, x = build_model(a)
    backend = a.backend if a.backend != "auto" else default_tune_backend()
    print(f"tuning the {backend} backend's kernels" + (" (the backend this device runs)" if a.backend == "auto" else ""))
    budget = f"{a.trials} trials" if a.trials else a.budget
    results = sc.tune(model, (x,), backend=backend, budget=budget)
    for r in results:
        print(f"{r.kernel}: {r.config} ({'cache hit' if r.from_cache else f'{r.median_ms:.3f} ms, {r.tried} tried'}"
              + (f", {len(r.rejected)} rejected" if r.rejected else "") + ")")
    print(f"{len(results)} kernels; cache: {cache_dir()}")
    return 0


def default_tune_backend() -> str:
    """The backend compile(backend="auto") runs on this machine: triton with CUDA, else tvm."""
    from .backends import available_backends

    have = available_backends()
    if torch.cuda.is_available() and "triton" in have:
        return "triton"
    if "tvm" in have:
        return "tvm"
    raise ConfigError("tune: nothing to tune on this machine (no CUDA device with triton, and tvm is not installed); "
                      "install apache-tvm, or pass --backend triton to tune in Triton's interpreter")


def cmd_bench(a) -> int:
    from . import compile as sc_compile
    from .backends import available_backends

    backends = [b.strip() for b in a.backends.split(",") if b.strip()] if a.backends else available_backends()
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"--backends: unknown backend {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"expected a comma-separated list of {', '.join(BACKENDS)}")
    try:
        lengths = [int(t) for t in a.lengths.split(",")]
    except ValueError:
        raise ConfigError(f"--lengths: expected comma-separated positive integers, got {a.lengths!r}") from None
    if not lengths or min(lengths) <= 0:
        raise ConfigError(f"--lengths: expected comma-separated positive integers, got {a.lengths!r}")
    if a.plot and not Path(a.plot).resolve().parent.is_dir():
        raise ConfigError(f"--plot {a.plot!r}: its directory does not exist; create it first")
    model, x = build_model(a)
    compiled = {}
    for b in backends:
        try:
            c = sc_compile(model, (x,), backend=b)
            with torch.no_grad():
                c(x)
            compiled[b] = c
        except SessaCompilerError as e:  # e.g. a GPU backend on a CPU-only machine
            print(f"skipped backend {b}: {e}", file=sys.stderr)
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2 (like every other user error here)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    from ._version import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="sessa-compiler", formatter_class=fmt,
                description="Compile, explain, export, tune and benchmark Sessa models (and any torch.nn.Module).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True, metavar="{compile,explain,export,tune,bench}",
                           parser_class=_Parser)
    backend_help = ("auto: Triton for CUDA inputs, TVM on CPU (eager for bf16/fp16 on CPU); eager: the IR "
                    "interpreter; triton; tvm")

    c = sub.add_parser("compile", help="compile a model and validate it against eager PyTorch", formatter_class=fmt,
                       description="Compile a model and compare it with the eager module at T = 1, 17 and --T.")
    add_model_args(c)
    c.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    c.add_argument("--ir", metavar="FILE", help="write the IR text to this file")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("explain", help="print what was recognised, what fell back, what runs where, and the IR",
                       formatter_class=fmt,
                       description="Compile a model for the example input and print the report of what runs "
                                   "where, then the IR.")
    add_model_args(e)
    e.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    e.set_defaults(fn=cmd_explain)

    x = sub.add_parser("export", help="export to ONNX or a TVM library", formatter_class=fmt,
                       description="Export a model to an ONNX file or to a TVM library directory.")
    x.add_argument("format", choices=["onnx", "tvm"], help="onnx: one .onnx file; tvm: a directory (.so, weights, manifest)")
    x.add_argument("path", help="the .onnx file, or the directory for tvm (its parent directory must exist)")
    add_model_args(x)
    x.set_defaults(fn=cmd_export)

    t = sub.add_parser("tune", help="autotune the kernels of a model for this device", formatter_class=fmt,
                       description="Search each kernel's configurations, verify them against eager, and store the "
                                   "fastest in the tuning cache (SESSA_COMPILER_CACHE_DIR).")
    add_model_args(t)
    t.add_argument("--backend", default="auto", choices=["auto", "triton", "tvm"],
                   help="auto: the backend this device runs (triton with CUDA, else tvm); triton (CUDA, or CPU "
                        "tensors in Triton's interpreter); tvm (CPU: the TVM kernels' schedules)")
    t.add_argument("--budget", type=float, default=60.0, help="seconds, shared among the kernels")
    t.add_argument("--trials", type=_positive, default=None, help="candidates per kernel instead of a time budget")
    t.set_defaults(fn=cmd_tune)

    b = sub.add_parser("bench", help="time backends against the eager module over sequence lengths",
                       formatter_class=fmt, description="Time backends against the eager module; print a table.")
    add_model_args(b)
    b.add_argument("--backends", default=None,
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default: every installed backend)")
    b.add_argument("--lengths", default="64,128,256", help="comma-separated sequence lengths")
    b.add_argument("--repeats", type=_positive, default=5, help="timed calls per length (the median is reported)")
    b.add_argument("--plot", metavar="FILE", help="write a PNG plot of time vs sequence length")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2, already reported in one line)
        return int(e.code or 0)
    try:
        return args.fn(args)
    except SessaCompilerError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"sessa-compiler {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
