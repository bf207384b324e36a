"""Every generated Triton kernel under the interpreter against the references, at shapes that
straddle chunk and tile boundaries; outputs poisoned with NaN, canaries after every output."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import pytest
import torch

triton_env.require_interpreter()

from sessa_compiler.semantics import attention_ref, feedback_ref, scan_ref, tri_solve_ref
from sessa_compiler.semantics import chunked as blocked_ref
from sessa_compiler.backends.triton.attention import generate_attention, launch_attention
from sessa_compiler.backends.triton.codegen import KERNEL_CACHE
from sessa_compiler.backends.triton.feedback import (
    generate_diag_inverse,
    generate_lse,
    generate_solve,
    launch_diag_inverse,
    launch_lse,
    launch_solve,
    update_splits,
)
from sessa_compiler.backends.triton.scan import generate_scan, launch_scan
from sessa_compiler.backends.triton.tri_solve import generate_tri_solve, launch_tri_solve
from sessa_compiler.errors import InputError, UnsupportedError
from sessa_compiler.ir import parse
from model_helpers import scan_inputs

CANARY = 1234.5
PAD = 64
DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def poisoned(shape, dtype):
    """A NaN-filled output view with a canary-filled tail after it in the same allocation."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + PAD,), float("nan"), dtype=dtype)
    buf[n:] = CANARY
    return buf, buf[:n].view(shape)


def canary_intact(buf, n):
    return bool((buf[n:] == CANARY).all())


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def feedback_graph(d_qk, d_v, C, dt="f32"):
    return parse(f"""graph fb(%f: {dt}[B, T, {d_v}], %q: {dt}[B, T, {d_qk}], %k: {dt}[B, T, {d_qk}], %g: {dt}[B, T]) {{
  %lse: f32[B, T] = feedback_lse(%q, %k) {{scale=0.3}}
  %dinv: f32[B, ceiling(T/{C}), {C}, {C}] = feedback_diag_inverse(%q, %k, %g, %lse) {{scale=0.3, chunk_size={C}}}
  %s: {dt}[B, T, {d_v}] = feedback_chunked(%f, %q, %k, %g, %lse, %dinv) {{scale=0.3, chunk_size={C}}}
  return %s
}}""")


def feedback_kernels(d_qk, d_v, C, dt="f32"):
    g = feedback_graph(d_qk, d_v, C, dt)
    dts = {"q_b": dt, "f": dt, "gamma": dt}
    gens = (generate_lse, generate_diag_inverse, generate_solve)
    return [KERNEL_CACHE.load(gen(node, dts, True), True) for gen, node in zip(gens, g.nodes)]


def feedback_inputs(B, T, d_qk, d_v, gamma_sign, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, T, d_v, generator=gen)
    q = torch.randn(B, T, d_qk, generator=gen) * 1.5
    k = torch.randn(B, T, d_qk, generator=gen) * 1.5
    gamma = 0.999 * torch.tanh(gamma_sign * 9.0 + 0.2 * torch.randn(B, T, generator=gen))
    return [t.to(dtype) for t in (f, q, k, gamma)]


