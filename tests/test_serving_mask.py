"""Serving modules whose attention has a key-padding mask (issue 22): prefill(x, cache, attention_mask=...) with
batched prompts of different lengths, then decode steps continuing each row, against the uncompiled module run on
the whole padded sequence (prompt + new tokens, the mask extended with ones).

- an attention-only model (two masked layers, GQA, RoPE, a finite fill: empty_rows="mean") with a row padded on
  the left, one on the right and one whose prompt is a single token, on eager and tvm: every output at a row with a
  visible key equals the module on the whole sequence; a row with no visible key (left padding) is the module's
  value on the sequence so far (the mean of v over it: a value of the prompt, not of the later tokens);
- a Sessa layer (attention with the mask, then the feedback solve, which the mask does not reach: the recognised
  feedback op has no mask operand, so padded positions are mixed as the module mixes them) with prompts padded on
  the right, on eager and tvm; left padding there gives NaN rows (a -inf fill: empty_rows="nan"), NaN for NaN;
- the same Sessa layer with a finite fill and a left-padded prompt is refused before anything is written: the
  module's own outputs at real tokens then depend on later tokens (shown), so no prefill + decode equals it;
- B=1 without padding: the unmasked graph (mask None) and the masked one with all ones equal the module;
- the TVM and Triton split-K decode kernels with the cached mask (Triton: interpreter), and masked decode steps
  through them (tvm: every step's attention and feedback counted in TVM);
- a mask the module computes from its token ids is served and exported without a mask argument;
- the serving exports (ONNX in onnxruntime, TVM with its loader): prefill with the mask, then decode steps, against
  the module on left- and right-padded batches; NaN rows where the compiled module would refuse the prompt.
"""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import math

import pytest
import torch
import torch.nn as nn

import sessa_compiler as sc
from sessa_compiler.errors import UnsupportedError
from sessa_compiler.tolerance import TOLERANCE, relative_error
from tests.styles.diag_gain_style import DiagGainSessaLayer

TOL = TOLERANCE[torch.float32]
B, T, N = 3, 6, 3      # batch, prompt length, new tokens


class _Serves:
    """The serving methods exist where the original defines them; these are never called (the compiled ones run)."""

    def init_cache(self, *args, **kwargs):
        raise NotImplementedError

    def prefill(self, *args, **kwargs):
        raise NotImplementedError

    def decode_step(self, *args, **kwargs):
        raise NotImplementedError


def _rotate(x, inv_freq):   # interleaved RoPE by complex products, positions 0..T-1 (x: B, T, heads, d)
    ang = torch.outer(torch.arange(x.shape[1], device=x.device).float(), inv_freq)
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]).flatten(-2).type_as(x)


class MaskedAttention(nn.Module):
    """Causal attention with GQA and RoPE, masked by attention_mask [B, T] with a finite fill (finfo.min): a row
    with no visible key is uniform over all keys (empty_rows="mean"); optionally the Sessa feedback solve after it."""

    def __init__(self, D=16, H=4, Hkv=2, feedback=False):
        super().__init__()
        self.H, self.Hkv, self.d, self.feedback = H, Hkv, D // H, feedback
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, Hkv * self.d), nn.Linear(D, Hkv * self.d)
        self.o = nn.Linear(D, D)
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        if feedback:
            self.fb, self.gain = nn.Linear(D, 2 * D), nn.Linear(D, 1)

    def forward(self, x, attention_mask):
        Bx, Tx, D = x.shape
        q = _rotate(self.q(x).view(Bx, Tx, self.H, self.d), self.inv_freq).transpose(1, 2)
        k = _rotate(self.k(x).view(Bx, Tx, self.Hkv, self.d), self.inv_freq).transpose(1, 2)
        v = self.v(x).view(Bx, Tx, self.Hkv, self.d).transpose(1, 2)
        k, v = k.repeat_interleave(self.H // self.Hkv, 1), v.repeat_interleave(self.H // self.Hkv, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        causal = torch.ones(Tx, Tx, dtype=torch.bool, device=x.device).tril()
        s = s.masked_fill(~(causal & attention_mask[:, None, None, :].bool()), torch.finfo(s.dtype).min)
        f = self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(Bx, Tx, D))
        if not self.feedback:
            return f + x
        q_b, k_b = self.fb(x).split(D, dim=-1)
        strict = torch.ones(Tx, Tx, dtype=torch.bool, device=x.device).tril(-1)
        alpha = (q_b @ k_b.transpose(-1, -2) / math.sqrt(D)).masked_fill(~strict, float("-inf")).softmax(-1)
        alpha = torch.where(torch.isnan(alpha), torch.zeros_like(alpha), alpha)
        system = torch.eye(Tx, device=x.device) - 0.9 * torch.tanh(self.gain(x)) * alpha
        return torch.linalg.solve_triangular(system, f, upper=False, unitriangular=True) + x


