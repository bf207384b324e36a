"""What the module's Python reads beyond its own attributes, checked at every call (frontend/guards.py): config
objects inside config objects and ones with __slots__, what a hook holds (an object's fields, a closure, a global
its code reads), helpers reached through an imported module, globals changed in place; and hooks a traced graph
cannot run (forward hooks kept for their side effects, backward hooks), for which the module itself runs."""
from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch
import torch.nn as nn

import sessa_compiler as sc

import helpers_patched_ops

try:
    import tvm  # noqa: F401
    BACKENDS = ["eager", "tvm"]
except ImportError:
    BACKENDS = ["eager"]

SCALES = {"out": 1.0}       # a global dict the forward reads, changed in place below
ALPHA = [1.0]               # a global list a hook reads
_LOG = logging.getLogger("sessa_compiler.tests.guard_reach")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class Act:
    kind: str = "gelu"
    clip: float = 10.0


@dataclasses.dataclass
class Config:
    hidden: int = 16
    act: Act = dataclasses.field(default_factory=Act)


class Slotted:
    __slots__ = ("clip",)

    def __init__(self, clip):
        self.clip = clip


class Reads(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = Config()
        self.limits = Slotted(10.0)
        self.log = logging.getLogger("sessa_compiler.tests.guard_reach.module")   # state that changes by itself
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        _LOG.isEnabledFor(logging.DEBUG)
        self.log.debug("forward")
        h = self.fc(x)
        h = torch.nn.functional.gelu(h) if self.config.act.kind == "gelu" else torch.relu(h)
        h = helpers_patched_ops.act(h.clamp(max=self.config.act.clip).clamp(max=self.limits.clip))
        return h * SCALES["out"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_slotted_module_attribute_and_in_place_global_state(backend, monkeypatch):
    torch.manual_seed(0)
    m = Reads().eval()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 16) * 4
    with torch.no_grad():
        for _ in range(3):   # loggers created and queried between calls change no graph
            logging.getLogger(f"sessa_compiler.tests.guard_reach.other{_}")
            _close(c(x), m(x))
        assert c.retraces == []
        m.config.act.clip = 0.1                      # a field of a config inside a config
        _close(c(x), m(x))
        m.config.act.kind = "relu"
        _close(c(x), m(x))
        m.limits.clip = 0.05                         # a __slots__ object's field
        _close(c(x), m(x))
        monkeypatch.setitem(SCALES, "out", 3.0)      # a global dict changed in place
        _close(c(x), m(x))
        monkeypatch.setattr(helpers_patched_ops, "act", torch.sigmoid)   # rebound in an imported module
        _close(c(x), m(x))
    assert len(c.retraces) == 5, c.retraces


class Steer:
    def __init__(self, vec):
        self.vec, self.coef, self.enabled = vec, 1.0, True

    def __call__(self, mod, inp, out):
        return out + self.coef * self.vec if self.enabled else out


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_a_hook_holds_is_checked(backend):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval()
    steer = Steer(torch.randn(8))
    m[0].register_forward_hook(steer)
    scale = [1.0]
    m[2].register_forward_hook(lambda mod, inp, out: out * scale[0] * ALPHA[0])
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        _close(c(x), m(x))
        steer.coef = 3.0                 # an attribute of a callable hook object
        _close(c(x), m(x))
        steer.enabled = False
        _close(c(x), m(x))
        steer.enabled = True
        steer.vec.mul_(5)                # a tensor it holds, in place
        _close(c(x), m(x))
        steer.vec = torch.randn(8)
        _close(c(x), m(x))
        scale[0] = -2.0                  # a closure cell's list
        _close(c(x), m(x))
        ALPHA[0] = 0.5                   # a global the hook's code reads
        try:
            _close(c(x), m(x))
        finally:
            ALPHA[0] = 1.0
    assert c.uncompiled_calls == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forward_hook_kept_for_its_side_effect_runs_with_the_module(backend):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    feats = []
    m[0].register_forward_hook(lambda mod, inp, out: feats.append(out.detach()))
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = c(x)
        feats.clear()                           # (the trace called the hook once, on its fake tensors)
        y2 = c(torch.randn(2, 6, 16))
    assert any("forward hook" in str(x.message) and "uncompiled" in str(x.message) for x in w)
    _close(y, m(x))
    assert len(feats) == 2 and all(type(f) is torch.Tensor for f in feats) and feats[0].shape == (2, 6, 32)
    assert y2.shape == (2, 6, 16) and c.retraces == []
    assert "hooks a graph cannot run" in c.explain()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_backward_hooks_are_honoured(backend, when):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    calls = []

    def double(mod, grad_in, grad_out):
        calls.append(1)
        return (grad_in[0] * 2,)

    if when == "before":
        m[2].register_full_backward_hook(double)
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        c(x)
    if when == "after":
        m[2].register_full_backward_hook(double)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c(x).sum().backward()
    got = [p.grad.clone() for p in m.parameters()]
    n = len(calls)
    m.zero_grad()
    m(x).sum().backward()
    assert n == len(calls) - n == 1
    for a, p in zip(got, m.parameters()):
        _close(a, p.grad)
    with torch.no_grad():   # no gradients: compiled
        before = c.uncompiled_calls
        _close(c(x), m(x))
        assert c.uncompiled_calls == before


class Branches(nn.Module):
    """A forward that takes another path with gradients on, or when a weight is frozen."""

    def __init__(self, on: str):
        super().__init__()
        self.on = on
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        if self.on == "grad" and torch.is_grad_enabled():
            h = h * 2
        if self.on == "inference" and torch.is_inference_mode_enabled():
            h = h * 3
        if self.on == "frozen" and not self.a.weight.requires_grad:
            h = h * 4
        if self.on == "input" and x.requires_grad:
            h = h * 5
        return h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on", ["grad", "inference", "frozen", "input"])
def test_a_forward_that_asks_the_grad_mode_or_requires_grad_traces_per_answer(on, backend):
    torch.manual_seed(0)
    m = Branches(on)
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        c(x)
    if on == "frozen":
        m.a.weight.requires_grad_(False)
    if on == "input":
        x = x.clone().requires_grad_(True)
    ctx = torch.inference_mode() if on == "inference" else torch.enable_grad()
    with ctx:
        got, want = c(x), m(x)
    _close(got, want)
    assert len(c.retraces) == 1, c.retraces


class _OutHead(nn.Module):
    """Reads its submodule ``self.out``: the name ``out`` is among its code's names, but not a global it reads."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.out(self.hidden(x).relu()) + BIAS[0]


out = None                  # a script's global named like _OutHead's attribute, rebound by the loop below
BIAS = [torch.zeros(8)]     # a global _OutHead reads (an inference tensor in the second test)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_global_named_like_an_attribute_is_not_read_by_it(backend):
    """``self.out`` does not read the global ``out``: a training loop rebinding ``out = compiled(x)`` every step
    retraced every call (then ran uncompiled past max_traces), and a global ``out`` holding an inference tensor
    made the first call raise and the module unusable after it."""
    global out
    torch.manual_seed(0)
    model = _OutHead()
    compiled = sc.compile(model, backend=backend)
    x = torch.randn(2, 5, 8)
    with torch.inference_mode():
        out = model(x)   # an inference tensor: no version counter
    opt = torch.optim.SGD(compiled.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a retrace would warn
        for _ in range(4):
            out = compiled(x)
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert compiled.retraces == [] and compiled.uncompiled_calls == 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_global_inference_tensor_the_forward_reads_is_compared_by_content(backend):
    torch.manual_seed(0)
    model = _OutHead()
    compiled = sc.compile(model, backend=backend)
    x = torch.randn(2, 5, 8)
    with torch.inference_mode():
        BIAS[0] = torch.zeros(8)
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
            with torch.inference_mode():
                BIAS[0].add_(1.0)   # in place, where no version counter counts it
            torch.testing.assert_close(compiled(x), model(x))   # (a stale graph: 1.0 off)
    finally:
        BIAS[0] = torch.zeros(8)


def test_a_trace_whose_preparation_fails_leaves_the_earlier_graph_serving(monkeypatch):
    """A failure after a new trace (preparing its runner) raises, and the module keeps serving the sizes its
    earlier graph fits; it used to be left half set up (every later call: a bare StopIteration)."""
    torch.manual_seed(0)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            return self.l(x) * (2.0 if x.shape[1] > 6 else 1.0)

    model = Branchy()
    compiled = sc.compile(model, backend="eager")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        backend = compiled._backend

        def broken(*a, **k):
            raise RuntimeError("preparation failed")

        monkeypatch.setattr(backend, "prepare", broken)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="preparation failed"):
                compiled(torch.randn(2, 9, 8))   # another path: a new trace
        monkeypatch.undo()
        torch.testing.assert_close(compiled(x), model(x))   # the first graph still serves T = 5
        y = torch.randn(2, 9, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(compiled(y), model(y))
