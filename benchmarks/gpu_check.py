"""One-shot GPU check of the Triton backend: correctness at realistic sizes, then timings.

    python benchmarks/gpu_check.py [--out benchmarks/results_gpu.md] [--quick]

Sections: device peak, correctness (layer, feedback op), layer forward timings, a training step (forward +
backward) against eager SDPA/flash and torch.compile of it, the feedback op (and fla's DeltaFormer, forward
and forward + backward), decode.
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.md   # CPU, interpreter, tiny sizes: the script's flow

Written for an NVIDIA H200 machine with Python 3.12, torch 2.11, triton 3.6 and numpy, and nothing
else: no network, no tvm, onnx, platformdirs or tqdm (tests/test_triton_minimal_env.py proves that
`sessa_compiler` and its Triton path need only torch, triton and numpy). Budget: 7 minutes in all;
the results table is rewritten after every row, so a run stopped at a time limit keeps what it did.
Every section is guarded: a failure is recorded in the table and the script goes on.

fla's DeltaFormer is compared when `fla` imports, or from wheels placed in benchmarks/wheels/
(git-ignored; on a machine with network: `pip download fla-core einops --no-deps -d benchmarks/wheels`).
A pure-Python wheel is importable straight from the .whl file.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import importlib.util
import math
import os
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMOKE = "--smoke" in sys.argv   # tests/test_triton_minimal_env.py: every section on CPU at tiny sizes
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton is first imported
WHEELS = os.path.join(ROOT, "benchmarks", "wheels")
for whl in sorted(glob.glob(os.path.join(WHEELS, "*.whl"))):
    sys.path.append(whl)

import torch
import torch.nn.functional as F

DEVICE = "cpu" if SMOKE else "cuda"
ROWS: list = []
START = time.perf_counter()
BUDGET_S = 6.5 * 60   # the rows started before this; the whole script stays under 7 minutes
OUT_PATH = os.path.join(ROOT, "benchmarks", "results_gpu.md")


def row(section, what, value, note=""):
    ROWS.append((section, what, value, note))
    print(f"[{time.perf_counter() - START:6.1f}s] {section} | {what} | {value} | {note}", flush=True)
    write_table(OUT_PATH)   # after every row: a run stopped at the time limit keeps what it measured


def out_of_time() -> bool:
    return time.perf_counter() - START > BUDGET_S


def bench(fn, reps=10, warmup=2) -> float:
    """Median seconds per call over ``reps`` calls timed one by one with CUDA events."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":   # smoke run: one call, host clock
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def graph_replay_seconds(fn, reps=5):
    """Median seconds of ``fn`` captured once in a CUDA graph and replayed: the kernels without Python's
    launch overhead (the two-level feedback solve launches 3 kernels per outer chunk of 256 rows).
    None on CPU or when capture fails (the failure is printed)."""
    if DEVICE != "cuda":
        return None
    try:
        fn()   # compiled and allocated before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay, reps=reps, warmup=1)
    except Exception as e:  # noqa: BLE001 - report, keep the eager-launch number
        print(f"CUDA graph capture failed: {type(e).__name__}: {e}", flush=True)
        return None


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


