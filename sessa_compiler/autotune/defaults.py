"""Shipped default kernel configs per device class (``defaults.json``), used when nothing was tuned.

Lookup order in the backends: the tuning cache (this device, versions, kernel, shape class), then
this table (this device *class*: ``sm_90``, ``sm_80``, ``cpu``), then the backend's cost model.
Entries are validated against the values each knob accepts; an invalid or unreadable table is
ignored (with a warning), never fatal.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

DEFAULTS_PATH = Path(__file__).with_name("defaults.json")
FORMAT = 1

# The values each knob may take (a default outside these is ignored).
ALLOWED = {
    "chunk_size": {16, 32, 64},
    "num_warps": {1, 2, 4, 8, 16},
    "num_stages": {1, 2, 3, 4, 5},
    "strategy": {"sequential", "associative"},
    "block_m": {32, 64, 128, 256},
    "block_n": {32, 64, 128, 256},
    "outer_chunk": {64, 128, 256, 512, 1024},
}
# TVM: the fields of the ops' schedules (backends/tvm/schedules.py); whether a value fits a given op's
# shape (divisibility) is checked again when the backend resolves it (backends/tvm/schedule_choice.py: tvm_schedule).
_POW2 = {1, 2, 4, 8, 16, 32, 64, 128}
ALLOWED_TVM = {
    "feedback": {"chunk": {16, 32, 64, 128}, "key_block": _POW2, "rows": {1, 2, 4, 6, 8}, "col_block": _POW2,
                 "gemm_rows": {1, 2, 4, 6, 8}},
    "attention": {"q_block": {16, 32, 64, 128}, "k_block": _POW2, "rows": {1, 2, 4, 6, 8}, "v_lanes": _POW2},
    "scan": {"channel_block": _POW2},
}


def device_class(device_key: str) -> str:
    """'cuda:NVIDIA H200:sm_90' -> 'sm_90'; 'cpu:<model>:<n>c' -> 'cpu'."""
    if device_key.startswith("cuda:"):
        return device_key.rsplit(":", 1)[-1]
    return device_key.split(":", 1)[0]


@functools.lru_cache(maxsize=4)
def load_defaults(path: str | None = None) -> dict:
    p = Path(path) if path is not None else DEFAULTS_PATH
    try:
        table = json.loads(p.read_text())
        if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("devices"), dict):
            raise ValueError(f"expected {{'format': {FORMAT}, 'devices': {{...}}}}")
    except (OSError, ValueError) as e:
        warnings.warn(f"sessa_compiler: ignoring the shipped tuning defaults {p}: {e}", stacklevel=2)
        return {}
    return table["devices"]


def valid_config(config, backend: str = "triton", op: str | None = None) -> bool:
    if not isinstance(config, dict):
        return False
    if backend == "tvm":  # a whole schedule: every field of the op's schedule, each an allowed value
        allowed = ALLOWED_TVM.get(op)
        return allowed is not None and set(config) == set(allowed) and all(
            isinstance(v, int) and not isinstance(v, bool) and v in allowed[k] for k, v in config.items())
    return all(k in ALLOWED and v in ALLOWED[k] for k, v in config.items())


def default_config(device_key: str, backend: str, op: str, shape: str | None = None, *, path: str | None = None):
    """The shipped config for (device class, backend, op[, shape class]), or None.

    Per op: '*' for every shape class, overridden by the tightest 'T<=N' entry with N >= the class's bound."""
    entry = load_defaults(path).get(device_class(device_key), {}).get(backend, {}).get(op)
    if not isinstance(entry, dict):
        return None
    config = dict(entry.get("*") or {})
    bound = _bound(shape)
    if bound is not None:  # 'T<=N' entries cover every shape class up to N: the tightest one applies
        fits = [(b, k) for k in entry if (b := _bound(k)) is not None and b >= bound and isinstance(entry[k], dict)]
        if fits:
            config.update(entry[min(fits)[1]])
    return config if config and valid_config(config, backend, op) else None


def _bound(shape) -> int | None:
    if isinstance(shape, str) and shape.startswith("T<="):
        try:
            return int(shape[3:])
        except ValueError:
            return None
    return None


def provenance(device_key: str, *, path: str | None = None) -> str | None:
    return load_defaults(path).get(device_class(device_key), {}).get("provenance")
