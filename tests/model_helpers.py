"""Helpers shared by tests that compare whole compiled models with their modules."""
import torch


def randomize(m, gamma_bias=None, seed=0):
    """Fresh random weights of a size that exercises every op (matrices 0.3, vectors 0.5 std), with the
    Sessa gamma bias planted at `gamma_bias` when given; returns the module in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5))
            if name.endswith("gamma_bias") and gamma_bias is not None:
                p.fill_(gamma_bias)
    return m.eval()


def scan_inputs(B, T, d_inner, n, seed=0) -> list:
    """Selective-scan operands (u, delta, A, B, C, D) for the Triton kernel and op tests: delta in [0, 0.5),
    A negative."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, d_inner, generator=gen)
    dt = torch.rand(B, T, d_inner, generator=gen) * 0.5
    A = -torch.rand(d_inner, n, generator=gen) * 3
    Bm, Cm = torch.randn(B, T, n, generator=gen), torch.randn(B, T, n, generator=gen)
    D = torch.randn(d_inner, generator=gen)
    return [u, dt, A, Bm, Cm, D]


def op_counts(graph) -> dict:
    """How many nodes of each op a graph has."""
    out: dict = {}
    for n in graph.nodes:
        out[n.op] = out.get(n.op, 0) + 1
    return out


def assert_same(got, want, where):
    """An export's or backend's output equals the module's: same dtype and shape, floats within the spec's
    tolerance for their dtype (sessa_compiler.tolerance), integers and bools exactly."""
    from sessa_compiler.tolerance import TOLERANCE, relative_error

    got = torch.as_tensor(got)
    assert got.dtype == want.dtype and got.shape == want.shape, (where, got.dtype, want.dtype, got.shape, want.shape)
    if want.is_floating_point():
        assert relative_error(got, want) <= TOLERANCE[want.dtype], (where, relative_error(got, want))
    else:
        assert torch.equal(got, want), where


def trace_cached(module, example, kwargs=None):
    """trace_with_report through the compile cache, as compile() and the exports trace: in the suite, a module that
    several tests trace at the same shapes is traced once (tests/conftest.py shares one cache directory)."""
    from sessa_compiler.api import cached_trace

    return cached_trace(module, tuple(example), kwargs)[0]
