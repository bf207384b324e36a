"""The sink-casts pass (Triton pipeline): feedback's q_b/k_b read the 16-bit values their fp32 casts came
from, through the same split, and the graph computes the same function."""
import torch

from sessa_compiler.backends.eager import run_graph
from sessa_compiler.ir import parse, verify_graph
from sessa_compiler.passes.sink_casts import SinkCasts

GRAPH = """graph g(%f: f32[B, T, 16], %qk: {dt}[B, T, 32], %g: f32[B, T]) {{
  %up: f32[B, T, 32] = cast(%qk) {{dtype=dtype.f32}}
  %q: f32[B, T, 16], %k: f32[B, T, 16] = split(%up) {{sizes=[16, 16], dim=-1}}
  %s: f32[B, T, 16] = feedback(%f, %q, %k, %g) {{scale=0.25}}
  %y: f32[B, T, 32] = mul(%up, 2.0)
  return %s, %y
}}"""


def _inputs(dt):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 21, 16, generator=gen), torch.randn(2, 21, 32, generator=gen).to(dt),
            0.999 * torch.tanh(3 * torch.randn(2, 21, generator=gen))]


def test_bf16_upcast_through_split_is_sunk_and_the_function_is_unchanged():
    g = parse(GRAPH.format(dt="bf16"))
    inputs = _inputs(torch.bfloat16)
    before = run_graph(g, inputs, g.params)
    result = SinkCasts().run(g)
    assert result.rewrites == 2 and len(result.decisions) == 2
    fb = next(n for n in g.nodes if n.op == "feedback")
    assert [v.type.dtype.name for v in fb.inputs[1:3]] == ["bf16", "bf16"]
    assert fb.inputs[1].producer is fb.inputs[2].producer and fb.inputs[1].producer.op == "split"   # one split
    assert any(n.op == "cast" for n in g.nodes)   # %y still reads the fp32 cast
    verify_graph(g)
    after = run_graph(g, inputs, g.params)
    for a, b in zip(before, after):
        assert torch.equal(a, b)   # the eager feedback upcasts 16-bit operands exactly as the cast did


def test_a_cast_that_is_not_an_exact_16bit_upcast_stays():
    g = parse(GRAPH.format(dt="f64"))   # f64 -> f32 rounds: not the same function without it
    assert SinkCasts().run(g).rewrites == 0
