"""Identical layers are traced once (frontend/repeated.py): a model of N layers of one class, with the same
structure and non-tensor attributes, pays for one layer's torch.export; layers that differ in anything their
Python could branch on, layers with hooks and layers whose trace holds only for some sizes are traced inline;
the graph computes what the module computes (values and gradients) either way."""
from tests import triton_env  # noqa: I001,F401  (sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import torch.nn as nn

import sessa_compiler as sc
from model_helpers import randomize
from sessa_compiler.frontend import trace_with_report
from sessa_compiler.models import Decoder
from sessa_compiler.semantics import run_graph


@pytest.fixture
def exports(monkeypatch):
    """The classes torch.export was called on, in order."""
    calls = []
    real = torch.export.export

    def counting(mod, *a, **k):   # a layer traced on its own is exported inside a _Flat adapter
        calls.append(type(mod.layer if type(mod).__name__ == "_Flat" else mod).__name__)
        return real(mod, *a, **k)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def _full(monkeypatch, module, args, kwargs=None):
    """The trace without sharing (the model exported in one piece)."""
    monkeypatch.setenv("SESSA_COMPILER_SHARE_LAYERS", "0")
    try:
        return trace_with_report(module, args, kwargs)
    finally:
        monkeypatch.delenv("SESSA_COMPILER_SHARE_LAYERS")


def _run(tr, *inputs):
    with torch.no_grad():
        return run_graph(tr.graph, list(inputs), tr.graph.params)