# d_qk=24 / d_v=40: one masked tile (q hoisted); d_qk=80: a loop over width tiles with a masked tail
@pytest.mark.parametrize("T", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("d_qk, d_v, gamma_sign", [(24, 40, 1.0), (80, 16, -1.0)])
def test_feedback_kernels_match_references(T, d_qk, d_v, gamma_sign):
    C, B = 16, 2
    k_lse, k_dinv, k_solve = feedback_kernels(d_qk, d_v, C)
    f, q, k, gamma = feedback_inputs(B, T, d_qk, d_v, gamma_sign, torch.float32, seed=T)
    nC = -(-T // C)

    buf_l, lse = poisoned((B, T), torch.float32)
    launch_lse(k_lse, q, k, out=lse)
    assert canary_intact(buf_l, B * T)
    lse_ref = blocked_ref.feedback_lse(q.double(), k.double(), scale=0.3)
    assert (lse.double() - lse_ref).abs().max().item() < 1e-5

    buf_d, dinv = poisoned((B, nC, C, C), torch.float32)
    launch_diag_inverse(k_dinv, q, k, gamma, lse, C, out=dinv)
    assert canary_intact(buf_d, B * nC * C * C)
    dinv_ref = blocked_ref.feedback_diag_inverse(q.double(), k.double(), gamma.double(), lse_ref, scale=0.3, chunk_size=C)
    assert rel_err(dinv, dinv_ref) < 1e-5

    buf_s, s = poisoned((B, T, d_v), torch.float32)
    launch_solve(k_solve, f, q, k, gamma, lse, dinv, out=s)
    assert canary_intact(buf_s, B * T * d_v)
    s_ref = feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)
    assert rel_err(s, s_ref) < 1e-4


def test_feedback_kernels_bf16_inputs():
    """bf16 in and out (interpreter: loads converted to fp32, stores truncate); the solve stays fp32."""
    T, C, B, d = 37, 16, 2, 32
    k_lse, k_dinv, k_solve = feedback_kernels(d, d, C, "bf16")
    f, q, k, gamma = feedback_inputs(B, T, d, d, 1.0, torch.bfloat16, seed=7)
    lse = launch_lse(k_lse, q, k)
    dinv = launch_diag_inverse(k_dinv, q, k, gamma, lse, C)
    buf, s = poisoned((B, T, d), torch.bfloat16)
    launch_solve(k_solve, f, q, k, gamma, lse, dinv, out=s)
    assert canary_intact(buf, B * T * d)
    assert s.dtype == torch.bfloat16
    assert rel_err(s, feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)) < 3e-2


def test_feedback_lse_bf16_across_row_blocks_and_width_steps():
    """bf16 lse (128 x 128 tiles, heaviest row block first) at T=200: two row blocks, the second with a ragged
    diagonal tile; width 160 takes three K steps of 64 (the last masked)."""
    T, B, d = 200, 2, 160
    k_lse, _, _ = feedback_kernels(d, d, 16, "bf16")
    assert k_lse.source.tunables["BLOCK_N"] == 128 and not k_lse.source.tunables["q_hoisted"]
    _, q, k, _ = feedback_inputs(B, T, d, d, 1.0, torch.bfloat16, seed=11)
    buf, lse = poisoned((B, T), torch.float32)
    launch_lse(k_lse, q, k, out=lse)
    assert canary_intact(buf, B * T)
    ref = blocked_ref.feedback_lse(q.double(), k.double(), scale=0.3)
    assert (lse.double() - ref).abs().max().item() < 1e-4


def attention_node(H, Hkv, d, rope, dt="f32"):
    inv = ", %inv" if rope else ""
    g = parse(f"""graph a(%q: {dt}[B, T, {H}, {d}], %k: {dt}[B, T, {Hkv}, {d}], %v: {dt}[B, T, {Hkv}, {d}]) {{
  param %inv: f32[{d // 2}]
  %o: {dt}[B, T, {H}, {d}] = attention(%q, %k, %v{inv}) {{scale={d ** -0.5}, causal=True, rope={rope}}}
  return %o
}}""")
    return g.nodes[0]


def attention_lse_ref(q, k, scale, inv=None):
    """[B, H, T] log sum_{j<=t} exp(scale q_t . k_j), in float64 (RoPE applied first when inv is given)."""
    from sessa_compiler.semantics.core import _rotate

    if inv is not None:
        q, k = _rotate(q, inv), _rotate(k, inv)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
    T = q.shape[1]
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=-1)


