"""A complex buffer of the user's module (a RoPE table ``freqs_cis``) is the graph parameter
``freqs_cis.as_real``: real pairs derived from the module's live tensor at every call, as real parameters and
buffers are read live. After the module's buffer is edited in place, reassigned, loaded by load_state_dict or the
module moved with .double()/.to(complex128), the compiled module computes what the module computes, never with
the table it was traced with; the compile cache stores no copy of it; a complex Parameter gets its gradient."""
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import sessa_compiler as sc
from sessa_compiler.api import relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


class ComplexTable(nn.Module):
    """x + rotation of lin(x)'s channel pairs by a complex table [max_len, width/2], sliced to T (random angles:
    no standard RoPE, nothing the recognisers fold away)."""

    def __init__(self, width=8, max_len=16):
        super().__init__()
        self.lin = nn.Linear(width, width)
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * torch.rand(width // 2)[None, :]
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(ang), ang))

    def forward(self, x):
        T = x.shape[1]
        z = torch.view_as_complex(self.lin(x).reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(z * self.freqs_cis[:T]).flatten(-2) + x


def module():
    torch.manual_seed(0)
    return ComplexTable().eval()


def changed_table(m) -> torch.Tensor:
    ang = torch.rand(m.freqs_cis.shape) * 6.0
    return torch.polar(torch.ones_like(ang), ang).to(m.freqs_cis.dtype)


def close(c, m, x, tol=1e-5) -> bool:
    with torch.no_grad():
        got, want = c(x), m(x.to(m.lin.weight.dtype))
    return got.dtype == want.dtype and relative_error(got, want) <= tol


def edit_in_place(c, m):
    with torch.no_grad():
        m.freqs_cis.mul_(torch.polar(torch.ones(()), torch.tensor(0.7)))


def reassign(c, m):
    m.freqs_cis = changed_table(m)


def load_state(c, m):
    sd = c.state_dict()
    sd["freqs_cis"] = changed_table(m)
    c.load_state_dict(sd)


def load_state_assign(c, m):
    sd = {k: v.clone() for k, v in c.state_dict().items()}
    sd["freqs_cis"] = changed_table(m)
    c.load_state_dict(sd, assign=True)


def to_double(c, m):
    c.double()   # complex buffers stay complex64 (nn.Module.double converts floating point tensors only)
    assert close(c, m, torch.randn(2, 5, 8, dtype=torch.float64), 1e-10)   # traced again, in float64
    reassign(c, m)


def double_and_back(c, m):
    c.double()
    assert close(c, m, torch.randn(2, 5, 8, dtype=torch.float64), 1e-10)
    reassign(c, m)
    c.float()    # the first traced graph fits again


def to_complex128(c, m):
    m.freqs_cis = changed_table(m).to(torch.complex128)   # its pairs are now float64: traced again


CHANGES = {"in_place": edit_in_place, "reassign": reassign, "load_state_dict": load_state,
           "load_state_dict_assign": load_state_assign, "double": to_double, "double_and_back": double_and_back,
           "complex128_table": to_complex128}


@pytest.mark.parametrize("backend", ["eager", "tvm", "triton"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_the_compiled_module_reads_the_live_complex_buffer(backend, change):
    if backend == "triton":
        import triton_env

        triton_env.require_interpreter()
    m = module()
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    assert close(c, m, x)
    assert "freqs_cis.as_real" in c.graph.param_values   # the table is still a parameter of the graph
    CHANGES[change](c, m)
    xd = x.to(m.lin.weight.dtype)
    assert close(c, m, xd, 1e-5 if xd.dtype == torch.float32 else 1e-10), change
    assert close(c, m, torch.randn(1, 9, 8, dtype=xd.dtype), 1e-5 if xd.dtype == torch.float32 else 1e-10), change


def test_the_graph_binds_a_view_of_the_buffer_not_a_copy():
    m = module()
    c = sc.compile(m, backend="eager")
    c(torch.randn(1, 3, 8))
    bound = c.graph.params["freqs_cis.as_real"]
    assert bound.untyped_storage().data_ptr() == m.freqs_cis.untyped_storage().data_ptr()


def test_the_compile_cache_stores_no_copy_of_a_complex_buffer(cache_dir, monkeypatch):
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "1")
    x = torch.randn(2, 5, 8)
    first = sc.compile(module(), backend="eager")
    first(x)
    assert first.trace_cache == "miss"
    (entry,) = (cache_dir / "traced").glob("*.pkl")
    with open(entry, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch's pytree LeafSpec deprecation
        constants = pickle.load(f)["constants"]
    assert not [n for n in constants if n.endswith(".as_real")], constants
    m = module()   # the same code and table in another module: the entry, bound to this module's own tensor
    again = sc.compile(m, backend="eager")
    assert close(again, m, x)
    assert again.trace_cache == "hit"
    edit_in_place(again, m)
    assert close(again, m, x)
    other = module()
    reassign(None, other)   # another table in the same shape and dtype: what the recognisers saw differs
    third = sc.compile(other, backend="eager")
    assert close(third, other, x)
    assert third.trace_cache == "miss" and "buffer 'freqs_cis' differs" in third.trace_cache_why


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_a_complex_parameter_gets_its_gradient(backend):
    # the pairs are a view of the live parameter: backward reaches it (a traced copy would leave .grad None)
    m = module().train()
    m.freqs_cis = nn.Parameter(m.freqs_cis.clone())
    c = sc.compile(m, backend=backend)
    x = torch.randn(2, 5, 8)
    c(x).square().sum().backward()
    got = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None for g in got.values()), [n for n, g in got.items() if g is None]
    m.zero_grad(set_to_none=True)
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        assert relative_error(torch.view_as_real(got[n]) if got[n].is_complex() else got[n],
                              torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad) <= 1e-5, n


def test_a_complex128_table_times_complex64_builds_whole_in_tvm():
    # c128 * c64 is a float64 pair times a float32 pair in the IR: the TVM lowering promotes (as torch does)
    # instead of failing the whole-graph build into hybrid mode
    # lin(x) is exact in float32 (quarter-integer weights and inputs, short sums), so the only rounding left is
    # the product's: float64 pairs give ~1e-16, the table cast down to complex64 ~1e-8 (the check tells them apart
    # on any CPU, whatever order its float32 matmul sums in)
    m = module()
    ang = torch.rand(m.freqs_cis.shape, dtype=torch.float64) * 6.0   # angles float32 cannot hold
    m.freqs_cis = torch.polar(torch.ones_like(ang), ang)
    with torch.no_grad():
        m.lin.weight.copy_(torch.randint(-4, 5, m.lin.weight.shape) / 4.0)
        m.lin.bias.copy_(torch.randint(-4, 5, m.lin.bias.shape) / 4.0)
    x = torch.randint(-8, 9, (2, 5, 8)) / 4.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = sc.compile(m, backend="tvm")
        assert close(c, m, x, 1e-10)
    assert not [w for w in caught if "hybrid" in str(w.message)], [str(w.message)[:300] for w in caught]
