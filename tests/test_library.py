"""The core ops as torch.library custom ops (sessa_compiler/library.py): fake kernels and autograd pass
opcheck; the feedback backward (a transposed blocked solve) equals autograd through the dense reference
and allocates no T x T matrix; torch.compile(fullgraph=True) of every model and of a compiled module, and
torch.export of a compiled module, work."""
import pytest
import torch
from torch.export import Dim

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.semantics import feedback_ref
from sessa_compiler.library import feedback_backward
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer, TransformerLayer

pytestmark = pytest.mark.usefixtures("one_thread")
OPS = torch.ops.sessa_compiler


def feedback_inputs(B, T, D, c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, T, D, generator=g, dtype=dtype)
    q, k = (torch.randn(B, T, c, generator=g, dtype=dtype) for _ in range(2))
    gamma = torch.rand(B, T, generator=g, dtype=dtype) * 1.8 - 0.9
    return [t.requires_grad_(True) for t in (f, q, k, gamma)]


def test_opcheck_feedback():
    f, q, k, gamma = feedback_inputs(2, 5, 3, 2)
    torch.library.opcheck(OPS.feedback.default, (f, q, k, gamma, 0.7))
    # a non-contiguous f: the fake must give the real op's (contiguous) strides, not f's
    ft = f.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    torch.library.opcheck(OPS.feedback.default, (ft, q, k, gamma, 0.7))


def test_opcheck_attention():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 2, 4, generator=g).requires_grad_(True)
    k, v = (torch.randn(2, 5, 1, 4, generator=g).requires_grad_(True) for _ in range(2))   # GQA
    torch.library.opcheck(OPS.attention.default, (q, k, v, torch.rand(2, generator=g), 0.3, True))
    torch.library.opcheck(OPS.attention.default, (q, k, v, None, 0.3, False))


def test_opcheck_selective_scan_with_a_transposed_input():
    """The fake returned u's strides (empty_like) while the op returns a contiguous tensor: Inductor's
    stride assertion failed in torch.compile(MambaLayer)."""
    g = torch.Generator().manual_seed(2)
    B, T, Din, N = 2, 5, 6, 4
    u = torch.randn(B, Din, T, generator=g).transpose(1, 2).requires_grad_(True)
    args = (u, torch.rand(B, T, Din, generator=g), -torch.rand(Din, N, generator=g), torch.randn(B, T, N, generator=g),
            torch.randn(B, T, N, generator=g), torch.randn(Din, generator=g))
    torch.library.opcheck(OPS.selective_scan.default, args)


@pytest.mark.parametrize("T, chunk", [(1, 8), (37, 8), (16, 8), (9, 64)])
def test_feedback_gradient_equals_the_dense_reference(T, chunk):
    f, q, k, gamma = feedback_inputs(2, T, 5, 3, seed=T)
    w = torch.randn(2, T, 5, dtype=torch.float64)
    want = torch.autograd.grad((feedback_ref(f, q, k, gamma, 0.6) * w).sum(), (f, q, k, gamma))
    got = torch.autograd.grad((OPS.feedback(f, q, k, gamma, 0.6) * w).sum(), (f, q, k, gamma))
    s = feedback_ref(f, q, k, gamma, 0.6).detach()
    blocked = feedback_backward(w, s, q.detach(), k.detach(), gamma.detach(), 0.6, chunk=chunk)
    for a, b, c in zip(got, blocked, want):
        assert relative_error(a, c) <= 1e-10 and relative_error(b, c) <= 1e-10
    assert torch.autograd.gradcheck(lambda *xs: OPS.feedback(*xs, 0.6), feedback_inputs(1, 4, 2, 2, seed=9))


def test_feedback_backward_forms_no_t_by_t_matrix():
    B, T, D = 1, 1024, 4
    f, q, k, gamma = (t.detach() for t in feedback_inputs(B, T, D, 4))
    s = feedback_ref(f, q, k, gamma, 0.5)
    with torch.profiler.profile(profile_memory=True) as prof:
        feedback_backward(torch.randn_like(s), s, q, k, gamma, 0.5, chunk=64)
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= B * 64 * T * 8, biggest  # a [B, chunk, T] block of the weights at most
    assert biggest < B * T * T * 8 / 8