@pytest.mark.parametrize("T", [1, 17, 70])
@pytest.mark.parametrize("H, Hkv, d, rope", [(1, 1, 16, True), (4, 2, 24, True), (3, 1, 20, False), (2, 2, 32, False)])
@pytest.mark.parametrize("blocks", [None, (32, 16), (16, 32)], ids=["default", "bm32-bn16", "bm16-bn32"])
def test_attention_kernel_matches_reference(T, H, Hkv, d, rope, blocks):
    """Small tiles give unmasked (below-diagonal) tiles, diagonal ones and a ragged last one; the row
    log-sum-exps are checked too ([B, H, T] float32)."""
    if blocks is not None and T == 1:
        pytest.skip("one row: the default tiles cover it")
    node = attention_node(H, Hkv, d, rope)
    kernel = KERNEL_CACHE.load(generate_attention(node, {"q": "f32", "k": "f32", "v": "f32", "inv_freq": "f32"}, True,
                                                  *(blocks or (None, None))), True)
    gen = torch.Generator().manual_seed(T + d)
    B = 2
    q = torch.randn(B, T, H, d, generator=gen)
    k = torch.randn(B, T, Hkv, d, generator=gen)
    v = torch.randn(B, T, Hkv, d, generator=gen)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    buf, out = poisoned((B, T, H, d), torch.float32)
    lse_buf, lse = poisoned((B, H, T), torch.float32)
    launch_attention(kernel, q, k, v, inv if rope else None, out=out, lse=lse)
    assert canary_intact(buf, B * T * H * d) and canary_intact(lse_buf, B * H * T)
    ref = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, True, inv.double() if rope else None)
    assert rel_err(out, ref) < 1e-4
    lse_ref = attention_lse_ref(q.double(), k.double(), d ** -0.5, inv.double() if rope else None)
    assert (lse.double() - lse_ref).abs().max() < 1e-4


def test_attention_kernel_bf16_with_strided_inputs():
    """q/k/v as views into one fused projection (row stride != width), as the traced graphs give them."""
    H, Hkv, d, T, B = 4, 2, 16, 33, 2
    node = attention_node(H, Hkv, d, True, "bf16")
    kernel = KERNEL_CACHE.load(generate_attention(node, {"q": "bf16", "k": "bf16", "v": "bf16", "inv_freq": "f32"}, True), True)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * d).to(torch.bfloat16)
    q = qkv[..., :H * d].view(B, T, H, d)
    k = qkv[..., H * d:(H + Hkv) * d].view(B, T, Hkv, d)
    v = qkv[..., (H + Hkv) * d:].view(B, T, Hkv, d)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    out, lse = launch_attention(kernel, q, k, v, inv, return_lse=True)
    ref = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, True, inv.double())
    assert rel_err(out, ref) < 3e-2
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    assert (lse.double() - attention_lse_ref(q.double(), k.double(), d ** -0.5, inv.double())).abs().max() < 5e-2
    with pytest.raises(UnsupportedError, match="lse must be a contiguous float32"):
        launch_attention(kernel, q, k, v, inv, lse=torch.empty(B, T, H))


def scan_node(d_inner, n):
    return parse(f"""graph s(%u: f32[B, T, {d_inner}], %dt: f32[B, T, {d_inner}], %Bm: f32[B, T, {n}], %Cm: f32[B, T, {n}]) {{
  param %A: f32[{d_inner}, {n}]
  param %D: f32[{d_inner}]
  %y: f32[B, T, {d_inner}] = scan_chunked(%u, %dt, %A, %Bm, %Cm, %D) {{chunk_size=16}}
  return %y
}}""").nodes[0]


SCAN_DT = dict.fromkeys(["u", "delta", "A", "B", "C", "D"], "f32")


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("d_inner, n", [(20, 5), (32, 16)])
def test_scan_kernel_sequential(T, d_inner, n):
    kernel = KERNEL_CACHE.load(generate_scan(scan_node(d_inner, n), SCAN_DT, True, "sequential"), True)
    args = scan_inputs(2, T, d_inner, n, seed=T)
    buf, out = poisoned((2, T, d_inner), torch.float32)
    launch_scan(kernel, *args, out=out)
    assert canary_intact(buf, 2 * T * d_inner)
    assert rel_err(out, scan_ref(*[a.double() for a in args])) < 1e-4


