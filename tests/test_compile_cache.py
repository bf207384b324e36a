"""The persistent compile cache (sessa_compiler/compile_cache.py, backends/tvm/lib_cache.py): a second
compile of the same module (a new CompiledModule, as in a new process) takes the traced graph and the
built TVM library from disk; a changed module or version misses; a corrupt entry is rebuilt."""
import dataclasses
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sessa_compiler as sc
import sessa_compiler.api as api
import sessa_compiler.compile_cache as compile_cache
from sessa_compiler.api import relative_error
from sessa_compiler.models import SessaLayer
from user_files import load_source

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


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


def test_exports_take_the_compiled_trace_from_the_cache_with_the_modules_own_weights(cache_on, monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tvm")
    import onnxruntime as ort

    x = torch.randn(2, 7, 16)
    sc.compile(layer(), backend="eager")(x)   # stores the trace
    m = layer()
    with torch.no_grad():
        m.W_in.weight.mul_(2)                 # the export must write this module's weights, not the cached ones
    x2 = torch.randn(1, 11, 16)
    with monkeypatch.context() as mp:
        trace_module = sys.modules["sessa_compiler.frontend.trace"]   # (the package's `trace` is the function)
        mp.setattr(trace_module, "export_program", lambda *a, **k: pytest.fail("traced although the cache holds it"))
        sc.export_onnx(m, x, str(tmp_path / "m.onnx"))
        sc.export_tvm(m, x, str(tmp_path / "tvm"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (y_onnx,) = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})
    y_tvm = sc.load_tvm(str(tmp_path / "tvm"))(x2.numpy())
    y_tvm = y_tvm[0] if isinstance(y_tvm, (list, tuple)) else y_tvm
    want = m(x2)
    assert relative_error(torch.as_tensor(y_onnx), want) <= 1e-4
    assert relative_error(torch.as_tensor(y_tvm), want) <= 1e-4


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

    from sessa_compiler.backends.tvm import lib_cache

    m = small()
    x = torch.randn(2, 6, 8)
    with monkeypatch.context() as mp:   # the library just written is not loaded (the built executable runs), so
        mp.setattr(lib_cache, "load_vm", lambda *a: 1 / 0)   # that this process maps none of it yet
        c = sc.compile(m, backend="tvm")
        assert relative_error(c(x), m(x)) <= 1e-4   # builds, and writes the library
    (lib,) = (cache_on / "tvm").glob("*.so")
    bad = lib.with_name("partial")
    bad.write_bytes(b"\x7fELF truncated")
    bad.replace(lib)  # a corrupt library (written whole, as another process would: this one maps none yet)
    import hashlib   # with the digest of those bytes beside it, so that loading is what fails
    lib.with_suffix(".sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
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
        assert "traced graph from the compile cache; TVM libraries: 1 from the cache" in c.explain()


def test_tvm_training_kernels_come_from_the_cache_in_a_new_process(cache_on, monkeypatch):
    """The kernels a TVM training step builds (attention and feedback forward and backward) are written to the cache;
    a process without them in memory loads them instead of building, and a corrupt one is rebuilt."""
    import importlib

    import tvm

    tvm_build = importlib.import_module("sessa_compiler.backends.tvm.build")   # (the package's `build` is a function)

    def step():
        m = layer()
        x = torch.randn(2, 7, 16)
        c = sc.compile(m, backend="tvm")
        c(x).square().sum().backward()
        m2 = layer()
        m2(x).square().sum().backward()
        for (n, p), p2 in zip(m.named_parameters(), m2.parameters()):
            assert relative_error(p.grad, p2.grad) <= 1e-4, n

    monkeypatch.setattr(tvm_build, "_CACHE", {})   # as in a new process
    step()
    assert len(sorted((cache_on / "tvm-kernels").glob("*.so"))) >= 2
    # this process has loaded those files (the dynamic loader would hand the same ones back by name): a copy of
    # the cache at another path is what a new process finds
    import shutil

    other = cache_on.parent / (cache_on.name + "-copy")
    shutil.copytree(cache_on, other)
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(other))
    kernels = sorted((other / "tvm-kernels").glob("*.so"))
    kernels[0].write_bytes(b"\x7fELF truncated")   # a corrupt one (its digest no longer matches)
    monkeypatch.setattr(tvm_build, "_CACHE", {})
    with pytest.warns(UserWarning, match="does not match the digest"):
        step()
    monkeypatch.setattr(tvm_build, "_CACHE", {})
    with monkeypatch.context() as mp:   # every kernel (the rebuilt one too) now loads: nothing is built
        mp.setattr(tvm, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built again")))
        step()


def test_tvm_decode_kernels_come_from_the_cache_in_a_new_process(cache_on, monkeypatch):
    """generate() on TVM builds the decode kernels once: a process without them in memory loads them from the cache,
    and generates the same tokens."""
    import importlib

    import tvm

    from sessa_compiler.models import Decoder

    tvm_decode = importlib.import_module("sessa_compiler.backends.tvm.decode")
    prompt = torch.randint(0, 50, (2, 5))

    def generate():
        torch.manual_seed(0)
        c = sc.compile(Decoder(50, 16, "SS", n_heads=2).eval(), backend="tvm")
        return c.generate(prompt, 4), c

    monkeypatch.setattr(tvm_decode, "_BUILT", {})   # as in a new process
    first, c = generate()
    assert c._serving is not None and list((cache_on / "tvm-kernels").glob("*.so"))
    monkeypatch.setattr(tvm_decode, "_BUILT", {})
    with monkeypatch.context() as mp:
        mp.setattr(tvm, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built again")))
        again, _ = generate()
    assert torch.equal(again, first)


WARM_TVM = """
import json, sys
import torch
import sessa_compiler as sc
from sessa_compiler.api import relative_error
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Softmax(-1)).eval()
x = torch.randn(2, 6, 8)
c = sc.compile(m, (x,), backend="tvm")
with torch.no_grad():
    err = float(relative_error(c(x), m(x)))
out = {"cache": c.trace_cache, "err": err, "tvm": "tvm" in sys.modules, "networkx": "networkx" in sys.modules,
       "library": "TVM libraries: 1 from the cache" in c.explain()}
import tvm  # afterwards, in the same process: tvm loads the same runtime library; old and new libraries both run
m2 = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh()).eval()
c2 = sc.compile(m2, (x,), backend="tvm")
with torch.no_grad():
    out["err_after"] = max(float(relative_error(c(x), m(x))), float(relative_error(c2(x), m2(x))))
print(json.dumps(out))
"""


def test_a_warm_tvm_compile_imports_neither_tvm_nor_networkx(tmp_path):
    """A new process whose cache holds the traced graph, the built library and this host's target runs the
    library through tvm_ffi and the TVM runtime library (lib_cache.load_vm): `import tvm` (about a second, most
    of a warm compile) and networkx are not loaded, and the outputs are right."""
    env = {**os.environ, "SESSA_COMPILER_CACHE_DIR": str(tmp_path), "SESSA_COMPILER_COMPILE_CACHE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", WARM_TVM], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    cold, warm = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert cold["cache"] == "miss" and cold["tvm"] and cold["err"] <= 1e-4
    assert warm == {"cache": "hit", "err": warm["err"], "tvm": False, "networkx": False, "library": True,
                    "err_after": warm["err_after"]}, warm
    assert warm["err"] <= 1e-4 and warm["err_after"] <= 1e-4 and cold["err_after"] <= 1e-4


def test_the_host_target_is_recorded_per_cpu(cache_on, monkeypatch):
    """The host's resolved target is read back from the cache (no `import tvm` needed for it) on the same CPU,
    tvm and package; another CPU identity, or a malformed record, resolves it again."""
    from sessa_compiler.backends.tvm import target as tvm_target
    from sessa_compiler.backends.tvm.backend import TVMBackend

    real, calls = tvm_target._resolve_host_target, []
    monkeypatch.setattr(tvm_target, "_resolve_host_target", lambda: calls.append(1) or real())
    first = TVMBackend()
    assert len(calls) == 1 and not isinstance(first.key_target, tvm_target.HostTarget)
    second = TVMBackend()
    assert len(calls) == 1 and isinstance(second.key_target, tvm_target.HostTarget)
    assert (str(second.key_target), second.lanes) == (str(first.target), first.lanes)
    assert str(second.target) == str(first.target) and len(calls) == 2   # the real Target, resolved when needed
    cpu = tvm_target._cpu_identity()
    monkeypatch.setattr(tvm_target, "_cpu_identity", lambda: {**cpu, "flags": "sse2"})   # another CPU
    assert not isinstance(TVMBackend().key_target, tvm_target.HostTarget) and len(calls) == 3
    (record,) = [p for p in (cache_on / "tvm").glob("host-*.target") if p == tvm_target._host_record_path()]
    record.write_text(json.dumps({"text": "{}", "lanes": 16}))   # malformed: not an llvm target
    assert not isinstance(TVMBackend().key_target, tvm_target.HostTarget) and len(calls) == 4


def test_a_library_just_built_runs_from_the_file_written(cache_on, monkeypatch):
    """The cold path writes the library for the next process and runs that file too: a VM over the in-memory
    executable would generate its code a second time (0.75 s of a 4-layer decoder's first call)."""
    from tvm import relax

    from sessa_compiler.backends.tvm import lib_cache

    real_vm, real_load, runs_on = relax.VirtualMachine, lib_cache.load_vm, []
    monkeypatch.setattr(relax, "VirtualMachine",
                        lambda mod, *a, **k: runs_on.append(type(mod).__name__) or real_vm(mod, *a, **k))
    monkeypatch.setattr(lib_cache, "load_vm", lambda path: runs_on.append(path.suffix) or real_load(path))
    m, x = small(), torch.randn(2, 6, 8)
    c = sc.compile(m, backend="tvm")
    with torch.no_grad():
        assert relative_error(c(x), m(x)) <= 1e-4
    assert "TVM libraries: 1 built" in c.explain() and runs_on == [".so"], (c.explain(), runs_on)  # no VMExecutable


# -- the key covers what the trace ran (issue 23): each case must give the changed module's outputs ----------------
CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import sessa_compiler as sc
from model import Model
torch.manual_seed(0)
m = Model().eval()
x = torch.randn(2, 5, 8)
c = sc.compile(m, backend="eager")
with torch.no_grad():
    y, ref = c(x), m(x)
print(json.dumps({"cache": c.trace_cache, "err": float((y - ref).abs().max() / ref.abs().max())}))
"""

MODEL = """
import torch
from helpers import act

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return act(self.lin(x))
"""


def run_child(src: Path, cache: Path) -> dict:
    env = {**os.environ, "SESSA_COMPILER_CACHE_DIR": str(cache), "SESSA_COMPILER_COMPILE_CACHE": "1",
           "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_edited_helper_in_another_file_misses_in_a_new_process(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.py").write_text(MODEL)
    (src / "helpers.py").write_text("import torch\n\n\ndef act(x):\n    return torch.tanh(x)\n")
    cache = tmp_path / "cache"
    first = run_child(src, cache)
    assert first["cache"] == "miss" and first["err"] <= 1e-5
    assert run_child(src, cache) == {"cache": "hit", "err": first["err"]}  # the cache works between processes
    (src / "helpers.py").write_text("import torch\n\n\ndef act(x):\n    return torch.sigmoid(x)\n")
    edited = run_child(src, cache)  # the old graph computed tanh: relative error ~1 if it were reused
    assert edited["cache"] == "miss" and edited["err"] <= 1e-5


def check_new_outputs(m, x) -> str:
    c = sc.compile(m, backend="eager")
    with torch.no_grad():
        assert relative_error(c(x), m(x)) <= 1e-5
    return c.trace_cache


def test_a_monkeypatched_forward_misses(cache_on):
    m, x = small(), torch.randn(2, 5, 8)
    assert check_new_outputs(m, x) == "miss" and check_new_outputs(small(), x) == "hit"
    patched = small()
    patched.forward = types.MethodType(lambda self, x: torch.tanh(self.lin(x)), patched)
    assert check_new_outputs(patched, x) == "miss"
    with pytest.MonkeyPatch.context() as mp:  # on the class, too
        mp.setattr(Small, "forward", lambda self, x: torch.sigmoid(self.lin(x)) * 3)
        assert check_new_outputs(small(), x) == "miss"
    assert check_new_outputs(small(), x) == "hit"  # the original again: its entry was not overwritten


GLOBALS = """
import torch
SCALE = 2.0
TABLE = {"shift": 0.5}

class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * SCALE + TABLE["shift"]
"""


def test_a_changed_global_constant_misses(cache_on, tmp_path, monkeypatch):
    mod = load_source(tmp_path, "scaled_model_globals", GLOBALS)
    monkeypatch.setitem(sys.modules, "scaled_model_globals", mod)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    assert check_new_outputs(mod.Scaled().eval(), x) == "miss"
    assert check_new_outputs(mod.Scaled().eval(), x) == "hit"
    mod.SCALE = -3.0
    assert check_new_outputs(mod.Scaled().eval(), x) == "miss"
    mod.TABLE["shift"] = 4.0  # a value inside a global container
    assert check_new_outputs(mod.Scaled().eval(), x) == "miss"


class NormConfig:
    """A plain (non-dataclass) configuration object held by a submodule."""

    def __init__(self, eps):
        self.eps = eps


class Norm(torch.nn.Module):
    def __init__(self, eps=1e-5):
        super().__init__()
        self.cfg = NormConfig(eps)
        self.weight = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * self.weight


class Normed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = Norm()

    def forward(self, x):
        return self.norm(self.lin(x))


def test_a_changed_submodule_attribute_misses(cache_on):
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    m = Normed().eval()
    assert check_new_outputs(m, x) == "miss" and check_new_outputs(m, x) == "hit"
    m.norm.cfg.eps = 10.0  # baked into the traced graph as a constant
    assert check_new_outputs(m, x) == "miss"


def test_another_torch_or_library_version_misses(cache_on, monkeypatch):
    x = torch.randn(2, 5, 8)
    assert check_new_outputs(small(), x) == "miss" and check_new_outputs(small(), x) == "hit"
    with monkeypatch.context() as mp:
        mp.setattr(torch, "__version__", "2.99.0+other")
        assert check_new_outputs(small(), x) == "miss"
    assert check_new_outputs(small(), x) == "hit"
    real = compile_cache.library_version  # a library the trace ran (torch's sympy) upgraded
    monkeypatch.setattr(compile_cache, "library_version", lambda top: "sympy==0.0" if top == "sympy" else real(top))
    assert check_new_outputs(small(), x) == "miss"


# -- trust: entries are pickles and shared libraries; only a directory only this user can write is used ------------
def compiled_without_the_cache(m, x, match: str):
    c = sc.compile(m, backend="eager")
    with pytest.warns(UserWarning, match=match):
        y = c(x)
    assert relative_error(y, m(x)) <= 1e-5
    return c


def test_a_group_writable_cache_directory_is_not_used(cache_on):
    m, x = small(), torch.randn(2, 5, 8)
    sc.compile(m, backend="eager")(x)
    cache_on.chmod(0o775)
    c = compiled_without_the_cache(m, x, r"writable by group.*chmod go-w")
    assert c.trace_cache != "hit"
    cache_on.chmod(0o700)
    assert check_new_outputs(m, x) == "hit"


def test_a_cache_owned_by_another_user_is_not_used(cache_on, monkeypatch):
    import sessa_compiler.persistent_cache as persistent_cache

    m, x = small(), torch.randn(2, 5, 8)
    sc.compile(m, backend="eager")(x)
    monkeypatch.setattr(persistent_cache, "_current_uid", lambda: os.getuid() + 1)  # as if another user owned it
    c = compiled_without_the_cache(m, x, r"owned by uid .*not by the current user")
    assert c.trace_cache != "hit"


class Planted:
    """A pickle that runs code when loaded (what a planted entry would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_entry_is_not_loaded(cache_on, tmp_path):
    import pickle

    m, x = small(), torch.randn(2, 5, 8)
    sc.compile(m, backend="eager")(x)
    (entry,) = (cache_on / "traced").glob("*.pkl")
    marker = tmp_path / "pwned"
    entry.write_bytes(pickle.dumps(Planted(marker)))
    entry.chmod(0o666)  # written by someone else: anyone may write it
    c = compiled_without_the_cache(m, x, r"writable by group and others")
    assert not marker.exists() and c.trace_cache != "hit"


def test_the_tuning_cache_ignores_an_untrusted_directory(tmp_path):
    from sessa_compiler.autotune import TuningCache, make_key

    cache = TuningCache(tmp_path / "tune")
    k = make_key("triton", "feedback[f32,D=64]", "source", [{"chunk": 32}], 100)
    cache.put(k, {"chunk": 32})
    assert cache.get(k) == {"chunk": 32}
    (tmp_path / "tune").chmod(0o777)
    with pytest.warns(UserWarning, match="writable by group and others"):
        assert cache.get(k) is None


def test_explain_says_what_came_from_the_caches(cache_on):
    m, x = small(), torch.randn(2, 5, 8)
    first = sc.compile(m, backend="eager")
    first(x)
    assert "traced graph not in the compile cache (traced): no entry" in first.explain()
    again = sc.compile(small(), backend="eager")
    again(x)
    assert "traced graph from the compile cache" in again.explain()


CLASS_ATTRIBUTE = """
import torch

class Scaled(torch.nn.Module):
    SCALE = 2.0

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * self.SCALE
"""


def test_a_replaced_class_attribute_misses(cache_on, tmp_path, monkeypatch):
    mod = load_source(tmp_path, "scaled_model_class_attr", CLASS_ATTRIBUTE)
    monkeypatch.setitem(sys.modules, "scaled_model_class_attr", mod)
    x = torch.randn(2, 5, 8)
    assert check_new_outputs(mod.Scaled().eval(), x) == "miss" and check_new_outputs(mod.Scaled().eval(), x) == "hit"
    mod.Scaled.SCALE = 5.0
    assert check_new_outputs(mod.Scaled().eval(), x) == "miss"


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        raise RuntimeError("broken forward")


def test_the_recorder_is_removed_when_the_trace_fails(cache_on):
    m = Broken().eval()
    with pytest.raises(Exception, match="broken forward"):
        sc.compile(m, backend="eager")(torch.randn(2, 3, 8))
    assert sys.getprofile() is None
    assert not m._forward_hooks and not m._forward_pre_hooks


def test_a_value_that_cannot_be_fingerprinted_is_never_cached(cache_on):
    import threading

    m, x = small(), torch.randn(2, 5, 8)
    m.lock = threading.Lock()  # the key cannot see into it: no entry, rather than a possibly stale one
    c = sc.compile(m, backend="eager")
    c(x)
    assert c.trace_cache == "off" and "attribute 'lock' of Small holds" in c.explain()
    assert not (cache_on / "traced").exists() or not list((cache_on / "traced").glob("*.pkl"))


def test_concurrent_compiles_in_threads(cache_on):
    from concurrent.futures import ThreadPoolExecutor

    x = torch.randn(2, 5, 8)
    patched = small()
    patched.forward = types.MethodType(lambda self, x: torch.tanh(self.lin(x)), patched)
    models = [small(), patched]

    def run(m):
        c = sc.compile(m, backend="eager")
        with torch.no_grad():
            err = relative_error(c(x), m(x))
        return c.trace_cache, err, c.trace_cache_why
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, models))
    assert all(err <= 1e-5 for _, err, _ in results) and sys.getprofile() is None
    assert len(list((cache_on / "traced").glob("*.pkl"))) == 2, results
    with ThreadPoolExecutor(2) as pool:  # each entry serves its own module only
        again = list(pool.map(run, models))
    assert [cache for cache, err, _ in again if err <= 1e-5] == ["hit", "hit"], (results, again)   # with the why


class MaskBufferAttention(torch.nn.Module):
    """Attention masked by a stored [64, 64] buffer: causal when ``window`` is None (the recogniser replaces the
    buffer by the attention op's causal flag), a sliding window otherwise (no causal attention: not replaced)."""

    def __init__(self, width=16, window=None):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.register_buffer("mask", window_mask(window))

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, -1)
        s = (q @ k.transpose(-1, -2)) / 4
        return torch.softmax(s.masked_fill(~self.mask[:T, :T], float("-inf")), -1) @ v


def window_mask(window):
    m = torch.tril(torch.ones(64, 64, dtype=torch.bool))
    return m if window is None else m & ~torch.tril(torch.ones(64, 64, dtype=torch.bool), -window)


def test_a_module_whose_replaced_buffer_differs_misses(cache_on):
    """The cache key sees the module's code and structure, not its tensors' values; a graph in which a recogniser
    replaced a buffer by what it proved from its values (a causal mask) records that buffer's digest, and a module
    of the same code with another buffer (a sliding window) traces again instead of reusing the causal graph."""
    x = torch.randn(2, 20, 16)
    causal = sc.compile(MaskBufferAttention(), backend="eager")
    assert relative_error(causal(x), causal._orig_mod(x)) < 1e-6
    assert "mask" in dict(causal._traced.assumed)
    window = MaskBufferAttention(window=4)
    c = sc.compile(window, backend="eager")
    assert relative_error(c(x), window(x)) < 1e-6
    assert c.trace_cache == "miss" and "'mask' differs" in c.trace_cache_why


def test_a_buffer_a_recogniser_looked_at_and_left_is_part_of_the_entry(cache_on):
    """The other order: a graph in which the recogniser looked at a buffer and left it (a sliding window is not
    causal) is not served to a module of the same code whose buffer is causal, which would lose its recognised
    attention (found by running the suite twice on one cache: a stored rotary table bent out of shape, traced first,
    was served to the unbent one)."""
    x = torch.randn(2, 20, 16)
    window = MaskBufferAttention(window=4)
    c = sc.compile(window, backend="eager")
    assert relative_error(c(x), window(x)) < 1e-6
    assert "causal=True" not in str(c.graph)
    causal = sc.compile(MaskBufferAttention(), backend="eager")
    assert relative_error(causal(x), causal._orig_mod(x)) < 1e-6
    assert causal.trace_cache == "miss" and "buffer 'mask' differs" in causal.trace_cache_why
    assert "causal=True" in str(causal.graph)
    again = sc.compile(MaskBufferAttention(), backend="eager")   # and its own entry serves it
    again(x)
    assert again.trace_cache == "hit" and "causal=True" in str(again.graph)


def test_a_replaced_buffer_edited_in_place_or_loaded_traces_again(cache_on):
    x = torch.randn(2, 20, 16)
    m = MaskBufferAttention()
    c = sc.compile(m, backend="eager")
    assert relative_error(c(x), m(x)) < 1e-6
    with torch.no_grad():
        m.mask.copy_(window_mask(4))           # in place: the same tensor object, a new version
    assert relative_error(c(x), m(x)) < 1e-6
    assert "'mask' changed" in c.retraces[-1]
    m.load_state_dict({**m.state_dict(), "mask": window_mask(None)})
    assert relative_error(c(x), m(x)) < 1e-6
    m.mask = window_mask(6)                    # reassigned
    assert relative_error(c(x), m(x)) < 1e-6


def test_global_hooks_key_the_users_not_torchs_own():
    """torch.export installs a global buffer-registration hook for the length of an export: a key computed
    in another thread at that moment must not differ (it did: a flaky concurrent-compile miss), while a
    global hook the user installed does change the key."""
    from torch._functorch._aot_autograd.utils import register_buffer_assignment_hook

    m, x = small(), torch.randn(2, 5, 8)
    key = compile_cache.module_key(m, (x,), {}, ())
    handle = register_buffer_assignment_hook(m, {})   # torch's own, as during an export
    try:
        assert compile_cache.module_key(m, (x,), {}, ()) == key
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: out)
    try:
        assert compile_cache.module_key(m, (x,), {}, ()) != key
    finally:
        handle.remove()
    assert compile_cache.module_key(m, (x,), {}, ()) == key


