"""The ``sessa-compiler`` command line: compile, explain, export, tune, bench.

A model is one of ours (``--model sessa|mamba|transformer|decoder`` with size options) or any
module (``--module package.module:Class`` with ``--kwargs '{"D": 64}'``), optionally loading weights
from a state_dict file (``--weights file.pt``, loaded with ``weights_only=True``).

Nothing heavy is imported at module level: ``--help`` and ``--version`` answer without importing torch
(the package's ``__init__`` is lazy when torch is not yet imported); each command imports what it needs.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, SessaCompilerError

DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
BACKENDS = ("auto", "eager", "triton", "tvm")
# Distributions whose versions --version lists (read from the installed metadata: nothing is imported)
COMPONENTS = ("torch", "numpy", "triton", "apache-tvm", "onnx", "onnxscript", "onnxruntime")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def versions() -> str:
    """sessa-compiler's version, then one line per component: its installed version or 'not installed'."""
    import importlib.metadata as md
    import platform

    from ._version import __version__

    lines = [f"sessa-compiler {__version__}"]
    for name in COMPONENTS:
        try:
            lines.append(f"  {name} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"  {name}: not installed")
    lines.append(f"  python {platform.python_version()} ({sys.executable})")
    return "\n".join(lines)


class _Status:
    """One line on stderr before a step that may take seconds, on a terminal only (pipes stay clean)."""

    def __call__(self, message: str) -> None:
        if sys.stderr.isatty():
            print(f"sessa-compiler: {message} ...", file=sys.stderr, flush=True)


status = _Status()


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
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the model and its input")
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
    import torch

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
    import torch

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
    # floating-point tensors only: Module.to(dtype) also casts complex buffers (a rotary table) to real,
    # discarding their imaginary parts
    dtype = _dtype(a.dtype)
    model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    model = model.eval()
    return model, make_input(model, a, a.T)


def make_input(model, a, T: int):
    import torch

    from .models import Decoder

    if isinstance(model, Decoder):
        return torch.randint(0, model.embed.num_embeddings, (a.batch, T))
    if a.module:
        return _module_input(model, a)(a.batch, T)
    return torch.randn(a.batch, T, a.D).to(_dtype(a.dtype))


_VOCAB_KEYS = ("vocab", "vocab_size", "n_vocab", "num_embeddings", "num_tokens")


def _vocab(model, kwargs: dict) -> int:
    """The token range of a --module model: its first nn.Embedding's rows, a vocab-like constructor argument
    (given in --kwargs or the constructor's default), else 2 (ids any vocabulary takes)."""
    import torch

    embeds = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if embeds:
        return embeds[0].num_embeddings
    try:
        defaults = {n: p.default for n, p in inspect.signature(type(model).__init__).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    for k in _VOCAB_KEYS:
        value = kwargs.get(k, defaults.get(k))
        if isinstance(value, int) and value > 0:
            return value
    return 2


_WIDTH_KEYS = ("D", "d_model", "dim", "hidden_size", "n_embd", "embed_dim", "d")


def _module_input(model, a):
    """How the CLI builds the input of a --module model: token ids [B, T] when its forward takes them (it holds an
    nn.Embedding), else float [B, T, width], width from --kwargs (D, d_model, hidden_size, ...) or the first
    layer's input features, else --D. Each candidate is tried on the eager module at T = 3 and the first that
    runs is used (memoised on the arguments); none running is a ConfigError saying what was tried and how each
    failed, not the tracer's error from deep inside."""
    import torch

    cached = getattr(a, "_module_input", None)
    if cached is not None:
        return cached
    kwargs = _kwargs(a)
    vocab = _vocab(model, kwargs)
    ids = (f"token ids [B, T] in [0, {vocab})", lambda B, T: torch.randint(0, vocab, (B, T)))
    params = [n for n in inspect.signature(model.forward).parameters if n != "self"]
    wants_ids = any(isinstance(m, torch.nn.Embedding) for m in model.modules()) or \
        (params and any(w in params[0].lower() for w in ("ids", "idx", "token")))
    candidates = [ids] if wants_ids else []
    width = next((kwargs[k] for k in _WIDTH_KEYS if isinstance(kwargs.get(k), int)), None)
    if width is None:
        first = next((m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))), None)
        width = (first.in_features if isinstance(first, torch.nn.Linear)
                 else first.normalized_shape[-1] if first is not None else a.D)
    dtype = _dtype(a.dtype)
    candidates.append((f"float [B, T, {width}] ({str(dtype).replace('torch.', '')})",
                       lambda B, T: torch.randn(B, T, width).to(dtype)))
    if not wants_ids:
        candidates.append(ids)
    failures = []
    for what, make in candidates:
        try:
            with torch.no_grad():
                model(make(1, 3))
        except Exception as e:  # noqa: BLE001 - the module's own error for this kind of input, reported below
            failures.append(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            continue
        a._module_input = make
        return make
    raise ConfigError(f"--module {a.module}: the CLI calls the module with one input tensor and none it can build "
                      f"runs: " + "; ".join(failures) + ". Its forward must take one tensor: token ids [B, T] "
                      "(a model with an nn.Embedding) or float [B, T, D] (D from --kwargs or --D); for other calls, "
                      "use the Python API (sessa_compiler.compile)")


# -- subcommands ------------------------------------------------------------------------------------
def cmd_compile(a) -> int:
    import torch

    from .api import compile as sc_compile
    from .tolerance import TOLERANCE, relative_error

    status("building the model")
    model, x = build_model(a)
    start = time.perf_counter()
    status(f"compiling {type(model).__name__} (tracing, then building the {a.backend} backend's program)")
    compiled = sc_compile(model, (x,), backend=a.backend)
    print(f"compiled {type(model).__name__} with backend {compiled.backend} in {time.perf_counter() - start:.2f} s")
    worst = 0.0
    with torch.no_grad():
        for T in sorted({1, 17, a.T}):
            xt = make_input(model, a, T)
            got, want = (torch.utils._pytree.tree_leaves(out) for out in (compiled(xt), model(xt)))
            err = max((relative_error(g, w) for g, w in zip(got, want)
                       if isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor)), default=0.0)
            worst = max(worst, err)
            print(f"  T={T}: max abs error / max abs reference = {err:.2e}")
    tol = TOLERANCE.get(_dtype(a.dtype), 0.0)
    print(f"validation {'passed' if worst <= tol else 'FAILED'} (tolerance {tol:.0e})")
    if a.ir:
        Path(a.ir).write_text(str(compiled.graph))
        print(f"IR written to {a.ir}")
    return 0 if worst <= tol else 1


