"""A compiled module used the way any nn.Module is: changed after compile (attributes, hooks, forward methods,
tied weights untied), trained with dropout from a seed, differentiated twice. Each gives the uncompiled module's
answer; none may run a graph traced for the module as it was (frontend/guards.py)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.models import SessaLayer

try:
    import tvm  # noqa: F401
    BACKENDS = ["eager", "tvm"]
except ImportError:
    BACKENDS = ["eager"]

EPS_SCALE = 1.0   # a module global the forward below reads


class Net(nn.Module):
    def __init__(self, D=16, H=2):
        super().__init__()
        self.H = H
        self.lin = nn.Linear(D, 3 * D)
        self.ln = nn.LayerNorm(D)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        B, T, D = x.shape
        x = self.drop(self.ln(x)) * EPS_SCALE
        q, k, v = self.lin(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def _compiled_net(backend):
    """(Net in eval mode, it compiled, an input), seeded."""
    torch.manual_seed(0)
    m = Net().eval()
    return m, sc.compile(m, backend=backend), torch.randn(2, 9, 16)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_call_that_traces_draws_the_modules_dropout_masks(backend):
    """Tracing and the recognisers' probes run dropout on their own inputs: torch's generator is given back as it
    was, so the first call draws the masks the module would and leaves the generator where the module would."""
    torch.manual_seed(0)
    m = Net().train()
    c = sc.compile(copy.deepcopy(m), backend=backend)
    x = torch.randn(2, 11, 16)
    for _ in range(2):
        torch.manual_seed(123)
        want, after = m(x), torch.get_rng_state()
        torch.manual_seed(123)
        got = c(x)
        _close(got, want)
        assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradients_through_the_core_ops(backend):
    """create_graph=True (a gradient penalty): the core ops' backward is differentiated again (it used to return
    constants, so the second-order gradient silently lost the core ops' part: 0.5 off in 28)."""
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=2, n_kv_heads=1)
    c = sc.compile(copy.deepcopy(m), backend=backend)
    for T in (1, 9):
        xr = torch.randn(2, T, 32, requires_grad=True)
        xc = xr.detach().clone().requires_grad_()
        gr, = torch.autograd.grad(m(xr).square().sum(), xr, create_graph=True)
        gc, = torch.autograd.grad(c(xc).square().sum(), xc, create_graph=True)
        _close(gc, gr)
        pr = torch.autograd.grad(gr.square().sum(), [xr, *m.parameters()])
        pc = torch.autograd.grad(gc.square().sum(), [xc, *c.parameters()])
        for a, b in zip(pc, pr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(16))
        self.scale2 = self.scale          # one Parameter under two names

    def forward(self, tok):
        return self.head(torch.tanh(self.embed(tok)) * self.scale + self.scale2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_untying_tied_parameters_after_compile(backend):
    torch.manual_seed(0)
    m = Tied()
    c = sc.compile(m, backend=backend)
    tok = torch.randint(0, 50, (2, 7))
    _close(c(tok), m(tok))
    m.head.weight = nn.Parameter(m.embed.weight.detach() * 2)
    _close(c(tok), m(tok))
    m.scale2 = nn.Parameter(torch.full((16,), 5.0))
    _close(c(tok), m(tok))
    assert len(c.retraces) == 2 and all("tied" in r for r in c.retraces), c.retraces


class Cfg:
    def __init__(self):
        self.gain = 1.0


class Configured(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * self.cfg.gain


@pytest.mark.parametrize("backend", BACKENDS)
def test_attributes_changed_after_the_first_call_trace_again(backend, monkeypatch):
    m, c, x = _compiled_net(backend)
    with torch.no_grad():
        _close(c(x), m(x))
        m.ln.eps = 1.0                                   # a value the trace baked in
        _close(c(x), m(x))
        assert "'ln.eps' changed (1e-05 -> 1.0)" in c.retraces[-1], c.retraces
        monkeypatch.setattr(__import__(__name__), "EPS_SCALE", 3.0)   # a global the forward reads
        _close(c(x), m(x))
        assert "EPS_SCALE" in c.retraces[-1], c.retraces
        monkeypatch.undo()
        m.ln.eps = 1e-5                                  # back as it was: the first graph, not a new trace
        n = len(c.retraces)
        _close(c(x), m(x))
        assert len(c.retraces) == n and len(c._variants) == 3, c.retraces
        for _ in range(3):                               # nothing changes: nothing traced again
            _close(c(x), m(x))
        assert len(c.retraces) == n
    cfg = Cfg()
    m2 = Configured(cfg)
    c2 = sc.compile(m2, backend=backend)
    with torch.no_grad():
        _close(c2(x), m2(x))
        cfg.gain = 2.5                                   # a config object's field, changed in place
        _close(c2(x), m2(x))
        assert "cfg" in c2.retraces[-1], c2.retraces


def test_dropout_annealed_in_training_traces_again():
    torch.manual_seed(0)
    m = Net().train()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 9, 16)
    c(x)
    m.drop.p = 0.0
    _close(c(x), m(x))
    assert "drop.p" in c.retraces[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_and_forward_methods_set_after_compile(backend, monkeypatch):
    m, c, x = _compiled_net(backend)
    with torch.no_grad():
        _close(c(x), m(x))
        h = m.lin.register_forward_hook(lambda mod, inp, out: out * 2)     # a submodule's hook
        _close(c(x), m(x))
        h.remove()
        _close(c(x), m(x))
        h = m.register_forward_hook(lambda mod, inp, out: out + 1)         # a hook on the original
        _close(c(x), m(x))
        h.remove()
        h = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, inp, out: out * 0.5 if isinstance(mod, nn.LayerNorm) else None)   # a global hook
        try:
            _close(c(x), m(x))
        finally:
            h.remove()
        f = m.out.forward
        m.out.forward = lambda t: f(t) * 3                                   # an instance's forward
        _close(c(x), m(x))
        del m.out.forward
        _close(c(x), m(x))
        monkeypatch.setattr(nn.LayerNorm, "forward", lambda self, t: t * 0.25)   # a class's forward
        _close(c(x), m(x))
        assert "LayerNorm.forward was replaced" in c.retraces[-1], c.retraces
    assert any("a forward method was set on the instance 'out'" in r for r in c.retraces), c.retraces
    assert any("hooks" in r for r in c.retraces), c.retraces


def test_a_training_loop_traces_once():
    """The guard does not mistake what a training loop changes (weights, optimizer state, grads) for a change."""
    torch.manual_seed(0)
    m = Net().train()
    c = sc.compile(m, backend="eager")
    opt = torch.optim.AdamW(c.parameters(), lr=1e-3)
    for _ in range(3):
        loss = c(torch.randn(2, 9, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert c.retraces == []


class Outer(nn.Module):
    """A model that checkpoints a compiled layer, as Hugging Face models do with gradient_checkpointing."""

    def __init__(self, layer, reentrant):
        super().__init__()
        self.inp, self.layer, self.out = nn.Linear(32, 32), layer, nn.Linear(32, 32)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.layer, self.inp(x), use_reentrant=self.reentrant)
        return self.out(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("traced_first", [True, False])
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_compiled_layer_inside_activation_checkpointing(backend, traced_first, reentrant):
    """Non-reentrant checkpointing stops its recomputation by raising through the ops (the interpreter used to
    wrap that into its own error) and counts the tensors saved in the forward and the recomputation (a first
    call that traced inside it saved the trace's tensors too)."""
    torch.manual_seed(0)
    ref = Outer(SessaLayer(32, n_heads=2), reentrant)
    m = copy.deepcopy(ref)
    m.layer = sc.compile(m.layer, backend=backend)
    x = torch.randn(2, 9, 32)
    if traced_first:
        with torch.no_grad():
            m.layer(torch.randn(1, 4, 32))
    ref(x).square().mean().backward()
    m(x).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", [True, False])
def test_functional_call_with_the_originals_names_and_the_compiled_ones(backend, first):
    """torch.func.functional_call takes the original's parameter names (as torch.compile's wrapper does) or the
    compiled module's own ("_orig_mod." first), also as the call that traces (where the swapped-in tensors are
    not Parameters, which torch.export refuses)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    ref = SessaLayer(32, n_heads=2)
    c = sc.compile(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, 8, 32)
    if not first:
        c(x)
    other = {k: torch.randn_like(v) * 0.2 for k, v in ref.named_parameters()}
    want = functional_call(ref, other, (x,))
    _close(functional_call(c, {"_orig_mod." + k: v for k, v in other.items()}, (x,)), want)
    _close(functional_call(c, other, (x,)), want)
    _close(c(x), ref(x))   # its own weights again after


class _TopLevelScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = SessaLayer(32, n_heads=2)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.layer(x) * self.scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_of_a_top_level_parameter(backend):
    """A parameter of the root module itself: functional_call swaps it by setattr on the compiled module (its name
    is not among the wrapper's own parameters), which used to reach nn.Module.__setattr__ of the original and
    raise (a plain tensor for a Parameter slot)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    ref = _TopLevelScale()
    c = sc.compile(copy.deepcopy(ref), backend=backend)
    x = torch.randn(2, 8, 32)
    c(x)
    other = {"scale": torch.tensor(-0.5)}
    _close(functional_call(c, other, (x,)), functional_call(ref, other, (x,)))
    assert isinstance(c.original.scale, nn.Parameter) and c.original.scale.item() == 1.5
    _close(c(x), ref(x))   # its own weights again after
    with pytest.raises(TypeError, match="cannot assign"):   # a plain assignment is refused, as on the module
        c.scale = torch.tensor(2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_run_the_interpreter(backend):
    """grad and vmap wrap tensors that kernels cannot read: such calls run the interpreter's torch ops."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    ref = SessaLayer(32, n_heads=2)
    c = sc.compile(copy.deepcopy(ref), backend=backend)
    x = torch.randn(1, 8, 32)
    c(x)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    gr = grad(lambda p: functional_call(ref, p, (x,)).square().sum())(params)
    gc = grad(lambda p: functional_call(c, p, (x,)).square().sum())(params)
    for k in params:
        torch.testing.assert_close(gc[k], gr[k], rtol=1e-4, atol=1e-5, msg=k)
    xs = torch.randn(3, 2, 7, 32)
    with torch.no_grad():
        _close(vmap(c)(xs), vmap(ref)(xs))


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0
        self.last = None

    def forward(self, x):
        self.calls += 1
        y = self.lin(x)
        self.last = y.detach()
        return y


def test_attributes_a_forward_sets_are_reported():
    """The traced graph has no Python side effects: a forward that sets attributes is said to (a warning at the
    trace, and explain()), never silently left stale."""
    c = sc.compile(Counting(), backend="eager")
    with pytest.warns(UserWarning, match=r"its forward sets \(or changes in place\) 'calls', 'last'"):
        c(torch.randn(2, 3, 4))
    assert "side effects not repeated by compiled calls: the forward sets calls, last" in c.explain()
    quiet = sc.compile(Net(), backend="eager")
    quiet(torch.randn(1, 3, 16))
    assert "side effects" not in quiet.explain()


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(Counting())
        self.history, self.stats = [], {}

    def forward(self, x):
        y = self.block(x)
        self.history.append(y.shape[1])   # changed in place: no setattr
        self.stats["mean"] = y.mean()
        return y


def test_containers_a_forward_changes_in_place_are_reported():
    c = sc.compile(Recording(), backend="eager")
    with pytest.warns(UserWarning, match=r"'block\.0\.calls', 'block\.0\.last', 'history', 'stats'"):
        c(torch.randn(2, 3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_serving_follows_changes_made_between_calls(backend):
    """prefill / decode_step / generate run the traced graph without a forward call: they check the module as a
    forward call does (weights reassigned, load_state_dict(assign=True), a changed attribute traces again)."""
    from sessa_compiler.models import Decoder

    torch.manual_seed(3)
    m = Decoder(50, 32, "S", n_heads=2).eval()
    c = sc.compile(m, backend=backend)
    p = torch.randint(0, 50, (2, 6))
    tok = torch.tensor([3, 4])

    def same():
        yc, cache = c.prefill(p, c.init_cache(2))
        ym, _ = m.prefill(p, m.init_cache(2))
        _close(yc, ym)
        tc, _ = c.decode_step(tok, cache)
        _close(tc, m(torch.cat([p, tok[:, None]], 1))[:, -1])
        assert torch.equal(c.generate(p, 5), m.generate(p, 5))

    with torch.no_grad():
        same()
        m.lm_head.weight = nn.Parameter(torch.randn_like(m.lm_head.weight))     # a new Parameter
        same()
        m.load_state_dict({k: torch.randn_like(v) * 0.3 if v.is_floating_point() else v
                           for k, v in m.state_dict().items()}, assign=True)
        same()
        m.layers[0].ln.eps = 10.0                                                # an attribute
        same()
        assert any("ln.eps" in r for r in c.retraces), c.retraces


class LabelsLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.layer, self.head = nn.Embedding(50, 32), SessaLayer(32, n_heads=2), nn.Linear(32, 50)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.layer(self.embed(input_ids)))
        if labels is None:
            return logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)), logits

    def init_cache(self, batch, device=None, dtype=None, max_len=None):
        return self.layer.init_cache(batch, max_len=max_len)

    def prefill(self, ids, cache):
        y, cache = self.layer.prefill(self.embed(ids), cache)
        return self.head(y), cache


def test_prefill_after_a_forward_with_labels():
    """The last forward call computed a loss (not servable): init_cache allocates at the prefill, which traces
    the call it is given, instead of refusing the loss graph."""
    torch.manual_seed(0)
    m = LabelsLM().eval()
    c = sc.compile(m, backend="eager")
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        c(ids, labels=ids)
        y, _ = c.prefill(ids, c.init_cache(2))
        _close(y, m(ids))


class LMLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, input_ids, labels):
        logits = self.head(self.embed(input_ids))
        return F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)), logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias", ["same", "view"])
def test_traced_with_one_tensor_given_twice(backend, alias):
    """model(ids, labels=ids), the usual causal-LM call: torch.export makes one input of the two, and the graph
    used to read labels where the module reads input_ids (a wrong loss for every later call with other labels,
    also from the compile cache)."""
    torch.manual_seed(0)
    m = LMLoss()
    ids = torch.randint(0, 50, (2, 8))
    c = sc.compile(m, backend=backend)
    c(ids, ids if alias == "same" else ids[:, :])
    again = sc.compile(m, backend=backend)   # from the compile cache
    again(ids, ids)
    for B, T in ((2, 8), (3, 5)):
        a, lab = torch.randint(0, 50, (B, T)), torch.randint(0, 50, (B, T))
        with torch.no_grad():
            want = m(a, lab)
            for comp in (c, again):
                got = comp(a, lab)
                _close(got[0], want[0])
                _close(got[1], want[1])


class Copies(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        k = self.kind
        if k == "clone":
            return x.clone(), self.lin(x)
        if k == "add0":
            return x + 0, self.lin(x)
        if k == "cat":
            return torch.cat([x]), self.lin(x)
        if k == "twice":
            h = self.lin(x)
            return h, h.clone()
        if k == "weight":
            return self.w.clone(), self.w * 1
        if k == "identity":                    # the module's own aliases stay aliases
            return x, self.lin(x)
        if k == "transposed_contiguous":       # a copy in torch (the transpose is not contiguous)
            return x.t().contiguous(), self.lin(x)
        if k == "weight_t_contiguous":
            return self.lin.weight.t().contiguous(), self.lin(x)
        if k == "contiguous_of_contiguous":    # x itself in torch
            return x[:2].contiguous(), self.lin(x)
        raise AssertionError(k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["clone", "add0", "cat", "twice", "weight", "identity", "transposed_contiguous",
                                  "weight_t_contiguous", "contiguous_of_contiguous"])
def test_outputs_share_storage_only_where_the_modules_do(backend, kind):
    """A copy the module makes (x.clone(), x + 0, h and h.clone(), w.clone(), x.t().contiguous()) is a new tensor:
    the simplifier or TVM's passes turned some into identities (the IR has no contiguous), and the output was the
    caller's input, a weight or the other output, so an in-place edit of it changed those."""
    if backend == "tvm" and kind == "contiguous_of_contiguous":
        pytest.skip("a view of an input comes back as a copy on tvm (docs/user_guide.md)")
    torch.manual_seed(0)
    m = Copies(kind)
    c = sc.compile(m, backend=backend)
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = m(x)
        got = c(x)
        for g, w in zip(got, want):
            _close(g, w)
        ptr = lambda t: t.untyped_storage().data_ptr()   # noqa: E731
        theirs = {ptr(x), ptr(m.w), ptr(m.lin.weight)}
        for g, w in zip(got, want):
            assert (ptr(g) in theirs) == (ptr(w) in theirs), kind
        assert (ptr(got[0]) == ptr(got[1])) == (ptr(want[0]) == ptr(want[1])), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_ids_of_another_integer_dtype_trace_again(backend):
    from sessa_compiler.models import Decoder

    torch.manual_seed(0)
    m = Decoder(50, 32, "S", n_heads=2).eval()
    c = sc.compile(m, backend=backend)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        c(ids)
        _close(c(ids.int()), m(ids.int()))
        assert torch.equal(c.generate(ids.int(), 3), m.generate(ids.int(), 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_first_call_with_an_empty_batch_or_sequence(backend):
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=2).eval()
    c = sc.compile(m, backend=backend)
    for shape in ((0, 5, 32), (2, 0, 32), (2, 7, 32)):
        x = torch.randn(shape)
        with torch.no_grad():
            got = c(x)
            assert got.shape == m(x).shape
            _close(got, m(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_serving_after_a_dtype_change(backend):
    """.double() converts the parameters in place: serving after it (the trace was float32) traces again instead
    of running the float32 graph on float64 weights (a crash), and its caches take the new dtype."""
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=2).eval()
    ref = copy.deepcopy(m).double()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        c(x)
        c.double()
        y, cache = c.prefill(x.double(), c.init_cache(2))
        r, _ = ref.prefill(x.double(), ref.init_cache(2))
        assert y.dtype == torch.float64 and all(v.dtype == torch.float64 for v in cache.values()
                                                if isinstance(v, torch.Tensor) and v.is_floating_point())
        torch.testing.assert_close(y, r)


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(50, 16), nn.Embedding(64, 16), nn.Linear(16, 50)

    def forward(self, ids, position_ids):
        return self.out(self.tok(ids) + self.pos(position_ids))   # position_ids may broadcast over the batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_batch", [2, 1])
def test_position_ids_of_batch_1_beside_a_batch(backend, first_batch):
    """position_ids [1, T] beside ids [B, T] (broadcast over the batch, as Hugging Face models allow) was refused
    ("dimension B is 2 elsewhere but 1 here"): such a dim stays 1 in the trace, and a call that broadcasts where
    the trace did not (or the other way round) traces again."""
    torch.manual_seed(0)
    m = WithPositions()
    c = sc.compile(m, backend=backend)
    pos = torch.arange(3, 10)[None]
    with torch.no_grad():
        for B in (first_batch, 3 - first_batch, 3):
            ids = torch.randint(0, 50, (B, 7))
            _close(c(ids, pos), m(ids, pos))
            _close(c(ids, pos.expand(B, -1)), m(ids, pos.expand(B, -1)))


class StepLoop(nn.Module):
    """A recurrence written as a Python loop over time: torch.export unrolls it, so each length is a trace."""

    def __init__(self, D=8):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.decay = nn.Parameter(torch.rand(D) * 0.5 + 0.4)

    def forward(self, x):
        u = self.inp(x)
        h, ys = torch.zeros_like(u[:, 0]), []
        for t in range(x.shape[1]):
            h = self.decay * h + u[:, t]
            ys.append(h)
        return torch.stack(ys, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_past_max_traces_calls_run_the_original_module(backend):
    # a graph per length; past max_traces a new length runs the module uncompiled (one warning), the traced
    # lengths stay compiled, every answer is the module's
    torch.manual_seed(0)
    m = StepLoop().eval()
    c = sc.compile(m, backend=backend, max_traces=2)
    with torch.no_grad(), pytest.warns(UserWarning, match="tracing it again"):
        for T in (3, 4):
            x = torch.randn(2, T, 8)
            torch.testing.assert_close(c(x), m(x))
    assert len(c._variants) == 2 and c.uncompiled_calls == 0
    with torch.no_grad(), pytest.warns(UserWarning, match=r"max_traces=2.*run the original module uncompiled"):
        x = torch.randn(2, 5, 8)
        torch.testing.assert_close(c(x), m(x))
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")   # said once
        for T in (6, 3, 4):
            x = torch.randn(1, T, 8)
            torch.testing.assert_close(c(x), m(x))
    assert len(c._variants) == 2 and c.uncompiled_calls == 2   # T = 5 and 6; 3 and 4 ran their graphs
    assert "uncompiled calls: 2" in c.explain()
    # gradients of an uncompiled call are the module's
    x = torch.randn(1, 7, 8, requires_grad=True)
    c(x).square().sum().backward()
    g = x.grad.clone(); x.grad = None
    m(x).square().sum().backward()
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_max_traces_must_be_positive_int_or_none(bad):
    with pytest.raises(sc.ConfigError, match="max_traces"):
        sc.compile(nn.Linear(2, 2), max_traces=bad)


class Optional(nn.Module):
    SCALE = 1.0   # a class constant the forward reads

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.register_buffer("shift", None)   # an optional buffer, set later

    def act(self, h):
        return torch.tanh(h)

    def forward(self, x):
        h = self.act(self.l1(x)) * self.SCALE
        if hasattr(self, "gate"):              # an optional parameter (added for fine-tuning)
            h = h * self.gate
        if self.shift is not None:
            h = h + self.shift
        return h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["parameter", "buffer", "none_buffer_set", "class_constant", "class_method"])
def test_parameters_buffers_and_class_state_changed_after_the_trace(change, backend):
    torch.manual_seed(0)
    m = Optional()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        c(x)
    saved = dict(vars(Optional))
    try:
        if change == "parameter":
            m.register_parameter("gate", nn.Parameter(torch.full((8,), 0.5)))
        elif change == "buffer":
            m.register_buffer("gate", torch.full((8,), 0.5))
        elif change == "none_buffer_set":
            m.shift = torch.full((8,), 10.0)
        elif change == "class_constant":
            Optional.SCALE = 3.0
        else:
            Optional.act = lambda self, h: torch.sigmoid(h)
        with torch.no_grad():
            torch.testing.assert_close(c(x), m(x))
        assert len(c.retraces) == 1, c.retraces
    finally:
        Optional.SCALE, Optional.act = saved["SCALE"], saved["act"]


class LayerDrop(nn.Module):
    """Hugging Face's LayerDrop: each layer skipped in training when a Python random draw falls under p."""

    def __init__(self, p=0.5):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.layerdrop = p

    def forward(self, x):
        import random
        for layer in self.layers:
            if self.training and random.uniform(0, 1) < self.layerdrop:
                continue
            x = x + layer(x)
        return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_random_draws_in_forward_are_not_baked_into_a_graph(backend):
    # the trace would keep one draw for every call: such calls run the module (said once), the trace leaves
    # Python's random state as it was, and eval mode (no draw) is compiled
    import random
    torch.manual_seed(0)
    m = LayerDrop()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 3, 8)
    random.seed(0)
    outs = set()
    with pytest.warns(UserWarning, match="random.uniform"):
        for _ in range(6):
            state = random.getstate()
            y = c(x)
            random.setstate(state)
            torch.testing.assert_close(y, m(x))
            outs.add(round(y.sum().item(), 4))
    assert len(outs) > 1
    m.eval()
    calls = c.uncompiled_calls
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x))
    assert c.uncompiled_calls == calls and not c._traced.python_random


def test_batchnorm_in_training_mode_is_a_clear_error():
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5))
    with pytest.raises(sc.TraceError, match="'1.running_mean'.*BatchNorm in training mode.*eval mode"):
        sc.compile(m, backend="eager")(torch.randn(2, 5, 8))
    m.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(sc.compile(m, backend="eager")(x), m(x))


class MadeFloats(nn.Module):
    def forward(self, x):
        return x + torch.arange(x.shape[1]) / 10.0   # a float tensor of torch's default dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_changed_default_dtype_traces_again(backend):
    m = MadeFloats()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 3, 5)[:, :, 0]   # [2, 5, 5]
    with torch.no_grad():
        c(x)
        before = torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch.float64)
            y, want = c(x), m(x)
            assert y.dtype == want.dtype == torch.float64
            torch.testing.assert_close(y, want)
            assert "default dtype" in c.retraces[-1]
        finally:
            torch.set_default_dtype(before)


class CastsItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x.to(self.lin.weight.dtype)))


def test_a_module_that_casts_its_input_takes_other_float_dtypes():
    """After a float32 call, a float64 input was an InputError although the module casts it; a module that does
    not cast its input still gets the InputError (once traced, then at once)."""
    torch.manual_seed(0)
    m = CastsItsInput()
    c = sc.compile(m, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a graph per input dtype: no warning
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float32):
            x = torch.randn(2, 5, 8, dtype=dtype)
            out = c(x)
            assert out.dtype == torch.float32 and relative_error(out, m(x)) <= 1e-6
    layer = sc.compile(SessaLayer(16, n_heads=2), backend="eager")
    layer(torch.randn(2, 5, 16))
    for _ in range(2):
        with pytest.raises(sc.InputError, match=r"expected dtype torch.float32 .* got torch.float64"):
            layer(torch.randn(2, 5, 16, dtype=torch.float64))
    assert len(layer._variants) == 1 and len(layer._refused_dtypes) == 1
    layer.double()   # the module's own dtype moved: a new trace without a warning, as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        assert relative_error(layer(x), layer.original(x)) <= 1e-10


class FrozenEmbeddingLM(nn.Module):
    """A frozen embedding under trainable layers checkpointed (reentrant), as PEFT trains with gradient
    checkpointing; Hugging Face's enable_input_require_grads hooks the embedding so that its output requires
    grad (else the reentrant checkpoint sees no input that requires grad and the layers get no gradient)."""

    def __init__(self, vocab=20, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d).requires_grad_(False)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = torch.utils.checkpoint.checkpoint(lambda x, layer=layer: x + torch.tanh(layer(x)), h,
                                                  use_reentrant=True)
        return self.head(h)


