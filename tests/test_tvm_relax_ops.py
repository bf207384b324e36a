"""Relax lowerings of ops that compile(backend="tvm") runs but export_tvm used to refuse: rope, conv1d,
attention without a TVM kernel (non-causal, composite Relax form) and half-precision operands of the kernel ops
(cast to the kernel's float32 and back). Each is built from IR with graph_to_relax and run in TVM's VM against the
op's meaning (sessa_compiler.semantics), and modules using them go through export_tvm and the torch-free loader.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

tvm = pytest.importorskip("tvm")

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.backends.tvm.relax_lower import graph_to_relax, unsupported_ops  # noqa: E402
from sessa_compiler.ir import parse  # noqa: E402
from sessa_compiler.semantics import run_graph  # noqa: E402
from sessa_compiler.tolerance import TOLERANCE  # noqa: E402

from test_tvm_export import BLOCK_TORCH, rel  # noqa: E402


def run_relax(graph, inputs):
    from tvm import relax

    mod, _ = graph_to_relax(graph)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    return torch.from_numpy(out.numpy())


def check(text, inputs, tol):
    """The graph lowers whole to Relax and agrees with its meaning, evaluated in float64."""
    g = parse(text)
    assert unsupported_ops(g) == []
    got = run_relax(g, inputs)
    want = run_graph(parse(text.replace("f32", "f64").replace("f16", "f64")), [x.double() for x in inputs], {})[0]
    assert got.dtype == run_graph(g, inputs, {})[0].dtype
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= tol, err
    return got


ROPE = """graph r(%x: f32[B, T, 2, 8], %f: f32[4]) {
  %y: f32[B, T, 2, 8] = rope(%x, %f)
  return %y
}"""


@pytest.mark.parametrize("T", [1, 7])
def test_rope_lowers_to_relax(T):
    x = torch.randn(2, T, 2, 8)
    y = check(ROPE, [x, torch.rand(4)], TOLERANCE[torch.float32])
    if T > 1:   # positions past 0 are rotated: the lowering did something
        assert (y[:, 1:] - x[:, 1:]).abs().max() > 1e-2


ATTENTION = """graph a(%q: f32[B, T, 4, 8], %k: f32[B, T, 2, 8], %v: f32[B, T, 2, 8], %f: f32[4]) {
  %y: f32[B, T, 4, 8] = attention(%q, %k, %v, %f) {scale=0.35, causal=CAUSAL, rope=ROPE}
  return %y
}"""


@pytest.mark.parametrize("causal,rope", [(False, False), (False, True)])
def test_attention_without_a_kernel_lowers_to_relax_matmuls(causal, rope):
    text = ATTENTION.replace("CAUSAL", str(causal)).replace("ROPE", str(rope))
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    check(text, [q, k, v, torch.rand(4)], TOLERANCE[torch.float32])


HALF = """graph h(%q: f16[B, T, 4, 8], %k: f16[B, T, 2, 8], %v: f16[B, T, 2, 8], %f: f16[B, T, 8], %g: f16[B, T]) {
  %a: f16[B, T, 4, 8] = attention(%q, %k, %v) {scale=0.35, causal=True}
  %s: f16[B, T, 8] = feedback(%f, %f, %f, %g) {scale=0.3}
  return %a, %s
}"""


def test_kernel_ops_take_half_precision_operands():
    """float16 operands are cast to the kernel's float32 and the result back (what compile(backend="tvm") does)."""
    g = parse(HALF)
    assert unsupported_ops(g) == []
    inputs = [torch.randn(2, 9, 4, 8).half(), torch.randn(2, 9, 2, 8).half(), torch.randn(2, 9, 2, 8).half(),
              torch.randn(2, 9, 8).half(), torch.rand(2, 9).half()]
    from tvm import relax

    mod, _ = graph_to_relax(g)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    g64 = parse(HALF.replace("f16", "f64"))
    for got, want in zip(outs, run_graph(g64, [x.double() for x in inputs], {})):
        got = torch.from_numpy(got.numpy())
        assert got.dtype == torch.float16
        assert float((got.double() - want).abs().max() / want.abs().max()) <= TOLERANCE[torch.float16]


CONV = """graph c(%x: f32[B, 4, T], %w: f32[6, 2, 3], %b: f32[6]) {
  %y: f32[B, 6, T] = conv1d(%x, %w, %b) {stride=[1], padding=[1], dilation=[1], groups=2}
  return %y
}"""


def test_conv1d_lowers_to_relax():
    check(CONV, [torch.randn(2, 4, 9), torch.randn(6, 2, 3), torch.randn(6)], TOLERANCE[torch.float32])