def test_scan_kernel_associative_tiny():
    """The chunked (associative_scan) strategy: the interpreter runs it element by element, so one tiny shape
    that still crosses a chunk boundary (T=18 > 16) and masks channels and states."""
    kernel = KERNEL_CACHE.load(generate_scan(scan_node(6, 3), SCAN_DT, True, "associative"), True)
    args = scan_inputs(1, 18, 6, 3, seed=1)
    buf, out = poisoned((1, 18, 6), torch.float32)
    launch_scan(kernel, *args, out=out)
    assert canary_intact(buf, 18 * 6)
    assert rel_err(out, scan_ref(*[a.double() for a in args])) < 1e-4


def test_new_sequence_length_reuses_the_kernel():
    k_lse, k_dinv, k_solve = feedback_kernels(24, 40, 16)
    before = KERNEL_CACHE.generated
    for T in (5, 29):
        f, q, k, gamma = feedback_inputs(1, T, 24, 40, 1.0, torch.float32, seed=T)
        again = feedback_kernels(24, 40, 16)
        assert [a is b for a, b in zip(again, (k_lse, k_dinv, k_solve))] == [True] * 3
        lse = launch_lse(again[0], q, k)
        launch_solve(again[2], f, q, k, gamma, lse, launch_diag_inverse(again[1], q, k, gamma, lse, 16))
    assert KERNEL_CACHE.generated == before


def test_generated_source_is_readable_and_follows_the_ir():
    src = generate_solve(feedback_graph(24, 40, 32).nodes[2], {"q_b": "f32", "f": "f32", "gamma": "f32"}, False)
    text = src.full_source
    assert text.startswith("# sessa_compiler generated Triton kernel `feedback_solve`\n# IR op: feedback_chunked\n")
    assert "# specialisation: D_qk=24, D_v=40, chunk_size=32" in text
    assert "# tunables: CO=256, BLOCK_DV=64" in text and "num_warps=4" in text
    assert "C = tl.constexpr(32)" in text and "@triton.jit(do_not_specialize=['T'" in text
    assert [p.name for p in src.parts] == ["feedback_probs", "feedback_update"]
    assert "def feedback_probs(" in text and "def feedback_update(" in text
    probs = src.parts[0].source
    assert "for k0 in range(0, D_QK, BLOCK_K)" in probs and "& ((k0 + kk)[None, :] < D_QK)" in probs  # 24 < 64
    with_rope = generate_attention(attention_node(4, 2, 16, True), {"q": "f32", "k": "f32", "v": "f32", "inv_freq": "f32"}, False)
    no_rope = generate_attention(attention_node(4, 2, 16, False), {"q": "f32", "k": "f32", "v": "f32"}, False)
    assert "GROUP = tl.constexpr(2)" in with_rope.source and [p.name for p in with_rope.parts] == ["rope_rotate"]
    assert "tl.cos" in with_rope.parts[0].source and "tl.cos" not in with_rope.source   # K rotated once, before
    assert not no_rope.parts and "INV_FREQ" not in no_rope.full_source
    for s in (src, *src.parts, with_rope, no_rope):
        assert "make_block_ptr" not in s.source
        assert s.source.count("tl.dot(") == s.source.count("input_precision=")


# The two-level solve: several outer chunks of 2 or 4 inner blocks, T not a multiple of either.
@pytest.mark.parametrize("T, outer", [(1, 32), (63, 32), (97, 64), (130, 32)])
@pytest.mark.parametrize("gamma_sign", [1.0, -1.0])
def test_two_level_feedback_solve_across_outer_chunks(T, outer, gamma_sign):
    C, B, d_qk, d_v = 16, 2, 24, 40
    g = feedback_graph(d_qk, d_v, C)
    dts = {"q_b": "f32", "f": "f32", "gamma": "f32"}
    k_lse, k_dinv = (KERNEL_CACHE.load(gen(node, dts, True), True) for gen, node in zip((generate_lse, generate_diag_inverse), g.nodes))
    k_solve = KERNEL_CACHE.load(generate_solve(g.nodes[2], dts, True, outer_chunk=outer), True)
    assert k_solve.source.tunables["CO"] == outer and set(k_solve.parts) == {"feedback_probs", "feedback_update"}
    f, q, k, gamma = feedback_inputs(B, T, d_qk, d_v, gamma_sign, torch.float32, seed=T + outer)
    assert gamma.abs().max() > 0.99
    lse = launch_lse(k_lse, q, k)
    dinv = launch_diag_inverse(k_dinv, q, k, gamma, lse, C)
    ref = feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)
    for target_programs in (264, 1):   # the update split over earlier rows (from r0 = 128 here), and not split
        buf, s = poisoned((B, T, d_v), torch.float32)
        launch_solve(k_solve, f, q, k, gamma, lse, dinv, out=s, target_programs=target_programs)
        assert canary_intact(buf, B * T * d_v)
        assert rel_err(s, ref) < 1e-4


