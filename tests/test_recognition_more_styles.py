"""Three more Sessa layers written by other hands: what the frontend recognises, and that compile is exact.

tests/styles/ holds three further independent spellings of SessaLayer (same state_dict keys):
- dense_solve: einsum attention with an additive ``triu(full(-inf), 1)`` mask and a hand-written softmax
  (``exp(x - max) / sum``), RoPE by flipping pairs, feedback solved by ``torch.linalg.solve(I - gamma*alpha, f)``;
- inverse_nan: heads folded into the batch with ``torch.baddbmm``, GQA by ``index_select``, feedback with a
  ``ones.tril(-1).bool()`` mask, ``masked_fill(~mask, -inf)``, ``nan_to_num`` for row 0, solved by
  ``torch.linalg.inv(I - gamma*alpha) @ f``;
- time_loop: SDPA with an explicit boolean ``attn_mask``, feedback solved by a Python loop over time steps.

dense_solve and inverse_nan are recognised in full (attention with RoPE and GQA folded, and feedback): the
hand-written softmax is rewritten to ``softmax`` by structure, ``baddbmm`` and ``max(dim)`` are lowered, the
general solve and the inverse are anchors of the feedback recogniser (their matrix shown unit lower
triangular, the region probed), and ``index_select`` GQA is folded. time_loop's attention is recognised (its
masked SDPA is lowered to the ops it computes and probed causal); its feedback, a Python loop, is not. Compiled
on eager, tvm and triton (interpreter) each gives the module's outputs at new sequence lengths. The time loop
pins the sequence length (torch.export needs ``range(T)`` as a Python int): each length is traced once, on its
own, and the graphs are static in T. Two lowering bugs these styles found are checked on minimal modules:
``torch.outer`` of mixed dtypes, and a size pinned by a loop (including at T = 1, which the tracer grows to 2).

The ``*_respelled`` controls change only the spellings that once blocked recognition (softmax instead of the
hand-written one, ``solve_triangular`` instead of the dense solve / inverse, a plain matmul + bias instead of
``baddbmm``): both spellings are recognised alike. Near misses (a masked SDPA that is not causal, a dense solve
or inverse whose matrix is not Sessa's, a hand-written softmax whose reductions disagree) must not be claimed
and must still give the module's outputs.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_helpers import op_counts, trace_cached
import sessa_compiler as sc
from sessa_compiler.backends.eager import run_graph
from sessa_compiler.errors import IRError
from sessa_compiler.models import SessaLayer
from styles.dense_solve_style import DenseSolveSessaLayer
from styles.inverse_nan_style import InverseNanSessaLayer
from styles.time_loop_style import TimeLoopSessaLayer
from test_recognition_styles import CONFIGS, load, rel
from test_styles import spec_sessa_layer

STYLES = {"dense_solve": DenseSolveSessaLayer, "inverse_nan": InverseNanSessaLayer,
          "time_loop": TimeLoopSessaLayer}
# the core ops each style compiles to (no fallback op is left in any of them)
EXPECTED = {"dense_solve": {"attention": 1, "feedback": 1}, "inverse_nan": {"attention": 1, "feedback": 1},
            "time_loop": {"attention": 1}}

@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# -- the styles are the spec's model --------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("style", STYLES)
def test_style_is_the_spec_model_and_shares_the_reference_state_dict(style, config):
    for gamma_bias in (-6.0, 6.0):   # gamma near -gamma_max and near +gamma_max
        m, ref = load(STYLES[style], config, torch.float64, gamma_bias=gamma_bias, seed=3)
        x = torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = m(x)
            assert rel(y, spec_sessa_layer(m.state_dict(), x, **CONFIGS[config])) <= 1e-10
            assert rel(y, ref(x)) <= 1e-10
    back = SessaLayer(**CONFIGS[config]).double()
    back.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert rel(back(x), y) <= 1e-10


# -- recognised (the time loop's feedback excepted), and compiled exactly on every backend ---------------------
TOL = {"eager": 1e-10, "tvm": 1e-4, "triton": 1e-4}


@pytest.mark.parametrize("backend", TOL)
@pytest.mark.parametrize("style", STYLES)
def test_style_compiles_to_the_module_outputs_and_is_recognised(style, backend):
    dtype = torch.float64 if backend == "eager" else torch.float32
    m, _ = load(STYLES[style], "gqa_rope", dtype, seed=5)
    c = sc.compile(m, backend=backend)
    lengths = (7, 11) if style == "time_loop" else (7, 19, 1)   # time_loop: unrolled per length (smaller graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the time loop's retrace warnings (asserted below)
        for T in lengths:
            x = torch.randn(2, T, 16, dtype=dtype, generator=torch.Generator().manual_seed(T))
            with torch.no_grad():
                assert rel(c(x), m(x)) <= TOL[backend], T
    ops = op_counts(c.graph)
    text = c.explain()
    for op in ("attention", "feedback"):
        assert ops.get(op) == EXPECTED[style].get(op), (ops, text)
    assert "fallback" not in ops and "tri_solve" not in ops, (ops, text)
    attention = next(n for n in c.graph.nodes if n.op == "attention")
    assert attention.attrs.get("rope") and attention.inputs[1].type.shape[2] == 2, text   # RoPE and GQA folded
    assert "fallbacks (run as torch ops): none" in text, text
    if style == "time_loop":   # one static graph per length, each traced on its own
        assert len(c.retraces) == len(lengths) - 1 and "fixed a batch or sequence size" in c.retraces[0]
        assert c.graph.inputs[0].type.shape[1] == lengths[-1]
        assert f"traced graphs: {len(lengths)}" in text, text
    else:                      # T stays symbolic: one graph serves every length
        assert not c.retraces and not isinstance(c.graph.inputs[0].type.shape[1], int)
        assert f"from a{'n explicit inverse' if style == 'inverse_nan' else ' general solve'}" in text, text


# -- controls: only the blocking spellings respelled, then recognised -----------------------------------
class DenseSolveRespelled(DenseSolveSessaLayer):
    """dense_solve with softmax() for the hand-written one and solve_triangular for linalg.solve."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mixer = self.mixer

        def forward(a):
            B, T, D = a.shape
            q = mixer.q_proj(a).reshape(B, T, mixer.H, mixer.d).permute(0, 2, 1, 3)
            k = mixer.k_proj(a).reshape(B, T, mixer.Hkv, mixer.d).permute(0, 2, 1, 3)
            v = mixer.v_proj(a).reshape(B, T, mixer.Hkv, mixer.d).permute(0, 2, 1, 3)
            if mixer.rope_on:
                q, k = mixer.rope(q), mixer.rope(k)
            g = mixer.H // mixer.Hkv
            k = k.unsqueeze(2).expand(B, mixer.Hkv, g, T, mixer.d).flatten(1, 2)
            v = v.unsqueeze(2).expand(B, mixer.Hkv, g, T, mixer.d).flatten(1, 2)
            bias = torch.triu(torch.full((T, T), float("-inf"), dtype=a.dtype, device=a.device), 1)
            p = (torch.einsum("bhid,bhjd->bhij", q, k) * mixer.d ** -0.5 + bias).softmax(-1)
            f = mixer.out_proj(torch.einsum("bhij,bhjd->bhid", p, v).permute(0, 2, 1, 3).reshape(B, T, D))
            fb = mixer.proj_fb(a)
            logits = torch.einsum("bid,bjd->bij", fb[..., :D], fb[..., D:]) * D ** -0.5
            logits = logits + torch.triu(torch.full((T, T), -1e9, dtype=a.dtype, device=a.device), 0)
            alpha = logits.softmax(-1) * (torch.arange(T, device=a.device) > 0).to(a.dtype)[:, None]
            gamma = torch.tanh(mixer.gamma_bias + mixer.gamma_ctx(a)).mul(mixer.gamma_max)
            eye = torch.eye(T, dtype=a.dtype, device=a.device)
            return torch.linalg.solve_triangular(eye - gamma * alpha, f, upper=False)

        mixer.forward = forward


