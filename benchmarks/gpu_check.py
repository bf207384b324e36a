"""One-shot GPU check of the Triton backend: correctness at realistic sizes, then timings.

    python benchmarks/gpu_check.py [--out benchmarks/results_gpu.md] [--quick]

Written for an NVIDIA H200 (Python 3.12, torch 2.11, triton 3.6, no network); budget < 8 minutes.
NOT YET RUN ON A GPU: no GPU was available while it was written (see benchmarks/README_gpu.md).
Every section is guarded: a failure is recorded in the table and the script goes on.
fla's DeltaFormer is used when `fla` imports, or from a wheel put in benchmarks/wheels/ (a pure-Python
wheel is importable straight from the .whl file).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for whl in glob.glob(os.path.join(ROOT, "benchmarks", "wheels", "*.whl")):
    sys.path.append(whl)

import torch
import torch.nn.functional as F

ROWS: list = []
START = time.perf_counter()
BUDGET_S = 7 * 60


def row(section, what, value, note=""):
    ROWS.append((section, what, value, note))
    print(f"[{time.perf_counter() - START:6.1f}s] {section} | {what} | {value} | {note}", flush=True)


def out_of_time() -> bool:
    return time.perf_counter() - START > BUDGET_S


def bench(fn, reps=10, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def guarded(section):
    def deco(fn):
        def run(*a, **kw):
            if out_of_time():
                row(section, "skipped", "-", "time budget spent")
                return None
            try:
                return fn(*a, **kw)
            except Exception as e:  # record and go on
                row(section, "FAILED", type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "")
                traceback.print_exc()
                return None
        return run
    return deco


# -- baselines written the way a good engineer would ---------------------------------------------------
def rope(x, inv_freq):  # x [B, H, T, d], interleaved pairs, angles in fp32
    T = x.shape[2]
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    cos, sin = ang.cos(), ang.sin()
    xe, xo = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), -1).flatten(-2).to(x.dtype)


def good_eager_layer(m, x):
    """SDPA for the forward branch, one fp32 triangular solve for the feedback (T x T buffers)."""
    mx = m.mixer
    B, T, D = x.shape
    H, Hkv = mx.n_heads, mx.n_kv_heads
    d = D // H
    xn = F.layer_norm(x, (D,), m.ln.weight, m.ln.bias, m.ln.eps)
    a, g = m.W_in(xn).chunk(2, dim=-1)
    abar = F.gelu(a)
    q = mx.q_proj(abar).view(B, T, H, d).transpose(1, 2)
    k = mx.k_proj(abar).view(B, T, Hkv, d).transpose(1, 2)
    v = mx.v_proj(abar).view(B, T, Hkv, d).transpose(1, 2)
    if getattr(mx, "rope_inv_freq", None) is not None:
        q, k = rope(q, mx.rope_inv_freq), rope(k, mx.rope_inv_freq)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
    f = att.transpose(1, 2).reshape(B, T, D)
    if mx.out_proj is not None:
        f = mx.out_proj(f)
    qb, kb = mx.proj_fb(abar).chunk(2, dim=-1)
    gamma = mx.gamma_max * torch.tanh(mx.gamma_bias + mx.gamma_ctx(abar).squeeze(-1))
    logits = (qb @ kb.transpose(1, 2)).float() / math.sqrt(D)
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    logits = logits.masked_fill(~strict, float("-inf"))
    logits[:, 0, 0] = 0.0
    alpha = torch.softmax(logits, -1) * strict
    system = torch.eye(T, device=x.device) - gamma.float()[..., None] * alpha
    s = torch.linalg.solve_triangular(system, f.float(), upper=False, unitriangular=True).to(x.dtype)
    return x + m.W_out(s * g)


def tflops_layer(B, T, D, H):
    proj = 2 * B * T * D * D * (2 + 1 + 1 + 1 + 2 + 1 + 1)   # W_in, q, k, v, proj_fb, out_proj, W_out (Hkv=H)
    attn = 2 * B * H * T * T * (D // H) * 2 / 2               # causal QK^T and PV
    fb = 2 * B * T * T * D * 2 / 2                            # logits and P s, strictly causal
    return proj + attn + fb


# -- sections ---------------------------------------------------------------------------------------------
def make_layer(D, H, dtype):
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(0)
    return SessaLayer(D, n_heads=H).to("cuda", dtype).eval()


@guarded("correctness")
def correctness_layer(D=1024, H=8, T=1024):
    import sessa_compiler as sc
    from sessa_compiler.api import relative_error

    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 3e-2)):
        m = make_layer(D, H, dtype)
        x = torch.randn(2, T, D, device="cuda", dtype=dtype)
        with torch.no_grad():
            out = sc.compile(m, backend="triton")(x)
            ref = m.double()(x.double())
        err = relative_error(out, ref)
        row("correctness", f"SessaLayer {dtype} B=2 T={T} D={D} H={H}", f"{err:.2e}", "PASS" if err <= tol else f"FAIL (> {tol})")


def feedback_kernels(D, dtype_name, C=64):
    from sessa_compiler.backends.triton.backend import TritonProgram
    from sessa_compiler.ir import parse

    g = parse(f"""graph fb(%f: {dtype_name}[B, T, {D}], %q: {dtype_name}[B, T, {D}], %k: {dtype_name}[B, T, {D}], %g: {dtype_name}[B, T]) {{
  %lse: f32[B, T] = feedback_lse(%q, %k) {{scale={D ** -0.5}}}
  %dinv: f32[B, ceiling(T/{C}), {C}, {C}] = feedback_diag_inverse(%q, %k, %g, %lse) {{scale={D ** -0.5}, chunk_size={C}}}
  %s: {dtype_name}[B, T, {D}] = feedback_chunked(%f, %q, %k, %g, %lse, %dinv) {{scale={D ** -0.5}, chunk_size={C}}}
  return %s
}}""")
    return TritonProgram(g, None, interpret=False)


def feedback_inputs(B, T, D, dtype):
    f, q, k = (torch.randn(B, T, D, device="cuda", dtype=dtype) for _ in range(3))
    gamma = (0.999 * torch.tanh(torch.randn(B, T, device="cuda") * 3)).to(dtype)
    return [f, q, k, gamma]


@guarded("correctness")
def correctness_feedback(D=1024, T=4096):
    from sessa_compiler.api import relative_error
    from sessa_compiler.backends.reference import feedback_ref

    for dtype, name, tol in ((torch.float32, "f32", 1e-3), (torch.bfloat16, "bf16", 3e-2)):
        prog = feedback_kernels(D, name)
        inputs = feedback_inputs(1, T, D, dtype)
        out = prog.run(inputs, {})[0]
        ref = feedback_ref(*[t.double() for t in inputs], D ** -0.5)
        err = relative_error(out, ref)
        row("correctness", f"feedback op {name} B=1 T={T} D={D}", f"{err:.2e}", "PASS" if err <= tol else f"FAIL (> {tol})")


@guarded("layer")
def time_layer(T, B=4, D=1024, H=8, peak=None):
    import sessa_compiler as sc

    m = make_layer(D, H, torch.bfloat16)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    flops = tflops_layer(B, T, D, H)
    with torch.no_grad():
        ours = sc.compile(m, backend="triton")
        t_ours = bench(lambda: ours(x), reps=5)
        row("layer", f"ours (triton) B={B} T={T}", f"{t_ours * 1e3:.2f} ms",
            f"{flops / t_ours / 1e12:.0f} TFLOP/s" + (f" = {flops / t_ours / peak:.0%} of peak" if peak else ""))
        t_a = bench(lambda: good_eager_layer(m, x), reps=3)
        row("layer", f"(a) eager SDPA + solve_triangular T={T}", f"{t_a * 1e3:.2f} ms", f"ours x{t_a / t_ours:.2f}")
        compiled = torch.compile(lambda inp: good_eager_layer(m, inp))
        t_b = bench(lambda: compiled(x), reps=3)
        row("layer", f"(b) torch.compile of (a) T={T}", f"{t_b * 1e3:.2f} ms", f"ours x{t_b / t_ours:.2f} (target >= 3)")
        t_c = bench(lambda: m(x), reps=2, warmup=1)
        row("layer", f"(c) reference (einsum-style) T={T}", f"{t_c * 1e3:.2f} ms", f"ours x{t_c / t_ours:.2f} (target >= 4)")


FEEDBACK_SECONDS: dict = {}


@guarded("feedback")
def time_feedback(T, B, D=1024, fla=True, peak=None):
    known = [(t_, s_ / b_) for (b_, t_), s_ in FEEDBACK_SECONDS.items()]
    if known and T > max(known)[0]:
        t0, per_seq = max(known)
        estimate = per_seq * B * (T / t0) ** 2 * 4    # O(T^2) work; warmup + 3 runs
        if estimate > BUDGET_S - (time.perf_counter() - START):
            row("feedback", f"ours B={B} T={T} D={D}", "skipped", f"estimated {estimate:.0f} s from T={t0}: over the time budget")
            return
    prog = feedback_kernels(D, "bf16")
    inputs = feedback_inputs(B, T, D, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = bench(lambda: prog.run(inputs, {}), reps=3, warmup=1)
    extra = torch.cuda.max_memory_allocated() - base
    FEEDBACK_SECONDS[(B, T)] = t
    flops = 2 * B * T * T * D * (1 + 1) / 2 * (D // 64)   # logits recomputed per 64-column block of s, plus P s
    row("feedback", f"ours B={B} T={T} D={D}", f"{t * 1e3:.2f} ms",
        f"extra memory {extra / 2**20:.0f} MiB = {extra / (B * T * D * 4):.1f} x B*T*D*4 bytes; {flops / t / 1e12:.0f} TFLOP/s issued")
    if not fla:
        return
    try:
        from fla.ops.deltaformer import delta_pre_attn
    except Exception as e:
        row("feedback", f"fla DeltaFormer T={T}", "not run", f"fla not importable ({type(e).__name__}); put fla-core's wheel in benchmarks/wheels/")
        return
    f, q, k, gamma = inputs
    # fla solves (I + diag(beta) softmax_strict(q k^T / sqrt(D))) u = v: the same system with beta = -gamma
    q4, k4, v4, beta = q[:, :, None], k[:, :, None], f[:, :, None], (-gamma)[:, :, None]
    t_fla = bench(lambda: delta_pre_attn(q4, k4, v4, beta), reps=3, warmup=1)
    row("feedback", f"fla DeltaFormer B={B} T={T}", f"{t_fla * 1e3:.2f} ms", f"ours x{t_fla / t:.2f} (target >= 1.5)")


@guarded("device")
def _median_seconds(fn, device, reps=24, warmup=2) -> float:
    """Median wall time of fn() (synchronised per call on CUDA): per-token latency, not throughput."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@guarded("decode")
