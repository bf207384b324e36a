"""``export_onnx``: trace a module with our frontend, lower the IR op by op to standard ONNX (dynamic batch
and sequence length), check it, save it, and validate it with onnxruntime against the eager module.

Only the default ONNX domain is used, so any ONNX runtime can load the file without custom ops.
"""
from __future__ import annotations

import os

import sympy
import torch
import torch.utils._pytree as pytree

from ..tolerance import graph_tolerance, relative_error
from ..errors import SessaCompilerError, UnsupportedError
from ..frontend.trace import warn_guards
from ..ir.graph import Graph
from . import onnx_core  # noqa: F401  (registers the core-op lowerings)
from .onnx_builder import GraphBuilder, OnnxExportError, OnnxUnsupportedOpError, value_info
from .onnx_lower import Lowering, lower_node
from .onnx_result import OnnxExport, OnnxValidationError, model_op_counts, save_onnx  # noqa: F401  (re-exported)
from .onnx_result import _all_nodes, session as _session

DEFAULT_OPSET = 18   # LayerNormalization (17) and Reduce* with axes as inputs (18)
MIN_OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")

__all__ = [
    "OnnxExport",
    "OnnxExportError",
    "OnnxUnsupportedOpError",
    "OnnxValidationError",
    "build_model",
    "export_onnx",
    "model_domains",
    "model_op_counts",
]


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


# -- building ---------------------------------------------------------------------------------------------
def onnx_ready(graph: Graph) -> Graph:
    """A copy of ``graph`` after the ONNX pass pipeline (simplify, then the same chunk passes as the
    Triton backend): the blocked feedback ops (lse, diagonal-block inverses, chunked solve) are what
    the ONNX lowerings see, so the chunked algorithm and its chunk size are decided once, in passes/."""
    from ..passes.pipeline import run_pipeline

    ready = graph.clone()
    run_pipeline(ready, "onnx")
    return ready


def build_model(graph: Graph, *, opset: int = DEFAULT_OPSET, binding: dict | None = None,
                extra_outputs: list | None = None):
    """Lower an IR graph to an onnx.ModelProto.

    ``binding`` (symbol -> int) fixes the dynamic dims (a static model); ``extra_outputs`` (IR values)
    are exposed as further outputs ``debug_<i>`` (used to find where a mismatch starts).
    """
    from onnx import helper

    from .._version import __version__

    names = [v.name for v in extra_outputs or []]
    graph = onnx_ready(graph)
    extra_outputs = [graph.value(n) for n in names]
    b = GraphBuilder(opset)
    L = Lowering(graph, b)
    inputs = []
    for v in graph.inputs:
        name = b.names.fresh(v.name)
        L.names[v] = name
        shape = v.type.shape if binding is None else v.type.concrete_shape(binding)
        inputs.append(value_info(name, v.type.dtype.name, shape))
        for axis, d in enumerate(v.type.shape):
            if isinstance(d, sympy.Symbol) and d.name not in b.symbol_sources:
                b.symbol_sources[d.name] = (name, axis) if binding is None else int(binding[d.name])
    for pname, pv in graph.param_values.items():
        if pname not in graph.params:
            raise OnnxExportError(f"parameter %{pname} has no data to store in the ONNX file")
        L.names[pv] = b.initializer(graph.params[pname], pname)
    for node in graph.nodes:
        outs = _lower_one(L, graph, node)
        if len(outs) != len(node.outputs):
            raise OnnxExportError(f"op '{node.op}': the ONNX lowering made {len(outs)} outputs, "
                                  f"the node has {len(node.outputs)}")
        for v, o in zip(node.outputs, outs):
            L.names[v] = o
    outputs = []
    for i, v in enumerate(graph.outputs):
        name = b.names.fresh("output" if len(graph.outputs) == 1 else f"output_{i}")
        b.op("Identity", L.names[v], outputs=[name])
        shape = v.type.shape if binding is None else v.type.concrete_shape(binding)
        outputs.append(value_info(name, v.type.dtype.name, shape))
    for i, v in enumerate(extra_outputs or []):
        name = b.names.fresh(f"debug_{i}")
        b.op("Identity", L.names[v], outputs=[name])
        outputs.append(value_info(name, v.type.dtype.name, None))
    g = b.graph(graph.name, inputs, outputs)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="sessa_compiler",
                              producer_version=__version__,
                              doc_string=f"Exported by sessa_compiler from the IR graph {graph.name}.")
    model.ir_version = max(8, helper.find_min_ir_version_for(opsets))
    return model


