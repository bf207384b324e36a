"""ONNX export: standard ops only, dynamic batch and sequence length, checked in onnxruntime.

Two layers of tests, in the flash-linear-attention habit of "every fast variant against the plain one":
- the core-op lowerings (feedback solve, attention, scan) from hand-written IR, run in onnxruntime in
  float64 against semantics/core.py at shapes that straddle the chunks of their Loops;
- whole models traced by our frontend: one exported file run at many (B, T) against the eager module
  at the spec's tolerances, for the reference SessaLayer, a Sessa/Mamba/Transformer Decoder, the two
  independently written styles, and a block with ops the frontend does not recognise;
- long context: attention and the feedback solve are Loops over chunks, so onnxruntime's memory is
  O(T * chunk), not O(T^2) (measured at T = 8192 in a subprocess).
"""
from __future__ import annotations

import collections
import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import onnx  # noqa: E402 - installed by requirements/all.txt, so CI always runs these tests
import onnxruntime as ort  # noqa: E402

from styles.loop_free_matmul_style import MatmulSessaLayer
from styles.sdpa_style import SdpaSessaLayer
from styles.unrecognised import OddBlock

from sessa_compiler import SessaCompilerError, UnsupportedError, export_onnx, parse
from sessa_compiler.api import TOLERANCE, relative_error
from sessa_compiler.semantics import attention_ref, feedback_ref, scan_ref
from sessa_compiler.export import onnx_lower
from sessa_compiler.export.onnx_core import ATTENTION_CHUNK, FEEDBACK_LSE_ROWS
from sessa_compiler.export.onnx_export import (
    OnnxUnsupportedOpError,
    OnnxValidationError,
    build_model,
    onnx_ready,
    model_domains,
    model_op_counts,
    validate_with_onnxruntime,
)
from sessa_compiler.models import Decoder, SessaLayer

STANDARD = {"", "ai.onnx"}