class TwoLayers(_Serves, nn.Module):
    def __init__(self, feedback=False):
        super().__init__()
        self.a, self.b = MaskedAttention(feedback=feedback), MaskedAttention(feedback=feedback)

    def forward(self, x, attention_mask):
        return self.b(self.a(x, attention_mask), attention_mask)


class ServedSessa(_Serves, DiagGainSessaLayer):
    pass


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


_COMPILED: dict = {}


def _compiled(name: str, backend: str):
    """(module, compiled module), made once per test run (a trace and a backend build each take seconds)."""
    key = (name, backend)
    if key not in _COMPILED:
        m = _model(TwoLayers) if name == "attention" else _model(ServedSessa, D=16, n_heads=4, n_kv_heads=2)
        _COMPILED[key] = (m, sc.compile(m, backend=backend))
    return _COMPILED[key]


def _batch(seed=0):
    """x [B, T + N, 16] and the mask of three prompts of different lengths (new positions are ones)."""
    x = torch.randn(B, T + N, 16, generator=torch.Generator().manual_seed(seed))
    return x, torch.ones(B, T + N, dtype=torch.long)


def _serve(c, x, mask, max_len=T + N):
    """prefill the prompt with its mask, then decode the N new positions one at a time (no mask: real tokens).
    On tvm: every step's attention and feedback read their caches in the TVM decode kernels (counted)."""
    cache = c.init_cache(x.shape[0], max_len=max_len)
    y, cache = c.prefill(x[:, :T], cache, attention_mask=mask[:, :T])
    prog = c._serving.programs[cache["_graph"]]
    kernels = prog.decode_kernels
    calls = kernels.calls if kernels is not None else 0
    outs = [y]
    for t in range(T, x.shape[1]):
        y_t, cache = c.decode_step(x[:, t], cache)
        outs.append(y_t[:, None])
    if c.backend == "tvm":
        n_ops = sum(1 for node in prog.graph.nodes if node.op in ("attention", "feedback"))
        assert kernels.calls - calls == n_ops * (x.shape[1] - T)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_attention_only_left_right_and_single_token_prompts(backend):
    m, c = _compiled("attention", backend)
    x, mask = _batch()
    mask[0, :2] = 0            # prompt of 4, padded on the left
    mask[1, 3:T] = 0           # prompt of 3, padded on the right (new tokens after the padding)
    mask[2, :T - 1] = 0        # a single-token prompt, padded on the left
    got, cache = _serve(c, x, mask)
    with torch.no_grad():
        want = m(x, mask)
        want_prompt = m(x[:, :T], mask[:, :T])
    seen = mask.cumsum(1) > 0   # rows with a visible key
    assert relative_error(got[seen], want[seen]) <= TOL
    assert relative_error(got[:, T:], want[:, T:]) <= TOL                 # every decode step
    assert relative_error(got[:, :T], want_prompt) <= TOL                 # the prompt: the module on the prompt
    # the cache keeps each position's mask: the prompt's, then ones
    masks = [v for k, v in cache.items() if k.endswith(".mask")]
    assert len(masks) == 2 and all(torch.equal(mk, mask.bool()) for mk in masks)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_sessa_layer_with_feedback_right_padded_prompts_of_different_lengths(backend):
    """The feedback's weights get no mask (the recognised feedback op has none; the module mixes padded positions
    too), so its cache holds k_b and s of padded positions as the module uses them."""
    m, c = _compiled("sessa", backend)
    x, mask = _batch(1)
    mask[1, 4:T] = 0
    mask[2, 1:T] = 0           # a single-token prompt, padded on the right
    got, _ = _serve(c, x, mask)
    with torch.no_grad():
        want = m(x, attention_mask=mask)
    assert relative_error(got, want) <= TOL
    ops = c.graph.ops()
    att = next(n for n in c.graph.nodes if n.op == "attention")
    assert ops.count("feedback") == 1 and att.attrs["key_padding"] and att.attrs["rope"]
    assert att.inputs[1].type.shape[2] == 2 and att.attrs["empty_rows"] == "nan"   # GQA; a -inf fill
    # left padding: the module's rows with no visible key are NaN, and the feedback carries them on: NaN for NaN
    mask[0, :2] = 0
    got, _ = _serve(c, x, mask)
    with torch.no_grad():
        want = m(x, attention_mask=mask)
    assert torch.equal(got.isnan(), want.isnan()) and want[0].isnan().all() and not want[1:].isnan().any()
    assert relative_error(got[1:], want[1:]) <= TOL


