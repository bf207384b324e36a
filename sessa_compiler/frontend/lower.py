"""Lower a torch.export ExportedProgram (functional ATen) to the IR, one aten node at a time.

One registry (``LOWERINGS``) maps aten targets to IR builders; any op without an entry becomes an
explicit ``fallback`` node that calls the same torch op, so anything export can trace compiles and
the user sees what fell back.
"""
from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import SessaCompilerError, TraceError
from ..ir.dtypes import from_torch, to_torch
from ..ir.graph import Graph, Value
from ..ir.ops import UNARY, ArgRef
from ..ir.types import DType, TensorType, folded_dim, format_dim, parse_dim, sym
from ..ir.verify import verify_graph

aten = torch.ops.aten
LOWERINGS: dict = {}
IDENTITY = set()


# A complex parameter or buffer X of the module is the graph parameter "X.as_real": torch.view_as_real(X), the
# real (..., 2) pairs the graph computes with. It is the module's state: whoever binds a graph's parameters
# (CompiledModule at every call, the compile cache) derives it from the module's live X with as_pairs (a view).
PAIR_SUFFIX = ".as_real"


def as_pairs(t):
    """A complex tensor as real (..., 2) pairs, a view sharing its storage (no copy); anything else as it is."""
    if isinstance(t, torch.Tensor) and t.is_complex():
        return torch.view_as_real(t.resolve_conj())
    return t


def pair_source(name: str, state_names) -> str | None:
    """The module's complex parameter or buffer a graph parameter ``name`` holds as pairs ("X.as_real" -> "X"),
    or None (``state_names``: the module's parameter and buffer names)."""
    if name.endswith(PAIR_SUFFIX) and name[:-len(PAIR_SUFFIX)] in state_names:
        return name[:-len(PAIR_SUFFIX)]
    return None


def lowering(*targets):
    def deco(fn):
        for t in targets:
            LOWERINGS[t] = fn
        return fn
    return deco


# keyword-argument values that are baked into the trace as constants (a call with others traces again)
CONSTANT_TYPES = (type(None), bool, int, float, str)


def _principal_hints(ep, kinds: dict) -> dict:
    """The example sizes the names B and T stand for: B the largest symbolic dim 0 of the tensor inputs, T the
    symbolic dim 1 of the first input of that batch (the ids of ``model(head_mask=..., input_ids=...)``, whose
    keywords come sorted, not the [layers, heads] head mask before them)."""
    rows = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and kinds[node.name].kind == torch.export.graph_signature.InputKind.USER_INPUT:
            fake = node.meta.get("val")
            if isinstance(fake, torch.Tensor):
                rows.append([s.node.hint if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol)
                             else None for s in fake.shape[:2]])
    batches = [r[0] for r in rows if r and r[0] is not None]
    if not batches:
        return {}
    b = max(batches)
    t = next((r[1] for r in rows if len(r) > 1 and r[0] == b and r[1] is not None), None)
    return {"B": b} if t is None else {"B": b, "T": t}


def _without_to_float(e):
    """A SymFloat's expression with torch's ToFloat (an integer size as a float) taken off: sympy computes with it
    as a number (1.0*T), which every backend evaluates at the call's sizes."""
    from torch.utils._sympy.functions import ToFloat

    return e.replace(lambda x: isinstance(x, ToFloat), lambda x: x.args[0] * sympy.Float(1.0))


