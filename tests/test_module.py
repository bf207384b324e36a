"""A compiled module behaves like the torch module it came from: the original is a real submodule (its
parameters, buffers and state_dict keys), weights are read live at every call, moves and modes reach
it and re-prepare, dropout is honoured in training mode, it pickles, and concurrent calls are safe.

Every check compares with the original module's own outputs."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import io
import pickle
import threading

import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.models import SessaLayer

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["eager", "tvm", "triton", "auto"]
TOL = 1e-4


def layer():
    torch.manual_seed(0)
    return SessaLayer(16, n_heads=2, n_kv_heads=1).eval()


class Small(torch.nn.Module):
    """Builds on TVM in a fraction of a Sessa layer's time: for checks that do not depend on the model."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.lin(x)))


def small():
    torch.manual_seed(0)
    return Small().eval()


def close(compiled, module, x, tol=TOL):
    with torch.no_grad():
        got, want = compiled(x), module(x)
    err = relative_error(got, want)
    assert err <= tol, err
    return got


def fresh_weights(module, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) * scale if v.is_floating_point() else v.clone())
            for k, v in module.state_dict().items()}


def test_the_original_is_a_real_submodule():
    m = layer()
    c = sc.compile(m, backend="eager")
    assert c.original is m and c._orig_mod is m
    assert [p for p in c.parameters()] == [p for p in m.parameters()]   # the same Parameter objects
    assert [b for b in c.buffers()] == [b for b in m.buffers()]
    assert any(mod is m for mod in c.modules())
    assert list(c.state_dict()) == list(m.state_dict())  # the original's keys, no prefix
    assert dict(c.named_parameters()).keys() == {"_orig_mod." + k for k, _ in m.named_parameters()}
    # an optimiser built on the compiled module updates the original's weights
    before = m.W_in.weight.detach().clone()
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    c(torch.randn(2, 5, 16)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, m.W_in.weight)
    # load_state_dict both ways, and inside a parent module
    other = layer()
    sd = fresh_weights(m)
    c.load_state_dict(sd)
    assert torch.equal(m.W_in.weight, sd["W_in.weight"])
    other.load_state_dict(c.state_dict())
    assert torch.equal(other.W_in.weight, sd["W_in.weight"])
    c.load_state_dict({"_orig_mod." + k: v * 2 for k, v in sd.items()})  # named_parameters() keys also load
    assert torch.equal(m.W_in.weight, 2 * sd["W_in.weight"])
    parent = torch.nn.Sequential(c)
    assert list(parent.state_dict()) == ["0." + k for k in m.state_dict()]
    parent.load_state_dict({"0." + k: v for k, v in sd.items()})
    assert torch.equal(m.W_in.weight, sd["W_in.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        c.load_state_dict({k: v for k, v in sd.items() if k != "W_in.weight"})


@pytest.mark.parametrize("backend", ["eager", "tvm", "triton"])
def test_weights_are_read_live(backend):
    """Replaced tensors, not only in-place updates: load_state_dict(assign=True), a new Parameter, a
    reassigned buffer. Each was silently ignored before (relative error 0.46 to 1.3)."""
    m = layer()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 7, 16)
    close(c, m, x)
    m.load_state_dict(fresh_weights(m, seed=2), assign=True)
    close(c, m, x)
    m.mixer.q_proj.weight = torch.nn.Parameter(torch.randn_like(m.mixer.q_proj.weight))
    close(c, m, x)
    m.mixer.rope_inv_freq = m.mixer.rope_inv_freq * 3.0  # a buffer reassigned
    close(c, m, x)
    assert len(c._variants) == 1  # same dtypes and shapes: no re-trace


@pytest.mark.parametrize("backend, model", [("eager", layer), ("auto", small)])
def test_dtype_moves_re_prepare(backend, model):
    m = model()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 16)
    close(c, m, x)
    c.double()  # reaches the original
    assert all(p.dtype == torch.float64 for p in m.parameters())
    close(c, m, x.double(), tol=1e-10)
    c.float()
    close(c, m, x)
    assert len(c._variants) == 2  # float32 and float64, each traced once
    c.to(torch.float64)
    close(c, m, x.double(), tol=1e-10)
    assert len(c._variants) == 2


