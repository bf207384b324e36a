"""Identical layers are recognised once (issue 23 point 2): a model of N structurally identical layers costs one
layer's recognition probes, layers that differ in structure or in a constant the region reads are probed
separately, and the compiled model still equals the module."""
import importlib

import pytest
import torch
import torch.nn as nn

import sessa_compiler as sc
from model_helpers import randomize
from sessa_compiler.frontend import trace_with_report
from sessa_compiler.models import Decoder, SessaLayer

probe_module = __import__("sessa_compiler.frontend.probe", fromlist=["probe"])


def _count_probe_runs(monkeypatch, module, x):
    """(evaluations of a candidate region by the probes, the trace)."""
    calls = []
    real = probe_module.run_graph

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(probe_module, "run_graph", counting)
    tr = trace_with_report(module, (x,))
    monkeypatch.setattr(probe_module, "run_graph", real)
    return len(calls), tr


def _core(tr, op):
    return sum(n.op == op for n in tr.graph.nodes)


def test_identical_layers_run_the_probes_once(monkeypatch):
    tokens = torch.randint(0, 50, (1, 9))
    one, tr1 = _count_probe_runs(monkeypatch, randomize(Decoder(50, 16, "S", n_heads=2)), tokens)
    three, tr3 = _count_probe_runs(monkeypatch, randomize(Decoder(50, 16, "SSS", n_heads=2)), tokens)
    assert one > 0
    assert three == one, (one, three)   # without the memo: three times one
    assert _core(tr3, "attention") == _core(tr3, "feedback") == 3
    assert tr3.report.probes.reused > 0 and tr3.report.probes.run == tr1.report.probes.run
    assert len(tr3.report.accepted) == 3 * len(tr1.report.accepted)


def test_other_structure_is_probed_again(monkeypatch):
    x = torch.randn(1, 7, 16)
    h2, _ = _count_probe_runs(monkeypatch, randomize(SessaLayer(16, n_heads=2)), x)
    h4, _ = _count_probe_runs(monkeypatch, randomize(SessaLayer(16, n_heads=4)), x)
    both, tr = _count_probe_runs(monkeypatch, randomize(nn.Sequential(SessaLayer(16, n_heads=2),
                                                                      SessaLayer(16, n_heads=4))), x)
    # the attention and rope regions of the 4-head layer are probed on their own; the feedback region (one head
    # over D) is the 2-head layers' and is probed once (a probe per length, one more with large sources, and its
    # position masks evaluated twice: at the longest probe length and at MASK_CHECK_LENGTH)
    assert both == h2 + h4 - len(probe_module.PROBE_LENGTHS) - 1 - 2, (h2, h4, both)
    assert _core(tr, "attention") == _core(tr, "feedback") == 2