class InverseRespelled(InverseNanSessaLayer):
    """inverse_nan with bias + q @ k^T * scale for baddbmm and solve_triangular for inv(...) @ f."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mixer = self.mixer

        def forward(a):
            B, T, D = a.shape
            H, Hk, d = mixer.n_heads, mixer.n_kv, mixer.hd
            q = mixer.q_proj(a).view(B, T, H, d)
            k = mixer.k_proj(a).view(B, T, Hk, d)
            v = mixer.v_proj(a).view(B, T, Hk, d)
            if mixer.use_rope:
                q, k = mixer._rope(q), mixer._rope(k)
            kv_of = torch.arange(H, device=a.device) // (H // Hk)
            k, v = k.index_select(2, kv_of), v.index_select(2, kv_of)
            q, k, v = (t.transpose(1, 2).reshape(B * H, T, d) for t in (q, k, v))
            causal = torch.ones(T, T, device=a.device).triu(1).bool()
            bias = torch.zeros(T, T, dtype=a.dtype, device=a.device).masked_fill(causal, float("-inf"))
            w = torch.softmax(bias + (q @ k.transpose(1, 2)) * d ** -0.5, dim=-1)
            f = torch.bmm(w, v).view(B, H, T, d).transpose(1, 2).reshape(B, T, D)
            if H > 1:
                f = mixer.out_proj(f)
            q_b, k_b = mixer.proj_fb(a).split(D, dim=-1)
            scores = (q_b @ k_b.transpose(1, 2)) / D ** 0.5
            allowed = torch.ones(T, T, device=a.device).tril(-1).bool()
            alpha = torch.nan_to_num(scores.masked_fill(~allowed, float("-inf")).softmax(-1), nan=0.0)
            gamma = mixer.gamma_max * torch.tanh(mixer.gamma_ctx(a) + mixer.gamma_bias)
            system = torch.eye(T, dtype=a.dtype, device=a.device) - alpha * gamma
            return torch.linalg.solve_triangular(system, f, upper=False)

        mixer.forward = forward


# inverse_nan's GQA by index_select sits between its RoPE and the attention: once the index_select is folded as
# GQA, the rotation is folded into the attention too
@pytest.mark.parametrize("cls, rope_folded", [(DenseSolveRespelled, True), (InverseRespelled, True)],
                         ids=["dense_solve", "inverse_nan"])
def test_respelled_blockers_are_recognised(cls, rope_folded):
    m, ref = load(cls, "gqa_rope", torch.float64, seed=6)
    c = sc.compile(m, backend="eager")
    for T in (7, 19):
        x = torch.randn(2, T, 16, dtype=torch.float64)
        with torch.no_grad():
            assert rel(m(x), ref(x)) <= 1e-10
            assert rel(c(x), m(x)) <= 1e-10, T
    ops = op_counts(c.graph)
    assert ops.get("attention") == 1 and ops.get("feedback") == 1, (ops, c.explain())
    assert "tri_solve" not in ops, c.explain()
    assert bool(next(n for n in c.graph.nodes if n.op == "attention").attrs.get("rope", False)) == rope_folded
    assert "aten.index_select.default" not in c.explain()


# -- the two lowering bugs, on minimal modules -----------------------------------------------------------
class MixedOuter(nn.Module):
    """torch.outer of a float32 arange and a (float64, after .double()) buffer: torch promotes to float64."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 4))

    def forward(self, x):
        return x[..., :4] * torch.outer(torch.arange(x.shape[1], dtype=torch.float32), self.freq).cos()


