"""The IR text format: ``print(graph)`` and ``parse(text)`` round-trip exactly.

    graph main(%x: f32[B, T, 64]) {
      param %ln.weight: f32[64]
      %xn: f32[B, T, 64] = layer_norm(%x, %ln.weight, %ln.bias) {normalized_shape=[64], eps=1e-05}
      %a: f32[B, T, 64], %g: f32[B, T, 64] = split(%h) {sizes=[64, 64], dim=-1}
      return %y
    }

Operands are ``%name`` or literal scalars; attributes are Python-like literals where bare names are
dimension symbols (``T``, ``2*T``), dtypes are ``dtype.f32`` and fallback operand slots ``arg(i)``.
"""
from __future__ import annotations

import ast
import json
import re

from ..errors import ParseError
from .graph import PLAIN_NAME, Graph, format_literal, format_operand, print_graph  # noqa: F401  (printing: the graph's)
from .types import ArgRef, DimEval, DType, TensorType
from .verify import verify_graph

# -- parsing --------------------------------------------------------------------------------------
class _Eval(DimEval):
    """The literal language of the text format: dimension expressions (types.DimEval) plus lists, tuples,
    dicts, ``dtype.f32``, ``arg(i)`` and value references. No arbitrary code runs."""

    def __init__(self, values: dict | None, where: str):
        super().__init__(where)
        self.values = values

    def __call__(self, node):
        if isinstance(node, ast.List):
            return [self(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self(e) for e in node.elts)
        if isinstance(node, ast.Dict):
            return {self(k): self(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dtype":
            return DType(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "__v":
                args = [self(a) for a in node.args]
                if self.values is None or args[0] not in self.values:
                    self.err(node, f"undefined value %{args[0]}")
                return self.values[args[0]]
            if node.func.id == "arg":
                args = [self(a) for a in node.args]
                if len(args) == 1 and isinstance(args[0], int):
                    return ArgRef(args[0])
            if node.func.id == "dict":
                return {k.arg: self(k.value) for k in node.keywords}
        return super().__call__(node)


# a value reference: %name (letters, digits, _ and .) or %"any name" (a JSON string): graph.value_ref writes them
_REF = re.compile(r'%(' + PLAIN_NAME + r'|"(?:[^"\\]|\\.)*")', re.ASCII)


def _ref_name(token: str) -> str:
    return json.loads(token) if token.startswith('"') else token


def _sub_values(text: str) -> str:
    """Replace %name by __v("name") outside string literals."""
    out, i, quote = [], 0, None
    while i < len(text):
        c = text[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            out.append(c)
        elif c == "%":
            m = _REF.match(text, i)
            if not m:
                raise ParseError(f"bad value reference at {text[i:i + 20]!r}")
            out.append(f"__v({json.dumps(_ref_name(m.group(1)))})")
            i = m.end() - 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _eval(text: str, values, where: str):
    try:
        tree = ast.parse(_sub_values(text), mode="eval")
    except SyntaxError as e:
        raise ParseError(f"{where}: cannot parse {text!r}: {e.msg}") from None
    return _Eval(values, where)(tree.body)


def parse_expr(text: str):
    return _eval(text, None, "dimension")


_TYPE = re.compile(r"^(\w+)\[(.*)\]$")


def parse_type(text: str, where: str = "type") -> TensorType:
    m = _TYPE.match(text.strip())
    if not m:
        raise ParseError(f"{where}: expected a type like f32[B, T, 64], got {text!r}")
    shape = _eval(f"[{m.group(2)}]", None, where)
    try:
        return TensorType(DType(m.group(1)), tuple(shape))
    except Exception as e:
        raise ParseError(f"{where}: bad type {text!r}: {e}") from None


def _split_top(text: str, sep: str = ",") -> list:
    parts, depth, cur, quote = [], 0, [], None
    for c in text:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


def _decls(text: str, where: str) -> list:
    out = []
    for part in _split_top(text):
        m = _REF.match(part)
        rest = re.match(r"\s*:\s*(.+)$", part[m.end():]) if m else None
        if not rest:
            raise ParseError(f"{where}: expected '%name: type', got {part!r}")
        out.append((_ref_name(m.group(1)), parse_type(rest.group(1), where)))
    return out


def _matching(text: str, start: int) -> int:
    depth, quote = 0, None
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ParseError(f"unbalanced brackets in {text!r}")


def parse(text: str) -> Graph:
    """Parse the text format into a Graph (without parameter data) and verify it."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise ParseError("empty IR text")
    m = re.match(r"^graph\s+([\w.]+)\((.*)\)\s*\{$", lines[0])
    if not m:
        raise ParseError(f"line 1: expected 'graph NAME(%x: type, ...) {{', got {lines[0]!r}")
    g = Graph(m.group(1))
    values: dict = {}
    for name, t in _decls(m.group(2), "line 1"):
        values[name] = g.add_input(name, t)
    if lines[-1] != "}":
        raise ParseError("the graph must end with '}'")
    returned = False
    for lineno, line in enumerate(lines[1:-1], start=2):
        where = f"line {lineno}"
        if returned:
            raise ParseError(f"{where}: nothing may follow 'return'")
        if line.startswith("param "):
            for name, t in _decls(line[len("param "):], where):
                values[name] = g.add_param(name, t)
            continue
        if line.startswith("return"):
            for p in _split_top(line[len("return"):]):
                m = _REF.fullmatch(p)
                if not m or _ref_name(m.group(1)) not in values:
                    raise ParseError(f"{where}: return of undefined value {p!r}")
                g.outputs.append(values[_ref_name(m.group(1))])
            returned = True
            continue
        eq = re.search(r"\s=\s([a-z_][a-z0-9_]*)\(", line)
        if not eq:
            raise ParseError(f"{where}: expected '%out: type = op(operands) {{attrs}}', got {line!r}")
        outs = _decls(line[:eq.start()], where)
        op = eq.group(1)
        open_at = eq.end() - 1
        close_at = _matching(line, open_at)
        operands = _eval(f"[{line[open_at + 1:close_at]}]", values, where)
        rest = line[close_at + 1:].strip()
        attrs = {}
        if rest:
            if not (rest.startswith("{") and rest.endswith("}")):
                raise ParseError(f"{where}: expected '{{attrs}}' after the operands, got {rest!r}")
            attrs = _eval(f"dict({rest[1:-1]})", values, where)
        for name, _ in outs:
            if name in values:
                raise ParseError(f"{where}: value %{name} is defined twice")
        node = g.make_node(op, operands, attrs, [t for _, t in outs], names=[n for n, _ in outs])
        for v in node.outputs:
            values[v.name] = v
    if not returned:
        raise ParseError("the graph has no 'return' line")
    verify_graph(g)
    return g
