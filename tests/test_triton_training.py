"""Training steps through a module compiled on backend="triton" (backends/triton/training.py): each core op's
forward is its Triton kernel and its backward the Triton backward kernels, under Triton's interpreter on CPU
tensors. Gradients are compared with the uncompiled module's own autograd; no step runs the eager
interpreter's dense reference of a core op, nor (for float32) semantics.backward's torch backward."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import copy

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import TOLERANCE, relative_error
from sessa_compiler.models import Decoder, SessaLayer
from sessa_compiler.semantics import backward as semantics_backward
from sessa_compiler.semantics import core

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = TOLERANCE[torch.float32]


def _raise_dense(*args, **kwargs):
    raise AssertionError("a training step ran a dense core-op reference (the eager interpreter's definition)")


def _raise_torch_backward(*args, **kwargs):
    raise AssertionError("a training step ran semantics.backward's torch backward instead of a Triton kernel")


def _patch_dense_references(patch):
    for name in ("attention_ref", "feedback_ref", "scan_ref", "tri_solve_ref"):
        patch.setattr(core, name, _raise_dense)


def _patch_torch_backwards(patch):
    for name in ("attention_backward", "feedback_backward", "scan_backward"):
        patch.setattr(semantics_backward, name, _raise_torch_backward)


def _grads(fn, module, x, weight):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True) if x.is_floating_point() else x
    out = fn(x)
    (out.float() * weight).sum().backward()
    return out.detach(), (x.grad if x.is_floating_point() else None), \
        {k: p.grad for k, p in module.named_parameters()}


def _structurally_zero(module, x, weight) -> dict:
    """{name: bound} for gradients zero in exact arithmetic (below 1e-12 of the largest in float64, e.g. a key
    bias without RoPE, which softmax cancels): float32 gives rounding noise there, bounded by 1e-6 of the
    largest gradient (as tests/test_autograd.py)."""
    m64 = copy.deepcopy(module).double()
    _, _, gp = _grads(m64, m64, x.double() if x.is_floating_point() else x, weight.double())
    top = max(g.abs().max().item() for g in gp.values())
    return {k: 1e-6 * top for k, g in gp.items() if g.abs().max().item() < 1e-12 * top}


LAYERS = {   # gamma_bias near +-gamma_max: the feedback solve at its least damped
    "h1_no_rope": (dict(n_heads=1, use_forward_rope=False), 16, -6.0),
    "gqa_rope": (dict(n_heads=4, n_kv_heads=2), 32, 6.0),
    "gqa_no_rope": (dict(n_heads=4, n_kv_heads=2, use_forward_rope=False), 32, 0.0),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_sessa_layer_parameter_gradients_equal_the_modules(name, monkeypatch):
    kwargs, dim, gamma_bias = LAYERS[name]
    torch.manual_seed(11)
    m = SessaLayer(dim, **kwargs).train()
    with torch.no_grad():
        m.mixer.gamma_bias.fill_(gamma_bias)
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(12)
    compiled = sc.compile(m, (torch.randn(1, 5, dim, generator=g),), backend="triton")
    stats = compiled._backend.stats
    for B, T in [(2, 17), (1, 1), (1, 37)]:   # 17, 37: past the interpreter's 16-row tiles and chunks
        x = torch.randn(B, T, dim, generator=g)
        weight = torch.randn(B, T, dim, generator=g)   # a random cotangent
        want_out, want_gx, want = _grads(ref, ref, x, weight)
        zero = _structurally_zero(ref, x, weight)
        before = stats["kernel_forward_core_ops"]
        with monkeypatch.context() as patch:
            _patch_dense_references(patch)
            _patch_torch_backwards(patch)
            out, gx, got = _grads(compiled, m, x, weight)
        assert compiled.grad_recomputes == 0
        assert stats["kernel_forward_core_ops"] - before == 2          # attention and feedback: Triton kernels
        assert relative_error(out, want_out) <= TOL, T
        assert relative_error(gx, want_gx) <= TOL, f"input gradient T={T}"
        for k, w in want.items():
            assert got[k] is not None and torch.isfinite(got[k]).all(), (k, T)
            if k in zero:
                assert got[k].abs().max() <= zero[k], (k, T)
                continue
            assert relative_error(got[k], w) <= TOL, (k, T)
    assert stats["triton_torch_forward_attention"] == stats["triton_torch_forward_feedback"] == 0


def test_a_triton_training_step_runs_no_dense_reference(monkeypatch):
    """Mirrors tests/test_training.py's tvm test: a Decoder with Sessa, Mamba (scan) and Transformer layers."""
    torch.manual_seed(0)
    m = Decoder(40, 16, "SMT", n_heads=4, n_kv_heads=2).train()
    x = torch.randint(0, 40, (1, 19))
    compiled = sc.compile(m, (x,), backend="triton")
    weight = torch.randn(1, 19, 40)
    _, _, want = _grads(m, m, x, weight)
    with monkeypatch.context() as patch:
        _patch_dense_references(patch)
        _patch_torch_backwards(patch)
        _, _, got = _grads(compiled, m, x, weight)
        assert compiled.grad_recomputes == 0
        assert compiled._backend.stats["triton_kernel_forward_scan"] == 1
        # the patch bites: the recomputing path (what triton did before) runs the dense references and raises
        patch.setattr(type(compiled._backend), "prepare_training", lambda self, graph, ctx=None: None)
        again = sc.compile(m, (x,), backend="triton")
        with pytest.raises(Exception, match="dense core-op reference"):
            _grads(again, m, x, weight)
    for k, w in want.items():
        assert relative_error(got[k], w) <= TOL or w.abs().max() < 1e-6, k


