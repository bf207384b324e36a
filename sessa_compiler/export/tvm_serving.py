"""``export_tvm(..., method="decode_step" | "prefill")``: the serving step (sessa_compiler/serving.py) as a TVM
library.

The same contract as the ONNX step export (export/onnx_serving.py): inputs ``x_t``, its key-padding masks, then
the cache tensors
in the compiled cache's order, outputs ``y_t`` then the updated caches; batch ``B`` and past length ``P``
symbolic (a position-indexed cache holds exactly P positions and comes back P + 1 long). Position-wise ops
use the whole-graph Relax lowering (backends/tvm/relax_lower.py); attention, feedback, scan,
causal_conv1d and rope get single-position Relax forms reading and extending the cache. The directory is
the one export_tvm writes (library, weights, manifest, torch-free loader).

``method="prefill"``: prefill(x, cache) -> (y, cache) with the same cache inputs and outputs (P in, P + T out).
The library holds the same step, on one position with its sequence dim; the manifest says ``"method":
"prefill"`` and the loader runs the step over x's T positions in order, the caches staying TVM tensors between
steps, then concatenates the outputs along the sequence dim. So a prompt is one call on any cache, at the
step's cost per position (as the ONNX prefill's Loop), and its caches feed the decode_step export directly.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import sympy
import torch

from .serving_example import mask_inputs, mask_name, serving_example, trace_example
from .tvm_runtime import FORMAT, MANIFEST


def _step_lowerer(graph, prog, squeeze: bool, cache: dict, lanes: int, schedules, masks: list):
    from ..backends.tvm.relax_lower import RELAX_DTYPE, _Lowerer
    from ..serving import STATEFUL

    seq_sym = graph.inputs[0].type.shape[1]

    class StepLowerer(_Lowerer):
        def dim(self, d):
            return super().dim(sympy.sympify(d).subs(seq_sym, 1))

        def build(self):
            relax, bb, op = self.relax, self.bb, self.relax.op
            xv = graph.inputs[0]
            Bv = self.dim(xv.type.shape[0])
            Pv = self._expr(sympy.Symbol("P"))
            tail = [self.dim(d) for d in xv.type.shape[2:]]
            x_ty = relax.TensorType([Bv] + ([] if squeeze else [1]) + tail, RELAX_DTYPE[xv.type.dtype.name])
            x_in = relax.Var("x_t", x_ty)
            m_in = [relax.Var(mask_name(j, len(masks), "_t"),   # the new position's key-padding masks
                              relax.TensorType([Bv] + ([] if squeeze else [1]),
                                               RELAX_DTYPE[graph.inputs[i].type.dtype.name]))
                    for j, i in enumerate(masks)]
            self.cache_vars, self.cache_out, self.order, self.cache_dt = {}, {}, [], {}
            cvars = []
            for specs in prog.states.values():
                for spec in specs.values():
                    t = cache[spec.key]
                    shape = [Bv] + [Pv if (spec.seq is not None and i + 1 == spec.seq) else int(s)
                                    for i, s in enumerate(t.shape[1:])]
                    dt = str(t.dtype).replace("torch.", "")
                    var = relax.Var("c_" + spec.key.replace(".", "_"), relax.TensorType(shape, dt))
                    self.cache_vars[spec.key], self.cache_dt[spec.key] = var, dt
                    self.order.append(spec.key)
                    cvars.append(var)
            params = [relax.Var(f"p_{i}", self.ttype(v)) for i, v in enumerate(graph.param_values.values())]
            self.Pv = Pv
            with bb.function("main", [x_in] + m_in + cvars + params):
                with bb.dataflow():
                    self.env[xv] = bb.emit(op.expand_dims(x_in, 1)) if squeeze else x_in
                    for i, var in zip(masks, m_in):
                        self.env[graph.inputs[i]] = bb.emit(op.expand_dims(var, 1)) if squeeze else var
                    for v, r in zip(graph.param_values.values(), params):
                        self.env[v] = r
                    for node in graph.nodes:
                        if node.op in STATEFUL:
                            self.env[node.outputs[0]] = getattr(self, "_step_" + node.op)(node)
                        else:
                            self.lower(node)
                    outs = []
                    for v in graph.outputs:
                        o = self.env[v]
                        outs.append(bb.emit(op.squeeze(o, [1])) if squeeze else o)
                    outs += [self.cache_out[k] for k in self.order]
                    result = bb.emit_output(relax.Tuple(outs))
                bb.emit_func_output(result)
            return bb.get()

        # -- single-position forms ----------------------------------------------------------------
        def _cast(self, x, have, want):
            return x if have == want else self.bb.emit(self.relax.op.astype(x, want))

        def _cd(self, node):
            return "float64" if node.outputs[0].type.dtype.name == "f64" else "float32"

        def _append(self, key, new, have, axis):
            op, bb = self.relax.op, self.bb
            new = self._cast(new, have, self.cache_dt[key])
            out = bb.emit(op.concat([self.cache_vars[key], new], axis=axis))
            self.cache_out[key] = out
            return out

        def _rotate(self, x, inv, cd, shape):
            op, bb = self.relax.op, self.bb
            pos = bb.emit(op.arange(self.Pv, self.Pv + 1, 1, dtype=cd))                     # [1]
            ang = bb.emit(op.multiply(pos, inv))                                             # [d/2]
            cos, sin = bb.emit(op.cos(ang)), bb.emit(op.sin(ang))
            d = shape[-1]
            pairs = bb.emit(op.reshape(x, shape[:-1] + [d // 2, 2]))
            xe = bb.emit(op.squeeze(op.strided_slice(pairs, [4], [0], [1]), [4]))
            xo = bb.emit(op.squeeze(op.strided_slice(pairs, [4], [1], [2]), [4]))
            re = bb.emit(op.subtract(op.multiply(xe, cos), op.multiply(xo, sin)))
            ro = bb.emit(op.add(op.multiply(xe, sin), op.multiply(xo, cos)))
            st = bb.emit(op.concat([op.expand_dims(re, -1), op.expand_dims(ro, -1)], axis=-1))
            return bb.emit(op.reshape(st, shape))

        def _operands(self, node, n, cd):
            return [self._cast(self.env[node.inputs[i]], RELAX_DTYPE[node.inputs[i].type.dtype.name], cd)
                    for i in range(n)]

        def _step_attention(self, node):
            op, bb = self.relax.op, self.bb
            cd = self._cd(node)
            H, d = (int(s) for s in node.inputs[0].type.shape[2:])
            Hkv, dv = int(node.inputs[1].type.shape[2]), int(node.inputs[2].type.shape[3])
            q, k, v = self._operands(node, 3, cd)
            if node.attrs.get("rope"):
                inv = self._operands(node, 4, cd)[3]
                shp = lambda i: [self.dim(s) for s in node.inputs[i].type.shape]  # noqa: E731
                q, k = self._rotate(q, inv, cd, shp(0)), self._rotate(k, inv, cd, shp(1))
            specs = prog.states[node]
            K = self._append(specs["k"].key, bb.emit(op.permute_dims(k, [0, 2, 1, 3])), cd, 2)
            V = self._append(specs["v"].key, bb.emit(op.permute_dims(v, [0, 2, 1, 3])), cd, 2)
            K, V = self._cast(K, self.cache_dt[specs["k"].key], cd), self._cast(V, self.cache_dt[specs["v"].key], cd)
            Bv = self.dim(node.inputs[0].type.shape[0])
            qg = bb.emit(op.reshape(q, [Bv, Hkv, H // Hkv, d]))
            logits = bb.emit(op.multiply(op.matmul(qg, op.permute_dims(K, [0, 1, 3, 2])),
                                         self.relax.const(float(node.attrs["scale"]), cd)))
            empty = None
            if node.attrs.get("key_padding", False):
                logits, empty = self._key_padding(node, logits, cd)
            out = bb.emit(op.matmul(op.nn.softmax(logits, axis=-1), V))
            if empty is not None:
                out = bb.emit(op.where(empty, self.relax.const(float("nan"), cd), out))
            out = bb.emit(op.reshape(out, [Bv, 1, H, dv]))
            return self._cast(out, cd, RELAX_DTYPE[node.outputs[0].type.dtype.name])

        def _key_padding(self, node, logits, cd):
            """As the ONNX step (export/onnx_serving.py _Step._key_padding): the new position's mask appended to
            the cached one, padded keys -inf, a row with no visible key uniform (empty_rows="mean") or NaN (with
            "nan", or where such a row reaches later rows). -> (logits, where to write NaN or None)"""
            op, bb = self.relax.op, self.bb
            m = self.env[node.inputs[4]]
            mdt = node.inputs[4].type.dtype.name
            new = m if mdt == "bool" else bb.emit(op.not_equal(m, self.relax.const(0, RELAX_DTYPE[mdt])))
            M = self._append(prog.states[node]["mask"].key, new, "bool", 1)                   # [B, P+1]
            keep = bb.emit(op.expand_dims(M, [1, 2]))                                          # [B,1,1,P+1]
            logits = bb.emit(op.where(keep, logits, self.relax.const(float("-inf"), cd)))
            seen = bb.emit(op.max(op.astype(M, cd), axis=[1], keepdims=True))                  # [B, 1]
            empty = bb.emit(op.expand_dims(op.equal(seen, self.relax.const(0.0, cd)), [1, 2]))   # [B,1,1,1]
            if node.attrs.get("empty_rows", "mean") == "mean":
                logits = bb.emit(op.where(empty, self.relax.const(0.0, cd), logits))
                if node not in prog.empty_rows_reach:
                    empty = None
            return logits, empty

        def _step_feedback(self, node):
            op, bb = self.relax.op, self.bb
            cd = self._cd(node)
            f, qb, kb, g = self._operands(node, 4, cd)
            specs = prog.states[node]
            kk, sk = specs["k_b"].key, specs["s"].key
            past_kb = self._cast(self.cache_vars[kk], self.cache_dt[kk], cd)
            past_s = self._cast(self.cache_vars[sk], self.cache_dt[sk], cd)
            self._append(kk, kb, cd, 1)
            logits = bb.emit(op.multiply(op.matmul(qb, op.permute_dims(past_kb, [0, 2, 1])),
                                         self.relax.const(float(node.attrs["scale"]), cd)))     # [B,1,P]
            # TVM's matmul over an empty reduction (P = 0) leaves its output unwritten: extend both operands
            # by one slot that has a finite, negligible logit (-1e30: its weight underflows to 0 whenever a
            # real key exists) and a zero state, so every reduction has P + 1 >= 1 terms
            col = bb.emit(op.strided_slice(f, [2], [0], [1]))                                     # [B,1,1]
            pad = bb.emit(op.add(op.zeros_like(col), self.relax.const(-1e30, cd)))
            logits = bb.emit(op.concat([logits, pad], axis=-1))
            states = bb.emit(op.concat([past_s, op.zeros_like(f)], axis=1))                      # [B,P+1,W]
            mixed = bb.emit(op.matmul(op.nn.softmax(logits, axis=-1), states))
            s = bb.emit(op.add(f, op.multiply(op.expand_dims(g, -1), mixed)))
            self._append(sk, s, cd, 1)
            return self._cast(s, cd, RELAX_DTYPE[node.outputs[0].type.dtype.name])

        def _step_scan(self, node):
            op, bb = self.relax.op, self.bb
            cd = self._cd(node)
            u, delta, A, Bm, Cm, D = self._operands(node, 6, cd)
            hk = prog.states[node]["h"].key
            h = self._cast(self.cache_vars[hk], self.cache_dt[hk], cd)
            u0, dt0, B0, C0 = (bb.emit(op.squeeze(x, [1])) for x in (u, delta, Bm, Cm))
            decay = bb.emit(op.exp(op.multiply(op.expand_dims(dt0, -1), A)))
            inc = bb.emit(op.multiply(op.expand_dims(op.multiply(dt0, u0), -1), op.expand_dims(B0, 1)))
            h = bb.emit(op.add(op.multiply(decay, h), inc))
            self.cache_out[hk] = self._cast(h, cd, self.cache_dt[hk])
            y = bb.emit(op.add(op.sum(op.multiply(h, op.expand_dims(C0, 1)), [-1]), op.multiply(D, u0)))
            return self._cast(bb.emit(op.expand_dims(y, 1)), cd, RELAX_DTYPE[node.outputs[0].type.dtype.name])

        def _step_causal_conv1d(self, node):
            op, bb = self.relax.op, self.bb
            dt = RELAX_DTYPE[node.outputs[0].type.dtype.name]
            x, w = self.env[node.inputs[0]], self.env[node.inputs[1]]
            K = int(node.inputs[1].type.shape[1])
            xk = prog.states[node]["x"].key
            xx = bb.emit(op.concat([self._cast(self.cache_vars[xk], self.cache_dt[xk], dt), x], axis=1))
            y = bb.emit(op.sum(op.multiply(xx, op.permute_dims(w, [1, 0])), [1], keepdims=True))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                y = bb.emit(op.add(y, self.env[node.inputs[2]]))
            self.cache_out[xk] = self._cast(bb.emit(op.strided_slice(xx, [1], [1], [K])), dt, self.cache_dt[xk])
            return y

        def _step_rope(self, node):
            cd = self._cd(node)
            x, inv = self._operands(node, 2, cd)
            shape = [self.dim(s) for s in node.inputs[0].type.shape]
            return self._cast(self._rotate(x, inv, cd, shape), cd, RELAX_DTYPE[node.outputs[0].type.dtype.name])

    return StepLowerer(graph, lanes, schedules or {})


def export_tvm_step(module, example_inputs, path, target=None, *, method: str, schedules=None) -> str:
    import tvm

    from ..api import CompiledModule
    from ..backends.tvm.build import lanes_for
    from ..backends.tvm.target import resolve_target
    from ..serving import ServingProgram
    from ..ir.dtypes import NUMPY_NAME as _NUMPY_DTYPE
    from .tvm_runtime import manifest_dim as _dim

    x, masks, _, squeeze = serving_example(example_inputs, method, "export_tvm")
    # prefill: the library holds the step on one position (with the sequence dim); the loader runs it over x's
    # positions, the caches staying TVM tensors between steps
    x4, m4 = trace_example(x, masks, method, squeeze)
    x_t = x[:, :1] if method == "prefill" else x
    compiled = CompiledModule(module, (x4, *m4), backend="eager")
    graph = compiled.graph
    prog = ServingProgram(graph)
    mask_idx = mask_inputs(prog, f"export_tvm(method={method!r})")
    prog.no_position_reads(f"export_tvm(method={method!r})")
    prog.check((x4, *m4), graph.params)  # the example the graph was traced on
    cache = prog.init_cache(int(x_t.shape[0]), device=torch.device("cpu"), max_len=0)
    target = resolve_target(target)
    lw = _step_lowerer(graph, prog, squeeze, cache, lanes_for(target), schedules, mask_idx)
    mod = lw.build()
    executable = tvm.compile(mod, target=target)
    os.makedirs(path, exist_ok=True)
    executable.export_library(os.path.join(path, "model.so"))
    params, arrays = [], {}
    for i, (name, v) in enumerate(graph.param_values.items()):
        t = graph.params[name]
        arrays[f"p{i}"] = t.detach().to("cpu").contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        params.append({"name": name, "key": f"p{i}", "dtype": _NUMPY_DTYPE[v.type.dtype.name],
                       "shape": [_dim(d) for d in v.type.shape]})
    np.savez(os.path.join(path, "weights.npz"), **arrays)
    xv = graph.inputs[0]
    x_shape = ["B"] + ([] if squeeze else [1]) + [_dim(d) for d in xv.type.shape[2:]]

    grown = "P+1" if method == "decode_step" else "P+T"
    if method == "prefill":
        x_shape[1] = "T"

    def cache_shape(key, grow):
        spec = next(s for specs in prog.states.values() for s in specs.values() if s.key == key)
        return ["B"] + [(grown if grow else "P") if (spec.seq is not None and i + 1 == spec.seq) else int(s)
                        for i, s in enumerate(cache[key].shape[1:])]

    x_name, y_name = ("x_t", "y_t") if method == "decode_step" else ("x", "y")
    y_names = [y_name] if len(graph.outputs) == 1 else [f"{y_name}_{i}" for i in range(len(graph.outputs))]
    y_seq = [] if squeeze else [1 if method == "decode_step" else "T"]
    manifest = {
        "format": FORMAT, "graph": f"{graph.name}_{method}", "library": "model.so", "weights": "weights.npz",
        "entry": "main", "method": method,
        "inputs": [{"name": x_name, "dtype": _NUMPY_DTYPE[xv.type.dtype.name], "shape": x_shape}] +
                  [{"name": mask_name(j, len(mask_idx), "_t" if method == "decode_step" else ""),
                    "dtype": _NUMPY_DTYPE[graph.inputs[i].type.dtype.name], "shape": x_shape[:len(x_shape) - len(
                        xv.type.shape[2:])]} for j, i in enumerate(mask_idx)] +
                  [{"name": k, "dtype": str(cache[k].dtype).replace("torch.", ""), "shape": cache_shape(k, False)}
                   for k in lw.order],
        "outputs": [{"name": n, "dtype": _NUMPY_DTYPE[y.type.dtype.name],
                     "shape": ["B"] + y_seq + [_dim(d) for d in y.type.shape[2:]]}
                    for n, y in zip(y_names, graph.outputs)] +
                   [{"name": k + ".new", "dtype": str(cache[k].dtype).replace("torch.", ""),
                     "shape": cache_shape(k, True)} for k in lw.order],
        "params": params, "target": str(target), "tvm_version": tvm.__version__,
        "torch_free_loader": "sessa_tvm_runtime.py", "guards": [str(g) for g in compiled._traced.guards],
    }
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "tvm_runtime.py"),
                    os.path.join(path, "sessa_tvm_runtime.py"))
    return str(path)
