"""Serving: the compiled init_cache / prefill / decode_step / generate against the full forward.

Models run in float64, so equality is checked at the spec's float64 tolerance (1e-10) at every position.
Caches are poisoned with NaN before the first write, so a read of an unwritten slot shows.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

import sessa_compiler as sc
from model_helpers import randomize
from sessa_compiler.errors import InputError, UnsupportedError
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer, TransformerLayer
from sessa_compiler.serving import CacheOverflowError, ServingProgram
from sessa_compiler.tolerance import TOLERANCE, relative_error

TOL = TOLERANCE[torch.float64]

MODELS = {
    "sessa_gqa_rope": lambda: SessaLayer(32, n_heads=4, n_kv_heads=2),
    "sessa_h1_norope": lambda: SessaLayer(16, n_heads=1, use_forward_rope=False),
    "mamba": lambda: MambaLayer(16, d_state=4),
    "transformer_gqa": lambda: TransformerLayer(32, n_heads=4, n_kv_heads=2),
    "decoder_SMTS": lambda: Decoder(40, 32, "SMTS", n_heads=4, n_kv_heads=2, d_state=4),
}


def _input(name, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name.startswith("decoder"):
        return torch.randint(0, 40, (B, T), generator=g)
    D = 16 if name in ("sessa_h1_norope", "mamba") else 32
    return torch.randn(B, T, D, generator=g, dtype=torch.float64)


def _poison(cache):
    """NaN in every position-indexed state slot (nothing is written yet)."""
    for k, v in cache.items():
        if isinstance(v, torch.Tensor) and k.endswith((".k", ".v", ".k_b", ".s")):
            v.fill_(float("nan"))
    return cache


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request, one_thread):
    name = request.param
    model = randomize(MODELS[name]().double(), seed=3)
    return name, model, sc.compile(model, backend="eager")


def test_prefill_then_decode_equals_forward_at_every_position(compiled):
    name, model, c = compiled
    B, T, P = 2, 11, 4
    x = _input(name, B, T)
    with torch.no_grad():
        full = model(x)
    cache = _poison(c.init_cache(B, max_len=T))
    y, cache = c.prefill(x[:, :P], cache)
    assert relative_error(y, full[:, :P]) <= TOL
    ref_cache = model.init_cache(B, max_len=T)
    with torch.no_grad():
        model.prefill(x[:, :P], ref_cache)
    for t in range(P, T):
        y_t, cache = c.decode_step(x[:, t], cache)          # without the sequence dim, as the original takes
        with torch.no_grad():
            r_t, ref_cache = model.decode_step(x[:, t], ref_cache)
        assert y_t.shape == r_t.shape
        assert relative_error(y_t, full[:, t]) <= TOL, f"position {t}"
        assert relative_error(y_t, r_t) <= TOL, f"position {t} against the original's decode_step"
    assert cache["t"] == T


def test_chunked_prefill_and_length_one_steps(compiled):
    """Prefill of one position, then chunks of 3 and 2 on a non-empty cache, then (B, 1, ...) steps."""
    name, model, c = compiled
    x = _input(name, 1, 9, seed=2)
    with torch.no_grad():
        full = model(x)
    cache = _poison(c.init_cache(1))    # max_len=None: grows
    outs = []
    for a, b in ((0, 1), (1, 4), (4, 6), (6, 7), (7, 8), (8, 9)):
        y, cache = (c.decode_step if b - a == 1 and a > 0 else c.prefill)(x[:, a:b], cache)
        outs.append(y)
    assert relative_error(torch.cat(outs, dim=1), full) <= TOL


def test_generate_equals_repeated_full_forwards(one_thread):
    model = randomize(Decoder(40, 32, "SMTS", n_heads=4, n_kv_heads=2, d_state=4), seed=5)
    c = sc.compile(model, backend="eager")
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    got = c.generate(prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)
    assert torch.equal(got, model.generate(prompt, 6))
    assert torch.equal(c.generate(prompt, 0), prompt)


def test_cache_overflow_is_an_error_before_any_write(one_thread):
    model = randomize(SessaLayer(16, n_heads=2).double())
    c = sc.compile(model, backend="eager")
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    cache = c.init_cache(1, max_len=4)
    with pytest.raises(CacheOverflowError, match="max_len=4"):
        c.prefill(x[:, :5], cache)
    assert cache["t"] == 0
    _, cache = c.prefill(x[:, :3], cache)
    _, cache = c.decode_step(x[:, 3], cache)
    before = {k: v.clone() for k, v in cache.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(CacheOverflowError, match="4 cached would need 5 positions"):
        c.decode_step(x[:, 4], cache)
    assert cache["t"] == 4
    assert all(cache[k].shape == v.shape and torch.equal(cache[k], v) for k, v in before.items())


def test_bad_caches_and_inputs_are_clear_errors(one_thread):
    model = randomize(SessaLayer(16, n_heads=2).double())
    c = sc.compile(model, backend="eager")
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with pytest.raises(InputError, match="batch 1, the input has batch 2"):
        c.prefill(x, c.init_cache(1))
    with pytest.raises(InputError, match="expected the dict this compiled module's init_cache returns"):
        c.prefill(x, model.init_cache(2))          # the original's layout is not the compiled one
    with pytest.raises(InputError, match="one position"):
        c.decode_step(x, c.init_cache(2))
    with pytest.raises(InputError, match="keyword arguments"):
        c.decode_step(x[:, 0], c.init_cache(2), use_flash_decode=True)
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        c.init_cache(0)
    with pytest.raises(InputError, match="dtype"):
        c.prefill(x.float(), c.init_cache(2))


def test_serving_methods_follow_the_original():
    class NoServing(nn.Module):
        def forward(self, x):
            return x * 2

    c = sc.compile(NoServing(), backend="eager")
    with pytest.raises(AttributeError, match="defines none"):
        c.decode_step
    assert not hasattr(c, "init_cache")
    c2 = sc.compile(SessaLayer(16), backend="eager")
    with pytest.raises(AttributeError, match="defines none"):
        c2.generate

    class OtherGenerate(NoServing):
        def generate(self, tokens, n):
            return tokens

    with pytest.raises(UnsupportedError, match="Decoder"):
        sc.compile(OtherGenerate(), backend="eager").generate(torch.zeros(1, 2, dtype=torch.long), 1)
    with pytest.raises(UnsupportedError, match="Decoder"):   # Hugging Face's keywords: the same refusal
        sc.compile(OtherGenerate(), backend="eager").generate(input_ids=torch.zeros(1, 2, dtype=torch.long),
                                                             max_new_tokens=1)

    class NoPad(Decoder):   # a Decoder whose own generate decodes otherwise: not the compiled greedy loop
        def generate(self, tokens, n):
            return super().generate(tokens, n)

    with pytest.raises(UnsupportedError, match="NoPad.generate"):
        sc.compile(NoPad(20, 16, "S", n_heads=2).eval(), backend="eager").generate(
            torch.zeros(1, 2, dtype=torch.long), 1)


class _OwnServing:
    """Serving methods of the module's own (so that the compiled ones exist); never run: the compiled steps are
    derived from forward."""

    def init_cache(self, batch_size, device=None, dtype=None, max_len=None):
        raise NotImplementedError

    def prefill(self, ids, cache):
        raise NotImplementedError

    def decode_step(self, ids, cache):
        raise NotImplementedError


def _prefill_then_steps(c, ids, n_prefill: int, max_len: int):
    """The compiled module's outputs at every position of ids: a prefill of n_prefill, then one step each."""
    cache = c.init_cache(ids.shape[0], max_len=max_len)
    y, cache = c.prefill(ids[:, :n_prefill], cache)
    outs = [y]
    for t in range(n_prefill, ids.shape[1]):
        y_t, cache = c.decode_step(ids[:, t], cache)
        outs.append(y_t[:, None])
    return torch.cat(outs, 1)