def make_inputs_require_grads(module, input, output):   # transformers' PreTrainedModel.enable_input_require_grads
    output.requires_grad_(True)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_enable_input_require_grads_stays_compiled(backend):
    """A forward hook that returns None counts as one kept for its side effects, so every call ran the original
    module (PEFT with gradient checkpointing never ran compiled). A hook whose code can only call requires_grad_ on
    its arguments has no effect the compiled graph's gradients need: calls stay compiled, gradients equal."""
    torch.manual_seed(0)
    m = FrozenEmbeddingLM()
    m.emb.register_forward_hook(make_inputs_require_grads)
    c = sc.compile(m, backend=backend)
    ids = torch.randint(0, 20, (2, 7))
    trained = [p for p in m.parameters() if p.requires_grad]

    def grads(f):   # (a reentrant checkpoint gives its parameters' gradients to backward(), not autograd.grad)
        for p in trained:
            p.grad = None
        out = f(ids)
        out.square().sum().backward()
        return out.detach(), [p.grad for p in trained]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # (the reentrant checkpoint's own warnings)
        want, gw = grads(m)
        got, gg = grads(c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, gw):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert c.uncompiled_calls == 0 and not c._traced.hook_effects


# -- edits the guard used to miss (each gave the old graph's answer, no retrace) ---------------------------------
K_STATIC = 1.0
K_NOGRAD = 1.0


