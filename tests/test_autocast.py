"""A compiled module under torch.autocast computes as the module does: a call under autocast is exported under
it (the graph holds autocast's casts as ops), so the module's explicit float32 casts and its
autocast(enabled=False) regions (Hugging Face's rotary embedding, a float32 lm head) keep their dtype."""
import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import relative_error


class Rotary(torch.nn.Module):
    """Llama-style: rotary angles from a matmul of inverse frequencies and positions in float32 (autocast off),
    logits cast to float32 explicitly."""

    def __init__(self, d=32, vocab=40):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), persistent=False)

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :, None].float()
        with torch.autocast(ids.device.type, enabled=False):
            angles = pos.float() @ self.inv_freq[None, None, :].float()   # [1, T, d/2], positions in the hundreds
            cos, sin = angles.cos(), angles.sin()
        h1, h2 = h[..., ::2], h[..., 1::2]
        h = torch.cat([h1 * cos - h2 * sin, h1 * sin + h2 * cos], -1).to(h.dtype)
        return self.head(h).float()


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_explicit_float32_regions_keep_their_dtype_under_autocast(backend):
    torch.manual_seed(0)
    m = Rotary().eval()
    c = sc.compile(m, backend=backend)
    ids = torch.randint(0, 40, (2, 300))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = m(ids), c(ids)
    assert got.dtype == want.dtype == torch.float32
    # angles up to ~300 rad computed in bfloat16 are off by whole radians: then the error is O(1)
    assert relative_error(got, want) <= 2e-2
    with torch.no_grad():   # without autocast the same compiled module runs its float32 graph
        assert relative_error(c(ids), m(ids)) <= 1e-5


def test_calls_with_and_without_autocast_each_get_their_graph():
    torch.manual_seed(1)
    m = Rotary()
    c = sc.compile(m, backend="tvm")
    ids = torch.randint(0, 40, (2, 17))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # another graph for autocast is expected: no "tracing it again" warning
        for amp in (False, True, False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = c(ids).logsumexp(-1).mean()
                want = m(ids).logsumexp(-1).mean()
            assert loss.dtype == want.dtype == torch.float32
            assert abs(loss.item() - want.item()) <= (2e-2 if amp else 1e-5) * abs(want.item())
            loss.backward()
    assert len(c._variants) == 2 and sum("autocast" in str(r) for r in c.retraces) == 1
    assert m.proj.weight.grad is not None and torch.isfinite(m.proj.weight.grad).all()


def test_an_autocast_graph_is_cached_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "1")
    ids = torch.randint(0, 40, (1, 9))
    seen = []
    for amp in (False, True, True, False):
        torch.manual_seed(2)
        m = Rotary().eval()
        c = sc.compile(m, backend="eager")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = c(ids)
            assert out.dtype == torch.float32
            assert relative_error(out, m(ids)) <= (2e-2 if amp else 1e-5)
        seen.append((c.trace_cache, "bf16" in str(c.graph)))
    assert seen == [("miss", False), ("miss", True), ("hit", True), ("hit", False)]


def test_tvm_runs_its_float32_core_kernels_under_autocast():
    """Under autocast q, k and v come from bf16 linears: TVM's float32 attention and feedback kernels read them
    upcast (passes/widen_core.py) instead of the generic ops running the core ops over T x T matrices."""
    from sessa_compiler.models import SessaLayer
    from sessa_compiler.passes.widen_core import needs_widening, widen_core_ops
    from sessa_compiler.semantics import run_graph

    torch.manual_seed(3)
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).eval()
    c = sc.compile(m, backend="tvm")
    x = torch.randn(2, 37, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = c(x), m(x)
    assert relative_error(got, want) <= 2e-2
    assert needs_widening(c.graph) and c._backend.stats["kernel_calls"] >= 2
    assert "attention x1, feedback x1" in c.explain()
    wide = widen_core_ops(c.graph)   # the same function as the graph it copies, on the eager interpreter
    assert wide is not c.graph and not needs_widening(wide) and not needs_widening(wide.clone())
    assert str(c.graph) != str(wide)
    params = dict(m.named_parameters())
    params.update(m.named_buffers())
    a = run_graph(c.graph, [x], {k: params.get(k, v) for k, v in c.graph.params.items()})[0]
    b = run_graph(wide, [x], {k: params.get(k, v) for k, v in wide.params.items()})[0]
    assert a.dtype == b.dtype and relative_error(b, a) <= 1e-2


class FakeQuant(torch.nn.Module):
    """A float32 model that rounds on purpose: a bf16 round trip and a straight-through fake quantiser."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.a(x).to(torch.bfloat16).to(torch.float32)
        h = h + (h.to(torch.float16).float() * 3 - h).detach()
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("backend", ["eager", "auto", "tvm"])
def test_a_float32_models_own_roundings_are_kept(backend):
    """The eager backend widened every 16-bit value of any graph holding one: the roundings vanished (1.6e-3
    relative on a float32 model, where the spec allows 1e-5); only a half-precision model is widened."""
    torch.manual_seed(0)
    m = FakeQuant()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 7, 16)
    got = c(x)
    got.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    want = m(x)
    want.square().sum().backward()
    assert relative_error(got, want) <= 1e-6
    for g, p in zip(grads, m.parameters()):
        assert relative_error(g, p.grad) <= 1e-5