class LoopOverTime(nn.Module):
    """A Python loop over range(T): the sequence length is pinned by the code."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h, outs = self.lin(x), []
        for t in range(x.shape[1]):
            outs.append(h[:, t] + (0.5 * outs[-1] if outs else 0.0))
        return torch.stack(outs, dim=1) + x


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_outer_of_mixed_dtypes_lowers_with_promotion(backend):
    m = MixedOuter().double()
    c = sc.compile(m, backend=backend)
    for T in (5, 1):
        x = torch.randn(2, T, 8, dtype=torch.float64)
        with torch.no_grad():
            assert rel(c(x), m(x)) <= 1e-12, T


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_loop_over_time_traces_each_length_statically(backend):
    m = LoopOverTime().eval()
    c = sc.compile(m, backend=backend)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for T in (5, 1, 9, 5):   # T = 1 is traced at 1, not at the 2 the tracer grows sizes to
            x = torch.randn(3, T, 8)
            with torch.no_grad():
                assert rel(c(x), m(x)) <= 1e-5, T
    assert len(c.retraces) == 2 and len(c._variants) == 3, c.retraces
    assert sum("tracing it again" in str(w.message) for w in seen) == 2
    assert c.graph.inputs[0].type.shape[1] == 5 and not isinstance(c.graph.inputs[0].type.shape[0], int)


def test_a_length_the_loop_pins_is_exported_once(monkeypatch):
    """torch.export pins T (the loop needs it as an int); the lowering takes the pinned number for the input's
    dim, so the module is exported once per length, not a second time with T static, and the graph is the one
    that second export gives (the same ops and shapes, up to value names)."""
    import importlib

    import sessa_compiler.frontend.lower as lower

    trace = importlib.import_module("sessa_compiler.frontend.trace")   # (the package's `trace` is a function)

    m = LoopOverTime().eval()
    x = torch.randn(3, 5, 8)
    exports = []
    real_export = trace.export_program
    monkeypatch.setattr(trace, "export_program", lambda *a, **k: exports.append(a[3:] or k) or real_export(*a, **k))
    once = trace.trace_with_report(m, (x,))
    assert len(exports) == 1
    real_run = lower.Lowerer.run

    def refuse_numbers(self):   # the previous path: a lowering with a pinned number fails, so T is exported static
        if any(isinstance(n, int) for n in self.dim_names.values()):
            raise IRError("pinned")
        return real_run(self)

    monkeypatch.setattr(lower.Lowerer, "run", refuse_numbers)
    exports.clear()
    twice = trace.trace_with_report(m, (x,))
    assert len(exports) == 2
    shapes = lambda g: [(n.op, [str(v.type) for v in n.outputs]) for n in g.nodes]   # noqa: E731
    assert shapes(once.graph) == shapes(twice.graph) and once.graph.inputs[0].type == twice.graph.inputs[0].type
    assert once.graph.inputs[0].type.shape[1] == 5
    with torch.no_grad():
        assert rel(run_graph(once.graph, [x])[0], m(x)) <= 1e-5


# -- the spellings these styles needed, on minimal modules ----------------------------------------------------
def traced_graph(m, D=8, T=6):
    return trace_cached(m, (torch.randn(2, T, D, dtype=torch.float64),))


def check_outputs(tr, m, D=8, lengths=(5, 11)):
    for T in lengths:   # lengths other than the traced one
        x = torch.randn(3, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            assert rel(run_graph(tr.graph, [x])[0], m(x)) <= 1e-12, T


class Baddbmm(nn.Module):
    def __init__(self, beta, alpha, nan_bias=False):
        super().__init__()
        self.beta, self.alpha, self.nan_bias = beta, alpha, nan_bias

    def forward(self, x):
        bias = torch.full_like(x[:, :, :1], float("nan")) if self.nan_bias else x[:, :, :1].exp()
        return torch.baddbmm(bias, x, x.transpose(1, 2), beta=self.beta, alpha=self.alpha)


@pytest.mark.parametrize("beta, alpha, nan_bias", [(1, 0.5, False), (0.25, 3.0, False), (0, 2.0, True)])
def test_baddbmm_lowers_to_matmul_and_add(beta, alpha, nan_bias):
    m = Baddbmm(beta, alpha, nan_bias)
    tr = traced_graph(m)
    assert "fallback" not in op_counts(tr.graph) and "matmul" in op_counts(tr.graph), str(tr.graph)
    check_outputs(tr, m)


class MaxDim(nn.Module):
    def __init__(self, use_indices):
        super().__init__()
        self.use_indices = use_indices

    def forward(self, x):
        values, indices = x.max(-1, keepdim=True)
        return x - values + (indices.to(x.dtype) if self.use_indices else 0.0) + x.amax(1, keepdim=True)


@pytest.mark.parametrize("use_indices", [False, True])
def test_max_dim_values_lower_to_amax_and_used_indices_keep_torch_op(use_indices):
    m = MaxDim(use_indices)
    tr = traced_graph(m)
    fallbacks = [n.attrs["target"] for n in tr.graph.nodes if n.op == "fallback"]
    assert fallbacks == (["aten.max.dim"] if use_indices else []), fallbacks
    check_outputs(tr, m)


class HandSoftmax(nn.Module):
    """exp(x - max) / sum(exp(x - max)) spelled in several ways; ``mode`` names the near misses."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        x = x @ x.transpose(1, 2)
        if self.mode == "max_twice":        # the numerator and the denominator each computed again
            return torch.exp(x - x.max(-1, keepdim=True)[0]) / torch.exp(x - x.max(-1, keepdim=True)[0]).sum(
                -1, keepdim=True)
        if self.mode == "amax":
            e = (x - x.amax(dim=2, keepdim=True)).exp()
            return e / e.sum(dim=-1, keepdim=True)
        if self.mode == "no_max":
            return x.exp() / x.exp().sum(-1, keepdim=True)
        if self.mode == "sum_other_dim":    # normalised over another axis than the max: softmax over dim 1
            e = torch.exp(x - x.amax(-1, keepdim=True))
            return e / e.sum(1, keepdim=True)
        if self.mode == "other_x":          # the denominator's exp is of another tensor
            e = torch.exp(x - x.amax(-1, keepdim=True))
            return e / torch.exp(2 * x - x.amax(-1, keepdim=True)).sum(-1, keepdim=True)
        raise ValueError(self.mode)