def cmd_explain(a) -> int:
    from .api import compile as sc_compile

    status("building the model")
    model, x = build_model(a)
    status(f"tracing {type(model).__name__} and building the {a.backend} backend's program (seconds on a first run)")
    compiled = sc_compile(model, (x,), backend=a.backend)
    print(compiled.explain())
    print()
    print(compiled.graph)
    return 0


def cmd_export(a) -> int:
    from . import export_onnx, export_tvm

    path = Path(a.path)
    target = path if a.format == "tvm" else path.parent
    if target.exists() and not target.is_dir():
        raise ConfigError(f"export {a.format}: {str(target)!r} for {a.path!r} exists and is not a directory")
    if not target.exists():
        target.mkdir(parents=True)
        print(f"created directory {target}")
    status("building the model")
    model, x = build_model(a)
    status(f"exporting {type(model).__name__} to {a.format} (trace, lower, "
           + ("check and validate in onnxruntime)" if a.format == "onnx" else "build the library)"))
    if a.format == "onnx":
        result = export_onnx(model, (x,), a.path)
    else:
        result = export_tvm(model, (x,), a.path)
    print(f"exported {type(model).__name__} to {a.path} ({a.format})")
    for line in export_report(a.format, a.path, result):
        print("  " + line)
    return 0


