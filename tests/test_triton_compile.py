"""compile(model, backend="triton") on CPU tensors (kernels in Triton's interpreter) against eager."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import pytest
import torch

triton_env.require_interpreter()

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.backends.eager import run_graph
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer, TransformerLayer

OPTS = {"feedback_chunk_size": 16}


def sessa(D=32, gamma_bias=None, **kw):
    torch.manual_seed(0)
    m = SessaLayer(D, **kw)
    if gamma_bias is not None:
        with torch.no_grad():
            m.mixer.gamma_bias.fill_(gamma_bias)
    return m.eval()


def check(model, *xs, tol=1e-4, compiled=None):
    """Run the triton-compiled module on each input; compare with the eager backend on the same traced graph."""
    compiled = compiled or sc.compile(model, backend="triton", options=OPTS)
    with torch.no_grad():
        for x in xs:
            out = compiled(x)
            ref = run_graph(compiled.graph, [x], compiled.graph.params)[0]
            assert out.dtype == ref.dtype and out.shape == ref.shape
            err = relative_error(out, ref)
            assert err <= tol, (tuple(x.shape), err)
    return compiled


def test_sessa_layer_matches_eager_at_several_lengths():
    compiled = check(sessa(n_heads=4, n_kv_heads=2), *(torch.randn(2, T, 32) for T in (17, 1, 40)))
    text = compiled.explain()
    assert "backend triton" in text
    for kernel in ("attention_fwd", "feedback_lse", "feedback_diag_inverse", "feedback_solve"):
        assert kernel in text


def test_lse_first_feedback_fallback_matches_and_launches_its_passes():
    """feedback_one_pass=False: the lse pass, the inverse pass, then the lse-first solve (feedback.py), against
    eager on the same graph; the default program folds those two nodes into the one-pass kernels."""
    compiled = check(sessa(n_heads=2), torch.randn(2, 37, 32),
                     compiled=sc.compile(sessa(n_heads=2), backend="triton",
                                         options={**OPTS, "feedback_one_pass": False}))
    text = compiled.explain()
    assert "feedback_lse" in text and "feedback_solve " in text and "feedback_solve_online" not in text
    from sessa_compiler.backends.triton.backend import TritonBackend

    graph = compiled.graph   # the same traced graph, as the default program (one pass) builds it
    backend = TritonBackend(interpret=True, feedback_chunk_size=16)
    default = backend.build_program(graph)
    text = backend.describe(graph)
    assert "made on the way by the one-pass kernels" in text and "core ops without a kernel" not in text
    assert len(default.one_pass) == 1 and not {"feedback_lse", "feedback_diag_inverse"} & {
        n.op for n in default.kernel_nodes}
    fallback = TritonBackend(interpret=True, feedback_chunk_size=16, feedback_one_pass=False).build_program(graph)
    assert not fallback.one_pass and {"feedback_lse", "feedback_diag_inverse"} <= {n.op for n in fallback.kernel_nodes}


@pytest.mark.parametrize("kw", [dict(n_heads=1), dict(n_heads=2, use_forward_rope=False),
                                dict(n_heads=2, gamma_bias=6.0), dict(n_heads=2, gamma_bias=-6.0)],
                         ids=["H1", "no-rope", "gamma+max", "gamma-max"])
def test_sessa_variants(kw):
    check(sessa(**kw), torch.randn(2, 21, 32))


def test_new_sequence_length_does_not_retrace_or_regenerate():
    from sessa_compiler.backends.triton.codegen import KERNEL_CACHE

    model = sessa(n_heads=2)
    with torch.no_grad():
        compiled = sc.compile(model, backend="triton", options=OPTS)
        compiled(torch.randn(1, 9, 32))
        before = KERNEL_CACHE.generated
        graph = compiled.graph
        out = compiled(torch.randn(1, 23, 32))
    assert KERNEL_CACHE.generated == before and compiled.graph is graph
    assert torch.isfinite(out).all()


def test_mamba_and_transformer_layers():
    check(MambaLayer(16).eval(), torch.randn(2, 11, 16))
    check(TransformerLayer(32, n_heads=2).eval(), torch.randn(2, 19, 32))


def test_decoder_against_the_original_module():
    torch.manual_seed(0)
    dec = Decoder(vocab_size=50, D=32, layers="SMT", n_heads=2).eval()
    tokens = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        out = sc.compile(dec, backend="triton", options=OPTS, validate=True)(tokens)  # validate: vs the module
    assert torch.isfinite(out).all()


def test_independently_written_sessa_module():
    from styles.sdpa_style import SdpaSessaLayer

    torch.manual_seed(0)
    check(SdpaSessaLayer(32, n_heads=2).eval(), torch.randn(2, 18, 32))


def test_print_ir_and_kernel_sources(capsys):
    compiled = sc.compile(sessa(n_heads=2), torch.randn(1, 5, 32), backend="triton", print_ir=True, options=OPTS)
    err = capsys.readouterr().err
    assert "// ----- IR after chunk-feedback{chunk_size=16} (1 rewrite(s)) -----" in err
    assert "feedback_chunked(" in err
    sources = compiled.kernel_sources()
    # the feedback's lse and inverses come from its one-pass kernels: those nodes have none of their own
    assert set(sources) == {"attention", "feedback"}
    assert "def feedback_probs_online(" in sources["feedback"]
    assert all(s.startswith("# sessa_compiler generated Triton kernel") for s in sources.values())


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    from sessa_compiler.backends.triton import backend as tb

    monkeypatch.setattr(tb, "interpreter_ready", lambda: False)
    compiled = sc.compile(sessa(n_heads=2), backend="triton")
    with pytest.raises(sc.UnsupportedError, match="TRITON_INTERPRET=1"):
        compiled(torch.randn(1, 4, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer_against_the_float64_module(dtype):
    """fp16/bf16 compiled layers (kernels load low precision, accumulate in fp32) vs the float64 oracle."""
    ref = sessa(n_heads=4, n_kv_heads=2, gamma_bias=6.0).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        m = SessaLayer(32, n_heads=4, n_kv_heads=2)
        m.load_state_dict(ref.state_dict())
        compiled = sc.compile(m.to(dtype).eval(), backend="triton", options=OPTS)
        out = compiled(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, want) <= 3e-2


def test_independently_written_matmul_style_layer():
    from styles.loop_free_matmul_style import MatmulSessaLayer

    torch.manual_seed(4)
    model = MatmulSessaLayer(32, n_heads=4, n_kv_heads=2).eval()
    compiled = check(model, torch.randn(2, 19, 32), torch.randn(1, 1, 32))
    with torch.no_grad():
        x = torch.randn(2, 19, 32)
        assert relative_error(compiled(x), model(x)) <= 1e-4


class ExplicitSolve(torch.nn.Module):
    """torch.linalg.solve_triangular on explicit, data-dependent weights: not a Sessa feedback, so it
    becomes the general tri_solve op."""

    def __init__(self, upper, unit, D=16):
        super().__init__()
        self.w, self.lin = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
        self.upper, self.unit = upper, unit

    def forward(self, x):
        T = x.shape[1]
        W = torch.tanh(torch.einsum("btd,bsd->bts", self.w(x), x)) * 0.08
        W = (W.triu() if self.upper else W.tril()) + 1.5 * torch.eye(T, dtype=x.dtype)
        return torch.linalg.solve_triangular(W, self.lin(x), upper=self.upper, unitriangular=self.unit)


@pytest.mark.parametrize("upper, unit", [(False, False), (True, True)], ids=["lower", "upper-unit"])
def test_explicit_triangular_solve_runs_the_tri_solve_kernel(upper, unit):
    from sessa_compiler.backends.triton.codegen import KERNEL_CACHE

    def launches():
        return sum(e.launches for e in KERNEL_CACHE.entries.values() if e.source.name == "tri_solve_fwd")

    torch.manual_seed(1)
    model = ExplicitSolve(upper, unit).eval()
    compiled = sc.compile(model, backend="triton")
    before = launches()
    with torch.no_grad():
        for T in (1, 17, 40):
            x = torch.randn(2, T, 16)
            assert relative_error(compiled(x), model(x)) <= 1e-4, T
    assert launches() == before + 3
    text = compiled.explain()
    assert "tri_solve_fwd" in text and "= tri_solve  [upper=" in text, text
    assert "core ops without a kernel here" not in text, text


def test_float64_triangular_solve_stays_on_torch():
    torch.manual_seed(2)
    model = ExplicitSolve(False, False).double().eval()
    compiled = sc.compile(model, backend="triton")
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) <= 1e-10
    assert "= tri_solve: runs in torch ({'A': 'f64', 'b': 'f64'} has no kernel)" in compiled.explain()