def session(model_or_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(sess, *xs) -> list:
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def assert_standard(model):
    assert model_domains(model) <= STANDARD, model_domains(model)
    assert [o.domain for o in model.opset_import] == [""]


def assert_close(out, ref, tol, what):
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: max abs error / max abs reference = {err:.3e} > {tol:.0e}"


def _graphs(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for sg in a.graphs:
                yield from _graphs(sg)


def loop_bodies(model) -> dict:
    """Loop body graph names -> how many Loops run them (feedback_chunks, attention_chunks)."""
    return dict(collections.Counter(a.g.name for g in _graphs(model.graph) for n in g.node if n.op_type == "Loop"
                                    for a in n.attribute if a.name == "body"))


# -- core lowerings from hand-written IR, float64 -----------------------------------------------------------
FEEDBACK_IR = """\
graph fb(%f: f64[B, T, 6], %qb: f64[B, T, 8], %kb: f64[B, T, 8], %gamma: f64[B, T]) {
  %s: f64[B, T, 6] = feedback(%f, %qb, %kb, %gamma) {scale=0.35355339059327373}
  return %s
}
"""


def test_feedback_lowering_matches_reference_across_chunk_boundaries():
    model = build_model(parse(FEEDBACK_IR))
    onnx.checker.check_model(model, full_check=True)
    assert_standard(model)
    counts = model_op_counts(model)
    assert counts["Loop"] == 2  # the log-sum-exp rows and the chunked solve; the diagonal blocks in parallel
    sess = session(model)
    g = torch.Generator().manual_seed(0)
    C = onnx_ready(parse(FEEDBACK_IR)).nodes[-1].attrs["chunk_size"]   # the chunk the pass chose
    assert [n.op for n in onnx_ready(parse(FEEDBACK_IR)).nodes] == ["feedback_lse", "feedback_diag_inverse",
                                                                     "feedback_chunked"]
    for B, T, bias in [(1, 1, 8.0), (2, C - 1, -8.0), (1, C, 8.0), (3, C + 1, 0.3), (2, 3 * C + 5, 8.0), (1, 300, -8.0),
                       (1, FEEDBACK_LSE_ROWS + 1, 8.0)]:
        f, qb, kb = (torch.randn(B, T, w, generator=g, dtype=torch.float64) for w in (6, 8, 8))
        gamma = 0.999 * torch.tanh(bias + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64))  # near +-gamma_max
        (s,) = run(sess, f, qb, kb, gamma)
        assert_close(s, feedback_ref(f, qb, kb, gamma, 8 ** -0.5), 1e-10, f"feedback B={B} T={T} gamma~{bias:+}")


def test_feedback_lowering_float32_and_float16_accumulate_in_float32():
    for dt, tol in (("f32", TOLERANCE[torch.float32]), ("f16", TOLERANCE[torch.float16])):
        sess = session(build_model(parse(FEEDBACK_IR.replace("f64", dt))))
        g = torch.Generator().manual_seed(1)
        f, qb, kb = (torch.randn(2, 200, w, generator=g, dtype=torch.float64) for w in (6, 8, 8))
        gamma = torch.full((2, 200), 0.999 * math.tanh(8.0), dtype=torch.float64)
        tdt = {"f32": torch.float32, "f16": torch.float16}[dt]
        (s,) = run(sess, *(t.to(tdt) for t in (f, qb, kb, gamma)))
        assert s.dtype == tdt
        assert_close(s, feedback_ref(f, qb, kb, gamma, 8 ** -0.5), tol, f"feedback {dt}")


ATTENTION_IR = """\
graph att(%q: f64[B, T, 4, 6], %k: f64[B, T, 2, 6], %v: f64[B, T, 2, 5], %inv_freq: f64[3]) {
  %o: f64[B, T, 4, 5] = attention(%q, %k, %v, %inv_freq) {scale=0.4082482904638631, causal=True, rope=True}
  %p: f64[B, T, 4, 5] = attention(%q, %k, %v) {scale=0.5, causal=True}
  return %o, %p
}
"""


def test_attention_lowering_gqa_rope_matches_reference():
    sess = session(build_model(parse(ATTENTION_IR)))
    g = torch.Generator().manual_seed(2)
    inv_freq = 10000.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    for B, T in [(1, 1), (2, 17), (1, 70)]:
        q = torch.randn(B, T, 4, 6, generator=g, dtype=torch.float64)
        k = torch.randn(B, T, 2, 6, generator=g, dtype=torch.float64)
        v = torch.randn(B, T, 2, 5, generator=g, dtype=torch.float64)
        o, p = run(sess, q, k, v, inv_freq)
        assert_close(o, attention_ref(q, k, v, 6 ** -0.5, True, inv_freq), 1e-10, f"rope attention T={T}")
        assert_close(p, attention_ref(q, k, v, 0.5, True), 1e-10, f"attention T={T}")


ATTENTION_CHUNKS_IR = """\
graph att(%q: f64[B, T, 4, 6], %k: f64[B, T, 2, 6], %v: f64[B, T, 2, 5], %inv_freq: f64[3], %k4: f64[B, T, 4, 6], %v4: f64[B, T, 4, 5]) {
  %o: f64[B, T, 4, 5] = attention(%q, %k, %v, %inv_freq) {scale=0.4082482904638631, causal=True, rope=True}
  %p: f64[B, T, 4, 5] = attention(%q, %k, %v) {scale=0.5, causal=True}
  %r: f64[B, T, 4, 5] = attention(%q, %k4, %v4, %inv_freq) {scale=0.5, causal=True, rope=True}
  %u: f64[B, T, 4, 5] = attention(%q, %k, %v) {scale=0.5, causal=False}
  return %o, %p, %r, %u
}
"""


def test_attention_lowering_across_query_chunk_boundaries():
    """One Loop per attention over chunks of ATTENTION_CHUNK queries: T below, at and past one and two
    chunks, with GQA (H=4, Hkv=2) and without, RoPE on and off, and non-causal."""
    model = build_model(parse(ATTENTION_CHUNKS_IR))
    onnx.checker.check_model(model, full_check=True)
    assert_standard(model)
    assert loop_bodies(model) == {"attention_chunks": 4}
    sess = session(model)
    g = torch.Generator().manual_seed(12)
    inv_freq = 10000.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    C = ATTENTION_CHUNK
    for B, T in [(2, C - 1), (1, C), (2, C + 1), (1, 2 * C - 1), (1, 2 * C + 3)]:
        q = torch.randn(B, T, 4, 6, generator=g, dtype=torch.float64)
        k, k4 = (torch.randn(B, T, h, 6, generator=g, dtype=torch.float64) for h in (2, 4))
        v, v4 = (torch.randn(B, T, h, 5, generator=g, dtype=torch.float64) for h in (2, 4))
        o, p, r, u = run(sess, q, k, v, inv_freq, k4, v4)
        assert o.shape == (B, T, 4, 5)
        assert_close(o, attention_ref(q, k, v, 6 ** -0.5, True, inv_freq), 1e-10, f"GQA rope attention T={T}")
        assert_close(p, attention_ref(q, k, v, 0.5, True), 1e-10, f"GQA attention T={T}")
        assert_close(r, attention_ref(q, k4, v4, 0.5, True, inv_freq), 1e-10, f"rope attention H=Hkv T={T}")
        assert_close(u, attention_ref(q, k, v, 0.5, False), 1e-10, f"non-causal GQA attention T={T}")


SCAN_IR = """\
graph ssm(%u: f64[B, T, 6], %delta: f64[B, T, 6], %A: f64[6, 4], %Bm: f64[B, T, 4], %Cm: f64[B, T, 4], %D: f64[6]) {
  %y: f64[B, T, 6] = scan(%u, %delta, %A, %Bm, %Cm, %D)
  return %y
}
"""


def test_scan_lowering_matches_reference():
    model = build_model(parse(SCAN_IR))
    assert model_op_counts(model).get("Scan") == 1
    sess = session(model)
    g = torch.Generator().manual_seed(3)
    for B, T in [(1, 1), (2, 37)]:
        u, Bm, Cm = (torch.randn(B, T, w, generator=g, dtype=torch.float64) for w in (6, 4, 4))
        delta = torch.nn.functional.softplus(torch.randn(B, T, 6, generator=g, dtype=torch.float64))
        A = -torch.rand(6, 4, generator=g, dtype=torch.float64) - 0.1
        D = torch.randn(6, generator=g, dtype=torch.float64)
        (y,) = run(sess, u, delta, A, Bm, Cm, D)
        assert_close(y, scan_ref(u, delta, A, Bm, Cm, D), 1e-10, f"scan T={T}")


# -- whole models --------------------------------------------------------------------------------------------
def plant_gamma(module, bias):
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "gamma_bias"):
                m.gamma_bias.fill_(bias)
    return module


