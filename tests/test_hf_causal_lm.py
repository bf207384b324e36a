"""Issue 22, point 4: a causal LM in the style of Hugging Face model code (tests/styles/hf_causal_lm_style.py:
config object, output dataclass that is an OrderedDict subclass, labels and a shifted cross-entropy loss inside
forward, keyword arguments with defaults, Python size arithmetic, @torch.no_grad rotary table, Conv1D addmm on
(B*T, D) rows) compiles on eager, tvm (whole graph) and triton (interpreter), exports to ONNX and TVM and runs at
two new lengths, and its gradients equal the module's."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.errors import SessaCompilerError, TraceError
from sessa_compiler.tolerance import TOLERANCE, relative_error
from tests.model_helpers import op_counts
from tests.styles.hf_causal_lm_style import SessaCausalLMOutput, SessaForCausalLM, SessaLMConfig

TOL = TOLERANCE[torch.float32]
V = 61


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SessaForCausalLM(SessaLMConfig(vocab_size=V)).eval()


def ids(B, T, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_eager_returns_the_output_dataclass_with_the_loss_and_equal_gradients(model):
    c = sc.compile(model, backend="eager")
    x = ids(2, 9, 1)
    labels = x.clone()
    labels[:, :3] = -100                      # ignored positions count for nothing (not in the mean either)
    out = c(x, labels=labels)
    want = model(x, labels=labels)
    assert type(out) is SessaCausalLMOutput and list(out.keys()) == ["loss", "logits"]
    assert out.hidden_states is None
    assert relative_error(out.logits, want.logits) <= TOL
    assert relative_error(out.loss, want.loss) <= TOL
    assert c.graph.ops().count("fallback") == 0   # addmm, cross_entropy, .to(device) lowered to IR ops

    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    want.loss.backward()
    ref = [p.grad.clone() for p in params]
    model.zero_grad()
    out.loss.backward()
    for p, r in zip(params, ref):
        assert relative_error(p.grad, r) <= 10 * TOL
    model.zero_grad()

    # no labels: loss is None; return_dict=False: a tuple (traced again for the other keyword structure)
    with pytest.warns(UserWarning, match="tracing it again"):
        no_labels = c(x)
    assert no_labels.loss is None and "loss" not in no_labels
    assert relative_error(no_labels.logits, want.logits) <= TOL
    with pytest.warns(UserWarning, match="tracing it again"):
        as_tuple = c(x, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert relative_error(as_tuple[0], want.loss) <= TOL


def test_tvm_runs_the_whole_graph_in_tvm_without_a_hybrid_warning(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a fall back to hybrid mode warns: it must not happen
        c = sc.compile(model, backend="tvm")
        with torch.no_grad():
            for i, T in enumerate((9, 4)):
                x = ids(2 + i, T, 2 + i)
                assert relative_error(c(x).logits, model(x).logits) <= TOL
    assert "mode: whole graph in TVM" in c.explain()


def test_triton_interpreter_matches_the_module(model):
    triton_env.require_interpreter()
    c = sc.compile(model, backend="triton", options={"feedback_chunk_size": 16})
    with torch.no_grad():
        for i, T in enumerate((17, 5)):
            x = ids(1 + i, T, 4 + i)
            assert relative_error(c(x).logits, model(x).logits) <= 10 * TOL


def test_exports_to_onnx_and_tvm_run_at_two_new_lengths(model, tmp_path):
    from sessa_compiler.export.onnx_export import _session, run_onnxruntime
    from sessa_compiler.export.tvm_runtime import load_tvm

    x = ids(2, 9, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = sc.export_onnx(model, (x,), tmp_path / "lm.onnx", validate=False)
        tvm_dir = sc.export_tvm(model, (x,), tmp_path / "lm_tvm")
    session, tvm_model = _session(exp.path), load_tvm(tvm_dir)
    for i, T in enumerate((5, 23)):
        y = ids(1 + 2 * i, T, 7 + i)
        with torch.no_grad():
            want = model(y).logits
        got_onnx = run_onnxruntime(session, exp.traced.graph, (y,))[0]
        got_tvm = torch.as_tensor(tvm_model(y.numpy()))
        assert relative_error(got_onnx, want) <= TOL, T
        assert relative_error(got_tvm, want) <= TOL, T


def padded(B, T, seed):
    """input_ids, attention_mask (row 0 padded on the left, row 1 on the right), labels (-100 at padding)."""
    x = ids(B, T, seed)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, :max(1, T // 3)] = 0
    if B > 1:
        am[1, T - T // 3:] = 0
    return x, am, x.masked_fill(am == 0, -100)


def _grads(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", ["eager", "triton", "tvm"])
def test_attention_mask_is_recognised_and_outputs_and_gradients_equal_the_module(model, backend, monkeypatch):
    """With attention_mask given, both layers' attention is one attention op with the mask operand; the logits
    (every position, padded ones included), the loss and every parameter's gradient equal the module's on
    left- and right-padded rows. Triton and TVM: the training step runs the masked forward kernels (with their lse)
    and the masked backward kernels; the blocked torch forward and backward of semantics/backward.py are made to
    raise."""
    import sessa_compiler.backends.training as training
    import sessa_compiler.semantics.backward as sem_backward

    if backend == "triton":
        triton_env.require_interpreter()
    c = sc.compile(model, backend=backend, options={"feedback_chunk_size": 16} if backend == "triton" else None)
    x, am, labels = padded(3, 9, 11)
    if backend != "tvm":   # (tvm's forward without gradients: the whole-graph test below)
        with torch.no_grad():
            got = c(x, attention_mask=am).logits
            want = model(x, attention_mask=am).logits
        assert op_counts(c.graph).get("attention") == 2
        assert c.explain().count("key-padding mask %attention_mask") == 2
        if backend == "triton":
            assert "with a key-padding mask: a call that needs gradients runs this kernel with its lse and the " \
                "masked backward kernels" in c.explain()
        assert relative_error(got, want) <= TOL
    if backend != "eager":
        def blocked(*a, **k):
            raise AssertionError(f"the blocked torch attention ran in a masked {backend} training step")
        monkeypatch.setattr(sem_backward, "attention_backward", blocked)
        monkeypatch.setattr(sem_backward, "attention_lse", blocked)
        monkeypatch.setattr(training, "attention_lse", blocked)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*tracing it again", UserWarning)   # labels: another keyword structure
        out = c(x, attention_mask=am, labels=labels)
    got_grads = _grads(model, out.loss)
    monkeypatch.undo()
    ref = model(x, attention_mask=am, labels=labels)
    assert op_counts(c.graph).get("attention") == 2
    if backend == "tvm":
        assert c.explain().count("with a key-padding mask: a call that needs gradients runs its masked forward") == 2
    assert relative_error(out.logits, ref.logits) <= TOL
    assert relative_error(out.loss, ref.loss) <= TOL
    for g, r in zip(got_grads, _grads(model, ref.loss)):
        assert relative_error(g, r) <= 10 * TOL


def test_attention_mask_on_tvm_and_in_both_exports_at_two_new_lengths(model, tmp_path):
    from sessa_compiler.export.onnx_export import _session, run_onnxruntime
    from sessa_compiler.export.tvm_runtime import load_tvm

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # no fall back to hybrid mode
        c = sc.compile(model, backend="tvm")
        x, am, _ = padded(2, 9, 12)
        with torch.no_grad():
            assert relative_error(c(x, attention_mask=am).logits, model(x, attention_mask=am).logits) <= TOL
    assert op_counts(c.graph).get("attention") == 2 and "mode: whole graph in TVM" in c.explain()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = sc.export_onnx(model, (x, am), tmp_path / "lm.onnx", validate=False)
        tvm_dir = sc.export_tvm(model, (x, am), tmp_path / "lm_tvm")
    assert op_counts(exp.traced.graph).get("attention") == 2
    session, tvm_model = _session(exp.path), load_tvm(tvm_dir)
    for i, T in enumerate((5, 23)):
        y, mask, _ = padded(3, T, 13 + i)
        with torch.no_grad():
            want = model(y, attention_mask=mask).logits
        got_onnx = run_onnxruntime(session, exp.traced.graph, (y, mask))[0]
        got_tvm = torch.as_tensor(tvm_model(y.numpy(), mask.numpy()))
        assert relative_error(got_onnx, want) <= TOL, T
        assert relative_error(got_tvm, want) <= TOL, T


def test_an_op_the_compiler_cannot_take_is_an_error_naming_the_op_and_the_line():
    class ComplexAbs(torch.nn.Module):
        def forward(self, x):
            z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
            return z.abs() * 2

    with pytest.raises(TraceError) as info:
        sc.compile(ComplexAbs(), backend="eager")(torch.randn(2, 5, 8))
    msg = str(info.value)
    assert "aten.abs" in msg and "test_hf_causal_lm.py:" in msg and "z.abs() * 2" in msg
    assert isinstance(info.value, SessaCompilerError)
