"""sessa_compiler: compile Sessa models (and Transformer / Mamba baselines) into fast, exportable kernels."""
from .errors import (ArtifactError, ConfigError, DataDependentBranch, InputError, IRError, ParseError,
                     SessaCompilerError, TraceError, UnsupportedError, ValidationError)
from ._version import __version__

import importlib as _importlib
import sys as _sys

# What needs torch loads on first use: ``import sessa_compiler`` in a program that has imported torch loads
# it at once (registering torch.ops.sessa_compiler.* and the "sessa" torch.compile backend, as before);
# without torch (the command line's --help and --version) nothing heavy is imported until a name is used.
_LAZY = {"CompiledModule": "api", "compile": "api", "tune": "api", "trace": "frontend", "parse": "ir"}
_loaded = False


def _load() -> None:
    """Register the custom ops and the torch.compile backend, and bind the lazy names. Called again while one of
    our modules is still being imported (a submodule looked up during that import), it binds what exists and
    finishes on a later call."""
    global _loaded
    if _loaded:
        return
    from . import library  # noqa: F401  (registers torch.ops.sessa_compiler.attention, .feedback, .selective_scan)
    from . import dynamo

    complete = True
    for name, module in _LAZY.items():
        mod = _importlib.import_module(f"{__name__}.{module}")
        if hasattr(mod, name):
            globals()[name] = getattr(mod, name)
        else:   # that module is partially initialised (we are inside its import): bind it on a later call
            complete = False
    dynamo.register()  # torch.compile(module, backend="sessa")
    _loaded = complete


def __getattr__(name):
    if name in _LAZY:
        _load()
        if name in globals():
            return globals()[name]
        return getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    try:  # a submodule not imported yet (sessa_compiler.models, ...)
        module = _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    _load()
    return module


if "torch" in _sys.modules:
    _load()


def export_onnx(module, example_inputs, path, *, opset=None, dynamic=True, validate=True, method="forward"):
    """Export a module to an ONNX file of standard ops (dynamic B and T), validated in onnxruntime.
    ``method="decode_step"`` exports the serving step (x_t and the cache in, y_t and the cache out),
    ``method="prefill"`` prefill(x, cache) -> (y, cache).

    Needs the optional packages onnx and onnxruntime; see sessa_compiler.export.onnx_export.export_onnx.
    """
    _load()
    from .export.onnx_export import export_onnx as _export_onnx
    from .progress import progress

    steps = "trace, lower, check" + (", validate in onnxruntime" if validate else "")
    with progress(f"sessa_compiler: exporting {type(module).__name__}.{method} to ONNX ({steps})"):
        return _export_onnx(module, example_inputs, path, opset=opset, dynamic=dynamic, validate=validate,
                            method=method)


def export_tvm(module, example_inputs, path, target=None, *, schedules=None, gpu_source=None, method="forward"):
    """Export a module to a directory with a TVM library (.so), weights (npz) and a manifest.

    The whole graph must lower to TVM (else UnsupportedError naming the ops); target None = this
    machine's CPU. gpu_source=["cuda", "opencl", "metal", "webgpu"] also writes thread-bound kernel
    source for those targets into path/gpu/. method="decode_step" exports the serving step instead
    (see export/tvm_serving.py). Needs apache-tvm; see sessa_compiler.export.tvm_export.
    """
    _load()
    from .export.tvm_export import export_tvm as _export_tvm
    from .progress import progress

    with progress(f"sessa_compiler: exporting {type(module).__name__}.{method} to a TVM library (trace, lower, build)"):
        return _export_tvm(module, example_inputs, path, target, schedules=schedules, gpu_source=gpu_source,
                           method=method)


def load_tvm(path):
    """Load a directory written by export_tvm: a callable on numpy arrays (its runtime needs no torch;
    in a torch-free process load `path/sessa_tvm_runtime.py` by file path instead of this package)."""
    from .export.tvm_runtime import export_dir_problem, load_tvm as _load_tvm

    problem = export_dir_problem(path)
    if problem is not None:
        raise ArtifactError(f"load_tvm: {problem}")
    return _load_tvm(path)


__all__ = ["compile", "CompiledModule", "trace", "parse", "SessaCompilerError", "IRError", "ParseError", "TraceError", "DataDependentBranch",
           "UnsupportedError",
           "ConfigError", "ArtifactError", "InputError", "ValidationError", "export_onnx", "export_tvm", "load_tvm", "tune", "__version__"]
