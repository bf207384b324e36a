"""torch.compile(module, backend="sessa"): the dynamo backend compiles captured graphs with Sessa ops with this
compiler and sends the others to a fallback backend.

Each check compares with the module's own eager outputs. The fallback is Inductor by default; on the 2-core CPU
machine Inductor takes about a minute per graph, so the tests pass options={"fallback": "eager"} and check the
default by recording the name the backend looks up."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import math
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler import dynamo as sd
from sessa_compiler.errors import ConfigError
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer
from sessa_compiler.tolerance import TOLERANCE, relative_error
from tests.model_helpers import NeoxRopeAttention, randomize

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = pathlib.Path(__file__).resolve().parent.parent
FP32 = TOLERANCE[torch.float32]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    sd.reports.clear()
    yield
    torch._dynamo.reset()


class Calls:
    """Counts the calls that reach a compiled graph of the sessa backend (not dynamo's graph as torch code)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = sd.SessaGraph.__call__

        def counted(graph, *args):
            self.count += 1
            return original(graph, *args)
        monkeypatch.setattr(sd.SessaGraph, "__call__", counted)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _reference_layer():
    if not os.environ.get("SESSA_REFERENCE_DIR"):
        pytest.skip("the public reference implementation is not shipped here: "
                    "git clone https://github.com/LibratioAI/sessa and set SESSA_REFERENCE_DIR to the clone (docs/testing.md)")
    sys.path.insert(0, os.environ["SESSA_REFERENCE_DIR"])
    from sessa import SessaLayer as RefLayer

    return RefLayer(32, n_heads=4, n_kv_heads=2)


MODELS = {
    # (GPT-NeoX RoPE: its fold's channel order is a reshape that holds dynamo's fixed batch size)
    "NeoX RoPE attention": (NeoxRopeAttention, lambda T, g: torch.randn(2, T, 32, generator=g), {"attention"}),
    # name: (module factory, input at sequence length T, core ops every graph must hold)
    "SessaLayer": (lambda: SessaLayer(32, n_heads=4), lambda T, g: torch.randn(2, T, 32, generator=g),
                   {"attention", "feedback"}),
    "Decoder-SMTS": (lambda: Decoder(50, 32, "SMTS", n_heads=4), lambda T, g: torch.randint(0, 50, (2, T), generator=g),
                     {"attention", "feedback", "scan"}),
    "MambaLayer": (lambda: MambaLayer(16), lambda T, g: torch.randn(2, T, 16, generator=g), {"scan"}),
    "reference SessaLayer": (_reference_layer, lambda T, g: torch.randn(2, T, 32, generator=g),
                             {"attention", "feedback"}),
}


def test_backend_name_is_registered_and_declared():
    assert "sessa" in torch._dynamo.list_backends()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["torch_dynamo_backends"]
    assert declared == {"sessa": "sessa_compiler.dynamo:sessa_backend"}
    assert torch._dynamo.lookup_backend("sessa") is sd.sessa_backend


def test_importing_the_package_does_not_load_dynamo():
    """The name is registered when dynamo loads (importing it with the package would cost more than a second)."""
    program = ("import sys, sessa_compiler\n"
               "print('torch._dynamo' in sys.modules)\n"
               "import torch._dynamo\n"
               "print('sessa' in torch._dynamo.list_backends())\n"
               "from sessa_compiler import dynamo\n"
               "print(torch._dynamo.lookup_backend('sessa') is dynamo.sessa_backend)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True", "True"], out.stdout


def test_entry_point_works_without_importing_the_package(tmp_path):
    """An installed package's entry point (the one pyproject.toml declares, written as installed metadata) lets
    torch.compile(backend="sessa") load this package itself: no import of sessa_compiler in the program, and no
    duplicate registration when the import registers the name too."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["torch_dynamo_backends"]
    dist = tmp_path / "sessa_dynamo_entry_point_check-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sessa-dynamo-entry-point-check\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[torch_dynamo_backends]\n" +
                                           "".join(f"{k} = {v}\n" for k, v in declared.items()))
    program = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())\n"
        "c = torch.compile(m, backend='sessa', options={'fallback': 'eager'})\n"
        "x = torch.randn(2, 3, 8)\n"
        "assert torch.equal(c(x), m(x))\n"
        "from sessa_compiler import dynamo\n"
        "print(len(dynamo.reports), dynamo.reports[-1].compiled, 'sessa' in torch._dynamo.list_backends())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "False", "True"], out.stdout


@pytest.mark.parametrize("name", list(MODELS))
def test_sessa_ops_run_on_this_compiler_at_static_then_dynamic_lengths(name, monkeypatch):
    """dynamo's first graph has static sizes: recognised at those sizes. A call at another length recompiles with
    a dynamic sequence dim; that graph is recognised at symbolic T and serves further lengths without a trace."""
    make, data, want_ops = MODELS[name]
    module = randomize(make())
    calls = Calls(monkeypatch)
    compiled = torch.compile(module, backend="sessa", fullgraph=True,
                             options={"backend": "eager", "fallback": "eager"})
    g = torch.Generator().manual_seed(0)
    for i, T in enumerate((12, 7, 20)):
        x = data(T, g)
        with torch.no_grad():
            got, want = compiled(x), module(x)
        assert relative_error(got, want) <= FP32, (T, relative_error(got, want))
        assert calls.count == i + 1  # every call ran on the sessa backend's compiled graph
    assert len(sd.reports) == 2, [r.reason for r in sd.reports]
    static, dynamic = sd.reports
    assert (static.compile_id, dynamic.compile_id) == ("0/0", "0/1")
    for report in (static, dynamic):
        assert report.compiled and report.backend == "eager", report.reason
        assert want_ops <= set(report.core_ops), report.explain
    assert static.dynamic_dims == ()
    assert (0, 1) in dynamic.dynamic_dims


def test_graph_without_sessa_ops_falls_back_to_inductor_by_default(monkeypatch):
    asked = []
    real_lookup = torch._dynamo.lookup_backend

    def lookup(name):
        asked.append(name)
        return real_lookup("aot_eager" if name == "inductor" else name)  # Inductor takes a minute on 2 cores
    monkeypatch.setattr(sd, "_lookup_backend", lookup)
    calls = Calls(monkeypatch)
    module = MLP().eval()
    compiled = torch.compile(module, backend="sessa", fullgraph=True, options={"backend": "eager"})
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert relative_error(compiled(x), module(x)) <= FP32
    assert asked == ["inductor"] and calls.count == 0
    (report,) = sd.reports
    assert not report.compiled and report.backend == "inductor" and report.core_ops == {}
    assert "no attention, feedback or scan" in report.reason


def test_non_causal_transformer_block_falls_back(monkeypatch):
    """Attention without a causal mask is no IR attention: torch's encoder layer, in both modes, falls back."""
    calls = Calls(monkeypatch)
    for training in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        module.train(training)
        compiled = torch.compile(module, backend="sessa", fullgraph=True, options={"fallback": "eager"})
        x = torch.randn(2, 9, 32)
        assert relative_error(compiled(x), module(x)) <= FP32
    assert [r.compiled for r in sd.reports] == [False, False] and calls.count == 0
    assert all("no attention, feedback or scan" in r.reason for r in sd.reports)


def test_unknown_option_is_a_config_error():
    compiled = torch.compile(MLP(), backend="sessa", options={"feedback_chunk": 32})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:  # dynamo wraps the backend's error
        compiled(torch.randn(2, 5, 16))
    assert isinstance(info.value.inner_exception, ConfigError), info.value
    assert "feedback_chunk_size" in str(info.value.inner_exception)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        torch.compile(MLP(), backend="sessa", mode="max-autotune")(torch.randn(2, 5, 16))
    assert isinstance(info.value.inner_exception, ConfigError) and "modes are Inductor's" in str(info.value)


@pytest.mark.parametrize("backend", ["eager", "tvm", "triton"])
def test_training_steps_match_eager_and_read_live_weights(backend):
    """Gradients flow through the compiled graph (TVM trains through its own kernels, backends/training.py;
    Triton, on CPU tensors under its interpreter, runs the forward and recomputes the backward on eager), and the optimiser's in-place updates are seen by the next call:
    three SGD steps equal eager's."""
    torch.manual_seed(0)
    module = SessaLayer(16, n_heads=2)
    twin = SessaLayer(16, n_heads=2)
    twin.load_state_dict(module.state_dict())
    compiled = torch.compile(module, backend="sessa", fullgraph=True, options={"backend": backend})
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for T in (8, 8, 8):
        x, target = torch.randn(2, T, 16, generator=g), torch.randn(2, T, 16, generator=g)
        for m, o in ((compiled, opt), (twin, opt_twin)):
            loss = torch.nn.functional.mse_loss(m(x), target)
            o.zero_grad()
            loss.backward()
            o.step()
    for (name, p), q in zip(module.named_parameters(), twin.parameters()):
        assert relative_error(p, q) <= FP32, name
    assert sd.reports[-1].compiled and sd.reports[-1].backend == backend


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = SessaLayer(32, n_heads=4)

    def forward(self, x, scale: float):
        return self.layer(x) * scale


def test_dynamic_true_numbers_are_constants_checked_at_each_call(monkeypatch):
    """dynamic=True passes Python floats (a layer norm's eps, a float argument) as tensors without guarding their
    values: they are traced as constants, and a call with another value runs dynamo's graph as torch code (with a
    warning) instead of using a stale constant."""
    module = randomize(Scaled())
    calls = Calls(monkeypatch)
    compiled = torch.compile(module, backend="sessa", fullgraph=True, dynamic=True,
                             options={"backend": "eager", "fallback": "eager"})
    g = torch.Generator().manual_seed(0)
    for T in (12, 5):
        x = torch.randn(3, T, 32, generator=g)
        with torch.no_grad():
            assert relative_error(compiled(x, 0.5), module(x, 0.5)) <= FP32
    assert len(sd.reports) == 1 and sd.reports[0].compiled, [r.reason for r in sd.reports]
    assert {(0, 0), (0, 1)} <= set(sd.reports[0].dynamic_dims)
    assert calls.count == 2
    x = torch.randn(3, 6, 32, generator=g)
    with torch.no_grad(), pytest.warns(UserWarning, match="runs dynamo's graph as torch code"):
        got = compiled(x, 0.25)
    with torch.no_grad():
        assert relative_error(got, module(x, 0.25)) <= FP32
    assert len(sd.reports) == 1  # no recompile: the value changed under the same graph


def test_compiled_module_under_the_sessa_backend():
    """torch.compile of a module sessa_compiler.compile made sees the original's code, and compiles it here."""
    module = randomize(SessaLayer(32, n_heads=4))
    compiled = torch.compile(sc.compile(module, backend="eager"), backend="sessa", fullgraph=True,
                             options={"backend": "eager", "fallback": "eager"})
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert relative_error(compiled(x), module(x)) <= FP32
    assert sd.reports[-1].compiled and {"attention", "feedback"} <= set(sd.reports[-1].core_ops)


class Broken(torch.nn.Module):
    """A Sessa layer, a graph break, then an MLP: dynamo captures two graphs."""

    def __init__(self):
        super().__init__()
        self.layer = SessaLayer(16, n_heads=2)
        self.mlp = MLP()

    def forward(self, x):
        y = self.layer(x)
        torch._dynamo.graph_break()
        return self.mlp(y)


def test_each_graph_of_a_broken_frame_goes_its_own_way(monkeypatch):
    module = randomize(Broken())
    calls = Calls(monkeypatch)
    compiled = torch.compile(module, backend="sessa", options={"backend": "eager", "fallback": "eager"})
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        assert relative_error(compiled(x), module(x)) <= FP32
    assert [r.compiled for r in sd.reports] == [True, False], [r.reason for r in sd.reports]
    assert calls.count == 1
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(module, backend="sessa", fullgraph=True, options={"fallback": "eager"})(x)


def test_inductor_failure_runs_the_graph_as_torch_code(monkeypatch):
    def lookup(name):
        assert name == "inductor"

        def broken(gm, example_inputs):
            raise RuntimeError("no C++ compiler")
        return broken
    monkeypatch.setattr(sd, "_lookup_backend", lookup)
    module = MLP().eval()
    compiled = torch.compile(module, backend="sessa", fullgraph=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), pytest.warns(UserWarning, match="Inductor could not compile"):
        got = compiled(x)
    with torch.no_grad():
        assert torch.equal(got, module(x))


def test_reports_take_slices_and_stay_bounded():
    from sessa_compiler.dynamo import ReportLog, reports

    assert isinstance(reports, ReportLog) and reports.maxlen == 64
    log = ReportLog([1, 2, 3], maxlen=2)
    assert log[-2:] == [2, 3] and log[0] == 2 and list(log) == [2, 3]


def test_an_empty_batch_or_sequence_goes_to_the_fallback():
    """dynamo specialises a size 0; the recognisers' probes failed on it (max() of an empty tensor) and the
    call raised BackendCompilerFailed."""
    torch._dynamo.reset()
    module = SessaLayer(32, n_heads=2)
    compiled = torch.compile(module, backend="sessa", options={"backend": "eager", "fallback": "eager"})
    for shape in ((0, 5, 32), (2, 0, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert compiled(x).shape == module(x).shape == shape
    assert any("empty" in (r.reason or "") for r in sd.reports)


class LearnedTemperature(torch.nn.Module):
    """Causal attention whose scores are scaled by a per-head temperature (equal at init)."""

    def __init__(self, D=16, H=2, trainable=True):
        super().__init__()
        self.H, self.hd = H, D // H
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.o = torch.nn.Linear(D, D)
        self.logit_scale = torch.nn.Parameter(torch.full((H, 1, 1), -0.5 * math.log(self.hd)), requires_grad=trainable)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, self.hd).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * self.logit_scale.exp()
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


def test_a_trainable_parameter_is_never_folded_and_folded_buffers_are_checked_at_each_call():
    """A recognised op built from a trainable parameter's values would give it no gradient: that graph goes to the
    fallback. A frozen one (or a buffer) an op was built from is checked at each call: edited in place, the call
    runs dynamo's graph as torch code."""
    torch.manual_seed(0)
    m = LearnedTemperature()
    c = torch.compile(m, backend="sessa", options={"backend": "eager", "fallback": "eager"})
    x = torch.randn(2, 9, 16)
    c(x).pow(2).sum().backward()
    got = m.logit_scale.grad.clone()
    assert not sd.reports[-1].compiled and "logit_scale" in sd.reports[-1].reason
    m.zero_grad()
    m(x).pow(2).sum().backward()
    torch.testing.assert_close(got, m.logit_scale.grad)

    torch._dynamo.reset()
    frozen = LearnedTemperature(trainable=False).eval()
    c = torch.compile(frozen, backend="sessa", options={"backend": "eager", "fallback": "eager"})
    with torch.no_grad():
        assert relative_error(c(x), frozen(x)) <= FP32
        assert sd.reports[-1].compiled
        frozen.logit_scale.fill_(-0.5)
        with pytest.warns(UserWarning, match="logit_scale"):
            y = c(x)
        assert relative_error(y, frozen(x)) <= FP32


def test_a_static_length_of_one_claims_no_rotary_embedding():
    """At one position every rotation is the identity: a graph dynamo traced at T = 1 proves no RoPE fold."""
    torch.manual_seed(0)
    m = LearnedTemperature(trainable=False).eval()
    c = torch.compile(m, backend="sessa", options={"backend": "eager", "fallback": "eager"})
    x = torch.randn(2, 1, 16)
    with torch.no_grad():
        assert relative_error(c(x), m(x)) <= FP32
    assert sd.reports[-1].compiled and "rope folded" not in sd.reports[-1].explain


def test_the_size_checks_print_no_traceback(capfd):
    """The trace checks the graph against the module at sizes 1 and 0, where a Mamba layer's conv1d raises: the
    fx GraphModule torch.compile hands over printed that error's traceback to stderr at each new length."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Decoder(100, 32, "SMT", n_heads=4).eval()
    c = torch.compile(m, backend="sessa")
    with torch.no_grad():
        for T in (1, 2, 5):
            x = torch.randint(0, 100, (1, T))
            assert relative_error(c(x), m(x)) <= TOLERANCE[torch.float32]
    assert "Traceback" not in capfd.readouterr().err