class ConvBlock(nn.Module):
    """A strided, dilated, grouped Conv1d (not the causal depthwise form the recogniser turns into causal_conv1d)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 12, kernel_size=3, stride=2, padding=2, dilation=2, groups=4)

    def forward(self, x):                      # x [B, T, 8]
        return torch.tanh(self.conv(x.transpose(1, 2))).transpose(1, 2)


@pytest.mark.filterwarnings("ignore:export_tvm. ConvBlock's code branches on its input sizes:UserWarning")
def test_export_tvm_takes_a_conv1d_module_and_the_torch_free_loader_runs_it(tmp_path):
    torch.manual_seed(0)
    m = ConvBlock().eval()
    assert "conv1d" in {n.op for n in sc.trace(m, (torch.randn(2, 11, 8),)).nodes}   # the op under test
    path = str(tmp_path / "conv")
    sc.export_tvm(m, (torch.randn(2, 11, 8),), path)
    model = sc.load_tvm(path)
    for B, T in ((1, 5), (3, 16)):
        x = torch.randn(B, T, 8)
        assert rel(model(x.numpy()), m(x).detach().numpy()) <= TOLERANCE[torch.float32]
    x = torch.randn(2, 13, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH, path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok without torch" in out.stdout, out.stderr[-2000:]
    assert rel(np.load(tmp_path / "y.npy"), m(x).detach().numpy()) <= TOLERANCE[torch.float32]


TRI_SOLVE = """graph t(%A: f32[T, T], %b: f32[B, 2, T, 3]) {
  %x: f32[B, 2, T, 3] = tri_solve(%A, %b) {upper=UPPER, unitriangular=False}
  return %x
}"""


@pytest.mark.parametrize("upper", [False, True])
def test_tri_solve_with_weights_shared_across_leading_dims_lowers_to_the_kernel(upper):
    """compile(backend="tvm") has no kernel for weights that broadcast over b's leading dims (it runs them on
    torch); the Relax lowering broadcasts them and calls the same kernel."""
    from sessa_compiler.backends.tvm.lowering import lower_node

    text = TRI_SOLVE.replace("UPPER", str(upper))
    assert lower_node(parse(text).nodes[0]).spec is None
    T = 11
    A = torch.randn(T, T) * 0.3 + 3 * torch.eye(T)
    A = A.triu() if upper else A.tril()
    check(text, [A, torch.randn(2, 2, T, 3)], TOLERANCE[torch.float32])


def test_export_error_names_the_reason_a_core_op_has_no_lowering():
    text = """graph f(%f: f32[B, T, W], %qb: f32[B, T, 4], %kb: f32[B, T, 4], %g: f32[B, T]) {
  %s: f32[B, T, W] = feedback(%f, %qb, %kb, %g) {scale=0.5}
  return %s
}"""
    from sessa_compiler.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"feedback \(feedback width W is not static\)"):
        graph_to_relax(parse(text))


@pytest.mark.parametrize("layer", ["sessa", "mamba"])
def test_export_tvm_takes_float16_layers(layer, tmp_path):
    """A float16 Sessa layer computes its feedback logits in float32 (float16 f with float32 q_b, k_b, gamma:
    operands of mixed dtypes) and rotates with float32 inv_freq; its kernels run in float32 between casts. Both
    layers export and match the float64 module at the spec's float16 tolerance."""
    from model_helpers import randomize
    from sessa_compiler.models import MambaLayer, SessaLayer

    torch.manual_seed(0)
    m = (randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), gamma_bias=4.0) if layer == "sessa"
         else MambaLayer(32)).eval()
    x0 = torch.randn(2, 9, 32).half()
    g = sc.trace(m.half(), (x0,))
    core = [n for n in g.nodes if n.op in ("feedback", "scan")]
    assert core
    if layer == "sessa":   # the case this covers: one core op with operands of several dtypes
        assert {x.type.dtype.name for x in core[0].inputs} == {"f16", "f32"}
    path = str(tmp_path / layer)
    sc.export_tvm(m, (x0,), path)
    model = sc.load_tvm(path)
    m64 = m.double()
    for B, T in ((1, 5), (2, 21)):
        x = torch.randn(B, T, 32)
        got = model(x.half().numpy())
        assert got.dtype == np.float16
        assert rel(got, m64(x.double()).detach().numpy()) <= TOLERANCE[torch.float16]