def test_float64_takes_the_blocked_torch_path_not_the_dense_reference(monkeypatch):
    torch.manual_seed(2)
    m = SessaLayer(16, n_heads=2).double().train()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    compiled = sc.compile(m, (x,), backend="triton")
    weight = torch.randn(2, 17, 16, dtype=torch.float64)
    _, _, want = _grads(ref, ref, x, weight)
    with monkeypatch.context() as patch:
        _patch_dense_references(patch)
        _, _, got = _grads(compiled, m, x, weight)
    stats = compiled._backend.stats
    assert compiled.grad_recomputes == 0 and stats["triton_torch_forward_attention"] == 1
    for k, w in want.items():
        assert relative_error(got[k], w) <= TOLERANCE[torch.float64], k


def test_autocast_bf16_trains_through_the_triton_kernels():
    torch.manual_seed(2)
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).train()
    ref = copy.deepcopy(m)
    compiled = sc.compile(m, (torch.randn(1, 5, 32),), backend="triton")
    x, weight = torch.randn(2, 37, 32), torch.randn(2, 37, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, want = _grads(ref, ref, x, weight)
        _, _, got = _grads(compiled, m, x, weight)
    stats = compiled._backend.stats
    assert compiled.grad_recomputes == 0 and stats["triton_kernel_forward_attention"] == 1
    assert stats["triton_kernel_forward_feedback"] == 1
    for k, w in want.items():
        assert relative_error(got[k], w) <= TOLERANCE[torch.bfloat16], k


def test_non_causal_attention_takes_the_blocked_torch_path(monkeypatch):
    """No Triton kernel for non-causal attention: its training forward and backward are the blocked torch ones
    (the registered backward falls back), not the dense reference; gradients equal autograd through it."""
    from sessa_compiler.backends.training import core_function
    from sessa_compiler.backends.triton.training import attention_forward

    torch.manual_seed(4)
    q, k, v = torch.randn(2, 17, 4, 8), torch.randn(2, 17, 2, 8), torch.randn(2, 17, 2, 8)
    grad = torch.randn(2, 17, 4, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    core.attention_ref(*leaves, 0.3, False).backward(grad)
    attrs = {"scale": 0.3, "causal": False, "rope": False}
    stats = {"triton_torch_forward_attention": 0}
    fn = core_function("attention", attention_forward(attrs, stats), attrs, "triton")
    got = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with monkeypatch.context() as patch:
        _patch_dense_references(patch)
        fn(*got).backward(grad)
    assert stats["triton_torch_forward_attention"] == 1
    for g, w in zip(got, leaves):
        assert relative_error(g.grad, w.grad) <= TOL