def test_update_split_over_earlier_rows():
    assert update_splits(2, 128, 16, 264) == (2, 64)       # 4 K tiles per split at least
    assert update_splits(2, 4096, 32, 264) == (32, 128)
    assert update_splits(300, 4096, 32, 264) == (1, 4096)  # enough programs already
    assert update_splits(2, 0, 32, 264)[0] == 1


def test_tile_sizes_are_tunable():
    """Block sizes (attention tiles, the feedback's outer chunk) are in the GPU tuning space and reach the source."""
    from sessa_compiler.backends.triton.backend import TritonProgram
    from sessa_compiler.backends.triton.prepare import triton_space

    att = attention_node(4, 2, 32, False, "bf16")
    g = feedback_graph(24, 40, 16)
    gpu = torch.device("cuda")   # the space only looks at the device type
    att_space, fb_space = triton_space(att, gpu), triton_space(parse("""graph f(%f: f32[B, T, 8], %q: f32[B, T, 8], %k: f32[B, T, 8], %g: f32[B, T]) {
  %s: f32[B, T, 8] = feedback(%f, %q, %k, %g) {scale=0.3}
  return %s
}""").nodes[0], gpu)
    assert {(c["block_m"], c["block_n"]) for c in att_space} == {(128, 64), (128, 128), (64, 64), (64, 128)}
    assert {c["outer_chunk"] for c in fb_space} == {128, 256, 512}
    assert att_space[0] == {"num_warps": 8, "num_stages": 3, "block_m": 128, "block_n": 64}   # the generator's default first
    prog = TritonProgram(g, None, interpret=False)
    solve = g.nodes[2]
    prog.node_configs = {solve: {"outer_chunk": 128, "num_warps": 8}, att: {"block_m": 64, "block_n": 128}}
    src = prog.source_for(solve, {"q_b": "f32", "f": "f32", "gamma": "f32"}, False)
    assert src.tunables["CO"] == 128 and src.num_warps == 8 and "CO = tl.constexpr(128)" in src.source
    a = prog.source_for(att, {"q": "bf16", "k": "bf16", "v": "bf16"}, False)
    assert (a.tunables["BLOCK_M"], a.tunables["BLOCK_N"], a.num_warps) == (64, 128, 4)


# -- the general triangular solve (tri_solve) -------------------------------------------------------
def tri_solve_kernel(a_lead, b_lead, n, upper, unit, dt="f32", block=None):
    a_type = f"{dt}[{', '.join([*a_lead, 'T', 'T'])}]"
    b_type = f"{dt}[{', '.join([*b_lead, 'T', str(n)])}]"
    node = parse(f"""graph t(%A: {a_type}, %b: {b_type}) {{
  %x: {b_type} = tri_solve(%A, %b) {{upper={upper}, unitriangular={unit}}}
  return %x
}}""").nodes[0]
    src = generate_tri_solve(node, {"A": dt, "b": dt}, True, block=block)
    assert src.tunables["BM"] == (block or 16) and [p.name for p in src.parts] == ["tri_solve_diag_inverse"]
    return KERNEL_CACHE.load(src, True)


