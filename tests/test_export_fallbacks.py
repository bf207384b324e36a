"""Issue 22, point 2: the aten ops with no IR op that Hugging Face-style model code uses (cumsum for position ids,
gather for label log-probs, argmax, topk, sort, index_select, cumprod, atan2, remainder / fmod, nan_to_num, any /
all, prod) stay ``fallback`` nodes for compile and are lowered by both exports from one table
(semantics/fallback_forms.py): the ONNX file (run in onnxruntime) and the TVM library (loaded and run) give the
module's values and dtypes at two lengths the export never saw. A fallback outside the table is a
SessaCompilerError naming the op, the source line and what to change."""
from __future__ import annotations

import warnings

import onnxruntime  # noqa: F401  (pinned in requirements/all.txt, like tvm: always installed, never skipped)
import pytest
import torch
import tvm  # noqa: F401

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.errors import SessaCompilerError  # noqa: E402
from sessa_compiler.export.onnx_export import _session, run_onnxruntime  # noqa: E402
from sessa_compiler.export.tvm_runtime import load_tvm  # noqa: E402
from sessa_compiler.semantics.fallback_forms import FORMS  # noqa: E402
from sessa_compiler.tolerance import TOLERANCE, relative_error  # noqa: E402

from model_helpers import assert_same, trace_cached  # noqa: E402
from tests import export_fallback_modules as E  # noqa: E402

SHAPES = ((2, 5), (3, 11))   # (B, T): the export traced (2, 6)


def test_both_exports_lower_every_form_of_the_table():
    from sessa_compiler.backends.tvm.relax_fallback import RELAX_FORMS
    from sessa_compiler.export.onnx_fallback import FORM_LOWERINGS

    forms = set(FORMS.values())
    assert forms - set(FORM_LOWERINGS) == set() and forms - set(RELAX_FORMS) == set()
    for target in FORMS:   # every key is a real aten overload
        ns, name, overload = target.split(".")
        assert getattr(getattr(torch.ops.aten, name), overload)._schema


