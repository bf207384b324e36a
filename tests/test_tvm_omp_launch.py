"""The TVM kernels' parallel loops on torch's OpenMP threads (backends/tvm/omp_launch.py): the launcher keeps
TVM's launch contract (every task once, the task count in penv, errors returned), a compiled layer's libraries
are pointed at it, and its outputs and gradients are bit-identical to TVM's own thread pool's."""
from __future__ import annotations

import ctypes
import os
import shutil
import threading

import pytest
import torch

pytest.importorskip("tvm")

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.backends.tvm import omp_launch  # noqa: E402
from sessa_compiler.backends.tvm.target import configure_threads  # noqa: E402
from sessa_compiler.models import SessaLayer  # noqa: E402

APPLIES = (torch.__config__.parallel_info().find("ATen parallel backend: OpenMP") >= 0
           and omp_launch._compiler() is not None and os.environ.get("SESSA_COMPILER_TVM_POOL", "omp") != "tvm")


class _Env(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]


def _launch(num_task, fail_task=None):
    """Run the launcher with a Python task body; [(task_id, penv num_task, thread ident)], return code."""
    lib = omp_launch.launcher()
    seen, lock = [], threading.Lock()

    def body(task, penv, cdata):
        env = ctypes.cast(penv, ctypes.POINTER(_Env)).contents
        with lock:
            seen.append((task, env.num_task, threading.get_ident()))
        return -1 if task == fail_task else 0

    cb = omp_launch.LAUNCH(body)
    rc = lib.sessa_parallel_launch(cb, None, num_task)
    return seen, rc


@pytest.mark.skipif(not APPLIES, reason="torch without OpenMP, or no C compiler")
def test_launcher_runs_every_task_once_with_the_task_count():
    assert omp_launch.launcher() is not None, omp_launch.status()
    before = torch.get_num_threads()
    try:
        _check_launcher()
    finally:
        torch.set_num_threads(before)


def _check_launcher():
    torch.set_num_threads(1)   # 0 tasks asked: torch's thread count, at most TVM_NUM_THREADS
    assert [t for t, _, _ in _launch(0)[0]] == [0]
    torch.set_num_threads(configure_threads() + 1)
    assert sorted(t for t, _, _ in _launch(0)[0]) == list(range(configure_threads()))
    torch.set_num_threads(configure_threads())
    for num_task, total in ((0, configure_threads()), (1, 1), (3, 3), (5, 5)):
        seen, rc = _launch(num_task)
        assert rc == 0
        assert sorted(t for t, _, _ in seen) == list(range(total)), (num_task, seen)
        assert {n for _, n, _ in seen} == {total}
    if configure_threads() > 1:   # the tasks ran on more than one thread, never more than torch's count
        seen, _ = _launch(8)
        assert 1 < len({ident for _, _, ident in seen}) <= configure_threads()
    seen, rc = _launch(4, fail_task=2)
    assert rc == -1 and sorted(t for t, _, _ in seen) == [0, 1, 2, 3]


@pytest.mark.skipif(not APPLIES, reason="torch without OpenMP, or no C compiler")
def test_a_threads_own_count_overrides_torchs_for_the_kernels_only():
    """own_threads(n): this thread's launches run on n threads whatever torch's count is (a serving step keeps
    torch's small ops on one thread and its kernels on the count torch had); 0 restores torch's count; another
    thread keeps its own setting."""
    before = torch.get_num_threads()
    n = configure_threads()
    try:
        torch.set_num_threads(1)
        assert omp_launch.own_threads(n) == 0
        assert sorted(t for t, _, _ in _launch(0)[0]) == list(range(n))
        assert omp_launch.last_threads() == n
        other = []
        t = threading.Thread(target=lambda: other.append((omp_launch.own_threads(0), omp_launch.last_threads())))
        t.start()
        t.join()
        assert other == [(0, 0)]   # the setting and the record are this thread's
        assert omp_launch.own_threads(0) == n
        assert [t for t, _, _ in _launch(0)[0]] == [0]
        assert omp_launch.last_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        omp_launch.own_threads(0)
        torch.set_num_threads(before)


