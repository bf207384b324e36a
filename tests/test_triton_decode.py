"""The split-K decode kernels (backends/triton/decode.py): under Triton's interpreter against torch,
with every cache slot past t poisoned, and compiled ahead of time for sm_90 (no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import triton_env

triton_env.require_interpreter()

from sessa_compiler.backends.triton.decode import attention_decode, chunk_for, feedback_decode  # noqa: E402
from sessa_compiler.tolerance import TOLERANCE, relative_error  # noqa: E402


@pytest.mark.parametrize("B, W, L, t, dtype", [
    (2, 32, 200, 130, torch.float32),     # several chunks, the last one partial
    (1, 48, 70, 1, torch.float32),        # one cached position; W not a power of two
    (3, 32, 300, 257, torch.bfloat16),    # bf16 keys, fp32 states
    (1, 16, 64, 64, torch.float32),       # t exactly a multiple of the chunk
    (2, 160, 2200, 2100, torch.float32),  # 66 chunks: two combine steps of 64; two column blocks of 128
])
def test_feedback_decode_matches_torch(B, W, L, t, dtype):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(B, W, generator=g)
    kb = torch.full((B, L, W), float("nan")).to(dtype)
    s = torch.full((B, L, W), float("nan"))
    kb[:, :t] = torch.randn(B, t, W, generator=g).to(dtype)
    s[:, :t] = torch.randn(B, t, W, generator=g)
    out = feedback_decode(q, kb, s, t, W ** -0.5)
    logits = (q[:, None, :].double() @ kb[:, :t].double().transpose(1, 2)) * W ** -0.5
    ref = torch.softmax(logits, -1) @ s[:, :t].double()
    assert relative_error(out, ref[:, 0]) <= TOLERANCE[torch.float32]
    assert chunk_for(W) >= 16


@pytest.mark.parametrize("B, H, Hkv, D, L, t, dtype", [
    (2, 4, 2, 8, 100, 70, torch.float32),     # GQA, several chunks, the last one partial
    (1, 3, 1, 12, 20, 1, torch.float32),      # one cached position; group of 3 and d = 12 (not powers of two)
    (1, 8, 8, 16, 200, 129, torch.bfloat16),  # no GQA, bf16 caches
    (1, 2, 1, 16, 4300, 4200, torch.float32),  # 66 chunks: two combine steps of 64
])
def test_attention_decode_matches_torch(B, H, Hkv, D, L, t, dtype):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(B, H, D, generator=g)
    k = torch.full((B, Hkv, L, D), float("nan")).to(dtype)
    v = torch.full((B, Hkv, L, D), float("nan")).to(dtype)
    k[:, :, :t] = torch.randn(B, Hkv, t, D, generator=g).to(dtype)
    v[:, :, :t] = torch.randn(B, Hkv, t, D, generator=g).to(dtype)
    out = attention_decode(q, k, v, t, D ** -0.5)
    kr = k[:, :, :t].double().repeat_interleave(H // Hkv, 1)
    vr = v[:, :, :t].double().repeat_interleave(H // Hkv, 1)
    ref = torch.softmax((q[:, :, None, :].double() @ kr.transpose(-1, -2)) * D ** -0.5, -1) @ vr
    assert relative_error(out, ref[:, :, 0]) <= TOLERANCE[torch.float32]


def test_feedback_decode_rejects_bad_lengths():
    q, c = torch.randn(1, 16), torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="t=9"):
        feedback_decode(q, c, c, 9, 0.25)
    with pytest.raises(ValueError, match="t=0"):
        feedback_decode(q, c, c, 0, 0.25)


def test_feedback_decode_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "sessa_compiler.backends.triton.decode"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in records} == {"feedback_decode_partial", "feedback_decode_combine",
                                              "attention_decode_partial", "attention_decode_combine",
                                              "attention_decode_write"}
    assert len(records) == 12 and all(r["cubin_bytes"] > 0 for r in records)   # the step forms' variants too


def _rope_ref(x: torch.Tensor, t: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE of x [..., d] at position t, in float64."""
    ang = t * inv_freq.double()
    xe, xo = x[..., 0::2].double(), x[..., 1::2].double()
    return torch.stack((xe * ang.cos() - xo * ang.sin(), xe * ang.sin() + xo * ang.cos()), -1).flatten(-2)