def test_a_module_moved_alone_gets_a_clear_error():
    """m.double() then a float32 call: before, a raw TVM 'Check failed: (ptr->dtype == dtype.value())'."""
    m = small()
    c = sc.compile(m, backend="tvm")
    c(torch.randn(2, 5, 16))
    m.double()
    with pytest.raises(sc.InputError, match=r"parameter '.*' is now torch.float64 .* traced as f32"):
        c(torch.randn(2, 5, 16))


class Dropped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x)) * 2, torch.nn.functional.dropout(x + 1, 0.25, self.training)


@pytest.mark.filterwarnings("ignore:backend 'tvm'.*hybrid mode:UserWarning")   # dropout has no TVM lowering
@pytest.mark.parametrize("backend", ["eager", "tvm", "triton"])
def test_dropout_is_honoured_in_training_mode(backend):
    """Before, train-mode dropout was lowered to the identity: no zeros, no warning."""
    m = Dropped().train()
    c = sc.compile(m, backend=backend)
    x = torch.randn(4, 33, 16)
    torch.manual_seed(5)
    got = c(x)
    torch.manual_seed(5)
    want = m(x)
    for g, w, p in zip(got, want, (0.5, 0.25)):  # torch's dropout: the same draws as the module
        assert relative_error(g, w) <= TOL
        assert abs((g == 0).float().mean().item() - p) < 0.1
    c.eval()  # reaches the original; eval-mode outputs have no zeros and equal the module
    assert not m.training
    with torch.no_grad():
        for g, w in zip(c(x), m(x)):
            assert relative_error(g, w) <= TOL and (g != 0).all()
    c.train()
    torch.manual_seed(6)
    got = c(x)
    torch.manual_seed(6)
    assert all(relative_error(g, w) <= TOL for g, w in zip(got, m(x)))
    assert len(c._variants) == 2  # one graph per mode


@pytest.mark.parametrize("backend, model", [("eager", layer), ("tvm", small)])
def test_pickle_and_torch_save(backend, model):
    m = model()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 6, 16)
    y = close(c, m, x)
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, sc.CompiledModule) and loaded.backend_name == backend
    assert relative_error(loaded(x), y) <= TOL
    again = pickle.loads(pickle.dumps(c))  # the traced graphs and kernels are rebuilt at the first call
    assert "not traced yet" in repr(again) and again.state_dict().keys() == m.state_dict().keys()


def test_repr_names_the_original_backend_and_state():
    m = layer()
    c = sc.compile(m, backend="eager")
    assert "backend='eager', not traced yet" in repr(c) and "SessaLayer(" in repr(c)
    c(torch.randn(1, 3, 16))
    assert "backend='eager', traced: 1 graph(s)" in repr(c)