def _export(module, example, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = sc.export_onnx(module, example, tmp_path / "m.onnx", validate=False).path
        tvm_path = sc.export_tvm(module, example, tmp_path / "tvm")
    return _session(onnx_path), load_tvm(tvm_path)


@pytest.mark.parametrize("cls,inputs", E.LOWERED, ids=lambda c: getattr(c, "__name__", ""))
def test_fallback_ops_export_to_onnx_and_tvm_and_run_at_two_new_lengths(cls, inputs, tmp_path):
    module = cls().eval()
    example = inputs(2, 6)
    graph = trace_cached(module, example).graph
    targets = {n.attrs["target"] for n in graph.nodes if n.op == "fallback"}
    assert targets and targets <= set(FORMS), targets - set(FORMS)   # fallbacks, all of them in the table
    session, tvm_model = _export(module, example, tmp_path)
    for B, T in SHAPES:
        args = inputs(B, T, seed=1)
        with torch.no_grad():
            want = module(*args)
        want = want if isinstance(want, tuple) else (want,)
        got_onnx = run_onnxruntime(session, graph, args)
        got_tvm = tvm_model(*[a.numpy() for a in args])
        got_tvm = got_tvm if isinstance(got_tvm, (list, tuple)) else [got_tvm]
        assert len(got_onnx) == len(want) and len(got_tvm) == len(want)
        for i, w in enumerate(want):
            assert_same(got_onnx[i], w, ("onnx", cls.__name__, T, i))
            assert_same(got_tvm[i], w, ("tvm", cls.__name__, T, i))


def test_hf_position_ids_and_label_log_probs_keep_int64_and_compile_tvm_runs_the_whole_graph():
    """position_ids = mask.long().cumsum(-1) - 1 stays int64 (torch's promotion), and compile(backend="tvm") now
    builds the whole graph in TVM (no hybrid-mode warning) with the module's values."""
    module = E.HFPositionsAndLabelLogProbs().eval()
    args = E.hf_inputs(3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a hybrid-mode warning would fail here
        compiled = sc.compile(module, backend="tvm")
        got = compiled(*args)
    want = module(*args)
    assert want[0].dtype == torch.int64 and want[0][0, :4].tolist() == [1, 1, 1, 1]   # left padding: filled with 1
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, ("compile tvm", i))
    assert "mode: whole graph" in compiled.explain()


class _Edges(torch.nn.Module):
    def forward(self, y, x):
        return (torch.atan2(y, x), torch.remainder(y, x), torch.fmod(y, x), torch.nan_to_num(y / x),
                torch.nan_to_num(y / x, nan=2.0, posinf=5.0, neginf=-5.0), torch.floor_divide(y, x),
                torch.div(y, x, rounding_mode="trunc"), torch.frac(y * 1.3), torch.max(y, -1).values,
                torch.logaddexp(y, x))


def test_elementwise_fallbacks_match_torch_at_signed_zeros_infinities_and_nans(tmp_path):
    """atan2, remainder, fmod, nan_to_num, floor / trunc division, frac, max over a dim holding NaN, logaddexp
    (equal infinities give themselves, never inf - inf)."""
    vals = [0.0, -0.0, 1.0, -1.0, 2.5, -7.25, float("inf"), -float("inf"), float("nan")]
    y = torch.tensor([a for a in vals for _ in vals]).reshape(1, len(vals), len(vals))
    x = torch.tensor([b for _ in vals for b in vals]).reshape(1, len(vals), len(vals))
    module = _Edges()
    session, tvm_model = _export(module, (y, x), tmp_path)
    graph = trace_cached(module, (y, x)).graph
    want = module(y, x)
    got = {"onnx": run_onnxruntime(session, graph, (y, x)), "tvm": tvm_model(y.numpy(), x.numpy())}
    for where, outs in got.items():
        names = ("atan2", "remainder", "fmod", "nan_to_num", "nan_to_num(args)", "floor_divide", "div trunc", "frac",
                 "max.dim", "logaddexp")
        assert len(outs) == len(want) == len(names)
        for name, g, w in zip(names, outs, want):
            g = torch.as_tensor(g)
            assert torch.equal(torch.isnan(g), torch.isnan(w)), (where, name)
            fin = ~torch.isnan(w)
            assert torch.equal(g[fin], w[fin]) or torch.allclose(g[fin], w[fin], rtol=1e-6, atol=0), \
                (where, name, y[fin & ~torch.isclose(g, w)], x[fin & ~torch.isclose(g, w)])


class _OrderEdges(torch.nn.Module):
    def forward(self, y):
        v, i = torch.min(y, -1)
        # (sort's and topk's indices among ties are torch's to choose: their values are compared)
        return (y.argmax(-1), y.argmin(-1), v, i, y.sort(-1).values, y.sort(-1, descending=True).values,
                y.topk(2).values, y.topk(2, largest=False).values, y.argmax(), y.amax(-1), y.amin(-1))


def test_argmax_max_sort_and_topk_match_torch_on_rows_of_infinities_and_nans(tmp_path):
    """torch: the first index of the extreme, NaN above everything (TVM's own argmax answers -1 on a row of -inf
    and skips NaN; both are handled); amax of a row of -inf is -inf (TVM's max starts at the lowest finite value)."""
    inf, nan = float("inf"), float("nan")
    rows = [[0.0, 1.0, 2.0, 2.0], [-inf] * 4, [inf] * 4, [1.0, nan, 3.0, -1.0], [nan] * 4, [-1.0, -inf, -2.0, 5.0],
            [3.0, 3.0, -inf, 1.0], [2.0, inf, -inf, 2.0]]
    y = torch.tensor(rows).unsqueeze(0)
    module = _OrderEdges()
    session, tvm_model = _export(module, (y,), tmp_path)
    graph = trace_cached(module, (y,)).graph
    want = module(y)
    got = {"onnx": run_onnxruntime(session, graph, (y,)), "tvm": tvm_model(y.numpy())}
    for where, outs in got.items():
        assert len(outs) == len(want)
        for i, (g, w) in enumerate(zip(outs, want)):
            g = torch.as_tensor(g)
            assert g.dtype == w.dtype and torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0)), (where, i, g, w)