class Lowerer:
    def __init__(self, ep: torch.export.ExportedProgram, dim_names: dict, name: str = "main"):
        self.ep = ep
        self.graph = Graph(name)
        self.env: dict = {}  # fx node -> Value | list[Value] | sympy expr
        self.sym_map: dict = {}  # export symbol -> our symbol
        self._hints: dict = {}   # "B" / "T" -> the example size the name stands for (_principal_hints)
        self.dim_names = dim_names  # (input index, dim) -> name
        self.notes: list = []  # ops recognised while lowering (e.g. SDPA), for explain()
        self.pairs: set = set()  # Values holding a complex tensor as real (..., 2) pairs (see _complex)
        self.none_outputs: list = []  # positions of the module's None outputs among export's output leaves
        self.constant_outputs: list = []  # (position, value): Python numbers and strings the module returns
        # per graph output: (the export node it is, the placeholder it is a view of or None): what the module's own
        # outputs may share storage with (Traced.output_sources)
        self.output_sources: list = []
        self.contiguous_outputs: list = []   # positions of outputs that are x.contiguous() (Traced.contiguous_outputs)
        self.assertions: list = []  # sympy conditions over our symbols: export's runtime guards on sizes
        self.shared: list = []  # groups of identical layers traced once (frontend/repeated.py), for explain()
        self.trainable: set = set()  # the graph's parameter Values (nn.Parameters: buffers are not)
        self._graded: dict = {}  # Value -> whether an input or a parameter is upstream (stop_gradient)

    # -- helpers -------------------------------------------------------------------------------
    def expr(self, s):
        """A SymInt / int / sympy expr from export -> a sympy expression over our symbols."""
        if isinstance(s, torch.SymFloat):   # a size as a float (T * 1.0, float(T)): torch's ToFloat(T) is T here
            s = _without_to_float(s.node.expr)
        if isinstance(s, torch.SymInt):
            s = s.node.expr
        if isinstance(s, sympy.Basic):
            unknown = [x for x in s.free_symbols if x not in self.sym_map]
            for x in unknown:  # a symbol no input dim names: give it a readable fresh name
                self.sym_map[x] = sym(f"S{len(self.sym_map)}")
            out = sympy.simplify(s.xreplace(self.sym_map))
            if any(not type(f).__module__.startswith("sympy") for f in sympy.preorder_traversal(out)):
                # torch's own sympy functions (FloorDiv, PythonMod, ...) become the IR's (floor, Mod, ...): the
                # expression written as text and read back, so every pass, backend and export sees one form
                out = sympy.simplify(parse_dim(format_dim(out)))
            out = folded_dim(out)   # a size that is one integer at every length (proved), that integer
            return out if isinstance(out, int) else int(out) if out.is_Integer else out
        return s

    def ttype(self, fake) -> TensorType:
        return TensorType(from_torch(fake.dtype), tuple(self.expr(d) for d in fake.shape))

    def arg(self, a):
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, (torch.SymInt, torch.SymFloat)):
            return self.expr(a)
        if isinstance(a, torch.dtype):
            return from_torch(a)
        return a

    def emit(self, op, inputs, attrs, node: fx.Node, types=None):
        val = node.meta.get("val")
        if types is None:
            types = [self.ttype(v) for v in val] if isinstance(val, (list, tuple)) else [self.ttype(val)]
        names = [self.graph.fresh_name(node.name if len(types) == 1 else f"{node.name}_{i}") for i in range(len(types))]
        n = self.graph.make_node(op, inputs, attrs, types, names=names)
        return n.outputs if (isinstance(val, (list, tuple)) and op in ("split", "fallback")) else n.outputs[0]

    def fallback(self, node: fx.Node):
        operands: list = []

        def to_template(a):
            if isinstance(a, fx.Node):
                v = self.env[a]
                if isinstance(v, Value):
                    operands.append(v)
                    return ArgRef(len(operands) - 1)
                if isinstance(v, list):
                    return [to_template_value(x) for x in v]
                return v  # symbolic scalar
            if isinstance(a, (list, tuple)):
                return type(a)(to_template(x) for x in a)
            if isinstance(a, torch.SymInt):
                return self.expr(a)
            if isinstance(a, torch.dtype):
                return from_torch(a)
            if isinstance(a, torch.device):
                return str(a)
            if isinstance(a, (torch.memory_format, torch.layout)):
                return None
            return a

        def to_template_value(v):
            operands.append(v)
            return ArgRef(len(operands) - 1)

        args = to_template(list(node.args))
        kwargs = {k: to_template(v) for k, v in node.kwargs.items()
                  if not isinstance(v, (torch.memory_format, torch.layout))}
        target = str(node.target)
        if not target.startswith(("aten.", "sessa_compiler.", "prims.")) and hasattr(node.target, "name"):
            target = node.target.name().replace("::", ".")
            target = target if "." in target.split(".", 1)[-1] else target + ".default"
        return self.emit("fallback", operands, {"target": target, "args": args, "kwargs": kwargs}, node)

    def _record_assertion(self, node: fx.Node) -> None:
        """export's deferred runtime assertion on sizes (e.g. Ne(T, 6) from `if x.shape[1] == 6` taken as
        false): the traced graph equals the module only where it holds."""
        cond = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else node.args[0]
        if isinstance(cond, torch.SymBool):
            expr = cond.node.expr
            if expr.free_symbols <= set(self.sym_map):
                self.assertions.append(expr.xreplace(self.sym_map))

    def _call(self, node: fx.Node) -> None:
        fn = LOWERINGS.get(node.target)
        if node.target is aten._assert_scalar.default:
            self._record_assertion(node)
            return
        if isinstance(node.meta.get("val"), torch.SymBool):
            return  # a size condition computed only for an assertion (recorded above)
        if node.target in ASSERTIONS or (not node.users and node.meta.get("val") is None):
            return  # export's metadata checks: nothing to compute
        before = len(self.graph.nodes)
        try:
            if self._complex_involved(node):
                self.env[node] = _complex(self, node)
            else:
                self._lower_call(node, fn)
        except SessaCompilerError:
            raise
        except Exception as e:  # a lowering that met an argument it does not expect: say which op and line
            raise TraceError(f"lowering {node.target} (%{node.name}{source_of(node)}) failed: "
                             f"{type(e).__name__}: {e}") from e
        where = source_of(node, bare=True)
        if where:
            for n in self.graph.nodes[before:]:
                for v in n.outputs:
                    self.graph.sources.setdefault(v.name, where)

    def _complex_involved(self, node: fx.Node) -> bool:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_complex:
            return True
        return any(isinstance(a, fx.Node) and isinstance(self.env.get(a), Value) and self.env[a] in self.pairs
                   for a in pytree.tree_leaves((node.args, node.kwargs)))

    def _lower_call(self, node: fx.Node, fn) -> None:
        if node.target in IDENTITY:
            self.env[node] = self.arg(node.args[0])
        elif fn is not None:
            before = len(self.graph.nodes)
            out = fn(self, node)
            if out is NotImplemented:
                del self.graph.nodes[before:]   # a lowering that gave up leaves nothing behind
                out = self.fallback(node)
            self.env[node] = out
        elif isinstance(node.target, torch._ops.OpOverload):
            self.env[node] = self.fallback(node)
        elif _hop_name(node.target) in ("wrap_with_set_grad_enabled", "wrap_with_autocast"):
            self.env[node] = self._inline(node)
        elif isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, int, float)):
            # Python size arithmetic (min/max, %, //, ...) on sizes: its value as an expression
            self.env[node] = self.expr(node.meta["val"])
        else:
            raise TraceError(f"cannot lower call to {node.target} ({node.name}{source_of(node)}); "
                             "only torch ops and symbolic size arithmetic are supported")

    def stop_gradient(self, x):
        """``x`` with no gradient: a detach node where an input or a parameter is upstream of x (a gradient could
        reach them through it), x itself where none is."""
        if not isinstance(x, Value) or not self._graded_value(x):
            return x
        return self.graph.make_node("detach", [x], {}, [x.type]).output

    def _graded_value(self, x: Value) -> bool:
        stack = [x]
        while stack:   # iterative post-order over producers not decided yet
            v = stack.pop()
            if v in self._graded:
                continue
            if v.kind == "input" or v in self.trainable:
                self._graded[v] = True
                continue
            if v.producer is None:
                self._graded[v] = False
                continue
            if v.producer.op == "detach":
                self._graded[v] = False
                continue
            pending = [u for u in v.producer.value_inputs if u not in self._graded]
            if pending:
                stack.append(v)
                stack.extend(pending)
                continue
            self._graded[v] = any(self._graded[u] for u in v.producer.value_inputs)
        return self._graded[x]

    def _inline(self, node: fx.Node):
        """A region torch.export wrapped in a higher-order op (``@torch.no_grad()`` code, autocast): its
        subgraph's nodes, lowered in place. A region that turns gradients off (``torch.no_grad()``, a
        spectral norm's power iteration) reads its operands through detach: nothing it computes carries a
        gradient, as in the module."""
        hop = _hop_name(node.target)
        n_flags = 1 if hop == "wrap_with_set_grad_enabled" else 4
        sub = self.env[node.args[n_flags]]
        operands = [self.arg(a) for a in node.args[n_flags + 1:]]
        if hop == "wrap_with_set_grad_enabled" and not node.args[0]:
            operands = [self.stop_gradient(v) for v in operands]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for p, v in zip(placeholders, operands):
            self.env[p] = v
        for n in sub.graph.nodes:
            if n.op == "call_function":
                self._call(n)
            elif n.op == "get_attr":
                self.env[n] = getattr(sub, n.target)
            elif n.op == "output":
                outs = n.args[0]
                return [self.arg(o) for o in outs] if isinstance(outs, (list, tuple)) else self.arg(outs)
        raise TraceError(f"the subgraph of {node.name} has no output")

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> Graph:
        ep = self.ep
        sig = ep.graph_signature
        kinds = {s.arg.name: s for s in sig.input_specs}
        state = ep.state_dict
        self._hints = _principal_hints(ep, kinds)
        user_index = 0
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                spec = kinds[node.name]
                fake = node.meta["val"]
                if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
                    if isinstance(fake, CONSTANT_TYPES):
                        self.env[node] = fake  # a constant keyword argument, baked in (a call with another re-traces)
                        continue
                    if not isinstance(fake, torch.Tensor):
                        raise TraceError(f"input {node.name}: only tensor inputs are supported, got {type(fake).__name__}")
                    for d, s in enumerate(fake.shape):
                        if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                            name = self.dim_names.get((user_index, d), f"D{user_index}_{d}")
                            if name in self._hints and s.node.expr not in self.sym_map \
                                    and s.node.hint != self._hints[name]:
                                # a second sequence length, of another size in the example (cross-attention's
                                # memory of S positions), or a dim 0 that is not the batch (GPT-2's head_mask
                                # [layers, heads]): a symbol of its own, else every call with S != T (or another
                                # batch) was refused. (Equal sizes stay one: the export keeps the symbols of a mask
                                # or of labels apart from the ids' although the code needs them equal)
                                name = f"{name}{user_index}"
                            elif name in ("B", "T") and name not in self._hints:
                                self._hints[name] = s.node.hint
                            # (a dim the export pinned to one size is named by that size: trace.py _lower)
                            self.sym_map.setdefault(s.node.expr,
                                                    sympy.Integer(name) if isinstance(name, int) else sym(name))
                    self.env[node] = self.graph.add_input(self.graph.fresh_name(node.name), self.ttype(fake))
                    user_index += 1
                else:
                    target = spec.target
                    data = state[target] if target in state else ep.constants[target]
                    if fake.dtype.is_complex:   # a complex buffer (a RoPE table): bound as real pairs, a view of
                        # the module's tensor (the compiled module rebinds it from the live buffer at every call)
                        data = as_pairs(data.detach())
                        v = self.graph.add_param(target + PAIR_SUFFIX, self.ttype(data), data)
                        self.pairs.add(v)
                        self.env[node] = v
                        continue
                    self.env[node] = self.graph.add_param(target, self.ttype(fake), data)
                    if spec.kind == torch.export.graph_signature.InputKind.PARAMETER:
                        self.trainable.add(self.env[node])
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "get_attr":
                self.env[node] = getattr(ep.graph_module, node.target)   # a higher-order op's subgraph
            elif node.op == "output":
                outs = node.args[0]
                n_user = sum(1 for s in sig.output_specs
                             if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT)
                if n_user != len(sig.output_specs):
                    kinds = {s.kind.name.lower().replace("_", " ") for s in sig.output_specs
                             if s.kind != torch.export.graph_signature.OutputKind.USER_OUTPUT}
                    buffers = [s.target for s in sig.output_specs
                               if s.kind == torch.export.graph_signature.OutputKind.BUFFER_MUTATION]
                    if buffers:
                        shown = ", ".join(f"'{b}'" for b in buffers[:4]) + (" ..." if len(buffers) > 4 else "")
                        norms = any(b.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                    for b in buffers)
                        raise TraceError(
                            f"the module updates its buffers {shown} in forward; that is not supported"
                            + (" (a BatchNorm in training mode updates its running statistics: compile the model "
                               "in eval mode, or use a norm without running statistics such as LayerNorm or "
                               "GroupNorm for training)" if norms else
                               ": compute new tensors and return them, or update the buffers outside forward"))
                    params = [s.target for s in sig.output_specs
                              if s.kind == torch.export.graph_signature.OutputKind.PARAMETER_MUTATION]
                    if params:
                        shown = ", ".join(f"'{p}'" for p in params[:4]) + (" ..." if len(params) > 4 else "")
                        raise TraceError(
                            f"the module changes its parameters {shown} in forward; that is not supported (e.g. an "
                            "nn.Embedding with max_norm renormalises the rows it looks up in place: compile it "
                            "without max_norm, or renormalise the weight outside forward)")
                    raise TraceError(f"the module mutates tensors in forward ({', '.join(sorted(kinds))}: an "
                                     "in-place op on an input or a buffer); that is not supported: compute a new "
                                     "tensor instead (x = x + 1, not x.add_(1))")
                for i, o in enumerate(outs):
                    if o is None:   # a None field of an output dataclass or tuple: no graph output
                        self.none_outputs.append(i)
                        continue
                    if isinstance(o, (bool, int, float, str)):   # a Python constant returned beside the tensors
                        self.constant_outputs.append((i, o))
                        continue
                    v = self.env[o]
                    if not isinstance(v, Value):
                        if isinstance(v, (int, sympy.Basic)):
                            raise TraceError(f"output {i} is a size of the inputs ({v}): a compiled module returns "
                                             "tensors and Python constants; take sizes from the inputs outside "
                                             "forward (or return them as tensors)")
                        raise TraceError(f"output {o} is not a tensor")
                    if v in self.pairs:
                        raise TraceError(f"output {o}{source_of(o)} is a complex tensor; return "
                                         "torch.view_as_real(...) of it (the compiled graph computes in real pairs)")
                    self.graph.outputs.append(v)
                    if _call_name(o) == "contiguous" and o.args and hasattr(o.args[0], "op"):
                        # x.contiguous() returned: a new tensor where x is not contiguous, x itself where it is (the
                        # IR drops the op; the compiled call applies it to this output: Traced.contiguous_outputs)
                        self.contiguous_outputs.append(len(self.graph.outputs) - 1)
                        self.output_sources.append((o.name, _view_root(o.args[0])))
                    else:
                        self.output_sources.append((o.name, _view_root(o)))
            else:
                raise TraceError(f"unexpected fx node kind {node.op} ({node.name})")
        self.graph.dead_code_elimination()
        verify_graph(self.graph)
        return self.graph


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "permute", "t", "unsqueeze",
             "squeeze", "expand", "alias", "detach", "as_strided", "unflatten", "flatten", "narrow", "split",
             "chunk", "unbind", "view_as", "diagonal", "expand_as", "movedim", "lift_fresh_copy"}
# (not contiguous: a copy where its input is not contiguous, which depends on the call's strides; a chain through one
# counts as a new tensor, copied where the graph's value is an input's or a weight's)


def _call_name(o) -> str:
    return getattr(o.target, "__name__", str(o.target)).split(".")[0] if o.op == "call_function" else ""


def _view_root(o) -> str | None:
    """The placeholder (input, parameter or buffer) an export node is a view of, through view ops; None when
    it is a new tensor (clone, arithmetic, ...)."""
    seen = 0
    while o is not None and seen < 64:
        seen += 1
        if o.op == "placeholder":
            return o.name
        if o.op != "call_function":
            return None
        name = getattr(o.target, "__name__", str(o.target)).split(".")[0]
        if name == "getitem" and o.args and getattr(o.args[0], "op", None) == "call_function":
            o = o.args[0]
            continue
        if name not in _VIEW_OPS or not o.args or not hasattr(o.args[0], "op"):
            return None
        o = o.args[0]
    return None


def _hop_name(target) -> str:
    return getattr(target, "__name__", "") or getattr(target, "_name", "")


def source_of(node: fx.Node, bare: bool = False) -> str:
    """', at file:line (`code`)' for the user's source line an fx node came from (the last frame of its
    stack trace outside torch and the compiler), or ''; with bare, just 'file:line (`code`)'."""
    text = node.meta.get("stack_trace") or ""
    import re

    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', text)
    for path, line, fn, code in reversed(frames):
        if "/torch/" in path or "/sessa_compiler/" in path:
            continue
        where = f"{path}:{line} in {fn} (`{code.strip()}`)"
        return where if bare else f", at {where}"
    return ""


# -- symbolic sizes -----------------------------------------------------------------------------
@lowering(aten.sym_size.int, aten.sym_numel.default)
def _sym_size(L, node):
    return L.expr(node.meta["val"])


for _op, _fn in {operator.mul: operator.mul, operator.add: operator.add, operator.sub: operator.sub,
                 operator.floordiv: operator.floordiv, operator.neg: operator.neg}.items():
    LOWERINGS[_op] = (lambda f: lambda L, node: L.expr(node.meta["val"]) if isinstance(node.meta.get("val"), torch.SymInt)
                      else f(*L.arg(node.args)))(_fn)


