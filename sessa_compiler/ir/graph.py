"""The IR graph: typed SSA values, nodes in topological order, explicit inputs/params/outputs."""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import sympy

if TYPE_CHECKING:   # networkx is imported where a graph is built (0.15-0.3 s: not on a warm compile's path)
    import networkx as nx

from ..errors import IRError, ParseError
from .types import ArgRef, DType, TensorType, format_dim


PLAIN_NAME = r"\w[\w.]*"   # a value name written bare after % (text.py parses references with the same pattern)
_PLAIN_NAME = re.compile(PLAIN_NAME + r"\Z", re.ASCII)


def value_ref(name: str) -> str:
    """How the text format writes a reference to the value ``name``: ``%x``, ``%0.weight``, or, for names with
    other characters (a ModuleDict key such as ``"block-1"``), ``%"block-1.weight"`` (a JSON string)."""
    return "%" + (name if _PLAIN_NAME.match(name) else json.dumps(name))


class Value:
    """An SSA value: a graph input, a parameter, or one output of a node."""

    __slots__ = ("name", "type", "producer", "kind")

    def __init__(self, name: str, type: TensorType, kind: str, producer: "Node | None" = None):
        self.name = name
        self.type = type
        self.kind = kind  # "input" | "param" | "node"
        self.producer = producer

    def __repr__(self) -> str:
        return f"{value_ref(self.name)}: {self.type}"


@dataclass(eq=False)
class Node:
    """One op application. ``inputs`` holds Values and literal scalars (int, float, bool, sympy)."""

    op: str
    inputs: list
    attrs: dict
    outputs: list = field(default_factory=list)

    @property
    def value_inputs(self) -> list:
        return [v for v in self.inputs if isinstance(v, Value)]

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRError(f"op '{self.op}' has {len(self.outputs)} outputs; asked for the single one")
        return self.outputs[0]

    def __repr__(self) -> str:
        outs = ", ".join(value_ref(v.name) for v in self.outputs)
        return f"<Node {outs} = {self.op}>"