def load_fla_solve():
    """fla's DeltaFormer forward solve u = (I + diag(beta) softmax_strict(q k^T / sqrt(d)))^-1 v, per head.

    -> (callable(q, k, v, beta) on [B, T, H, d] / [B, T, H], description). Only the op module is
    imported: ``fla/__init__`` and ``fla/ops/__init__`` import every other op, and ``fla.layers``
    needs transformers, so the packages are entered as bare namespaces and ``fla.layers.utils``
    (varlen padding helpers, unused for dense inputs) is a stub when it does not import.
    Tries the entry points of the fla-core releases we know of (0.5.x/0.6.x ``parallel``; older
    ``fused_chunk.delta_pre_attn``).
    """
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla is not installed and no fla-core wheel is in benchmarks/wheels/")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("fla", root), ("fla.ops", os.path.join(root, "ops")),
                       ("fla.ops.deltaformer", os.path.join(root, "ops", "deltaformer"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
    try:
        importlib.import_module("fla.layers.utils")
    except Exception:  # noqa: BLE001 - transformers or flash-attn missing: a stub is enough for dense inputs
        for name in ("fla.layers", "fla.layers.utils"):
            stub = types.ModuleType(name)
            stub.__path__ = []
            stub.pad_input = stub.unpad_input = None
            sys.modules[name] = stub
    version = getattr(sys.modules.get("fla"), "__version__", None) or os.path.basename(os.path.dirname(root))
    version = version.split("-py")[0]
    errors = []
    try:
        par = importlib.import_module("fla.ops.deltaformer.parallel")
        fn = par.ParallelDeltaformerFunction
        impl = getattr(fn, "_forward_impl", None)

        def solve(q, k, v, beta):
            C = min(par.BLOCK_SIZE_C, q.shape[1])
            if impl is None:   # releases without the split-out forward: the autograd function, no grad
                with torch.no_grad():
                    return fn.apply(q, k, v, beta, C)
            return impl(q, k, v, beta, C, need_aux=False)[0]

        return solve, f"fla ({version}) deltaformer.parallel forward (chunks of {par.BLOCK_SIZE_C})"
    except (ImportError, AttributeError) as e:
        errors.append(f"parallel: {type(e).__name__}: {e}")
    try:
        fc = importlib.import_module("fla.ops.deltaformer.fused_chunk")
        return (lambda q, k, v, beta: fc.delta_pre_attn(q, k, v, beta)), f"fla ({version}) fused_chunk.delta_pre_attn"
    except (ImportError, AttributeError) as e:
        errors.append(f"fused_chunk: {type(e).__name__}: {e}")
    raise ImportError("no DeltaFormer forward found in fla (" + "; ".join(errors) + ")")


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
    return SessaLayer(D, n_heads=H).to(DEVICE, dtype).eval()


@guarded("correctness")
def correctness_layer(D, H, T):
    import sessa_compiler as sc
    from sessa_compiler.api import relative_error

    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 3e-2)):
        m = make_layer(D, H, dtype)
        x = torch.randn(2, T, D, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            out = sc.compile(m, backend="triton")(x)
            ref = m.double()(x.double())
        err = relative_error(out, ref)
        row("correctness", f"SessaLayer {dtype} B=2 T={T} D={D} H={H}", f"{err:.2e}", "PASS" if err <= tol else f"FAIL (> {tol})")


def feedback_kernels(D, dtype_name, one_pass=True):
    """The feedback op alone through the Triton pipeline (chunking by its cost model): the one-pass forward
    (feedback_online.py), or with ``one_pass=False`` the lse-first kernels (lse pass, inverse pass, solve)."""
    from sessa_compiler.backends.triton.backend import TritonBackend
    from sessa_compiler.ir import parse

    g = parse(f"""graph fb(%f: {dtype_name}[B, T, {D}], %q: {dtype_name}[B, T, {D}], %k: {dtype_name}[B, T, {D}], %g: {dtype_name}[B, T]) {{
  %s: {dtype_name}[B, T, {D}] = feedback(%f, %q, %k, %g) {{scale={D ** -0.5}}}
  return %s
}}""")
    # compiled for CUDA tensors, interpreted for CPU ones (--smoke)
    return TritonBackend(feedback_one_pass=one_pass).build_program(g)


def feedback_inputs(B, T, D, dtype):
    f, q, k = (torch.randn(B, T, D, device=DEVICE, dtype=dtype) for _ in range(3))
    gamma = (0.999 * torch.tanh(torch.randn(B, T, device=DEVICE) * 3)).to(dtype)
    return [f, q, k, gamma]


@guarded("correctness")
def correctness_feedback(D, T):
    from sessa_compiler.api import relative_error
    from sessa_compiler.semantics import feedback_ref

    from sessa_compiler.backends.triton.ops import feedback_forward
    from sessa_compiler.semantics.chunked import feedback_lse

    for dtype, name, tol in ((torch.float32, "f32", 1e-3), (torch.bfloat16, "bf16", 3e-2)):
        inputs = feedback_inputs(1, T, D, dtype)
        ref = feedback_ref(*[t.double() for t in inputs], D ** -0.5)
        for one_pass, label in ((True, "one pass"), (False, "lse-first fallback")):
            out = feedback_kernels(D, name, one_pass).run(inputs, {})[0]
            err = relative_error(out, ref)
            row("correctness", f"feedback op {name} B=1 T={T} D={D} ({label})", f"{err:.2e}",
                "PASS" if err <= tol else f"FAIL (> {tol})")
        # the one-pass forward's row log-sum-exps (saved for the backward) against float64
        _, lse = feedback_forward(*inputs, D ** -0.5)
        lse_ref = feedback_lse(inputs[1].double(), inputs[2].double(), scale=D ** -0.5)
        lse_err = (lse.double() - lse_ref).abs().max().item()
        lse_tol = 1e-3 if name == "f32" else 2e-2
        row("correctness", f"feedback one-pass lse {name} B=1 T={T} D={D} (max abs)", f"{lse_err:.2e}",
            "PASS" if lse_err <= lse_tol else f"FAIL (> {lse_tol})")


@guarded("layer")
def time_layer(T, B=4, D=1024, H=8, peak=None):
    import sessa_compiler as sc

    m = make_layer(D, H, torch.bfloat16)
    x = torch.randn(B, T, D, device=DEVICE, dtype=torch.bfloat16)
    flops = tflops_layer(B, T, D, H)
    with torch.no_grad():
        ours = sc.compile(m, backend="triton")
        t_ours = bench(lambda: ours(x), reps=5)
        row("layer", f"ours (triton) B={B} T={T}", f"{t_ours * 1e3:.2f} ms",
            f"{flops / t_ours / 1e12:.0f} TFLOP/s" + (f" = {flops / t_ours / peak:.0%} of peak" if peak else ""))
        plain = sc.compile(m, backend="triton", options={"cuda_graphs": False})
        t_plain = bench(lambda: plain(x), reps=5)
        row("layer", f"ours (triton), cuda_graphs=False (every launch from Python) B={B} T={T}",
            f"{t_plain * 1e3:.2f} ms", f"the default (second call records a CUDA graph) x{t_plain / t_ours:.2f}")
        t_graph = graph_replay_seconds(lambda: ours(x))
        if t_graph:
            row("layer", f"ours (triton), CUDA graph replay B={B} T={T}", f"{t_graph * 1e3:.2f} ms",
                f"{flops / t_graph / 1e12:.0f} TFLOP/s" + (f" = {flops / t_graph / peak:.0%} of peak" if peak else ""))
        t_a = bench(lambda: good_eager_layer(m, x), reps=3)
        row("layer", f"(a) eager SDPA + solve_triangular T={T}", f"{t_a * 1e3:.2f} ms", f"ours x{t_a / t_ours:.2f}")
        if SMOKE:
            row("layer", f"(b) torch.compile of (a) T={T}", "not run", "smoke run (compiling takes minutes on CPU)")
        else:
            compiled = torch.compile(lambda inp: good_eager_layer(m, inp))
            t_b = bench(lambda: compiled(x), reps=3)
            row("layer", f"(b) torch.compile of (a) T={T}", f"{t_b * 1e3:.2f} ms", f"ours x{t_b / t_ours:.2f} (target >= 3)")
        t_c = bench(lambda: m(x), reps=2, warmup=1)
        row("layer", f"(c) reference (einsum-style) T={T}", f"{t_c * 1e3:.2f} ms", f"ours x{t_c / t_ours:.2f} (target >= 4)")


def _train_step(fn, params):
    """One training step of fn (forward, loss = mean of squares in fp32, backward), grads cleared after."""
    def step():
        loss = fn().float().square().mean()
        loss.backward()
        for p in params:
            p.grad = None
    return step


def _peak_extra_bytes(step) -> int:
    if DEVICE != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@guarded("train")
def time_train(T, B=4, D=1024, H=8, with_compile=True):
    """A training step (forward + backward, bf16 weights and activations) of the compiled layer (Triton
    forward and backward kernels) against (a) eager SDPA (flash attention's backward) + solve_triangular,
    (b) torch.compile of (a), and (c) the uncompiled layer; peak extra memory of each step beside."""
    import sessa_compiler as sc
    from sessa_compiler.api import relative_error

    m = make_layer(D, H, torch.bfloat16).train()
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(B, T, D, device=DEVICE, dtype=torch.bfloat16)
    ours = sc.compile(m, backend="triton")
    # gradients first: ours against the float64 module at a short length
    Tc = min(T, 256)
    xc = x[:1, :Tc].detach()
    ours(xc).float().square().mean().backward()
    got = [p.grad.double() for p in params]
    m64 = make_layer(D, H, torch.float64).train()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    m64(xc.double()).square().mean().backward()
    err = max(relative_error(g, p.grad) for g, p in zip(got, m64.parameters()))
    for p in params:
        p.grad = None
    row("train", f"grads, ours (triton) vs float64 module, B=1 T={Tc} D={D}", f"{err:.2e}",
        "PASS" if err <= 5e-2 else "FAIL (> 5e-2)")
    variants = {"ours (triton)": lambda: ours(x), "(a) eager SDPA + solve_triangular": lambda: good_eager_layer(m, x),
                "(c) uncompiled layer": lambda: m(x)}
    if with_compile and not SMOKE:
        compiled = torch.compile(lambda inp: good_eager_layer(m, inp))
        variants["(b) torch.compile of (a)"] = lambda: compiled(x)
    times = {}
    for name, fn in variants.items():
        if out_of_time():
            row("train", name, "skipped", "time budget spent")
            continue
        step = _train_step(fn, params)
        try:
            reps = 1 if SMOKE else 3 if name.startswith("(c)") else 5   # smoke: the flow, not a timing
            times[name] = bench(step, reps=reps, warmup=0 if SMOKE else 1)
            extra = _peak_extra_bytes(step)
        except torch.OutOfMemoryError:
            row("train", f"{name} B={B} T={T}", "out of memory", "")
            torch.cuda.empty_cache()
            continue
        note = "" if name.startswith("ours") else f"ours x{times[name] / times['ours (triton)']:.2f}"
        row("train", f"{name} fwd+bwd B={B} T={T} D={D} H={H}", f"{times[name] * 1e3:.2f} ms",
            "; ".join(x for x in (note, f"peak extra memory {extra / 2**30:.2f} GiB" if extra else "") if x))


@guarded("fla")
def compare_fla_train(T, B=4, H=8, d=128):
    """fla's DeltaFormer solve and our feedback op (sessa_compiler.library.feedback: Triton forward and
    backward) forward + backward on the same problem (B*H sequences of width d, bf16)."""
    import sessa_compiler.library as lib

    if FLA.get("solve") is None:
        return
    f, q, k, gamma = feedback_inputs(B * H, T, d, torch.bfloat16)
    heads = lambda x: x.view(B, H, T, *x.shape[2:]).transpose(1, 2).contiguous()  # noqa: E731
    leaves = [t.detach().requires_grad_(True) for t in (f, q, k, gamma)]
    theirs_in = [heads(t).detach().requires_grad_(True) for t in (q, k, f)] + [heads(-gamma).detach().requires_grad_(True)]
    ours = _train_step(lambda: lib.feedback(*leaves, d ** -0.5), leaves)
    theirs = _train_step(lambda: FLA["solve"](*theirs_in), theirs_in)
    t_ours = bench(ours, reps=3, warmup=1)
    try:
        t_fla = bench(theirs, reps=3, warmup=1)
    except Exception as e:  # noqa: BLE001 - an fla release without a backward for this entry point
        row("fla", f"fwd+bwd {FLA['what']}", "not run", f"{type(e).__name__}: {str(e)[:160]}")
        t_fla = None
    row("fla", f"ours fwd+bwd (library op) B*H={B * H} T={T} d={d}", f"{t_ours * 1e3:.2f} ms",
        f"fla / ours = x{t_fla / t_ours:.2f}" if t_fla else "")
    if t_fla:
        row("fla", f"fla fwd+bwd {FLA['what']} B={B} T={T} H={H} d={d}", f"{t_fla * 1e3:.2f} ms", "")


FEEDBACK_SECONDS: dict = {}   # (B, T) -> seconds per call of our feedback op at D=1024


def feedback_estimate(B, T):
    """Seconds for one call at (B, T), extrapolated from the longest measured T at the same B, else at
    a larger B (the chunked solve is sequential over T and does not get faster with a smaller batch:
    never divide by B). O(T^2) work: time scales with (T / T0)^2."""
    known = sorted((t_, s_) for (b_, t_), s_ in FEEDBACK_SECONDS.items() if b_ == B) or \
        sorted((t_, s_) for (b_, t_), s_ in FEEDBACK_SECONDS.items() if b_ >= B)
    if not known:
        return None
    t0, s0 = known[-1]
    return s0 * (T / t0) ** 2


@guarded("feedback")
def time_feedback(T, B, D=1024, peak=None):
    estimate = feedback_estimate(B, T)
    if estimate is not None:
        total = estimate * 3   # warmup + 2 timed calls
        if total > BUDGET_S - (time.perf_counter() - START):
            row("feedback", f"ours B={B} T={T} D={D}", "skipped",
                f"estimated {estimate:.1f} s per call from shorter runs: over the time budget")
            return
    prog = feedback_kernels(D, "bf16")
    inputs = feedback_inputs(B, T, D, torch.bfloat16)
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t = bench(lambda: prog.run(inputs, {}), reps=2 if T > 16384 else 5, warmup=1)
    extra = torch.cuda.max_memory_allocated() - base if cuda else 0
    FEEDBACK_SECONDS[(B, T)] = t
    useful = 2 * B * T * T * D * 2 / 2   # strictly causal logits and P s
    row("feedback", f"ours B={B} T={T} D={D}", f"{t * 1e3:.2f} ms",
        f"{useful / t / 1e12:.0f} TFLOP/s useful" + (f" = {useful / t / peak:.0%} of measured peak" if peak else "")
        + f"; extra memory {extra / 2**20:.0f} MiB = {extra / (B * T * D * 4):.1f} x B*T*D*4 bytes"
        + (f"; estimate was {estimate * 1e3:.0f} ms" if estimate else ""))
    if T <= 8192:
        t_graph = graph_replay_seconds(lambda: prog.run(inputs, {}), reps=3)
        if t_graph:
            row("feedback", f"ours, CUDA graph replay B={B} T={T} D={D}", f"{t_graph * 1e3:.2f} ms",
                f"{useful / t_graph / 1e12:.0f} TFLOP/s useful; launch overhead {max(0.0, t - t_graph) * 1e3:.2f} ms")
        old = feedback_kernels(D, "bf16", one_pass=False)
        t_old = bench(lambda: old.run(inputs, {}), reps=3, warmup=1)
        row("feedback", f"lse-first fallback B={B} T={T} D={D}", f"{t_old * 1e3:.2f} ms",
            f"one pass x{t_old / t:.2f} faster (static model at B=4 T=8192: 2.26 ms vs 3.67 ms)")


FLA: dict = {}


@guarded("fla")
def compare_fla(T, B=4, H=8, d=128):
    """fla's DeltaFormer solve and ours on the same problem: B x H heads of width d, bf16, beta = -gamma.

    Ours runs the heads as a batch of B*H sequences of width d (the same function), and also as one
    head of width H*d (the Sessa layer's shape, same FLOPs, one softmax instead of H).
    """
    if "solve" not in FLA:
        try:
            FLA["solve"], FLA["what"] = load_fla_solve()
        except Exception as e:  # noqa: BLE001
            FLA["solve"] = None
            row("fla", "DeltaFormer", "not run", f"{type(e).__name__}: {str(e)[:200]}")
    if FLA["solve"] is None:
        return
    from sessa_compiler.api import relative_error

    fla_solve = FLA["solve"]
    f, q, k, gamma = feedback_inputs(B * H, T, d, torch.bfloat16)
    heads = lambda x: x.view(B, H, T, *x.shape[2:]).transpose(1, 2).contiguous()  # noqa: E731
    fq, qq, kq, beta = heads(f), heads(q), heads(k), heads(-gamma)
    prog_d = feedback_kernels(d, "bf16")
    with torch.no_grad():
        ours = prog_d.run([f, q, k, gamma], {})[0]
        theirs = fla_solve(qq, kq, fq, beta)
    err = relative_error(heads(ours).float(), theirs.float())
    t_fla = bench(lambda: fla_solve(qq, kq, fq, beta), reps=3, warmup=1)
    row("fla", f"{FLA['what']} B={B} T={T} H={H} d={d}", f"{t_fla * 1e3:.2f} ms",
        f"max |ours - fla| / max |fla| = {err:.1e} (bf16 both)")
    t_heads = bench(lambda: prog_d.run([f, q, k, gamma], {}), reps=3, warmup=1)
    row("fla", f"ours, same heads (B*H={B * H} sequences of d={d}) T={T}", f"{t_heads * 1e3:.2f} ms",
        f"fla / ours = x{t_fla / t_heads:.2f} (target >= 1.5)")
    t_wide = FEEDBACK_SECONDS.get((B, T))
    if t_wide:
        row("fla", f"ours, one head of width {H * d} (Sessa) B={B} T={T}", f"{t_wide * 1e3:.2f} ms",
            f"fla / ours = x{t_fla / t_wide:.2f} (same FLOPs; target >= 1.5)")


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
    if device == "cuda":
        decode_graph_rows()


def decode_graph_rows(B=4, T=8192):
    """The decode step replayed as a CUDA graph (the default on CUDA with a fixed-capacity cache) against every
    launch from Python, at the static model's target (bf16 SessaLayer(1024, 8 heads), B=4, context 8192: its
    estimate is 250 us as a graph, 317 us from Python, floor 98 us), and the graphed steps against the forward."""
    import sessa_compiler as sc
    import sessa_compiler.serving as serving
    from sessa_compiler.api import relative_error
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(0)
    layer = SessaLayer(1024, n_heads=8).to(device="cuda", dtype=torch.bfloat16).eval()
    comp = sc.compile(layer, backend="triton")
    x = torch.randn(B, 40, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
        cache = comp.init_cache(B, device="cuda", max_len=40)
        ys = [comp.prefill(x[:, :8], cache)[0]] + [comp.decode_step(x[:, t:t + 1].contiguous(), cache)[0]
                                                        for t in range(8, 40)]
    err = relative_error(torch.cat(ys, dim=1), full)
    row("decode", f"bf16 D=1024 H=8 B={B}: prefill 8 + 32 decode steps (recorded, replayed) vs forward", f"{err:.2e}",
        "PASS" if err <= 3e-2 else "FAIL (> 3e-2)")
    cache = comp.init_cache(B, device="cuda", max_len=T + 1)
    for k, v in cache.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 3:
            v.normal_()
    x_t = torch.randn(B, 1024, device="cuda", dtype=torch.bfloat16)
    times = {}
    with torch.no_grad():
        for graphs in (True, False):
            serving.DECODE_CUDA_GRAPHS = graphs

            def step():
                comp.decode_step(x_t, cache)
                cache["t"] = T

            cache["t"] = T
            times[graphs] = _median_seconds(step, "cuda")
    serving.DECODE_CUDA_GRAPHS = True
    row("decode", f"bf16 D=1024 H=8 B={B} context {T}: decode_step as a CUDA graph", f"{times[True] * 1e6:.0f} us",
        f"every launch from Python {times[False] * 1e6:.0f} us (x{times[False] / times[True]:.2f}); static model "
        "250 us / 317 us, floor 98 us")


def measure_peak():
    n = 8192 if DEVICE == "cuda" else 256
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    t = bench(lambda: a @ b, reps=20)
    peak = 2 * n ** 3 / t
    row("device", f"measured bf16 matmul peak ({n}^3, random data)", f"{peak / 1e12:.3g} TFLOP/s",
        torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)")
    return peak


def write_table(path):
    import triton

    lines = [f"# GPU check of the Triton backend ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; torch {torch.__version__}; "
             f"triton {triton.__version__}; python {sys.version.split()[0]}; wall {time.perf_counter() - START:.0f} s "
             "so far; command: `python benchmarks/gpu_check.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
             + "`", "", "| section | what | value | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ROWS]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


SIZES = {   # the GPU check; the smoke run is the same flow at sizes the interpreter runs in seconds
    "gpu": {"fb": (1024, 4096), "layer_check": (1024, 8, 1024), "layer_T": (4096, 8192), "B": 4, "D": 1024, "H": 8,
            "fb_runs": ((4, 4096), (4, 8192), (1, 8192), (1, 32768), (1, 131072)), "fla": (8, 128)},
    "smoke": {"fb": (32, 70), "layer_check": (64, 2, 37), "layer_T": (40,), "B": 2, "D": 64, "H": 2,
              "fb_runs": ((2, 40), (1, 40), (1, 80)), "fla": (2, 16)},
}


def main():
    global OUT_PATH
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT_PATH)
    ap.add_argument("--quick", action="store_true", help="correctness and T=4096 only")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes: checks the script itself")
    args = ap.parse_args()
    OUT_PATH = args.out
    if not SMOKE:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; nothing to do (--smoke runs the flow on CPU)")
            return 2
        os.environ.pop("TRITON_INTERPRET", None)
    z = SIZES["smoke" if SMOKE else "gpu"]
    peak = measure_peak()
    correctness_feedback(*z["fb"])
    correctness_layer(*z["layer_check"])
    for T in z["layer_T"][:1] if args.quick else z["layer_T"]:
        time_layer(T, B=z["B"], D=z["D"], H=z["H"], peak=peak)
    time_train(z["layer_T"][0], B=z["B"], D=z["D"], H=z["H"], with_compile=not args.quick)
    runs = z["fb_runs"][:1] if args.quick else z["fb_runs"]
    for i, (B, T) in enumerate(runs):
        time_feedback(T, B, D=z["D"], peak=peak)
        if B == z["B"]:
            compare_fla(T, B=B, H=z["fla"][0], d=z["fla"][1])
            if i == 0:
                compare_fla_train(T, B=B, H=z["fla"][0], d=z["fla"][1])
    if SMOKE:   # the serving flow on CPU at tiny sizes (eager decode; the Triton decode kernels need CUDA)
        decode_rows(contexts=(64,), D=z["D"], H=z["H"], device=DEVICE, check_T=21)
    else:
        decode_rows(contexts=(32768,) if args.quick else (1024, 8192, 32768))
    print(f"wrote {OUT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