def test_left_padding_into_the_feedback_is_refused_before_anything_is_written():
    m = _model(TwoLayers, feedback=True)
    c = sc.compile(m, backend="eager")
    x, mask = _batch(2)
    mask[1, 4:T] = 0
    got, _ = _serve(c, x, mask)                   # right padding is served
    with torch.no_grad():
        assert relative_error(got, m(x, mask)) <= TOL
    mask[0, :2] = 0
    with torch.no_grad():   # why: the module's outputs at the real tokens of row 0 depend on later tokens
        longer, shorter = m(x, mask)[0, 2:T], m(x[:, :T], mask[:, :T])[0, 2:T]
    assert relative_error(shorter, longer) > 1e-3
    cache = c.init_cache(B, max_len=T + N)
    with pytest.raises(UnsupportedError, match=r"no visible key.*depends on the tokens after it.*op 'feedback'"):
        c.prefill(x[:, :T], cache, attention_mask=mask[:, :T])
    assert cache["t"] == 0


@pytest.mark.filterwarnings("ignore:.*tracing it again")   # each keyword signature has its own trace
def test_one_unpadded_row_without_a_mask_and_with_ones():
    m, c = _compiled("sessa", "eager")
    x = torch.randn(1, T + N, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x)
    cache = c.init_cache(1, max_len=T + N)
    y, cache = c.prefill(x[:, :T], cache)          # the unmasked graph: the unchanged path
    outs = [y] + [c.decode_step(x[:, t], cache)[0][:, None] for t in range(T, T + N)]
    assert relative_error(torch.cat(outs, 1), want) <= TOL
    assert not any(k.endswith(".mask") for k in cache)
    with torch.no_grad():
        c(x)                      # the unmasked trace is the current one: a cache made now is made again below
    got, cache = _serve(c, x, torch.ones(1, T + N, dtype=torch.long))
    assert relative_error(got, want) <= TOL and any(k.endswith(".mask") for k in cache)