class _RunningEdges(torch.nn.Module):
    def forward(self, x):
        v, i = torch.cummax(x, 1)
        w, j = torch.cummin(x, -1)
        return v, i, w, j, torch.logcumsumexp(x, 1), torch.logcumsumexp(x, -1)


def _running_edges(B: int, T: int):
    """Rows along T and along the last dim holding ties, NaN (one, several, leading), -inf prefixes (all -inf rows),
    +inf (one, several, after -inf), a +inf then -inf, and large finite values (a global shift would underflow)."""
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(B, T, 9, generator=g)
    x[B - 1, T - 1, :] = 0.5                               # ties along the last dim (columns 1, 2 keep them)
    x[:, 1::3, 0] = 2.0                                    # ties along T
    x[0, 3, 1], x[0, T - 2, 1] = nan, nan                  # NaN sticks; its index moves to the later NaN
    x[1, 0, 2] = nan                                       # a leading NaN
    x[:, :, 3] = -inf                                      # all -inf: logcumsumexp stays -inf, cummax index last
    x[:, : T // 2, 4] = -inf                               # a -inf prefix, then finite
    x[0, 2, 5], x[0, 4, 5] = inf, inf                      # +inf twice (no inf - inf)
    x[1, :, 6] = torch.where(torch.arange(T) % 2 == 0, inf, -inf)   # +inf, -inf alternating
    x[:, :, 7] = torch.linspace(-300.0, 300.0, T)          # rising: the running maximum is the shift
    x[:, :, 8] = torch.linspace(80.0, -400.0, T)           # falling: exp of a global shift would underflow
    return (x,)


def test_cummax_cummin_logcumsumexp_match_torch_at_ties_nans_and_infinities_at_two_new_lengths(tmp_path):
    """torch's rules: cummax / cummin ties take the LAST index, a NaN sticks (index of the latest NaN);
    logcumsumexp is -inf on an all -inf prefix, +inf after a +inf (never NaN from inf - inf), finite where torch
    is; along T and along the last dim, B and T symbolic (exported at (2, 6), run at (3, 7) and (4, 12))."""
    module = _RunningEdges()
    session, tvm_model = _export(module, _running_edges(2, 6), tmp_path)
    graph = trace_cached(module, _running_edges(2, 6)).graph
    for B, T in ((3, 7), (4, 12)):
        args = _running_edges(B, T)
        want = module(*args)
        assert torch.isneginf(want[4][:, :, 3]).all() and not torch.isnan(want[4][:, :, 5:]).any()
        got = {"onnx": run_onnxruntime(session, graph, args), "tvm": tvm_model(*[a.numpy() for a in args])}
        for where, outs in got.items():
            assert len(outs) == len(want)
            for i, (g, w) in enumerate(zip(outs, want)):
                g = torch.as_tensor(g)
                assert g.dtype == w.dtype and g.shape == w.shape, (where, T, i)
                if not w.is_floating_point():
                    assert torch.equal(g, w), (where, T, i, (g != w).nonzero()[:5])
                    continue
                assert torch.equal(torch.isnan(g), torch.isnan(w)), (where, T, i)
                assert torch.equal(torch.isinf(g) & (g > 0), torch.isinf(w) & (w > 0)), (where, T, i)
                assert torch.equal(torch.isinf(g) & (g < 0), torch.isinf(w) & (w < 0)), (where, T, i)
                fin = torch.isfinite(w)
                assert relative_error(g[fin], w[fin]) <= TOLERANCE[w.dtype], (where, T, i)


class _Mode(torch.nn.Module):
    def forward(self, x):
        return torch.mode(x, dim=1).values * 2


def test_a_fallback_outside_the_table_is_refused_by_both_exports_naming_op_line_and_what_to_change(tmp_path):
    module, x = _Mode(), torch.randn(2, 6, 8)
    for export in (lambda: sc.export_onnx(module, (x,), tmp_path / "m.onnx"),
                   lambda: sc.export_tvm(module, (x,), tmp_path / "tvm")):
        with pytest.raises(SessaCompilerError) as info:
            export()
        msg = str(info.value)
        assert "aten.mode.default" in msg
        assert "test_export_fallbacks.py:" in msg and "torch.mode(x, dim=1)" in msg   # the user's line
        assert "docs/exports.md" in msg                                              # what to change
