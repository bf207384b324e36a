"""What a long compile is doing (sessa_compiler/progress.py): shown on a terminal once a step runs past the
delay, with its stage; nothing when stderr is not a terminal, with SESSA_COMPILER_PROGRESS=0 or progress=False."""
import io
import sys

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


@pytest.fixture
def terminal(monkeypatch):
    """stderr as a terminal, inside the test (pytest sets its own capture stream between setup and call)."""
    monkeypatch.setattr(progress, "DELAY", 0.0)  # every step counts as long
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "0")
    monkeypatch.delenv("SESSA_COMPILER_PROGRESS", raising=False)

    def attach():
        err = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", err)
        return err
    return attach


def test_a_long_step_shows_its_stage_on_a_terminal(terminal):
    err = terminal()
    sc.compile(Small().eval(), torch.randn(2, 3, 8), backend="eager")
    assert "sessa_compiler: tracing Small: torch.export" in err.getvalue()


@pytest.mark.parametrize("off", ["argument", "environment", "no terminal"])
def test_progress_can_be_turned_off(terminal, monkeypatch, off):
    if off == "environment":
        monkeypatch.setenv("SESSA_COMPILER_PROGRESS", "0")
    if off == "no terminal":
        monkeypatch.setattr(FakeTerminal, "isatty", lambda self: False)
    err = terminal()
    sc.compile(Small().eval(), torch.randn(2, 3, 8), backend="eager", progress=False if off == "argument" else None)
    assert err.getvalue() == ""


def test_stage_names_what_runs_and_counts(terminal):
    terminal()
    with progress.shown("sessa_compiler: building"):
        progress.stage("kernels", 3, 8)
        status = progress._LOCAL.stack[-1]
        assert status.text() == "sessa_compiler: building: kernels: 3 of 8"
    progress.stage("outside any step")  # nothing shown: no error


@pytest.mark.parametrize("whole_graph", [False, True])
def test_the_tvm_build_says_what_it_builds(terminal, whole_graph):
    """Hybrid mode counts its kernel builds (one per distinct kernel: two identical layers build an attention and a
    feedback kernel, 2 of 2); whole-graph mode names the library build and its distinct kernels."""
    from sessa_compiler.models import SessaLayer

    torch.manual_seed(0)
    m = torch.nn.Sequential(SessaLayer(16, n_heads=2), SessaLayer(16, n_heads=2)).eval()
    err = terminal()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        sc.compile(m, x, backend="tvm", options={"whole_graph": whole_graph})(x)
    text = err.getvalue()
    if whole_graph:
        assert "building the TVM library: 2 distinct generated kernels" in text, text[-2000:]
    else:
        assert "building TVM kernels: 2 of 2" in text and "of 4" not in text, text[-2000:]