class LearnedPositions(_OwnServing, nn.Module):
    """minGPT's learned position table, initialised to zeros: position-wise at init, not once it is trained."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.pos = nn.Parameter(torch.zeros(1, 32, 8))
        self.head = nn.Linear(8, 20)

    def forward(self, ids):
        return self.head(self.emb(ids) + self.pos[:, :ids.shape[1]])



def test_a_zero_initialised_trainable_position_table_is_served_at_the_steps_positions():
    """minGPT's ``pos[:, :T]`` reads the table by absolute position: a step reads the rows of its own positions, so
    the table is served whatever its values, also after they change (training), and not only while its first rows
    are equal (zeros: the check before the first step could not tell row 0 from row t)."""
    m = LearnedPositions().double()
    c = sc.compile(m, backend="eager")
    ids = torch.randint(0, 20, (2, 12))
    for values in ("zeros", "trained"):
        if values == "trained":
            with torch.no_grad():
                m.pos.copy_(torch.randn(1, 32, 8, dtype=torch.float64))
        assert relative_error(_prefill_then_steps(c, ids, 3, 12), m(ids)) <= TOL, values
    cache = c.init_cache(1)   # past the table (32 rows), where the module itself cannot run either
    _, cache = c.prefill(torch.randint(0, 20, (1, 32)), cache)
    with pytest.raises(CacheOverflowError, match="past the 32 positions"):
        c.decode_step(ids[:1, 0], cache)


class LogNScaledLM(_OwnServing, nn.Module):
    """Qwen-1's log-n attention scaling: q times a table that is 1 up to the training length (8) and log_8(t)
    after it, sliced by position; and GPT-2's learned positions through ``wpe(arange(T))``."""

    def __init__(self, V=30, D=16, H=2):
        super().__init__()
        self.H = H
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(64, D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, V)
        logn = [math.log(i, 8) if i > 8 else 1.0 for i in range(1, 65)]
        self.register_buffer("logn", torch.tensor(logn)[None, :, None, None], persistent=False)

    def forward(self, ids):
        B, T = ids.shape
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
        q, k, v = self.qkv(x).view(B, T, 3, self.H, -1).unbind(2)
        q = q * self.logn[:, 0:T].type_as(q)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True)
        return self.out(x + a.transpose(1, 2).reshape(B, T, -1))



