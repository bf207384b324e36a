"""TVM backend on this CPU: fp32 Sessa layer forward vs torch eager / torch.compile.

    python benchmarks/tvm_cpu.py [--reps 7] [--quick] [--out benchmarks/results/tvm_cpu.md]

Variants (same weights, copied with load_state_dict(strict=True)):
  tvm            sessa_compiler.compile(layer, backend="tvm"): the whole layer as one TVM program
                 (generated kernels for attention, feedback and the linear layers)
  tvm hybrid     the same with options={"whole_graph": False}: attention and feedback in TVM, the
                 rest (linear layers on BLAS) through torch
  sdpa eager     a well-written layer: F.scaled_dot_product_attention + solve_triangular
                 (tests/styles/sdpa_style.py), and its torch.compile
  einsum eager   the einsum-style reference layer (sessa_compiler.models.SessaLayer), and its torch.compile
Timing: one process, medians of alternating runs (each rep calls every variant once, in turn).
GFLOP/s counts the useful work (causal halves only) against a measured sgemm rate.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.models import Decoder, SessaLayer  # noqa: E402
from tests.styles.sdpa_style import SdpaSessaLayer  # noqa: E402


def layer_flops(T: int, D: int, H: int, Hkv: int, B: int = 1) -> float:
    d = D // H
    linear = 2 * B * T * D * (2 * D + D + 2 * Hkv * d + 2 * D + (D if H > 1 else 0) + D + 1)
    attention = 2 * 2 * B * H * d * T * (T + 1) / 2          # QK^T and PV, causal (j <= t)
    feedback = 2 * 2 * B * D * T * (T - 1) / 2                # logits and the solve, strictly causal
    return linear + attention + feedback


def sgemm_rate(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def alternate(fns: dict, x, reps: int) -> dict:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():   # warm-up (and compile)
            f(x)
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def check(fns: dict, x, ref_key: str) -> dict:
    with torch.no_grad():
        ref = fns[ref_key](x)
        return {k: sc.api.relative_error(f(x), ref) for k, f in fns.items()}


def op_floor(node, args: list, outs: list, rate: float, read_gbs: float) -> float:
    """An op's own floor in ms: its useful FLOPs at the sgemm rate (linear, attention, feedback: causal halves
    only), else one pass over its operands and results at the memory read rate."""
    def shp(i):
        return tuple(args[i].shape)
    if node.op == "linear":
        rows = args[0].numel() // args[0].shape[-1]
        return 2 * rows * args[1].shape[0] * args[1].shape[1] / (rate * 1e9) * 1e3
    if node.op == "attention":
        B, T, H, d = shp(0)
        dv = shp(2)[-1]
        return 2 * B * H * (d + dv) * T * (T + 1) / 2 / (rate * 1e9) * 1e3
    if node.op == "feedback":
        B, T, W = shp(0)
        Wq = shp(1)[-1]
        return 2 * B * (W + Wq) * T * (T - 1) / 2 / (rate * 1e9) * 1e3
    nbytes = sum(t.numel() * t.element_size() for t in list(args) + list(outs) if isinstance(t, torch.Tensor))
    return nbytes / (read_gbs * 1e9) * 1e3


def read_rate() -> float:
    """GB/s of one torch.sum pass over 256 MB (same threads), best of 5."""
    big = torch.ones(64 * 2**20)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return big.numel() * 4 / best / 1e9


def op_breakdown(compiled, x, rate: float, read_gbs: float, reps: int = 5) -> list:
    """Per IR op inside the tvm runner (TVM kernels vs torch ops): (median ms, (op, value, where), floor ms)."""
    import collections

    from sessa_compiler.backends.eager import bind_symbols, run_node
    from sessa_compiler.backends.tvm.backend import KernelCall
    from sessa_compiler.backends.tvm.build import build
    from sessa_compiler.ir.graph import Value

    graph, plan = compiled.graph, compiled._runner.plan
    calls = {it.node: KernelCall(build(it.spec), collections.Counter()) for it in plan if it.spec is not None}
    times = collections.defaultdict(list)
    floors = {}
    with torch.no_grad():
        for _ in range(reps):
            env = {graph.inputs[0]: x}
            env.update({v: graph.params[n] for n, v in graph.param_values.items()})
            binding = bind_symbols(graph, [x])
            for node in graph.nodes:
                t0 = time.perf_counter()
                if node in calls:
                    env[node.outputs[0]] = calls[node](*[env[i] for i in node.inputs])
                else:
                    run_node(node, env, binding, torch.device("cpu"))
                where = "TVM" if node in calls else "torch"
                key = (node.op, node.outputs[0].name, where)
                times[key].append(time.perf_counter() - t0)
                if key not in floors:
                    args = [env.get(i) if isinstance(i, Value) else i for i in node.inputs]
                    floors[key] = op_floor(node, args, [env.get(o) for o in node.outputs], rate, read_gbs)
    return sorted(((statistics.median(v) * 1e3, k, floors[k]) for k, v in times.items()), reverse=True)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tvm
    from sessa_compiler.backends.tvm.target import host_target
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, TVM target mcpu={host_target().attrs['mcpu']}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), tvm {tvm.__version__}, "
            f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="T=2048 table only")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tvm_cpu.md"))
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    D, H = 512, 8
    torch.manual_seed(0)
    ref = SessaLayer(D, n_heads=H).eval()
    sdpa = SdpaSessaLayer(D, n_heads=H).eval()
    sdpa.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 2048, D)
    load = os.getloadavg()
    rate = sgemm_rate()
    tvm_layer = sc.compile(ref, (x[:, :16],), backend="tvm")
    hybrid = sc.compile(ref, (x[:, :16],), backend="tvm", options={"whole_graph": False})
    variants = {
        "tvm": tvm_layer,
        "tvm hybrid (linears on torch BLAS)": hybrid,
        "sdpa eager": sdpa,
        "sdpa torch.compile": torch.compile(sdpa, dynamic=False),
        "einsum eager": ref,
        "einsum torch.compile": torch.compile(ref, dynamic=False),
    }
    rows = []
    errs = check(variants, x, "einsum eager")
    med = alternate(variants, x, args.reps)
    flops = layer_flops(2048, D, H, H)
    lines = ["# TVM backend on CPU: Sessa layer forward, fp32", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {machine()}",
             f"- command: `python benchmarks/tvm_cpu.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other engineers share these cores: "
             "timings are noisy, compare rows of one run)",
             f"- measured sgemm (torch.mm 1024^3, best of 10): {rate:.0f} GFLOP/s",
             f"- useful work at B=1, T=2048, D=512, H=8: {flops / 1e9:.1f} GFLOP "
             f"(floor at the sgemm rate: {flops / rate / 1e6:.0f} ms)",
             f"- medians of {args.reps} alternating runs in one process", "",
             "## B=1, T=2048, D=512, H=8", "",
             "| variant | median ms | GFLOP/s | of floor (sgemm rate) | speed-up of tvm | rel. error vs einsum eager |",
             "|---|---|---|---|---|---|"]
    for k, t in med.items():
        gf = flops / t / 1e9
        lines.append(f"| {k} | {t * 1e3:.1f} | {gf:.1f} | {100 * gf / rate:.0f}% | {t / med['tvm']:.2f}x | {errs[k]:.1e} |")
    for other, goal in (("sdpa torch.compile", 1.2), ("einsum torch.compile", 2.0)):
        got = med[other] / med["tvm"]
        lines.append(f"- performance target: tvm >= {goal}x faster than {other}: {'met' if got >= goal else 'NOT met'} "
                     f"({got:.2f}x)")
    floor_s = flops / (rate * 1e9)
    frac = floor_s / med["tvm"]
    lines.append(f"- floor: {floor_s * 1e3:.1f} ms at the sgemm rate; tvm reaches {frac:.0%} of it "
                 f"(target 80%: {'met' if frac >= 0.8 else 'NOT met'})")
    rows.append(med)
    # the six-variant alternation lets each variant's thread pool disturb the next; also time the pair
    # that the 1.2x target compares, alone (back to back) and alternating just the two
    pair = {"tvm": tvm_layer, "sdpa torch.compile": variants["sdpa torch.compile"]}
    alone = {k: alternate({k: f}, x, args.reps)[k] for k, f in pair.items()}
    two = alternate(pair, x, args.reps)
    lines += ["", "TVM against `torch.compile` of the SDPA layer without the other variants (same process):", "",
              "| measured | tvm ms | sdpa torch.compile ms | speed-up of tvm |", "|---|---|---|---|"]
    for label, m in (("each alone, back to back", alone), ("alternating the two", two)):
        lines.append(f"| {label} | {m['tvm'] * 1e3:.1f} | {m['sdpa torch.compile'] * 1e3:.1f} | "
                     f"{m['sdpa torch.compile'] / m['tvm']:.2f}x |")
    if not args.quick:
        lines += ["", "## Sequence length sweep (B=1, D=512, H=8)", "",
                  "| T | tvm ms | tvm GFLOP/s | sdpa eager ms | sdpa torch.compile ms | speed-up vs compiled |",
                  "|---|---|---|---|---|---|"]
        for T in (512, 1024, 4096):
            xt = torch.randn(1, T, D)
            sweep = {"tvm": tvm_layer, "sdpa eager": sdpa, "sdpa torch.compile": variants["sdpa torch.compile"]}
            m = alternate(sweep, xt, max(3, args.reps // 2))
            gf = layer_flops(T, D, H, H) / m["tvm"] / 1e9
            lines.append(f"| {T} | {m['tvm'] * 1e3:.1f} | {gf:.1f} | {m['sdpa eager'] * 1e3:.1f} | "
                         f"{m['sdpa torch.compile'] * 1e3:.1f} | {m['sdpa torch.compile'] / m['tvm']:.2f}x |")
        dec = Decoder(1000, D, "SSSS", n_heads=H).eval()
        idx = torch.randint(0, 1000, (1, 2048))
        dec_tvm = sc.compile(dec, (idx[:, :16],), backend="tvm")
        dv = {"tvm": dec_tvm, "eager": dec}
        derr = check(dv, idx, "eager")
        m = alternate(dv, idx, 3)
        lines += ["", "## 4-layer Decoder (SSSS, vocab 1000, D=512, H=8), B=1, T=2048", "",
                  "| variant | median ms | rel. error |", "|---|---|---|"]
        for k, t in m.items():
            lines.append(f"| {k} | {t * 1e3:.1f} | {derr[k]:.1e} |")
    read_gbs = read_rate()
    breakdown = op_breakdown(tvm_layer, x, rate, read_gbs)
    lines += ["", f"## Where the tvm layer's time goes (T=2048, median of 5, load {os.getloadavg()[0]:.2f})", "",
              f"Each op against its own floor: linear, attention and feedback at their useful FLOPs over the sgemm rate "
              f"({rate:.0f} GFLOP/s), the other ops one pass over their operands and results at the read rate "
              f"({read_gbs:.1f} GB/s, torch.sum over 256 MB).", "",
              "| op | value | runs in | ms | floor ms | of floor |", "|---|---|---|---|---|---|"]
    lines += [f"| {op} | %{name} | {where} | {t:.2f} | {fl:.2f} | {fl / t:.0%} |"
              for t, (op, name, where), fl in breakdown if t >= 0.3]
    tot, totf = sum(t for t, _, _ in breakdown), sum(f for _, _, f in breakdown)
    lines.append(f"| (total of all ops) | | | {tot:.1f} | {totf:.1f} | {totf / tot:.0%} |")
    lines += ["", "## What runs where (tvm)", "", "```", tvm_layer.explain(), "```", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
