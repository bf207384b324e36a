"""Autotuning: the persistent cache, the verified search over each kernel's tunables, and the protocol
(``Tunable``) a backend implements to be tuned. ``sessa_compiler.tune(...)`` (in api.py) drives it."""
from .cache import CacheKey, TuningCache, cache_dir, device_key, make_key, shape_class
from .search import Tunable, cache_key, kernel_name, parse_budget, resolve_node, tune_graph
from .tuner import TunableKernel, TuneResult, TuningError, tune_kernel

__all__ = ["CacheKey", "TuningCache", "cache_dir", "device_key", "make_key", "shape_class", "Tunable", "cache_key",
           "kernel_name", "parse_budget", "resolve_node", "tune_graph", "TunableKernel", "TuneResult", "TuningError",
           "tune_kernel"]
