"""The spec's tolerances and the error measure every comparison uses (validation, probes, tuning, exports)."""
from __future__ import annotations

import torch

# The spec's tolerances: max abs(out - ref) / max abs(ref), by dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def graph_tolerance(dtype: torch.dtype, graph=None) -> float:
    """The tolerance for an output of ``dtype`` computed by ``graph``: the spec's for that dtype, or the loosest
    of the graph's narrower float values (a float64 model whose norm computes in float32, as Hugging Face's
    LlamaRMSNorm does, carries float32 rounding into its float64 output)."""
    tol = TOLERANCE.get(dtype, 0.0)
    if graph is None or not tol:
        return tol
    for v in graph.values():   # (the IR's dtype names: this module sits below the IR)
        tol = max(tol, TOLERANCE.get(_FLOATS.get(getattr(v.type.dtype, "name", None)), 0.0))
    return tol


_FLOATS = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    if not ref.is_floating_point():
        return 0.0 if torch.equal(out, ref) else float("inf")
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    finite = torch.isfinite(ref64)
    if (torch.isfinite(out64) != finite).any():
        return float("inf")
    if not finite.any():
        return 0.0
    scale = ref64[finite].abs().max().item() or 1.0
    return (out64[finite] - ref64[finite]).abs().max().item() / scale