def decode_rows(contexts=(32768,), D=512, H=8, device="cuda", check_T=37):
    """Serving on the device: prefill (Triton forward kernels) + decode_step equal the full forward at every
    position; then per-token latency of the compiled decode_step against the model's eager decode_step at
    long context (caches filled with random contents), and the cache bytes read per second."""
    import sessa_compiler as sc
    from sessa_compiler.api import relative_error
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(0)
    m = SessaLayer(D, n_heads=H).to(device).eval()
    backend = "triton" if device == "cuda" else "eager"
    compiled = sc.compile(m, backend=backend)
    x = torch.randn(1, check_T, D, device=device)
    with torch.no_grad():
        full = m(x)
    cache = compiled.init_cache(1, device=device, max_len=check_T)
    y, cache = compiled.prefill(x[:, :16], cache)
    ys = [y] + [compiled.decode_step(x[:, t:t + 1], cache)[0] for t in range(16, check_T)]
    err = relative_error(torch.cat(ys, dim=1), full)
    row("decode", f"prefill 16 + decode to {check_T} vs forward (fp32)", f"{err:.2e}", "PASS" if err <= 5e-3 else "FAIL (> 5e-3)")
    x_t = torch.randn(1, D, device=device)
    for T in contexts:
        cc = compiled.init_cache(1, device=device, max_len=T + 1)
        ec = m.init_cache(1, device=device, max_len=T + 1)
        nbytes = 0
        for c in (cc, ec):
            for k, v in c.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 3:
                    v.normal_()
                    if c is cc:
                        nbytes += v.numel() * v.element_size()
        with torch.no_grad():
            def ours():
                compiled.decode_step(x_t, cc)
                cc["t"] = T

            def eager():
                m.decode_step(x_t, ec)
                ec["t"] = T

            cc["t"], ec["t"] = T, T
            t_ours, t_eager = _median_seconds(ours, device), _median_seconds(eager, device)
        row("decode", f"compiled decode_step, context {T}, B=1 D={D} H={H} fp32", f"{t_ours * 1e3:.3f} ms",
            f"{nbytes / t_ours / 1e9:.0f} GB/s of caches; model's eager decode_step {t_eager * 1e3:.3f} ms "
            f"(x{t_eager / t_ours:.2f}, target >= 3 against the public reference's)")


def measure_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ a, reps=20)
    peak = 2 * 8192 ** 3 / t
    row("device", "measured bf16 matmul peak (8192^3)", f"{peak / 1e12:.0f} TFLOP/s", torch.cuda.get_device_name())
    return peak


def write_table(path):
    import triton

    lines = [f"# GPU check of the Triton backend ({datetime.date.today().isoformat()})", "",
             f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; torch {torch.__version__}; "
             f"triton {triton.__version__}; python {sys.version.split()[0]}; wall {time.perf_counter() - START:.0f} s", "",
             "| section | what | value | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ROWS]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results_gpu.md"))
    ap.add_argument("--quick", action="store_true", help="correctness and T=4096 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do (the CPU tests run the kernels in the interpreter)")
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    peak = measure_peak()
    correctness_feedback()
    correctness_layer()
    for T in ((4096,) if args.quick else (4096, 8192)):
        time_layer(T, peak=peak)
    for B, T in ((4, 4096), (4, 8192)) + (() if args.quick else ((1, 65536), (1, 131072))):
        time_feedback(T, B, fla=T <= 8192, peak=peak)
    decode_rows(contexts=(32768,) if args.quick else (1024, 8192, 32768))
    write_table(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