@dataclasses.dataclass
class SmallOutput:
    """An output dataclass the user never registered as a pytree node (the compiler does, while tracing)."""
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SmallWithOutput(Small):
    def forward(self, x):
        return SmallOutput(logits=super().forward(x))


def test_an_output_dataclass_is_rebuilt_from_a_cache_hit_in_a_process_that_never_traced_it(cache_on):
    """The traced graph's output spec names an unregistered dataclass: a process that takes the graph from the
    cache (here: the class's pytree registration undone, as in a new process) must rebuild it, not raise
    KeyError in tree_unflatten (it did, on the Hugging Face-style LM's output class)."""
    import torch.utils._pytree as pytree

    torch.manual_seed(0)
    m, x = SmallWithOutput().eval(), torch.randn(2, 5, 8)
    first = sc.compile(m, backend="eager")
    with torch.no_grad():
        first(x)
    assert first.trace_cache == "miss" and SmallOutput in pytree.SUPPORTED_NODES
    pytree._deregister_pytree_node(SmallOutput)
    try:
        again = sc.compile(m, backend="eager")
        with torch.no_grad():
            out = again(x)
        assert again.trace_cache == "hit"
        assert type(out) is SmallOutput and out.loss is None
        assert relative_error(out.logits, m(x).logits) <= 1e-6
    finally:
        if SmallOutput in pytree.SUPPORTED_NODES:
            pytree._deregister_pytree_node(SmallOutput)


