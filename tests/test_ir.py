"""The IR: text round trip, the verifier's messages, symbolic shapes, the networkx view."""
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from sessa_compiler.errors import IRError, ParseError
from sessa_compiler.ir import DType, Graph, TensorType, parse, sym, verify_graph

SESSA_TEXT = """\
graph layer(%x: f32[B, T, 64]) {
  param %ln.weight: f32[64]
  param %ln.bias: f32[64]
  param %W_in.weight: f32[128, 64]
  param %W_in.bias: f32[128]
  param %q.weight: f32[64, 64]
  param %inv_freq: f32[8]
  %xn: f32[B, T, 64] = layer_norm(%x, %ln.weight, %ln.bias) {normalized_shape=[64], eps=1e-05}
  %h: f32[B, T, 128] = linear(%xn, %W_in.weight, %W_in.bias)
  %a: f32[B, T, 64], %g: f32[B, T, 64] = split(%h) {sizes=[64, 64], dim=-1}
  %abar: f32[B, T, 64] = gelu(%a) {approximate='none'}
  %q: f32[B, T, 64] = linear(%abar, %q.weight)
  %q4: f32[B, T, 4, 16] = reshape(%q) {shape=[B, T, 4, 16]}
  %k4: f32[B, T, 2, 16] = slice(%q4) {dim=2, start=0, end=2, step=1}
  %att: f32[B, T, 4, 16] = attention(%q4, %k4, %k4, %inv_freq) {scale=0.25, causal=True, rope=True}
  %f: f32[B, T, 64] = reshape(%att) {shape=[B, T, 64]}
  %gain: f32[B, T] = select(%g) {dim=2, index=0}
  %s: f32[B, T, 64] = feedback(%f, %abar, %g, %gain) {scale=0.125}
  %scaled: f32[B, T, 64] = mul(%s, -inf)
  %flat: f32[B*T, 64] = reshape(%scaled) {shape=[B*T, 64]}
  %odd: f32[B, T, 64] = fallback(%s, %g) {target='aten.add.Tensor', args=[arg(0), arg(1)], kwargs={'alpha': 2}}
  %r: i64[T] = arange() {start=0, end=T, step=1, dtype=dtype.i64}
  return %flat, %odd, %r
}
"""


def test_round_trip_is_exact():
    g = parse(SESSA_TEXT)
    assert str(g) == SESSA_TEXT
    assert str(parse(str(g))) == SESSA_TEXT


def test_parsed_graph_has_symbolic_types():
    g = parse(SESSA_TEXT)
    flat = g.value("flat")
    assert flat.type.shape[0] == sym("B") * sym("T")
    assert g.value("r").type.dtype == DType("i64")
    assert [n.op for n in g.nodes if n.op in ("attention", "feedback")] == ["attention", "feedback"]


def test_networkx_view_orders_nodes():
    import networkx as nx

    g = parse(SESSA_TEXT)
    dg = g.to_networkx()
    assert nx.is_directed_acyclic_graph(dg)
    order = list(nx.topological_sort(dg))
    pos = {n: i for i, n in enumerate(order)}
    for n in g.nodes:
        for v in n.value_inputs:
            if v.producer is not None:
                assert pos[v.producer] < pos[n]
    att = next(n for n in g.nodes if n.op == "attention")
    fb = next(n for n in g.nodes if n.op == "feedback")
    assert nx.has_path(dg, att, fb)


def replace_line(text, old, new):
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize("old, new, message", [
    ("%h: f32[B, T, 128] = linear", "%h: f32[B, T, 127] = linear", "op 'linear' (%h): output %h declared f32[B, T, 127]"),
    ("= linear(%xn, %W_in.weight, %W_in.bias)", "= linear(%x, %q.weight, %W_in.bias)", "op 'linear' (%h): bias must be [64]"),
    ("{sizes=[64, 64], dim=-1}", "{sizes=[64, 63], dim=-1}", "op 'split' (%a, %g): sum of split sizes along dim -1: expected 128, got 127"),
    ("{scale=0.25, causal=True, rope=True}", "{scale=0.25, rope=True}", "op 'attention' (%att): missing attribute 'causal'"),
    ("{scale=0.25, causal=True, rope=True}", "{scale=0.25, causal=True, rope=True, window=3}", "unknown attributes ['window']"),
    ("= feedback(%f, %abar, %g, %gain)", "= feedback(%f, %abar, %g, %f)", "op 'feedback' (%s): gamma must be [B, T], got f32[B, T, 64]"),
    ("%k4: f32[B, T, 2, 16] = slice(%q4) {dim=2, start=0, end=2, step=1}",
     "%k4: f32[B, T, 3, 16] = slice(%q4) {dim=2, start=0, end=3, step=1}",
     "query heads 4 is not a multiple of key/value heads 3"),
    ("%q: f32[B, T, 64] = linear(%abar, %q.weight)", "%q: f32[B, T, 64] = linear(%abar, %nope)", "undefined value %nope"),
    ("= gelu(%a)", "= frobnicate(%a)", "unknown op 'frobnicate'"),
    ("{scale=0.125}", "{scale='big'}", "attribute 'scale' must be float"),
    ("return %flat, %odd, %r", "return %flat, %nothing", "return of undefined value '%nothing'"),
    ("args=[arg(0), arg(1)]", "args=[arg(0), arg(2)]", "args reference operands [0, 2] but the node has 2 operands"),
])
def test_verifier_names_op_and_mismatch(old, new, message):
    with pytest.raises(IRError) as info:
        parse(replace_line(SESSA_TEXT, old, new))
    assert message in str(info.value)


