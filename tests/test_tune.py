"""Autotuning end to end on CPU (Triton kernels in the interpreter, timed with a CPU timer):
sessa_compiler.tune / compile(autotune=True), the cache across processes, damaged and foreign
entries, the shipped defaults, and the CLI."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import json
from pathlib import Path

import pytest
import torch

triton_env.require_interpreter()

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from sessa_compiler.backends.eager import run_graph
from sessa_compiler.autotune import TuningCache, defaults
from sessa_compiler.autotune import cache as tune_cache
from sessa_compiler.autotune.search import cache_key, parse_budget, resolve_node
from sessa_compiler.backends.triton import TritonBackend
from sessa_compiler.backends.triton.prepare import triton_space, tunable_nodes
from tests.tune_helpers import T, example, model, run_compile, wrong_first

pytestmark = pytest.mark.usefixtures("cache_dir")  # a fresh tuning cache per test (conftest.py)



def entries(d):
    return sorted(p for p in Path(d).rglob("*.json"))


def test_tuning_never_picks_a_wrong_but_fast_candidate():
    injected, wrong = [], {"chunk_size": 16, "num_warps": 1, "num_stages": 1}
    hook = wrong_first("feedback", wrong, injected)  # returns instantly with a wrong answer, tried first
    results = sc.tune(model(), (example(),), backend="triton", progress=False, kernel_hook=hook)
    by_op = {r.kernel.split("[")[0]: r for r in results}
    assert set(by_op) == {"feedback", "attention"} and not any(r.from_cache for r in results)
    fb = by_op["feedback"]
    assert injected, "the wrong candidate was never tried"
    assert fb.config != wrong
    assert fb.config in triton_space(next(n for n in tunable_nodes(sc.compile(model(), (example(),), backend="eager")
                                                                  .graph) if n.op == "feedback"), torch.device("cpu"))
    assert [c for c, _ in fb.rejected] == [wrong]
    assert "error" in fb.rejected[0][1] and fb.tried == 4 and fb.median_ms > 0


def test_compile_autotune_matches_eager_and_explain_shows_tuned_configs(cache_dir):
    m = model()
    compiled = sc.compile(m, (example(),), backend="triton", autotune={"progress": False, "budget": "2 trials"})
    assert len(compiled.tune_results) == 2 and all(r.tried <= 2 for r in compiled.tune_results)
    assert len(entries(cache_dir)) == 2
    text = compiled.explain()
    assert "kernel configs for T<=32" in text and text.count("[tuned]") == 2
    with torch.no_grad():
        for t in (T, 40, 5):  # T=40 and T=5 are other shape classes: defaults or cost model there
            x = example(t)
            out = compiled(x)
            assert relative_error(out, run_graph(compiled.graph, [x], compiled.graph.params)[0]) <= 1e-4
            assert relative_error(out, m(x)) <= 1e-4
    assert "[tuned]" not in compiled.explain()  # describes the last shape class used (T<=8: not tuned)


def test_warm_compile_in_a_new_process_runs_no_tuning_and_is_faster(cache_dir):
    cold = run_compile(cache_dir, "triton", None, {"progress": False})
    assert cold["hits"] == [False, False] and cold["timed"] > 0 and cold["tune_s"] > 0
    warm = run_compile(cache_dir, "triton", None, {"progress": False})
    assert warm["hits"] == [True, True] and warm["timed"] == 0
    assert warm["configs"] == cold["configs"] and warm["err"] <= 1e-4 * 10
    assert warm["tune_s"] < 0.1 * cold["tune_s"], (warm["tune_s"], cold["tune_s"])
    # warm "is faster" is shown structurally (no config timed, cache lookups only), not by comparing two
    # wall-clock compile times whose tracing noise on a loaded machine is of the same size as the saving
    assert warm["explain"].count("[tuned]") == 2
    print(f"cold compile {cold['compile_s']:.2f} s (tuning {cold['tune_s']:.2f} s), "
          f"warm compile {warm['compile_s']:.2f} s (cache lookups {warm['tune_s']:.3f} s)")


def test_corrupted_cache_files_are_misses_and_are_retuned(cache_dir):
    m, x = model(), example()
    sc.tune(m, (x,), backend="triton", budget="1 trial", progress=False)
    files = entries(cache_dir)
    assert len(files) == 2
    files[0].write_text(files[0].read_text()[:40])   # truncated
    files[1].write_bytes(b"\x00\xff{not json")        # garbage
    compiled = sc.compile(m, (x,), backend="triton")  # no crash: defaults / cost model
    assert "[tuned]" not in compiled.explain()
    with torch.no_grad():
        assert relative_error(compiled(x), m(x)) <= 1e-4
    again = sc.tune(m, (x,), backend="triton", budget="1 trial", progress=False)
    assert not any(r.from_cache for r in again)
    assert len(list(Path(cache_dir).rglob("*.corrupt"))) == 2
    assert sc.compile(m, (x,), backend="triton").explain().count("[tuned]") == 2


def test_entries_keyed_to_another_device_or_version_are_rejected(cache_dir, monkeypatch):
    m, x = model(), example()
    sc.tune(m, (x,), backend="triton", budget="1 trial", progress=False)
    graph = sc.compile(m, (x,), backend="eager").graph
    node = next(n for n in tunable_nodes(graph) if n.op == "feedback")
    assert resolve_node(TritonBackend(), node, T, "cpu")[1] == "tuned"
    # the same kernel under another torch version or on another device: a miss (shipped defaults instead)
    real_versions = tune_cache.library_versions
    monkeypatch.setattr(tune_cache, "library_versions", lambda b: {**real_versions(b), "torch": "0.0-other"})
    assert resolve_node(TritonBackend(), node, T, "cpu")[1] != "tuned"
    monkeypatch.setattr(tune_cache, "library_versions", real_versions)
    monkeypatch.setattr(tune_cache, "device_key", lambda device=None: "cpu:Some Other CPU:64c")
    assert resolve_node(TritonBackend(), node, T, "cpu")[1] != "tuned"
    monkeypatch.undo()
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(cache_dir))
    # a file at this key's path whose stored key names another device or version is rejected too
    key = cache_key(TritonBackend(), node, T, "cpu")
    path = TuningCache().path(key)
    for field, value in (("device", "cuda:NVIDIA H200:sm_90"), ("versions", {"torch": "0.0-other"})):
        entry = json.loads(path.read_text()) if path.exists() else None
        if entry is None:
            sc.tune(m, (x,), backend="triton", budget="1 trial", progress=False)
            entry = json.loads(path.read_text())
        entry["key"][field] = value
        path.write_text(json.dumps(entry))
        assert resolve_node(TritonBackend(), node, T, "cpu")[1] != "tuned"
        assert not path.exists()


def test_shipped_defaults_are_used_when_nothing_was_tuned(monkeypatch):
    m, x = model(), example()
    compiled = sc.compile(m, (x,), backend="triton")
    text = compiled.explain()
    assert "[default]" in text and "[tuned]" not in text
    cfg = defaults.default_config(tune_cache.device_key(), "triton", "feedback", "T<=32")
    assert cfg is not None and f"chunk_size={cfg['chunk_size']}" in text
    # options given to compile win over the table
    assert "feedback_chunk_size=16" in sc.compile(m, (x,), backend="triton",
                                                  options={"feedback_chunk_size": 16}).explain()
    assert defaults.device_class("cuda:NVIDIA H200:sm_90") == "sm_90"
    assert defaults.default_config("cuda:NVIDIA H200:sm_90", "triton", "feedback", "T<=4096")["chunk_size"] == 64
    assert defaults.default_config("cuda:NVIDIA H200:sm_90", "triton", "feedback", "T<=128")["chunk_size"] == 32  # the T<=256 entry covers T<=128
    assert defaults.default_config("rocm:x:gfx90a", "triton", "feedback") is None
    for entry in defaults.load_defaults().values():  # every shipped entry is a valid config
        for ops in entry.get("triton", {}).values():
            assert all(defaults.valid_config(c) for c in ops.values())


def test_the_cache_key_hashes_the_generated_kernel_source(monkeypatch):
    """An edit to a kernel generator that changes what it generates makes a new key (stale entries are never
    hits); a node the backend generates no kernel for is an error, never an empty source."""
    import dataclasses

    from sessa_compiler.backends.triton import backend as triton_backend
    from sessa_compiler.backends.triton import prepare
    from sessa_compiler.errors import SessaCompilerError

    graph = sc.compile(model(), (example(),), backend="eager").graph
    node = next(n for n in tunable_nodes(graph) if n.op == "attention")
    b = TritonBackend()
    before = cache_key(b, node, T, "cpu")
    assert before == cache_key(b, node, T, "cpu")  # deterministic
    real = triton_backend.generate_attention

    def edited(*args, **kwargs):
        src = real(*args, **kwargs)
        return dataclasses.replace(src, body=src.body.replace("tl.dot(", "tl.dot( "))
    assert "tl.dot(" in real(node, {"q": "f32", "k": "f32", "v": "f32", "inv_freq": "f32"}, True).body
    monkeypatch.setattr(triton_backend, "generate_attention", edited)
    monkeypatch.setattr(prepare, "_SOURCES", {})
    after = cache_key(b, node, T, "cpu")
    assert after.source_hash != before.source_hash and after.digest() != before.digest()
    assert after.space_hash == before.space_hash
    monkeypatch.setattr(triton_backend, "_generator", lambda node: None)   # no kernel for the op
    monkeypatch.setattr(prepare, "_SOURCES", {})
    with pytest.raises(SessaCompilerError, match="generates no kernel"):
        cache_key(b, node, T, "cpu")


def test_budget_parsing():
    assert parse_budget(None) == (None, None)
    assert parse_budget(30) == (30.0, None) and parse_budget("30s") == (30.0, None)
    assert parse_budget("2m") == (120.0, None) and parse_budget("5 trials") == (None, 5)
    with pytest.raises(sc.SessaCompilerError):
        parse_budget("soon")


def test_cli_tune_then_explain_shows_the_tuned_configs(capsys):
    from sessa_compiler.cli import main

    args = ["--model", "sessa", "--D", "32", "--heads", "2", "--T", str(T)]
    assert main(["tune", "--backend", "triton", "--trials", "1", *args]) == 0
    out = capsys.readouterr().out
    assert "feedback[" in out and "attention[" in out and "1 tried" in out
    assert main(["tune", "--backend", "triton", "--trials", "1", *args]) == 0
    assert capsys.readouterr().out.count("cache hit") == 2
    assert main(["explain", "--backend", "triton", *args]) == 0
    out = capsys.readouterr().out
    assert "kernel configs for T<=32" in out and out.count("[tuned]") == 2
