"""A translation of the ``sessa_compiler::feedback`` custom op (library.py) for torch's own ONNX exporter.

Neither torch exporter can export ``torch.linalg.solve_triangular``. A model that calls
``torch.ops.sessa_compiler.feedback`` instead (or ``sessa_compiler.library.feedback``) exports with

    torch.onnx.export(model, args, dynamo=True, dynamic_shapes=...,
                      custom_translation_table=sessa_compiler.export.onnx_translation.translation_table())

to standard ONNX: the translation is the same chunked solve as export_onnx's (an ONNX Loop over 32-row
chunks with batched nilpotent-product inverses of the diagonal blocks, first chunk peeled), written in
onnxscript. It computes in float32 for every input dtype (float64 inputs lose precision on this route;
``sessa_compiler.export_onnx`` keeps float64). ``export_onnx`` also accepts models that call the op.
"""
from __future__ import annotations


def translation_table() -> dict:
    """``custom_translation_table`` for torch.onnx.export(dynamo=True): the Sessa ops -> onnxscript."""
    import torch

    from .. import library  # noqa: F401  (registers torch.ops.sessa_compiler.feedback)
    from .onnx_translation_script import sessa_feedback

    return {torch.ops.sessa_compiler.feedback.default: sessa_feedback}
