"""The serving step exported to ONNX (method="decode_step") and run in onnxruntime with numpy only."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import sessa_compiler as sc
from model_helpers import randomize
from sessa_compiler.errors import InputError
from sessa_compiler.models import Decoder, SessaLayer
from sessa_compiler.tolerance import TOLERANCE, relative_error


def generate_numpy(path, prompt, max_new_tokens):
    """Greedy decoding from the exported decode_step with numpy and onnxruntime only: the README's code."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x_in, *cache_in = sess.get_inputs()
    caches = [np.zeros([prompt.shape[0] if d == "B" else 0 if d == "P" else d for d in i.shape], np.float32)
              for i in cache_in]

    def run(token, caches):
        return sess.run(None, {x_in.name: token, **{i.name: c for i, c in zip(cache_in, caches)}})
    for t in range(prompt.shape[1]):
        logits, *caches = run(prompt[:, t], caches)
    out = [prompt]
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        out.append(token[:, None])
        if step + 1 < max_new_tokens:
            logits, *caches = run(token, caches)
    return np.concatenate(out, axis=1)


def test_decoder_generates_from_the_onnx_decode_step(tmp_path, one_thread):
    model = randomize(Decoder(40, 32, "SMTS", n_heads=4, n_kv_heads=2, d_state=4), seed=7)
    path = str(tmp_path / "decode.onnx")
    result = sc.export_onnx(model, (torch.zeros(1, dtype=torch.long),), path, method="decode_step")
    assert result.validation and max(r["error"] for r in result.validation) <= TOLERANCE[torch.float32]
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(1))
    got = generate_numpy(path, prompt.numpy(), 6)
    assert np.array_equal(got, model.generate(prompt, 6).numpy())


def test_sessa_layer_decode_step_onnx_equals_forward_at_every_position(tmp_path, one_thread):
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=2)
    path = str(tmp_path / "layer.onnx")
    compiled = sc.compile(model, backend="eager")
    example = (torch.randn(1, 1, 32), compiled.init_cache(1))     # with the sequence dim, and a compiled cache
    result = sc.export_onnx(model, example, path, method="decode_step")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names[0] == "x_t" and names[1:] == result.cache_order
    assert [o.name for o in sess.get_outputs()][0] == "y_t"
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(3))   # batch 3: not the example's
    with torch.no_grad():
        full = model(x)
    caches = [np.zeros([3 if d == "B" else 0 if d == "P" else d for d in i.shape], np.float32)
              for i in sess.get_inputs()[1:]]
    ys = []
    for t in range(9):
        y, *caches = sess.run(None, {"x_t": x[:, t:t + 1].numpy(), **dict(zip(names[1:], caches))})
        ys.append(torch.from_numpy(y))
    assert relative_error(torch.cat(ys, dim=1), full) <= TOLERANCE[torch.float32]
    # the ONNX caches hold what the compiled module's cache holds at the same positions
    cache = compiled.init_cache(3, max_len=9)
    compiled.prefill(x, cache)
    for key, c in zip(names[1:], caches):
        want = cache[key]
        assert relative_error(torch.from_numpy(c), want) <= TOLERANCE[torch.float32], key