def test_data_parallel_wrappers_are_refused_with_the_fix():
    m = layer()
    with pytest.raises(sc.UnsupportedError, match=r"DistributedDataParallel\(sessa_compiler.compile\(model\)\)"):
        sc.compile(torch.nn.DataParallel(m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_calls(backend):
    """Several threads call one compiled module at once (a web server does): before, SIGSEGV or TVM
    internal errors on auto/tvm, InterpreterError on triton."""
    m = layer()
    c = sc.compile(m, backend=backend)
    xs = [torch.randn(2, T, 16) for T in (3, 9, 17, 4)]
    with torch.no_grad():
        want = [m(x) for x in xs]
    errors, worst = [], [0.0]
    start = threading.Barrier(len(xs))

    def work(i):
        try:
            start.wait()
            for _ in range(3):
                with torch.no_grad():
                    worst[0] = max(worst[0], relative_error(c(xs[i]), want[i]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert worst[0] <= TOL
    assert len(c._variants) == 1  # traced once although four threads made the first call together


class Variadic(torch.nn.Module):
    """forward(*xs), as wrappers written by others often are (before, torch.export rejected the dynamic
    shapes the tracer gave it)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, *xs):
        return self.lin(xs[0]) + xs[1]


def test_a_variadic_forward_traces_with_symbolic_sizes():
    m = Variadic()
    c = sc.compile(m, backend="eager")
    for B, T in [(2, 3), (3, 8)]:
        a, b = torch.randn(B, T, 4), torch.randn(B, T, 4)
        with torch.no_grad():
            assert relative_error(c(a, b), m(a, b)) <= TOL
    assert len(c._variants) == 1


class VariadicPick(torch.nn.Module):
    """forward(*inputs) whose trace pins T (take_along_dim's guards): a call at another size traces again at
    its own sizes, which built torch.export's dynamic shapes as a flat tuple it rejects for *inputs."""

    def forward(self, *inputs):
        x, idx = inputs
        return torch.take_along_dim(x, idx, -1)


def test_a_variadic_forward_traces_again_at_new_sizes():
    m = VariadicPick()
    c = sc.compile(m, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the guard's "traced again" note
        for B, T in [(2, 5), (1, 1), (3, 2)]:
            x, idx = torch.randn(B, T, 8), torch.randint(0, 8, (B, T, 3))
            assert torch.equal(c(x, idx), m(x, idx))


def test_an_export_in_another_thread_does_not_divert_this_threads_calls(monkeypatch):
    """torch.compiler.is_compiling()/is_exporting() are process-wide flags: while another thread exports (a first
    call tracing a module), they are set for every thread. A call here must still run the compiled graph, not
    the original module (which, mid-export, holds the export's fake parameters)."""
    m = layer()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 5, 16)
    calls = []
    # registered before the trace: a hook added later is a change of the module (it traces again); it returns the
    # arguments (a hook that returns None is kept for its side effects, and a module with one runs uncompiled), and
    # what it holds is left as the trace left it (a change of what a hook holds traces again)
    handle = m.register_forward_pre_hook(lambda mod, args: calls.append(1) or args)
    with torch.no_grad():
        c(x)
        seen = len(calls)
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
        monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
        try:
            got = c(x)
        finally:
            handle.remove()
            monkeypatch.undo()
        want = m(x)
    assert len(calls) == seen   # the original module's forward did not run
    assert relative_error(got, want) <= 1e-5


class SequenceNorm(torch.nn.Module):
    """layer_norm over every non-batch dim (normalized_shape = x.shape[1:], the length among them): the lowering
    took torch.export's size nodes for sizes and failed with a raw sympy error."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[1:]) * 2


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_layer_norm_over_the_sequence_dim(backend):
    m = SequenceNorm()
    c = sc.compile(m, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tvm: hybrid mode (Relax's layer_norm takes static sizes)
        for T in (5, 7, 1):
            x = torch.randn(2, T, 8)
            assert relative_error(c(x), m(x)) <= TOL
    assert len(c._variants) == 1


class TakeAlong(torch.nn.Module):
    """torch.take_along_dim, as the function and the method, with a broadcast batch of indices."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, idx):
        h = self.lin(x)
        return (torch.take_along_dim(h, idx, -1) + h.take_along_dim(idx[:1], dim=2),
                torch.take_along_dim(h, idx[:, :, :1]))


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_take_along_dim_keeps_the_sizes_symbolic(backend):
    """torch's take_along_dim kernel fixed every size in the trace (each new batch and length traced again,
    past max_traces uncompiled); the trace writes it as its broadcast and a gather: one graph, the module's
    values and gradients."""
    torch.manual_seed(0)
    m = TakeAlong()
    c = sc.compile(m, backend=backend)
    for B, T in ((2, 5), (3, 9), (1, 1), (2, 13)):
        x, idx = torch.randn(B, T, 8), torch.randint(0, 8, (B, T, 3))
        got, want = c(x, idx), m(x, idx)
        for g, w in zip(got, want):
            assert relative_error(g, w) <= TOL
        m.zero_grad()
        sum(w.sum() for w in want).backward()
        ref = m.lin.weight.grad.clone()
        m.zero_grad()
        sum(g.sum() for g in c(x, idx)).backward()
        assert relative_error(m.lin.weight.grad, ref) <= TOL
    assert len(c._variants) == 1 and not c.retraces
