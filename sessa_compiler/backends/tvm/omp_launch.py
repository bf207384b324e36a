"""Run the generated TVM code's parallel loops on torch's OpenMP threads instead of TVM's own thread pool.

Why: torch's CPU build runs its ops on GNU OpenMP, whose worker threads busy-wait for a few milliseconds after
every parallel region (libgomp's default spin, about 300k iterations). A TVM kernel called right after a torch
op (every core op of a training step, hybrid mode, serving) then runs its own pool's threads beside spinning
OpenMP threads: on a 2-core machine 3 runnable threads on 2 cores, and the kernel's statically split work
waits for its slowest half. Measured (2-core AMD EPYC, attention kernel at T = 1024): 7.5 ms alone, 13-15 ms
right after a torch matmul; on torch's OpenMP threads 7.4 ms alone and 7.7 ms after the matmul.

How: generated code reaches the runtime's parallel launcher through a function pointer in each library,
``__TVMBackendParallelLaunch`` (filled in by the loader). ``adopt(path)`` points it, in a library this process
loaded from ``path``, at ``sessa_parallel_launch`` of a small C file compiled here once (``SOURCE``, with
``-fopenmp`` and linked against the OpenMP library torch has mapped, whatever its file name, so the dynamic loader
binds it to that one; exactly one OpenMP runtime mapped before and after is checked). It keeps TVM's launcher
contract: ``num_task`` tasks (0: torch's thread count in the calling thread, ``torch.set_num_threads``, at most
``configure_threads()``, i.e. TVM_NUM_THREADS), each task id run once with ``penv->num_task`` the task count, a
nonzero return is an error; inside an OpenMP parallel region, and in a child forked after it was loaded (whose
OpenMP pool is gone), the tasks run in order on the calling thread. Libraries that use TVM's parallel barrier
(``__TVMBackendParallelBarrier``; none of the generated kernels do) keep TVM's pool.

Where it does not apply, TVM's own pool runs the loops, as before (``status()`` says why): torch's parallel
backend is not OpenMP, no C compiler with ``-fopenmp``, another OpenMP runtime than torch's would be loaded,
``SESSA_COMPILER_TVM_POOL=tvm``, or a library that was not loaded from a file (built with the compile cache
off: an in-memory executable). The exported TVM libraries' loader (export/tvm_runtime.py, no torch) is not
touched.
"""
from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCE = r"""
#include <omp.h>
#include <stdint.h>
#include <unistd.h>

/* TVM's parallel launcher ABI (tvm/ffi c_backend_api: TVMParallelGroupEnv, FTVMParallelLambda). */
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static int sessa_threads = 0;   /* at most this many tasks when the caller passes 0 (0: no cap) */
static pid_t sessa_pid = 0;     /* the process that set it: a forked child's OpenMP pool is not usable */
static __thread int sessa_own = 0;   /* this thread's count for the kernels while torch runs on fewer (0: torch's) */
static __thread int sessa_last = 0;  /* threads that ran this thread's last launch */

void sessa_set_threads(int n) { sessa_threads = n; sessa_pid = getpid(); }

/* A serving step keeps torch's own small ops on one thread (torch.set_num_threads(1)) and its kernels on n. */
int sessa_set_own_threads(int n) { int old = sessa_own; sessa_own = n; return old; }
int sessa_last_threads(void) { return sessa_last; }

int sessa_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  /* 0: torch's thread count in this thread (torch.set_num_threads sets the OpenMP one), or this thread's own
     count where one is set, at most sessa_threads */
  int cap = sessa_own > 0 ? sessa_own : omp_get_max_threads();
  if (sessa_threads > 0 && sessa_threads < cap) cap = sessa_threads;
  int total = num_task > 0 ? num_task : cap;
  int failed = 0;
  if (total <= 1 || omp_in_parallel() || getpid() != sessa_pid) {   /* nested, or after fork(): in order, here */
    TVMParallelGroupEnv env = {0, total < 1 ? 1 : total};
    sessa_last = 1;
    for (int t = 0; t < env.num_task; ++t)
      if (flambda(t, &env, cdata) != 0) failed = 1;
    return failed ? -1 : 0;
  }
  #pragma omp parallel num_threads(total < cap ? total : cap)   /* never more threads than torch's count */
  {
    TVMParallelGroupEnv env = {0, total};
    int nt = omp_get_num_threads();
    if (omp_get_thread_num() == 0) sessa_last = nt;   /* the calling thread is the team's thread 0 */
    for (int t = omp_get_thread_num(); t < total; t += nt)   /* every task once, however many threads came */
      if (flambda(t, &env, cdata) != 0) {
        #pragma omp atomic write
        failed = 1;
      }
  }
  return failed ? -1 : 0;
}
"""