def _lower_one(L, graph: Graph, node) -> list:
    """lower_node, its errors naming the op and the user's source line; an exception from inside the
    lowering (a case it does not expect) becomes an OnnxExportError that says so."""
    where = graph.source_of(node)
    try:
        return lower_node(L, node)
    except SessaCompilerError as e:
        if where and where not in str(e):
            e.args = (f"{e} (op {node.op} %{node.outputs[0].name if node.outputs else '?'}{where})",)
        raise
    except Exception as e:  # noqa: BLE001 - an internal failure, reported with the op and line
        target = f"fallback({node.attrs.get('target')})" if node.op == "fallback" else node.op
        raise OnnxExportError(
            f"export_onnx: op {target} %{node.outputs[0].name if node.outputs else '?'}{where} has no ONNX "
            f"lowering for this case ({type(e).__name__}: {e}); rewrite that line with ordinary float tensor ops, "
            "or export with export_tvm / run it with compile()") from e


def model_domains(model) -> set:
    """Every operator domain the model uses (nodes of Loop/Scan bodies included)."""
    domains = {o.domain for o in model.opset_import}
    for n in _all_nodes(model.graph):
        domains.add(n.domain)
    return domains


# -- validation --------------------------------------------------------------------------------------------
def _second_inputs(graph: Graph, args: tuple, binding: dict, seed: int = 0) -> tuple:
    """Inputs at another batch size and sequence length (T + 37 crosses a feedback chunk boundary)."""
    new = dict(binding)
    if "T" in new:
        new["T"] = binding["T"] + 37
    if "B" in new:
        new["B"] = binding["B"] + 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for v, a in zip(graph.inputs, args):
        shape = v.type.concrete_shape(new)
        if a.is_floating_point() and a.dim() == 2 and a.numel() and bool(((a == 0) | (a == 1)).all()):
            # a 0/1 float example (an attention mask given as floats): 0/1 again, mostly ones, as masks are
            out.append((torch.rand(shape, generator=g) < 0.8).to(a.dtype))
        elif a.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=torch.float32).to(a.dtype))
        elif a.dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=g).bool())
        else:
            lo, hi = int(a.min()), int(a.max())
            out.append(torch.randint(lo, hi + 1, shape, generator=g, dtype=a.dtype))
    return tuple(out)


def run_onnxruntime(session, graph: Graph, args: tuple) -> list:
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _locate(graph: Graph, args: tuple, opset: int, tol: float) -> str:
    """The first IR op whose onnxruntime value differs from the eager interpreter's (or '' if none)."""
    from ..semantics import run_graph

    kept = {v.name for v in onnx_ready(graph).values()}   # values the ONNX pipeline rewrote away are skipped
    values = [v for n in graph.nodes for v in n.outputs if v.type.dtype.is_float and v.name in kept]
    try:
        model = build_model(graph, opset=opset, extra_outputs=values)
        outs = run_onnxruntime(_session(model), graph, args)[len(graph.outputs):]
        refs = run_graph(graph, list(args), targets=values)
    except Exception as e:  # noqa: BLE001  (the diagnosis must not hide the mismatch it explains)
        return f" (could not locate the first differing op: {type(e).__name__}: {e})"
    for v, o, r in zip(values, outs, refs):
        err = relative_error(o.to(r.dtype), r)
        if err > tol:
            return (f"; the first IR value that differs is %{v.name} = {v.producer.op}(...) "
                    f"(max abs error / max abs value {err:.3e} vs the eager interpreter)")
    return "; every IR value matches the eager interpreter, so the graph itself differs from the module"


def validate_with_onnxruntime(session, graph: Graph, module, cases: list, opset: int) -> list:
    runs = []
    for args in cases:
        outs = run_onnxruntime(session, graph, args)
        with torch.no_grad():
            refs = [r for r in pytree.tree_leaves(module(*args)) if isinstance(r, torch.Tensor)]
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        if len(outs) != len(refs):
            raise OnnxValidationError(f"the ONNX model returns {len(outs)} outputs, the module {len(refs)} "
                                      f"(inputs {shapes})")
        errors = []
        for i, (o, r) in enumerate(zip(outs, refs)):
            tol = graph_tolerance(r.dtype, graph)
            err = relative_error(o.to(r.dtype) if o.dtype != r.dtype and o.dtype.is_floating_point else o, r)
            if tuple(o.shape) != tuple(r.shape):
                raise OnnxValidationError(f"ONNX output {i} has shape {tuple(o.shape)}, the module's "
                                          f"{tuple(r.shape)} (inputs {shapes})")
            if not err <= tol:
                where = _locate(graph, args, opset, tol)
                raise OnnxValidationError(
                    f"ONNX output {i} differs from the eager module at inputs {shapes}: max abs error / max abs "
                    f"reference = {err:.3e} > {tol:.0e} allowed for {r.dtype}{where}")
            errors.append(err)
        runs.append({"shapes": shapes, "errors": errors})
    return runs