@pytest.mark.parametrize("B, H, Hkv, D, L, t, rope, cache_dtype, masked", [
    (2, 4, 2, 8, 100, 70, True, torch.float32, False),     # GQA, RoPE, several chunks
    (1, 3, 1, 12, 20, 0, True, torch.float32, False),      # t = 0: the new position alone; group of 3, d = 12
    (1, 2, 2, 7, 40, 39, False, torch.float32, False),     # odd width (no RoPE), the last slot of the cache
    (2, 8, 8, 16, 200, 129, True, torch.bfloat16, False),  # bf16 caches and inputs
    (3, 4, 2, 16, 90, 64, True, torch.float32, True),      # key-padding mask (a row with no real key), chunk edge
])
def test_attention_decode_step_rotates_writes_and_attends(B, H, Hkv, D, L, t, rope, cache_dtype, masked):
    """attention_decode_step at the position held by an int32 tensor, against float64 torch: q and k rotated
    at t, k and v (and the mask flag) written to slot t, the other slots left as they were (poisoned past t),
    the output over positions 0..t in the asked dtype."""
    from sessa_compiler.backends.triton.decode import attention_decode_step

    g = torch.Generator().manual_seed(t + D)
    dt = cache_dtype
    q, k, v = (torch.randn(B, n, D, generator=g).to(dt) for n in (H, Hkv, Hkv))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D // 2) * 2.0 / D)) if rope else None
    K = torch.full((B, Hkv, L, D), float("nan")).to(dt)
    V = torch.full((B, Hkv, L, D), float("nan")).to(dt)
    K[:, :, :t] = torch.randn(B, Hkv, t, D, generator=g).to(dt)
    V[:, :, :t] = torch.randn(B, Hkv, t, D, generator=g).to(dt)
    K0, V0 = K.clone(), V.clone()
    keep = keep_new = None
    if masked:
        keep = torch.rand(B, L, generator=g) > 0.3
        keep[0, :t] = False                   # row 0: no real key cached
        keep_new = torch.tensor([False] + [True] * (B - 1))
        keep0 = keep.clone()
    out = attention_decode_step(q, k, v, inv_freq, K, V, torch.tensor([t], dtype=torch.int32), D ** -0.5,
                                keep=keep, keep_new=keep_new, out_dtype=dt)
    assert out.dtype == dt and out.shape == (B, H, D)
    kt = _rope_ref(k, t, inv_freq) if rope else k.double()
    qt = _rope_ref(q, t, inv_freq) if rope else q.double()
    tol = TOLERANCE[torch.bfloat16 if dt == torch.bfloat16 else torch.float32]
    assert relative_error(K[:, :, t], kt) <= tol and torch.equal(V[:, :, t], v)
    others = [i for i in range(L) if i != t]
    assert torch.equal(K[:, :, others].isnan(), K0[:, :, others].isnan())
    assert torch.equal(K[:, :, :t], K0[:, :, :t]) and torch.equal(V[:, :, :t], V0[:, :, :t])
    keys = torch.cat([K0[:, :, :t].double(), kt[:, :, None]], 2).repeat_interleave(H // Hkv, 1)
    vals = torch.cat([V0[:, :, :t].double(), v.double()[:, :, None]], 2).repeat_interleave(H // Hkv, 1)
    logits = (qt[:, :, None, :] @ keys.transpose(-1, -2)) * D ** -0.5               # [B, H, 1, t + 1]
    if masked:
        assert torch.equal(keep[:, t], keep_new) and torch.equal(keep[:, others], keep0[:, others])
        seen = keep[:, None, None, :t + 1]
        logits = logits.masked_fill(~seen, -1e30)   # a row with no real key: the mean of v (empty_rows="mean")
    ref = (torch.softmax(logits, -1) @ vals)[:, :, 0]
    assert relative_error(out, ref) <= tol


@pytest.mark.parametrize("B, W, L, t, dtype", [
    (2, 32, 200, 130, torch.float32),   # several chunks
    (1, 48, 70, 0, torch.float32),      # t = 0: s = f
    (3, 40, 300, 257, torch.bfloat16),  # bf16 inputs and keys, fp32 states; W not a power of two
    (1, 16, 65, 64, torch.float32),     # t at a chunk edge, the last slot
])
def test_feedback_decode_step_writes_the_key_and_the_state(B, W, L, t, dtype):
    """feedback_decode_step at the position held by an int32 tensor: k_b written to slot t, s = f + gamma *
    mixed to the states' slot t and returned in f's dtype, other slots untouched; against float64 torch."""
    from sessa_compiler.backends.triton.decode import feedback_decode_step

    g = torch.Generator().manual_seed(t + W)
    f, q, kn = (torch.randn(B, W, generator=g).to(dtype) for _ in range(3))
    gamma = (torch.rand(B, generator=g) * 2 - 1).to(dtype)
    KB = torch.full((B, L, W), float("nan")).to(dtype)
    S = torch.full((B, L, W), float("nan"))
    KB[:, :t] = torch.randn(B, t, W, generator=g).to(dtype)
    S[:, :t] = torch.randn(B, t, W, generator=g)
    KB0, S0 = KB.clone(), S.clone()
    out = feedback_decode_step(f, q, kn, gamma, KB, S, torch.tensor([t], dtype=torch.int32), W ** -0.5)
    mixed = torch.zeros(B, W, dtype=torch.float64)
    if t:
        logits = (q[:, None, :].double() @ KB0[:, :t].double().transpose(1, 2)) * W ** -0.5
        mixed = (torch.softmax(logits, -1) @ S0[:, :t].double())[:, 0]
    ref = f.double() + gamma.double()[:, None] * mixed
    tol = TOLERANCE[torch.bfloat16 if dtype == torch.bfloat16 else torch.float32]
    assert out.dtype == dtype and relative_error(out, ref) <= tol
    assert torch.equal(KB[:, t], kn) and relative_error(S[:, t], ref) <= TOLERANCE[torch.float32]
    others = [i for i in range(L) if i != t]
    assert torch.equal(KB[:, others].isnan(), KB0[:, others].isnan()) and torch.equal(KB[:, :t], KB0[:, :t])
    assert torch.equal(S[:, others].isnan(), S0[:, others].isnan()) and torch.equal(S[:, :t], S0[:, :t])


def test_decode_steps_through_the_kernels_equal_the_forward(monkeypatch):
    """The compiled decode_step with both kernels in its path (as on CUDA), against the full forward."""
    import sessa_compiler as sc
    import sessa_compiler.serving as serving
    from model_helpers import randomize
    from sessa_compiler.models import SessaLayer

    monkeypatch.setattr(serving, "TRITON_DECODE_ON_CPU", True)
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=6)
    c = sc.compile(model, backend="eager")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x)
    cache = c.init_cache(2, max_len=9)
    outs = [c.prefill(x[:, :3], cache)[0]] + [c.decode_step(x[:, t:t + 1], cache)[0] for t in range(3, 9)]
    assert relative_error(torch.cat(outs, dim=1), full) <= TOLERANCE[torch.float32]