def tri_solve_inputs(a_shape, b_shape, upper, unit, dtype, seed):
    """A well-conditioned triangular A (diagonal of either sign, off-diagonal ~ 0.5/sqrt(T)) whose ignored
    triangle, and diagonal when unit, hold NaN: the kernels must never read them (LAPACK does not)."""
    gen = torch.Generator().manual_seed(seed)
    T = b_shape[-2]
    A = torch.randn(*a_shape, generator=gen) * (0.5 / T ** 0.5)
    diag = torch.sign(torch.randn(*a_shape[:-1], generator=gen)) * (1.0 + torch.rand(*a_shape[:-1], generator=gen))
    A = A + torch.diag_embed(diag)
    eye = torch.eye(T, dtype=torch.bool)
    ignored = torch.ones(T, T, dtype=torch.bool).tril(-1) if upper else torch.ones(T, T, dtype=torch.bool).triu(1)
    A = A.masked_fill(ignored | eye if unit else ignored, float("nan"))
    b = torch.randn(*b_shape, generator=gen)
    return A.to(dtype), b.to(dtype)


def check_tri_solve(kernel, A, b, upper, unit, tol):
    buf, out = poisoned(tuple(b.shape), b.dtype)
    launch_tri_solve(kernel, A, b, out=out)
    assert canary_intact(buf, b.numel())
    assert out.dtype == b.dtype
    err = rel_err(out, tri_solve_ref(A.double(), b.double(), upper, unit))
    assert err < tol, err


# T not a multiple of the 16-row blocks (T = 17: a one-row tail); N = 20: a masked column tile
@pytest.mark.parametrize("T", [1, 2, 17, 33, 70])
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("unit", [False, True], ids=["diag", "unit"])
def test_tri_solve_kernel_matches_reference(T, upper, unit):
    kernel = tri_solve_kernel(["B", "H"], ["B", "H"], 20, upper, unit)
    A, b = tri_solve_inputs((2, 2, T, T), (2, 2, T, 20), upper, unit, torch.float32, seed=T)
    check_tri_solve(kernel, A, b, upper, unit, 1e-4)


@pytest.mark.parametrize("T", [1, 2, 17, 33, 70])
@pytest.mark.parametrize("upper, unit", [(False, True), (True, False)], ids=["lower-unit", "upper-diag"])
def test_tri_solve_kernel_bf16(T, upper, unit):
    """bf16 weights and right-hand side, upcast in the kernel; the solve and x stay fp32 until the store."""
    kernel = tri_solve_kernel(["B"], ["B"], 24, upper, unit, dt="bf16")
    A, b = tri_solve_inputs((2, T, T), (2, T, 24), upper, unit, torch.bfloat16, seed=T + 1)
    check_tri_solve(kernel, A, b, upper, unit, 3e-2)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_tri_solve_kernel_fp16(upper):
    kernel = tri_solve_kernel(["B"], ["B"], 24, upper, False, dt="f16")
    A, b = tri_solve_inputs((2, 33, 33), (2, 33, 24), upper, False, torch.float16, seed=8)
    check_tri_solve(kernel, A, b, upper, False, 3e-3)


def _expanded_heads(T):   # [B, 2, T, T] as an expand of [B, 1, T, T]: stride 0 over the heads
    A, b = tri_solve_inputs((2, 1, T, T), (2, 2, T, 16), True, True, torch.float32, seed=3)
    return A.expand(2, 2, T, T), b


def _strided_b(T):        # b a transposed view (last stride 1, heads stride != T * N)
    A, _ = tri_solve_inputs((2, 3, T, T), (2, 3, T, 16), True, True, torch.float32, seed=4)
    return A, torch.randn(2, T, 3, 16).transpose(1, 2)


def _three_dims(T):       # A per (G, H) broadcast over B; b with G and H swapped in memory: three batch axes
    A, _ = tri_solve_inputs((2, 3, T, T), (2, 3, T, 16), True, True, torch.float32, seed=6)
    return A, torch.randn(2, 3, 2, T, 16).transpose(1, 2)