class _Dicted(torch.nn.Module):
    """Parameter names the IR's plain %name cannot hold: a Sequential's "0.weight", a ModuleDict key "block-1"."""

    def __init__(self):
        super().__init__()
        self.seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        self.d = torch.nn.ModuleDict({"block-1": torch.nn.Linear(8, 8), "x y": torch.nn.Linear(8, 8)})

    def forward(self, x):
        h = self.seq(x)
        return self.d["block-1"](h) * self.d["x y"](x)


def test_a_sequential_or_module_dict_is_served_from_the_cache(cache_on, monkeypatch):
    # their entries did not load ("ParseError: expected '%name: type', got '%0.weight: f32[8, 8]'"): every compile
    # of such a model warned and traced again
    torch.manual_seed(0)
    m, x = _Dicted().eval(), torch.randn(2, 5, 8)
    first = sc.compile(m, backend="eager")
    first(x)
    assert first.trace_cache == "miss"
    with monkeypatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")
        no_tracing(mp)
        again = sc.compile(m, backend="eager")
        with torch.no_grad():
            assert relative_error(again(x), m(x)) <= 1e-6
        assert again.trace_cache == "hit" and str(again.graph) == str(first.graph)
    # the user's source lines of the graph's values come back too: errors, warnings and explain() name them
    assert again.graph.sources == first.graph.sources
    assert "test_compile_cache.py" in again.graph.source_of(again.graph.nodes[-1])


