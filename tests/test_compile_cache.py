"""The persistent compile cache (sessa_compiler/compile_cache.py, backends/tvm/lib_cache.py): a second
compile of the same module (a new CompiledModule, as in a new process) takes the traced graph and the
built TVM library from disk; a changed module or version misses; a corrupt entry is rebuilt."""
import pytest
import torch

import sessa_compiler as sc
import sessa_compiler.api as api
import sessa_compiler.compile_cache as compile_cache
from sessa_compiler.api import relative_error
from sessa_compiler.models import SessaLayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache_on(cache_dir, monkeypatch):
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "1")
    return cache_dir


def layer(**kw):
    torch.manual_seed(0)
    return SessaLayer(16, **{"n_heads": 2, "n_kv_heads": 1, **kw}).eval()


class Small(torch.nn.Module):
    """A module that traces and builds in a fraction of a second (the cache does not care what it holds)."""

    def __init__(self, width=8):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return torch.nn.functional.gelu(self.lin(x)).softmax(-1)


def small(width=8):
    torch.manual_seed(0)
    return Small(width).eval()


def no_tracing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("traced although the cache holds this module")
    monkeypatch.setattr(api, "trace_with_report", refuse)


def test_a_second_compile_takes_the_traced_graph_from_disk(cache_on, monkeypatch):
    m = layer()
    x = torch.randn(2, 7, 16)
    first = sc.compile(m, backend="eager")
    first(x)
    assert first.trace_cache == "miss"
    entries = list((cache_on / "traced").glob("*.pkl"))
    assert len(entries) == 1
    with monkeypatch.context() as mp:
        no_tracing(mp)
        again = sc.compile(layer(), backend="eager")  # an equal module, fresh weights objects
        m2 = again.original
        with torch.no_grad():
            m2.W_in.weight.mul_(2)  # its own weights are used, not the cached module's
            assert relative_error(again(x), m2(x)) <= 1e-5
        assert again.trace_cache == "hit"
        assert str(again.graph) == str(first.graph)  # the IR text round-trips
        assert again.explain().count("recognised") == first.explain().count("recognised")


def test_changed_module_or_version_misses(cache_on, monkeypatch):
    x = torch.randn(2, 5, 8)
    sc.compile(small(), backend="eager")(x)
    same = sc.compile(small(), backend="eager")
    same(x)
    assert same.trace_cache == "hit"
    wider = sc.compile(small(16), backend="eager")  # another configuration
    wider(torch.randn(2, 5, 16))
    assert wider.trace_cache == "miss"
    trained = sc.compile(small().train(), backend="eager")  # another mode
    trained(x)
    assert trained.trace_cache == "miss"
    versions = compile_cache._versions()
    monkeypatch.setattr(compile_cache, "_versions", lambda: {**versions, "torch": "0.0.0"})
    newer = sc.compile(small(), backend="eager")
    newer(x)
    assert newer.trace_cache == "miss"
    assert len(list((cache_on / "traced").glob("*.pkl"))) == 4


def test_a_corrupt_entry_is_rebuilt(cache_on):
    m = small()
    x = torch.randn(1, 4, 8)
    sc.compile(m, backend="eager")(x)
    (entry,) = (cache_on / "traced").glob("*.pkl")
    entry.write_bytes(b"\x80\x04 not a pickle")
    c = sc.compile(m, backend="eager")
    with pytest.warns(UserWarning, match="does not load"):
        y = c(x)
    assert c.trace_cache == "miss" and relative_error(y, m(x)) <= 1e-5
    assert sc.compile(m, backend="eager")(x) is not None and entry.exists()  # rewritten: loads again


def test_tvm_library_from_disk(cache_on, monkeypatch):
    import tvm

    m = small()
    x = torch.randn(2, 6, 8)
    sc.compile(m, backend="tvm")(x)  # builds, and writes the library
    (lib,) = (cache_on / "tvm").glob("*.so")
    bad = lib.with_name("partial")
    bad.write_bytes(b"\x7fELF truncated")
    bad.replace(lib)  # a corrupt library (written whole, as another process would: this one maps none yet)
    c = sc.compile(small(), backend="tvm")
    with pytest.warns(UserWarning, match="does not load"):
        y = c(x)
    assert relative_error(y, m(x)) <= 1e-4
    with monkeypatch.context() as mp:  # rebuilt and written again: now it loads, with no trace and no build
        no_tracing(mp)
        mp.setattr(tvm, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built again")))
        c = sc.compile(small(), backend="tvm")
        with torch.no_grad():
            assert relative_error(c(x), m(x)) <= 1e-4
        assert "mode: whole graph" in c.explain()
