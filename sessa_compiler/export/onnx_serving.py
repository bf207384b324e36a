"""``export_onnx(..., method="decode_step")``: the serving step (sessa_compiler/serving.py) as a standard ONNX
graph.

Inputs: ``x_t`` (as the example gives it: with or without the sequence dim), then the new position's key-padding
masks where the example gives them (``attention_mask_t``: [B], or [B, 1] beside an x_t with its sequence dim),
then the cache tensors in the order of the compiled module's ``init_cache`` dict (its tensor values; a masked
attention caches the mask of every position, bool [B, P]). Outputs: ``y_t``, then the updated
cache tensors in the same order. Batch is dynamic (``B``), and so is the number of cached positions
(``P``): ONNX has no in-place writes, so a position-indexed cache tensor holds exactly the P past positions
and its update is P + 1 long (the new position appended); fixed-size states (scan ``h``, conv inputs) keep
their shape. Start from tensors with P = 0. Only position-wise ops use the forward lowering; attention,
feedback, scan, causal_conv1d and rope get single-position lowerings that read and extend the cache.
"""
from __future__ import annotations

import math
import os

import sympy
import torch

from ..errors import InputError, UnsupportedError
from ..tolerance import TOLERANCE, relative_error
from .onnx_builder import GraphBuilder, OnnxExportError, value_info
from .onnx_lower import Lowering, lower_node
from .serving_example import draw, draw_masks, mask_inputs, mask_name, serving_example, trace_example

B_SYM, P_SYM = sympy.Symbol("B"), sympy.Symbol("P")


def _cd(dtype: str) -> str:
    return "f64" if dtype == "f64" else "f32"


def _dt(t: torch.dtype) -> str:
    from ..ir.dtypes import from_torch

    return from_torch(t).name