def export_report(fmt: str, path, result) -> list:
    """Inputs and outputs with their dims (named dims are dynamic), and what validation ran."""
    def shape(dims):
        return "[" + ", ".join(str(d) for d in dims) + "]"

    if fmt == "onnx":
        def entries(values):
            return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

        ins, outs = entries(result.model.graph.input), entries(result.model.graph.output)
    else:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        ins = [(v["name"], v["shape"]) for v in manifest.get("inputs", [])]
        outs = [(v["name"], v["shape"]) for v in manifest.get("outputs", [])]
    dynamic = sorted({d for _, dims in ins + outs for d in dims if isinstance(d, str)})
    lines = ["inputs: " + ", ".join(f"{n} {shape(d)}" for n, d in ins),
             "outputs: " + ", ".join(f"{n} {shape(d)}" for n, d in outs),
             f"dynamic dims: {', '.join(dynamic) if dynamic else 'none (fixed shapes)'}"]
    runs = getattr(result, "validation", None)
    if fmt == "onnx" and runs:
        worst = max((max(r.get("errors", [r.get("error", 0.0)]), default=0.0) for r in runs), default=0.0)
        lines.append(f"validated in onnxruntime against the module on {len(runs)} input sets "
                     f"({'; '.join(str(r['shapes']) for r in runs)}): max error {worst:.1e}")
    elif fmt == "onnx":
        lines.append("not validated in onnxruntime")
    else:
        lines.append("not compared with the module at export time; run it with sessa_compiler.load_tvm(path)")
    return lines


def cmd_tune(a) -> int:
    from .api import tune
    from .autotune import cache_dir

    status("building the model")
    model, x = build_model(a)
    backend = a.backend if a.backend != "auto" else default_tune_backend()
    print(f"tuning the {backend} backend's kernels" + (" (the backend this device runs)" if a.backend == "auto" else ""))
    budget = f"{a.trials} trials" if a.trials else a.budget
    status(f"tracing the model, then tuning within {budget if a.trials else f'{budget:g} s'}")
    results = tune(model, (x,), backend=backend, budget=budget)
    for r in results:
        print(f"{r.kernel}: {r.config} ({'cache hit' if r.from_cache else f'{r.median_ms:.3f} ms, {r.tried} tried'}"
              + (f", {len(r.rejected)} rejected" if r.rejected else "") + ")")
    print(f"{len(results)} kernels; cache: {cache_dir()}")
    return 0


def default_tune_backend() -> str:
    """The backend compile(backend="auto") runs on this machine: triton with CUDA, else tvm."""
    import torch

    from .backends import available_backends

    have = available_backends()
    if torch.cuda.is_available() and "triton" in have:
        return "triton"
    if "tvm" in have:
        return "tvm"
    raise ConfigError("tune: nothing to tune on this machine (no CUDA device with triton, and tvm is not installed); "
                      "install apache-tvm, or pass --backend triton to tune in Triton's interpreter")


def cmd_bench(a) -> int:
    import torch

    from .api import compile as sc_compile
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
    from .timing import MAX_SPREAD, ratio, time_alternating

    rows = []
    with torch.no_grad():
        for T in lengths:
            status(f"timing T={T}: {a.repeats} calls of each variant, in turns")
            xt = make_input(model, a, T)
            timings = time_alternating({"eager module": model, **compiled}, xt, repeats=a.repeats)
            row = {"T": T, "eager module (ms)": timings["eager module"]}
            for b in compiled:
                row[f"{b} (ms)"] = timings[b]
            for b in compiled:
                r = ratio(timings["eager module"], timings[b])
                row[f"{b} speed-up"] = f"{r:.2f}x" if r is not None else "spread too large"
            rows.append(row)
    cols = list(rows[0])
    stamp = time.strftime("%Y-%m-%d")
    print(f"# {type(model).__name__} {a.dtype} B={a.batch}; median (interquartile range / median) of {a.repeats} "
          f"calls each, the variants in turns; {stamp}; {torch.get_num_threads()} threads; a speed-up is shown only "
          f"when both spreads are within {MAX_SPREAD:.0%}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def cell(v):
        if hasattr(v, "median"):
            return f"{v.median:.2f} (±{v.spread / 2:.0%})"
        return str(v)

    for r in rows:
        print("| " + " | ".join(cell(r[c]) for c in cols) + " |")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cols[1:]:
            if c.endswith("(ms)"):
                ax.plot(lengths, [r[c].median for r in rows], marker="o", label=c.replace(" (ms)", ""))
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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for options without one (None), nor where the help names it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2 (like every other user error here)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    fmt = _Formatter
    p = _Parser(prog="sessa-compiler", formatter_class=fmt,
                description="Compile, explain, export, tune and benchmark Sessa models (and any torch.nn.Module).")
    p.add_argument("--version", action=_Version, help="print the version of sessa-compiler and of every component")
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
    x.add_argument("path", help="the .onnx file, or the directory for tvm (missing directories are created)")
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
    b.add_argument("--repeats", type=_positive, default=7,
                   help="timed calls per variant and length, the variants in turns (median and spread reported)")
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
