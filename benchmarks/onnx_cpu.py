"""onnxruntime CPU vs torch eager: a Sessa layer and a 4-layer Decoder at T = 512 and 2048 (medians).

    python benchmarks/onnx_cpu.py [--threads 1] [--repeats 5] [--out benchmarks/results/onnx_cpu.md]

Each model is exported once with sessa_compiler.export_onnx (dynamic T, validated) and the same file is
timed at every T. Both runtimes get the same number of threads. Writes a markdown table with the
date, machine, versions and the command.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sessa_compiler as sc
from sessa_compiler.models import Decoder, SessaLayer
from sessa_compiler.autotune.cache import cpu_model as cpu_name


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--layers", default="SMTS", help="Decoder layer kinds (S Sessa, M Mamba, T Transformer)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "onnx_cpu.md"))
    a = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    D, vocab = a.D, 1000
    models = {
        f"SessaLayer(D={D}, H=4, Hkv=2)": (SessaLayer(D, n_heads=4, n_kv_heads=2).eval(),
                                           lambda T: torch.randn(1, T, D)),
        f"Decoder('{a.layers}', D={D}, H=4, vocab={vocab})": (Decoder(vocab, D, a.layers, n_heads=4).eval(),
                                                              lambda T: torch.randint(0, vocab, (1, T))),
    }
    rows = []
    tmp = tempfile.mkdtemp()
    for name, (module, make) in models.items():
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        res = sc.export_onnx(module, (make(16),), path)
        export_s = time.perf_counter() - t
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        in_name = sess.get_inputs()[0].name
        for T in a.lengths:
            x = make(T)
            feeds = {in_name: x.numpy()}
            reps = a.repeats if T <= 512 else max(3, a.repeats // 2)
            with torch.no_grad():
                ref = module(x)
                t_eager = median_time(lambda x=x, module=module: module(x), reps)
            out = torch.from_numpy(sess.run(None, feeds)[0])
            err = sc.api.relative_error(out, ref)
            t_ort = median_time(lambda sess=sess, feeds=feeds: sess.run(None, feeds), reps)
            rows.append((name, T, t_eager, t_ort, err, reps))
            print(f"{name:45s} T={T:5d}  eager {t_eager * 1e3:9.1f} ms  onnxruntime {t_ort * 1e3:9.1f} ms  "
                  f"speed-up {t_eager / t_ort:5.2f}x  rel err {err:.1e}", flush=True)
        print(f"  (export + validation {export_s:.1f} s; {res.op_counts().get('Loop', 0)} Loop, "
              f"{res.op_counts().get('Scan', 0)} Scan)", flush=True)

    import onnx
    lines = [
        "# onnxruntime CPU vs torch eager (float32, batch 1)",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        (f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, shared with other work while measured: "
         f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after, so expect "
         "run-to-run swings of tens of percent"),
        f"- threads: {a.threads} for both torch and onnxruntime",
        (f"- versions: torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
         f"python {platform.python_version()}"),
        f"- command: `python benchmarks/onnx_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        ("- one exported file per model (dynamic T); medians of "
         f"{a.repeats} runs (T <= 512) or {max(3, a.repeats // 2)} runs (larger T), after one warm-up"),
        "",
        "| model | T | torch eager (ms) | onnxruntime (ms) | eager / onnxruntime | max rel. error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, T, te, to, err, _ in rows:
        lines.append(f"| {name} | {T} | {te * 1e3:.1f} | {to * 1e3:.1f} | {te / to:.2f}x | {err:.1e} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
