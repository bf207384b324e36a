"""Helpers shared by tests that compare whole compiled models with their modules."""
import torch


class NeoxRopeAttention(torch.nn.Module):
    """Causal attention with GPT-NeoX's rotary embedding (rotate_half) before SDPA. ``learned``: the inverse
    frequencies are an nn.Parameter (trained), else a buffer."""

    def __init__(self, d=32, heads=4, learned=False):
        super().__init__()
        self.heads, hd = heads, d // heads
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        if learned:
            self.inv_freq = torch.nn.Parameter(inv_freq)
        else:
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        fr = torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq)
        cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()

        def rot(t):
            a, b = t.chunk(2, -1)
            return t * cos + torch.cat([-b, a], -1) * sin
        y = torch.nn.functional.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


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
