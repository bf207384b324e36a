"""Exporters: ONNX (onnx_export.py) and TVM (tvm_*.py). Imported lazily so that onnx stays optional."""


def export_onnx(module, example_inputs, path, *, opset=None, dynamic=True, validate=True):
    """See sessa_compiler.export.onnx_export.export_onnx (needs the onnx and onnxruntime packages)."""
    from .onnx_export import export_onnx as _export_onnx

    return _export_onnx(module, example_inputs, path, opset=opset, dynamic=dynamic, validate=validate)