LAYOUTS = {  # name: (IR leading dims of A, of b, inputs at T)
    "B": (["B"], ["B"], lambda T: tri_solve_inputs((3, T, T), (3, T, 16), True, True, torch.float32, seed=1)),
    "A-rank-2": ([], ["B", "H"], lambda T: tri_solve_inputs((T, T), (2, 3, T, 16), True, True, torch.float32, seed=2)),
    "A-per-head": (["H"], ["B", "H"], lambda T: tri_solve_inputs((3, T, T), (2, 3, T, 16), True, True, torch.float32,
                                                                 seed=5)),
    "A-expanded": (["B", "H"], ["B", "H"], _expanded_heads),
    "b-strided": (["B", "H"], ["B", "H"], _strided_b),
    "three-dims": (["G", "H"], ["B", "G", "H"], _three_dims),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tri_solve_kernel_leading_dims(layout):
    """Broadcast weights (rank 2, per head), stride-0 and strided batch dims; upper unit systems at T = 33."""
    a_lead, b_lead, make = LAYOUTS[layout]
    A, b = make(33)
    check_tri_solve(tri_solve_kernel(a_lead, b_lead, 16, True, True), A, b, True, True, 1e-4)
    A_low, b_low = A.transpose(-1, -2), b   # the lower system of the transposed weights (a strided A)
    check_tri_solve(tri_solve_kernel(a_lead, b_lead, 16, False, True), A_low, b_low, False, True, 1e-4)


@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
def test_tri_solve_kernel_32_row_blocks(upper):
    kernel = tri_solve_kernel(["B"], ["B"], 40, upper, False, block=32)
    A, b = tri_solve_inputs((2, 70, 70), (2, 70, 40), upper, False, torch.float32, seed=9)
    check_tri_solve(kernel, A, b, upper, False, 1e-4)


def test_tri_solve_rejects_bad_inputs():
    kernel = tri_solve_kernel(["B"], ["B"], 8, False, False)
    b = torch.randn(2, 5, 8)
    with pytest.raises(InputError, match=r"op 'tri_solve': expected weights of shape \(2, 5, 5\).*got \(2, 5, 4\)"):
        launch_tri_solve(kernel, torch.randn(2, 5, 4), b)
    with pytest.raises(InputError, match=r"op 'tri_solve': expected weights in the right-hand side's dtype "
                                         r"torch.float32, got torch.bfloat16"):
        launch_tri_solve(kernel, torch.randn(2, 5, 5).to(torch.bfloat16), b)
    with pytest.raises(InputError, match=r"op 'tri_solve': expected a contiguous output \(2, 5, 8\)"):
        launch_tri_solve(kernel, torch.randn(2, 5, 5), b, out=torch.empty(2, 8, 5).transpose(1, 2))
    with pytest.raises(UnsupportedError, match="op 'tri_solve': the block must be a power of two >= 16, got 24"):
        tri_solve_kernel(["B"], ["B"], 8, False, False, block=24)


# -- the one-pass forward (feedback_online.py): lse and inverses made per outer chunk, no separate passes ----------
def online_kernel(d_qk, d_v, C, outer, dt="f32"):
    from sessa_compiler.backends.triton.feedback_online import generate_online

    g = feedback_graph(d_qk, d_v, C, dt)
    return KERNEL_CACHE.load(generate_online(g.nodes[2], {"q_b": dt, "f": dt, "gamma": dt}, True, outer_chunk=outer),
                             True)


# C=16: outer chunks of 32 (key tiles of 32) or 16 (key tiles of 16: 17 tiles at T=260, over one combine step of 16);
# T = 1, odd, one short of / on / one past inner blocks, outer chunks and key tiles
ONE_PASS_CASES = [(T, outer, *w) for T, outer in [(1, 32), (15, 32), (16, 32), (17, 32), (31, 32), (33, 32), (63, 32),
                                                  (65, 32), (97, 64)] for w in [(1.0, 24, 40), (-1.0, 80, 16)]]


@pytest.mark.parametrize("T, outer, gamma_sign, d_qk, d_v", ONE_PASS_CASES + [(260, 16, -1.0, 24, 40)])
def test_one_pass_feedback_matches_references(T, outer, gamma_sign, d_qk, d_v):
    from sessa_compiler.backends.triton.feedback_online import launch_online

    C, B = 16, 2
    kern = online_kernel(d_qk, d_v, C, outer)
    assert set(kern.parts) == {"feedback_probs_online", "feedback_update_online"}
    f, q, k, gamma = feedback_inputs(B, T, d_qk, d_v, gamma_sign, torch.float32, seed=T + outer)
    if T > 1:
        assert gamma.abs().max() > 0.99   # near +-gamma_max
    ref = feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)
    lse_ref = blocked_ref.feedback_lse(q.double(), k.double(), scale=0.3)
    for target_programs in ((264, 1) if 2 * outer < T < 200 else (264,)):   # the update split over earlier rows, not
        buf, s = poisoned((B, T, d_v), torch.float32)
        buf_l, lse = poisoned((B, T), torch.float32)
        out, lse_out = launch_online(kern, f, q, k, gamma, out=s, lse_out=lse, target_programs=target_programs)
        assert out is s and lse_out is lse
        assert canary_intact(buf, B * T * d_v) and canary_intact(buf_l, B * T)
        assert rel_err(s, ref) < 1e-4
        assert (lse.double() - lse_ref).abs().max().item() < 1e-5