@pytest.mark.parametrize("rope, dtype, parallel", [(True, torch.float32, False), (False, torch.bfloat16, True)])
def test_tvm_decode_kernel_reads_the_cached_mask(rope, dtype, parallel, monkeypatch):
    """The TVM split-K attention step with the mask, caches poisoned with NaN past the new position: random
    padding, a row whose only real key is the new one, a row with no real key (the mean of v; NaN is the step's
    business, see serving.py)."""
    from sessa_compiler.backends.tvm import decode as tvm_decode
    from sessa_compiler.backends.tvm.backend import aligned_empty

    monkeypatch.setattr(tvm_decode, "SERIAL_BYTES", -1 if parallel else 1 << 62)
    Bk, H, Hkv, d, L, t = 3, 4, 2, 8, 90, 70
    g = torch.Generator().manual_seed(1)
    K, V = aligned_empty((Bk, Hkv, L, d), dtype), aligned_empty((Bk, Hkv, L, d), dtype)
    K.fill_(float("nan")), V.fill_(float("nan"))
    K[:, :, :t], V[:, :, :t] = torch.randn(Bk, Hkv, t, d, generator=g), torch.randn(Bk, Hkv, t, d, generator=g)
    q, k, v = (torch.randn(Bk, h, d, generator=g) for h in (H, Hkv, Hkv))
    keep = torch.rand(Bk, L, generator=g) < 0.5
    keep[1, :t], keep[1, t] = False, True
    keep[2, :t + 1] = False
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = tvm_decode.DecodeKernels().attention(q, k, v, inv if rope else None, K, V, t, d ** -0.5, rope, keep=keep)
    if rope:   # the new position's rotation (the cached keys are stored rotated)
        ang = t * inv.double()
        rot = lambda x: torch.view_as_real(torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))   # noqa
                                           * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
        q, k = rot(q), rot(k)
    Kr, Vr = K[:, :, :t + 1].double(), V[:, :, :t + 1].double()
    Kr[:, :, t], Vr[:, :, t] = k.double().to(dtype).double(), v.double().to(dtype).double()
    Kr, Vr = Kr.repeat_interleave(H // Hkv, 1), Vr.repeat_interleave(H // Hkv, 1)
    logits = (q.double()[:, :, None, :] @ Kr.transpose(-1, -2)) * d ** -0.5
    ref = torch.softmax(logits.masked_fill(~keep[:, None, None, :t + 1], -math.inf)[:2], -1) @ Vr[:2]
    assert relative_error(out[:2], ref[:, :, 0]) <= TOL
    assert relative_error(out[2], Vr[2].mean(1)) <= TOL
    assert K[:, :, t + 1:].float().isnan().all() and V[:, :, t + 1:].float().isnan().all()


def test_triton_decode_kernel_reads_the_cached_mask():
    triton_env.require_interpreter()
    from sessa_compiler.backends.triton.decode import attention_decode

    Bk, H, Hkv, D, L, t = 3, 4, 2, 8, 90, 70      # several chunks of cached positions, the last one partial
    g = torch.Generator().manual_seed(0)
    q = torch.randn(Bk, H, D, generator=g)
    k, v = (torch.full((Bk, Hkv, L, D), float("nan")) for _ in range(2))
    k[:, :, :t], v[:, :, :t] = torch.randn(Bk, Hkv, t, D, generator=g), torch.randn(Bk, Hkv, t, D, generator=g)
    keep = torch.rand(Bk, L, generator=g) < 0.5
    keep[1, :t - 1], keep[1, t - 1] = False, True   # only the last cached key is real
    keep[2, :t] = False                          # no real key: the mean of v over the t positions
    out = attention_decode(q, k, v, t, D ** -0.5, keep=keep)
    kr = k[:, :, :t].double().repeat_interleave(H // Hkv, 1)
    vr = v[:, :, :t].double().repeat_interleave(H // Hkv, 1)
    logits = (q[:, :, None, :].double() @ kr.transpose(-1, -2)) * D ** -0.5
    logits = logits.masked_fill(~keep[:, None, None, :t], -math.inf)
    ref = torch.softmax(logits[:2], -1) @ vr[:2]
    assert relative_error(out[:2], ref[:, :, 0]) <= TOL
    assert relative_error(out[2], vr[2].mean(1)) <= TOL
    nan = attention_decode(q, k, v, t, D ** -0.5, keep=keep, empty_nan=True)   # empty_rows="nan"
    assert nan[2].isnan().all() and torch.equal(nan[:2], out[:2])


@pytest.mark.filterwarnings("ignore:.*tracing it again")
@pytest.mark.parametrize("model", ["attention", "sessa"])
def test_masked_decode_steps_through_the_triton_kernels(model, monkeypatch):
    """The decode steps' attention on the Triton split-K kernel with the cached mask (dispatch forced onto CPU
    tensors under the interpreter, as on CUDA: the position read from the device)."""
    triton_env.require_interpreter()
    import sessa_compiler.serving as serving
    from sessa_compiler.backends.triton import decode

    calls = []
    real = decode.attention_decode_step
    monkeypatch.setattr(decode, "attention_decode_step",
                        lambda *a, **k: calls.append(k.get("keep")) or real(*a, **k))
    monkeypatch.setattr(serving, "TRITON_DECODE_ON_CPU", True)
    m, c = _compiled(model, "eager")
    x, mask = _batch(4)
    mask[1, 2:T] = 0
    mask[2, 1:T] = 0
    if model == "attention":
        mask[0, :3] = 0        # left padding: rows with no visible key (the prompt's; decode rows see themselves)
    cache = c.init_cache(B, max_len=T + N)
    c.prefill(x[:, :T], cache, attention_mask=mask[:, :T])
    calls.clear()   # (the serving check's decode step, on the first prefill)
    got = torch.stack([c.decode_step(x[:, t], cache)[0] for t in range(T, T + N)], dim=1)
    with torch.no_grad():
        want = m(x, mask) if model == "attention" else m(x, attention_mask=mask)
    assert relative_error(got, want[:, T:]) <= TOL
    layers = 2 if model == "attention" else 1
    assert len(calls) == layers * N and all(torch.equal(k, mask.bool()) for k in calls)   # the whole cached mask


_NUMPY = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(bool)": "bool", "tensor(int64)": "int64",
          "tensor(float16)": "float16", "tensor(int32)": "int32"}


def _exported(kind: str, m, x, mask, path):
    """The module's prefill and decode_step exports (ONNX in onnxruntime, or TVM libraries): the prompt x[:, :T]
    with its mask from empty caches, then the N new positions one at a time with their mask (ones: real tokens).
    -> (outputs [B, T + N, ...], the export's input names)"""
    import numpy as np

    if kind == "onnx":
        import onnxruntime as ort

        sc.export_onnx(m, (x[:, :T], mask[:, :T]), path / "prefill.onnx", method="prefill")
        sc.export_onnx(m, (x[:, T], mask[:, T]), path / "step.onnx", method="decode_step")
        sessions = [ort.InferenceSession(str(path / f), providers=["CPUExecutionProvider"])
                    for f in ("prefill.onnx", "step.onnx")]
        specs = [[(i.name, i.shape, _NUMPY[i.type]) for i in s.get_inputs()] for s in sessions]
        run = [lambda *a, s=s, sp=sp: s.run(None, {n: v for (n, _, _), v in zip(sp, a)})
               for s, sp in zip(sessions, specs)]
    else:
        libs = [sc.load_tvm(sc.export_tvm(m, (x[:, :T], mask[:, :T]), path / "prefill", method="prefill")),
                sc.load_tvm(sc.export_tvm(m, (x[:, T], mask[:, T]), path / "step", method="decode_step"))]
        specs = [[(i["name"], i["shape"], i["dtype"]) for i in lib.inputs] for lib in libs]
        run = [lambda *a, lib=lib: lib(*a) for lib in libs]
    caches = [np.zeros([x.shape[0]] + [0 if d == "P" else d for d in shape[1:]], dtype=dt)
              for _, shape, dt in specs[0][2:]]
    y, *caches = run[0](x[:, :T].numpy(), mask[:, :T].numpy(), *caches)
    outs = [torch.from_numpy(np.asarray(y))]
    for t in range(T, x.shape[1]):
        y, *caches = run[1](x[:, t].numpy(), mask[:, t].numpy(), *caches)
        outs.append(torch.from_numpy(np.asarray(y))[:, None])
    return torch.cat(outs, 1), [n for n, _, _ in specs[0]], [n for n, _, _ in specs[1]]


@pytest.mark.parametrize("kind", ["onnx", "tvm"])
def test_serving_exports_take_the_attention_mask(kind, tmp_path):
    """prefill and decode_step exports of the two-layer masked attention (GQA, RoPE, a finite fill): prompts padded
    on the left, on the right and a single-token one; every row with a visible key equals the module on the whole
    sequence, and a row with none (left padding; the module gives it the mean of v over the whole sequence, which
    a step cannot know) is finite and feeds nothing."""
    m, _ = _compiled("attention", "eager")
    x, mask = _batch(5)
    mask[0, :2] = 0
    mask[1, 3:T] = 0
    mask[2, :T - 1] = 0
    got, pre_inputs, step_inputs = _exported(kind, m, x, mask, tmp_path)
    assert pre_inputs[:2] == ["x", "attention_mask"] and step_inputs[:2] == ["x_t", "attention_mask_t"]
    assert sum(n.endswith(".mask") for n in pre_inputs) == 2          # each attention caches the mask
    with torch.no_grad():
        want = m(x, mask)
    seen = mask.cumsum(1) > 0
    assert relative_error(got[seen], want[seen]) <= TOL
    assert got.isfinite().all()


def test_serving_exports_of_a_sessa_layer_with_a_mask(tmp_path, kind="onnx"):
    """The Sessa layer (a -inf fill: empty_rows="nan"): right padding and a hole equal the module everywhere; a
    left-padded row is NaN where the module's is (the feedback carries the first NaN row on), NaN for NaN."""
    m, _ = _compiled("sessa", "eager")
    x, mask = _batch(6)
    mask[1, 2:4] = 0
    mask[2, 1:T] = 0
    mask[0, :2] = 0
    got, _, _ = _exported(kind, m, x, mask, tmp_path)
    with torch.no_grad():
        want = m(x, attention_mask=mask)
    assert torch.equal(got.isnan(), want.isnan()) and want[0].isnan().all() and not want[1:].isnan().any()
    assert relative_error(got[1:], want[1:]) <= TOL


def test_serving_exports_give_nan_where_an_empty_row_reaches_the_feedback(tmp_path):
    """With a finite fill, a left-padded row's output is the module's mean of v over the whole sequence, and the
    feedback carries it into later rows: the compiled module refuses such a prompt (above), an exported graph
    cannot raise, so that batch row is NaN from its first position on; the other rows are the module's. (TVM here,
    ONNX for the Sessa layer above: the NaN rows' two spellings.)"""
    m = _model(TwoLayers, feedback=True)
    x, mask = _batch(7)
    mask[0, :2] = 0
    mask[1, 4:T] = 0
    got, _, _ = _exported("tvm", m, x, mask, tmp_path)
    with torch.no_grad():
        want = m(x, mask)
    assert got[0].isnan().all() and not got[1:].isnan().any()
    assert relative_error(got[1:], want[1:]) <= TOL


def test_a_mask_derived_inside_the_module_is_served_and_exported(tmp_path):
    """The mask computed from the token ids (0 = padding): the compiled module serves it without a mask argument,
    and the decode_step export (no mask input: the graph derives it) caches it, its validation drawing ids with 0."""

    class PadIds(_Serves, nn.Module):   # the mask derived from the token ids (0 = padding) inside the module
        def __init__(self):
            super().__init__()
            self.emb, self.att = nn.Embedding(11, 16), MaskedAttention()

        def forward(self, ids):
            return self.att(self.emb(ids), ids != 0)

    m = _model(PadIds)
    ids = torch.randint(1, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    ids[0, 3:] = 0
    c = sc.compile(m, backend="eager")
    with torch.no_grad():
        assert relative_error(c(ids), m(ids)) <= TOL
    assert next(n for n in c.graph.nodes if n.op == "attention").attrs.get("key_padding"), c.explain()
    cache = c.init_cache(2)   # the compiled module serves it: the mask comes from the ids
    outs = [c.prefill(ids[:, :3], cache)[0]] + [c.decode_step(ids[:, t], cache)[0][:, None] for t in (3, 4)]
    with torch.no_grad():
        assert relative_error(torch.cat(outs, 1), m(ids)) <= TOL
    exp = sc.export_onnx(m, (ids[:, 3],), tmp_path / "s.onnx", method="decode_step")   # validated: ids 0..10
    assert [i.name for i in exp.model.graph.input][:2] == ["x_t", "attention.k"]
    assert any(i.name.endswith(".mask") for i in exp.model.graph.input)
    assert max(r["error"] for r in exp.validation) <= TOL