@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_tables_read_by_position_are_read_at_the_steps_positions(backend):
    """Positions past the table's constant prefix (9 and on: the log-n scale; every one: wpe), served by prefill
    and decode steps; the step exports, which take no position for such reads, refuse them by name."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    torch.manual_seed(0)
    m = LogNScaledLM().double().eval()
    c = sc.compile(m, backend=backend)
    ids = torch.randint(0, 30, (2, 20))
    assert relative_error(_prefill_then_steps(c, ids, 4, 20), m(ids)) <= TOL
    if backend == "eager":
        with pytest.raises(UnsupportedError, match="reads by absolute position"):
            sc.export_onnx(m.float(), (torch.zeros(2, dtype=torch.long),), os.devnull, method="decode_step")


def test_a_decoder_with_its_own_prefill_or_decode_step_is_not_served_as_decoders():
    """Decoder.generate calls self.prefill / self.decode_step: a subclass's own (a banned token) would be bypassed
    by the compiled steps, which are Decoder's; generate, prefill and decode_step refuse instead."""
    class BannedToken(Decoder):
        def decode_step(self, tokens, cache):
            logits, cache = super().decode_step(tokens, cache)
            return logits.index_fill(-1, torch.tensor([3]), float("-inf")), cache

    c = sc.compile(BannedToken(20, 16, "S", n_heads=2).eval(), backend="eager")
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(UnsupportedError, match="BannedToken.decode_step"):
        c.generate(prompt, 3)
    cache = c.init_cache(1)
    with pytest.raises(UnsupportedError, match="BannedToken.decode_step"):
        c.prefill(prompt, cache)
    with pytest.raises(UnsupportedError, match="BannedToken.decode_step"):
        c.decode_step(prompt[:, 0], cache)
    assert c.original.generate(prompt, 3).shape == (1, 5)