def test_device_position_matches_and_launches_do_not_depend_on_it(monkeypatch):
    """A position given as an int32 tensor: the kernels read it, the grid covers the cache capacity, so the
    launches (kernel, grid, non-tensor arguments) are the same at every position (CUDA-graph capturable);
    results match torch at t = 0 (zero), 1, a chunk boundary and the capacity, with slots past t poisoned."""
    import triton.runtime.interpreter as interpreter

    launches = []
    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
        launches.append((self.fn.__name__, tuple(grid), scalars, tuple(sorted(kwargs.items()))))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    B, W, L, H, Hkv, D = 2, 32, 150, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    plans = []
    for t in (0, 1, chunk_for(W), L):
        q = torch.randn(B, W, generator=g)
        kb, s = torch.full((B, L, W), float("nan")), torch.full((B, L, W), float("nan"))
        kb[:, :t], s[:, :t] = torch.randn(B, t, W, generator=g), torch.randn(B, t, W, generator=g)
        qa = torch.randn(B, H, D, generator=g)
        k, v = torch.full((B, Hkv, L, D), float("nan")), torch.full((B, Hkv, L, D), float("nan"))
        k[:, :, :t], v[:, :, :t] = torch.randn(B, Hkv, t, D, generator=g), torch.randn(B, Hkv, t, D, generator=g)
        pos = torch.tensor([t], dtype=torch.int32)
        launches.clear()
        out = feedback_decode(q, kb, s, pos, W ** -0.5)
        att = attention_decode(qa, k, v, pos, D ** -0.5)
        plans.append(list(launches))
        if t == 0:
            assert (out == 0).all() and (att == 0).all()
            continue
        logits = (q[:, None, :].double() @ kb[:, :t].double().transpose(1, 2)) * W ** -0.5
        assert relative_error(out, (torch.softmax(logits, -1) @ s[:, :t].double())[:, 0]) <= TOLERANCE[torch.float32]
        kr = k[:, :, :t].double().repeat_interleave(H // Hkv, 1)
        vr = v[:, :, :t].double().repeat_interleave(H // Hkv, 1)
        ref = torch.softmax((qa[:, :, None, :].double() @ kr.transpose(-1, -2)) * D ** -0.5, -1) @ vr
        assert relative_error(att, ref[:, :, 0]) <= TOLERANCE[torch.float32]
    assert len(plans[0]) == 4 and all(p == plans[0] for p in plans), plans
    with pytest.raises(ValueError, match="int32"):
        feedback_decode(q, kb, s, torch.tensor([3]), 0.25)


SYNCING = {"item", "_local_scalar_dense", "nonzero", "tolist", "is_nonzero", "equal", "allclose"}


def test_decode_step_plan_is_capture_safe(monkeypatch):
    """The compiled decode_step on the Triton decode path (as on CUDA) at two different positions issues the
    same plan: the same Triton launches with the same grids and non-tensor arguments, the same torch ops with the
    same non-tensor arguments, none synchronising; the position lives in cache["_pos"] (int32, on the device),
    advanced by the step. So one step recorded into a CUDA graph replays at the next position."""
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    import sessa_compiler as sc
    import sessa_compiler.serving as serving
    from model_helpers import randomize
    from sessa_compiler.models import SessaLayer

    monkeypatch.setattr(serving, "TRITON_DECODE_ON_CPU", True)
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=6)
    c = sc.compile(model, backend="eager")
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x)
    cache = c.init_cache(2, max_len=8)
    outs = [c.prefill(x[:, :3], cache)[0]]
    plan, inside = [], {"launch": False}

    def scalar(a):
        return a if isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device)) else type(a).__name__

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside["launch"]:
                flat = [scalar(a) for a in list(args) + list((kwargs or {}).values())
                        if not isinstance(a, torch.Tensor)]
                plan.append(("op", func.overloadpacket.__name__, repr(flat)))
            return func(*args, **(kwargs or {}))

    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        plan.append(("launch", self.fn.__name__, tuple(grid), tuple(a for a in args if not isinstance(a, torch.Tensor)),
                     tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))))
        inside["launch"] = True
        try:
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            inside["launch"] = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    plans = []
    with torch.no_grad():
        for t in range(3, 8):
            xt = x[:, t:t + 1].contiguous()
            plan.clear()
            with Rec():
                outs.append(c.decode_step(xt, cache)[0])
            plans.append(list(plan))
            assert int(cache["_pos"]) == t + 1 == cache["t"]
    assert relative_error(torch.cat(outs, dim=1), full) <= TOLERANCE[torch.float32]
    launches = [p for p in plans[1] if p[0] == "launch"]
    assert {p[1] for p in launches} == {"feedback_decode_partial", "feedback_decode_combine", "attention_decode_write",
                                        "attention_decode_partial", "attention_decode_combine"}
    # RoPE, the cache writes and the feedback's s = f + gamma * mixed are inside those launches, not torch ops
    assert not [p for p in plans[1] if p[0] == "op" and p[1] in ("index_copy_", "complex", "cos", "sin")], plans[1]
    for p in plans[2:]:
        assert p == plans[1]
    assert not [p for p in plans[1] if p[0] == "op" and p[1] in SYNCING]


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: ``work`` (set by the test) is what the recorded launches do."""

    def __init__(self):
        self.work = None

    def replay(self):
        self.work()


class _FakeCapture:
    """Stands in for torch.cuda.graph: runs the code (it has to, on CPU) but, as a capture, leaves no effect on
    the tensors in ``protect`` (the cache), which are restored on exit."""
    protect: dict = {}

    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        self.saved = {k: v.clone() for k, v in self.protect.items() if isinstance(v, torch.Tensor)}

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            self.protect[k].copy_(v)
        return False


def test_decode_step_records_once_and_replays_at_later_positions(monkeypatch):
    """decode_step through DecodeGraphs with stand-ins for the CUDA graph API (CPU tensors, Triton decode path):
    the first step runs eagerly, the second is recorded (host position put back) and replayed, later steps only
    replay; every output equals the full forward and the cache's positions advance (host and device)."""
    import sessa_compiler as sc
    import sessa_compiler.serving as serving
    from model_helpers import randomize
    from sessa_compiler.models import SessaLayer

    monkeypatch.setattr(serving, "TRITON_DECODE_ON_CPU", True)
    monkeypatch.setattr(serving, "decode_graphable", lambda xs, cache: xs[0].shape[1] == 1 and
                        cache.get("max_len") is not None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    runs = []
    real_run = serving.ServingProgram.run

    def counted(self, inputs, cache, params=None):
        runs.append(int(cache["t"]))
        return real_run(self, inputs, cache, params)

    monkeypatch.setattr(serving.ServingProgram, "run", counted)
    real_record = serving.DecodeGraphs._record

    def record(self, rec, xs, cache):
        real_record(self, rec, xs, cache)

        def work():   # the recorded step on the device: the cache's tensors and the static outputs, not cache["t"]
            t = cache["t"], cache["_pos_t"]
            outs = real_run(self.prog, rec["inputs"], cache)
            for o, n in zip(rec["outputs"], outs):
                o.copy_(n)
            cache["t"], cache["_pos_t"] = t
        rec["graph"].work = work

    monkeypatch.setattr(serving.DecodeGraphs, "_record", record)
    made = []
    real_init = serving.DecodeGraphs.__init__
    monkeypatch.setattr(serving.DecodeGraphs, "__init__", lambda self, prog: real_init(self, prog) or made.append(self))
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=6)
    c = sc.compile(model, backend="eager")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x)
        cache = c.init_cache(2, max_len=9)
        _FakeCapture.protect = cache
        outs = [c.prefill(x[:, :3], cache)[0]]
        runs.clear()
        for t in range(3, 9):
            outs.append(c.decode_step(x[:, t:t + 1].contiguous(), cache)[0])
            assert cache["t"] == t + 1 and int(cache["_pos"]) == t + 1
    assert relative_error(torch.cat(outs, dim=1), full) <= TOLERANCE[torch.float32]
    assert runs == [3, 4], runs   # the eager step and the capture; the rest are replays
    assert len(made) == 1 and made[0].captures == 1 and made[0].replays == 5