def test_parse_errors_are_clear():
    with pytest.raises(ParseError, match="unknown dtype .float."):
        parse("graph g(%x: float[3]) {\n  return %x\n}")
    with pytest.raises(ParseError, match="no 'return'"):
        parse("graph g(%x: f32[3]) {\n}")
    with pytest.raises(ParseError, match="defined twice"):
        parse("graph g(%x: f32[3]) {\n  %x: f32[3] = neg(%x)\n  return %x\n}")


def test_use_before_definition_is_rejected():
    g = Graph()
    x = g.add_input("x", TensorType(DType("f32"), (sym("T"),)))
    a = g.make_node("neg", [x], {}, [x.type]).output
    b = g.make_node("exp", [a], {}, [x.type]).output
    g.outputs = [b]
    g.nodes.reverse()
    with pytest.raises(IRError, match="used before it is defined"):
        verify_graph(g)


names = st.sampled_from(["B", "T", "N"])
dims = st.one_of(st.integers(1, 64), names.map(sym), st.tuples(st.integers(2, 4), names).map(lambda p: p[0] * sym(p[1])))


@settings(max_examples=60, deadline=None)
@given(st.lists(dims, min_size=0, max_size=4), st.sampled_from(["f32", "bf16", "f64", "i64"]),
       st.floats(allow_nan=False, allow_infinity=True, width=64), st.integers(-5, 5))
def test_round_trip_property(shape, dtype, literal, dim):
    t = TensorType(DType(dtype), tuple(shape))
    g = Graph("p")
    x = g.add_input("x", t)
    y = g.make_node("mul", [x, literal], {}, [t]).output
    z = g.make_node("cast", [y], {"dtype": DType("f64")}, [TensorType(DType("f64"), t.shape)]).output
    g.outputs = [z]
    verify_graph(g)
    text = str(g)
    back = parse(text)
    assert str(back) == text
    got = back.nodes[0].inputs[1]
    assert got == literal or (isinstance(got, sympy.Basic) and float(got) == literal)
    assert back.value("x").type.same_as(t)


def test_every_op_has_eager_semantics_after_importing_the_package_alone():
    """Each IR op means something on the eager backend as soon as sessa_compiler is imported: the blocked and
    fused forms too (they used to be registered only when the Triton backend was imported)."""
    import subprocess
    import sys

    code = ("import sys, sessa_compiler\n"
            "from sessa_compiler.ir.ops import OPS\n"
            "from sessa_compiler.semantics import SEMANTICS\n"
            "print(sorted(op for op in OPS if op not in SEMANTICS), 'triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[] False", out.stdout


def test_semantics_has_an_entry_for_exactly_the_ops_of_the_ir():
    """One table, no strays: an entry for an op the IR does not have would be dead meaning."""
    from sessa_compiler.ir.ops import OPS
    from sessa_compiler.semantics import SEMANTICS

    assert sorted(set(SEMANTICS) - set(OPS)) == []
    assert sorted(set(OPS) - set(SEMANTICS)) == []


def test_frontend_and_semantics_do_not_import_backends():
    """The flow runs one way: the frontend's probes and the ops' meaning use sessa_compiler.semantics, never a
    backend (an import of sessa_compiler.backends from these packages is a layering error)."""
    import ast
    import pathlib

    import sessa_compiler

    root = pathlib.Path(sessa_compiler.__file__).parent
    bad = []
    for package in ("frontend", "semantics"):
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    module = "." * node.level + (node.module or "")
                    if module.lstrip(".").split(".")[0] == "backends" or module.startswith("sessa_compiler.backends"):
                        bad.append(f"{package}/{path.name}:{node.lineno} imports {module}")
                elif isinstance(node, ast.Import):
                    bad += [f"{package}/{path.name}:{node.lineno} imports {a.name}" for a in node.names
                            if a.name.startswith("sessa_compiler.backends")]
    assert bad == []


@pytest.mark.parametrize("name", ["0.weight", "d.block-1.weight", "x y", 'q"uote', "ünï.w", "_0"])
def test_any_value_name_round_trips(name):
    g = Graph("names")
    t = TensorType(DType("f32"), (sym("T"), 4))
    x = g.add_input(name + ".in", t)
    w = g.add_param(name, TensorType(DType("f32"), (4,)))
    y = g.make_node("mul", [x, w], {}, [t], names=[name + ".out"]).output
    g.outputs = [y]
    verify_graph(g)
    back = parse(str(g))
    assert str(back) == str(g)
    assert [v.name for v in back.inputs] == [name + ".in"] and list(back.param_values) == [name]
    assert back.outputs[0].name == name + ".out"


def test_dimension_identities_with_mod_and_floor_are_proved_by_residue():
    """Padding T up to a multiple of a chunk (Mamba-2 SSD, chunked GLA) gives sizes sympy.simplify cannot compare;
    is_zero proves them over the residues mod 8, and never calls a non-identity zero."""
    from sessa_compiler.ir.types import folded_dim, is_zero, parse_dim

    T = sym("T")
    padded = T + sympy.Mod(7 * T, 8)
    chunks = sympy.floor(padded / 8)
    assert is_zero(padded - 8 * chunks)
    assert folded_dim(sympy.floor(padded / chunks)) == 8
    assert is_zero(parse_dim("PythonMod(-T, 8)") - sympy.Mod(7 * T, 8))
    for wrong in (sympy.floor(T / 8), sympy.Mod(T, 8), padded - T, sympy.floor(T / 1000), chunks - T / 8):
        assert not is_zero(wrong), wrong
    assert folded_dim(sympy.floor(T / 1000)) == sympy.floor(T / 1000)   # 0 up to T = 999: not a constant
