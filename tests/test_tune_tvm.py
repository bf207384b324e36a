"""Autotuning the TVM backend's schedules on CPU: sessa_compiler.tune(backend="tvm") and
compile(backend="tvm", autotune=True) search each core op's schedule (a small subset of
schedules.*_space, the backend's default first), verify every candidate against the eager backend,
store the fastest in the persistent cache, and later compiles (in a new process too) use it without
tuning; explain() says where each schedule came from.

Kernel builds are cached per process (backends/tvm/build.py), so the tests reuse each other's builds;
compiles use the hybrid mode (whole_graph=False) where the whole-graph Relax build (~10 s) adds nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tvm  # noqa: E402,F401  (pinned in requirements/all.txt: always installed)

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.backends.tvm import schedules as S
from sessa_compiler.models import MambaLayer
from sessa_compiler.autotune import defaults
from sessa_compiler.autotune.search import resolve_node
from sessa_compiler.backends.tvm import TVMBackend
from sessa_compiler.backends.tvm import schedule_choice as choice
from sessa_compiler.backends.tvm.schedule_choice import tunable_nodes, tvm_schedule, tvm_space
from tests.tune_helpers import T, example, model, run_compile, wrong_first

pytestmark = pytest.mark.usefixtures("cache_dir")  # a fresh tuning cache per test (conftest.py)

HYBRID = {"whole_graph": False}


def entries(d):
    return sorted(p for p in Path(d).rglob("*.json"))


def eager_graph(m, x):
    return sc.compile(m, (x,), backend="eager").graph


# The schedule spaces depend on the target's vector width: test an AVX2 (8 float lanes) and two AVX-512
# (16 lanes) targets by name, whatever this host has (the suite once failed only on AVX-512 hosts).
TARGETS = {"avx2": {"kind": "llvm", "mcpu": "znver3"}, "avx512": {"kind": "llvm", "mcpu": "skylake-avx512"},
           "avx512-epyc": {"kind": "llvm", "mcpu": "znver4"}}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_spaces_are_small_valid_and_start_with_the_backend_default(name):
    target = TARGETS[name]
    assert choice.target_lanes(target) == (8 if name == "avx2" else 16)
    for m, x, ops in ((model(), example(), {"feedback", "attention"}),
                      (MambaLayer(32).eval(), example(), {"scan"})):
        nodes = tunable_nodes(eager_graph(m, x), target)
        assert {n.op for n in nodes} == ops
        for n in nodes:
            space = tvm_space(n, target=target)
            spec = choice.kernel_spec(n, choice.target_lanes(target))
            assert space[0] == spec.schedule.as_dict()  # a 1-trial budget still verifies the default
            assert 2 <= len(space) <= 6 and len({json.dumps(c, sort_keys=True) for c in space}) == len(space)
            full = {"feedback": S.feedback_space, "attention": S.attention_space, "scan": S.scan_space}[n.op]
            assert all(tvm_schedule(n, c, target) in full(choice.schedule_size(spec)) for c in space)
            assert all(defaults.valid_config(c, "tvm", n.op) for c in space)
    assert tvm_schedule(nodes[0], {"channel_block": 3}, target) is None
    assert tvm_schedule(nodes[0], {"bogus": 1}, target) is None


@pytest.mark.parametrize("mcpu, lanes", [("znver3", 8), ("haswell", 8), ("alderlake", 8), ("znver4", 16),
                                         ("skylake-avx512", 16), ("rocketlake", 16), ("sapphirerapids", 16)])
def test_vector_width_follows_the_cpus_features(mcpu, lanes):
    """AVX-512 CPUs get 16 float lanes whether or not their name is in a list (rocketlake was not)."""
    assert choice.target_lanes({"kind": "llvm", "mcpu": mcpu}) == lanes


def test_the_host_space_is_one_of_the_named_targets_spaces():
    """The host's own space (what tuning uses by default) is the named target's with the same lanes."""
    node = next(n for n in tunable_nodes(eager_graph(model(), example())) if n.op == "attention")
    same = next(t for k, t in sorted(TARGETS.items()) if choice.target_lanes(t) == choice.target_lanes())
    assert tvm_space(node) == tvm_space(node, target=same)


def test_tuning_picks_a_verified_schedule_and_never_a_wrong_but_fast_one(cache_dir):
    injected = []
    wrong = {"chunk": 16, "key_block": 16, "rows": 1, "col_block": 16, "gemm_rows": 1}
    hook = wrong_first("feedback", wrong, injected)  # returns at once with a wrong answer, tried first
    m, x = model(), example()
    results = sc.tune(m, (x,), backend="tvm", budget="3 trials", progress=False, kernel_hook=hook)
    by_op = {r.kernel.split("[")[0]: r for r in results}
    assert set(by_op) == {"feedback", "attention"} and not any(r.from_cache for r in results)
    fb = by_op["feedback"]
    assert injected, "the wrong candidate was never tried"
    assert fb.config != wrong and [c for c, _ in fb.rejected] == [wrong] and "error" in fb.rejected[0][1]
    assert fb.tried == 3 and fb.median_ms > 0
    graph = eager_graph(m, x)
    for r in results:
        node = next(n for n in tunable_nodes(graph) if n.op == r.kernel.split("[")[0])
        assert r.config in tvm_space(node)  # a schedule from the space, verified against eager
    # (the hooked space hashes to another key.) Tuned for real, the stored schedules are the ones the
    # backend then builds, and they match eager
    results = sc.tune(m, (x,), backend="tvm", budget="3 trials", progress=False)
    # feedback tuned again under its real key; attention (not hooked) was already stored under its own
    assert len(entries(cache_dir)) == 3
    assert sorted((r.kernel.split("[")[0], r.from_cache) for r in results) == [("attention", True), ("feedback", False)]
    fb = next(r for r in results if r.kernel.startswith("feedback"))
    for r in results:
        node = next(n for n in tunable_nodes(graph) if n.op == r.kernel.split("[")[0])
        assert r.config in tvm_space(node)[:3] and not r.rejected  # 3 trials: the first three candidates
        assert resolve_node(TVMBackend(), node, T, "cpu") == (r.config, "tuned")
    compiled = sc.compile(m, (x,), backend="tvm", options=HYBRID)
    text = compiled.explain()
    assert text.count("[tuned]") == 2 and "schedules for T<=32" in text
    assert "chunk{chunk}_key_block{key_block}_rows{rows}_col_block{col_block}_gemm_rows{gemm_rows}".format(
        **fb.config) in text
    with torch.no_grad():
        assert relative_error(compiled(x), m(x)) <= 1e-4


def test_compile_autotune_matches_eager_and_explain_says_where_schedules_came_from(cache_dir):
    m = model()
    compiled = sc.compile(m, (example(),), backend="tvm", options=HYBRID,
                          autotune={"progress": False, "budget": "2 trials"})
    assert len(compiled.tune_results) == 2 and all(1 <= r.tried <= 2 for r in compiled.tune_results)
    assert len(entries(cache_dir)) == 2
    text = compiled.explain()
    assert text.count("[tuned]") == 2, text
    with torch.no_grad():
        for t in (T, 40, 5):  # one build serves every T (the schedule chosen for the example's class)
            x = example(t)
            assert relative_error(compiled(x), m(x)) <= 1e-4
    # schedules given to compile win over the cache; nothing tuned for another width: the backend's rule
    given = sc.compile(m, (example(),), backend="tvm", options={**HYBRID, "feedback_chunk_size": 32}).explain()
    assert "[given to compile]" in given and given.count("[tuned]") == 1 and "chunk32_" in given


def test_shipped_defaults_then_the_backend_rule_when_nothing_was_tuned(monkeypatch):
    m, x = model(), example()
    node = next(n for n in tunable_nodes(eager_graph(m, x)) if n.op == "feedback")
    table = {"cpu": {"tvm": {"feedback": {"*": {"chunk": 32, "key_block": 16, "rows": 2, "col_block": 16,
                                                "gemm_rows": 2}},
                             "attention": {"*": {"q_block": 64, "k_block": 3, "rows": 2, "v_lanes": 16}}}}}
    monkeypatch.setattr(defaults, "load_defaults", lambda path=None: table)
    assert resolve_node(TVMBackend(), node, T, "cpu") == (table["cpu"]["tvm"]["feedback"]["*"], "default")
    text = sc.compile(m, (x,), backend="tvm", options=HYBRID).explain()
    assert "[default]" in text and "chunk32_key_block16_rows2_col_block16_gemm_rows2" in text
    assert "[backend default]" in text  # the attention entry is invalid (k_block 3): ignored, not fatal
    monkeypatch.setattr(defaults, "load_defaults", lambda path=None: {})
    assert resolve_node(TVMBackend(), node, T, "cpu") == (None, "cost model")


def test_the_generator_source_read_from_files_is_the_text_inspect_reads():
    """A warm compile, before tvm is imported, reads the kernel generators' source from their files (importing a
    generator imports tvm); the tuning keys need the same text as inspect gives for the generator in use."""
    import importlib

    build = importlib.import_module("sessa_compiler.backends.tvm.build")
    for op in build._KERNEL_ARGS:
        assert build.generator_source_from_files(op) == build._generator_source_in_use(op), op


def test_the_cache_key_hashes_the_kernel_generators_source(tmp_path, monkeypatch):
    """The key holds the source of the generator in use (read with inspect, not a list of file names): an
    edited generator makes a new key; an op without a kernel is an error, never an empty source."""
    import importlib
    import importlib.util
    import inspect
    import sys

    from sessa_compiler.autotune.search import cache_key
    from sessa_compiler.errors import SessaCompilerError

    build = importlib.import_module("sessa_compiler.backends.tvm.build")  # the package exports a function `build`

    node = next(n for n in tunable_nodes(eager_graph(model(), example())) if n.op == "feedback")
    b = TVMBackend()
    before = cache_key(b, node, T, "cpu")
    assert before == cache_key(b, node, T, "cpu")
    # the same generator from another file, with one edit: what a changed kernels/feedback.py is
    text = inspect.getsource(inspect.getmodule(build.kernel_generator("feedback")))
    path = tmp_path / "edited_feedback_kernel.py"
    path.write_text(text.replace("from ..", "from sessa_compiler.backends.tvm.") + "\n# an edit\n")
    spec = importlib.util.spec_from_file_location("edited_feedback_kernel", path)
    edited = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "edited_feedback_kernel", edited)
    spec.loader.exec_module(edited)
    monkeypatch.setattr(build, "kernel_generator", lambda op: edited.feedback_kernel)
    monkeypatch.setattr(choice, "_SOURCES", {})
    after = cache_key(b, node, T, "cpu")
    assert after.source_hash != before.source_hash and after.space_hash == before.space_hash
    monkeypatch.setattr(choice, "kernel_spec", lambda node, lanes, schedule=None: None)   # no kernel here
    monkeypatch.setattr(choice, "_SOURCES", {})
    with pytest.raises(SessaCompilerError, match="generates no kernel"):
        choice.tuning_source(node)


def test_shipped_tvm_defaults_are_valid():
    for entry in defaults.load_defaults().values():
        for op, shapes in entry.get("tvm", {}).items():
            assert all(defaults.valid_config(c, "tvm", op) for c in shapes.values()), (op, shapes)


def test_warm_compile_in_a_new_process_runs_no_tuning(cache_dir):
    cold = run_compile(cache_dir, "tvm", HYBRID, {"progress": False, "budget": "2 trials"})
    assert cold["hits"] == [False, False] and cold["timed"] > 0 and cold["tune_s"] > 0
    warm = run_compile(cache_dir, "tvm", HYBRID, {"progress": False, "budget": "2 trials"})
    assert warm["hits"] == [True, True] and warm["timed"] == 0
    assert warm["configs"] == cold["configs"] and warm["err"] <= 1e-4
    assert warm["tune_s"] < 0.2 * cold["tune_s"], (warm["tune_s"], cold["tune_s"])
    assert warm["explain"].count("[tuned]") == 2
    print(f"tvm: cold compile {cold['compile_s']:.2f} s (tuning {cold['tune_s']:.2f} s), "
          f"warm compile {warm['compile_s']:.2f} s (cache lookups {warm['tune_s']:.3f} s)")


def test_cli_tune_tvm(capsys):
    from sessa_compiler.cli import main

    args = ["--model", "sessa", "--D", "32", "--heads", "2", "--T", str(T)]
    assert main(["tune", "--backend", "tvm", "--trials", "1", *args]) == 0
    out = capsys.readouterr().out
    assert "feedback[" in out and "attention[" in out and "1 tried" in out
    assert main(["tune", "--backend", "tvm", "--trials", "1", *args]) == 0
    assert capsys.readouterr().out.count("cache hit") == 2