def check_file_at(path, module, shapes, make_input, dtype=torch.float32):
    sess = session(path)
    for B, T in shapes:
        x = make_input(B, T)
        (out,) = run(sess, x)
        with torch.no_grad():
            ref = module(x)
        assert out.shape == ref.shape
        assert_close(out, ref, TOLERANCE[dtype], f"{type(module).__name__} B={B} T={T}")


@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory):
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).eval()
    path = str(tmp_path_factory.mktemp("onnx") / "sessa_gqa.onnx")
    return m, export_onnx(m, (torch.randn(2, 9, 32),), path)


def test_one_sessa_file_serves_every_batch_and_length(gqa_export):
    m, res = gqa_export
    assert len(res.validation) == 2  # the example inputs and a second (B, T)
    model = onnx.load(res.path)
    onnx.checker.check_model(model, full_check=True)
    assert_standard(model)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "T", 32]
    g = torch.Generator().manual_seed(5)
    check_file_at(res.path, m, [(B, T) for T in (1, 17, 64, 300) for B in (1, 3)],
                  lambda B, T: torch.randn(B, T, 32, generator=g))


@pytest.mark.parametrize("kwargs, bias", [
    ({"D": 16, "n_heads": 1, "max_len": 320}, 8.0),                                 # H = 1 (no out_proj), masks buffers, gamma ~ +max
    ({"D": 24, "n_heads": 2, "n_kv_heads": 1, "use_forward_rope": False}, -8.0),      # RoPE off, GQA, gamma ~ -max
], ids=["single_head_max_len_gamma_plus", "rope_off_gqa_gamma_minus"])
def test_sessa_configs(tmp_path, kwargs, bias):
    torch.manual_seed(1)
    m = plant_gamma(SessaLayer(**kwargs).eval(), bias)
    D = kwargs["D"]
    if "max_len" in kwargs:  # the module raises past max_len, so the one exported program holds up to it
        with pytest.warns(UserWarning, match=f"equals the module only where T <= {kwargs['max_len']};"):
            res = export_onnx(m, (torch.randn(1, 5, D),), tmp_path / "s.onnx")
    else:
        res = export_onnx(m, (torch.randn(1, 5, D),), tmp_path / "s.onnx")
    assert_standard(res.model)
    g = torch.Generator().manual_seed(6)
    check_file_at(res.path, m, [(2, 1), (1, 33), (2, 300)], lambda B, T: torch.randn(B, T, D, generator=g))


