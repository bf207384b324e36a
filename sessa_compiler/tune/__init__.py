"""Autotuning: the persistent cache and the verified search over each kernel's tunables."""
import sys

from .api import tune, tune_graph
from .cache import CacheKey, TuningCache, cache_dir, device_key, make_key, shape_class
from .tuner import TunableKernel, TuneResult, TuningError, tune_kernel

__all__ = ["CacheKey", "TuningCache", "cache_dir", "device_key", "make_key", "shape_class", "TunableKernel",
           "TuneResult", "TuningError", "tune_kernel", "tune", "tune_graph"]


class _CallablePackage(type(sys.modules[__name__])):
    """``sessa_compiler.tune(...)`` calls ``tune.api.tune``; ``sessa_compiler.tune.cache`` etc. stay modules."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