class _MaskParam(torch.nn.Module):
    """Attention whose causal mask is a float Parameter: the recogniser folds its values into the attention op."""

    def __init__(self, trainable):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.keep = torch.nn.Parameter(torch.ones(32, 32).tril(), requires_grad=trainable)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, -1)
        s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(self.keep[:t, :t] == 0, float("-inf"))
        return s.softmax(-1) @ v


def test_a_hit_warns_of_a_folded_trainable_parameter_as_the_trace_did(cache_on):
    x = torch.randn(1, 9, 8)

    def compiled(trainable):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            c = sc.compile(_MaskParam(trainable), backend="eager")
            c(x)
        return c.trace_cache, [str(w.message) for w in seen if "was folded into a recognised op" in str(w.message)]

    cache, said = compiled(True)
    assert cache == "miss" and len(said) == 1 and "'keep'" in said[0]
    assert compiled(False) == ("miss", [])   # requires_grad is part of the key: the trace differs in what it says
    cache, again = compiled(True)
    assert cache == "hit" and again == said   # a hit says what the trace said


def test_a_library_cut_short_is_rebuilt_not_mapped(tmp_path):
    """A cached library truncated after it was written (a full disk, an interrupted copy) used to be mapped by the
    loader and kill every later process with SIGBUS; its digest is checked first now. In a new process, as a user
    meets it."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import torch, sessa_compiler as sc, warnings\n"
        "from sessa_compiler.models import SessaLayer\n"
        "torch.manual_seed(0); m = SessaLayer(16, n_heads=2).eval(); x = torch.randn(2, 5, 16)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    c = sc.compile(m, backend='tvm')\n"
        "    with torch.no_grad(): err = (c(x) - m(x)).abs().max().item()\n"
        "print(err, any('does not match the digest' in str(i.message) for i in w))\n")
    env = dict(os.environ, SESSA_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    run = lambda: subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,  # noqa: E731
                                 timeout=600)
    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    for lib in (tmp_path / "cache" / "tvm").glob("*.so"):
        with open(lib, "r+b") as f:
            f.truncate(lib.stat().st_size // 2)
    second = run()
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])
    err, warned = second.stdout.split()[-2:]
    assert float(err) < 1e-5 and warned == "True", second.stdout


CONSTS = """
K = 1.0
"""

THROUGH_MODULE = """
import torch
import {consts}
from dataclasses import dataclass