def test_decoder_with_sessa_mamba_transformer_layers(tmp_path):
    torch.manual_seed(2)
    m = Decoder(64, 32, "SMT", n_heads=4, n_kv_heads=2).eval()
    res = export_onnx(m, (torch.randint(0, 64, (2, 12)),), tmp_path / "decoder.onnx")
    counts = res.op_counts()
    assert counts["Scan"] == 1  # selective scan
    assert loop_bodies(res.model) == {"feedback_lse": 1, "feedback_chunks": 1, "attention_chunks": 2}  # S: all, T: attention
    assert_standard(res.model)
    g = torch.Generator().manual_seed(7)
    check_file_at(res.path, m, [(1, 1), (2, 17), (1, 64), (2, 300)],
                  lambda B, T: torch.randint(0, 64, (B, T), generator=g))


@pytest.mark.parametrize("style, kwargs", [
    (SdpaSessaLayer, {"D": 16, "n_heads": 4, "n_kv_heads": 2}),
    (MatmulSessaLayer, {"D": 12, "n_heads": 2, "n_kv_heads": 1, "use_forward_rope": False}),
], ids=["sdpa_gqa", "matmul_rope_off"])
def test_independently_written_styles(tmp_path, style, kwargs):
    torch.manual_seed(3)
    m = plant_gamma(style(**kwargs).eval(), 4.0)
    D = kwargs["D"]
    res = export_onnx(m, (torch.randn(2, 7, D),), tmp_path / "style.onnx")
    # the user's solve_triangular became the chunked solve, the user's attention the chunked attention
    assert loop_bodies(res.model) == {"feedback_lse": 1, "feedback_chunks": 1, "attention_chunks": 1}
    assert_standard(res.model)
    g = torch.Generator().manual_seed(8)
    check_file_at(res.path, m, [(1, 1), (3, 45), (1, 130)], lambda B, T: torch.randn(B, T, D, generator=g))


def test_unrecognised_block_exports_through_the_fallback_table(tmp_path):
    torch.manual_seed(4)
    m = OddBlock(16).eval()
    res = export_onnx(m, (torch.randn(2, 9, 16),), tmp_path / "odd.onnx")
    counts = res.op_counts()
    assert {"CumSum", "TopK", "ReduceMax"} <= set(counts)  # cumsum, sort, logsumexp
    assert_standard(res.model)
    g = torch.Generator().manual_seed(9)
    check_file_at(res.path, m, [(1, 1), (3, 50)], lambda B, T: torch.randn(B, T, 16, generator=g))


def test_static_export_at_another_opset_fixes_the_shapes(tmp_path):
    m = OddBlock(8).eval()
    res = export_onnx(m, (torch.randn(2, 5, 8),), tmp_path / "static.onnx", dynamic=False, opset=21)
    assert len(res.validation) == 1
    assert [(o.domain, o.version) for o in res.model.opset_import] == [("", 21)]
    dims = [d.dim_value for d in res.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 5, 8]


class AsinhVarBlock(torch.nn.Module):
    """aten.asinh is not in the exporter's table (atan2 is, since semantics/fallback_forms.py): it goes through
    torch.onnx.export."""

    def forward(self, x):
        return x + torch.asinh(2 * x + 1) + torch.var(x, dim=-1, keepdim=True)


def test_ops_outside_the_table_go_through_torch_exporter(tmp_path):
    res = export_onnx(AsinhVarBlock(), (torch.randn(2, 5, 4),), tmp_path / "asinh.onnx")
    assert "Asinh" in res.op_counts()
    assert_standard(res.model)
    check_file_at(res.path, AsinhVarBlock(), [(1, 1), (4, 23)], lambda B, T: torch.randn(B, T, 4))


class BesselBlock(torch.nn.Module):
    def forward(self, x):
        return x + torch.special.bessel_j0(x)


def test_op_without_onnx_lowering_fails_naming_it(tmp_path):
    # not in the table, and torch's exporter has no ONNX function for it either
    with pytest.raises(OnnxUnsupportedOpError, match=r"aten\.special_bessel_j0.*torch\.onnx\.export failed") as info:
        export_onnx(BesselBlock(), (torch.randn(2, 5, 4),), tmp_path / "bessel.onnx")
    assert isinstance(info.value, SessaCompilerError)


