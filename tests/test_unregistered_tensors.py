"""Tensors that require grad but are not registered parameters (a plain attribute trained by hand, a Parameter in
a Python list): torch.export lifts them as constants, so a traced graph gave them no gradient (None on tvm for
both, on eager for the list's), silently. Calls that need gradients now run the module itself, with a warning;
calls under no_grad stay compiled."""
import warnings

import pytest
import torch

import sessa_compiler as sc

pytestmark = pytest.mark.usefixtures("one_thread")


class HandTrained(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.scale = torch.ones(8, requires_grad=True)
        self.extra = [torch.nn.Parameter(torch.full((8,), 0.5))]

    def forward(self, x):
        return self.lin(x) * self.scale + self.extra[0]


def grads(f, m, x, w):
    m.scale.grad = None
    m.extra[0].grad = None
    m.lin.weight.grad = None
    (f(x) * w).sum().backward()
    return m.scale.grad, m.extra[0].grad, m.lin.weight.grad


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_tensors_trained_outside_the_parameters_get_their_gradients(backend):
    torch.manual_seed(0)
    m = HandTrained()
    x, w = torch.randn(2, 5, 8), torch.randn(8)
    c = sc.compile(m, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x))   # compiled: no gradient needed
    assert c.uncompiled_calls == 0
    want = grads(m, m, x, w)
    with pytest.warns(UserWarning, match=r"not registered parameters \(scale, extra\[0\]\)"):
        got = grads(c, m, x, w)
    for g, r in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, r)
    m.scale.requires_grad_(False)
    m.extra[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = c(x)
    assert out.requires_grad and c.uncompiled_calls == 1   # nothing unregistered trains now: compiled again
