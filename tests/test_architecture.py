"""The package's layers: what may import what (docs/architecture.md states the same rules).

The import graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a ``sessa_compiler`` module, relative ones resolved, *including imports inside
functions*. A function-level import defers loading a heavy or optional dependency (triton, tvm,
onnx); it is still a dependency, so it counts: an import placed in a function to dodge a cycle is a
cycle. Imports under ``if TYPE_CHECKING:`` count too (none exist today).

Each module belongs to a layer (a subpackage, or a group of top-level modules, ``LAYER_OF``); the
tests check that the layer graph has no cycle and that every edge is one ``MAY_IMPORT`` allows.
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = "sessa_compiler"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Top-level modules and the layer each belongs to; a subpackage is its own layer. A new top-level module
# must be placed here (test_every_module_has_a_layer).
LAYER_OF = {
    "errors": "base", "tolerance": "base", "_version": "base", "timing": "base", "progress": "base",
    "persistent_cache": "base",  # cache directory, hashing, versions: shared by the three persistent caches
    "library": "models",         # the torch custom ops that models call (torch.ops.sessa_compiler.*)
    "api": "api", "serving": "api", "compile_cache": "api",
    "op_registry": "export",     # reads every target's op tables, the exports' included (coverage matrix)
    "dynamo": "api",             # torch.compile(backend="sessa"): traces and runs like compile()
    "cli": "cli",
}

# The flow: module -> trace (frontend) -> IR -> passes -> backend -> compiled module (api); IR -> export.
# Each layer may import the layers listed (and itself); nothing imports the package root but the CLI.
_BELOW_BACKENDS = {"base", "ir", "semantics", "passes", "autotune"}
MAY_IMPORT = {
    "base": set(),
    "ir": {"base"},
    "semantics": {"base", "ir"},                        # every op's meaning in torch
    "passes": {"base", "ir", "semantics"},
    "frontend": {"base", "ir", "semantics", "passes"},  # not backends: probes use semantics
    "autotune": {"base", "ir"},                         # the cache, the search, the Tunable protocol
    "backends": _BELOW_BACKENDS,                        # implement autotune.Tunable; never call the frontend
    "models": {"base", "ir", "semantics"},
    "api": _BELOW_BACKENDS | {"frontend", "backends", "models"},
    "export": _BELOW_BACKENDS | {"frontend", "backends", "models", "api"},
    "root": set(),                                      # filled below: the package's facade imports anything
    "cli": set(),
}
MAY_IMPORT["root"] = set(MAY_IMPORT) - {"root", "cli"}
MAY_IMPORT["cli"] = set(MAY_IMPORT) - {"cli"}

# Edges that break a rule today and are being removed on another branch; the test of that rule is an
# expected failure (strict: it fails as soon as the edges are gone, so the marker is removed then).
PENDING: dict = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if (ROOT / parts[1]).is_dir():
        return parts[1]
    return LAYER_OF.get(parts[1])


def import_edges() -> list:
    """(importing module, imported module, line) for every import of a sessa_compiler module."""
    if ROOT not in _EDGES:
        _EDGES[ROOT] = _read_edges()
    return _EDGES[ROOT]


_EDGES: dict = {}  # package directory -> its edges (parsed once per session)


def _read_edges() -> list:
    mods = modules()
    edges = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            else:
                continue
            edges += [(mod, t, node.lineno) for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")]
    return edges


def layer_edges() -> dict:
    """(from layer, to layer) -> ['module:line -> module', ...] for edges between different layers."""
    out = collections.defaultdict(list)
    for src, dst, line in import_edges():
        a, b = layer(src), layer(dst)
        if a != b:
            out[(a, b)].append(f"{src}:{line} -> {dst}")
    return out


def test_the_import_graph_is_read():
    """The parser sees the package's real imports (a test that finds no edges would pass vacuously)."""
    edges = set((s, d) for s, d, _ in import_edges())
    assert ("sessa_compiler.api", "sessa_compiler.backends.base") in edges
    assert ("sessa_compiler.backends.triton.backend", "sessa_compiler.backends.triton.prepare") in edges
    assert ("sessa_compiler.autotune.search", "sessa_compiler.autotune.cache") in edges  # relative, from-import
    assert len(layer_edges()) > 20


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer(m) is None]
    assert not missing, f"top-level modules without a layer (add them to LAYER_OF): {missing}"
    assert set(LAYER_OF.values()) <= set(MAY_IMPORT)