@dataclass
class Cfg:
    scale: float = 2.0


class Through(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * {consts}.K + Cfg.scale
"""


def test_a_constant_read_through_another_module_or_a_class_misses(cache_on, tmp_path, monkeypatch):
    """consts.K and Cfg.scale (a module and a class read as globals): their values key the entry, not only
    their names (a changed constant in another file, or one computed from the environment at import, was
    served the old graph)."""
    consts = load_source(tmp_path, "through_consts", CONSTS)
    mod = load_source(tmp_path, "through_model", THROUGH_MODULE.format(consts="through_consts"))
    monkeypatch.setitem(sys.modules, "through_consts", consts)
    monkeypatch.setitem(sys.modules, "through_model", mod)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    assert check_new_outputs(mod.Through().eval(), x) == "miss"
    assert check_new_outputs(mod.Through().eval(), x) == "hit"
    consts.K = 2.0
    assert check_new_outputs(mod.Through().eval(), x) == "miss"
    mod.Cfg.scale = 3.0
    assert check_new_outputs(mod.Through().eval(), x) == "miss"
    assert check_new_outputs(mod.Through().eval(), x) == "hit"


def test_a_class_defined_in_python_dash_c_compiles_without_the_cache(tmp_path):
    """inspect cannot find the source of a class defined in `python -c`: not cacheable, never a crash."""
    import subprocess

    code = ("import torch, sessa_compiler as sc\n"
            "class M(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.lin = torch.nn.Linear(4, 4)\n"
            "    def forward(self, x): return self.lin(x)\n"
            "m = M(); x = torch.randn(2, 3, 4)\n"
            "print((sc.compile(m, backend='eager')(x) - m(x)).abs().max().item())\n")
    env = dict(os.environ, SESSA_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) < 1e-6


class EnvBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if os.environ.get("SESSA_TEST_SQUASH"):   # a forward that reads the environment
            h = torch.sigmoid(h)
        return h


def test_an_environment_variable_the_forward_reads_keys_the_entry(cache_on, monkeypatch):
    monkeypatch.delenv("SESSA_TEST_SQUASH", raising=False)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    assert check_new_outputs(EnvBranch().eval(), x) == "miss"
    assert check_new_outputs(EnvBranch().eval(), x) == "hit"
    monkeypatch.setenv("SESSA_TEST_SQUASH", "1")
    assert check_new_outputs(EnvBranch().eval(), x) == "miss"
    assert check_new_outputs(EnvBranch().eval(), x) == "hit"


class FileTable(torch.nn.Module):
    """A forward that loads a table from a file (np.load / open + json / a directory listing): the values are
    baked into the graph, so the file is part of what the trace depends on."""

    def __init__(self, path, how):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.path, self.how = str(path), how

    def forward(self, x):
        if self.how == "numpy":
            table = torch.from_numpy(np.load(self.path))
        elif self.how == "json":
            with open(self.path) as f:
                table = torch.tensor(json.load(f))
        else:   # one unit per file in a directory
            table = torch.full((8,), float(len(os.listdir(self.path))))
        return self.lin(x) * table.to(x.dtype)


@pytest.mark.parametrize("how", ["numpy", "json", "dir"])
def test_a_data_file_the_forward_reads_keys_the_entry(cache_on, tmp_path, how):
    """The values of a file read inside forward were served from the old entry after the file changed (the
    trace's constants are the file's values then)."""
    path = tmp_path / {"numpy": "t.npy", "json": "t.json", "dir": "parts"}[how]

    def write(values):
        if how == "numpy":
            np.save(path, np.asarray(values, dtype=np.float32))
        elif how == "json":
            path.write_text(json.dumps(values))
        else:
            path.mkdir(exist_ok=True)
            for f in path.iterdir():
                f.unlink()
            for i in range(int(values[0])):
                (path / f"{i}.txt").write_text("")

    x = torch.randn(2, 5, 8)
    write([2.0] * 8)
    torch.manual_seed(0)
    assert check_new_outputs(FileTable(path, how).eval(), x) == "miss"
    torch.manual_seed(0)
    assert check_new_outputs(FileTable(path, how).eval(), x) == "hit"
    write([3.0] * 8)
    torch.manual_seed(0)
    m = FileTable(path, how).eval()
    c = sc.compile(m, backend="eager")
    with torch.no_grad():
        assert relative_error(c(x), m(x)) <= 1e-5
    assert c.trace_cache == "miss" and "read by the forward" in c.explain()
