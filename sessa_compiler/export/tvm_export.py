"""export_tvm: a module -> a directory holding a compiled TVM library, its weights and a manifest.

    path/model.so              the whole graph (Relax VM executable + generated TIR kernels)
    path/weights.npz           parameters (numpy npz, no pickle), passed to the library at load time
    path/manifest.json         inputs (symbolic dims by name), outputs, parameter order, target, versions
    path/sessa_tvm_runtime.py  the torch-free loader (a copy of sessa_compiler/export/tvm_runtime.py)
    path/gpu/kernels.cu ...    with gpu_source=["cuda", "metal", "opencl", "webgpu"]: device source of the
                               thread-bound attention / feedback / scan / linear kernels (gpu_source.py)

Every IR op must have a TVM lowering (the library runs without torch); otherwise export fails with
an UnsupportedError naming the ops.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ..ir.dtypes import NUMPY_NAME as _NUMPY_DTYPE
from ..errors import UnsupportedError
from .tvm_runtime import FORMAT, MANIFEST, load_tvm  # noqa: F401  (re-exported)
from .tvm_runtime import manifest_dim as _dim



def export_tvm(module, example_inputs, path, target=None, *, schedules=None, gpu_source=None,
               method: str = "forward") -> str:
    """Export ``module`` as a TVM library (see _export_tvm), in eval mode (export/modes.py)."""
    from .modes import eval_mode_for_export

    with eval_mode_for_export(module, "export_tvm"):
        return _export_tvm(module, example_inputs, path, target, schedules=schedules, gpu_source=gpu_source,
                           method=method)


def _warn_empty_operands(graph, module) -> None:
    """Sizes at which an operand is empty while its op's output is not (a reduction over ``h[:, 1:]`` at T = 1):
    TVM's generated reductions return undefined values there (compile() runs such calls on the interpreter, the
    exported program cannot), so the export says where."""
    import warnings

    import sympy

    from ..backends.eager import empty_operand_sizes

    sizes = empty_operand_sizes(graph)
    if sizes:
        where = "at every size of this trace" if 0 in sizes else \
            "where " + " or ".join(f"{sympy.factor(n)} = 0" for n in sizes)
        warnings.warn(f"export_tvm: an operand of {type(module).__name__}'s graph is empty {where} while its op's "
                      "output is not (a reduction over h[:, 1:] at T = 1, a shifted loss): the exported program "
                      "returns undefined values at those sizes (compile() runs such calls on the interpreter); "
                      "call it only where they are not empty", stacklevel=3)


def _export_tvm(module, example_inputs, path, target=None, *, schedules=None, gpu_source=None,
                method: str = "forward") -> str:
    """Trace `module` on `example_inputs`, lower the whole graph to TVM, build for `target` (None: this
    machine's CPU; a dict or Target to cross-compile) and write the directory `path`. Returns path.
    gpu_source: target kinds ("cuda", "metal", "opencl", "webgpu") whose device source of the graph's
    thread-bound kernels is written to path/gpu/ (listed in the manifest as "gpu_sources").
    method="decode_step": the serving step instead; method="prefill": prefill(x, cache) -> (y, cache), the step
    run over x's positions by the loader (export/tvm_serving.py)."""
    if method != "forward":
        from .tvm_serving import export_tvm_step

        return export_tvm_step(module, example_inputs, path, target, method=method, schedules=schedules)
    import torch
    import tvm

    from ..backends.tvm.build import lanes_for
    from ..backends.tvm.relax_lower import graph_to_relax
    from ..backends.tvm.target import resolve_target
    from ..frontend.trace import warn_guards

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    from ..api import cached_trace   # through the compile cache, as compile() traces

    traced, _, _ = cached_trace(module, args)
    warn_guards(traced, "export_tvm", module)
    graph = traced.graph
    _warn_empty_operands(graph, module)
    for v in list(graph.inputs) + list(graph.param_values.values()):
        if v.type.dtype.name not in _NUMPY_DTYPE:
            raise UnsupportedError(f"TVM export: %{v.name} has dtype {v.type.dtype}, which numpy cannot hold; "
                                   "export a float32 or float64 model")
    target = resolve_target(target)
    mod, _symbols = graph_to_relax(graph, lanes_for(target), schedules)
    try:
        executable = tvm.compile(mod, target=target)
    except Exception as e:  # noqa: BLE001 - TVM's own build failure, reported as ours, at the op that causes it
        from ..backends.tvm.relax_lower import locate_build_failure

        where = locate_build_failure(graph, lambda m: tvm.compile(m, target=target), lanes_for(target), schedules)
        raise UnsupportedError(
            f"TVM export: TVM could not build the lowered graph of {graph.name}"
            f"{' at ' + where if where else ' (no single op found to blame)'}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}; rewrite that line with other ops, "
            "run the model with compile(backend='tvm') (hybrid mode), or export_onnx") from e
    os.makedirs(path, exist_ok=True)
    library = "model.so"
    executable.export_library(os.path.join(path, library))

    state = dict(module.state_dict())
    params, arrays = [], {}
    for i, (name, v) in enumerate(graph.param_values.items()):
        t = graph.params.get(name, state.get(name))
        if t is None:
            raise UnsupportedError(f"TVM export: parameter %{name} has no data")
        key = f"p{i}"
        arrays[key] = t.detach().to("cpu").contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        params.append({"name": name, "key": key, "dtype": _NUMPY_DTYPE[v.type.dtype.name],
                       "shape": [_dim(d) for d in v.type.shape]})
    np.savez(os.path.join(path, "weights.npz"), **arrays)
    manifest = {
        "format": FORMAT,
        "graph": graph.name,
        "library": library,
        "weights": "weights.npz",
        "entry": "main",
        "inputs": [{"name": v.name, "dtype": _NUMPY_DTYPE[v.type.dtype.name], "shape": [_dim(d) for d in v.type.shape]}
                   for v in graph.inputs],
        "outputs": [{"name": v.name, "dtype": _NUMPY_DTYPE.get(v.type.dtype.name, str(v.type.dtype)),
                     "shape": [_dim(d) for d in v.type.shape]} for v in graph.outputs],
        "params": params,
        "target": str(target),
        "tvm_version": tvm.__version__,
        "torch_free_loader": "sessa_tvm_runtime.py",
        # sizes where the program equals the module (size-dependent code in it); empty: every size
        "guards": [str(g) for g in traced.guards],
    }
    if gpu_source:
        from ..backends.tvm.gpu_source import emit_graph

        written = emit_graph(graph, os.path.join(path, "gpu"), tuple(gpu_source))
        manifest["gpu_sources"] = {kind: "gpu/" + name for kind, name in written.items()}
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "tvm_runtime.py"),
                    os.path.join(path, "sessa_tvm_runtime.py"))
    return str(path)
