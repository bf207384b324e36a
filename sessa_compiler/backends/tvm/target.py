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


# /proc/cpuinfo fields that identify the CPU model and its features: what LLVM's host CPU detection reads
# (through cpuid). Not the per-core or changing ones (frequency, bogomips, core and apic ids).
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "CPU implementer",
               "CPU architecture", "CPU variant", "CPU part", "CPU revision", "Features", "isa", "uarch")


def _cpu_identity() -> dict | None:
    """This machine's CPU as /proc/cpuinfo describes its first processor (None: no /proc/cpuinfo)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            block = f.read().split("\n\n", 1)[0]
    except OSError:
        return None
    fields = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in _CPU_FIELDS:
            fields[key.strip()] = " ".join(value.split())
    if not fields:
        return None
    return {"machine": platform.machine(), **fields}


class HostTarget:
    """This machine's resolved LLVM target as an earlier process recorded it: its text (``str(Target)``) and
    vector lanes, usable without importing tvm (``import tvm`` is most of a warm compile). Only what a lookup
    needs: where a real ``tvm.target.Target`` is needed (a build), the backend resolves it then."""

    def __init__(self, text: str, lanes: int):
        self.text = text
        self.lanes = lanes

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"HostTarget({self.text!r}, lanes={self.lanes})"


def _host_record_path():
    """The cache file recording this host's target (None: the compile cache is off or there is no CPU
    identity). Keyed by the CPU identity (model, stepping, feature flags), the machine and the versions of
    tvm and this package: another CPU, a tvm upgrade or a changed target rule is a different file."""
    from ...persistent_cache import cache_dir, compile_cache_enabled, library_versions, package_hash, stable_hash

    if not compile_cache_enabled("libraries"):
        return None
    cpu = _cpu_identity()
    if cpu is None:
        return None
    key = stable_hash({"format": 1, "cpu": cpu, "versions": library_versions("tvm"), "code": package_hash()})
    return cache_dir() / "tvm" / f"host-{key}.target"   # JSON (not named .json: the tuning cache's entries are)


def cached_host_target() -> HostTarget | None:
    """This host's target as recorded by an earlier process (the same CPU, tvm and package), else None."""
    import json

    from ...persistent_cache import cache_dir, trusted

    path = _host_record_path()
    if path is None or not path.exists() or not trusted(cache_dir(), path):
        return None
    try:
        record = json.loads(path.read_text())
        text, lanes = record["text"], record["lanes"]
        if (isinstance(text, str) and json.loads(text).get("kind") == "llvm" and isinstance(lanes, int)
                and lanes in (4, 8, 16)):
            return HostTarget(text, lanes)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None   # unreadable or malformed: resolved again (and rewritten) by host_target()


def _record_host_target(target, lanes: int) -> None:
    """Write this host's target for the next process (atomically, mode 0600); failures are ignored."""
    import json
    import tempfile

    from ...persistent_cache import cache_dir, make_private_dir, trusted

    path = _host_record_path()
    if path is None:
        return
    try:
        if not trusted(cache_dir()):   # nothing is created in a directory that is not the user's alone
            return
        make_private_dir(path.parent)
        if not trusted(cache_dir(), path.parent):
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".target")
        with os.fdopen(fd, "w") as f:
            json.dump({"text": str(target), "lanes": lanes}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def host_target():
    """The LLVM target of this machine's CPU (e.g. mcpu=znver3), never a generic one. Recorded in the compile
    cache (cached_host_target) so that a later process needs no ``import tvm`` to know it."""
    target = _resolve_host_target()
    _record_host_target(target, vector_bits(target) // 32)
    return target


def _resolve_host_target():
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
    """None -> the host CPU; a dict, str or Target is taken as given (for cross-compilation); a HostTarget ->
    this host's target resolved afresh."""
    import tvm

    if target is None or isinstance(target, HostTarget):
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
    if isinstance(target, HostTarget):
        return 32 * target.lanes
    mcpu = str(target.attrs.get("mcpu", ""))
    keys = " ".join(str(a) for a in target.attrs.get("mattr", []))
    if "avx512" in keys or _llvm_says_avx512(target) or any(
            mcpu.startswith(p) for p in ("skylake-avx512", "cascadelake", "icelake", "sapphire", "znver4", "znver5",
                                         "cooperlake", "tigerlake", "rocketlake", "emeraldrapids", "graniterapids")):
        return 512
    if str(target.kind.name) == "llvm" and "aarch64" not in str(target.attrs.get("mtriple", "")):
        return 256
    return 128
