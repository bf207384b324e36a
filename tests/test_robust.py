"""Errors a user can act on, empty sequences, print_ir on every backend, and the DOT view of the IR.

Each test here failed (crash, raw library error, or missing feature) on the code before it was written.
"""
from __future__ import annotations

import inspect
import io
import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.backends import BACKEND_OPTIONS
from sessa_compiler.models import MambaLayer, SessaLayer, TransformerLayer


def small_sessa():
    torch.manual_seed(0)
    return SessaLayer(16, n_heads=2).eval()


# -- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "eager", "tvm"])
def test_a_misspelt_option_names_the_key_and_the_closest_option(backend):
    with pytest.raises(sc.ConfigError, match=r"unknown option 'whole_grpah'; did you mean 'whole_graph'\?"):
        sc.compile(small_sessa(), backend=backend, options={"whole_grpah": False})


def test_an_option_of_another_backend_says_which_backend_takes_it():
    with pytest.raises(sc.ConfigError, match=r"option 'whole_graph' is for backend tvm, not 'eager'"):
        sc.compile(small_sessa(), backend="eager", options={"whole_graph": False})


def test_the_option_table_matches_the_backends_constructors():
    from sessa_compiler.backends.eager import EagerBackend
    from sessa_compiler.backends.triton import TritonBackend
    from sessa_compiler.backends.tvm import TVMBackend

    for name, cls in {"eager": EagerBackend, "triton": TritonBackend, "tvm": TVMBackend}.items():
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        assert sorted(params) == sorted(BACKEND_OPTIONS[name]), name


# -- empty sequences (T = 0) and empty batches ------------------------------------------------------------
@pytest.mark.parametrize("make, backend", [(small_sessa, "eager"), (small_sessa, "tvm"),
                                           (lambda: TransformerLayer(16, 2).eval(), "tvm"),
                                           (lambda: MambaLayer(16).eval(), "eager")],
                         ids=["sessa-eager", "sessa-tvm", "transformer-tvm", "mamba-eager"])
def test_empty_sequences_and_batches_after_tracing(make, backend):
    m = make()
    c = sc.compile(m, (torch.randn(2, 5, 16),), backend=backend)
    with torch.no_grad():
        for x in (torch.randn(2, 0, 16), torch.randn(2, 5, 16)[:, 5:], torch.randn(0, 3, 16)):
            y = c(x)
            assert y.shape == x.shape and y.dtype == x.dtype
        x = torch.randn(2, 3, 16)
        assert sc.api.relative_error(c(x), m(x)) <= 1e-4  # and non-empty calls still run the backend


# -- load_tvm, the tuning cache, data-dependent code --------------------------------------------------------
def test_load_tvm_on_a_missing_directory_a_file_or_a_foreign_directory(tmp_path):
    with pytest.raises(sc.ArtifactError, match=r"does not exist; pass the directory that sessa_compiler.export_tvm"):
        sc.load_tvm(tmp_path / "missing")
    f = tmp_path / "model.so"
    f.write_text("")
    with pytest.raises(sc.ArtifactError, match=r"is a file, expected a directory"):
        sc.load_tvm(f)
    with pytest.raises(sc.ArtifactError, match=r"has no manifest.json"):
        sc.load_tvm(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(sc.ArtifactError, match=r"cannot be read as JSON"):
        sc.load_tvm(tmp_path)


@pytest.mark.filterwarnings("ignore:sessa_compiler cache.*cannot be inspected:UserWarning")   # and the cache is off
def test_a_cache_directory_that_is_a_file_is_a_config_error_when_tuning(tmp_path, monkeypatch):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(f))
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "1")
    with pytest.raises(sc.ConfigError, match=r"SESSA_COMPILER_CACHE_DIR='.*not-a-dir' cannot be used \('.*not-a-dir' is "
                                             r"a file, not a directory\); point SESSA_COMPILER_CACHE_DIR at a writable"), \
            pytest.warns(UserWarning, match=r"compile cache: could not write .*not-a-dir.*NotADirectoryError"):
        # the compile cache, which only speeds compiles up, warns and goes on; the tuning cache is a config error
        sc.tune(small_sessa(), (torch.randn(1, 8, 16),), backend="tvm", budget="1 trials", progress=False)


def test_data_dependent_control_flow_names_the_line(capfd):
    """A forward that branches on a tensor's value has no one graph: exports say so, naming the line; a compiled
    module's calls run the module (test_a_layerdrop_branch_on_a_torch_draw)."""
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x - 1

    with pytest.raises(sc.TraceError) as err:
        sc.export_onnx(Branchy(), (torch.randn(1, 3, 4),), io.BytesIO())
    msg = str(err.value)
    assert "branches on the value of a tensor" in msg and "test_robust.py" in msg and "if x.sum() > 0:" in msg
    assert "torch.where" in msg and len(msg) < 600  # one sentence, not torch's guard dump
    assert "def forward" not in capfd.readouterr().err  # torch's graph dump does not leak to stderr
    c = sc.compile(Branchy(), backend="eager")
    with pytest.warns(UserWarning, match=r"if x.sum\(\) > 0:.*run the original module"):
        for x in (torch.randn(1, 3, 4).abs(), -torch.randn(1, 3, 4).abs()):
            torch.testing.assert_close(c(x), Branchy()(x))
    assert c.uncompiled_calls == 2 and "if x.sum() > 0:" in c.explain()