def test_onnx_prefill_then_onnx_decode_generate_like_the_model(tmp_path, one_thread):
    """The prefill file takes the whole prompt (an ONNX Loop over positions whose body is the step) and its
    caches feed the decode_step file: both keep the same cache layout."""
    model = randomize(Decoder(40, 32, "SMTS", n_heads=4, n_kv_heads=2, d_state=4), seed=9)
    pre = sc.export_onnx(model, (torch.zeros(1, 3, dtype=torch.long),), str(tmp_path / "prefill.onnx"),
                         method="prefill")
    assert max(r["error"] for r in pre.validation) <= TOLERANCE[torch.float32]
    dec = sc.export_onnx(model, (torch.zeros(1, dtype=torch.long),), str(tmp_path / "decode.onnx"),
                         method="decode_step")
    assert pre.cache_order == dec.cache_order
    s_pre = ort.InferenceSession(pre.path, providers=["CPUExecutionProvider"])
    s_dec = ort.InferenceSession(dec.path, providers=["CPUExecutionProvider"])
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    caches = [np.zeros([2 if d == "B" else 0 if d == "P" else d for d in i.shape], np.float32)
              for i in s_pre.get_inputs()[1:]]
    logits, *caches = s_pre.run(None, {"x": prompt.numpy(), **dict(zip(pre.cache_order, caches))})
    with torch.no_grad():
        assert relative_error(torch.from_numpy(logits), model(prompt)) <= TOLERANCE[torch.float32]
    seq = prompt.numpy()
    token = logits[:, -1].argmax(-1)
    for _ in range(5):
        seq = np.concatenate([seq, token[:, None]], axis=1)
        logits, *caches = s_dec.run(None, {"x_t": token, **dict(zip(dec.cache_order, caches))})
        token = logits.argmax(-1)
    assert np.array_equal(seq, model.generate(prompt, 5).numpy())


def test_wrong_methods_are_clear_errors(tmp_path):
    model = SessaLayer(16)
    with pytest.raises(InputError, match="method must be"):
        sc.export_onnx(model, (torch.randn(1, 16),), str(tmp_path / "p.onnx"), method="decode")
    with pytest.raises(InputError, match="init_cache"):
        sc.export_onnx(model, (torch.randn(1, 16), model.init_cache(1)), str(tmp_path / "p.onnx"), method="decode_step")


def _load_runtime_by_path(path):
    """The torch-free loader copied into the export directory, loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sessa_tvm_runtime_step", f"{path}/sessa_tvm_runtime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_tvm(path)


def test_tvm_decode_step_export_generates_like_the_model(tmp_path, one_thread):
    model = randomize(Decoder(40, 32, "SMTS", n_heads=4, n_kv_heads=2, d_state=4), seed=8)
    path = sc.export_tvm(model, (torch.zeros(1, dtype=torch.long),), str(tmp_path / "dec"), method="decode_step")
    rt = _load_runtime_by_path(path)
    names = [i["name"] for i in rt.inputs]
    assert names[0] == "x_t" and names[1:4] == ["attention.k", "attention.v", "feedback.k_b"]
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(2))
    caches = [np.zeros([2 if d == "B" else 0 if d == "P" else d for d in i["shape"]], np.float32)
              for i in rt.inputs[1:]]
    seq = prompt.numpy()
    with torch.no_grad():
        full = model(prompt)
    for t in range(4):
        logits, *caches = rt(seq[:, t], *caches)
        assert relative_error(torch.from_numpy(logits), full[:, t]) <= TOLERANCE[torch.float32], f"position {t}"
    for _ in range(5):
        token = logits.argmax(-1)
        seq = np.concatenate([seq, token[:, None]], axis=1)
        logits, *caches = rt(token, *caches)
    assert np.array_equal(seq, model.generate(prompt, 5).numpy())


def test_tvm_prefill_export_equals_forward_from_empty_and_non_empty_caches(tmp_path, one_thread):
    """Prefill of 3 positions from empty caches, then 2 more on the returned caches, through the torch-free
    loader, against the full forward; then the prefill's caches feed the decode_step export."""
    model = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), seed=5)
    pre = _load_runtime_by_path(sc.export_tvm(model, (torch.randn(1, 3, 32),), str(tmp_path / "pre"),
                                              method="prefill"))
    step = _load_runtime_by_path(sc.export_tvm(model, (torch.randn(1, 32),), str(tmp_path / "step"),
                                               method="decode_step"))
    assert pre.manifest["method"] == "prefill" and [i["name"] for i in pre.inputs][0] == "x"
    assert [i["name"] for i in pre.inputs][1:] == [i["name"] for i in step.inputs][1:]
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))   # batch 2: not the example's
    with torch.no_grad():
        full = model(x)
    caches = [np.zeros([2 if d == "B" else 0 if d == "P" else d for d in i["shape"]], np.float32)
              for i in pre.inputs[1:]]
    y, *caches = pre(x[:, :3].numpy(), *caches)
    assert y.shape == (2, 3, 32) and relative_error(torch.from_numpy(y), full[:, :3]) <= TOLERANCE[torch.float32]
    y, *caches = pre(x[:, 3:5].numpy(), *caches)
    assert relative_error(torch.from_numpy(y), full[:, 3:5]) <= TOLERANCE[torch.float32]
    assert caches[0].shape[2] == 5     # attention keys [B, Hkv, P, d]: 5 positions
    y_t, *caches = step(x[:, 5].numpy(), *caches)
    assert relative_error(torch.from_numpy(y_t), full[:, 5]) <= TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="at least one position"):
        pre(x[:, :0].numpy(), *caches)


