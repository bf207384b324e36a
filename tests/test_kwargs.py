"""Keyword arguments to compiled modules.

Tensor keyword arguments become graph inputs, like positional ones (dims 0 and 1 symbolic). Constants
(None, bool, int, float, str) are baked into the trace; a call with another keyword signature or other
constants traces again, once, with a warning, instead of reusing a graph that ignores the difference.
"""
import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import TOLERANCE, relative_error
from sessa_compiler.models import SessaLayer

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = TOLERANCE[torch.float32]


class Gated(torch.nn.Module):
    """A Sessa layer behind keyword-controlled gating, scaling and an optional residual."""

    def __init__(self, D=16):
        super().__init__()
        self.layer = SessaLayer(D, n_heads=2)
        self.gate = torch.nn.Linear(D, D)

    def forward(self, x, mask=None, scale=1.0, residual=False):
        y = self.layer(x) * scale
        if mask is not None:
            y = y * torch.sigmoid(self.gate(mask))
        if residual:
            y = y + x
        return y


def call(c, m, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = c(*args, **kwargs)
    with torch.no_grad():
        assert relative_error(out, m(*args, **kwargs)) <= TOL, (len(args), kwargs.keys())
    return [str(w.message) for w in caught if "tracing it again" in str(w.message)]


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_keyword_tensors_and_constants(backend):
    torch.manual_seed(0)
    m = Gated().eval()
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    c = sc.compile(m, (x,), example_kwargs={"mask": mask, "scale": 0.5}, backend=backend)
    assert [v.name for v in c.graph.inputs] == ["x", "mask"]          # the keyword tensor is a graph input
    assert "keyword constants baked into this graph (a call with others traces again): scale=0.5" in c.explain()
    # same signature and constants at new sizes (B and T stay symbolic), keywords in any order: no new trace
    assert call(c, m, torch.randn(3, 11, 16, generator=g), scale=0.5, mask=torch.randn(3, 11, 16, generator=g)) == []
    assert call(c, m, x, mask=mask, scale=0.5) == []
    # another constant, another signature, a tensor where a constant was traced: each traced once
    notes = call(c, m, x, mask=mask, scale=2.0)
    assert len(notes) == 1 and "traced as the constant 0.5, called with 2.0" in notes[0]
    notes = call(c, m, x, mask=mask, scale=0.5, residual=True)
    assert len(notes) == 1 and "keyword arguments ['mask', 'scale'], this call has 1 and ['mask', 'residual', 'scale']" \
        in notes[0]
    assert len(call(c, m, x)) == 1
    assert len(call(c, m, x, mask=None)) == 1     # traced with mask=None baked in, not with a mask tensor
    assert len(c._variants) == 5
    for kwargs in ({"mask": mask, "scale": 2.0}, {"mask": mask, "scale": 0.5, "residual": True}, {}, {"mask": None}):
        assert call(c, m, x, **kwargs) == []       # every variant is reused
    assert "traced graphs: 5, one per keyword-argument signature" in c.explain()


def test_keyword_input_of_a_plain_layer_and_gradients():
    torch.manual_seed(2)
    m = SessaLayer(16, n_heads=2)
    c = sc.compile(m, backend="tvm")
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = c(x=x)                                 # forward(self, x) called by keyword
    out.pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = m(x_ref)
    ref.pow(2).sum().backward()
    assert relative_error(out, ref) <= TOL
    assert relative_error(x.grad, x_ref.grad) <= TOL
    for k, p in m.named_parameters():
        assert relative_error(grads[k], p.grad) <= TOL, k


def test_bad_keyword_values_are_named():
    m = Gated().eval()
    c = sc.compile(m, (torch.randn(1, 4, 16),), backend="eager")
    with pytest.raises(sc.InputError, match=r"keyword argument 'scale' must be a tensor or a constant .*got tuple"):
        c(torch.randn(1, 4, 16), scale=(1.0, 2.0))
    with pytest.raises(sc.InputError, match="cannot take this call: got an unexpected keyword argument 'bogus'"):
        c(torch.randn(1, 4, 16), bogus=1.0)


class VarKeywords(torch.nn.Module):
    """forward(x, **kwargs), reading optional keywords by name (a common adapter signature)."""

    def __init__(self, D=8):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x, **kwargs):
        h = self.lin(x)
        if "bias" in kwargs:
            h = h + kwargs["bias"]
        return h * kwargs.get("scale", 1.0)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_a_forward_taking_var_keywords_compiles(backend):
    # torch.export cannot give **kwargs tensors dynamic shapes; the trace names them in forward's signature
    torch.manual_seed(0)
    m = VarKeywords()
    c = sc.compile(m, backend=backend)
    for T in (5, 9):
        x, b = torch.randn(2, T, 8), torch.randn(2, T, 8)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(c(x, bias=b), m(x, bias=b))
            torch.testing.assert_close(c(x, bias=b, scale=2.0), m(x, bias=b, scale=2.0))
    assert "forward" not in vars(m)   # the trace's signature is gone
    assert len(c._variants) == 2, c.retraces   # one per keyword signature, not per length


class WithConstants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.n_layers = 3

    def forward(self, x):
        return self.lin(x), self.n_layers, {"scale": 0.25, "name": "lin", "extra": None}


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_python_constants_returned_beside_tensors(backend):
    # (a returned int crashed the trace with KeyError)
    torch.manual_seed(0)
    m = WithConstants()
    c = sc.compile(m, backend=backend, validate=True)   # (validation compares the tensors only)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y, n, meta = c(x)
        torch.testing.assert_close(y, m(x)[0])
    assert n == 3 and meta == {"scale": 0.25, "name": "lin", "extra": None}


class PositionalOptional(torch.nn.Module):
    def __init__(self, D=8):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x, attention_mask=None, labels=None):
        h = self.lin(x)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return h if labels is None else (h - labels).square().mean()


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_positional_none_is_a_keyword_constant(backend):
    # model(x, None, labels), the first call included: the None is passed by name (it was "example input 1 must
    # be a tensor", and after a trace "graph takes 3 inputs, got 2")
    torch.manual_seed(0)
    m = PositionalOptional()
    c = sc.compile(m, backend=backend)
    x, mask, labels = torch.randn(2, 5, 8), torch.ones(2, 5), torch.randn(2, 5, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in [(x, None, labels), (x, mask, labels), (x, None), (x,)]:
            torch.testing.assert_close(c(*call), m(*call))