class _Step:
    """Single-position ONNX lowerings of the sequence-mixing ops against cache inputs."""

    def __init__(self, L: Lowering, prog, caches_in: dict, cache_dtypes: dict):
        self.L, self.b, self.prog = L, L.b, prog
        self.caches_in = caches_in          # key -> onnx name of the input cache tensor
        self.cache_dtypes = cache_dtypes    # key -> IR dtype name
        self.caches_out: dict = {}
        grow = [(spec.key, spec.seq) for specs in prog.states.values() for spec in specs.values()
                if spec.seq is not None]
        self.t0 = None
        if grow:
            key, seq = grow[0]
            self.t0 = self.b.op("Shape", caches_in[key], start=seq, end=seq + 1, hint="past_len")  # int64 [1]

    def _need_t0(self, node):
        if self.t0 is None:
            raise UnsupportedError(f"export_onnx(method='decode_step'): op '{node.op}' needs the position, and this "
                                   "graph has no position-indexed cache to read it from")
        return self.t0

    def _rotate(self, node, x: str, inv: str, cd: str, d: int) -> str:
        b = self.b
        pos = b.op("Cast", self._need_t0(node), to=_onnx(cd))                          # [1]
        ang = b.op("Mul", pos, inv)                                                      # [d/2]
        cos, sin = b.op("Cos", ang), b.op("Sin", ang)
        pairs = b.op("Reshape", x, b.i64(0, 0, 0, d // 2, 2))                           # [B,1,H,d/2,2]
        xe = b.op("Squeeze", b.op("Slice", pairs, b.i64(0), b.i64(1), b.i64(-1)), b.i64(-1))
        xo = b.op("Squeeze", b.op("Slice", pairs, b.i64(1), b.i64(2), b.i64(-1)), b.i64(-1))
        re = b.op("Sub", b.op("Mul", xe, cos), b.op("Mul", xo, sin))
        ro = b.op("Add", b.op("Mul", xe, sin), b.op("Mul", xo, cos))
        st = b.op("Concat", b.op("Unsqueeze", re, b.i64(-1)), b.op("Unsqueeze", ro, b.i64(-1)), axis=-1)
        return b.op("Reshape", st, b.i64(0, 0, 0, d))

    def _append(self, key: str, new: str, have: str, axis: int) -> str:
        b = self.b
        new = b.cast(new, have, self.cache_dtypes[key])
        out = b.op("Concat", self.caches_in[key], new, axis=axis, hint="cache")
        self.caches_out[key] = out
        return out

    def lower(self, node) -> list:
        return getattr(self, "_" + node.op)(node)

    def _attention(self, node):
        L, b = self.L, self.b
        dt = node.outputs[0].type.dtype.name
        cd = _cd(dt)
        H, d = node.inputs[0].type.shape[2:]
        Hkv = node.inputs[1].type.shape[2]
        dv = node.inputs[2].type.shape[3]
        q, k, v = L.get(node, 0, cd), L.get(node, 1, cd), L.get(node, 2, cd)
        if node.attrs.get("rope"):
            inv = L.get(node, 3, cd)
            q, k = self._rotate(node, q, inv, cd, d), self._rotate(node, k, inv, cd, d)
        specs = self.prog.states[node]
        kk, vk = specs["k"].key, specs["v"].key
        K = self._append(kk, b.op("Transpose", k, perm=[0, 2, 1, 3]), cd, 2)          # [B,Hkv,P+1,d]
        V = self._append(vk, b.op("Transpose", v, perm=[0, 2, 1, 3]), cd, 2)
        K, V = b.cast(K, self.cache_dtypes[kk], cd), b.cast(V, self.cache_dtypes[vk], cd)
        qg = b.op("Reshape", q, b.i64(0, Hkv, H // Hkv, d))                              # [B,Hkv,g,d]
        logits = b.op("Mul", b.op("MatMul", qg, b.op("Transpose", K, perm=[0, 1, 3, 2])),
                      b.scalar(float(node.attrs["scale"]), cd))
        empty = None
        if node.attrs.get("key_padding", False):
            logits, empty = self._key_padding(node, logits, cd)
        out = b.op("MatMul", b.op("Softmax", logits, axis=-1), V)                        # [B,Hkv,g,dv]
        if empty is not None:
            out = b.op("Where", empty, b.scalar(math.nan, cd), out, hint="empty_row_nan")
        return [b.cast(b.op("Reshape", out, b.i64(0, 1, H, dv)), cd, dt)]

    def _key_padding(self, node, logits: str, cd: str):
        """The new position's key-padding mask (operand 4, [B, 1]) appended to the cached mask [B, P + 1]; padded
        keys get -inf. A row with no visible key (every position so far padded) is, with empty_rows="mean", the
        mean of v over the positions so far (the module's value on the sequence up to here: uniform logits); with
        empty_rows="nan", or where such a row reaches later rows (ServingProgram.empty_rows_reach: the compiled
        module refuses such a prompt, and a graph cannot raise), NaN. -> (logits, [B,1,1,1] where to write NaN)"""
        b = self.b
        mdt = self.L.operand_dtype(node, 4)
        m = self.L.get(node, 4)
        new = m if mdt == "bool" else b.op("Not", b.op("Equal", m, b.scalar(0, mdt)), hint="key_keep_t")   # [B,1]
        M = self._append(self.prog.states[node]["mask"].key, new, "bool", 1)                    # [B,P+1]
        keep = b.op("Unsqueeze", M, b.i64(1, 2), hint="key_keep")                            # [B,1,1,P+1]
        logits = b.op("Where", keep, logits, b.scalar(-math.inf, cd), hint="logits_masked")
        seen = b.op("ReduceMax", b.op("Cast", M, to=_onnx(cd)), b.i64(1), keepdims=1)        # [B,1]
        empty = b.op("Unsqueeze", b.op("Equal", seen, b.scalar(0.0, cd)), b.i64(1, 2), hint="empty_row")
        if node.attrs.get("empty_rows", "mean") == "mean":
            logits = b.op("Where", empty, b.scalar(0.0, cd), logits, hint="logits_uniform")
            if node not in self.prog.empty_rows_reach:
                empty = None
        return logits, empty

    def _feedback(self, node):
        L, b = self.L, self.b
        dt = node.outputs[0].type.dtype.name
        cd = _cd(dt)
        f, qb, kb, g = (L.get(node, i, cd) for i in range(4))
        specs = self.prog.states[node]
        kbk, sk = specs["k_b"].key, specs["s"].key
        past_kb = b.cast(self.caches_in[kbk], self.cache_dtypes[kbk], cd)                # [B,P,W]
        past_s = b.cast(self.caches_in[sk], self.cache_dtypes[sk], cd)
        self._append(kbk, kb, cd, 1)
        logits = b.op("Mul", b.op("MatMul", qb, b.op("Transpose", past_kb, perm=[0, 2, 1])),
                      b.scalar(float(node.attrs["scale"]), cd))                          # [B,1,P]
        # P = 0 (the first position): s = f. Runtimes differ on products over an empty axis (TVM leaves
        # them unwritten), so both operands get one more slot: a finite, negligible logit (-1e30, whose
        # weight underflows to 0 whenever a real key exists) and a zero state
        col = b.op("Slice", f, b.i64(0), b.i64(1), b.i64(2))                                # [B,1,1]
        pad = b.op("Add", b.op("Mul", col, b.scalar(0.0, cd)), b.scalar(-1e30, cd))
        logits = b.op("Concat", logits, pad, axis=-1)
        states = b.op("Concat", past_s, b.op("Mul", f, b.scalar(0.0, cd)), axis=1)         # [B,P+1,W]
        mixed = b.op("MatMul", b.op("Softmax", logits, axis=-1), states)                  # [B,1,W]
        s = b.op("Add", f, b.op("Mul", b.op("Unsqueeze", g, b.i64(-1)), mixed))
        self._append(sk, s, cd, 1)
        return [b.cast(s, cd, dt)]

    def _scan(self, node):
        L, b = self.L, self.b
        dt = node.outputs[0].type.dtype.name
        cd = _cd(dt)
        u, delta, A, Bm, Cm, D = (L.get(node, i, cd) for i in range(6))
        hk = self.prog.states[node]["h"].key
        h = b.cast(self.caches_in[hk], self.cache_dtypes[hk], cd)                        # [B,Din,N]
        sq = b.i64(1)
        u0, dt0, B0, C0 = (b.op("Squeeze", x, sq) for x in (u, delta, Bm, Cm))
        decay = b.op("Exp", b.op("Mul", b.op("Unsqueeze", dt0, b.i64(-1)), A))
        inc = b.op("Mul", b.op("Unsqueeze", b.op("Mul", dt0, u0), b.i64(-1)), b.op("Unsqueeze", B0, sq))
        h = b.op("Add", b.op("Mul", decay, h), inc)
        self.caches_out[hk] = b.cast(h, cd, self.cache_dtypes[hk])
        y = b.op("Add", b.op("ReduceSum", b.op("Mul", h, b.op("Unsqueeze", C0, sq)), b.i64(-1), keepdims=0),
                 b.op("Mul", D, u0))
        return [b.cast(b.op("Unsqueeze", y, sq), cd, dt)]

    def _causal_conv1d(self, node):
        L, b = self.L, self.b
        dt = node.outputs[0].type.dtype.name
        x, w = L.get(node, 0, dt), L.get(node, 1, dt)
        K = node.inputs[1].type.shape[1]
        xk = self.prog.states[node]["x"].key
        xx = b.op("Concat", b.cast(self.caches_in[xk], self.cache_dtypes[xk], dt), x, axis=1)   # [B,K,C]
        y = b.op("ReduceSum", b.op("Mul", xx, b.op("Transpose", w, perm=[1, 0])), b.i64(1), keepdims=1)
        bias = L.get(node, 2, dt)
        if bias is not None:
            y = b.op("Add", y, bias)
        self.caches_out[xk] = b.cast(b.op("Slice", xx, b.i64(1), b.i64(K), b.i64(1)), dt, self.cache_dtypes[xk])
        return [y]

    def _rope(self, node):
        L = self.L
        dt = node.outputs[0].type.dtype.name
        cd = _cd(dt)
        d = node.inputs[0].type.shape[3]
        return [self.b.cast(self._rotate(node, L.get(node, 0, cd), L.get(node, 1, cd), cd, d), cd, dt)]


def _onnx(dtype: str) -> int:
    from .onnx_builder import ONNX_DTYPE

    return ONNX_DTYPE[dtype]


def build_step_model(prog, squeeze: bool, cache: dict, masks: list, *, opset: int):
    """The decode step of ``prog`` (a ServingProgram) as an onnx.ModelProto; ``cache`` gives the dtypes, ``masks``
    the indices of the graph inputs that are key-padding masks (serving_example.mask_inputs)."""
    graph = prog.graph
    b = GraphBuilder(opset)
    L = Lowering(graph, b)
    xv = graph.inputs[0]
    tail = list(xv.type.shape[2:])
    x_in = "x_t"
    b.names.fresh(x_in)
    shape = [B_SYM] + ([] if squeeze else [1]) + tail
    inputs = [value_info(x_in, xv.type.dtype.name, shape)]
    b.symbol_sources["B"] = (x_in, 0)
    b.symbol_sources[str(xv.type.shape[1])] = 1
    L.names[xv] = b.op("Unsqueeze", x_in, b.i64(1)) if squeeze else x_in
    for j, i in enumerate(masks):   # the new position's key-padding mask: [B] (or [B, 1] beside a [B, 1, ...] x_t)
        mv = graph.inputs[i]
        name = b.names.fresh(mask_name(j, len(masks), "_t"))
        inputs.append(value_info(name, mv.type.dtype.name, [B_SYM] + ([] if squeeze else [1])))
        L.names[mv] = b.op("Unsqueeze", name, b.i64(1)) if squeeze else name
    caches_in, dtypes, order = {}, {}, []
    for specs in prog.states.values():
        for spec in specs.values():
            t = cache[spec.key]
            dtypes[spec.key] = _dt(t.dtype)
            name = b.names.fresh(spec.key)
            caches_in[spec.key] = name
            order.append(spec.key)
            cshape = [B_SYM] + [P_SYM if (spec.seq is not None and i + 1 == spec.seq) else s
                                for i, s in enumerate(list(t.shape[1:]))]
            inputs.append(value_info(name, dtypes[spec.key], cshape))
    for pname, pv in graph.param_values.items():
        L.names[pv] = b.initializer(graph.params[pname], pname)
    step = _Step(L, prog, caches_in, dtypes)
    from ..serving import STATEFUL

    for node in graph.nodes:
        outs = step.lower(node) if node.op in STATEFUL else lower_node(L, node)
        for v, o in zip(node.outputs, outs):
            L.names[v] = o
    outputs = []
    for i, v in enumerate(graph.outputs):
        name = b.names.fresh("y_t" if len(graph.outputs) == 1 else f"y_t_{i}")
        o = L.names[v]
        b.op("Squeeze" if squeeze else "Identity", *([o, b.i64(1)] if squeeze else [o]), outputs=[name])
        outputs.append(value_info(name, v.type.dtype.name, [B_SYM] + ([] if squeeze else [1]) + list(v.type.shape[2:])))
    _cache_outputs(b, prog, cache, order, dtypes, [step.caches_out[key] for key in order], P_SYM + 1, outputs)
    return _model(b.graph(graph.name + "_decode_step", inputs, outputs), opset, f"decode_step of {graph.name}"), order


def _cache_inputs(b, prog, cache, inputs: list):
    """Declare the cache inputs (in the compiled cache's order); -> (names by key, IR dtypes by key, order)."""
    names, dtypes, order = {}, {}, []
    for specs in prog.states.values():
        for spec in specs.values():
            t = cache[spec.key]
            dtypes[spec.key] = _dt(t.dtype)
            names[spec.key] = b.names.fresh(spec.key)
            order.append(spec.key)
            inputs.append(value_info(names[spec.key], dtypes[spec.key], _cache_shape(spec, t, P_SYM)))
    return names, dtypes, order


def _cache_outputs(b, prog, cache, order, dtypes, values, length, outputs: list) -> None:
    """Declare the updated caches as graph outputs ``<key>.new``, in the cache inputs' order."""
    for key, value in zip(order, values):
        name = b.names.fresh(key + ".new")
        b.op("Identity", value, outputs=[name])
        spec = next(sp for specs in prog.states.values() for sp in specs.values() if sp.key == key)
        outputs.append(value_info(name, dtypes[key], _cache_shape(spec, cache[key], length)))


def _model(graph, opset: int, what: str):
    from onnx import helper

    from .._version import __version__

    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="sessa_compiler", producer_version=__version__,
                              doc_string=f"{what}, exported by sessa_compiler")
    model.ir_version = max(8, helper.find_min_ir_version_for(opsets))
    return model


def _cache_shape(spec, t, length) -> list:
    return [B_SYM] + [length if (spec.seq is not None and i + 1 == spec.seq) else s
                      for i, s in enumerate(list(t.shape[1:]))]


def build_prefill_model(prog, cache: dict, masks: list, *, opset: int):
    """prefill(x, cache) -> (y, cache) as an onnx.ModelProto: an ONNX Loop over x's positions whose body is the
    decode step (the caches are its loop-carried values), so a prompt is one call on any cache."""
    from ..serving import STATEFUL

    graph = prog.graph
    b = GraphBuilder(opset)
    xv = graph.inputs[0]
    x_in = b.names.fresh("x")
    inputs = [value_info(x_in, xv.type.dtype.name, [B_SYM, sympy.Symbol("T")] + list(xv.type.shape[2:]))]
    mask_in = [b.names.fresh(mask_name(j, len(masks), "")) for j in range(len(masks))]
    inputs += [value_info(n, graph.inputs[i].type.dtype.name, [B_SYM, sympy.Symbol("T")])
               for n, i in zip(mask_in, masks)]
    b.symbol_sources["B"] = (x_in, 0)
    b.symbol_sources[str(xv.type.shape[1])] = 1      # the body runs one position
    caches_in, dtypes, order = _cache_inputs(b, prog, cache, inputs)
    params = {pv: b.initializer(graph.params[name], name) for name, pv in graph.param_values.items()}
    body = b.sub()
    pos, cond_in = body.names.fresh("position"), body.names.fresh("cond_in")
    carried = {k: body.names.fresh(k + ".in") for k in order}
    L = Lowering(graph, body)
    L.names.update(params)
    start = body.op("Unsqueeze", pos, body.i64(0))
    L.names[xv] = body.op("Slice", x_in, start, body.op("Add", start, body.i64(1)), body.i64(1), hint="x_t")
    for n, i in zip(mask_in, masks):
        L.names[graph.inputs[i]] = body.op("Slice", n, start, body.op("Add", start, body.i64(1)), body.i64(1),
                                           hint="mask_t")
    step = _Step(L, prog, carried, dtypes)
    for node in graph.nodes:
        outs = step.lower(node) if node.op in STATEFUL else lower_node(L, node)
        for v, o in zip(node.outputs, outs):
            L.names[v] = o
    cond_out = body.op("Identity", cond_in)
    carried_out = [body.op("Identity", step.caches_out[k], hint=k + ".out") for k in order]
    ys = [body.op("Identity", L.names[v], hint="y_t") for v in graph.outputs]
    g = body.graph("prefill_positions",
                   [value_info(pos, "i64", []), value_info(cond_in, "bool", [])] +
                   [value_info(carried[k], dtypes[k], None) for k in order],
                   [value_info(cond_out, "bool", [])] +
                   [value_info(n, dtypes[k], None) for n, k in zip(carried_out, order)] +
                   [value_info(y, v.type.dtype.name, None) for y, v in zip(ys, graph.outputs)])
    n_pos = b.op("Squeeze", b.op("Shape", x_in, start=1, end=2), b.i64(0), hint="positions")
    outs = b.op("Loop", n_pos, b.scalar(True, "bool"), *[caches_in[k] for k in order], body=g,
                outputs=len(order) + len(ys), hint="prefill")
    outs = outs if isinstance(outs, list) else [outs]
    outputs = []
    for i, (stacked, v) in enumerate(zip(outs[len(order):], graph.outputs)):       # [T, B, 1, ...]
        name = b.names.fresh("y" if len(graph.outputs) == 1 else f"y_{i}")
        rank = v.type.rank
        b.op("Transpose", b.op("Squeeze", stacked, b.i64(2)), perm=[1, 0] + list(range(2, rank)), outputs=[name])
        outputs.append(value_info(name, v.type.dtype.name, [B_SYM, sympy.Symbol("T")] + list(v.type.shape[2:])))
    _cache_outputs(b, prog, cache, order, dtypes, outs[:len(order)], P_SYM + sympy.Symbol("T"), outputs)
    return _model(b.graph(graph.name + "_prefill", inputs, outputs), opset, f"prefill of {graph.name}"), order


def validate_prefill(sess, module, x, masks: list, cache, order, prog) -> list:
    """Prefill 3 positions from empty caches, then 2 more on the returned caches, in onnxruntime, at the
    example's batch and one more; each chunk's y against the module's full forward (with random key-padding masks
    where the module takes them)."""
    runs = []
    g = torch.Generator().manual_seed(0)
    for batch in (int(x.shape[0]), int(x.shape[0]) + 1):
        xs = draw(x, (batch, 5) + tuple(x.shape[2:]), g)
        ms = draw_masks(masks, batch, 5, g)
        with torch.no_grad():
            full = _tensors(module(xs, *ms))
        caches = empty_caches(cache, order, prog, batch)
        for step, (a, e) in enumerate(((0, 3), (3, 5))):
            feeds = [xs[:, a:e].numpy()] + [m[:, a:e].numpy() for m in ms] + caches
            outs = sess.run(None, {i.name: v for i, v in zip(sess.get_inputs(), feeds)})
            ys, caches = outs[:len(full)], outs[len(full):]
            for y, ref in zip(ys, full):
                ref = ref[:, a:e]
                runs.append({"batch": batch, "step": step, "error": relative_error(torch.from_numpy(y), ref),
                             "tolerance": TOLERANCE.get(ref.dtype, 0.0)})
    return runs


def _tensors(out) -> list:
    """The module's tensor outputs in the order of the exported graph's (its output dataclass, tuple or dict
    flattened; None and Python constants are not graph outputs)."""
    return [r for r in torch.utils._pytree.tree_leaves(out) if isinstance(r, torch.Tensor)]


def empty_caches(cache: dict, order: list, prog, batch: int) -> list:
    """Zero-position cache tensors (P = 0) in the export's input order, as numpy arrays."""
    out = []
    for key in order:
        spec = next(s for specs in prog.states.values() for s in specs.values() if s.key == key)
        t = cache[key]
        out.append(torch.zeros(spec.full_shape(batch, 0), dtype=t.dtype).numpy())
    return out


def export_onnx_step(module, example_inputs, path, *, method: str, opset: int, validate: bool):
    import onnx

    from ..api import CompiledModule
    from ..serving import ServingProgram
    from .onnx_result import OnnxExport, OnnxValidationError, save_onnx, session as _session

    x_t, masks, given, squeeze = serving_example(example_inputs, method, "export_onnx")
    x4, m4 = trace_example(x_t, masks, method, squeeze)
    compiled = CompiledModule(module, (x4, *m4), backend="eager")
    graph = compiled.graph
    prog = ServingProgram(graph)
    mask_idx = mask_inputs(prog, f"export_onnx(method={method!r})")
    prog.no_position_reads(f"export_onnx(method={method!r})")
    prog.check((x4, *m4), graph.params)  # the example the graph was traced on
    cache = prog.init_cache(int(x_t.shape[0]), device=torch.device("cpu"), max_len=0)
    if given is not None:
        pending = isinstance(given, dict) and "_pending" in given   # from a compiled module not traced yet
        # (a cache made before the module was traced with a mask lacks the mask's entries: only dtypes are read)
        missing = [k for k in cache if k not in ("t", "max_len") and k not in given and not k.endswith(".mask")] \
            if isinstance(given, dict) else []
        if not isinstance(given, dict) or (not pending and missing):
            raise InputError(f"export_onnx(method={method!r}): the example cache must come from the compiled "
                             "module's init_cache (keys " + ", ".join(k for k in cache if k not in ('t', 'max_len')) +
                             f"), got {type(given).__name__}" + (f" with keys {sorted(map(str, given))}"
                                                                if isinstance(given, dict) else ""))
        low = [given["_pending"][2]] if pending else \
            [v.dtype for k, v in given.items() if k.endswith((".k", ".k_b")) and isinstance(v, torch.Tensor)]
        cache = prog.init_cache(int(x_t.shape[0]), device=torch.device("cpu"), dtype=low[0] if low else None,
                                max_len=0)
    if method == "prefill":
        model, order = build_prefill_model(prog, cache, mask_idx, opset=opset)
    else:
        model, order = build_step_model(prog, squeeze, cache, mask_idx, opset=opset)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise OnnxExportError(f"the exported decode_step fails onnx.checker.check_model(full_check=True): {e}") from e
    path = os.fspath(path)
    save_onnx(model, path)
    result = OnnxExport(path=path, model=model, opset=opset, traced=compiled._traced)
    result.cache_order = order
    if validate:
        if method == "prefill":
            result.validation = validate_prefill(_session(path), module, x_t, masks, cache, order, prog)
        else:
            result.validation = validate_step(_session(path), module, x_t, masks, squeeze, cache, order, prog)
        bad = [r for r in result.validation if r["error"] > r["tolerance"]]
        if bad:
            r = bad[0]
            raise OnnxValidationError(f"export_onnx(method={method!r}): onnxruntime's call {r['step']} at batch "
                                      f"{r['batch']} differs from the module's full forward: relative error "
                                      f"{r['error']:.3e} > {r['tolerance']:.0e}")
    return result


def validate_step(sess, module, x_t, masks: list, squeeze: bool, cache, order, prog, steps: int = 5) -> list:
    """Decode ``steps`` positions from empty caches in onnxruntime (at the example's batch and one more) and
    compare each y_t with the module's full forward over the positions so far (with random key-padding masks
    where the module takes them)."""
    runs = []
    g = torch.Generator().manual_seed(0)
    for batch in (int(x_t.shape[0]), int(x_t.shape[0]) + 1):
        caches = empty_caches(cache, order, prog, batch)
        xs = []
        ms = draw_masks(masks, batch, steps, g)
        for step in range(steps):
            x = draw(x_t, (batch,) + tuple(x_t.shape[1:]), g)
            xs.append(x if not squeeze else x[:, None])
            m_t = [m[:, step] if squeeze else m[:, step:step + 1] for m in ms]
            feeds = {i.name: a for i, a in zip(sess.get_inputs(), [x.numpy()] + [m.numpy() for m in m_t] + caches)}
            outs = sess.run(None, feeds)
            with torch.no_grad():
                refs = _tensors(module(torch.cat(xs, dim=1), *[m[:, :step + 1] for m in ms]))
            ys, caches = outs[:len(refs)], outs[len(refs):]
            for y, ref in zip(ys, refs):
                y, ref = torch.from_numpy(y), ref[:, -1]
                y = y if squeeze else y[:, 0]
                tol = TOLERANCE.get(ref.dtype, 0.0)
                runs.append({"batch": batch, "step": step, "error": relative_error(y, ref), "tolerance": tol})
    return runs
