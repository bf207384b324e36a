"""The public API: sessa_compiler.compile(...) -> a module with the same signature and outputs."""
import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import TOLERANCE, relative_error
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer, TransformerLayer
from styles.loop_free_matmul_style import MatmulSessaLayer
from styles.sdpa_style import SdpaSessaLayer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sessa():
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).eval()
    return m, sc.compile(m, (torch.randn(2, 5, 32),))


@pytest.mark.parametrize("factory, make_input", [
    (lambda: SessaLayer(32, n_heads=4), lambda B, T: torch.randn(B, T, 32)),
    (lambda: SdpaSessaLayer(32, n_heads=4, n_kv_heads=2), lambda B, T: torch.randn(B, T, 32)),
    (lambda: MatmulSessaLayer(32, n_heads=2, use_forward_rope=False), lambda B, T: torch.randn(B, T, 32)),
    (lambda: MambaLayer(16), lambda B, T: torch.randn(B, T, 16)),
    (lambda: TransformerLayer(32, 4), lambda B, T: torch.randn(B, T, 32)),
    (lambda: Decoder(50, 32, "STM", n_heads=2), lambda B, T: torch.randint(0, 50, (B, T))),
])
def test_compiled_equals_module_and_traces_once(factory, make_input):
    torch.manual_seed(1)
    m = factory().eval()
    c = sc.compile(m)  # traced on the first call
    traced = None
    for B, T in [(2, 9), (1, 1), (3, 20)]:
        x = make_input(B, T)
        out = c(x)
        traced = traced or c._traced
        assert c._traced is traced, "a new sequence length must not re-trace"
        with torch.no_grad():
            assert relative_error(out, m(x)) <= 1e-4


def test_validate_passes_and_catches_a_wrong_graph():
    torch.manual_seed(2)
    m = SessaLayer(16, n_heads=2).eval()
    # eager interprets the graph at every call, so the deliberately wrong edit below reaches the run
    c = sc.compile(m, (torch.randn(2, 4, 16),), validate=True, backend="eager")
    assert "validate=True: no call checked yet" in c.explain()
    c(torch.randn(2, 7, 16))  # within tolerance: no error
    assert "validate=True: 1 call(s) checked against the original module, all within" in c.explain()
    fb = next(n for n in c.graph.nodes if n.op == "feedback")
    fb.attrs["scale"] *= 3.0  # a deliberately wrong graph
    with pytest.raises(sc.ValidationError, match=r"output 0 .*max abs error / max abs reference = .* > 1e-04"):
        c(torch.randn(2, 7, 16))


def test_bad_inputs_get_clear_errors(sessa):
    _, c = sessa
    with pytest.raises(sc.InputError, match=r"expected rank 3 \(f32\[B, T, 32\]\), got shape \(5, 32\)"):
        c(torch.randn(5, 32))
    with pytest.raises(sc.InputError, match=r"expected shape \(2, 5, 32\) \(f32\[B, T, 32\]\), got \(2, 5, 31\)"):
        c(torch.randn(2, 5, 31))
    with pytest.raises(sc.InputError, match=r"expected dtype torch.float32 .* got torch.float64"):
        c(torch.randn(2, 5, 32, dtype=torch.float64))
    with pytest.raises(sc.InputError, match=r"forward\(x: torch.Tensor\) -> torch.Tensor cannot take this call: too many positional arguments"):
        c(torch.randn(2, 5, 32), torch.randn(2, 5, 32))
    with pytest.raises(sc.InputError, match=r"keyword argument 'flag' must be a tensor or a constant .* got list"):
        c(torch.randn(2, 5, 32), flag=[1])
    with pytest.raises(sc.InputError, match="expected a tensor"):
        c([[1.0]])
    with pytest.raises(sc.InputError, match="different devices"):
        c(torch.randn(2, 5, 32, device="meta"))


