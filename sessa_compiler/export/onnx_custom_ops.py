"""The feedback solve as a torch.library custom op with an ONNX translation for torch's own exporter.

Neither torch exporter can export ``torch.linalg.solve_triangular``. A model that calls
``torch.ops.sessa_compiler.feedback`` instead (or ``sessa_compiler.export.onnx_custom_ops.feedback``)
exports with

    torch.onnx.export(model, args, dynamo=True, dynamic_shapes=...,
                      custom_translation_table=sessa_compiler.export.onnx_custom_ops.translation_table())

to standard ONNX: the translation is the same chunked solve as export_onnx's (an ONNX Loop over 32-row
chunks with batched nilpotent-product inverses of the diagonal blocks, first chunk peeled), written in
onnxscript. It computes in float32 for every input dtype (float64 inputs lose precision on this route;
``sessa_compiler.export_onnx`` keeps float64). ``export_onnx`` also accepts models that call the op.
"""
from __future__ import annotations

import torch

from ..semantics.core import feedback_ref


@torch.library.custom_op("sessa_compiler::feedback", mutates_args=())
def feedback(f: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """s[t] = f[t] + gamma[t] * softmax_{j<t}(q_b[t].k_b[j]*scale) @ s[:t]; s[0] = f[0] (the IR's feedback)."""
    return feedback_ref(f, q_b, k_b, gamma, scale).contiguous()


@feedback.register_fake
def _feedback_fake(f, q_b, k_b, gamma, scale):
    return f.new_empty(f.shape)  # contiguous, as the real op returns (empty_like would copy f's strides)


def translation_table() -> dict:
    """``custom_translation_table`` for torch.onnx.export(dynamo=True): the Sessa ops -> onnxscript."""
    from .onnx_custom_ops_script import sessa_feedback

    return {torch.ops.sessa_compiler.feedback.default: sessa_feedback}