@pytest.mark.parametrize("mode", ["max_twice", "amax", "no_max", "sum_other_dim", "other_x"])
def test_hand_written_softmax_becomes_softmax_by_structure(mode):
    m = HandSoftmax(mode)
    tr = traced_graph(m)
    ops = op_counts(tr.graph)
    if mode in ("max_twice", "amax", "no_max"):
        assert ops.get("softmax") == 1 and "exp" not in ops and "fallback" not in ops, str(tr.graph)
        s = next(n for n in tr.graph.nodes if n.op == "softmax")
        assert s.attrs["dim"] == 2 and s.inputs[0].producer.op == "matmul", str(tr.graph)
    elif mode == "sum_other_dim":          # softmax over dim 1 of (x - max_-1 x): exact, but not softmax(x, -1)
        s = next(n for n in tr.graph.nodes if n.op == "softmax")
        assert s.attrs["dim"] == 1 and s.inputs[0].producer.op == "sub", str(tr.graph)
    else:
        assert "softmax" not in ops, str(tr.graph)
    check_outputs(tr, m)


class MaskedSdpa(nn.Module):
    """Attention by SDPA with an explicit mask of kind ``mask``; GQA by ``enable_gqa`` when kv_heads < heads."""

    def __init__(self, mask, D=8, H=2, kv_heads=2):
        super().__init__()
        self.q, self.kv = nn.Linear(D, D), nn.Linear(D, 2 * kv_heads * (D // H))
        self.mask, self.H, self.Hk = mask, H, kv_heads

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.H, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2 * self.Hk, -1).transpose(1, 2).chunk(2, 1)
        i = torch.arange(T, device=x.device)
        keep = {"bool": i[:, None] >= i[None, :], "strict": i[:, None] > i[None, :],
                "window": (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 3),
                "future": i[:, None] <= i[None, :]}.get(self.mask)
        if self.mask == "additive":
            mask = torch.zeros(T, T, dtype=x.dtype).masked_fill(i[None, :] > i[:, None], float("-inf"))
        else:
            mask = keep
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.Hk != self.H)
        return o.transpose(1, 2).reshape(B, T, D)