def attention_inputs(B, T, H, Hkv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g, dtype=dtype)
    k, v = (torch.randn(B, T, Hkv, d, generator=g, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(True) for t in (q, k, v)]


@pytest.mark.parametrize("T, H, Hkv, rope, causal", [(1, 2, 1, True, True), (37, 2, 2, False, True),
                                                      (130, 4, 2, True, True), (130, 1, 1, False, False),
                                                      (9, 4, 1, True, False)])
def test_attention_gradient_equals_the_dense_reference(T, H, Hkv, rope, causal):
    """The op's backward (FlashAttention-2 style, query blocks of 128: T=130 straddles one) against
    autograd through the dense float64 attention_ref."""
    from sessa_compiler.semantics import attention_ref
    q, k, v = attention_inputs(2, T, H, Hkv, 4, seed=T)
    inv = torch.rand(2, dtype=torch.float64) if rope else None
    w = torch.randn(2, T, H, 4, dtype=torch.float64)
    want = torch.autograd.grad((attention_ref(q, k, v, 0.4, causal, inv) * w).sum(), (q, k, v))
    got = torch.autograd.grad((OPS.attention(q, k, v, inv, 0.4, causal) * w).sum(), (q, k, v))
    for a, c in zip(got, want):
        assert a.dtype == c.dtype and relative_error(a, c) <= 1e-10
    f32 = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    got32 = torch.autograd.grad((OPS.attention(*f32, inv if inv is None else inv.float(), 0.4, causal)
                                 * w.float()).sum(), f32)
    for a, c in zip(got32, want):
        assert a.dtype == torch.float32 and relative_error(a, c) <= 1e-5


def test_attention_backward_forms_no_t_by_t_matrix():
    B, H, T, d = 1, 2, 1024, 8
    q, k, v = attention_inputs(B, T, H, 1, d)
    out = OPS.attention(q, k, v, None, 0.3, True)
    with torch.profiler.profile(profile_memory=True) as prof:
        out.backward(torch.randn_like(out))
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= B * H * 128 * T * 8, biggest   # a [B, H, block, T] block of probabilities at most
    assert biggest < B * H * T * T * 8 / 4


MODELS = {
    "sessa": (lambda: SessaLayer(16, n_heads=2, n_kv_heads=1), lambda: torch.randn(2, 9, 16)),
    "mamba": (lambda: MambaLayer(16), lambda: torch.randn(2, 9, 16)),
    "transformer": (lambda: TransformerLayer(16, 2), lambda: torch.randn(2, 9, 16)),
    "decoder": (lambda: Decoder(40, 16, "SMTS", n_heads=2), lambda: torch.randint(0, 40, (2, 9))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_compile_fullgraph_of_every_model(name):
    """aot_eager: dynamo's capture (no graph break) and AOT autograd with the ops' fake kernels and
    formulas; opcheck above checks the fakes' strides that Inductor asserts."""
    torch.manual_seed(0)
    factory, make = MODELS[name]
    m, x = factory().eval(), make()
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    with torch.no_grad():
        assert relative_error(y, m(x)) <= 1e-5


def compile_recording(compiled):
    """torch.compile(compiled, fullgraph=True, dynamic=True) through AOT autograd: (the compiled callable, the
    forward graphs handed to the compiler)."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    graphs = []
    torch._dynamo.reset()
    opt = torch.compile(compiled, fullgraph=True, dynamic=True, backend=aot_autograd(
        fw_compiler=lambda gm, _: graphs.append(gm) or make_boxed_func(gm.forward)))
    return opt, graphs


def check_outputs_and_gradients(opt, graphs, m, x, ops: set):
    """The recorded graph holds exactly ``ops`` of the sessa ops and no triangular solve; outputs and the
    parameters' gradients equal the module's."""
    y = opt(x)
    assert sessa_ops(graphs[0]) == ops
    assert not any("solve_triangular" in str(n.target) for n in graphs[0].graph.nodes)
    assert relative_error(y, m(x)) <= 1e-5
    y.square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        assert relative_error(got[n], p.grad) <= 1e-5, n


def sessa_ops(gm) -> set:
    return {n.target.name().split("::")[1] for n in gm.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "sessa_compiler"}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_torch_compile_of_a_compiled_module_calls_the_sessa_ops(name, mode):
    """torch.compile(compiled, fullgraph=True) after the first call: the graph AOT autograd hands the compiler
    holds the recognised core ops as torch.ops.sessa_compiler.* (not the model's spelling: no triangular solve),
    gradients equal the module's, and with dynamic=True another batch and length run on the same trace."""
    torch.manual_seed(0)
    factory, make = MODELS[name]
    m, x = factory(), make()
    getattr(m, mode)()
    c = sc.compile(m, backend="eager")
    c(x)
    opt, graphs = compile_recording(c)
    check_outputs_and_gradients(opt, graphs, m, x, EXPORT_OPS[name])
    x2 = torch.randint(0, 40, (3, 20)) if name == "decoder" else torch.randn(3, 20, x.shape[-1])
    with torch.no_grad():
        assert relative_error(opt(x2), m(x2)) <= 1e-5
    assert not c.retraces and len(c._variants) == 1   # the compiled module's one trace serves every size


def test_torch_compile_of_the_compiled_public_reference_layer_calls_the_sessa_ops():
    """The public reference layer (written by other hands: solve_triangular on a materialised T x T matrix)
    under torch.compile of its compiled module: attention and feedback as the sessa ops, same outputs and
    gradients, another batch and length on the same trace."""
    import os
    import sys

    if not os.environ.get("SESSA_REFERENCE_DIR"):
        pytest.skip("the public reference implementation is not shipped here: "
                    "git clone https://github.com/LibratioAI/sessa and set SESSA_REFERENCE_DIR to the clone (docs/testing.md)")
    sys.path.insert(0, os.environ["SESSA_REFERENCE_DIR"])
    from sessa import SessaLayer as RefLayer

    torch.manual_seed(0)
    m = RefLayer(32, n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 9, 32)
    c = sc.compile(m, backend="eager")
    c(x)
    opt, graphs = compile_recording(c)
    check_outputs_and_gradients(opt, graphs, m, x, {"attention", "feedback"})
    x2 = torch.randn(3, 17, 32)
    with torch.no_grad():
        assert relative_error(opt(x2), m(x2)) <= 1e-5


def test_torch_compile_of_a_compiled_module_with_the_eager_backend_runs_the_compiled_module():
    """backend="eager" runs the captured Python as it is: the compiled module's own call, not a retrace."""
    torch.manual_seed(0)
    m = SessaLayer(16, n_heads=2).eval()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 9, 16)
    c(x)
    calls = []
    real = type(c)._call
    torch._dynamo.reset()
    opt = torch.compile(c, fullgraph=True, backend="eager")
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(c), "_call", lambda self, *a: calls.append(1) or real(self, *a))
        assert relative_error(opt(x), m(x)) <= 1e-5
    assert calls == [1]


def test_torch_compile_and_export_of_a_compiled_module():
    torch.manual_seed(0)
    m = MambaLayer(16).eval()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 9, 16)
    y = torch.compile(c, fullgraph=True, backend="aot_eager")(x)
    with torch.no_grad():
        assert relative_error(y, m(x)) <= 1e-5
    ep = torch.export.export(c, (x,), dynamic_shapes={"args": ({0: Dim.AUTO, 1: Dim.AUTO},)})
    assert any(n.target is OPS.selective_scan.default for n in ep.graph.nodes)
    x2 = torch.randn(3, 20, 16)  # another batch and length
    with torch.no_grad():
        assert relative_error(ep.module()(x2), m(x2)) <= 1e-5


EXPORT_OPS = {"sessa": {"attention", "feedback"}, "mamba": {"selective_scan"}, "transformer": {"attention"},
              "decoder": {"attention", "feedback", "selective_scan"}}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_of_a_compiled_module_holds_the_sessa_ops_and_runs_at_other_sizes(name):
    """torch.export of a compiled module (after its first call) records its traced graph: the recognised core ops
    are torch.ops.sessa_compiler.* even where the model writes them as a triangular solve or a softmax, and the
    program runs at another batch and length."""
    torch.manual_seed(0)
    factory, make = MODELS[name]
    m, x = factory().eval(), make()
    c = sc.compile(m, backend="eager")
    c(x)
    ep = torch.export.export(c, (x,), dynamic_shapes={"args": ({0: Dim.AUTO, 1: Dim.AUTO},)})
    found = {n.target.name().split("::")[1] for n in ep.graph.nodes
             if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "sessa_compiler"}
    assert found == EXPORT_OPS[name]
    assert not any("solve_triangular" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randint(0, 40, (3, 20)) if name == "decoder" else torch.randn(3, 20, x.shape[-1])
    with torch.no_grad():
        assert relative_error(ep.module()(x2), m(x2)) <= 1e-5


def test_export_before_the_first_call_records_the_original():
    """Nothing traced yet (and torch.export cannot run our trace inside its own): the original's code."""
    m = SessaLayer(16, n_heads=2).eval()
    c = sc.compile(m, backend="eager")
    x = torch.randn(2, 9, 16)
    ep = torch.export.export(c, (x,), dynamic_shapes={"args": ({0: Dim.AUTO, 1: Dim.AUTO},)})
    assert any("solve_triangular" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        assert relative_error(ep.module()(x), m(x)) <= 1e-5