@lowering(operator.getitem)
def _getitem(L, node):
    seq = L.arg(node.args[0])
    return seq[node.args[1]]


ASSERTIONS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}

# -- identities ---------------------------------------------------------------------------------------
IDENTITY.update({aten.clone.default, aten.contiguous.default, aten.alias.default, aten.lift_fresh_copy.default})


@lowering(aten.detach.default)
def _detach(L, node):
    """x.detach(): the IR's detach (the value, no gradient) where a gradient could reach x (an input or a
    parameter is upstream), the value itself elsewhere (buffers and constants never carry one)."""
    return L.stop_gradient(L.arg(node.args[0]))


@lowering(aten.dropout.default)
def _dropout(L, node):
    """Identity in eval mode (train=False) or at p = 0; in training mode it stays torch's dropout (a
    fallback every backend runs, drawing from torch's generator), never silently removed."""
    p, train = (list(node.args) + [0.0, False])[1:3]
    if not train or p == 0:
        return L.arg(node.args[0])
    return NotImplemented


def simple(op, n_tensor, attrs=lambda node: {}):
    def fn(L, node):
        inputs = [L.arg(a) for a in node.args[:n_tensor]]
        return L.emit(op, inputs, attrs(node), node)
    return fn


# -- compute -------------------------------------------------------------------------------------------
@lowering(aten.linear.default)
def _linear(L, node):
    return L.emit("linear", [L.arg(a) for a in node.args[:3]], {}, node)


for _t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
    LOWERINGS[_t] = simple("matmul", 2)


@lowering(aten.baddbmm.default)
def _baddbmm(L, node):
    """baddbmm(bias, b1, b2, beta, alpha) = beta * bias + alpha * (b1 @ b2); beta = 0 ignores bias (NaN included)."""
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in (beta, alpha)):
        return NotImplemented
    bias, b1, b2 = (L.arg(a) for a in node.args[:3])
    out_t = L.ttype(node.meta["val"])
    if not all(x.type.dtype == out_t.dtype for x in (bias, b1, b2)):
        return NotImplemented
    g = L.graph
    prod = g.make_node("matmul", [b1, b2], {}, [out_t]).output
    if alpha != 1:
        prod = g.make_node("mul", [prod, float(alpha)], {}, [out_t]).output
    if beta == 0:
        return prod
    if beta != 1:
        bias = g.make_node("mul", [bias, float(beta)], {}, [TensorType(out_t.dtype, bias.type.shape)]).output
    return L.emit("add", [bias, prod], {}, node)


@lowering(aten.einsum.default)
def _einsum(L, node):
    eq, ops = node.args[0], L.arg(node.args[1])
    return L.emit("einsum", list(ops), {"equation": eq.replace(" ", "")}, node)


@lowering(aten.outer.default)
def _outer(L, node):
    # torch.outer promotes mixed dtypes (an f32 arange times an f64 buffer is f64); the IR's einsum does not
    want = from_torch(node.meta["val"].dtype)
    ins = []
    for a in node.args[:2]:
        x = L.arg(a)
        if x.type.dtype != want:
            x = L.graph.make_node("cast", [x], {"dtype": want}, [TensorType(want, x.type.shape)]).output
        ins.append(x)
    return L.emit("einsum", ins, {"equation": "i,j->ij"}, node)


@lowering(aten.layer_norm.default)
def _layer_norm(L, node):
    a = list(node.args) + [None] * (5 - len(node.args))
    eps = node.kwargs.get("eps", a[4] if a[4] is not None else 1e-5)
    inputs = [L.arg(a[0]), L.arg(a[2]), L.arg(a[3])]
    # a normalised dim that is a size of the input (``x.shape[1:]``, T among them) comes as a sym_size node
    shape = [L.expr(s.meta["val"] if isinstance(s, fx.Node) else s) for s in a[1]]
    return L.emit("layer_norm", inputs, {"normalized_shape": shape, "eps": float(eps)}, node)


