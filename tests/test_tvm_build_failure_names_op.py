"""Issue 22, point 3: when TVM's own build of the whole graph (tvm.compile after the Relax lowering) fails, the
export's error and compile(backend="tvm")'s hybrid-mode warning name the IR op and the user's line that cause it,
not only TVM's internal message (which names TVM's functions and variables). A Relax form is broken on purpose:
it emits a kernel that reads a variable nothing defines, which Relax accepts and TVM's build rejects."""
from __future__ import annotations

import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.backends.tvm import relax_fallback
from sessa_compiler.errors import SessaCompilerError


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = torch.sigmoid(self.proj(x)) * 2
        running = h.cumsum(1)
        flags = torch.isnan(running)   # the op whose Relax form is broken below
        return flags, running.exp() + 1, (h * h).sum(-1)


def _broken_isnan(a):
    from tvm import te, tirx

    def build(data):
        undefined = tirx.Var("undefined_n", "int64")
        return te.compute(data.shape, lambda *i: tirx.Cast("bool", data(*i) + tirx.Cast(data.dtype, undefined)),
                          name="broken")

    return a.lw.bb.emit_te(build, a.tensor("self"))


@pytest.fixture
def broken_isnan(monkeypatch):
    monkeypatch.setitem(relax_fallback.RELAX_FORMS, "isnan", _broken_isnan)


def _names_the_op(msg: str):
    assert "op fallback(aten.isnan.default) %isnan" in msg, msg
    assert "test_tvm_build_failure_names_op.py:" in msg and "torch.isnan(running)" in msg, msg   # the user's line


def test_export_tvm_names_the_op_and_line_whose_relax_form_tvm_cannot_build(broken_isnan, tmp_path):
    with pytest.raises(SessaCompilerError) as info:
        sc.export_tvm(_Layer(), (torch.randn(2, 5, 4),), tmp_path / "tvm")
    msg = str(info.value)
    _names_the_op(msg)
    assert "undefined_n" in msg   # TVM's own reason is kept after ours


def test_compile_tvm_hybrid_warning_and_explain_name_the_op_and_line(broken_isnan):
    module, x = _Layer(), torch.randn(2, 5, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled = sc.compile(module, backend="tvm")
        got = compiled(x)
    hybrid = [str(w.message) for w in seen if "hybrid mode" in str(w.message)]
    assert len(hybrid) == 1, [str(w.message) for w in seen]
    _names_the_op(hybrid[0])
    _names_the_op(compiled.explain())
    for g, w in zip(got, module(x)):   # hybrid mode still gives the module's values
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