class LayerDrop(torch.nn.Module):
    """Hugging Face's LayerDrop (OPT, BART, Whisper, BioGPT...): in training, ``torch.rand([]) < p`` skips a layer."""

    def __init__(self, p=0.0, d=8, layers=3):
        super().__init__()
        self.p = p
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            if self.training:
                if torch.rand([]) < self.p:
                    continue
            x = x + torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_a_layerdrop_branch_on_a_torch_draw(p):
    """Training OPT or BART (any layerdrop, 0 included) raised TraceError at the first call: the branch on a fresh
    draw has no one graph. Calls in training mode now run the module itself (one warning), drawing as it does
    (same seed, same layers dropped, same gradients); eval calls, which do not draw, are traced and compiled."""
    torch.manual_seed(0)
    m = LayerDrop(p)
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 5, 8)
    for step in range(3):
        torch.manual_seed(step)
        want = m(x)
        gw = torch.autograd.grad(want.square().sum(), list(m.parameters()), allow_unused=True)
        torch.manual_seed(step)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            got = c(x)
        assert len(said) == (1 if step == 0 else 0)   # once
        gg = torch.autograd.grad(got.square().sum(), list(m.parameters()), allow_unused=True)
        torch.testing.assert_close(got, want)
        for a, b in zip(gg, gw):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
    assert c.uncompiled_calls == 3 and c._traced is None
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x))
    assert c.uncompiled_calls == 3 and c._traced is not None   # eval: the traced graph
    m.train()   # example inputs given to compile(): no error there either, the calls run the module
    c = sc.compile(m, (x,), backend="eager")
    with pytest.warns(UserWarning, match="if torch.rand"):
        got = c(x)
    if p == 0.0:   # (nothing dropped: the module's output)
        torch.testing.assert_close(got, m(x))
    assert c.uncompiled_calls == 1


def test_a_layerdrop_module_evaluated_first_then_trained():
    """Traced in eval mode first, the trace again for training raised InputError ('the module's state changed
    and tracing it again failed'): the training calls now run the module too."""
    torch.manual_seed(0)
    m = LayerDrop(0.0).eval()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x))
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = c(x)
    torch.testing.assert_close(got, m(x))
    assert c.uncompiled_calls == 1 and got.requires_grad


# -- print_ir on every backend, and the IR's graph views ----------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "tvm", "auto"])
def test_print_ir_prints_the_ir_on_every_backend(backend, capsys, monkeypatch):
    """(triton prints the IR after each of its passes: tests/test_triton_compile.py.)"""
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(1, 5, 8)
    sc.compile(m, (x,), backend=backend, print_ir=True)(x)
    err = capsys.readouterr().err
    assert f"// ----- IR run by the {'tvm' if backend == 'auto' else backend} backend" in err
    assert "graph Sequential(" in err and "= linear(" in err
    monkeypatch.setenv("SESSA_COMPILER_PRINT_IR", "1")  # the environment variable, as for triton
    sc.compile(m, (x,), backend=backend)(x)
    assert "// ----- IR run by the " in capsys.readouterr().err
    monkeypatch.setenv("SESSA_COMPILER_PRINT_IR", "0")
    sc.compile(m, (x,), backend=backend)(x)
    assert "// ----- IR" not in capsys.readouterr().err


def test_dot_export_has_every_op_input_and_parameter(tmp_path):
    import pydot

    g = sc.compile(small_sessa(), (torch.randn(1, 5, 16),), backend="eager").graph
    text = g.to_dot(tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == text
    dot = pydot.graph_from_dot_data(text)[0]
    names = {n.get_name() for n in dot.get_nodes()}
    assert sum(n.startswith("op_") for n in names) == len(g.nodes)
    assert sum(n.startswith("param_") for n in names) == len(g.param_values)
    assert "input_0" in names and "return" in names
    labels = " ".join(n.get("label") or "" for n in dot.get_nodes())
    assert "= feedback" in labels and "= attention" in labels
    assert g.to_networkx().number_of_nodes() == len(g.nodes)


def test_a_failed_whole_graph_build_leaves_no_tvm_warning_on_stderr(monkeypatch, capfd):
    """A whole-graph TVM lowering that fails part-way falls back to hybrid mode, and says so in explain();
    TVM's C++ "BlockBuilder destroyed with remaining blocks!" must not reach the user's stderr."""
    import gc

    from sessa_compiler.backends.tvm import relax_lower

    lower = relax_lower._Lowerer.lower

    def failing(self, node):
        if node.op == "tanh":
            raise RuntimeError("injected lowering failure")
        return lower(self, node)

    monkeypatch.setattr(relax_lower._Lowerer, "lower", failing)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()).eval()
    x = torch.randn(1, 3, 8)
    with pytest.warns(UserWarning, match="hybrid mode"):   # hybrid mode is never silent
        c = sc.compile(m, (x,), backend="tvm")
    with torch.no_grad():   # the forward-only program (a call that needs gradients runs the training runner)
        assert sc.api.relative_error(c(x), m(x)) <= 1e-5
    report = c.explain()
    assert "hybrid (whole-graph TVM build failed" in report and "op tanh" in report, report
    assert "RuntimeError: injected lowering failure" in report, report
    del c
    gc.collect()
    assert "BlockBuilder destroyed" not in capfd.readouterr().err


def test_a_forward_that_changes_a_parameter_names_it():
    """nn.Embedding(max_norm=...) renormalises its weight in place: the error said 'an in-place op on an input or a
    buffer' without naming the parameter."""
    class Renormed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4, max_norm=1.0)

        def forward(self, ids):
            return self.emb(ids)

    with pytest.raises(sc.SessaCompilerError, match=r"changes its parameters 'emb.weight' in forward.*max_norm"):
        sc.compile(Renormed(), backend="eager")(torch.randint(0, 10, (2, 3)))