class _Scaler:
    """A plain helper object (not a module) the forward calls."""

    factor = 1.0

    def apply(self, x):
        return x * self.factor


class _Rotary(nn.Module):
    @torch.no_grad()   # as Hugging Face's rotary embeddings decorate their forward
    def forward(self, x):
        return x * K_NOGRAD


class _Edited(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.rot, self.scaler = nn.Linear(8, 8), _Rotary(), _Scaler()
        self.pad_value = 0

    @staticmethod
    def gain(x):
        return x * K_STATIC

    def forward(self, x):
        y = self.scaler.apply(self.gain(self.rot(self.lin(x))))
        return torch.cat([y, torch.full((x.shape[0], 1, 8), self.pad_value)], 1)


class _GatedLinear(nn.Linear):
    def forward(self, x):
        return torch.sigmoid(super().forward(x))


def _edit_static():
    globals()["K_STATIC"] = 3.0


def _edit_no_grad_forward():
    globals()["K_NOGRAD"] = 2.0


def _edit_helper_class(m):
    type(m.scaler).factor = 3.0


@pytest.mark.parametrize("edit", ["staticmethod global", "no_grad forward global", "helper class attribute",
                                  "helper method", "class swap", "int to float", "set on the compiled module"])
def test_edits_the_guard_used_to_miss(edit):
    torch.manual_seed(0)
    m = _Edited().eval()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 3, 8)
    saved = (K_STATIC, K_NOGRAD, _Scaler.factor, _Scaler.apply)
    try:
        with torch.no_grad():
            torch.testing.assert_close(c(x), m(x))
            if edit == "staticmethod global":
                _edit_static()
            elif edit == "no_grad forward global":
                _edit_no_grad_forward()
            elif edit == "helper class attribute":
                _edit_helper_class(m)
            elif edit == "helper method":
                _Scaler.apply = lambda self, x: x - 1
            elif edit == "class swap":
                m.lin.__class__ = _GatedLinear
            elif edit == "int to float":
                m.pad_value = 0.0
            else:
                c.lin = nn.Linear(8, 8)
                c.pad_value = 2
                assert c.original.pad_value == 2 and c.lin is m.lin
            got, want = c(x), m(x)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)
        assert c.retraces
    finally:
        globals()["K_STATIC"], globals()["K_NOGRAD"], _Scaler.factor, _Scaler.apply = saved