def test_unknown_backend_is_named():
    with pytest.raises(sc.UnsupportedError, match="unknown backend 'cuda-magic'"):
        sc.compile(SessaLayer(8), backend="cuda-magic")


def test_explain_reports_recognised_ops_and_fallbacks(sessa):
    _, c = sessa
    text = c.explain()
    assert "core ops: attention x1, feedback x1" in text
    assert "recognised feedback" in text and "recognised attention" in text and "rope folded" in text
    assert "fallbacks (run as torch ops): none" in text
    assert "backend auto -> tvm (CPU inputs and a graph in f32)" in text and "backend tvm: target" in text


def test_auto_picks_tvm_for_float32_and_float64_on_cpu_and_eager_for_bf16():
    torch.manual_seed(4)
    for dtype, want in [(torch.float32, "tvm"), (torch.float64, "tvm"), (torch.bfloat16, "eager")]:
        m = SessaLayer(16, n_heads=2).to(dtype).eval()
        x = torch.randn(1, 6, 16, dtype=dtype)
        c = sc.compile(m, (x,), options={"fuse": False})  # a Triton-only option: TVM must not choke on it
        assert c.backend == want, (dtype, c._backend.why)
        with torch.no_grad():
            assert relative_error(c(x), m(x)) <= TOLERANCE[dtype]
        assert c.backend == want
    assert "computes in bf16, which TVM would run in float32" in c.explain()


def test_weight_updates_are_seen(sessa):
    m, c = sessa
    x = torch.randn(2, 6, 32)
    before = c(x)
    with torch.no_grad():
        m.W_out.weight.mul_(2.0)
    try:
        after = c(x)
        assert relative_error(after, m(x)) <= 1e-4
        assert relative_error(after, before) > 1e-2
    finally:
        with torch.no_grad():
            m.W_out.weight.div_(2.0)


@pytest.mark.parametrize("bias", [8.0, -8.0])
def test_low_precision_and_gamma_near_the_bound(bias):
    """bf16 and float32 compiled layers against the float64 module, gamma within 1e-6 of +-gamma_max."""
    torch.manual_seed(3)
    ref = SessaLayer(32, n_heads=4, n_kv_heads=2).double()
    with torch.no_grad():
        ref.mixer.gamma_bias.fill_(bias)
    x64 = torch.randn(2, 40, 32, dtype=torch.float64)
    want = ref(x64)
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]:
        m = SessaLayer(32, n_heads=4, n_kv_heads=2)
        m.load_state_dict(ref.state_dict())
        m = m.to(dtype)
        c = sc.compile(m, (x64[:, :5].to(dtype),))
        out = c(x64.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert relative_error(out, want) <= tol, dtype


def test_inputs_are_not_modified(sessa):
    _, c = sessa
    x = torch.randn(2, 6, 32)
    keep = x.clone()
    c(x)
    assert torch.equal(x, keep)


def test_a_non_contiguous_first_input_traces_and_later_layouts_run():
    """The first call's strides (a slice of a longer batch) must not become part of the traced graph."""
    m = SessaLayer(32, n_heads=4, n_kv_heads=2).eval()
    compiled = sc.compile(m, backend="eager")
    x = torch.randn(2, 11, 32)[:, :4]
    with torch.no_grad():
        assert relative_error(compiled(x), m(x)) <= 1e-5
        y = torch.randn(7, 3, 32).transpose(0, 1)   # another layout, another size
        assert relative_error(compiled(y), m(y)) <= 1e-5


def test_eager_explain_mentions_the_feedback_solve_only_where_there_is_one():
    x = torch.randn(2, 5, 16)
    with_feedback = sc.compile(SessaLayer(16, n_heads=2), backend="eager")
    without = sc.compile(MambaLayer(16), backend="eager")
    with_feedback(x), without(x)
    assert "feedback as a dense triangular solve" in with_feedback.explain()
    assert "feedback" not in without.explain().split("backend eager:")[1]