class MeanOverTime(nn.Module):
    """Mixes positions with an op that is not a recognised sequence op: no incremental form exists."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) + x.cumsum(dim=1)

    def decode_step(self, x_t, cache):  # the compiled one must refuse, not derive a wrong step
        raise NotImplementedError


def test_position_mixing_outside_the_sequence_ops_is_refused():
    c = sc.compile(MeanOverTime(), backend="eager")
    x = torch.randn(1, 4, 8)
    c(x)
    with pytest.raises(UnsupportedError, match="differs from its full forward"):
        c.decode_step(x[:, 0], {"t": 0, "max_len": None})


class SoftAttentionLM(nn.Module):
    """Token ids, then causal attention with a per-head distance bias (ALiBi), which no recogniser takes: the
    derived step is not the forward. Checked from a step example of one token repeated (zeros(B)), whose equal
    rows made the attention look position-wise."""

    def __init__(self, vocab=50, D=16, H=2):
        super().__init__()
        self.H, self.emb, self.qkv, self.head = H, nn.Embedding(vocab, D), nn.Linear(D, 3 * D), nn.Linear(D, vocab)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25]))

    def forward(self, ids):
        x = self.emb(ids)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        pos = torch.arange(T)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5 + self.slopes[:, None, None] * (pos[None, :] - pos[:, None])
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return self.head(x + (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


def test_a_token_model_mixing_positions_is_refused_from_a_repeated_token_example():
    # (what export_onnx/export_tvm(method="decode_step") check a step example of zeros(B) with: its 4x repeat)
    example = torch.zeros(2, 4, dtype=torch.long)
    c = sc.compile(SoftAttentionLM().eval(), (example,), backend="eager")
    with pytest.raises(UnsupportedError, match="differs from its full forward"):
        ServingProgram(c.graph).check((example,), c.graph.params)


def _serve_by_program(model, seed=4):
    """Prefill 3 then decode 5 positions with the ServingProgram of the compiled forward (for modules that
    define no decode_step of their own); -> relative error against the full forward."""
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(x)
    c = sc.compile(model, (x,), backend="eager")
    prog = ServingProgram(c.graph)
    cache = _poison(prog.init_cache(2, max_len=8))
    outs = [prog.run([x[:, :3]], cache)[0]] + [prog.run([x[:, t:t + 1]], cache)[0] for t in range(3, 8)]
    return relative_error(torch.cat(outs, dim=1), full)


def test_an_independently_written_style_is_served(one_thread):
    from styles.complex_rope_style import ComplexRopeSessaLayer

    assert _serve_by_program(randomize(ComplexRopeSessaLayer(32, n_heads=4, n_kv_heads=2))) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(not os.environ.get("SESSA_REFERENCE_DIR"),
                    reason="the public reference implementation is not shipped here: "
                           "git clone https://github.com/LibratioAI/sessa and set SESSA_REFERENCE_DIR to the clone (docs/testing.md)")
@pytest.mark.parametrize("backend, options", [("eager", {}), ("tvm", {}), ("tvm", {"decode_kernels": False})])
def test_public_reference_layer_is_served(backend, options, one_thread):
    sys.path.insert(0, os.environ["SESSA_REFERENCE_DIR"])
    from sessa import SessaLayer as RefLayer

    model = randomize(RefLayer(32, n_heads=4, n_kv_heads=2))
    c = sc.compile(model, backend=backend, options=options)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
    cache = _poison(c.init_cache(2, max_len=8))
    outs = [c.prefill(x[:, :3], cache)[0]] + [c.decode_step(x[:, t], cache)[0][:, None] for t in range(3, 8)]
    assert relative_error(torch.cat(outs, dim=1), full) <= TOLERANCE[torch.float32]


def test_lower_precision_caches(one_thread):
    """init_cache(dtype=bfloat16) for a float32 model: keys, values and feedback keys in bf16, solved states
    in float32; the result is within the spec's half-type tolerance of the full forward (not float32's)."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2))
    c = sc.compile(model, backend="eager")
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(x)
    cache = c.init_cache(1, dtype=torch.bfloat16, max_len=9)   # not traced yet: allocated at the first prefill
    outs = [c.prefill(x[:, :4], cache)[0]] + [c.decode_step(x[:, t:t + 1], cache)[0] for t in range(4, 9)]
    assert cache["attention.k"].dtype == torch.bfloat16 and cache["feedback.s"].dtype == torch.float32
    err = relative_error(torch.cat(outs, dim=1), full)
    assert 0 < err <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_prefill_runs_the_forward_kernels_and_fills_the_cache(backend, one_thread):
    """On a kernel backend, a prefill from an empty cache runs the backend's forward (with the values the cache
    needs as extra outputs) and fills the poisoned cache from them; the decode steps after it read only that."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=4)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(5))
    c = sc.compile(model, (x[:, :5].contiguous(),), backend=backend)
    with torch.no_grad():
        full = model(x)
    cache = _poison(c.init_cache(2, max_len=11))
    y, cache = c.prefill(x[:, :6], cache)
    assert len(c._serving.forward_runners) == 1      # the kernel path ran, not the derived step
    outs = [y] + [c.decode_step(x[:, t:t + 1], cache)[0] for t in range(6, 11)]
    assert relative_error(torch.cat(outs, dim=1), full) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_one_position_steps_equal_forward(flash, dtype, monkeypatch, one_thread):
    """CPU decode steps from an empty, NaN-poisoned cache (MHA with RoPE and GQA layers): one-position RoPE as a
    complex product, the attention through torch's CPU flash-attention op (counted; or the matmul path where a
    torch lacks it) and the feedback with gamma folded into its weights, against the full forward at every
    position (position 0 included: the feedback then has no predecessor)."""
    import sessa_compiler.serving as serving

    calls = []
    real = serving._FLASH_CPU
    monkeypatch.setattr(serving, "_FLASH_CPU", (lambda *a, **k: calls.append(1) or real(*a, **k)) if flash else None)
    model = randomize(Decoder(40, 32, "SS", n_heads=4, n_kv_heads=2).to(dtype), seed=11)
    c = sc.compile(model, backend="eager")
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x)
    c.prefill(x[:, :2], c.init_cache(2, max_len=9))       # traces the module (a prefill from an empty cache)
    cache = _poison(c.init_cache(2, max_len=9))
    calls.clear()
    for t in range(9):
        y_t, cache = c.decode_step(x[:, t], cache)
        assert relative_error(y_t, full[:, t]) <= TOLERANCE[dtype], f"position {t}"
    assert len(calls) == (2 * 9 if flash else 0)          # two attention layers, nine steps


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_sequences_served_from_several_threads_equal_one_thread(backend):
    """Four threads prefill and decode their own sequences on one compiled module at once: each gets exactly what
    it gets alone. (On tvm such calls crashed the process: the serving methods now take the module's lock.)"""
    import threading

    torch.manual_seed(0)
    c = sc.compile(SessaLayer(32, n_heads=2).eval(), backend=backend)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(2, 9, 32, generator=g) for _ in range(4)]
    steps = [[torch.randn(2, 32, generator=g) for _ in range(12)] for _ in range(4)]

    def serve(i, out):
        try:
            with torch.no_grad():
                y, cache = c.prefill(prompts[i], c.init_cache(2, max_len=24))
                ys = [y[:, -1]]
                for x in steps[i]:
                    y, cache = c.decode_step(x, cache)
                    ys.append(y)
                out[i] = torch.stack(ys)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out[i] = e

    alone, together = {}, {}
    for i in range(4):
        serve(i, alone)
    threads = [threading.Thread(target=serve, args=(i, together)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert isinstance(together[i], torch.Tensor), together[i]
        assert torch.equal(together[i], alone[i]), i