def test_one_pass_feedback_bf16_and_source_shape():
    """bf16 in and out (interpreter: fp32 P); the GPU source stores P in bf16 and runs the update's products in
    bf16 on the bf16 output rows of s, and never computes a log-sum-exp pass of its own."""
    from sessa_compiler.backends.triton.feedback_online import generate_online, launch_online

    T, C, B, d = 37, 16, 2, 32
    kern = online_kernel(d, d, C, 32, "bf16")
    f, q, k, gamma = feedback_inputs(B, T, d, d, 1.0, torch.bfloat16, seed=7)
    buf, s = poisoned((B, T, d), torch.bfloat16)
    launch_online(kern, f, q, k, gamma, out=s)
    assert canary_intact(buf, B * T * d)
    assert rel_err(s, feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)) < 3e-2
    # the GPU's data path under the interpreter: P stored in bf16, the update reading the bf16 output rows of s
    # (its products fp32 here), T over three outer chunks
    low = KERNEL_CACHE.load(generate_online(feedback_graph(d, d, C, "bf16").nodes[2],
                                            {"q_b": "bf16", "f": "bf16", "gamma": "bf16"}, True, outer_chunk=32,
                                            low_storage=True), True)
    assert low.source.tunables["p_dtype"] == "bf16"
    buf, s_low = poisoned((B, T + 40, d), torch.bfloat16)
    f2, q2, k2, g2 = feedback_inputs(B, T + 40, d, d, -1.0, torch.bfloat16, seed=8)
    launch_online(low, f2, q2, k2, g2, out=s_low)
    assert canary_intact(buf, B * (T + 40) * d)
    assert rel_err(s_low, feedback_ref(f2.double(), q2.double(), k2.double(), g2.double(), 0.3)) < 3e-2
    gpu = generate_online(feedback_graph(128, 128, 64, "bf16").nodes[2], {"q_b": "bf16", "f": "bf16", "gamma": "bf16"},
                          False)
    assert gpu.tunables["CO"] == 256 and gpu.tunables["p_dtype"] == "bf16"
    upd = gpu.parts[1]
    assert upd.signature["P"] == "*bf16" and upd.signature["SPREV"] == "*bf16"
    assert "p.to(tl.bfloat16), sv.to(tl.bfloat16)" in upd.source
    f32 = generate_online(feedback_graph(128, 128, 64).nodes[2], {"q_b": "f32", "f": "f32", "gamma": "f32"}, False)
    assert f32.tunables["p_dtype"] == "fp32" and 'input_precision="tf32x3"' in f32.parts[1].source
    for src in gpu.all_kernels():
        assert src.source.count("tl.dot(") == src.source.count("input_precision=")
        assert "make_block_ptr" not in src.source
    with pytest.raises(UnsupportedError, match="feedback_chunked"):
        generate_online(feedback_graph(24, 40, 16).nodes[2], {"q_b": "f32", "f": "f32", "gamma": "f32"}, True,
                        outer_chunk=48)
