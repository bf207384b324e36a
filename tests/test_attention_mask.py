"""Attention with a key-padding mask: the attention op's optional mask operand [B, T] (nonzero = keep).

- the meaning (semantics.core.attention_ref) against masked softmax written out, both meanings of a row with no
  visible key (the mean of v over all keys: finite fills; NaN: -inf fills), and the blocked backward of
  semantics/backward.py against autograd through it;
- the Triton kernel (interpreter) against the meaning at T=1, odd T, H=1, GQA, RoPE on/off, outputs poisoned
  with NaN, left- and right-padded rows, a fully padded row;
- recognition: the spellings of model code (masked_fill with a bool mask, finite or -inf; an additive
  (1 - mask) * finfo.min or -1e9 mask; torch.where) become attention with the mask operand on eager, and runs
  equal the module; near misses (a mask over queries, a mask whose values are added to the scores) stay ordinary
  ops;
- the ONNX export of a masked attention runs with the mask as a graph input.
"""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import math
import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.ir import parse
from sessa_compiler.semantics import attention_ref
from sessa_compiler.semantics.backward import attention_backward, attention_lse
from sessa_compiler.tolerance import TOLERANCE, relative_error
from tests.model_helpers import op_counts

TOL = TOLERANCE[torch.float32]


def masks(B, T, gen):
    """Rows: left padding (some queries see no unpadded key), right padding, random holes, fully padded."""
    m = torch.ones(B, T, dtype=torch.long)
    m[0, :max(1, T // 2)] = 0
    if B > 1:
        m[1, T - T // 3:] = 0
    if B > 2:
        m[2] = (torch.rand(T, generator=gen) < 0.6).long()
    if B > 3:
        m[3] = 0
    return m


def written_out(q, k, v, scale, mask, fill):
    """softmax(masked_fill(~(causal & keep), fill)) @ v, GQA by repeat: what model code computes."""
    H, Hkv = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    T = q.shape[1]
    keep = torch.ones(T, T, dtype=torch.bool).tril() & mask[:, None, None, :].bool()
    return torch.einsum("bhts,bshd->bthd", s.masked_fill(~keep, fill).softmax(-1), v)


@pytest.mark.parametrize("T", [1, 6])
def test_meaning_and_blocked_backward(T):
    gen = torch.Generator().manual_seed(T)
    B, H, Hkv, d = 4, 2, 1, 4
    q, k, v = (torch.randn(B, T, h, d, generator=gen, dtype=torch.float64) for h in (H, Hkv, Hkv))
    m = masks(B, T, gen)
    got = attention_ref(q, k, v, 0.5, True, None, m)
    assert torch.equal(got.isnan(), torch.zeros_like(got, dtype=torch.bool))
    assert (got - written_out(q, k, v, 0.5, m, torch.finfo(torch.float32).min)).abs().max() < 1e-12
    nan = attention_ref(q, k, v, 0.5, True, None, m.bool(), "nan")
    want = written_out(q, k, v, 0.5, m, -math.inf)
    assert torch.equal(nan.isnan(), want.isnan()) and nan.isnan().any()
    assert (nan - want).nan_to_num().abs().max() < 1e-12
    # the blocked forward and backward (query blocks of 3 rows) against autograd through the meaning
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_ref(*leaves, 0.5, True, None, m)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ref = torch.autograd.grad(out, leaves, g)
    o2, lse = attention_lse(q, k, v, 0.5, True, None, block=3, mask=m)
    assert (o2 - out).abs().max() < 1e-12
    for a, b in zip(attention_backward(g, q, k, v, None, o2, lse, 0.5, True, block=3, mask=m), ref):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")   # the NaN rows: 0 / 0
@pytest.mark.parametrize("T, H, Hkv, d, rope, empty", [(1, 1, 1, 16, False, "mean"), (17, 1, 1, 16, True, "mean"),
                                                         (17, 4, 2, 24, False, "nan"), (70, 3, 1, 20, True, "mean")])
def test_triton_kernel_matches_the_meaning(T, H, Hkv, d, rope, empty):
    triton_env.require_interpreter()
    from sessa_compiler.backends.triton.attention import generate_attention, launch_attention
    from sessa_compiler.backends.triton.codegen import KERNEL_CACHE

    inv_arg = ", %inv" if rope else ", None"
    g = parse(f"""graph a(%q: f32[B, T, {H}, {d}], %k: f32[B, T, {Hkv}, {d}], %v: f32[B, T, {Hkv}, {d}], %m: i64[B, T]) {{
  param %inv: f32[{d // 2}]
  %o: f32[B, T, {H}, {d}] = attention(%q, %k, %v{inv_arg}, %m) {{scale={d ** -0.5}, causal=True, rope={rope}, key_padding=True, empty_rows="{empty}"}}
  return %o
}}""")
    node = g.nodes[0]
    kernel = KERNEL_CACHE.load(generate_attention(node, {"q": "f32", "k": "f32", "v": "f32", "inv_freq": "f32"}, True,
                                                  *((16, 16) if T > 20 else (None, None))), True)
    gen = torch.Generator().manual_seed(T + d)
    B = 4
    q, k, v = (torch.randn(B, T, h, d, generator=gen) for h in (H, Hkv, Hkv))
    m = masks(B, T, gen)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.full((B, T, H, d), float("nan"))
    lse = torch.full((B, H, T), float("nan"))
    launch_attention(kernel, q, k, v, inv if rope else None, out=out, lse=lse, mask=m)
    ref = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, True, inv.double() if rope else None, m, empty)
    assert torch.equal(out.isnan(), ref.isnan())
    assert relative_error(out.nan_to_num(), ref.nan_to_num()) < 1e-4
    assert not lse.isnan().any()
    with pytest.raises(sc.SessaCompilerError, match="key-padding mask"):
        launch_attention(kernel, q, k, v, inv if rope else None)


@pytest.mark.parametrize("H, Hkv, d, rope", [(1, 1, 8, True), (4, 2, 8, False), (3, 1, 12, True)],
                         ids=["one_head_rope", "gqa", "mqa_rope"])
def test_tvm_kernel_matches_the_meaning(H, Hkv, d, rope, monkeypatch):
    """The generated TVM kernel with the mask, outputs poisoned with NaN (every output buffer the call allocates
    starts as NaN), at T=1 and an odd T over several query blocks."""
    import collections

    from sessa_compiler.backends.tvm import backend as tvm_backend   # tvm is pinned: never skipped
    from sessa_compiler.backends.tvm.build import attention_spec, build

    def poisoned(shape, dtype):
        t = real(shape, dtype)
        t.fill_(float("nan"))
        return t

    real = tvm_backend.aligned_empty
    monkeypatch.setattr(tvm_backend, "aligned_empty", poisoned)
    kern = tvm_backend.KernelCall(build(attention_spec(H, Hkv, d, d ** -0.5, rope, "float32", key_padding=True)),
                                  collections.Counter())
    gen = torch.Generator().manual_seed(d)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    for T in (1, 37):
        q, k, v = (torch.randn(4, T, h, d, generator=gen) for h in (H, Hkv, Hkv))
        m = masks(4, T, gen)
        out = kern(q, k, v, *([inv] if rope else []), m)
        ref = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, True, inv.double() if rope else None, m)
        assert relative_error(out, ref) < 1e-4, T


class Masked(torch.nn.Module):
    """One attention layer written out with a key-padding mask in one of the spellings of model code."""

    def __init__(self, style, D=16, H=2):
        super().__init__()
        torch.manual_seed(1)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.style, self.H = style, H

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // self.H)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        minv = torch.finfo(s.dtype).min
        if self.style == "masked_fill_min":
            s = s.masked_fill(~(causal & mask[:, None, None, :].bool()), minv)
        elif self.style == "masked_fill_inf":
            s = s.masked_fill(~(causal & mask[:, None, None, :].bool()), float("-inf"))
        elif self.style == "additive_min":   # the Hugging Face idiom: causal and padding both finfo.min, clamped
            add = torch.full((T, T), minv, device=x.device).triu(1) + (1.0 - mask[:, None, None, :].to(s.dtype)) * minv
            s = s + add.clamp(min=minv)
        elif self.style == "where_1e9":
            s = torch.where(causal & (mask[:, None, None, :] == 1), s, torch.full_like(s, -1e9))
        elif self.style == "inf_causal_plus_min":   # near miss: empty rows average the keys j <= t only
            s = s.masked_fill(~causal, float("-inf")) + (1.0 - mask[:, None, None, :].to(s.dtype)) * minv
        elif self.style == "query_mask":      # near miss: the mask over queries, not keys
            s = s.masked_fill(~(causal & mask[:, None, :, None].bool()), minv)
        elif self.style == "additive_values":  # near miss: the mask's values added to the scores
            s = s.masked_fill(~causal, minv) + mask[:, None, None, :].to(s.dtype)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


@pytest.mark.parametrize("style, empty", [("masked_fill_min", "mean"), ("masked_fill_inf", "nan"),
                                          ("additive_min", "mean"), ("where_1e9", "mean")])
def test_spellings_are_recognised_with_the_mask_operand(style, empty):
    m = Masked(style)
    c = sc.compile(m, backend="eager")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 16, generator=gen)
    mask = masks(4, 7, gen)
    got = c(x, mask)
    want = m(x, mask)
    counts = op_counts(c.graph)
    assert counts.get("attention") == 1, c.explain()
    node = next(n for n in c.graph.nodes if n.op == "attention")
    assert node.attrs["key_padding"] and node.attrs["empty_rows"] == empty
    assert "key-padding mask %mask" in c.explain()
    assert torch.equal(got.isnan(), want.isnan())
    assert relative_error(got.nan_to_num(), want.nan_to_num()) <= TOL


