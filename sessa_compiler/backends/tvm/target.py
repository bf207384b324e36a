"""The host CPU as a TVM target, and the TVM runtime's thread count.

``{"kind": "llvm", "mcpu": "native"}`` silently compiles for a generic x86-64 (half the speed on
AVX2/AVX-512 hosts), so the host is always resolved to its real CPU name, and a generic answer is
an error rather than a quiet fallback.
"""
from __future__ import annotations

import os

from ...errors import UnsupportedError

GENERIC_CPUS = {"", "generic", "x86-64", "native"}


def configure_threads() -> int:
    """TVM's CPU thread pool defaults to one thread on some VMs; use every core we may run on.

    Must run before the first parallel kernel call (the pool reads TVM_NUM_THREADS once). A value
    the user already set wins.
    """
    # TVM's workers busy-wait after each parallel region by default; in the hybrid runner torch's own
    # thread pool runs the next op on the same cores, and on a shared 2-core machine the spinning cost
    # ~15-30% of a Sessa layer's wall time (measured: 426 vs 504 ms, 634 vs 927 ms). Sleep instead.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    if "TVM_NUM_THREADS" not in os.environ:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(n)
    return int(os.environ["TVM_NUM_THREADS"])


def canonical_triple(triple: str) -> str:
    """The target triple with a toolchain's vendor name replaced by ``unknown``: the TVM wheel's LLVM reports
    the triple of the toolchain that built it (``x86_64-conda-linux-gnu``), which says nothing of this host."""
    parts = triple.split("-")
    if len(parts) >= 3 and parts[1] not in ("unknown", "pc", "apple", "none"):
        parts[1] = "unknown"
    return "-".join(parts)


def host_target():
    """The LLVM target of this machine's CPU (e.g. mcpu=znver3), never a generic one."""
    import tvm

    target = tvm.target.Target.from_device(tvm.cpu())
    mcpu = str(target.attrs.get("mcpu", ""))
    if mcpu in GENERIC_CPUS:
        from tvm.target import codegen

        mcpu = str(codegen.llvm_get_system_cpu())
        if mcpu in GENERIC_CPUS:
            raise UnsupportedError(
                "TVM backend: LLVM does not recognise this CPU (it reports a generic CPU), so kernels would be "
                "compiled without the host's vector instructions; pass an explicit target such as "
                "{'kind': 'llvm', 'mcpu': 'znver3'}")
    triple = canonical_triple(str(target.attrs.get("mtriple", "")))
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": triple})


def resolve_target(target=None):
    """None -> the host CPU; a dict, str or Target is taken as given (for cross-compilation)."""
    import tvm

    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    return tvm.target.Target(target)


def _llvm_says_avx512(target) -> bool:
    """LLVM's own feature table for the target's CPU (so a CPU missing from any list here is still seen)."""
    if str(target.kind.name) != "llvm" or not str(target.attrs.get("mcpu", "")):
        return False
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features("avx512f", target))
    except Exception:  # noqa: BLE001 - an LLVM without the query: the CPU-name list decides
        return False


def vector_bits(target) -> int:
    """Register width the schedules tile for: 512 with AVX-512, 256 with AVX2, else 128."""
    mcpu = str(target.attrs.get("mcpu", ""))
    keys = " ".join(str(a) for a in target.attrs.get("mattr", []))
    if "avx512" in keys or _llvm_says_avx512(target) or any(
            mcpu.startswith(p) for p in ("skylake-avx512", "cascadelake", "icelake", "sapphire", "znver4", "znver5",
                                         "cooperlake", "tigerlake", "rocketlake", "emeraldrapids", "graniterapids")):
        return 512
    if str(target.kind.name) == "llvm" and "aarch64" not in str(target.attrs.get("mtriple", "")):
        return 256
    return 128
