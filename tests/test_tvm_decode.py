"""The TVM split-K decode kernels (backends/tvm/decode.py, kernels/decode.py) against torch in float64, with every
cache slot that must not be read poisoned with NaN (and the output buffers' neighbours checked untouched), at
shapes straddling the kernels' block and chunk sizes; then compiled decode steps on the tvm backend against the
full forward at every position."""
import sys

import pytest
import torch

import sessa_compiler as sc
from model_helpers import randomize
from sessa_compiler.backends.tvm import decode as tvm_decode
from sessa_compiler.errors import InputError
from sessa_compiler.models import Decoder, SessaLayer
from sessa_compiler.serving import _rotate_at
from sessa_compiler.tolerance import TOLERANCE, relative_error

pytest.importorskip("tvm")

F32 = TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def kernels():
    return tvm_decode.DecodeKernels()


def _poisoned(shape, t, dtype, seq_dim, g):
    """Random rows before position t, NaN from t on (the kernel writes t and must read nothing after it)."""
    x = torch.full(shape, float("nan"))
    idx = [slice(None)] * len(shape)
    idx[seq_dim] = slice(0, t)
    x[tuple(idx)] = torch.randn(x[tuple(idx)].shape, generator=g)
    return x.to(dtype)


# parallel: the cache read over TVM's thread pool (long contexts) or on the calling thread (short ones)
@pytest.mark.parametrize("B, H, Hkv, d, L, t, rope, dtype, parallel", [
    (1, 8, 8, 64, 40, 0, True, torch.float32, True),        # context 1: only the new position
    (2, 4, 2, 24, 200, 130, True, torch.float32, False),    # GQA, head width not a power of two, last chunk partial
    (1, 1, 1, 10, 70, 67, False, torch.float32, True),      # H = 1, d = 10 (2 lanes), prime length, no RoPE
    (3, 6, 2, 16, 300, 256, True, torch.bfloat16, False),   # bf16 caches, t + 1 one past a multiple of the block
    (1, 2, 1, 64, 1100, 1024, True, torch.float32, True),   # MQA: one kv head, chunks do the splitting
    (2, 8, 4, 32, 40, 15, True, torch.bfloat16, True),      # t + 1 exactly one block
    (1, 2, 1, 64, 1100, 1024, True, torch.float32, False),
])
def test_attention_decode_matches_torch(kernels, B, H, Hkv, d, L, t, rope, dtype, parallel, monkeypatch):
    monkeypatch.setattr(tvm_decode, "SERIAL_BYTES", -1 if parallel else 1 << 62)
    g = torch.Generator().manual_seed(t + H)
    q = torch.randn(B, H, d, generator=g)
    k, v = torch.randn(B, Hkv, d, generator=g), torch.randn(B, Hkv, d, generator=g)
    inv = 10000.0 ** (-2.0 * torch.arange(d // 2) / d)
    K, V = _poisoned((B, Hkv, L, d), t, dtype, 2, g), _poisoned((B, Hkv, L, d), t, dtype, 2, g)
    past_K, past_V = K.clone(), V.clone()
    out = kernels.attention(q, k, v, inv if rope else None, K, V, t, d ** -0.5, rope)
    # reference: float64, on the cache contents the kernel had to write
    qr, kr = (_rotate_at(q[:, None].double(), inv, t)[:, 0], _rotate_at(k[:, None].double(), inv, t)[:, 0]) \
        if rope else (q.double(), k.double())
    keys = torch.cat([past_K[:, :, :t].double(), kr.to(dtype).double()[:, :, None]], dim=2)
    vals = torch.cat([past_V[:, :, :t].double(), v.to(dtype).double()[:, :, None]], dim=2)
    qg = qr.reshape(B, Hkv, H // Hkv, d)
    ref = (torch.softmax(qg @ keys.transpose(-1, -2) * d ** -0.5, -1) @ vals).reshape(B, H, d)
    assert out.dtype == torch.float32 and out.shape == (B, H, d)
    assert relative_error(out, ref) <= F32
    # the new position written in place (rounded as torch rounds to the cache dtype), nothing else touched
    assert relative_error(K[:, :, t].double(), kr.to(dtype).double()) <= F32
    assert torch.equal(V[:, :, t], v.to(dtype))
    assert torch.equal(K[:, :, :t], past_K[:, :, :t]) and K[:, :, t + 1:].float().isnan().all()
    assert V[:, :, t + 1:].float().isnan().all()


@pytest.mark.parametrize("B, W, L, t, dtype, parallel", [
    (1, 512, 20, 0, torch.float32, True),      # first position: s = f, nothing read
    (1, 48, 20, 1, torch.float32, False),      # one cached position
    (2, 40, 100, 97, torch.float32, True),     # prime length, W not a power of two
    (3, 24, 300, 257, torch.bfloat16, False),  # bf16 keys, fp32 states, several chunks
    (1, 6, 50, 16, torch.float32, True),       # W = 6 (2 lanes), t exactly one block
    (2, 40, 100, 97, torch.float32, False),
    (3, 24, 300, 257, torch.bfloat16, True),
])
def test_feedback_decode_matches_torch(kernels, B, W, L, t, dtype, parallel, monkeypatch):
    monkeypatch.setattr(tvm_decode, "SERIAL_BYTES", -1 if parallel else 1 << 62)
    g = torch.Generator().manual_seed(t + W)
    f, qb, kb = (torch.randn(B, W, generator=g) for _ in range(3))
    gamma = torch.rand(B, generator=g)
    KB, S = _poisoned((B, L, W), t, dtype, 1, g), _poisoned((B, L, W), t, torch.float32, 1, g)
    past_KB, past_S = KB.clone(), S.clone()
    out = kernels.feedback(f, qb, kb, gamma, KB, S, t, W ** -0.5)
    ref = f.double()
    if t:
        logits = (qb.double()[:, None] @ past_KB[:, :t].double().transpose(1, 2)) * W ** -0.5
        ref = ref + gamma.double()[:, None] * (torch.softmax(logits, -1) @ past_S[:, :t].double())[:, 0]
    assert relative_error(out, ref) <= F32
    assert torch.equal(S[:, t], out) and torch.equal(KB[:, t], kb.to(dtype))
    assert torch.equal(KB[:, :t], past_KB[:, :t]) and torch.equal(S[:, :t], past_S[:, :t])
    assert S[:, t + 1:].isnan().all() and KB[:, t + 1:].float().isnan().all()


def test_misaligned_or_strided_caches_are_not_given_to_the_kernels(kernels):
    """The generated code assumes contiguous, 64-byte aligned caches: anything else takes the torch path."""
    K = torch.zeros(1, 2, 17, 8)
    assert kernels.supports_attention(K, K.clone())
    assert not kernels.supports_attention(K.transpose(1, 2), K.transpose(1, 2))
    flat = torch.zeros(2 * 17 * 8 + 1)
    assert not kernels.supports_attention(flat[1:].view(1, 2, 17, 8), K)
    assert not kernels.supports_feedback(torch.zeros(1, 5, 8, dtype=torch.float16), torch.zeros(1, 5, 8))
    assert not kernels.supports_feedback(torch.zeros(1, 5, 8), torch.zeros(1, 5, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("name, cache_dtype", [("sessa_gqa", torch.float32), ("sessa_gqa", torch.bfloat16),
                                               ("decoder", torch.float32)])
def test_compiled_decode_steps_on_tvm_equal_the_forward(name, cache_dtype, one_thread):
    torch.manual_seed(0)
    if name == "decoder":
        model = randomize(Decoder(40, 48, "SSTS", n_heads=6, n_kv_heads=2), seed=3).eval()
        x = torch.randint(0, 40, (2, 21))
    else:
        model = randomize(SessaLayer(48, n_heads=6, n_kv_heads=2), seed=3).eval()
        x = torch.randn(2, 21, 48)
    c = sc.compile(model, backend="auto", options={"decode_kernels": True})
    with torch.no_grad():
        full = model(x)
    assert c(x[:, :4]).shape[1] == 4 and c.backend == "tvm"
    cache = c.init_cache(2, max_len=21, dtype=cache_dtype)
    for k, v in cache.items():
        if isinstance(v, torch.Tensor) and k.endswith((".k", ".v", ".k_b", ".s")):
            v.fill_(float("nan"))
    P = 3
    y, cache = c.prefill(x[:, :P], cache)
    prog = next(iter(c._serving.programs.values()))
    calls, linear_calls = prog.decode_kernels.calls, prog.decode_kernels.linear_calls
    tol = F32 if cache_dtype == torch.float32 else TOLERANCE[torch.bfloat16]
    ys = []
    for t in range(P, 21):
        y_t, cache = c.decode_step(x[:, t], cache)
        assert relative_error(y_t, full[:, t]) <= tol, f"position {t}"
        ys.append(y_t)
    # still equal after the later steps: no step handed out a buffer a later one reuses (the decoder's logits are
    # a linear layer's output)
    assert relative_error(torch.stack(ys, dim=1), full[:, P:]) <= tol
    n_ops = sum(1 for node in prog.graph.nodes if node.op in ("attention", "feedback"))
    assert prog.decode_kernels.calls - calls == n_ops * (21 - P)    # every step's cache reads ran in TVM
    n_linear = sum(1 for node in prog.graph.nodes if node.op == "linear")
    assert prog.decode_kernels.linear_calls - linear_calls == n_linear * (21 - P)   # and its linear layers


@pytest.mark.parametrize("rows, IN, OUT, bias", [(1, 512, 1024, True), (3, 24, 6, False), (2, 10, 1, False),
                                                 (16, 64, 48, True)])
@pytest.mark.parametrize("parallel", [False, True])
def test_linear_decode_matches_torch(kernels, rows, IN, OUT, bias, parallel, monkeypatch):
    """Both forms of the kernel: on the calling thread (what steps run) and over the thread pool."""
    monkeypatch.setattr("sessa_compiler.backends.tvm.decode.LINEAR_PARALLEL", parallel)
    g = torch.Generator().manual_seed(IN + OUT)
    x = torch.randn(rows, 1, IN, generator=g)
    w, b = torch.randn(OUT, IN, generator=g), (torch.randn(OUT, generator=g) if bias else None)
    calls = kernels.linear_calls
    out = kernels.linear(torch.nn.functional.linear, x, w, b)
    assert kernels.linear_calls == calls + 1 and out.shape == (rows, 1, OUT)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert relative_error(out, ref) <= F32
    # more rows than a decode step has, or a strided weight: torch's linear, same result
    many = torch.randn(40, IN, generator=g)
    assert torch.equal(kernels.linear(torch.nn.functional.linear, many, w, b), torch.nn.functional.linear(many, w, b))
    assert kernels.linear_calls == calls + 1


@pytest.mark.parametrize("parallel", [False, True])
def test_fused_linears_of_one_input_match_torch(kernels, parallel, monkeypatch):
    """Up to five linear layers of one input in one launch (widths 1 and not multiples of the lanes included)."""
    monkeypatch.setattr("sessa_compiler.backends.tvm.decode.LINEAR_PARALLEL", parallel)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 1, 40, generator=g)
    layers = [(torch.randn(o, 40, generator=g), torch.randn(o, generator=g) if bias else None)
              for o, bias in ((48, True), (1, False), (37, True), (40, False))]
    outs = kernels.linears(torch.nn.functional.linear, x, *[t for wb in layers for t in wb])
    assert len(outs) == 4
    for out, (w, b) in zip(outs, layers):
        ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
        assert out.shape == ref.shape and relative_error(out, ref) <= F32


def test_decode_kernels_are_the_default():
    """By default a tvm-compiled module's one-position CPU steps run the TVM decode kernels;
    options={"decode_kernels": False} runs the derived step through torch instead."""
    model = randomize(SessaLayer(16, n_heads=2), seed=1).eval()
    x = torch.randn(1, 5, 16)
    for opts, used in (({}, True), ({"decode_kernels": False}, False)):
        c = sc.compile(model, backend="tvm", options=opts)
        cache = c.init_cache(1, max_len=8)
        _, cache = c.prefill(x[:, :4], cache)
        prog = next(iter(c._serving.programs.values()))
        assert (prog.decode_kernels is not None) == used
        calls = prog.decode_kernels.calls if used else 0
        y_t, _ = c.decode_step(x[:, 4], cache)
        if used:
            assert prog.decode_kernels.calls == calls + 2      # the attention and the feedback ran in TVM
        with torch.no_grad():
            assert relative_error(y_t, model(x)[:, 4]) <= F32


def test_kernel_steps_run_torch_ops_on_one_thread_and_restore_the_count():
    """Inside a decode step on the TVM kernels torch runs one thread (its exp/erf/tanh/gelu would otherwise wake
    the OpenMP team for a few hundred numbers); the caller's thread count is back afterwards, also after an error.
    A prefill and the torch step keep the caller's count."""
    import sessa_compiler.serving as serving

    model = randomize(SessaLayer(16, n_heads=2), seed=2).eval()
    x = torch.randn(1, 6, 16)
    seen = []
    real_gelu = serving.SEMANTICS["gelu"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        c = sc.compile(model, backend="tvm", options={"decode_kernels": True})
        cache = c.init_cache(1, max_len=8)
        _, cache = c.prefill(x[:, :4], cache)
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(serving.SEMANTICS, "gelu",
                       lambda *a, **k: seen.append(torch.get_num_threads()) or real_gelu(*a, **k))
            prog = next(iter(c._serving.programs.values()))
            prog._plans.clear()          # plans hold the op functions: rebuilt with the counting gelu
            y_t, cache = c.decode_step(x[:, 4], cache)
            assert seen == [1] and torch.get_num_threads() == 2
            with torch.no_grad():
                assert relative_error(y_t, model(x[:, :5])[:, 4]) <= F32
            chunk = c.init_cache(1, max_len=8)   # a prefill chunk on a non-empty cache keeps torch's threads
            _, chunk = c.prefill(x[:, :2], chunk)
            _, chunk = c.prefill(x[:, 2:4], chunk)
            assert seen[1:] == [2]
            mp.setitem(serving.SEMANTICS, "gelu", lambda *a, **k: 1 / 0)
            prog._plans.clear()
            with pytest.raises(sc.SessaCompilerError, match="ZeroDivisionError"):
                c.decode_step(x[:, 5], cache)
            assert torch.get_num_threads() == 2
            prog._plans.clear()
    finally:
        torch.set_num_threads(before)


def test_kernel_steps_write_the_caches_in_place_and_refuse_positions_past_the_end(one_thread):
    """A default tvm step writes position t of the preallocated caches where they lie (same storage, earlier
    positions bit for bit unchanged, later ones untouched) and a step past max_len is a CacheOverflowError before
    any write."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=4).eval()
    x = torch.randn(1, 7, 32)
    c = sc.compile(model, backend="tvm")
    cache = c.init_cache(1, max_len=6)
    _, cache = c.prefill(x[:, :3], cache)
    for k, v in cache.items():   # poison every position past the prompt
        if isinstance(v, torch.Tensor) and k.endswith((".k", ".v", ".k_b", ".s")):
            v.narrow(2 if k.endswith((".k", ".v")) else 1, 3, 3).fill_(float("nan"))
    prog = next(iter(c._serving.programs.values()))
    for t in range(3, 6):
        before = {k: v.clone() for k, v in cache.items() if isinstance(v, torch.Tensor)}
        ptrs = {k: v.data_ptr() for k, v in cache.items() if isinstance(v, torch.Tensor)}
        calls = prog.decode_kernels.calls
        _, cache = c.decode_step(x[:, t], cache)
        assert prog.decode_kernels.calls == calls + 2 and cache["t"] == t + 1
        for k, old in before.items():
            new = cache[k]
            assert new.data_ptr() == ptrs[k], f"{k} was reallocated"
            seq = 2 if k.endswith((".k", ".v")) else 1
            assert torch.equal(new.narrow(seq, 0, t), old.narrow(seq, 0, t)), f"{k}: earlier positions changed"
            assert torch.isfinite(new.narrow(seq, t, 1)).all(), f"{k}: position {t} not written"
            assert new.narrow(seq, t + 1, new.shape[seq] - t - 1).isnan().all(), f"{k}: later positions written"
    before = {k: v.clone() for k, v in cache.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(sc.serving.CacheOverflowError, match="max_len=6"):
        c.decode_step(x[:, 6], cache)
    assert cache["t"] == 6
    assert all(torch.equal(cache[k].nan_to_num(7.0), v.nan_to_num(7.0)) for k, v in before.items())


def _python_calls(fn) -> int:
    """Python function calls (frames entered) while fn runs."""
    n = [0]

    def prof(frame, event, arg):
        n[0] += event == "call"
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n[0]


def test_kernel_steps_skip_the_per_step_resolution_and_stay_equal(one_thread, monkeypatch):
    """With DECODE_FAST a step reuses what its earlier steps resolved (the linear layers' kernels, the cache's
    checks, the call's structure, the output's structure): far fewer Python calls per step (the count does not
    depend on the machine's load), and outputs and caches bit for bit those of the step that resolves everything."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=4).eval()
    x = torch.randn(1, 9, 32)
    c = sc.compile(model, backend="tvm")
    caches = {}
    for fast in (False, True):
        monkeypatch.setattr(sc.serving, "DECODE_FAST", fast)
        cache = c.init_cache(1, max_len=9)
        _, cache = c.prefill(x[:, :3], cache)
        outs = [c.decode_step(x[:, t], cache)[0] for t in range(3, 5)]   # the second one reuses the first's
        calls = _python_calls(lambda: outs.append(c.decode_step(x[:, 5], cache)[0]))
        caches[fast] = (outs, cache, calls)
    (slow, c0, n0), (fast, c1, n1) = caches[False], caches[True]
    assert all(torch.equal(a, b) for a, b in zip(slow, fast))
    assert all(torch.equal(v, c1[k]) for k, v in c0.items() if isinstance(v, torch.Tensor))
    assert n1 < 0.7 * n0, (n1, n0)


def test_kernel_steps_recheck_a_replaced_cache_tensor_or_weight(one_thread):
    """What a step remembers from the last one is dropped when the cache or a weight changes: a state tensor
    replaced by one of another shape is refused (InputError naming it), and a weight given misaligned storage
    (``p.data = ...``) is not handed to the kernels (their code assumes 64-byte aligned data) but runs through
    torch, giving what a step that resolves everything gives."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=4).eval()
    x = torch.randn(1, 9, 32)
    c = sc.compile(model, backend="tvm")
    cache = c.init_cache(1, max_len=9)
    _, cache = c.prefill(x[:, :3], cache)
    for t in range(3, 5):
        c.decode_step(x[:, t], cache)
    key = next(k for k in cache if k.endswith(".k"))
    good = cache[key]
    cache[key] = good[:, :, :5].clone()
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        c.decode_step(x[:, 5], cache)
    cache[key] = good
    prog = next(iter(c._serving.programs.values()))
    w = prog.graph.params[next(n for n in prog.graph.params if n.endswith("out_proj.weight"))]
    flat = torch.empty(w.numel() + 1)
    flat[1:].copy_(w.detach().flatten())
    w.data = flat[1:].view(w.shape)          # 4 bytes past an aligned start
    assert w.data_ptr() % 64
    linear_calls = prog.decode_kernels.linear_calls
    y_fast = c.decode_step(x[:, 5], cache)[0]
    assert prog.decode_kernels.linear_calls == linear_calls + 7   # the out projection ran in torch
    cache["t"] = 5
    sc.serving.DECODE_FAST = False
    try:
        y_slow = c.decode_step(x[:, 5], cache)[0]
    finally:
        sc.serving.DECODE_FAST = True
    assert torch.equal(y_fast, y_slow)


def test_bf16_caches_stay_within_the_half_tolerance_of_the_fp32_step(one_thread):
    """The same prompt and steps with bf16 and fp32 caches (both through the TVM kernels): outputs within the
    spec's bf16 tolerance of the fp32 step's, and the fp32 step within the float32 tolerance of the forward."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=4).eval()   # the shapes above: built once
    x = torch.randn(1, 40, 32)
    c = sc.compile(model, backend="tvm")
    with torch.no_grad():
        full = model(x)
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        cache = c.init_cache(1, max_len=40, dtype=dt)
        _, cache = c.prefill(x[:, :33], cache)
        assert cache[next(k for k in cache if k.endswith(".k_b"))].dtype == dt
        outs[dt] = torch.stack([c.decode_step(x[:, t], cache)[0] for t in range(33, 40)], dim=1)
    assert relative_error(outs[torch.float32], full[:, 33:]) <= F32
    err = relative_error(outs[torch.bfloat16], outs[torch.float32])
    assert 0 < err <= TOLERANCE[torch.bfloat16]