def test_len_and_truth_of_a_compiled_container():
    seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    c = sc.compile(seq, backend="eager")
    assert len(c) == 2 and bool(c)
    assert bool(sc.compile(nn.Linear(4, 4), backend="eager"))
    with pytest.raises(TypeError):
        len(sc.compile(nn.Linear(4, 4), backend="eager"))


class _CFG:
    """A settings class (Kaggle style: values set from the environment or argparse at start-up)."""

    scale = 1.0


class _Settings:
    scale = 1.0   # an instance whose values are class attributes


class _Configured(nn.Module):
    def __init__(self, held):
        super().__init__()
        self.lin, self.cfg = nn.Linear(8, 8), held

    def forward(self, x):
        return self.lin(x) * self.cfg.scale


@pytest.mark.parametrize("held", ["class", "instance"])
def test_a_settings_class_the_module_holds_is_guarded_and_keyed(held):
    from sessa_compiler.compile_cache import module_key

    klass = _CFG if held == "class" else _Settings
    torch.manual_seed(0)
    m = _Configured(klass if held == "class" else klass())
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 3, 8)
    key = module_key(m, (x,), None, ())
    try:
        with torch.no_grad():
            torch.testing.assert_close(c(x), m(x))
            klass.scale = 3.0
            torch.testing.assert_close(c(x), m(x))
        assert c.retraces
        # the compile cache's key too: another process whose class holds another value misses
        assert key is not None and module_key(m, (x,), None, ()) != key
    finally:
        klass.scale = 1.0


