"""Issue 22, point 2 (a sweep): ordinary ops that Hugging Face style model code uses, in small modules written in
different hands (tests/hf_ops_sweep_modules.py: masked_fill with a key-padding mask from attention_mask, new_ones /
new_zeros / new_full / full_like, triu / tril with a diagonal offset, clamp with tensor bounds, einsum forms,
expand_as, unflatten, movedim, chunk, unbind, stack, repeat, F.pad with negative and positive pads, where with
Python scalars, baddbmm, logsumexp, norms, rsqrt, softplus, silu, mish, hardtanh, cross-entropy by hand and
F.cross_entropy with ignore_index / label smoothing / class weights / (N, C, T) logits, F.embedding with
padding_idx, logaddexp, split, narrow, var / std). Each compiles on eager and tvm (the whole graph in TVM: no
hybrid-mode warning), exports to ONNX and TVM once, and gives the module's values at two lengths the exports never
saw. An op that cannot be exported is a SessaCompilerError naming the op, the line and what to change."""
from __future__ import annotations

import warnings

import onnxruntime  # noqa: F401  (pinned in requirements/all.txt, like tvm)
import pytest
import torch
import torch.nn.functional as F

import sessa_compiler as sc
from sessa_compiler.errors import SessaCompilerError
from sessa_compiler.export.onnx_export import _session, run_onnxruntime
from sessa_compiler.export.tvm_runtime import load_tvm
from sessa_compiler.tolerance import relative_error

from model_helpers import assert_same, trace_cached
from tests import hf_ops_sweep_modules as S

NEW_SHAPES = ((3, 7), (1, 9))   # (B, T): everything was traced at (2, 6)


@pytest.mark.parametrize("cls,inputs", S.SWEEP, ids=lambda c: getattr(c, "__name__", ""))
def test_hf_style_ops_compile_on_eager_and_tvm_and_export_to_onnx_and_tvm_at_two_new_lengths(cls, inputs, tmp_path):
    torch.manual_seed(0)
    module = cls().eval()
    example = inputs(2, 6)
    graph = trace_cached(module, example).graph
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a hybrid-mode warning (the whole graph not in TVM) fails
        warnings.filterwarnings("ignore", category=UserWarning, message="(?!backend 'tvm').*")
        runners = {"eager": sc.compile(module, backend="eager"), "tvm": sc.compile(module, backend="tvm")}
        session = _session(sc.export_onnx(module, example, tmp_path / "m.onnx", validate=False).path)
        tvm_model = load_tvm(sc.export_tvm(module, example, tmp_path / "tvm"))
        for B, T in NEW_SHAPES:
            args = inputs(B, T, seed=1)
            with torch.no_grad():
                want = module(*args)
                got = {k: c(*args) for k, c in runners.items()}
            got["onnx"] = run_onnxruntime(session, graph, args)
            out = tvm_model(*[a.numpy() for a in args])
            got["export_tvm"] = out if isinstance(out, (list, tuple)) else [out]
            for where, outs in got.items():
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                assert len(outs) == len(want), where
                for i, (g, w) in enumerate(zip(outs, want)):
                    assert_same(g, w, (where, cls.__name__, (B, T), i))


class _Losses(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 5)
        self.register_buffer("w", torch.tensor([0.5, 1.0, 2.0, 1.5, 0.75], dtype=torch.float64))

    def forward(self, x, labels):
        logits = self.head(x)
        per_pos = logits.transpose(1, 2)                     # (N, C, T) with a (N, T) target
        return (F.cross_entropy(per_pos, labels, ignore_index=-100),
                F.cross_entropy(per_pos, labels, weight=self.w, label_smoothing=0.2, reduction="none"),
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=self.w, label_smoothing=0.1),
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.3, reduction="sum"),
                F.nll_loss(logits.log_softmax(-1).flatten(0, 1), labels.flatten(), weight=self.w))


def test_cross_entropy_with_weights_label_smoothing_and_class_dim_1_lowers_to_ir_ops_with_torch_values_and_grads():
    """torch's cross_entropy rules (the mean divides by the weight of the kept targets, smoothing's spread over the
    classes too) in IR ops: no fallback is left, and values and gradients (float64) equal the module's."""
    module = _Losses().double()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 7))
    labels[0, :3] = -100
    graph = trace_cached(module, (x, labels)).graph
    assert not [n for n in graph.nodes if n.op == "fallback"], graph
    compiled = sc.compile(module, backend="eager")
    got, want = compiled(x, labels), module(x, labels)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= 1e-12
    gx, = torch.autograd.grad(sum(o.sum() for o in got), x)
    wx, = torch.autograd.grad(sum(o.sum() for o in want), x)
    assert relative_error(gx, wx) <= 1e-12


class _Kth(torch.nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1).values + 1


class _MaskIndex(torch.nn.Module):
    def forward(self, x):
        return x[x > 0].sum() + x[:, 1:].sum()


@pytest.mark.parametrize("cls,target,code", [(_Kth, "aten.kthvalue.default", "torch.kthvalue(x, 2"),
                                             (_MaskIndex, "aten.index.Tensor", "x[x > 0]")], ids=["kthvalue", "x[mask]"])
def test_an_op_no_export_lowers_is_refused_naming_the_op_line_and_what_to_change(cls, target, code, tmp_path):
    """kthvalue has no form; x[mask] has a data-dependent shape (export_tvm says to use torch.where)."""
    module, x = cls(), torch.randn(2, 6, 4)
    exports = [("tvm", lambda: sc.export_tvm(module, (x,), tmp_path / "tvm"))]
    if cls is _Kth:
        exports.append(("onnx", lambda: sc.export_onnx(module, (x,), tmp_path / "m.onnx")))
    for _, export in exports:
        with pytest.raises(SessaCompilerError) as info:
            export()
        msg = str(info.value)
        assert target in msg and "test_hf_ops_sweep.py:" in msg and code in msg, msg
        assert "docs/exports.md" in msg, msg


class _NewLowerings(torch.nn.Module):
    def forward(self, x, mask):
        z = x.clone()
        z[mask] = 0.5
        return (F.relu6(x * 4), F.elu(x, alpha=0.7), F.elu(x, 1.2).round(decimals=1), torch.selu(x), F.celu(x, 0.5), torch.diff(x, dim=1),
                torch.diff(x, n=2, dim=-1), z, x.movedim(-1, 0), torch.movedim(x, (0, 2), (2, 1)))


def test_relu6_elu_round_diff_masked_assignment_and_movedim_lower_to_ir_ops_with_torch_values_and_grads():
    module = _NewLowerings()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(3)) > 0.5
    graph = trace_cached(module, (x, mask)).graph
    assert not [n.attrs["target"] for n in graph.nodes if n.op == "fallback"], graph
    got, want = sc.compile(module, backend="eager")(x, mask), module(x, mask)
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g, w) <= 1e-12
    gx, = torch.autograd.grad(sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)).sum()
                                  for o in got), x)
    wx, = torch.autograd.grad(sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)).sum()
                                  for o in want), x)
    assert relative_error(gx, wx) <= 1e-12