class Graph:
    """A function from input tensors (and named parameters) to output tensors.

    Nodes are kept in a topological order. Parameter *data* lives in ``params`` (name -> array),
    outside the text format; the text declares each parameter's type.
    """

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.param_values: dict[str, Value] = {}
        self.params: dict[str, Any] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.sources: dict[str, str] = {}   # value name -> the user's source line it was traced from (errors)
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- construction -------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = "".join(c if (c.isalnum() or c in "_.") else "_" for c in hint) or "v"
        if hint[0].isdigit():
            hint = "v" + hint
        if hint not in self._names:
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names:
                return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise IRError(f"value name %{name} is defined twice")
        self._names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type, "input")
        self.inputs.append(v)
        return v

    def add_param(self, name: str, type: TensorType, data: Any = None) -> Value:
        v = Value(self._claim(name), type, "param")
        self.param_values[name] = v
        if data is not None:
            self.params[name] = data
        return v

    def make_node(self, op: str, inputs: Iterable, attrs: dict | None, out_types: list,
                  names: list | None = None, index: int | None = None) -> Node:
        """Create a node and its output values; appended at the end or inserted at ``index``."""
        node = Node(op, list(inputs), dict(attrs or {}))
        for i, t in enumerate(out_types):
            name = names[i] if names else self.fresh_name(op)
            node.outputs.append(Value(self._claim(name), t, "node", node))
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    # -- queries -------------------------------------------------------------------------------
    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.param_values.values()
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise IRError(f"no value %{name} in graph {self.name}")

    def users(self) -> dict:
        """Map each Value to the list of nodes that read it."""
        out: dict = {}
        for n in self.nodes:
            for v in n.value_inputs:
                out.setdefault(v, []).append(n)
        return out

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph over nodes (Node objects); an edge p -> c when c reads an output of p.

        Graph inputs and parameters are not vertices; analyses that need them read ``node.inputs``.
        """
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n, op=n.op)
            for v in n.value_inputs:
                if v.producer is not None:
                    g.add_edge(v.producer, n, value=v.name)
        return g

    def to_dot(self, path=None) -> str:
        """The graph in Graphviz DOT (through networkx and pydot): graph inputs and parameters as boxes, one
        vertex per op labelled with its outputs, op and type, edges labelled with the value they carry.
        Written to ``path`` when given; render with ``dot -Tsvg file.dot -o file.svg``."""
        try:
            import pydot  # noqa: F401  (networkx writes DOT through it)
        except ImportError:
            from ..errors import UnsupportedError

            raise UnsupportedError("Graph.to_dot needs the package pydot: pip install pydot "
                                   "(requirements/all.txt pins it)") from None
        import networkx as nx
        from networkx.drawing.nx_pydot import to_pydot

        g = nx.DiGraph(name=self.name)
        where: dict = {}
        for i, v in enumerate(self.inputs):
            where[v] = f"input_{i}"
            g.add_node(where[v], label=f"input %{v.name}: {v.type}", shape="box")
        for i, v in enumerate(self.param_values.values()):
            where[v] = f"param_{i}"
            g.add_node(where[v], label=f"param %{v.name}: {v.type}", shape="box", style="dashed")
        for i, n in enumerate(self.nodes):
            vid = f"op_{i}"
            outs = ", ".join(f"%{o.name}" for o in n.outputs)
            g.add_node(vid, label=f"{outs} = {n.op}\\n{n.outputs[0].type if n.outputs else ''}")
            for v in n.value_inputs:
                g.add_edge(where[v], vid, label=v.name)
            for o in n.outputs:
                where[o] = vid
        g.add_node("return", label="return", shape="oval")
        for v in self.outputs:
            g.add_edge(where[v], "return", label=v.name)
        text = to_pydot(g).to_string()
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    def ops(self) -> list[str]:
        return [n.op for n in self.nodes]

    # -- rewriting -------------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.inputs = [new if x is old else x for x in n.inputs]
        self.outputs = [new if x is old else x for x in self.outputs]

    def toposort(self) -> None:
        """Re-establish topological order after rewrites (stable for already-ordered nodes)."""
        import networkx as nx

        order = {n: i for i, n in enumerate(self.nodes)}
        g = self.to_networkx()
        self.nodes = list(nx.lexicographical_topological_sort(g, key=lambda n: order[n]))

    def dead_code_elimination(self) -> int:
        live: set = set(self.outputs)
        kept = []
        for n in reversed(self.nodes):
            if any(o in live for o in n.outputs):
                kept.append(n)
                live.update(n.value_inputs)
        removed = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        self._names = {v.name for v in self.values()}
        return removed

    def remove_unused_params(self) -> None:
        used = {v for n in self.nodes for v in n.value_inputs} | set(self.outputs)
        for name in [k for k, v in self.param_values.items() if v not in used]:
            del self.param_values[name]
            self.params.pop(name, None)
        self._names = {v.name for v in self.values()}

    # -- printing and copying (ir/verify.py checks a graph, ir/text.py parses the printed form) -----
    def __str__(self) -> str:
        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes>"

    def clone(self) -> "Graph":
        """A structural copy sharing parameter data (rewrites on the copy leave self untouched)."""
        g = Graph(self.name)
        new: dict = {}
        for v in self.inputs:
            new[v] = g.add_input(v.name, v.type)
        for name, v in self.param_values.items():
            new[v] = g.add_param(name, v.type)
        for n in self.nodes:
            inputs = [new[x] if isinstance(x, Value) else _copy_literal(x) for x in n.inputs]
            node = g.make_node(n.op, inputs, _copy_literal(n.attrs), [v.type for v in n.outputs],
                               names=[v.name for v in n.outputs])
            new.update(zip(n.outputs, node.outputs))
        g.outputs = [new[v] for v in self.outputs]
        g.params = dict(self.params)
        g.sources = dict(self.sources)
        return g

    def source_of(self, node: Node) -> str:
        """', traced from file:line (`code`)' for the user's line a node came from, or ''."""
        for v in node.outputs:
            if v.name in self.sources:
                return f", traced from {self.sources[v.name]}"
        return ""


def _copy_literal(x):
    """A copy of an operand or attribute literal: containers are copied, immutable leaves shared."""
    if isinstance(x, list):
        return [_copy_literal(y) for y in x]
    if isinstance(x, tuple):
        return tuple(_copy_literal(y) for y in x)
    if isinstance(x, dict):
        return {k: _copy_literal(v) for k, v in x.items()}
    return x


# -- the text form (ir/text.py parses it) ----------------------------------------------------------
def format_literal(x) -> str:
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)
    if isinstance(x, str):
        return repr(x)
    if isinstance(x, sympy.Basic):
        return format_dim(x)
    if isinstance(x, (DType, ArgRef)):
        return repr(x)
    if isinstance(x, (list, tuple)):
        inner = ", ".join(format_literal(y) for y in x)
        return f"[{inner}]" if isinstance(x, list) else (f"({inner},)" if len(x) == 1 else f"({inner})")
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {format_literal(v)}" for k, v in x.items()) + "}"
    raise ParseError(f"cannot print attribute value {x!r} of type {type(x).__name__}")


def format_operand(x) -> str:
    return value_ref(x.name) if isinstance(x, Value) else format_literal(x)


def print_graph(g: Graph) -> str:
    ins = ", ".join(f"{value_ref(v.name)}: {v.type}" for v in g.inputs)
    lines = [f"graph {g.name}({ins}) {{"]
    for name, v in g.param_values.items():
        lines.append(f"  param {value_ref(name)}: {v.type}")
    for n in g.nodes:
        outs = ", ".join(f"{value_ref(v.name)}: {v.type}" for v in n.outputs)
        args = ", ".join(format_operand(x) for x in n.inputs)
        attrs = ""
        if n.attrs:
            attrs = " {" + ", ".join(f"{k}={format_literal(v)}" for k, v in n.attrs.items()) + "}"
        lines.append(f"  {outs} = {n.op}({args}){attrs}")
    lines.append("  return " + ", ".join(value_ref(v.name) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