def _close(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _trace_stack(m):
    """m (a Stack-like model: hidden states and a mask) traced on [2, 5, 12]."""
    return trace_with_report(m, (torch.randn(2, 5, 12), torch.ones(2, 5)))


def _matches_at_a_new_size(tr, m):
    """Every output of the traced graph equals the module's on [3, 7, 12]."""
    h2, mask2 = torch.randn(3, 7, 12), torch.ones(3, 7)
    want = m(h2, mask2)
    for got, w in zip(_run(tr, h2, mask2), want if isinstance(want, tuple) else (want,), strict=True):
        _close(got, w.detach())


@pytest.mark.parametrize("layers", ["SMTSMT", "SSSS"])
def test_identical_layers_are_exported_once_and_give_the_full_traces_graph(monkeypatch, exports, layers):
    torch.manual_seed(len(layers))
    m = randomize(Decoder(50, 16, layers, n_heads=2)).eval()
    tr = trace_with_report(m, (torch.randint(0, 50, (1, 9)),))
    for kind in set(layers):
        assert exports.count({"S": "SessaLayer", "M": "MambaLayer", "T": "TransformerLayer"}[kind]) == 1
    assert exports.count("Decoder") == len(set(layers)) + 1  # stopped at each first layer of a kind, then whole
    full = _full(monkeypatch, m, (torch.randint(0, 50, (1, 9)),))
    assert tr.graph.ops() == full.graph.ops()
    assert set(tr.graph.param_values) == set(full.graph.param_values)
    assert [str(v.type) for v in tr.graph.outputs] == [str(v.type) for v in full.graph.outputs]
    assert sum(op == "attention" for op in tr.graph.ops()) == layers.count("S") + layers.count("T")
    assert sum(op == "feedback" for op in tr.graph.ops()) == layers.count("S")   # recognised in every layer
    assert len(tr.report.shared) == len(set(layers)) and f"{layers.count('S')} x SessaLayer" in tr.report.shared[0]
    x = torch.randint(0, 50, (3, 13))
    with torch.no_grad():
        _close(_run(tr, x)[0], m(x))


def test_hugging_face_layers_taking_a_4d_mask_are_exported_once(monkeypatch, exports):
    """A causal LM in Hugging Face's idiom hands every decoder layer a [B, 1, T, T] additive mask and a (cos, sin)
    pair [1, T, d]: the layer's own trace keeps those T dims one symbol with the hidden states' (the call's
    sizes, by named dims), so one layer trace serves every layer; the graph is the full trace's (ops, parameters,
    attention with the model's attention_mask as its mask operand, feedback in every layer) and computes the
    module's values at a new batch, length and padding."""
    from styles.hf_causal_lm_style import SessaForCausalLM, SessaLMConfig

    torch.manual_seed(0)
    cfg = SessaLMConfig()
    cfg.num_hidden_layers = 3
    m = randomize(SessaForCausalLM(cfg)).eval()
    ids, am = torch.randint(0, cfg.vocab_size, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    tr = trace_with_report(m, (ids,), {"attention_mask": am})
    assert exports.count("SessaDecoderLayer") == 1 and exports.count("SessaForCausalLM") == 2
    assert tr.report.shared == ["3 x SessaDecoderLayer (model.layers.0 ... model.layers.2), 1 layer trace(s), "
                                "3 call(s) from them"]
    mask_input = next(v for v in tr.graph.inputs if v.type.rank == 2 and v.type.dtype.name == "i64" and v is not
                      tr.graph.inputs[0])
    full = _full(monkeypatch, m, (ids,), {"attention_mask": am})
    assert sorted(tr.graph.ops()) == sorted(full.graph.ops())
    assert set(tr.graph.param_values) == set(full.graph.param_values)
    atts = [n for n in tr.graph.nodes if n.op == "attention"]
    assert [n.attrs for n in atts] == [n.attrs for n in full.graph.nodes if n.op == "attention"]
    assert len(atts) == 3 and all(n.attrs.get("key_padding") and n.inputs[4] is mask_input for n in atts)
    assert sum(op == "feedback" for op in tr.graph.ops()) == 3
    ids2, am2 = torch.randint(0, cfg.vocab_size, (3, 13)), torch.ones(3, 13, dtype=torch.long)
    am2[1, 9:] = 0
    with torch.no_grad():
        _close(_run(tr, ids2, am2)[0], m(ids2, attention_mask=am2)["logits"])


def test_a_layer_with_another_attribute_is_traced_on_its_own(exports):
    torch.manual_seed(0)
    m = randomize(Decoder(50, 16, "SSS", n_heads=2)).eval()
    m.layers[1].ln.eps = 10.0    # visible in the output: a layer served layer 0's trace would use 1e-5
    x = torch.randint(0, 50, (2, 11))
    tr = trace_with_report(m, (x,))
    assert exports.count("SessaLayer") == 1   # layers 0 and 2 share one trace; layer 1 is traced inline
    with torch.no_grad():
        want = m(x)
        m.layers[1].ln.eps = 1e-5
        other = m(x)
    assert (want - other).abs().max() > 1e-3
    _close(_run(tr, x)[0], want)


def test_a_layer_with_a_hook_is_traced_inline_and_its_hook_runs_once(exports):
    torch.manual_seed(0)
    m = randomize(Decoder(50, 16, "SSS", n_heads=2)).eval()
    m.layers[2].register_forward_hook(lambda mod, a, out: out * 2.0)
    x = torch.randint(0, 50, (2, 7))
    tr = trace_with_report(m, (x,))
    assert exports.count("SessaLayer") == 1   # layers 0 and 1
    with torch.no_grad():
        _close(_run(tr, x)[0], m(x))


class Block(nn.Module):
    """A block in another hand: keyword mask, a tuple out, a flag that changes the path."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h, attention_mask=None, gate=True):
        y = self.up(self.norm(h))
        y = torch.nn.functional.silu(y) if gate else torch.tanh(y)
        if attention_mask is not None:
            y = y * attention_mask[..., None].to(y.dtype)
        return h + self.down(y), y.mean(-1)


class Stack(nn.Module):
    def __init__(self, d=12, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, h, attention_mask):
        aux = []
        for i, b in enumerate(self.blocks):
            h, a = b(h, attention_mask=attention_mask, gate=i % 2 == 0)
            aux.append(a)
        return h, torch.stack(aux).sum(0)


def test_calls_of_two_kinds_get_a_trace_each_and_gradients_equal_the_modules(monkeypatch, exports):
    torch.manual_seed(0)
    m = Stack()
    h, mask = torch.randn(2, 5, 12), (torch.rand(2, 5) > 0.3).float()
    tr = trace_with_report(m, (h, mask))
    assert exports.count("Block") == 2        # gate=True and gate=False
    full = _full(monkeypatch, m, (h, mask))
    assert tr.graph.ops() == full.graph.ops()
    h2, mask2 = torch.randn(3, 8, 12), (torch.rand(3, 8) > 0.3).float()
    for got, want in zip(_run(tr, h2, mask2), m(h2, mask2)):
        _close(got, want.detach())
    c = sc.compile(m, (h, mask), backend="eager")
    h2.requires_grad_(True)
    out = c(h2, mask2)
    (out[0].square().sum() + out[1].sum()).backward()
    got = [p.grad.clone() for p in m.parameters()] + [h2.grad.clone()]
    m.zero_grad()
    h2.grad = None
    out = m(h2, mask2)
    (out[0].square().sum() + out[1].sum()).backward()
    for g, w in zip(got, [p.grad for p in m.parameters()] + [h2.grad]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_tied_weights_keep_one_parameter_and_its_gradient():
    torch.manual_seed(0)
    m = Stack(n=3)
    m.blocks[2].up = m.blocks[0].up     # tied: one tensor, two layers
    h, mask = torch.randn(2, 5, 12), torch.ones(2, 5)
    tr = trace_with_report(m, (h, mask))
    assert "blocks.2.up.weight" not in tr.graph.param_values   # the tensor's one name, as torch.export names it
    c = sc.compile(m, (h, mask), backend="eager")
    out = c(h, mask)
    out[0].square().sum().backward()
    got = m.blocks[0].up.weight.grad.clone()
    m.zero_grad()
    m(h, mask)[0].square().sum().backward()
    torch.testing.assert_close(got, m.blocks[0].up.weight.grad, rtol=1e-5, atol=1e-6)


class SizeBranch(Block):
    def forward(self, h, attention_mask=None, gate=True):
        out, aux = super().forward(h, attention_mask, gate)
        return (out * 0.5 if h.shape[1] > 4 else out), aux


def test_a_layer_whose_trace_holds_for_some_sizes_only_is_traced_inline(monkeypatch, exports):
    torch.manual_seed(0)
    m = Stack()
    m.blocks = nn.ModuleList(SizeBranch(12) for _ in range(4))
    h, mask = torch.randn(2, 6, 12), torch.ones(2, 6)
    tr = trace_with_report(m, (h, mask))
    full = _full(monkeypatch, m, (h, mask))
    assert [str(g) for g in tr.guards] == [str(g) for g in full.guards] and tr.guards
    h2, mask2 = torch.randn(1, 9, 12), torch.ones(1, 9)
    _close(_run(tr, h2, mask2)[0], m(h2, mask2)[0].detach())


class Autocast(Stack):
    def forward(self, h, attention_mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, _ = self.blocks[0](h, attention_mask=attention_mask)
        for b in self.blocks[1:]:
            h, _ = b(h.float(), attention_mask=attention_mask)
        return h


def test_a_layer_called_under_autocast_is_traced_inline():
    torch.manual_seed(0)
    m = Autocast()
    tr = _trace_stack(m)
    assert "bf16" in str(tr.graph)   # the autocast layer computes in bfloat16, the others do not
    _matches_at_a_new_size(tr, m)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_a_shared_trace_compiles_on_every_backend(backend):
    torch.manual_seed(0)
    m = randomize(Decoder(50, 16, "SSS", n_heads=2)).eval()
    x = torch.randint(0, 50, (1, 9))
    c = sc.compile(m, (x,), backend=backend)
    x2 = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(c(x2), m(x2), rtol=2e-4, atol=2e-4)


class Scaled(Block):
    scale = 1.0

    def forward(self, h, attention_mask=None, gate=True):
        out, aux = super().forward(h, attention_mask, gate)
        return out * self.scale, aux


class SetsAttributes(Stack):
    """Its forward sets an attribute of each layer before calling it (the layers' own Python reads it)."""

    def forward(self, h, attention_mask):
        for i, b in enumerate(self.blocks):
            b.scale = float(i + 1)
            h, _ = b(h, attention_mask=attention_mask)
        return h


def test_a_layer_attribute_the_models_forward_sets_is_seen():
    torch.manual_seed(0)
    m = SetsAttributes()
    m.blocks = nn.ModuleList(Scaled(12) for _ in range(4))
    tr = _trace_stack(m)
    _matches_at_a_new_size(tr, m)


LAYER_GAIN = {"value": 1.0}


class GlobalGain(Block):
    def forward(self, h, attention_mask=None, gate=True):
        out, aux = super().forward(h, attention_mask, gate)
        return out * LAYER_GAIN["value"], aux


class SetsAGlobal(Stack):
    """Its forward sets a global the layers' Python reads, before each layer."""

    def forward(self, h, attention_mask):
        for i, b in enumerate(self.blocks):
            LAYER_GAIN["value"] = float(i + 1)
            h, _ = b(h, attention_mask=attention_mask)
        return h


def test_a_global_the_models_forward_sets_between_layers_is_seen():
    torch.manual_seed(0)
    m = SetsAGlobal()
    m.blocks = nn.ModuleList(GlobalGain(12) for _ in range(4))
    tr = _trace_stack(m)
    _matches_at_a_new_size(tr, m)


class Broadcast(nn.Module):
    """A gain table [1, T, d] broadcast over the batch: in the layer's own trace its dim 0 is the batch symbol."""

    def __init__(self, d=12):
        super().__init__()
        self.a = Block(d)
        self.b = Block(d)

    def forward(self, h, table):
        h, _ = self.a(h)
        h, _ = self.b(h)
        return h * table


class CallsWithATable(nn.Module):
    def __init__(self, d=12, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Broadcast(d) for _ in range(n))

    def forward(self, h):
        table = (1.0 + 0.1 * torch.arange(h.shape[1], dtype=h.dtype))[None, :, None].expand(1, -1, h.shape[2])
        for layer in self.layers:
            h = layer(h, table)
        return h


def test_a_call_whose_sizes_the_layers_graph_does_not_hold_for_is_traced_inline(exports):
    torch.manual_seed(0)
    m = CallsWithATable()
    h = torch.randn(2, 5, 12)
    tr = trace_with_report(m, (h,))
    assert exports.count("CallsWithATable") <= 2   # no third export after a failed shared one
    h2 = torch.randn(3, 7, 12)
    _close(_run(tr, h2)[0], m(h2).detach())


class Frozen(Block):
    """Refuses new attributes once built (as some frameworks' modules do)."""

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False) and name == "forward":
            raise AttributeError("frozen module")
        super().__setattr__(name, value)


def test_a_layer_that_refuses_its_forward_being_set_is_left_as_it_was():
    torch.manual_seed(0)
    m = Stack()
    m.blocks = nn.ModuleList([Block(12), Block(12), Frozen(12), Frozen(12)])
    for b in m.blocks[2:]:
        b._frozen = True
    tr = _trace_stack(m)
    assert all("forward" not in vars(b) for b in m.blocks)   # no forward of ours left on any layer
    _matches_at_a_new_size(tr, m)


class IndexedBlock(nn.Module):
    """Hugging Face style: a layer_idx each layer keeps (read only with a cache), (cos, sin) passed as a pair."""

    def __init__(self, d, layer_idx, reads_index=False):
        super().__init__()
        self.layer_idx = layer_idx
        self.reads_index = reads_index
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_value=None):
        cos, sin = position_embeddings
        h = self.proj(self.norm(hidden_states))
        h = h * cos + torch.roll(h, 1, dims=-1) * sin
        if past_key_value is not None:
            past_key_value[self.layer_idx] = h
        if self.reads_index:
            h = h * (1.0 + self.layer_idx)
        return (hidden_states + self.out(h) * attention_mask[..., None],)


class IndexedModel(nn.Module):
    def __init__(self, d=12, n=4, reads_index=False):
        super().__init__()
        self.layers = nn.ModuleList(IndexedBlock(d, i, reads_index) for i in range(n))

    def forward(self, h, attention_mask):
        pos = torch.arange(h.shape[1], dtype=h.dtype)[None, :, None]
        freq = torch.linspace(0.1, 1.0, h.shape[2])[None, None, :]
        cos, sin = torch.cos(pos * freq).expand(h.shape[0], -1, -1), torch.sin(pos * freq).expand(h.shape[0], -1, -1)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask, position_embeddings=(cos, sin))[0]
        return h