# -- long context: O(T * chunk) memory ------------------------------------------------------------------------
MEMORY_CHILD = r"""
import resource, sys, numpy as np, onnxruntime as ort

def peak_mb():
    # VmHWM is this process's own peak RSS. ru_maxrss is not: on Linux a child started by fork/vfork + exec
    # inherits the parent's, so it would hide any peak below the (large) pytest process's RSS.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024

model, x_path, y_path = sys.argv[1:]
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
x = np.load(x_path)
before = peak_mb()
(y,) = sess.run(None, {sess.get_inputs()[0].name: x})
after = peak_mb()
np.save(y_path, y)
print(before, after)
"""


def two_sequence_dims(model) -> list:
    """Values whose inferred shape has two T dims (shape inference cannot see into Loop iterations, so
    this only catches a T x T tensor in the main graph; the memory measurement is the real check)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return [(vi.name, [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim])
            for g in _graphs(inferred.graph) for vi in [*g.value_info, *g.output]
            if [d.dim_param for d in vi.type.tensor_type.shape.dim].count("T") >= 2]


def test_long_context_memory_is_linear_in_T(tmp_path):
    """onnxruntime at T = 8192, measured in a fresh process: the O(T^2) lowering this replaced grew the peak
    RSS by 3.2 GB (attention probabilities alone are 4 heads x 8192^2 x 4 bytes = 1 GiB; the feedback
    W 256 MiB each), the chunked one by ~70 MB. The output still matches the eager module."""
    T, bound_mb = 8192, 400
    torch.manual_seed(7)
    m = SessaLayer(64, n_heads=4, n_kv_heads=2).eval()
    res = export_onnx(m, (torch.randn(1, 9, 64),), tmp_path / "long.onnx")
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(13))
    x_path, y_path = str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    np.save(x_path, x.numpy())
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, res.path, x_path, y_path],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(float, proc.stdout.split()[-2:])
    growth = after - before
    print(f"onnxruntime peak RSS at T={T}: {before:.0f} MB before the run, {after:.0f} MB after (+{growth:.0f} MB)")
    assert growth < bound_mb, (f"onnxruntime's peak RSS grew by {growth:.0f} MB at T={T} (bound {bound_mb} MB): "
                               "a tensor with two sequence dims?")
    out = torch.from_numpy(np.load(y_path))
    with torch.no_grad():
        ref = m(x)
    assert_close(out, ref, TOLERANCE[torch.float32], f"SessaLayer T={T}")
    assert two_sequence_dims(res.model) == []


# -- dtypes ------------------------------------------------------------------------------------------------------
def test_float16_export_matches_the_float64_reference(tmp_path):
    torch.manual_seed(5)
    m32 = plant_gamma(SessaLayer(32, n_heads=4, n_kv_heads=2).eval(), 3.0)
    m16 = copy.deepcopy(m32).half()
    res = export_onnx(m16, (torch.randn(2, 9, 32).half(),), tmp_path / "fp16.onnx")
    assert res.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    sess = session(res.path)
    m64 = copy.deepcopy(m32).double()
    g = torch.Generator().manual_seed(10)
    for B, T in [(1, 1), (2, 100)]:
        x = torch.randn(B, T, 32, generator=g, dtype=torch.float64)
        (out,) = run(sess, x.half())
        assert out.dtype == torch.float16
        with torch.no_grad():
            assert_close(out, m64(x), TOLERANCE[torch.float16], f"fp16 export T={T} vs float64 reference")


def test_bfloat16_exports_but_onnxruntime_cannot_validate_it(tmp_path):
    m = SessaLayer(16, n_heads=2).to(torch.bfloat16).eval()
    path = tmp_path / "bf16.onnx"
    with pytest.raises(UnsupportedError, match="bfloat16"):
        export_onnx(m, (torch.randn(2, 9, 16).to(torch.bfloat16),), path)
    model = onnx.load(str(path))  # written and checked before validation refused
    onnx.checker.check_model(model, full_check=True)
    assert_standard(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


# -- validation can fail ----------------------------------------------------------------------------------------
def test_validation_reports_a_module_that_differs(gqa_export):
    m, res = gqa_export
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.W_out.bias.add_(0.5)
    sess = session(res.path)
    x = (torch.randn(1, 20, 32),)
    with pytest.raises(OnnxValidationError, match=r"output 0 differs .* > 1e-04"):
        validate_with_onnxruntime(sess, res.traced.graph, other, [x], res.opset)


def test_a_wrong_lowering_is_caught_and_named(tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_lower.LOWERINGS, "feedback_chunked", lambda L, node: [L.get(node, 0)])  # skips the solve
    m = plant_gamma(SessaLayer(16, n_heads=1).eval(), 2.0)
    with pytest.raises(OnnxValidationError, match=r"first IR value that differs is %feedback"):
        export_onnx(m, (torch.randn(1, 6, 16),), tmp_path / "wrong.onnx")


def test_import_does_not_load_onnx():
    code = "import sys, sessa_compiler; assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the custom op route: torch.onnx.export of a model that calls sessa_compiler::feedback ----------------------
class CustomFeedbackBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, f, q_b, k_b, gamma):
        from sessa_compiler.library import feedback

        return feedback(self.proj(f), q_b, k_b, gamma, 0.25)


def feedback_inputs(B, T, g):
    return (torch.randn(B, T, 8, generator=g), torch.randn(B, T, 16, generator=g), torch.randn(B, T, 16, generator=g),
            0.999 * torch.tanh(4.0 + torch.randn(B, T, generator=g)))


def test_custom_feedback_op_exports_with_torch_onnx_export_and_export_onnx(tmp_path):
    import warnings


    from torch.export import Dim

    from sessa_compiler.export.onnx_translation import translation_table

    torch.manual_seed(6)
    m = CustomFeedbackBlock().eval()
    g = torch.Generator().manual_seed(11)
    args = feedback_inputs(2, 40, g)
    B, T = Dim("B"), Dim("T")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(m, args, dynamo=True, dynamic_shapes=({0: B, 1: T},) * 4,
                                 custom_translation_table=translation_table(), verbose=False)
    model = prog.model_proto
    onnx.checker.check_model(model, full_check=True)
    assert_standard(model)
    assert not model.functions and "Loop" in model_op_counts(model)
    sess = session(model)
    for Bn, Tn in [(1, 1), (3, 100)]:
        xs = feedback_inputs(Bn, Tn, g)
        (out,) = run(sess, *xs)
        with torch.no_grad():
            assert_close(out, m(*xs), TOLERANCE[torch.float32], f"torch.onnx.export route T={Tn}")
    res = export_onnx(m, args, tmp_path / "custom.onnx")  # our exporter maps the op to its feedback lowering
    assert "Loop" in res.op_counts()
    assert_standard(res.model)


class _ShiftedLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

    def forward(self, input_ids, labels):
        logits = self.head(self.embed(input_ids))
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)), logits


def test_a_reshape_to_a_size_that_is_zero_at_run_time(tmp_path):
    """A language-model loss over the shifted positions: at T = 1 they are B * (T - 1) = 0. ONNX's Reshape reads
    a 0 in its target shape as "keep the input's dim" unless allowzero=1 (the file failed in onnxruntime there)."""
    torch.manual_seed(0)
    m = _ShiftedLoss().eval()
    path = str(tmp_path / "lm.onnx")
    ids = torch.randint(0, 50, (2, 8))
    export_onnx(m, (ids, ids), path)
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for B, T in ((1, 1), (2, 1), (2, 5)):
        x = torch.randint(0, 50, (B, T))
        with torch.no_grad():
            loss, logits = m(x, x)
        got = s.run(None, {"input_ids": x.numpy(), "labels": x.numpy()})
        assert np.isnan(got[0]) == bool(torch.isnan(loss)) and (T == 1 or abs(float(got[0]) - loss.item()) < 1e-5)
        assert np.abs(got[1] - logits.numpy()).max() < 1e-5


class _FloatMasked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x, attention_mask):          # attention_mask: float [B, T], 1 = keep
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        bias = (1.0 - attention_mask)[:, None, None, :] * torch.finfo(x.dtype).min
        causal = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)
        w = (q @ k.transpose(-1, -2) / 8 ** 0.5 + bias + causal).clamp(min=torch.finfo(x.dtype).min).softmax(-1)
        return self.out((w @ v).transpose(1, 2).reshape(B, T, 16))


def test_export_validates_a_float_mask_with_masks(tmp_path):
    """The exporter checks the file at a second batch and length with inputs of its own: a float 0/1 mask input
    got normal draws there, the module overflowed to inf, and the export failed blaming the graph."""
    torch.manual_seed(0)
    m = _FloatMasked().eval()
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    path = str(tmp_path / "m.onnx")
    export_onnx(m, (torch.randn(2, 9, 16), mask), path)
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x, mk = torch.randn(3, 13, 16), torch.ones(3, 13)
    mk[0, 10:] = 0
    got = s.run(None, {s.get_inputs()[0].name: x.numpy(), s.get_inputs()[1].name: mk.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - m(x, mk).numpy()).max() < 1e-4


class Float32NormIn64(torch.nn.Module):
    """A float64 model whose RMSNorm computes in float32 (Hugging Face's LlamaRMSNorm: x.float() ... .to(dtype))."""

    def __init__(self, D=8):
        super().__init__()
        self.lin, self.w = torch.nn.Linear(D, D), torch.nn.Parameter(torch.ones(D))

    def forward(self, x):
        h = self.lin(x)
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.w * hf.to(h.dtype)


def test_a_float64_model_with_a_float32_region_validates_at_float32_tolerance(tmp_path):
    # the output is float64, its precision float32's: validation allows the graph's narrowest float type
    torch.manual_seed(0)
    m = Float32NormIn64().double()
    r = export_onnx(m, (torch.randn(2, 5, 8, dtype=torch.float64),), str(tmp_path / "m.onnx"))
    assert r.validation and all(max(run["errors"]) < 1e-4 for run in r.validation)


def test_a_model_in_training_mode_is_exported_in_eval_mode(tmp_path):
    # as torch.onnx.export does: dropout off (it failed validation, or the TVM build, as a train-mode fallback)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="training mode; it is exported in eval mode"):
        r = export_onnx(m, (torch.randn(2, 5, 8),), str(tmp_path / "m.onnx"))
    assert m.training and all(x.training for x in m.modules())   # the modes are restored
    assert r.validation and "Dropout" not in r.op_counts()


def test_export_onnx_makes_missing_directories(tmp_path):
    m = torch.nn.Linear(8, 8)
    export_onnx(m, (torch.randn(1, 3, 8),), str(tmp_path / "new" / "dir" / "m.onnx"))
    assert (tmp_path / "new" / "dir" / "m.onnx").is_file()


class _BoolOps(torch.nn.Module):
    def forward(self, a, b):
        return torch.where(a > b, a > 0, b > 0), (a > 0) + (a > 1), (a > 0) * (b > 0)


class _ScatterMean(torch.nn.Module):
    def forward(self, x, idx):
        return x.scatter_reduce(-1, idx, x[..., :3], "mean")


def test_bool_where_and_arithmetic_export_and_run(tmp_path):
    """torch.where on bool branches (onnxruntime has no such Where) and bool + bool / bool * bool (logical or /
    and; ONNX's Add and Mul take no bool) export to graphs onnxruntime runs, with torch's values."""
    m = _BoolOps()
    a, b = torch.randint(-3, 3, (2, 5, 6)), torch.randint(-3, 3, (2, 5, 6))
    export_onnx(m, (a, b), tmp_path / "bool.onnx", validate=False)
    s = ort.InferenceSession(str(tmp_path / "bool.onnx"), providers=["CPUExecutionProvider"])
    a2, b2 = torch.randint(-3, 3, (3, 4, 6)), torch.randint(-3, 3, (3, 4, 6))
    got = s.run(None, {s.get_inputs()[0].name: a2.numpy(), s.get_inputs()[1].name: b2.numpy()})
    for g, w in zip(got, m(a2, b2)):
        assert g.dtype == np.bool_ and np.array_equal(g, w.numpy())


def test_a_fallback_op_torch_onnx_exports_wrongly_is_refused_even_unvalidated(tmp_path):
    """scatter_reduce(..., "mean") goes through torch.onnx.export's own graph for the op, whose values differ from
    torch's (torch 2.13): the op's graph is checked against torch on a sample whether or not the export is."""
    x, idx = torch.randn(2, 5, 8), torch.randint(0, 8, (2, 5, 3))
    with pytest.raises(SessaCompilerError, match="gives other values than torch"):
        export_onnx(_ScatterMean(), (x, idx), tmp_path / "mean.onnx", validate=False)
