"""A large fuzz draw: compiled Sessa layers on every backend against the float64 row-by-row oracle of
tests/test_fuzz.py, over random layer structures and inputs, including the extremes (gamma near
+-gamma_max, weights scaled up, T = 1, primes, both sides of every chunk and tile size).

    python benchmarks/fuzz.py --structures 6 --draws 8            # a few minutes on 2 CPU cores
    python benchmarks/fuzz.py --structures 40 --draws 20 --backends eager,tvm,triton

Each structure (width, heads, kv heads, RoPE, gamma_max, dtype) is traced once; every draw then runs
the same graph on each backend (TVM in its default whole-graph mode). A case is a *mismatch* when the
compiled output misses the spec's tolerance against the oracle while the module itself meets it (or, in
bf16, when it is further than 1.5x the module's own error), and a *crash* when the backend raises.
Writes benchmarks/results/fuzz.md (the table and every failure) and benchmarks/results/fuzz.png.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors run in Triton's interpreter

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.backends import get_backend  # noqa: E402
from sessa_compiler.models import SessaLayer  # noqa: E402
from sessa_compiler.autotune.cache import cpu_model  # noqa: E402
from tests.test_fuzz import SPEC_TOL, oracle, random_weights as random_params, rel_err  # noqa: E402

EDGE_T = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 127, 128, 129]
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


def draw_structure(rng: random.Random) -> dict:
    H = rng.choice([1, 1, 2, 4, 8])
    Hkv = rng.choice([h for h in (1, 2, 4, 8) if H % h == 0])
    d = rng.choice([4, 6, 8, 12, 16])
    return dict(D=H * d, H=H, Hkv=Hkv, rope=rng.random() < 0.7,
                gamma_max=rng.choice([0.001, 0.5, 0.999, 0.9999]),
                dtype=rng.choice(["f64", "f64", "f32", "f32", "bf16"]))


def draw_case(rng: random.Random, max_T: int) -> dict:
    T = rng.choice([t for t in EDGE_T if t <= max_T]) if rng.random() < 0.7 else rng.randint(1, max_T)
    return dict(T=T, B=rng.choice([1, 2, 3]),
                gamma_bias=rng.choice([-30.0, -8.0, 0.0, 8.0, 30.0, rng.uniform(-6, 6)]),
                scale=rng.choice([0.5, 1.0, 2.0, 3.0]), x_scale=rng.choice([1.0, 4.0]), seed=rng.randrange(2**16))


def run(args) -> list:
    rng = random.Random(args.seed)
    backends = args.backends.split(",")
    rows = []
    for si in range(args.structures):
        cfg = draw_structure(rng)
        dtype = DTYPES[cfg["dtype"]]
        torch.manual_seed(si)
        m = SessaLayer(cfg["D"], n_heads=cfg["H"], n_kv_heads=cfg["Hkv"], use_forward_rope=cfg["rope"],
                       gamma_max=cfg["gamma_max"]).to(dtype).eval()
        try:
            graph = sc.trace(m, (torch.randn(1, 5, cfg["D"], dtype=dtype),))
        except Exception as e:  # noqa: BLE001 - a crash is a finding
            rows.append(dict(structure=si, **cfg, backend="trace", status="crash", error=f"{type(e).__name__}: {e}"))
            continue
        runners = {}
        for b in backends:
            try:
                runners[b] = get_backend(b).prepare(graph)
            except Exception as e:  # noqa: BLE001
                runners[b] = e
        for _ in range(args.draws):
            case = draw_case(rng, args.max_T)
            params = random_params(graph, case["seed"], case["scale"], case["gamma_bias"])
            gen = torch.Generator().manual_seed(case["seed"] + 1)
            x = (torch.randn(case["B"], case["T"], cfg["D"], generator=gen, dtype=torch.float64)
                 * case["x_scale"]).to(dtype)
            ref = oracle({k: v.double().numpy() for k, v in params.items()}, x.double().numpy(), cfg["H"],
                         cfg["Hkv"], cfg["rope"], cfg["gamma_max"])
            m.load_state_dict(params, strict=True)
            with torch.no_grad():
                own = rel_err(m(x), ref)
            tol = SPEC_TOL[dtype]
            for b in backends:
                row = dict(structure=si, **cfg, **case, backend=b, module_err=own, tol=tol)
                start = time.perf_counter()
                try:
                    if isinstance(runners[b], Exception):
                        raise runners[b]
                    with torch.no_grad():
                        out = runners[b]([x], params)[0]
                    err = rel_err(out, ref)
                    allowed = max(tol, 1.5 * own) if dtype == torch.bfloat16 else tol
                    if own > tol and dtype != torch.bfloat16:
                        status = "module misses spec"  # outside the range the spec covers: not counted
                    else:
                        status = "ok" if err <= allowed else "mismatch"
                    row.update(err=err, status=status, allowed=allowed)
                except Exception as e:  # noqa: BLE001
                    row.update(err=math.nan, status="crash",
                               error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                               where=traceback.format_exc(limit=-2).strip().splitlines()[-3:])
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                if args.verbose or row["status"] not in ("ok",):
                    print(f"[{si}] {b:7s} {cfg} T={case['T']} B={case['B']} gb={case['gamma_bias']:.2f} "
                          f"scale={case['scale']} -> {row['status']} err={row.get('err', math.nan):.2e} "
                          f"module={own:.2e}", flush=True)
    return rows


def report(rows: list, args, seconds: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cases = [r for r in rows if r["backend"] != "trace"]
    counts = Counter((r["backend"], r["status"]) for r in cases)
    backends = sorted({r["backend"] for r in cases})
    lines = [f"# Fuzz draw: compiled SessaLayer vs float64 row-by-row oracle",
             "",
             f"- date: {stamp}; machine: {cpu_model()}, {os.cpu_count()} logical CPUs "
             f"(shared with other work); {platform.python_version()}, torch {torch.__version__}",
             f"- command: `python benchmarks/fuzz.py --structures {args.structures} --draws {args.draws} "
             f"--max-T {args.max_T} --backends {args.backends} --seed {args.seed}` ({seconds / 60:.1f} min)",
             f"- {args.structures} layer structures, {len({(r['structure'], r.get('T'), r.get('seed')) for r in cases})} "
             f"input draws, {len(cases)} backend runs; trace crashes: "
             f"{sum(r['backend'] == 'trace' for r in rows)}",
             "",
             "| backend | runs | ok | mismatch | crash | module misses spec (not counted) | worst err / allowed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for b in backends:
        mine = [r for r in cases if r["backend"] == b]
        ratios = [r["err"] / r["allowed"] for r in mine if r["status"] in ("ok", "mismatch") and math.isfinite(r["err"])]
        lines.append(f"| {b} | {len(mine)} | {counts[(b, 'ok')]} | {counts[(b, 'mismatch')]} | {counts[(b, 'crash')]} | "
                     f"{counts[(b, 'module misses spec')]} | {max(ratios, default=math.nan):.2g} |")
    lines += ["", "Allowed: the spec's tolerance for the dtype (float64 1e-10, float32 1e-4); for bf16 the larger of "
              "3e-2 and 1.5x the module's own error (docs/spec.md)."]
    bad = [r for r in rows if r["status"] in ("mismatch", "crash")]
    if bad:
        lines += ["", "## Failures", ""]
        for r in bad:
            keys = ("structure", "D", "H", "Hkv", "rope", "gamma_max", "dtype", "T", "B", "gamma_bias", "scale", "x_scale",
                    "seed")
            lines.append(f"- {r['backend']} {r['status']}: " + ", ".join(f"{k}={r[k]}" for k in keys if k in r)
                         + (f"; err {r['err']:.2e} (module {r['module_err']:.2e})" if r["status"] == "mismatch" else "")
                         + (f"; {r.get('error', '')}" if r["status"] == "crash" else ""))
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r for r in rows if r["backend"] != "trace"]
    backends = sorted({r["backend"] for r in cases})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"ok": "o", "mismatch": "x", "module misses spec": "s"}
    for i, b in enumerate(backends):
        for status, mk in markers.items():
            pts = [r for r in cases if r["backend"] == b and r["status"] == status and math.isfinite(r["err"])]
            if pts:
                ax.scatter([r["T"] * (1 + 0.04 * (i - 1)) for r in pts],
                           [max(r["err"] / r.get("allowed", r["tol"]), 1e-8) for r in pts],
                           marker=mk, s=18, color=f"C{i}", alpha=0.7,
                           label=f"{b}: {status} ({len(pts)})")
        crashes = sum(r["backend"] == b and r["status"] == "crash" for r in cases)
        if crashes:
            ax.scatter([], [], marker="^", color=f"C{i}", label=f"{b}: crash ({crashes})")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.text(1, 1.3, "allowed (spec tolerance; bf16: max(3e-2, 1.5x the module's error))", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("error vs float64 oracle / allowed")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--structures", type=int, default=6, help="random layer structures (one trace each)")
    p.add_argument("--draws", type=int, default=8, help="input/weight draws per structure")
    p.add_argument("--max-T", type=int, default=129, help="longest sequence drawn")
    p.add_argument("--backends", default="eager,triton,tvm", help="comma-separated backends")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for fuzz.md and fuzz.png")
    p.add_argument("--verbose", action="store_true", help="print every case, not only failures")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start = time.perf_counter()
    rows = run(args)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(rows, args, seconds)
    (out / "fuzz.md").write_text(text)
    cases = [r for r in rows if r["backend"] != "trace"]
    title = (f"{args.structures} structures, {len(cases)} runs: "
             f"{sum(r['status'] == 'mismatch' for r in cases)} mismatches, "
             f"{sum(r['status'] == 'crash' for r in rows)} crashes ({time.strftime('%Y-%m-%d')})")
    plot(rows, out / "fuzz.png", title)
    print(text)
    return 1 if any(r["status"] in ("mismatch", "crash") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
