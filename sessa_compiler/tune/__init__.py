"""Autotuning: the persistent cache and the verified search over each kernel's tunables."""
from .cache import CacheKey, TuningCache, cache_dir, device_key, make_key, shape_class
from .tuner import TunableKernel, TuneResult, TuningError, tune_kernel

__all__ = ["CacheKey", "TuningCache", "cache_dir", "device_key", "make_key", "shape_class", "TunableKernel",
           "TuneResult", "TuningError", "tune_kernel"]