@pytest.mark.parametrize("mask, kv_heads, causal", [("bool", 2, True), ("additive", 2, True), ("bool", 1, True),
                                                     ("strict", 2, False), ("window", 2, False),
                                                     ("future", 2, False)])
def test_sdpa_with_a_mask_is_attention_only_when_the_mask_is_causal(mask, kv_heads, causal):
    m = MaskedSdpa(mask, kv_heads=kv_heads).double()
    tr = traced_graph(m)
    ops = op_counts(tr.graph)
    assert "fallback" not in ops, str(tr.graph)
    assert ops.get("attention", 0) == causal, (ops, tr.report.rejected)
    if causal:
        assert next(n for n in tr.graph.nodes if n.op == "attention").inputs[1].type.shape[2] == kv_heads
    else:
        assert any("attention candidate" in r for r in tr.report.rejected), tr.report.rejected
    check_outputs(tr, m)   # "strict": row 0 has no key; torch's SDPA gives 0 there, so must the lowering


@pytest.mark.parametrize("mask", ["bool", "strict"])
def test_sdpa_with_a_mask_on_tvm(mask):
    m = MaskedSdpa(mask).eval()
    c = sc.compile(m, backend="tvm")
    for T in (5, 11):
        x = torch.randn(3, T, 8)
        with torch.no_grad():
            assert rel(c(x), m(x)) <= 1e-5, T
    assert op_counts(c.graph).get("attention", 0) == (mask == "bool")


class DenseFeedback(nn.Module):
    """Sessa's feedback solved densely (``how``: solve or inverse), with a ``matrix`` that is Sessa's or a near
    miss: the softmax over every position (not triangular), or including the diagonal (a diagonal other than 1)."""

    def __init__(self, how, matrix, D=8):
        super().__init__()
        self.fb, self.g = nn.Linear(D, 2 * D), nn.Linear(D, 1)
        self.how, self.matrix = how, matrix

    def forward(self, x):
        T, D = x.shape[1], x.shape[2]
        qb, kb = self.fb(x).chunk(2, -1)
        logits = qb @ kb.transpose(1, 2) / math.sqrt(D)
        i = torch.arange(T, device=x.device)
        allowed = {"sessa": i[None, :] < i[:, None], "full": torch.ones(T, T, dtype=torch.bool),
                   "diagonal": i[None, :] <= i[:, None]}[self.matrix]
        alpha = torch.nan_to_num(logits.masked_fill(~allowed, float("-inf")).softmax(-1), nan=0.0)
        gamma = 0.9 * torch.tanh(self.g(x))
        system = torch.eye(T, dtype=x.dtype) - gamma * alpha
        return torch.linalg.solve(system, x) if self.how == "solve" else torch.linalg.inv(system) @ x