@pytest.mark.parametrize("reads_index", [False, True])
def test_a_layer_index_its_trace_never_reads_does_not_split_the_layers(exports, reads_index):
    torch.manual_seed(0)
    m = IndexedModel(reads_index=reads_index)
    h, mask = torch.randn(2, 5, 12), torch.ones(2, 5)
    tr = trace_with_report(m, (h, mask))
    # unread: one trace serves all four layers; read: each layer's own index is in its graph
    assert tr.report.shared == [f"4 x IndexedBlock (layers.0 ... layers.3), 1 layer trace(s), "
                                f"{1 if reads_index else 4} call(s) from them"]   # read: layer 0's own call only
    h2, mask2 = torch.randn(3, 7, 12), (torch.rand(3, 7) > 0.3).float()
    _close(_run(tr, h2, mask2)[0], m(h2, mask2).detach())


class TypeChecked(Block):
    def forward(self, h, attention_mask=None, gate=True):
        out, aux = super().forward(h, attention_mask, gate)
        return (out * 2.0 if type(self) is TypeChecked else out), aux


def test_a_layer_that_checks_its_own_type_keeps_it_and_classes_are_left_as_they_were():
    torch.manual_seed(0)
    m = Stack()
    m.blocks = nn.ModuleList(TypeChecked(12) for _ in range(4))
    tr = _trace_stack(m)
    assert tr.report.shared
    for klass in (TypeChecked, Block, nn.Linear, nn.LayerNorm):   # the read recorders are gone
        assert "__getattribute__" not in vars(klass)
    _matches_at_a_new_size(tr, m)