class _Filled(nn.Module):
    """A T-sized constant built with torch.full, as additive masks are (`torch.full((T, T), -inf).triu(1)`)."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, x):
        T = x.shape[1]
        return x + torch.full((T, 1), self.fill).clamp(min=-1.0) + torch.full((T, T), self.fill).triu(1).sum(0)[:, None]


@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan"), 2.5])
def test_full_of_a_non_finite_value_builds_in_the_whole_graph(fill, tmp_path, monkeypatch, recwarn):
    """TVM 0.27 cannot legalise `full` with an infinite or NaN fill (a TypeError inside topi.full): such a graph
    used to leave whole-graph mode for hybrid mode with an internal error; it builds whole now."""
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))
    m = _Filled(fill)
    c = sc.compile(m, backend="tvm")
    for T in (1, 6):
        x = torch.randn(2, T, 3)
        torch.testing.assert_close(c(x), m(x), equal_nan=True)
    assert not [w for w in recwarn.list if "hybrid" in str(w.message)], [str(w.message) for w in recwarn.list]
    assert "whole graph in TVM" in c.explain()


class _FromTheEnd(nn.Module):
    def forward(self, x):
        T = x.shape[1]
        y = torch.nn.functional.pad(x, (0, 0, 3, 2))   # [B, T + 5, C]
        return y[:, -T:] * 2 + y[:, -T - 4:-4]


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_slices_from_the_end_by_a_symbolic_length(backend, tmp_path, monkeypatch):
    """x[:, -T:] with T symbolic: the bound is negative for every T, so it counts from the end (the slice's type
    used to take it as a start of -T: a length of 2T + 5 declared for T rows)."""
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))
    m = _FromTheEnd()
    c = sc.compile(m, backend=backend)
    for T in (1, 4, 9):
        x = torch.randn(2, T, 3)
        torch.testing.assert_close(c(x), m(x))


class _ScalarPower(nn.Module):
    """Rotary frequencies computed in forward, as many models write them: a number to a tensor's power."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        T = x.shape[1]
        inv = 10000 ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
        return self.lin(x) * torch.cat([ang.cos(), ang.sin()], -1) + 2.0 ** x


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_a_number_to_a_tensors_power_is_an_ir_op(backend, tmp_path, monkeypatch, recwarn):
    """aten.pow.Scalar (10000 ** t) was a fallback: a TVM build of the model dropped to hybrid mode for it."""
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(tmp_path))
    m = _ScalarPower()
    c = sc.compile(m, backend=backend)
    for T in (1, 9):
        x = torch.randn(2, T, 8)
        torch.testing.assert_close(c(x), m(x))
    assert "fallbacks (run as torch ops): none" in c.explain(), c.explain()
    assert not [w for w in recwarn.list if "hybrid" in str(w.message)]


class _ZeroGate(nn.Module):
    """A branch switched off by a config gate of 0.0, and literal zeros: torch gives NaN for NaN or inf times 0."""

    def __init__(self):
        super().__init__()
        self.gate = 0.0

    def forward(self, x):
        return x * self.gate, (x * 0).sum(-1), 1.0 / (x + 0), x + self.gate * torch.exp(x)


def test_a_literal_zero_is_not_folded_away(tmp_path):
    """TVM's simplifier folded ``x * 0.0`` to 0 and ``x + 0.0`` to x in the legalised whole graph (NaN and inf gave
    0, -0.0 gave -inf through 1 / (x + 0)); the compiled module and the TVM export give torch's values."""
    m = _ZeroGate()
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 2.0, 100.0]).repeat(2, 3, 1)
    want = m(x)
    got = sc.compile(m, backend="tvm")(x)
    sc.export_tvm(m, (x,), tmp_path / "zero")
    loaded = sc.load_tvm(tmp_path / "zero")(x.numpy())
    for w, g, l in zip(want, got, loaded):
        torch.testing.assert_close(g, w, equal_nan=True)
        torch.testing.assert_close(torch.from_numpy(np.asarray(l)), w, equal_nan=True)


class _Sgn(nn.Module):
    def forward(self, x):
        return torch.sgn(x) * 2


def test_sgn_of_a_real_tensor_is_sign_everywhere(tmp_path):
    """torch.sgn of a real tensor is torch.sign (NaN -> 0): it ran as a fallback on tvm and exported to ONNX's
    Sign, which gives NaN for NaN."""
    import onnxruntime as ort

    m = _Sgn()
    x = torch.tensor([float("nan"), -2.0, 0.0, 3.0, -float("inf")]).repeat(2, 3, 1)
    want = m(x)
    torch.testing.assert_close(sc.compile(m, backend="tvm")(x), want)
    sc.export_onnx(m, (x,), tmp_path / "sgn.onnx", validate=False)
    s = ort.InferenceSession(str(tmp_path / "sgn.onnx"), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]), want)