def test_a_changed_constant_is_probed_again_and_decided_on_its_own(monkeypatch):
    """The layers' masks are buffers the attention region reads: one layer whose mask lets every row see the
    future is not causal attention, though its structure is the other layers'; a reused decision would fuse it
    and answer wrongly."""
    tokens = torch.randint(0, 50, (2, 9))
    one, _ = _count_probe_runs(monkeypatch, randomize(Decoder(50, 16, "S", n_heads=2, max_len=16)), tokens)
    dec = randomize(Decoder(50, 16, "SSS", n_heads=2, max_len=16))
    with torch.no_grad():
        dec.layers[1].mixer.causal_mask_f_full.zero_()          # bidirectional attention in layer 1
        dec.layers[2].mixer.rope_inv_freq.mul_(0.5)             # other rotary frequencies in layer 2
    calls = []
    real = probe_module.run_graph
    monkeypatch.setattr(probe_module, "run_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = sc.compile(dec, (tokens,), backend="eager")
    monkeypatch.setattr(probe_module, "run_graph", real)
    tr = c._traced
    assert len(calls) > one
    assert _core(tr, "attention") == 2 and _core(tr, "feedback") == 3
    assert sum("not causal softmax attention" in r for r in tr.report.rejected) == 1
    assert sum("rope folded" in a for a in tr.report.accepted) == 2
    with torch.no_grad():
        for T in (1, 16):
            t = torch.randint(0, 50, (2, T))
            torch.testing.assert_close(c(t), dec(t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_identical_layers_match_the_module(backend):
    dec = randomize(Decoder(50, 16, "SS", n_heads=2))
    c = sc.compile(dec, (torch.randint(0, 50, (1, 8)),), backend=backend)
    text = c.explain()
    assert text.count("recognised attention") == 2
    assert "identical layers traced once: 2 x SessaLayer (layers.0 ... layers.1), 1 layer trace(s), 2 call(s) from them" in text
    assert "answered by an earlier probe of a structurally identical region" in text
    with torch.no_grad():
        for T in (1, 13):
            t = torch.randint(0, 50, (2, T))
            torch.testing.assert_close(c(t), dec(t), rtol=1e-4, atol=1e-4)


_WARM = """
import sys
import torch
import sessa_compiler as sc
from sessa_compiler.models import SessaLayer
torch.manual_seed(0)
m = SessaLayer(16, n_heads=2).eval()
x = torch.randn(1, 8, 16)
c = sc.compile(m, (x,), backend="eager")
loaded = "torch._dynamo" in sys.modules
if sys.argv[1] == "warm":
    graphs = []
    f = torch.compile(c, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert len(graphs) == 1 and any("nonstrict" in t for t in calls), calls
print(c.trace_cache, loaded)
"""


def test_a_trace_from_the_cache_does_not_load_dynamo_and_torch_compile_still_works(tmp_path):
    """A warm compile skips torch.export, so nothing loads torch._dynamo (~1 s); torch.compile of the compiled
    module still records its one non-strict call (the wrapper is made when dynamo first traces it)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, SESSA_COMPILER_CACHE_DIR=str(tmp_path), SESSA_COMPILER_COMPILE_CACHE="1",
               PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = [subprocess.run([sys.executable, "-c", _WARM, kind], env=env, capture_output=True, text=True, timeout=300)
           for kind in ("cold", "warm")]
    assert all(r.returncode == 0 for r in run), [r.stderr[-2000:] for r in run]
    assert run[0].stdout.split() == ["miss", "True"] and run[1].stdout.split() == ["hit", "False"]


def _tvm_work(monkeypatch, layers: str, whole_graph: bool):
    """(tvm.compile calls, TIR functions of the whole-graph program after legalisation) for compile + first call."""
    import tvm
    from tvm import relax

    tvm_build = importlib.import_module("sessa_compiler.backends.tvm.build")
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "0")      # every build happens here
    monkeypatch.setattr(tvm_build, "_CACHE", {})                   # and the in-process kernel cache is empty
    modules = []
    real = tvm.compile
    monkeypatch.setattr(tvm, "compile", lambda mod, *a, **k: modules.append(mod) or real(mod, *a, **k))
    dec = randomize(Decoder(50, 16, layers, n_heads=2))
    t = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        c = sc.compile(dec, (t,), backend="tvm", options={"whole_graph": whole_graph})
        torch.testing.assert_close(c(t), dec(t), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(tvm, "compile", real)
    tir = [sum(isinstance(f, tvm.tirx.PrimFunc) for f in relax.transform.LegalizeOps()(m).functions.values())
           for m in modules] if whole_graph else []
    return len(modules), tir


@pytest.mark.parametrize("whole_graph", [False, True])
def test_identical_layers_build_their_tvm_kernels_once(monkeypatch, whole_graph):
    """Hybrid mode builds one kernel per distinct spec (an attention and a feedback kernel for any number of identical
    layers); whole-graph mode builds one library whose TIR functions are one layer's (Relax keeps one PrimFunc per
    structurally equal function)."""
    one = _tvm_work(monkeypatch, "S", whole_graph)
    four = _tvm_work(monkeypatch, "SSSS", whole_graph)
    assert four == one, (one, four)
    assert one[0] == (1 if whole_graph else 2)