class _NumpyGain(nn.Module):
    def __init__(self):
        super().__init__()
        import numpy as np

        self.lin = nn.Linear(8, 8)
        self.channel_gain = np.ones(8, dtype=np.float32)

    def forward(self, x):
        return self.lin(x) * torch.from_numpy(self.channel_gain)


def test_a_numpy_array_edited_in_place_traces_again_also_after_a_cache_hit(monkeypatch, tmp_path):
    """numpy arrays have no version counter and were compared by identity: after a trace from the compile cache
    (whose constant is a copy, not the array) an in-place edit gave the old values (error 5.3)."""
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "1")
    x = torch.randn(2, 3, 8)
    for first in (True, False):
        torch.manual_seed(0)
        m = _NumpyGain()
        c = sc.compile(m, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(c(x), m(x))
            assert c.trace_cache == ("miss" if first else "hit")
            m.channel_gain[0] = 5.0
            torch.testing.assert_close(c(x), m(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_submodule_inside_a_compiled_module_does_not_retrace_it(backend):
    """The outer guard used to read the inner compiled module's own state (its trace, set by its first call) and
    a global of sessa_compiler.api: every call after the inner one's first traced the outer again, up to
    max_traces. An edit of the inner original still traces it again."""
    torch.manual_seed(0)
    inner = sc.compile(SessaLayer(16, n_heads=2), backend=backend)
    par = nn.Sequential(nn.Linear(8, 16), inner, nn.Linear(16, 8))
    outer = sc.compile(par, backend=backend)
    for T in (5, 7, 9):
        x = torch.randn(2, T, 8)
        _close(outer(x), par(x))
    assert outer.retraces == [], outer.retraces
    inner.original.mixer.gamma_max = 0.5   # through the inner original: the outer module traces again
    x = torch.randn(2, 6, 8)
    _close(outer(x), par(x))
    assert len(outer.retraces) == 1 and "gamma_max" in outer.retraces[0], outer.retraces


class _Features(nn.Module):
    """forward(**features) reads its keywords in the call's order (multimodal inputs by name)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, **features):
        return self.proj(torch.cat(list(features.values()), dim=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keywords_a_forward_takes_as_kwargs_keep_the_calls_order(backend, tmp_path, monkeypatch):
    """export sorts keywords by name: a forward reading **kwargs in order got the sorted order's result for any
    call (error 2.0 for c(text=..., audio=...)). The order is now the call's, and part of the call's signature
    (another order: a trace of its own), in the compile cache's key too."""
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    m = _Features()
    text, audio = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):   # the second compile: its traces from the compile cache
            c = sc.compile(m, backend=backend)
            for kw in (dict(text=text, audio=audio), dict(audio=audio, text=text), dict(text=text, audio=audio)):
                _close(c(**kw), m(**kw))
            assert len(c._variants) == 2