_LOCK = threading.Lock()
_STATE: dict = {}            # "lib": the loaded shim (CDLL) or None; "why": the reason it is not used
_ADOPTED: dict = {}          # realpath of a library -> whether its last load was pointed at the launcher
LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_OMP_RUNTIME = re.compile(r"/lib(g|i|)omp[^/]*\.so")


def mapped_files() -> set:
    """The files mapped into this process (Linux: /proc/self/maps; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def _omp_runtimes() -> set:
    """The OpenMP runtime libraries mapped into this process."""
    return {p for p in mapped_files() if _OMP_RUNTIME.search(p)}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _compile(cc: str, runtime: str, out: Path) -> None:
    """Compile SOURCE with -fopenmp and link it against ``runtime``, the OpenMP library torch has loaded (not
    whatever -lgomp finds: a wheel may ship its libgomp under another name), so the loader binds the launcher to it."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".so")   # out.parent exists (the caller's)
    os.close(fd)
    src, obj = tmp[:-3] + ".c", tmp[:-3] + ".o"
    try:
        with open(src, "w", encoding="utf-8") as f:
            f.write(SOURCE)
        for cmd in ([cc, "-O2", "-fPIC", "-fopenmp", "-c", src, "-o", obj], [cc, "-shared", obj, runtime, "-o", tmp]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)   # atomic: a concurrent process sees a whole library or none
    finally:
        for p in (src, obj, tmp):
            if os.path.exists(p):
                os.unlink(p)


def _load() -> tuple:
    """(the shim CDLL or None, why not)."""
    if os.environ.get("SESSA_COMPILER_TVM_POOL", "omp").lower() == "tvm":
        return None, "SESSA_COMPILER_TVM_POOL=tvm"
    if not sys.platform.startswith("linux"):
        return None, f"not on Linux ({sys.platform})"
    import torch

    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "torch's parallel backend is not OpenMP"
    before = _omp_runtimes()
    if len(before) != 1:
        return None, f"torch's OpenMP runtime not found as one library (mapped: {sorted(before) or 'none'})"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (CC, gcc or cc) to build the OpenMP launcher"
    from ...persistent_cache import cache_dir, compile_cache_enabled, make_private_dir, trusted

    runtime = next(iter(before))
    digest = hashlib.sha1("\0".join((SOURCE, cc, runtime)).encode()).hexdigest()[:16]
    path = cache_dir() / "tvm-omp" / f"launch-{digest}.so"
    if compile_cache_enabled("libraries") and trusted(cache_dir(), path):
        try:
            make_private_dir(path.parent)
            if not path.exists():
                _compile(cc, runtime, path)
        except (OSError, subprocess.SubprocessError):
            path = None   # a read-only or full cache: build it where only this process sees it
    else:
        path = None
    temp = None
    if path is None:
        try:
            temp = Path(tempfile.mkdtemp(prefix="sessa-omp-"))
            path = temp / "launch.so"
            _compile(cc, runtime, path)
        except (OSError, subprocess.SubprocessError) as e:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            detail = getattr(e, "stderr", b"") or b""
            return None, (f"could not build the OpenMP launcher with {cc} -fopenmp ({type(e).__name__}"
                          f"{': ' + detail.decode(errors='replace').strip()[:200] if detail else ''})")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"could not load the OpenMP launcher ({e})"
    finally:
        if temp is not None:   # loaded (or not): the file is no longer needed
            shutil.rmtree(temp, ignore_errors=True)
    after = _omp_runtimes()
    if after != before:   # the launcher brought its own OpenMP runtime: its threads would be a third pool
        return None, f"the launcher would use another OpenMP runtime than torch's ({sorted(after - before)})"
    from .target import configure_threads

    lib.sessa_set_threads.argtypes = [ctypes.c_int]
    lib.sessa_set_threads(configure_threads())
    lib.sessa_parallel_launch.argtypes = [LAUNCH, ctypes.c_void_p, ctypes.c_int]
    lib.sessa_parallel_launch.restype = ctypes.c_int
    lib.sessa_set_own_threads.argtypes = [ctypes.c_int]
    lib.sessa_set_own_threads.restype = ctypes.c_int
    lib.sessa_last_threads.restype = ctypes.c_int
    return lib, ""