@pytest.mark.skipif(not APPLIES or configure_threads() < 2, reason="torch without OpenMP, no C compiler, one core")
def test_a_decode_steps_parallel_cache_reads_run_on_torchs_thread_count(monkeypatch):
    """A one-position step on the TVM decode kernels sets torch to one thread for its small ops; its parallel
    cache reads still run on torch's count (they ran on one thread: 6.99 against 4.45 ms per step at context
    8192, SessaLayer(512, n_heads=8) on the 2-core VM), and the setting is restored after the step."""
    from sessa_compiler.backends.tvm import decode as tvm_decode

    monkeypatch.setattr(tvm_decode, "SERIAL_BYTES", -1)   # every cache read parallel, at a small context
    torch.manual_seed(0)
    layer = SessaLayer(64, n_heads=2).eval()
    compiled = sc.compile(layer, backend="tvm")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cache = compiled.init_cache(1, max_len=40)
        x = torch.randn(1, 40, 64)
        with torch.no_grad():
            compiled.prefill(x[:, :30], cache)
            outs = [compiled.decode_step(x[:, t], cache)[0] for t in range(30, 33)]
            assert omp_launch.last_threads() == 2   # the step's last parallel launch: the feedback's cache read
            assert torch.get_num_threads() == 2 and omp_launch.own_threads(0) == 0
            full = layer(x[:, :33])
        torch.testing.assert_close(torch.stack(outs, 1), full[:, 30:33], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def _slot(path):
    handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    return ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch")


def _tvm_pool_address():
    """The address of TVM's own launcher (libtvm_runtime's TVMBackendParallelLaunch)."""
    for path in omp_launch.mapped_files():
        if path.endswith("libtvm_runtime.so"):
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            return ctypes.cast(lib.TVMBackendParallelLaunch, ctypes.c_void_p).value
    raise AssertionError("libtvm_runtime.so is not mapped")


def _step(compiled, layer, x):
    for p in layer.parameters():
        p.grad = None
    y = compiled(x)
    (y * y).mean().backward()
    return y.detach().clone(), [p.grad.clone() for p in layer.parameters()]


@pytest.mark.skipif(not APPLIES, reason="torch without OpenMP, or no C compiler")
def test_compiled_layer_runs_on_openmp_threads_bit_identical_to_tvms_pool():
    before = torch.get_num_threads()
    torch.set_num_threads(configure_threads())   # the same task split as TVM's pool
    try:
        _compare_pools()
    finally:
        torch.set_num_threads(before)


def _compare_pools():
    torch.manual_seed(0)
    layer = SessaLayer(32, n_heads=2, n_kv_heads=1)
    compiled = sc.compile(layer, backend="tvm")
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        y_omp = compiled(x).clone()
    train_omp = _step(compiled, layer, x)
    assert "parallel loops on torch's OpenMP threads" in compiled.explain()
    launch = ctypes.cast(omp_launch.launcher().sessa_parallel_launch, ctypes.c_void_p).value
    adopted = [p for p, ok in omp_launch._ADOPTED.items() if ok and p in omp_launch.mapped_files()]
    assert adopted, omp_launch._ADOPTED
    assert all(_slot(p).value == launch for p in adopted)

    own = _tvm_pool_address()   # the same libraries on TVM's pool: the same task split, the same bits
    for p in adopted:
        _slot(p).value = own
    try:
        with torch.no_grad():
            y_tvm = compiled(x).clone()
        train_tvm = _step(compiled, layer, x)
    finally:
        for p in adopted:
            _slot(p).value = launch
    with torch.no_grad():
        y_eager = sc.compile(layer, backend="eager")(x)
    torch.testing.assert_close(y_omp, y_eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(y_omp, y_tvm)
    assert torch.equal(train_omp[0], train_tvm[0])
    for a, b in zip(train_omp[1], train_tvm[1]):
        assert torch.equal(a, b)


def test_without_a_compiler_tvms_pool_runs_and_says_why(monkeypatch):
    monkeypatch.setattr(omp_launch, "_STATE", {})
    monkeypatch.setattr(omp_launch, "_ADOPTED", {})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("SESSA_COMPILER_TVM_POOL", raising=False)
    assert omp_launch.launcher() is None
    assert omp_launch.adopt("/nonexistent/library.so") is False
    status = omp_launch.status()
    assert "TVM's thread pool" in status and ("no C compiler" in status or "not" in status), status


def test_the_environment_variable_keeps_tvms_pool(monkeypatch):
    monkeypatch.setattr(omp_launch, "_STATE", {})
    monkeypatch.setenv("SESSA_COMPILER_TVM_POOL", "tvm")
    assert omp_launch.launcher() is None
    assert "SESSA_COMPILER_TVM_POOL=tvm" in omp_launch.status()


@pytest.mark.skipif(not APPLIES or not hasattr(os, "fork"), reason="torch without OpenMP, no C compiler, or no fork")
def test_a_forked_child_runs_the_tasks_in_order_without_hanging():
    import time

    _launch(4)   # the parent's OpenMP pool exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: every task, on this one thread
        try:
            seen, rc = _launch(3)
            ok = rc == 0 and [t for t, _, _ in seen] == [0, 1, 2] and len({i for _, _, i in seen}) == 1
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung in the launcher")
        time.sleep(0.05)
    assert os.read(r, 1) == b"1"


@pytest.mark.skipif(not APPLIES, reason="torch without OpenMP, or no C compiler")
def test_every_load_of_a_library_points_it_at_the_launcher():
    """TVM's loader sets the launch pointer at every load_module (and a library freed and loaded again starts from
    TVM's launcher): the pointer is set again at every load, not once per path."""
    from sessa_compiler.backends.tvm import lib_cache

    torch.manual_seed(0)
    compiled = sc.compile(SessaLayer(16, n_heads=2), backend="tvm")
    with torch.no_grad():
        compiled(torch.randn(1, 5, 16))
    launch = ctypes.cast(omp_launch.launcher().sessa_parallel_launch, ctypes.c_void_p).value
    path = next(p for p, ok in omp_launch._ADOPTED.items() if ok and p in omp_launch.mapped_files())
    assert _slot(path).value == launch
    import tvm_ffi

    tvm_ffi.load_module(path)   # TVM's loader alone: back to TVM's launcher
    assert _slot(path).value != launch
    lib_cache._load_lib(path)   # as the compiled module loads: on the launcher again
    assert _slot(path).value == launch
