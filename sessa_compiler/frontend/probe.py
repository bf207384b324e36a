"""Numerical probing: check that a candidate rewrite computes what the region it replaces computes.

A recogniser proposes "these values are the region's inputs, this value is its output, and this
chain of canonical ops computes it". The proposal is accepted only when the original subgraph and
the canonical ops agree on fresh random inputs at several sequence lengths (float64, so that a
wrong structure shows as an O(1) error, not a rounding difference). Recognisers can therefore be
loose about coding style while never producing a silent wrong answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..semantics import SEMANTICS, resolve, run_graph
from ..ir.graph import Graph, Value

PROBE_LENGTHS = (1, 2, 5, 12)
PROBE_BATCH = 2
OTHER_DIM = 3


@dataclass
class Step:
    """One canonical op applied to the running value: ``op(x, *extra) {attrs}``."""

    op: str
    attrs: dict = field(default_factory=dict)


def apply_steps(x, steps, binding):
    for s in steps:
        x = SEMANTICS[s.op](x, **resolve(s.attrs, binding))
    return x


def _binding(graph: Graph, T: int, batch: int = PROBE_BATCH) -> dict:
    names = set()
    for v in graph.values():
        names |= v.type.symbols()
    return {n: (T if n == "T" else batch if n == "B" else OTHER_DIM) for n in names}


def _params64(graph: Graph) -> dict:
    out = {}
    for name, v in graph.param_values.items():
        p = graph.params[name]
        out[v] = p.detach().to(torch.float64) if p.is_floating_point() else p
    return out


def probe(graph: Graph, sources: dict, output: Value, canonical, tol: float = 1e-6, lengths=PROBE_LENGTHS,
          batch: int = PROBE_BATCH):
    """Compare the region (sources -> output) with ``canonical(inputs: dict, binding) -> tensor``.

    ``sources`` maps each source Value to a sampler name: "normal" or "gain" (values in (-0.95, 0.95)).
    Returns the worst relative error, or None when the region cannot be evaluated on its own
    (it reads data that is not among the sources) or the shapes do not match.
    """
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    params = _params64(graph)
    for T in lengths:
        binding = _binding(graph, T, batch)
        inputs = {}
        for v, kind in sources.items():
            shape = v.type.concrete_shape(binding)
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            if kind == "gain":
                x = torch.tanh(x) * 0.95
            inputs[v] = x
        try:
            (ref,) = run_graph(graph, [], overrides={**params, **inputs}, targets=[output],
                               binding=binding, check_inputs=False)
            got = canonical(inputs, binding)
        except Exception:  # noqa: BLE001 - a region that cannot run on its own is simply not a match
            return None
        if got.shape != ref.shape:
            return None
        ref, got = ref.to(torch.float64), got.to(torch.float64)
        if not torch.isfinite(got).all() or (torch.isfinite(ref) != torch.isfinite(got)).any():
            return None
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (got - ref).abs().max().item() / scale)
    return worst