def launcher():
    """The loaded launcher (a CDLL with ``sessa_parallel_launch``), or None where TVM's pool runs the loops."""
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"], _STATE["why"] = _load()
        return _STATE["lib"]


def own_threads(n: int) -> int:
    """Run the adopted kernels' parallel loops called from this thread on ``n`` threads (0: torch's count, the
    default) whatever torch's count is; -> the previous setting, to restore. A no-op (0) where TVM's pool runs
    them."""
    lib = launcher()
    return lib.sessa_set_own_threads(n) if lib is not None else 0


def last_threads() -> int:
    """How many threads ran the last parallel loop launched from this thread on torch's OpenMP threads (0: none
    yet, or TVM's pool runs them)."""
    lib = launcher()
    return lib.sessa_last_threads() if lib is not None else 0


def _symbol(handle, name: str):
    """The pointer-sized global ``name`` of a loaded library, or None where it has none."""
    try:
        return ctypes.c_void_p.in_dll(handle, name)
    except ValueError:
        return None


def adopt(path) -> bool:
    """Point the parallel launcher of the library this process loaded from ``path`` at torch's OpenMP threads;
    True where it now runs there. A library that was not loaded, or that uses TVM's parallel barrier, keeps
    TVM's pool."""
    real = os.path.realpath(path)
    lib = launcher()   # every load, not once per path: TVM's loader sets the pointer again at each load_module,
    # and a library unloaded (its last module freed) and loaded again starts from TVM's launcher
    ok = False
    if lib is not None:
        try:   # RTLD_NOLOAD: the handle of the copy TVM loaded (the same globals), never a second copy
            handle = ctypes.CDLL(real, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:   # not loaded from this file
            handle = None
        if handle is not None:
            try:   # no launch pointer: no parallel loop in it
                slot = _symbol(handle, "__TVMBackendParallelLaunch")
                ok = slot is not None and _symbol(handle, "__TVMBackendParallelBarrier") is None
                if ok:
                    slot.value = ctypes.cast(lib.sessa_parallel_launch, ctypes.c_void_p).value
            finally:   # drop this reference: the library's lifetime stays TVM's module's
                _ctypes.dlclose(handle._handle)
    with _LOCK:
        _ADOPTED[real] = ok
    return ok


def status() -> str:
    """One line for explain(): which threads run the TVM kernels' parallel loops."""
    from ...persistent_cache import compile_cache_enabled

    lib = launcher()
    if lib is not None:
        n = sum(_ADOPTED.values())
        off = ("" if compile_cache_enabled("libraries") else
               "; the compile cache is off, so libraries built now stay in memory and run on TVM's pool")
        return (f"parallel loops on torch's OpenMP threads: as many as torch.get_num_threads(), at most "
                f"TVM_NUM_THREADS ({n} librar{'y' if n == 1 else 'ies'} loaded so far; no contention with torch's "
                f"spinning workers; SESSA_COMPILER_TVM_POOL=tvm for TVM's pool{off})")
    return f"parallel loops on TVM's thread pool ({_STATE.get('why', '')})"


__all__ = ["SOURCE", "LAUNCH", "adopt", "launcher", "status"]