def test_no_cycle_between_layers():
    """(The PENDING edges are left out here: each has its own expected failure below until it is gone.)"""
    edges = {k: v for k, v in layer_edges().items() if k not in PENDING}
    g = nx.DiGraph(list(edges))
    cycles = list(nx.simple_cycles(g))
    detail = "\n".join(f"{' -> '.join(c + [c[0]])}:\n    " +
                       "\n    ".join(w for a, b in zip(c, c[1:] + c[:1]) for w in edges[(a, b)][:3])
                       for c in cycles)
    assert not cycles, f"import cycles between layers:\n{detail}"


# Imports between files that still close a cycle, each a method that delegates to a module importing its own
# (function-level imports). Every other file-level cycle fails test_no_cycle_between_files; remove an entry once its
# edge is gone (test_pending_file_edges_still_exist fails until then).
PENDING_FILE_EDGES: dict = {}  # (importer, imported) pairs allowed to close a cycle for now: none


def file_cycles(skip=()) -> list:
    g = nx.DiGraph((s, d) for s, d, _ in import_edges() if s != d and (s, d) not in skip)
    return [c for c in nx.simple_cycles(g)]


def test_no_cycle_between_files():
    """No two files import each other, directly or through others (imports inside functions count)."""
    where = collections.defaultdict(list)
    for s, d, line in import_edges():
        where[(s, d)].append(f"{s}:{line}")
    cycles = file_cycles(skip=PENDING_FILE_EDGES)
    detail = "\n".join(" -> ".join(c + [c[0]]) + "\n    " + "\n    ".join(
        w for a, b in zip(c, c[1:] + c[:1]) for w in sorted(set(where[(a, b)]))) for c in cycles)
    assert not cycles, f"import cycles between files:\n{detail}"


def test_pending_file_edges_still_exist():
    edges = {(s, d) for s, d, _ in import_edges()}
    gone = [e for e in PENDING_FILE_EDGES if e not in edges]
    assert not gone, f"remove from PENDING_FILE_EDGES (the import is gone): {gone}"


def test_a_cycle_between_files_is_caught(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    (pkg / "export").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "export" / "__init__.py").write_text("")
    (pkg / "export" / "a.py").write_text("from .b import f\n")
    (pkg / "export" / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    assert sorted(file_cycles()[0]) == ["sessa_compiler.export.a", "sessa_compiler.export.b"]


def _rule_cases():
    cases = []
    for src in MAY_IMPORT:
        cases.append(pytest.param(src, None, id=src))
    for (src, dst), why in PENDING.items():
        cases.append(pytest.param(src, dst, id=f"{src}-not-{dst}", marks=pytest.mark.xfail(strict=True, reason=why)))
    return cases


@pytest.mark.parametrize("src,only", _rule_cases())
def test_layer_imports_only_what_it_may(src, only):
    """Every import from a layer goes to a layer MAY_IMPORT allows (a PENDING pair is checked on its own)."""
    bad = {(a, b): w for (a, b), w in layer_edges().items()
           if a == src and b not in MAY_IMPORT[src] and ((a, b) == (src, only) if only else (a, b) not in PENDING)}
    detail = "\n".join(f"{a} -> {b}:\n    " + "\n    ".join(w) for (a, b), w in bad.items())
    assert not bad, f"{src} may import only {sorted(MAY_IMPORT[src])}:\n{detail}"


def test_a_forbidden_edge_is_caught(tmp_path, monkeypatch):
    """The rules bite: a backends module that calls the frontend is reported."""
    pkg = tmp_path / PACKAGE
    for d in ("backends", "frontend"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "backends" / "x.py").write_text("def f():\n    from ..frontend import trace\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    assert layer_edges() == {("backends", "frontend"): ["sessa_compiler.backends.x:2 -> sessa_compiler.frontend"]}
