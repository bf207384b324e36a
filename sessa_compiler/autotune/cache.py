"""The persistent autotuning cache.

An entry is keyed by everything that makes a tuned config valid: the device (GPU name and compute
capability, or CPU model and core count), library versions (torch, the backend's compiler,
sessa_compiler), a hash of the kernel source, a hash of the config space, and a shape class
(sequence length bucketed, not exact). The key fields are stored inside the entry and compared on
read, so a hash collision, a foreign file or a stale entry is rejected, never used. Writes are
atomic (temporary file + os.replace); a corrupted or truncated file is a miss (and is moved aside),
never a crash; tuners of the same key in several processes serialise on a file lock. Entries are read and
written only where the cache directory and the entry are the current user's and not writable by others
(persistent_cache.trusted: a planted config would choose the kernels that run); see docs/caching.md.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import filelock  # a dependency of torch

from ..persistent_cache import cache_dir, library_versions, make_private_dir, note, stable_hash, trusted  # noqa: F401

ENTRY_FORMAT = 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device=None) -> str:
    """'cuda:<name>:sm_<major><minor>' for a GPU, 'cpu:<model>:<cores>c' for the host."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"cuda:{torch.cuda.get_device_name(dev)}:sm_{major}{minor}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu:{cpu_model()}:{cores}c"


def shape_class(seq_len: int) -> str:
    """Sequence lengths bucketed by powers of two (16 at least): configs carry within a bucket."""
    bucket = 16
    while bucket < seq_len:
        bucket *= 2
    return f"T<={bucket}"


@dataclass(frozen=True)
class CacheKey:
    backend: str
    kernel: str  # a readable name, e.g. "feedback[f32,D=512]"
    device: str
    versions: dict = field(hash=False)
    source_hash: str = ""
    space_hash: str = ""
    shape: str = ""

    def digest(self) -> str:
        return stable_hash(asdict(self))


def make_key(backend: str, kernel: str, source: str, space, seq_len: int, device=None) -> CacheKey:
    return CacheKey(backend=backend, kernel=kernel, device=device_key(device), versions=library_versions(backend),
                    source_hash=stable_hash(source), space_hash=stable_hash(space), shape=shape_class(seq_len))


class TuningCache:
    """Tuned configs on disk, one JSON file per key."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()

    def path(self, key: CacheKey) -> Path:
        d = key.digest()
        return self.root / key.backend / d[:2] / f"{d}.json"

    def _make_dir(self, d: Path) -> None:
        """Create an entry's directory, or say which setting points somewhere unusable."""
        try:
            make_private_dir(d)
            if not d.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(d))
        except OSError as e:
            from ..errors import ConfigError

            env = os.environ.get("SESSA_COMPILER_CACHE_DIR")
            where = (f"SESSA_COMPILER_CACHE_DIR={env!r}" if env and Path(env) == self.root
                     else f"the tuning cache directory {str(self.root)!r}")
            blocker = next((q for q in [d, *d.parents] if q.exists() and not q.is_dir()), None)
            why = f"{str(blocker)!r} is a file, not a directory" if blocker is not None else f"{e.strerror or e}"
            raise ConfigError(f"cannot store tuning results: {where} cannot be used ({why}); point "
                              "SESSA_COMPILER_CACHE_DIR at a writable directory (or unset it for the user's cache "
                              "directory)") from None

    def lock(self, key: CacheKey, timeout: float = 600.0) -> filelock.FileLock:
        p = self.path(key)
        self._make_dir(p.parent)
        return filelock.FileLock(str(p) + ".lock", timeout=timeout)

    def get(self, key: CacheKey):
        """The stored entry's config, or None (missing, corrupted, or keyed to something else)."""
        p = self.path(key)
        if not trusted(self.root, p):
            note("tuned config", "not read (cache not trusted)")
            return None
        try:
            text = p.read_text()
        except FileNotFoundError:
            note("tuned config", "not in the tuning cache")
            return None
        except (OSError, UnicodeDecodeError):
            text = ""
        try:
            entry = json.loads(text)
            ok = (isinstance(entry, dict) and entry.get("format") == ENTRY_FORMAT
                  and entry.get("key") == json.loads(json.dumps(asdict(key)))
                  and entry.get("checksum") == stable_hash({"config": entry.get("config"), "key": entry.get("key")}))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            self._quarantine(p)
            note("tuned config", "not in the tuning cache")
            return None
        note("tuned config", "from the tuning cache")
        return entry["config"]

    def put(self, key: CacheKey, config: dict, *, median_ms: float | None = None, candidates: int | None = None) -> Path:
        p = self.path(key)
        self._make_dir(p.parent)
        if not trusted(self.root, p):
            return p  # not written: a directory others can write is not used (warned)
        k = json.loads(json.dumps(asdict(key)))
        entry = {"format": ENTRY_FORMAT, "key": k, "config": config, "median_ms": median_ms,
                 "candidates": candidates, "checksum": stable_hash({"config": config, "key": k})}
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)  # atomic: readers see the old file or the new one, never half of one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return p

    @staticmethod
    def _quarantine(p: Path) -> None:
        try:
            os.replace(p, p.with_suffix(".corrupt"))
        except OSError:
            pass