@lowering(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(L, node):
    x = L.arg(node.args[0])
    op = "log_softmax" if "log_softmax" in str(node.target) else "softmax"
    want = node.meta["val"].dtype
    if x.type.dtype != from_torch(want):
        x = L.graph.make_node("cast", [x], {"dtype": from_torch(want)},
                              [TensorType(from_torch(want), x.type.shape)]).output
    return L.emit(op, [x], {"dim": node.args[1]}, node)


@lowering(aten.embedding.default)
def _embedding(L, node):
    if len(node.args) > 2 and node.args[2] not in (-1, None) or any(node.args[3:]):
        return NotImplemented
    return L.emit("embedding", [L.arg(node.args[0]), L.arg(node.args[1])], {}, node)


@lowering(aten.conv1d.default)
def _conv1d(L, node):
    a = list(node.args) + [None] * (7 - len(node.args))
    if isinstance(a[4], str):
        return NotImplemented
    attrs = {"stride": list(a[3] or [1]), "padding": list(a[4] or [0]), "dilation": list(a[5] or [1]),
             "groups": a[6] or 1}
    return L.emit("conv1d", [L.arg(a[0]), L.arg(a[1]), L.arg(a[2])], attrs, node)


@lowering(aten.scaled_dot_product_attention.default)
def _sdpa(L, node):
    """SDPA on (B, H, T, d) -> attention on (B, T, H, d): causal, no mask, no dropout only."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("attn_mask") is not None and not a.get("dropout_p", 0.0) and not a.get("is_causal", False):
        return _sdpa_masked(L, node, a)
    if a.get("attn_mask") is not None or a.get("dropout_p", 0.0) or not a.get("is_causal", False):
        return NotImplemented
    q, k, v = (L.arg(a[n]) for n in ("query", "key", "value"))
    if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
        return NotImplemented
    Hq, Hk = q.type.shape[1], k.type.shape[1]
    if not (isinstance(Hq, int) and isinstance(Hk, int)) or (Hq != Hk and not a.get("enable_gqa", False)):
        return NotImplemented
    if q.type.shape[2] != k.type.shape[2]:   # more keys than queries (a memory, a prefix): causal is top-left then
        return NotImplemented
    d = q.type.shape[3]
    scale = a.get("scale") or 1.0 / math.sqrt(d)

    def bthd(x):
        s = x.type.shape
        return L.graph.make_node("transpose", [x], {"dim0": 1, "dim1": 2},
                                 [TensorType(x.type.dtype, (s[0], s[2], s[1], s[3]))]).output

    qt, kt, vt = bthd(q), bthd(k), bthd(v)
    out_t = TensorType(q.type.dtype, qt.type.shape[:3] + (v.type.shape[3],))
    o = L.graph.make_node("attention", [qt, kt, vt], {"scale": float(scale), "causal": True}, [out_t]).output
    L.notes.append(f"attention from scaled_dot_product_attention %{node.name}: heads={Hq}, kv_heads={Hk}, "
                   f"scale={scale:.6g}")
    return L.emit("transpose", [o], {"dim0": 1, "dim1": 2}, node)


def _sdpa_masked(L, node, a):
    """SDPA with an explicit mask, as the ops torch's math kernel runs: softmax(q k^T * scale, masked) @ v, where a
    boolean mask keeps True and an additive one is added; a row the mask removes entirely is 0 (torch's safe
    softmax). Whether the mask is causal is left to the attention recogniser's probes."""
    q, k, v, mask = (L.arg(a[n]) for n in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(x, Value) for x in (q, k, v, mask)) or min(q.type.rank, k.type.rank, v.type.rank) < 2:
        return NotImplemented
    dt = q.type.dtype
    if k.type.dtype != dt or v.type.dtype != dt or not (mask.type.dtype.name == "bool" or mask.type.dtype == dt):
        return NotImplemented
    g = L.graph
    if a.get("enable_gqa", False) and q.type.rank >= 3 and k.type.shape[-3] != q.type.shape[-3]:
        Hq, Hk = q.type.shape[-3], k.type.shape[-3]
        if not (isinstance(Hq, int) and isinstance(Hk, int)) or Hq % Hk:
            return NotImplemented

        def rep(x):
            s = x.type.shape
            t = TensorType(dt, s[:-3] + (Hq,) + s[-2:])
            return g.make_node("repeat_interleave", [x], {"repeats": Hq // Hk, "dim": -3}, [t]).output

        k, v = rep(k), rep(v)
    d = q.type.shape[-1]
    if not isinstance(d, int):
        return NotImplemented
    scale = a.get("scale") or 1.0 / math.sqrt(d)
    ks = k.type.shape
    kt = g.make_node("transpose", [k], {"dim0": -2, "dim1": -1}, [TensorType(dt, ks[:-2] + (ks[-1], ks[-2]))]).output
    st = L.ttype(node.meta["val"])
    lead = st.shape[:-2]
    lt = TensorType(dt, lead + (q.type.shape[-2], ks[-2]))
    x = g.make_node("matmul", [q, kt], {}, [lt]).output
    x = g.make_node("mul", [x, float(scale)], {}, [lt]).output
    mlt = TensorType(dt, mask.type.shape)
    if mask.type.dtype.name == "bool":
        x = g.make_node("where", [mask, x, -math.inf], {}, [lt]).output
        mf = g.make_node("cast", [mask], {"dtype": dt}, [mlt]).output
        empty_at = 0.0
    else:
        x = g.make_node("add", [x, mask], {}, [lt]).output
        mf, empty_at = mask, -math.inf
    rt = TensorType(dt, mask.type.shape[:-1] + (1,))
    top = g.make_node("amax", [mf], {"dims": [-1], "keepdim": True}, [rt]).output
    empty = g.make_node("eq", [top, empty_at], {}, [TensorType(DType("bool"), rt.shape)]).output
    if mask.type.dtype.name != "bool":
        # a row an additive mask removes entirely (all -inf) is softmaxed as zeros, not -inf: its probabilities
        # (NaN) are replaced by 0 below either way, but the backward of a NaN softmax row is NaN, which the
        # where's zero gradient does not cancel (NaN * 0): the module's gradient there is 0 (a boolean mask's
        # where(mask, x, -inf) gives the scores no gradient already)
        x = g.make_node("where", [empty, 0.0, x], {}, [lt]).output
    x = g.make_node("softmax", [x], {"dim": -1}, [lt]).output
    x = g.make_node("where", [empty, 0.0, x], {}, [lt]).output
    return L.emit("matmul", [x, v], {}, node)


# -- elementwise --------------------------------------------------------------------------------------
for _name in UNARY:   # gelu and softplus carry attributes: their lowerings below replace these
    if hasattr(aten, _name):   # an IR op whose aten name differs gets its own lowering below
        LOWERINGS[getattr(aten, _name).default] = simple(_name, 1)
# torch.sgn of a real tensor is torch.sign (NaN -> 0); complex inputs keep the fallback
LOWERINGS[aten.sgn.default] = lambda L, node: (
    NotImplemented if node.meta["val"].dtype.is_complex else L.emit("sign", [L.arg(node.args[0])], {}, node))
LOWERINGS[aten.bitwise_not.default] = lambda L, node: (
    L.emit("logical_not", [L.arg(node.args[0])], {}, node) if node.meta["val"].dtype == torch.bool else NotImplemented)
for _t, _name in ((aten.bitwise_and.Tensor, "logical_and"), (aten.__and__.Tensor, "logical_and"),
                  (aten.bitwise_or.Tensor, "logical_or"), (aten.__or__.Tensor, "logical_or")):
    LOWERINGS[_t] = (lambda name: lambda L, node: L.emit(name, [L.arg(a) for a in node.args[:2]], {}, node)
                     if node.meta["val"].dtype == torch.bool and len(node.args) == 2 else NotImplemented)(_name)
LOWERINGS[aten.gelu.default] = lambda L, node: L.emit(
    "gelu", [L.arg(node.args[0])], {"approximate": node.kwargs.get("approximate", "none")}, node)
LOWERINGS[aten.softplus.default] = lambda L, node: L.emit(
    "softplus", [L.arg(node.args[0])], {"beta": L.arg(node.args[1]) if len(node.args) > 1 else 1,
                                        "threshold": L.arg(node.args[2]) if len(node.args) > 2 else 20}, node)


def _binary(op):
    def fn(L, node):
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None or len(node.args) > 2:
            return NotImplemented
        return L.emit(op, [L.arg(a) for a in node.args[:2]], {}, node)
    return fn


for _name in ("add", "sub", "mul", "div", "eq", "ne", "lt", "le", "gt", "ge"):
    for _ov in ("Tensor", "Scalar"):
        if hasattr(getattr(aten, _name), _ov):
            LOWERINGS[getattr(getattr(aten, _name), _ov)] = _binary(_name)
for _t, _name in ((aten.pow.Tensor_Scalar, "pow"), (aten.pow.Tensor_Tensor, "pow"), (aten.pow.Scalar, "pow"),
                  (aten.maximum.default, "maximum"),
                  (aten.minimum.default, "minimum"), (aten.max.other, "maximum"), (aten.min.other, "minimum"),
                  (aten.logical_and.default, "logical_and"),
                  (aten.logical_or.default, "logical_or")):
    LOWERINGS[_t] = _binary(_name)
LOWERINGS[aten.rsub.Scalar] = lambda L, node: NotImplemented if len(node.args) > 2 else L.emit(
    "sub", [L.arg(node.args[1]), L.arg(node.args[0])], {}, node)
for _ov in ("self", "ScalarOther", "ScalarSelf", "Scalar"):
    LOWERINGS[getattr(aten.where, _ov)] = simple("where", 3)


def _clamp(L, node):
    """clamp(x, min, max) = minimum(maximum(x, min), max); either bound may be None (clamp_min/clamp_max)."""
    x = node.args[0]
    if node.target in (aten.clamp_min.default, aten.clamp_min.Tensor):
        lo, hi = node.args[1], None
    elif node.target in (aten.clamp_max.default, aten.clamp_max.Tensor):
        lo, hi = None, node.args[1]
    else:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if node.meta["val"].dtype != x.meta["val"].dtype or (lo is None and hi is None):
        return NotImplemented   # a bound that promotes the dtype (an int tensor clamped by a float) stays a fallback
    return _between(L, L.arg(x), None if lo is None else L.arg(lo), None if hi is None else L.arg(hi))


def _between(L, y: Value, lo, hi) -> Value:
    """minimum(maximum(y, lo), hi), skipping a bound that is None; a bound is a literal or a (broadcast) Value."""
    for op, bound in (("maximum", lo), ("minimum", hi)):
        if bound is not None:
            shape = _bshape(y.type.shape, bound.type.shape) if isinstance(bound, Value) else y.type.shape
            y = L.graph.make_node(op, [y, bound], {}, [TensorType(y.type.dtype, shape)]).output
    return y


for _t in (aten.clip.default, aten.clip.Tensor, aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default,
           aten.clamp_min.Tensor, aten.clamp_max.default, aten.clamp_max.Tensor):
    LOWERINGS[_t] = _clamp
LOWERINGS[aten.mT.default] = lambda L, node: L.emit("transpose", [L.arg(node.args[0])], {"dim0": -2, "dim1": -1}, node)
LOWERINGS[aten.masked_fill.Scalar] = simple("masked_fill", 3)
LOWERINGS[aten.masked_fill.Tensor] = simple("masked_fill", 3)
LOWERINGS[aten.tril.default] = lambda L, node: L.emit("tril", [L.arg(node.args[0])],
                                                      {"diagonal": node.args[1] if len(node.args) > 1 else 0}, node)
LOWERINGS[aten.triu.default] = lambda L, node: L.emit("triu", [L.arg(node.args[0])],
                                                      {"diagonal": node.args[1] if len(node.args) > 1 else 0}, node)


@lowering(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default)
def _cast(L, node):
    x = L.arg(node.args[0])
    want = from_torch(node.meta["val"].dtype)
    if node.meta["val"].device != torch.device("meta") and "device" in node.kwargs and \
            node.kwargs["device"] is not None and node.kwargs["device"] != node.args[0].meta["val"].device:
        return NotImplemented
    if want == x.type.dtype:
        return x
    return L.emit("cast", [x], {"dtype": want}, node)


# -- layout ------------------------------------------------------------------------------------------
@lowering(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(L, node):
    shape = [L.expr(d) for d in node.meta["val"].shape]
    return L.emit("reshape", [L.arg(node.args[0])], {"shape": shape}, node)


LOWERINGS[aten.flatten.using_ints] = _reshape
LOWERINGS[aten.unflatten.int] = _reshape
LOWERINGS[aten.view_as.default] = _reshape
@lowering(aten.movedim.int, aten.movedim.intlist)
def _movedim(L, node):
    """x.movedim(source, destination): the permutation that puts each source dim at its destination, the other
    dims in their order."""
    x = L.arg(node.args[0])
    rank = x.type.rank
    src, dst = node.args[1], node.args[2]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src, dst = [d % max(rank, 1) for d in src], [d % max(rank, 1) for d in dst]
    rest = iter(d for d in range(rank) if d not in src)
    at = dict(zip(dst, src))
    perm = [at[i] if i in at else next(rest) for i in range(rank)]
    return L.emit("permute", [x], {"dims": perm}, node)


LOWERINGS[aten.permute.default] = lambda L, node: L.emit("permute", [L.arg(node.args[0])], {"dims": list(node.args[1])}, node)
LOWERINGS[aten.transpose.int] = lambda L, node: L.emit("transpose", [L.arg(node.args[0])],
                                                       {"dim0": node.args[1], "dim1": node.args[2]}, node)
LOWERINGS[aten.t.default] = lambda L, node: L.emit("transpose", [L.arg(node.args[0])], {"dim0": 0, "dim1": -1}, node)
LOWERINGS[aten.unsqueeze.default] = lambda L, node: L.emit("unsqueeze", [L.arg(node.args[0])], {"dim": node.args[1]}, node)


@lowering(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(L, node):
    x = L.arg(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else list(range(x.type.rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return L.emit("squeeze", [x], {"dims": dims}, node)


@lowering(aten.copy.default)
def _copy(L, node):
    """``copy(dst, src)`` (functionalisation's form of ``dst.copy_(src)``, ``o[:, t] = h``): src cast to dst's dtype
    and broadcast to its shape; dst's values are not read. (As a torch fallback it had no autograd formula.)"""
    if node.kwargs.get("non_blocking"):
        return NotImplemented
    src, out_t = L.arg(node.args[1]), L.ttype(node.meta["val"])
    if not isinstance(src, Value):
        return NotImplemented
    if src.type.dtype != out_t.dtype:
        src = L.graph.make_node("cast", [src], {"dtype": out_t.dtype}, [TensorType(out_t.dtype, src.type.shape)]).output
    if src.type.same_as(out_t):
        return src
    return L.emit("expand", [src], {"shape": list(out_t.shape)}, node)


@lowering(aten.expand.default, aten.expand_as.default)
def _expand(L, node):
    return L.emit("expand", [L.arg(node.args[0])], {"shape": [L.expr(d) for d in node.meta["val"].shape]}, node)


@lowering(aten.slice.Tensor)
def _slice(L, node):
    a = list(node.args) + [None] * (5 - len(node.args))
    attrs = {"dim": a[1] if a[1] is not None else 0, "start": L.arg(a[2]) if a[2] is not None else 0,
             "end": L.arg(a[3]) if a[3] is not None else 2**63 - 1, "step": a[4] if a[4] is not None else 1}
    x = L.arg(a[0])
    # a symbolic bound that is negative for every size (x[..., -T:]) counts from the end, as an int one does:
    # written as size + bound, so no backend has to know the sign of an expression
    size = x.type.shape[attrs["dim"] % x.type.rank]
    for k in ("start", "end"):
        b = attrs[k]
        if isinstance(b, sympy.Basic) and not b.is_Integer and b.is_negative:
            attrs[k] = sympy.simplify(size + b)
    out_t = L.ttype(node.meta["val"])
    if attrs["start"] == 0 and attrs["step"] == 1 and out_t.same_as(x.type):
        return x  # a full slice is the identity
    return L.emit("slice", [x], attrs, node)


LOWERINGS[aten.select.int] = lambda L, node: L.emit("select", [L.arg(node.args[0])],
                                                    {"dim": node.args[1], "index": L.arg(node.args[2])}, node)


@lowering(aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.unbind.int)
def _split(L, node):
    x = L.arg(node.args[0])
    outs = node.meta["val"]
    dim = node.args[2] if len(node.args) > 2 else (node.args[1] if node.target == aten.unbind.int and len(node.args) > 1 else 0)
    if node.target == aten.unbind.int:
        dim = node.args[1] if len(node.args) > 1 else 0
    d = dim % x.type.rank
    sizes = [L.expr(o.shape[d]) if node.target != aten.unbind.int else 1 for o in outs]
    types = [TensorType(x.type.dtype, x.type.shape[:d] + (s,) + x.type.shape[d + 1:]) for s in sizes]
    parts = L.emit("split", [x], {"sizes": sizes, "dim": dim}, node, types=types)
    parts = parts if isinstance(parts, list) else [parts]
    if node.target == aten.unbind.int:
        parts = [L.graph.make_node("squeeze", [p], {"dims": [d]}, [L.ttype(o)]).output for p, o in zip(parts, outs)]
    return parts


@lowering(aten.cat.default)
def _cat(L, node):
    """torch.cat skips 1-D empty operands whatever the others' rank (its legacy rule: Hugging Face's DynamicCache
    starts from ``torch.tensor([])`` and concatenates the keys to it on dim -2); the IR's concat does not."""
    parts = list(L.arg(node.args[0]))
    kept = [p for p in parts if not (isinstance(p, Value) and p.type.shape == (0,))]
    if not kept or all(isinstance(p, Value) and p.type.rank == 1 for p in kept):
        kept = parts   # (all 1-D: an ordinary concatenation)
    return L.emit("concat", kept, {"dim": node.args[1] if len(node.args) > 1 else 0}, node)
LOWERINGS[aten.stack.default] = lambda L, node: L.emit(
    "stack", list(L.arg(node.args[0])), {"dim": node.args[1] if len(node.args) > 1 else 0}, node)


@lowering(aten.repeat_interleave.self_int)
def _repeat_interleave(L, node):
    if len(node.args) < 3 or node.args[2] is None or not isinstance(node.args[1], int):
        return NotImplemented
    return L.emit("repeat_interleave", [L.arg(node.args[0])], {"repeats": node.args[1], "dim": node.args[2]}, node)


# -- reductions -------------------------------------------------------------------------------------------
def _reduce(op):
    def fn(L, node):
        if node.kwargs.get("dtype") is not None:
            return NotImplemented
        dims = node.args[1] if len(node.args) > 1 else None
        dims = [dims] if isinstance(dims, int) else (list(dims) if dims else None)
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return L.emit(op, [L.arg(node.args[0])], {"dims": dims, "keepdim": bool(keep)}, node)
    return fn


LOWERINGS[aten.sum.dim_IntList] = _reduce("sum")
LOWERINGS[aten.mean.dim] = _reduce("mean")
LOWERINGS[aten.amax.default] = _reduce("amax")
LOWERINGS[aten.sum.default] = _reduce("sum")     # x.sum(): every dim
LOWERINGS[aten.mean.default] = _reduce("mean")


@lowering(aten.max.dim)
def _max_dim(L, node):
    """max(x, dim, keepdim) -> (values, indices): the values are amax; used indices keep torch's op."""
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return NotImplemented
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    val = node.meta["val"][0]
    out = L.graph.make_node("amax", [L.arg(node.args[0])], {"dims": [node.args[1]], "keepdim": bool(keep)},
                            [L.ttype(val)], names=[L.graph.fresh_name(node.name)]).output
    return [out, None]


# -- factories ------------------------------------------------------------------------------------------
def _factory_dtype(node):
    return from_torch(node.meta["val"].dtype)


@lowering(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(L, node):
    a = [L.arg(x) for x in node.args]
    start, end, step = (0, a[0], 1) if len(a) == 1 else (a[0], a[1], a[2] if len(a) > 2 else 1)
    return L.emit("arange", [], {"start": start, "end": end, "step": step, "dtype": _factory_dtype(node)}, node)


@lowering(aten.ones.default, aten.zeros.default, aten.full.default, aten.new_ones.default, aten.new_zeros.default,
          aten.new_full.default)
def _full(L, node):
    name = node.target.__name__.split(".")[0]
    if name == "full":
        value = L.arg(node.args[1])
    elif name == "new_full":
        value = L.arg(node.args[2])
    else:
        value = 1 if "ones" in name else 0
    if isinstance(value, Value):
        return NotImplemented
    shape = [L.expr(d) for d in node.meta["val"].shape]
    dt = _factory_dtype(node)
    if not (isinstance(value, sympy.Basic) and value.free_symbols):   # (a size, such as T, stays symbolic)
        value = bool(value) if dt.name == "bool" else (float(value) if dt.is_float else value)
    return L.emit("full", [], {"shape": shape, "value": value, "dtype": dt}, node)


@lowering(aten.eye.default)
def _eye(L, node):
    return L.emit("eye", [], {"n": L.arg(node.args[0]), "dtype": _factory_dtype(node)}, node)


# -- Sessa's own custom ops --------------------------------------------------------------------------------
def register_custom_lowerings():
    """The reference Mamba layer calls sessa_compiler::selective_scan: it is the IR's scan op."""
    ns = getattr(torch.ops, "sessa_compiler", None)
    if ns is not None and hasattr(ns, "selective_scan"):
        def _scan(L, node):
            out = simple("scan", 6)(L, node)
            L.notes.append(f"scan from sessa_compiler::selective_scan %{node.name}: d_inner={out.type.shape[2]}, "
                           f"d_state={L.arg(node.args[2]).type.shape[1]}")
            return out

        LOWERINGS[ns.selective_scan.default] = _scan
    if ns is not None and hasattr(ns, "feedback"):
        def _feedback(L, node):
            """sessa_compiler::feedback(f, q_b, k_b, gamma, scale) is the IR's feedback op by definition."""
            scale = L.arg(node.args[4]) if len(node.args) > 4 else node.kwargs.get("scale")
            if not isinstance(scale, (int, float)):
                return NotImplemented   # a traced scale: keep the call as a fallback op
            out = L.emit("feedback", [L.arg(a) for a in node.args[:4]], {"scale": float(scale)}, node)
            L.notes.append(f"feedback from sessa_compiler::feedback %{node.name}: width={out.type.shape[2]}")
            return out

        LOWERINGS[ns.feedback.default] = _feedback
    if ns is not None and hasattr(ns, "attention"):
        def _attention(L, node):
            """sessa_compiler::attention(q, k, v, inv_freq, scale, causal) is the IR's attention op by definition
            (what an exported program of a compiled module, or torch.compile of one, calls)."""
            args = list(node.args) + [None] * (6 - len(node.args))
            q, k, v, inv_freq, scale, causal = [node.kwargs.get(n, a) for n, a in
                                                zip(("q", "k", "v", "inv_freq", "scale", "causal"), args)]
            scale, causal = L.arg(scale), L.arg(causal)
            if not isinstance(scale, (int, float)) or not isinstance(causal, bool):
                return NotImplemented   # a traced scale: keep the call as a fallback op
            operands = [L.arg(q), L.arg(k), L.arg(v)] + ([L.arg(inv_freq)] if inv_freq is not None else [])
            out = L.emit("attention", operands, {"scale": float(scale), "causal": causal,
                                                 "rope": inv_freq is not None}, node)
            L.notes.append(f"attention from sessa_compiler::attention %{node.name}")
            return out

        LOWERINGS[ns.attention.default] = _attention


# -- aten ops spelled with the IR's ordinary ops (every backend and export gains them at once) ---------------
class _Build:
    """Small helpers for lowerings that emit several IR nodes."""

    def __init__(self, L):
        self.L, self.g = L, L.graph

    def op(self, op, inputs, attrs, dtype, shape):
        return self.g.make_node(op, inputs, attrs, [TensorType(dtype, tuple(shape))]).output

    def cast(self, x, dtype):
        return x if x.type.dtype == dtype else self.op("cast", [x], {"dtype": dtype}, dtype, x.type.shape)


def _numel(shape):
    out = 1
    for d in shape:
        out = out * d
    return out if isinstance(out, int) else sympy.simplify(out)


def _bshape(*shapes):
    """The broadcast of shapes (a dim of 1 takes the other's)."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        dims = [d for d in dims if not (isinstance(d, int) and d == 1)] or [1]
        out.append(dims[0])
    return tuple(out)


LOWERINGS[aten.addmm.default] = _baddbmm   # addmm(bias, m1, m2, beta, alpha) = beta * bias + alpha * (m1 @ m2)


@lowering(aten.to.device)
def _to_device(L, node):
    """x.to(device, dtype): a cast (or nothing) when the device is the one x is on already."""
    x = L.arg(node.args[0])
    dev = node.args[1] if len(node.args) > 1 else node.kwargs.get("device")
    if dev is not None and torch.device(dev) != node.args[0].meta["val"].device:
        return NotImplemented
    want = from_torch(node.meta["val"].dtype)
    return x if want == x.type.dtype else L.emit("cast", [x], {"dtype": want}, node)


def _nll(L, node, logp, target, ignore_index, reduction, weight=None, smoothing=0.0):
    """-w[t] logp[n, t, ...] with t = target[n, ...] (classes along dim 1: (N, C) or (N, C, d1, ...) with a
    (N, d1, ...) target; w the class weights, or 1) where the target is not ignore_index; with label smoothing s,
    (1 - s) times that plus s / C times -sum_c w[c] logp[n, c, ...] (torch's cross_entropy). Reduced as torch
    does: none (the target's shape), sum, or mean: the sum over the weight of the kept targets (their count
    without weights; NaN when every target is ignored, like torch)."""
    b = _Build(L)
    if logp.type.rank < 2 or target.type.rank != logp.type.rank - 1 or not target.type.dtype.name.startswith("i") \
            or reduction not in (0, 1, 2) or not logp.type.dtype.is_float:
        return NotImplemented
    shape = tuple(logp.type.shape)
    C, tshape, k = shape[1], tuple(target.type.shape), logp.type.rank - 2
    if weight is not None and (weight.type.rank != 1 or not isinstance(C, int)):
        return NotImplemented
    if smoothing and not isinstance(C, int):
        return NotImplemented
    dt, it = logp.type.dtype, target.type.dtype
    bool_t = DType("bool")

    def along_classes(v, dtype):   # [C] -> [C, 1, ...]: dim 1 of logp
        for j in range(k):
            v = b.op("unsqueeze", [v], {"dim": -1}, dtype, (C,) + (1,) * (j + 1))
        return v

    classes = along_classes(b.op("arange", [], {"start": 0, "end": C, "step": 1, "dtype": it}, it, (C,)), it)
    tcol = b.op("unsqueeze", [target], {"dim": 1}, it, tshape[:1] + (1,) + tshape[1:])
    hot = b.op("eq", [tcol, classes], {}, bool_t, shape)
    valid = b.op("ne", [target, int(ignore_index)], {}, bool_t, tshape)
    term = logp
    if weight is not None:
        if weight.type.dtype != dt:
            weight = b.cast(weight, dt)
        wcol = along_classes(weight, dt)
        term = b.op("mul", [logp, wcol], {}, dt, shape)
        wt = b.op("sum", [b.op("where", [hot, wcol, 0.0], {}, dt, shape)], {"dims": [1], "keepdim": False}, dt, tshape)
        wt = b.op("where", [valid, wt, 0.0], {}, dt, tshape)
    picked = b.op("sum", [b.op("where", [hot, term, 0.0], {}, dt, shape)], {"dims": [1], "keepdim": False}, dt, tshape)
    loss = b.op("where", [valid, b.op("neg", [picked], {}, dt, tshape), 0.0], {}, dt, tshape)
    if smoothing:
        spread = b.op("sum", [term], {"dims": [1], "keepdim": False}, dt, tshape)
        spread = b.op("where", [valid, b.op("neg", [spread], {}, dt, tshape), 0.0], {}, dt, tshape)
        loss = b.op("add", [b.op("mul", [loss, 1.0 - float(smoothing)], {}, dt, tshape),
                            b.op("mul", [spread, float(smoothing) / C], {}, dt, tshape)], {}, dt, tshape)
    if reduction == 0:
        return loss
    total = b.op("sum", [loss], {"dims": None, "keepdim": False}, dt, ())
    if reduction == 2:
        return total
    count = b.op("sum", [wt if weight is not None else b.cast(valid, dt)], {"dims": None, "keepdim": False}, dt, ())
    return L.emit("div", [total, count], {}, node) if not isinstance(node.meta["val"], (list, tuple)) else \
        b.op("div", [total, count], {}, dt, ())


@lowering(aten.cross_entropy_loss.default)
def _cross_entropy(L, node):
    """cross_entropy over (N, C) or (N, C, d1, ...) logits and (N, [d1, ...]) class indices, with class weights
    and label smoothing: log_softmax along the classes, then the masked negative log-likelihood (_nll)."""
    names = ["self", "target", "weight", "reduction", "ignore_index", "label_smoothing"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    x, target = L.arg(a["self"]), L.arg(a["target"])
    if x.type.rank < 2:
        return NotImplemented
    weight = None if a.get("weight") is None else L.arg(a["weight"])
    logp = _Build(L).op("log_softmax", [x], {"dim": 1}, x.type.dtype, x.type.shape)
    return _nll(L, node, logp, target, a.get("ignore_index", -100), a.get("reduction", 1), weight,
                float(a.get("label_smoothing", 0.0) or 0.0))


@lowering(aten.nll_loss.default, aten.nll_loss_nd.default)
def _nll_loss(L, node):
    names = ["self", "target", "weight", "reduction", "ignore_index"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    weight = None if a.get("weight") is None else L.arg(a["weight"])
    return _nll(L, node, L.arg(a["self"]), L.arg(a["target"]), a.get("ignore_index", -100), a.get("reduction", 1),
                weight)


@lowering(aten.var_mean.correction, aten.var.correction, aten.std.correction, aten.var_mean.dim, aten.var.dim,
          aten.std.dim)
def _var_mean(L, node):
    """var = sum((x - mean)^2) / (N - correction) over the dims; std its square root; var_mean also the mean."""
    x = L.arg(node.args[0])
    if not x.type.dtype.is_float:
        return NotImplemented
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = list(range(x.type.rank)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    if node.target in (aten.var_mean.dim, aten.var.dim, aten.std.dim):   # (self, dim, unbiased, keepdim)
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        correction = 1 if unbiased else 0
        keep = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False))
    else:
        correction = node.kwargs.get("correction", 1)
        correction = 1 if correction is None else correction
        keep = bool(node.kwargs.get("keepdim", False))
    b, dt, shape = _Build(L), x.type.dtype, x.type.shape
    nd = [d % x.type.rank for d in dims]
    kshape = tuple(1 if i in nd else s for i, s in enumerate(shape))
    oshape = kshape if keep else tuple(s for i, s in enumerate(shape) if i not in nd)
    mean_k = b.op("mean", [x], {"dims": dims, "keepdim": True}, dt, kshape)
    dev = b.op("sub", [x, mean_k], {}, dt, shape)
    sq = b.op("mul", [dev, dev], {}, dt, shape)
    total = b.op("sum", [sq], {"dims": dims, "keepdim": keep}, dt, oshape)
    n = _numel([shape[d] for d in nd]) - correction
    if not isinstance(n, int):   # a symbolic count (a reduction over T): a tensor, not a literal
        ones = b.op("full", [], {"shape": [shape[d] for d in nd], "value": 1.0, "dtype": dt}, dt, [shape[d] for d in nd])
        n = b.op("sum", [ones], {"dims": None, "keepdim": False}, dt, ())
        n = b.op("sub", [n, float(correction)], {}, dt, ()) if correction else n
    var = b.op("div", [total, n], {}, dt, oshape)
    if node.target in (aten.std.correction, aten.std.dim):
        return b.op("sqrt", [var], {}, dt, oshape)
    if node.target in (aten.var.correction, aten.var.dim):
        return var
    mean = mean_k if keep else b.op("mean", [x], {"dims": dims, "keepdim": False}, dt, oshape)
    return [var, mean]


# -- activations, norms and reductions that models spell with their own aten op -----------------------------
@lowering(aten.square.default)
def _square(L, node):
    x = L.arg(node.args[0])
    return L.emit("mul", [x, x], {}, node)


@lowering(aten.hardtanh.default)
def _hardtanh(L, node):
    """hardtanh(x, min_val=-1, max_val=1) = minimum(maximum(x, min_val), max_val)."""
    x = L.arg(node.args[0])
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    if not x.type.dtype.is_float or lo > hi:
        return NotImplemented
    return _between(L, x, float(lo), float(hi))


@lowering(aten.relu6.default)
def _relu6(L, node):
    """relu6(x) = hardtanh(x, 0, 6)."""
    x = L.arg(node.args[0])
    return _between(L, x, 0.0, 6.0) if x.type.dtype.is_float else NotImplemented


@lowering(aten.elu.default, aten.selu.default, aten.celu.default)
def _elu(L, node):
    """elu(x, alpha, scale, input_scale) = x * scale where x > 0, else expm1(x * input_scale) * alpha * scale;
    selu is elu with torch's fixed alpha and scale, celu(x, alpha) elu with input_scale 1 / alpha."""
    x = L.arg(node.args[0])
    names = ["self", "alpha", "scale", "input_scale"]
    a = {"alpha": 1.0, "scale": 1.0, "input_scale": 1.0, **dict(zip(names, node.args)), **node.kwargs}
    if node.target == aten.selu.default:
        a = {"alpha": 1.6732632423543772848170429916717, "scale": 1.0507009873554804934193349852946,
             "input_scale": 1.0}
    elif node.target == aten.celu.default:
        a["input_scale"] = 1.0 / float(a["alpha"])
    if not x.type.dtype.is_float:
        return NotImplemented
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    scale, neg = float(a["scale"]), float(a["alpha"]) * float(a["scale"])
    pos = b.op("gt", [x, 0.0], {}, DType("bool"), sh)
    inner = b.op("mul", [x, float(a["input_scale"])], {}, dt, sh) if float(a["input_scale"]) != 1.0 else x
    low = b.op("mul", [b.op("expm1", [inner], {}, dt, sh), neg], {}, dt, sh)
    return b.op("where", [pos, b.op("mul", [x, scale], {}, dt, sh) if scale != 1.0 else x, low], {}, dt, sh)


@lowering(aten.round.decimals)
def _round_decimals(L, node):
    """torch's: round(x * 10^d) / 10^d for d > 0, round(x / 10^-d) * 10^-d otherwise (round half to even)."""
    x = L.arg(node.args[0])
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("decimals", 0)
    if not x.type.dtype.is_float or not isinstance(d, int):
        return NotImplemented
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    p = float(10 ** abs(d))
    if d > 0:
        return b.op("div", [b.op("round", [b.op("mul", [x, p], {}, dt, sh)], {}, dt, sh), p], {}, dt, sh)
    return b.op("mul", [b.op("round", [b.op("div", [x, p], {}, dt, sh)], {}, dt, sh), p], {}, dt, sh)


@lowering(aten.diff.default)
def _diff(L, node):
    """diff(x, n=1, dim): x[1:] - x[:-1] along dim, n times (no prepend / append)."""
    names = ["self", "n", "dim", "prepend", "append"]
    a = {"n": 1, "dim": -1, "prepend": None, "append": None, **dict(zip(names, node.args)), **node.kwargs}
    x = L.arg(a["self"])
    if a["prepend"] is not None or a["append"] is not None or not isinstance(a["n"], int) or x.type.rank == 0 \
            or x.type.dtype.name == "bool":   # (a bool diff is a logical xor)
        return NotImplemented
    b = _Build(L)
    d = a["dim"] % x.type.rank
    for _ in range(a["n"]):
        shape = list(x.type.shape)
        size = shape[d]
        shape[d] = size - 1
        hi = b.op("slice", [x], {"dim": d, "start": 1, "end": size, "step": 1}, x.type.dtype, tuple(shape))
        lo = b.op("slice", [x], {"dim": d, "start": 0, "end": size - 1, "step": 1}, x.type.dtype, tuple(shape))
        x = b.op("sub", [hi, lo], {}, x.type.dtype, tuple(shape))
    return x


@lowering(aten.index_put.default, aten.index_put_.default)
def _index_put(L, node):
    """x[mask] = v with one bool mask over x's leading dims and a single value: where(mask, v, x)."""
    names = ["self", "indices", "values", "accumulate"]
    a = {"accumulate": False, **dict(zip(names, node.args)), **node.kwargs}
    idx = list(a["indices"])
    if a["accumulate"] or len(idx) != 1 or idx[0] is None:
        return NotImplemented
    x, mask, v = L.arg(a["self"]), L.arg(idx[0]), L.arg(a["values"])
    if mask.type.dtype.name != "bool" or tuple(mask.type.shape) != tuple(x.type.shape[:mask.type.rank]):
        return NotImplemented
    if not isinstance(v, Value) or v.type.rank > 0 and not all(d == 1 for d in v.type.shape):
        return NotImplemented
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    if v.type.rank:
        v = b.op("reshape", [v], {"shape": []}, v.type.dtype, ())
    if v.type.dtype != dt:
        v = b.cast(v, dt)
    for j in range(x.type.rank - mask.type.rank):
        mask = b.op("unsqueeze", [mask], {"dim": -1}, DType("bool"), tuple(mask.type.shape) + (1,))
    return b.op("where", [mask, v, x], {}, dt, sh)


@lowering(aten.leaky_relu.default)
def _leaky_relu(L, node):
    """leaky_relu(x, slope) = where(x > 0, x, x * slope) (NaN stays NaN)."""
    x = L.arg(node.args[0])
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    if not x.type.dtype.is_float:
        return NotImplemented
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    pos = b.op("gt", [x, 0.0], {}, DType("bool"), sh)
    return b.op("where", [pos, x, b.op("mul", [x, float(slope)], {}, dt, sh)], {}, dt, sh)


def _hardsigmoid_of(b, x):
    dt, sh = x.type.dtype, x.type.shape
    r6 = b.op("minimum", [b.op("maximum", [b.op("add", [x, 3.0], {}, dt, sh), 0.0], {}, dt, sh), 6.0], {}, dt, sh)
    return b.op("div", [r6, 6.0], {}, dt, sh)


@lowering(aten.hardsigmoid.default, aten.hardswish.default, aten.mish.default, aten.log_sigmoid.default)
def _activation(L, node):
    """hardsigmoid = relu6(x + 3) / 6, hardswish = x * hardsigmoid(x), mish = x * tanh(softplus(x)),
    logsigmoid = -softplus(-x) (softplus with torch's default beta 1 and threshold 20)."""
    x = L.arg(node.args[0])
    if not x.type.dtype.is_float:
        return NotImplemented
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    if node.target == aten.hardsigmoid.default:
        return _hardsigmoid_of(b, x)
    if node.target == aten.hardswish.default:
        return b.op("mul", [x, _hardsigmoid_of(b, x)], {}, dt, sh)
    if node.target == aten.mish.default:
        sp = b.op("softplus", [x], {"beta": 1, "threshold": 20}, dt, sh)
        return b.op("mul", [x, b.op("tanh", [sp], {}, dt, sh)], {}, dt, sh)
    sp = b.op("softplus", [b.op("neg", [x], {}, dt, sh)], {"beta": 1, "threshold": 20}, dt, sh)
    return b.op("neg", [sp], {}, dt, sh)


@lowering(aten.glu.default)
def _glu(L, node):
    """glu(x, dim) = a * sigmoid(b), a and b the two halves of x along dim."""
    x = L.arg(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)) % x.type.rank
    size = x.type.shape[dim]
    if not x.type.dtype.is_float or not isinstance(size, int) or size % 2:
        return NotImplemented
    b, dt = _Build(L), x.type.dtype
    half = tuple(size // 2 if i == dim else s for i, s in enumerate(x.type.shape))
    a_, g_ = L.graph.make_node("split", [x], {"sizes": [size // 2, size // 2], "dim": dim},
                               [TensorType(dt, half), TensorType(dt, half)]).outputs
    return b.op("mul", [a_, b.op("sigmoid", [g_], {}, dt, half)], {}, dt, half)


def _reduce_dims(x, dims):
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return list(range(x.type.rank))
    return [d % x.type.rank for d in ([dims] if isinstance(dims, int) else dims)]


def _reduced_shape(shape, dims, keep):
    return tuple(1 if i in dims else s for i, s in enumerate(shape)) if keep else \
        tuple(s for i, s in enumerate(shape) if i not in dims)


@lowering(aten.amin.default, aten.max.default, aten.min.default)
def _amin(L, node):
    """amin(x) = -amax(-x); x.max() / x.min() over every element: amax / amin over every dim."""
    x = L.arg(node.args[0])
    if not x.type.dtype.is_float:
        return NotImplemented
    if node.target == aten.amin.default:
        dims = _reduce_dims(x, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    else:
        dims, keep = list(range(x.type.rank)), False
    b, dt = _Build(L), x.type.dtype
    out = _reduced_shape(x.type.shape, dims, keep)
    if node.target == aten.max.default:
        return b.op("amax", [x], {"dims": dims, "keepdim": keep}, dt, out)
    neg = b.op("neg", [x], {}, dt, x.type.shape)
    return b.op("neg", [b.op("amax", [neg], {"dims": dims, "keepdim": keep}, dt, out)], {}, dt, out)


@lowering(aten.logsumexp.default)
def _logsumexp(L, node):
    """log(sum(exp(x - m))) + m, m the max over the dims with infinite maxima taken as 0 (as torch does, so a
    row of -inf gives -inf and a row holding +inf gives +inf)."""
    x = L.arg(node.args[0])
    if not x.type.dtype.is_float:
        return NotImplemented
    dims = _reduce_dims(x, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    ksh, out = _reduced_shape(sh, dims, True), _reduced_shape(sh, dims, keep)
    m = b.op("amax", [x], {"dims": dims, "keepdim": True}, dt, ksh)
    inf = b.op("eq", [b.op("abs", [m], {}, dt, ksh), math.inf], {}, DType("bool"), ksh)
    m = b.op("where", [inf, 0.0, m], {}, dt, ksh)
    e = b.op("exp", [b.op("sub", [x, m], {}, dt, sh)], {}, dt, sh)
    s = b.op("log", [b.op("sum", [e], {"dims": dims, "keepdim": keep}, dt, out)], {}, dt, out)
    m_out = m if keep else b.op("reshape", [m], {"shape": list(out)}, dt, out)
    return b.op("add", [s, m_out], {}, dt, out)


@lowering(aten.linalg_vector_norm.default)
def _vector_norm(L, node):
    """The p-norm over dims: sqrt(sum(x*x)) for p = 2, sum(|x|) for 1, max(|x|) / min(|x|) for +-inf,
    sum(|x|^p)^(1/p) otherwise; half inputs accumulate in float32 as torch does. p = 0 and a dtype stay torch."""
    x = L.arg(node.args[0])
    a = list(node.args) + [None] * (5 - len(node.args))
    p = node.kwargs.get("ord", 2 if a[1] is None else a[1])
    dims = _reduce_dims(x, node.kwargs.get("dim", a[2]))
    keep = bool(node.kwargs.get("keepdim", a[3] or False))
    if not x.type.dtype.is_float or node.kwargs.get("dtype", a[4]) is not None or p == 0:
        return NotImplemented
    b, dt = _Build(L), x.type.dtype
    ct = DType("f32") if dt.name in ("f16", "bf16") else dt
    xc = b.cast(x, ct)
    sh, out = x.type.shape, _reduced_shape(x.type.shape, dims, keep)
    if p == 2:
        r = b.op("sqrt", [b.op("sum", [b.op("mul", [xc, xc], {}, ct, sh)], {"dims": dims, "keepdim": keep}, ct, out)],
                 {}, ct, out)
    else:
        ab = b.op("abs", [xc], {}, ct, sh)
        if p == 1:
            r = b.op("sum", [ab], {"dims": dims, "keepdim": keep}, ct, out)
        elif p == math.inf:
            r = b.op("amax", [ab], {"dims": dims, "keepdim": keep}, ct, out)
        elif p == -math.inf:
            neg = b.op("neg", [ab], {}, ct, sh)
            r = b.op("neg", [b.op("amax", [neg], {"dims": dims, "keepdim": keep}, ct, out)], {}, ct, out)
        else:
            powed = b.op("pow", [ab, float(p)], {}, ct, sh)
            total = b.op("sum", [powed], {"dims": dims, "keepdim": keep}, ct, out)
            r = b.op("pow", [total, 1.0 / float(p)], {}, ct, out)
    return b.cast(r, dt)


@lowering(aten.rms_norm.default)
def _rms_norm(L, node):
    """x * rsqrt(mean(x^2 over the normalised dims) + eps) (times weight), computed in float32 for half inputs and
    eps defaulting to the compute dtype's machine epsilon, as torch's rms_norm does."""
    a = list(node.args) + [None] * (4 - len(node.args))
    x = L.arg(a[0])
    nshape, weight = a[1], node.kwargs.get("weight", a[2])
    eps = node.kwargs.get("eps", a[3])
    if not x.type.dtype.is_float:
        return NotImplemented
    b, dt, sh = _Build(L), x.type.dtype, x.type.shape
    ct = DType("f32") if dt.name in ("f16", "bf16") else dt
    dims = list(range(x.type.rank - len(nshape), x.type.rank))
    ksh = _reduced_shape(sh, dims, True)
    xc = b.cast(x, ct)
    ms = b.op("mean", [b.op("mul", [xc, xc], {}, ct, sh)], {"dims": dims, "keepdim": True}, ct, ksh)
    eps = float(torch.finfo(to_torch(ct)).eps if eps is None else eps)
    r = b.op("rsqrt", [b.op("add", [ms, eps], {}, ct, ksh)], {}, ct, ksh)
    y = b.cast(b.op("mul", [xc, r], {}, ct, sh), dt)
    if weight is None:
        return y
    w = L.arg(weight)
    wt = from_torch(torch.promote_types(to_torch(dt), to_torch(w.type.dtype)))
    return b.cast(b.op("mul", [b.cast(y, wt), b.cast(w, wt)], {}, wt, sh), dt)


@lowering(aten.repeat.default)
def _repeat(L, node):
    """x.repeat(r0, r1, ...) = x viewed as [1, d0, 1, d1, ...], expanded to [r0, d0, r1, d1, ...], flattened."""
    x, reps = L.arg(node.args[0]), [L.arg(r) for r in node.args[1]]   # an int, or a size (``repeat(1, T)``)
    if len(reps) < x.type.rank or any(isinstance(r, Value) for r in reps):
        return NotImplemented
    reps = [int(r) if isinstance(r, int) or getattr(r, "is_Integer", False) else r for r in reps]
    b, dt = _Build(L), x.type.dtype
    shape = (1,) * (len(reps) - x.type.rank) + tuple(x.type.shape)
    inter = [d for s in shape for d in (1, s)]
    big = [d for r, s in zip(reps, shape) for d in (r, s)]
    v = b.op("reshape", [x], {"shape": inter}, dt, inter)
    v = b.op("expand", [v], {"shape": big}, dt, big)
    out = [r * s for r, s in zip(reps, shape)]
    return b.op("reshape", [v], {"shape": out}, dt, out)


@lowering(aten.tensordot.default)
def _tensordot(L, node):
    """tensordot(a, b, dims_a, dims_b): a's free dims then contracted ones, flattened, times b's contracted
    then free ones, as one matmul, reshaped to a's free dims + b's free dims."""
    a, b_ = L.arg(node.args[0]), L.arg(node.args[1])
    da, db = [d % a.type.rank for d in node.args[2]], [d % b_.type.rank for d in node.args[3]]
    if a.type.dtype != b_.type.dtype or len(da) != len(db):
        return NotImplemented
    b, dt = _Build(L), a.type.dtype
    fa = [i for i in range(a.type.rank) if i not in da]
    fb = [i for i in range(b_.type.rank) if i not in db]
    sa, sb = a.type.shape, b_.type.shape
    K = _numel([sa[i] for i in da])
    Ma, Nb = _numel([sa[i] for i in fa]), _numel([sb[i] for i in fb])
    pa = b.op("permute", [a], {"dims": fa + da}, dt, [sa[i] for i in fa + da])
    pa = b.op("reshape", [pa], {"shape": [Ma, K]}, dt, (Ma, K))
    pb = b.op("permute", [b_], {"dims": db + fb}, dt, [sb[i] for i in db + fb])
    pb = b.op("reshape", [pb], {"shape": [K, Nb]}, dt, (K, Nb))
    prod = b.op("matmul", [pa, pb], {}, dt, (Ma, Nb))
    out = L.ttype(node.meta["val"])
    return L.emit("reshape", [prod], {"shape": list(out.shape)}, node)


@lowering(aten.narrow.default)
def _narrow(L, node):
    x, dim, start, length = (L.arg(a) for a in node.args[:4])
    if isinstance(start, Value) or isinstance(length, Value):
        return NotImplemented
    start = start + x.type.shape[dim] if isinstance(start, int) and start < 0 else start
    return L.emit("slice", [x], {"dim": dim, "start": start, "end": start + length, "step": 1}, node)


@lowering(aten.diag_embed.default)
def _diag_embed(L, node):
    """diag_embed(x): x[..., i] on the diagonal of the last two dims (offset 0), zero elsewhere."""
    a = list(node.args) + [0, -2, -1][len(node.args) - 1:]
    x = L.arg(a[0])
    if a[1] != 0 or (a[2] % (x.type.rank + 1), a[3] % (x.type.rank + 1)) != (x.type.rank - 1, x.type.rank):
        return NotImplemented
    b, dt, n = _Build(L), x.type.dtype, x.type.shape[-1]
    eye = b.op("eye", [], {"n": n, "dtype": DType("bool")}, DType("bool"), (n, n))
    col = b.op("unsqueeze", [x], {"dim": -1}, dt, x.type.shape + (1,))
    return L.emit("where", [eye, col, False if dt.name == "bool" else 0.0 if dt.is_float else 0], {}, node)


@lowering(aten.constant_pad_nd.default, aten.pad.default)
def _constant_pad(L, node):
    """Constant padding: full() blocks concatenated on each padded side; a negative pad is a slice. F.pad's
    other modes (reflect, replicate, circular) stay torch's op."""
    x = L.arg(node.args[0])
    pads = [L.arg(p) for p in node.args[1]]
    if node.target == aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        if mode != "constant":
            return NotImplemented
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        value = 0 if value is None else L.arg(value)
    else:
        value = L.arg(node.args[2]) if len(node.args) > 2 else node.kwargs.get("value", 0)
    if isinstance(value, Value) or any(isinstance(p, Value) for p in pads):
        return NotImplemented
    b, dt = _Build(L), x.type.dtype
    value = bool(value) if dt.name == "bool" else (float(value) if dt.is_float else int(value))
    for i in range(len(pads) // 2):
        dim = x.type.rank - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        for amount, at_start in ((lo, True), (hi, False)):
            if isinstance(amount, int) and amount == 0:
                continue
            shape = x.type.shape
            if isinstance(amount, int) and amount < 0:
                start, end = (-amount, shape[dim]) if at_start else (0, shape[dim] + amount)
                new = shape[:dim] + (shape[dim] + amount,) + shape[dim + 1:]
                x = b.op("slice", [x], {"dim": dim, "start": start, "end": end, "step": 1}, dt, new)
                continue
            block = b.op("full", [], {"shape": list(shape[:dim] + (amount,) + shape[dim + 1:]), "value": value,
                                      "dtype": dt}, dt, shape[:dim] + (amount,) + shape[dim + 1:])
            new = shape[:dim] + (shape[dim] + amount,) + shape[dim + 1:]
            x = b.op("concat", [block, x] if at_start else [x, block], {"dim": dim}, dt, new)
    return x


@lowering(aten.tensor_split.sections, aten.tensor_split.indices, aten.split.sizes)
def _tensor_split(L, node):
    return _split(L, node)



# -- complex tensors as real pairs ----------------------------------------------------------------------------
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def _pair_type(L, fake) -> TensorType:
    """The real (..., 2) type of a complex fake tensor."""
    real = _REAL_OF[fake.dtype] if fake.dtype.is_complex else fake.dtype
    return TensorType(from_torch(real), tuple(L.expr(d) for d in fake.shape) + (2,))


def _complex(L, node):
    """A complex op, computed on real (..., 2) pairs with the IR's real ops: view_as_complex/view_as_real are
    reshapes, polar is (r cos a, r sin a), products and sums act on the pairs, layout ops keep the pair dim
    last. Any other complex op is a TraceError naming it (never a dtype no backend or export holds)."""
    g, name = L.graph, str(node.target)
    val = node.meta["val"]
    out_complex = isinstance(val, torch.Tensor) and val.dtype.is_complex
    args = [L.arg(a) for a in node.args]
    pair = [isinstance(a, Value) and a in L.pairs for a in args]

    def done(v):
        if out_complex:
            L.pairs.add(v)
        return v

    def mk(op, inputs, attrs, t):
        return g.make_node(op, inputs, attrs, [t]).output

    def part(x, i):
        t = TensorType(x.type.dtype, x.type.shape[:-1])
        return mk("select", [x], {"dim": -1, "index": i}, t)

    def stacked(re, im):
        return done(mk("stack", [re, im], {"dim": -1}, _pair_type(L, val)))

    t = node.target
    if t in IDENTITY:
        return args[0]
    if t == aten.view_as_complex.default:
        x = args[0]
        return done(mk("reshape", [x], {"shape": list(x.type.shape)}, x.type))
    if t == aten.view_as_real.default:
        x = args[0]
        return mk("reshape", [x], {"shape": list(x.type.shape)}, x.type)
    if t in (aten.real.default, aten.imag.default) and pair[0]:   # the pair's first or second number
        return part(args[0], 0 if t == aten.real.default else 1)
    if t == aten.polar.default and not any(pair):
        r, a = args[:2]
        rt = TensorType(r.type.dtype, _pair_type(L, val).shape[:-1])
        re = mk("mul", [r, mk("cos", [a], {}, a.type)], {}, rt)
        im = mk("mul", [r, mk("sin", [a], {}, a.type)], {}, rt)
        return stacked(re, im)
    if t in (aten.mul.Tensor, aten.mul.Scalar) and len(args) == 2:
        a, b = args
        ot = _pair_type(L, val)
        rt = TensorType(ot.dtype, ot.shape[:-1])
        if pair[0] and pair[1]:
            ar, ai, br, bi = part(a, 0), part(a, 1), part(b, 0), part(b, 1)
            re = mk("sub", [mk("mul", [ar, br], {}, rt), mk("mul", [ai, bi], {}, rt)], {}, rt)
            im = mk("add", [mk("mul", [ar, bi], {}, rt), mk("mul", [ai, br], {}, rt)], {}, rt)
            return stacked(re, im)
        z, r = (a, b) if pair[0] else (b, a)
        if isinstance(r, Value):
            if r.type.dtype.is_complex:
                return _complex_unsupported(L, node)
            r = mk("unsqueeze", [r], {"dim": -1}, TensorType(r.type.dtype, r.type.shape + (1,)))
        elif isinstance(r, complex):
            return _complex_unsupported(L, node)
        return done(mk("mul", [z, r], {}, ot))
    if t in (aten.add.Tensor, aten.sub.Tensor) and len(args) == 2 and all(pair) and node.kwargs.get("alpha", 1) == 1:
        return done(mk("add" if t == aten.add.Tensor else "sub", args, {}, _pair_type(L, val)))
    if t in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout) and pair[0] and out_complex:
        ot = _pair_type(L, val)
        x = args[0]
        return done(x if x.type.dtype == ot.dtype else mk("cast", [x], {"dtype": ot.dtype}, ot))
    if pair[0] and out_complex and sum(pair) == 1:   # layout ops: the pair dim stays last
        x, rank = args[0], args[0].type.rank - 1
        ot = _pair_type(L, val)
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
            return done(mk("reshape" if "expand" not in name else "expand", [x], {"shape": list(ot.shape)}, ot))
        if t == aten.unsqueeze.default:
            return done(mk("unsqueeze", [x], {"dim": node.args[1] % (rank + 1)}, ot))
        if t == aten.slice.Tensor:
            a = list(node.args) + [None] * (5 - len(node.args))
            attrs = {"dim": (a[1] or 0) % rank, "start": L.arg(a[2]) if a[2] is not None else 0,
                     "end": L.arg(a[3]) if a[3] is not None else 2**63 - 1, "step": a[4] if a[4] is not None else 1}
            return done(mk("slice", [x], attrs, ot))
        if t == aten.select.int:
            return done(mk("select", [x], {"dim": node.args[1] % rank, "index": L.arg(node.args[2])}, ot))
        if t == aten.permute.default:
            return done(mk("permute", [x], {"dims": [d % rank for d in node.args[1]] + [rank]}, ot))
        if t == aten.transpose.int:
            return done(mk("transpose", [x], {"dim0": node.args[1] % rank, "dim1": node.args[2] % rank}, ot))
    return _complex_unsupported(L, node)


def _complex_unsupported(L, node):
    raise TraceError(f"complex op {node.target} (%{node.name}{source_of(node)}) has no lowering to real pairs; "
                     "complex tensors compile through view_as_complex/view_as_real, polar, complex buffers, "
                     "products, sums and layout ops: write the rest with real (cos, sin) pairs")


LOWERINGS[aten.numpy_T.default] = lambda L, node: L.emit(
    "permute", [L.arg(node.args[0])], {"dims": list(range(L.arg(node.args[0]).type.rank))[::-1]}, node)


@lowering(aten.ones_like.default, aten.zeros_like.default, aten.full_like.default)
def _full_like(L, node):
    """ones_like / zeros_like / full_like: a full of the output's shape and dtype (not its values)."""
    name = str(node.target)
    value = L.arg(node.args[1]) if "full_like" in name else (1 if "ones" in name else 0)
    if isinstance(value, Value) or node.meta["val"].dtype.is_complex:
        return NotImplemented
    dt = _factory_dtype(node)
    if not (isinstance(value, sympy.Basic) and value.free_symbols):   # (a size, such as T * 2.0, stays symbolic)
        value = bool(value) if dt.name == "bool" else (float(value) if dt.is_float else int(value))
    return L.emit("full", [], {"shape": [L.expr(d) for d in node.meta["val"].shape], "value": value, "dtype": dt},
                  node)


@lowering(aten.item.default)
def _item(L, node):
    """t.item() of a one-element tensor used in tensor arithmetic (a temperature argument): the tensor itself, as a
    0-d value (a Python number and a 0-d tensor take part in torch's type promotion alike). Where the number is
    used otherwise (a size, a Python branch), export or the lowering of that use refuses it."""
    x = L.arg(node.args[0])
    if not isinstance(x, Value) or not all(d == 1 for d in x.type.shape):
        return NotImplemented
    if x.type.rank == 0:
        return x
    return L.graph.make_node("reshape", [x], {"shape": []}, [TensorType(x.type.dtype, ())]).output