@pytest.mark.parametrize("style", ["query_mask", "additive_values", "inf_causal_plus_min"])
def test_near_misses_stay_ordinary_ops(style):
    m = Masked(style)
    c = sc.compile(m, backend="eager")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 7, 16, generator=gen)
    mask = masks(4, 7, gen)
    assert relative_error(c(x, mask).nan_to_num(), m(x, mask).nan_to_num()) <= TOL
    assert "attention" not in op_counts(c.graph)
    assert "not as a key-padding mask the attention op takes" in c.explain()


def test_onnx_export_takes_the_mask_as_a_graph_input(tmp_path):
    from sessa_compiler.export.onnx_export import _session, run_onnxruntime

    m = Masked("masked_fill_min")
    gen = torch.Generator().manual_seed(5)
    x, mask = torch.randn(2, 7, 16, generator=gen), masks(2, 7, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = sc.export_onnx(m, (x, mask), tmp_path / "a.onnx", validate=False)
    assert "attention" in exp.traced.graph.ops()
    session = _session(exp.path)
    for T in (1, 12):
        y, mk = torch.randn(4, T, 16, generator=gen), masks(4, T, gen)
        got = run_onnxruntime(session, exp.traced.graph, (y, mk))[0]
        with torch.no_grad():
            assert relative_error(got, m(y, mk)) <= TOL, T


class Served(Masked):
    """The same layer with serving methods declared (the compiled module derives its own)."""

    def init_cache(self, *args, **kwargs):
        raise NotImplementedError

    def prefill(self, *args):
        raise NotImplementedError

    def decode_step(self, *args):
        raise NotImplementedError


def test_serving_takes_the_mask_as_a_positional_input_in_prefill_and_steps():
    """prefill(x, mask, cache) and decode_step(x_t, mask_t, cache) (a padded new position too) against the module
    on the whole sequence, at every row with a visible key (tests/test_serving_mask.py has the rest)."""
    m = Served("masked_fill_min")
    c = sc.compile(m, backend="eager")
    gen = torch.Generator().manual_seed(6)
    x, mask = torch.randn(2, 5, 16, generator=gen), masks(2, 5, gen)   # row 1: positions 4.. padded
    c(x, mask)
    cache = c.init_cache(2)
    outs = [c.prefill(x[:, :3], mask[:, :3], cache)[0]]
    outs += [c.decode_step(x[:, t], mask[:, t], cache)[0][:, None] for t in (3, 4)]
    seen = mask.cumsum(1) > 0
    with torch.no_grad():
        assert relative_error(torch.cat(outs, 1)[seen], m(x, mask)[seen]) <= TOL


def test_torch_export_of_a_compiled_masked_module_runs_the_mask():
    """torch.export records a compiled module's core ops as the library's custom ops; no custom op takes a mask,
    so a masked attention is recorded as its meaning in plain torch ops."""
    m = Masked("masked_fill_min")
    c = sc.compile(m, backend="eager")
    gen = torch.Generator().manual_seed(7)
    x, mask = torch.randn(4, 7, 16, generator=gen), masks(4, 7, gen)
    c(x, mask)
    ep = torch.export.export(c, (x, mask))
    with torch.no_grad():
        assert relative_error(ep.module()(x, mask), m(x, mask)) <= TOL