@pytest.mark.parametrize("matrix", ["sessa", "full", "diagonal"])
@pytest.mark.parametrize("how", ["solve", "inverse"])
def test_dense_solve_is_feedback_only_when_its_matrix_is_sessas(how, matrix):
    m = DenseFeedback(how, matrix).double()
    tr = traced_graph(m)
    ops = op_counts(tr.graph)
    target = "aten.linalg_solve.default" if how == "solve" else "aten.linalg_inv.default"
    fallbacks = [n.attrs["target"] for n in tr.graph.nodes if n.op == "fallback"]
    if matrix == "sessa":
        assert ops.get("feedback") == 1 and "tri_solve" not in ops and target not in fallbacks, str(tr.graph)
    else:   # still the general solve / inverse the module wrote; never feedback, never a triangular solve
        assert "feedback" not in ops and "tri_solve" not in ops and target in fallbacks, str(tr.graph)
        assert any("feedback candidate" in r and "not unit lower triangular" in r for r in tr.report.rejected), \
            tr.report.rejected
    check_outputs(tr, m)


class IndexSelectGqa(nn.Module):
    """GQA by index_select of kv heads: ``arange(H) // group`` repeats each kv head (what attention's GQA means);
    ``arange(H) % n_kv`` tiles them instead, a near miss that must keep the gathered heads."""

    def __init__(self, tiled, D=8, H=4, kv=2):
        super().__init__()
        self.q, self.kv = nn.Linear(D, D), nn.Linear(D, 2 * kv * (D // H))
        self.H, self.Hk, self.tiled = H, kv, tiled

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.H, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2 * self.Hk, -1).transpose(1, 2).chunk(2, 1)
        h = torch.arange(self.H, device=x.device)
        index = h % self.Hk if self.tiled else h // (self.H // self.Hk)
        k, v = k.index_select(1, index), v.index_select(1, index)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B, T, D)


@pytest.mark.parametrize("tiled", [False, True])
def test_index_select_gqa_is_folded_only_when_it_repeats_kv_heads(tiled):
    m = IndexSelectGqa(tiled).double()
    tr = traced_graph(m)
    ops = op_counts(tr.graph)
    attention = next(n for n in tr.graph.nodes if n.op == "attention")
    assert attention.inputs[1].type.shape[2] == (4 if tiled else 2), str(tr.graph)
    assert ("fallback" in ops) == tiled, str(tr.graph)
    check_outputs(tr, m)


class TorchMHA(nn.Module):
    """torch.nn.MultiheadAttention with a causal mask, as many baselines write it."""

    def __init__(self, bool_mask: bool, need_weights: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.bool_mask, self.need_weights = bool_mask, need_weights

    def forward(self, x):
        T = x.shape[1]
        mask = (torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1) if self.bool_mask
                else nn.Transformer.generate_square_subsequent_mask(T, device=x.device))
        return self.mha(x, x, x, attn_mask=mask, need_weights=self.need_weights)[0]


class TorchEncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.layer(x, src_mask=mask, is_causal=True)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
@pytest.mark.parametrize("make", [lambda: TorchMHA(True, False), lambda: TorchMHA(False, False),
                                  lambda: TorchMHA(True, True), TorchEncoderLayer],
                         ids=["mha-bool-mask", "mha-float-mask", "mha-need-weights", "encoder-layer"])
def test_torch_nn_attention_with_a_causal_mask_is_recognised(make, backend):
    """torch.nn's own attention modules, given a causal mask (boolean or -inf float, with or without the
    averaged weights computed): one attention op, no fallback, the module's outputs at T = 1 and lengths off
    any block size."""
    torch.manual_seed(0)
    m = make().eval()
    c = sc.compile(m, backend=backend)
    for T in (1, 9, 17):
        x = torch.randn(2, T, 16)
        with torch.no_grad():
            assert rel(c(x), m(x)) <= 1e-5
    counts = op_counts(c.graph)
    assert counts.get("attention") == 1 and not counts.get("fallback"), counts