def test_tvm_export_bad_method_or_example_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="method must be"):
        sc.export_tvm(SessaLayer(16), (torch.randn(1, 16),), str(tmp_path / "p"), method="decode")
    with pytest.raises(InputError, match=r"\[B, T, ...\]"):
        sc.export_tvm(SessaLayer(16), (torch.randn(16),), str(tmp_path / "p"), method="prefill")


class PositionWiseLM(torch.nn.Module):
    """Token ids through position-wise ops only: a step program with no cache at all."""

    def __init__(self):
        super().__init__()
        self.emb, self.ff, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 50)

    def forward(self, ids):
        return self.head(torch.relu(self.ff(self.emb(ids))))


def test_a_step_export_with_no_cache_runs_in_both_runtimes(tmp_path):
    torch.manual_seed(0)
    m = PositionWiseLM().eval()
    example = (torch.randint(0, 50, (2,)),)
    tv = sc.export_tvm(m, example, str(tmp_path / "tvm"), method="decode_step")
    x = np.random.default_rng(0).integers(0, 50, (3,))
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    assert np.abs(sc.load_tvm(str(tmp_path / "tvm"))(x) - want).max() <= 1e-5, tv
    r = sc.export_onnx(m, example, str(tmp_path / "step.onnx"), method="decode_step")
    assert "validated batch" in repr(r) and "max err" in repr(r), repr(r)   # (the repr raised KeyError)


class TwoOutputs(torch.nn.Module):
    """A layer whose forward returns (logits, hidden), as Hugging Face style models return several outputs."""

    def __init__(self):
        super().__init__()
        self.layer = SessaLayer(16, n_heads=2)
        self.head = torch.nn.Linear(16, 7)

    def forward(self, x):
        h = self.layer(x)
        return self.head(h), h


def test_step_and_prefill_exports_of_a_module_with_two_outputs(tmp_path):
    """Both outputs are validated (ONNX) and returned by the torch-free loader's prefill (TVM), step by step."""
    m = randomize(TwoOutputs(), seed=3).eval()
    for method, example in (("decode_step", (torch.randn(1, 16),)), ("prefill", (torch.randn(1, 3, 16),))):
        r = sc.export_onnx(m, example, str(tmp_path / f"{method}.onnx"), method=method)
        assert "validated" in repr(r), repr(r)
    pre = sc.load_tvm(sc.export_tvm(m, (torch.randn(1, 3, 16),), str(tmp_path / "pre"), method="prefill"))
    assert [o["name"] for o in pre.manifest["outputs"]][:2] == ["y_0", "y_1"]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, hidden = m(x)
    caches = [np.zeros([2 if d == "B" else 0 if d == "P" else d for d in i["shape"]], np.float32)
              for i in pre.inputs[1:]]
    y0, y1, *caches = pre(x[:, :3].numpy(), *caches)
    assert y0.shape == (2, 3, 7) and y1.shape == (2, 3, 16)
    assert relative_error(torch.from_numpy(y0), logits[:, :3]) <= TOLERANCE[torch.float32]
    assert relative_error(torch.from_numpy(y1), hidden[:, :3]) <= TOLERANCE[torch.float32]
    y0, y1, *caches = pre(x[:, 3:].numpy(), *caches)
    assert relative_error(torch.from_numpy(y1), hidden[:, 3:]) <= TOLERANCE[torch.float32]