# -- the entry point ------------------------------------------------------------------------------------------
def export_onnx(module: torch.nn.Module, example_inputs, path, *, opset: int | None = None,
                dynamic: bool = True, validate: bool = True, method: str = "forward") -> OnnxExport:
    """Export ``module`` to an ONNX file at ``path`` (see _export_onnx), in eval mode (export/modes.py)."""
    from .modes import eval_mode_for_export

    with eval_mode_for_export(module, "export_onnx"):
        return _export_onnx(module, example_inputs, path, opset=opset, dynamic=dynamic, validate=validate,
                            method=method)


def _export_onnx(module: torch.nn.Module, example_inputs, path, *, opset: int | None = None,
                 dynamic: bool = True, validate: bool = True, method: str = "forward") -> OnnxExport:
    """Export ``module`` to an ONNX file at ``path`` that uses only standard ONNX ops.

    The module is traced with sessa_compiler's frontend (attention, the feedback solve and the
    selective scan are recognised as IR ops) and lowered op by op: the feedback solve becomes an ONNX
    Loop over chunks, the scan an ONNX Scan. With ``dynamic=True`` batch and sequence length stay
    symbolic, so one file serves every T. With ``validate=True`` the file is run in onnxruntime on the
    example inputs and on a second batch size and sequence length, and compared with the module; an
    OnnxValidationError names the output, the inputs, the error and the first IR op that differs.
    Returns an OnnxExport (path, model, validation runs).

    ``method="decode_step"`` exports the serving step instead (see export/onnx_serving.py): inputs x_t
    then the cache tensors, outputs y_t then the updated cache tensors, dynamic batch and cache length;
    ``method="prefill"`` exports prefill(x, cache) -> (y, cache) with the same cache tensors.
    """
    import onnx

    opset = DEFAULT_OPSET if opset is None else int(opset)
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise UnsupportedError(f"export_onnx: opset {opset} is not supported; use {MIN_OPSET} .. {latest}")
    if method != "forward":
        from .onnx_serving import export_onnx_step

        return export_onnx_step(module, example_inputs, path, method=method, opset=opset, validate=validate)
    args = _as_tuple(example_inputs)
    from ..api import cached_trace   # through the compile cache, as compile() traces

    traced, _, _ = cached_trace(module, args)
    warn_guards(traced, "export_onnx", module)
    graph = traced.graph
    live = dict(module.state_dict(keep_vars=True))
    for name in graph.param_values:
        if name not in graph.params and name in live:
            graph.params[name] = live[name]
    from ..semantics import bind_symbols

    binding = bind_symbols(graph, list(args))
    model = build_model(graph, opset=opset, binding=None if dynamic else binding)
    foreign = model_domains(model) - set(STANDARD_DOMAINS)
    if foreign:
        raise OnnxExportError(f"the exported model uses non-standard domains {sorted(foreign)}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise OnnxExportError(f"the exported model fails onnx.checker.check_model(full_check=True): {e}") from e
    if traced.guards:  # where the file equals the module, for whoever loads it
        onnx.helper.set_model_props(model, {"sessa_compiler.guards": ", ".join(map(str, traced.guards))})
    path = os.fspath(path)
    save_onnx(model, path)
    result = OnnxExport(path=path, model=model, opset=opset, traced=traced)
    if validate:
        low = [v.name for v in list(graph.inputs) + list(graph.param_values.values())
               if v.type.dtype.name == "bf16"]
        if low:
            raise UnsupportedError(
                f"export_onnx: wrote {path}, but cannot validate it: onnxruntime's CPU provider has no bfloat16 "
                f"kernels (bfloat16 values: {', '.join(low[:3])}{' ...' if len(low) > 3 else ''}); "
                "pass validate=False to export without running it, or export in float16/float32")
        cases = [args] + ([_second_inputs(graph, args, binding)] if dynamic else [])
        try:
            sess = _session(path)
        except Exception as e:
            raise UnsupportedError(
                f"export_onnx: wrote {path} (it passes onnx.checker), but onnxruntime cannot load it on CPU: "
                f"{type(e).__name__}: {str(e).strip()[:400]}; pass validate=False to export without running it") from e
        result.validation = validate_with_onnxruntime(sess, graph, module, cases, opset)
    return result
