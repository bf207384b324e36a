"""Backends: eager (the IR interpreter, the definition), triton (generated GPU kernels), tvm (generated CPU kernels)."""
from __future__ import annotations

from ..errors import UnsupportedError
from .eager import EagerBackend

PLANNED: dict = {}


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _triton_installed() -> bool:
    return _installed("triton")


def available_backends() -> list:
    """Backends whose compiler is installed (triton still needs CUDA tensors or the interpreter)."""
    return ["eager"] + [b for b in ("triton", "tvm") if _installed(b)]


class AutoBackend:
    """"auto": Triton for CUDA inputs when triton is installed, else eager; decided at each call."""

    def __init__(self, **options):
        self.options = options
        self.current = EagerBackend()
        self._runners: dict = {}

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def differentiable(self) -> bool:
        return self.current.differentiable

    def resolve(self, inputs):
        """The backend these inputs run on (and the one `name`/`differentiable` describe from now on)."""
        on_cuda = any(getattr(x, "is_cuda", False) for x in inputs)
        if on_cuda and _triton_installed():
            if self.current.name != "triton":
                from .triton import TritonBackend

                self.current = TritonBackend(**self.options)
        elif self.current.name != "eager":
            self.current = EagerBackend()
        return self.current

    def prepare(self, graph):
        def run(inputs, params):
            backend = self.resolve(inputs)
            key = (backend.name, id(graph))
            if key not in self._runners:
                self._runners[key] = backend.prepare(graph)
            return self._runners[key](inputs, params)
        return run

    def describe(self, graph) -> str:
        return self.current.describe(graph)


def get_backend(name: str, **options):
    """options (print_ir, feedback_chunk_size, ...) go to backends that take them (triton)."""
    if name == "eager":
        return EagerBackend()
    if name == "auto":
        return AutoBackend(**options)
    if name == "triton":
        from .triton import TritonBackend  # imports triton; UnsupportedError when it is missing

        return TritonBackend(**options)
    if name == "tvm":
        from .tvm import TVMBackend  # tvm itself is imported when the backend is created

        return TVMBackend(**options)
    if name in PLANNED:
        raise UnsupportedError(f"backend '{name}': {PLANNED[name]}; available: {', '.join(available_backends())}")
    raise UnsupportedError(f"unknown backend '{name}'; expected one of auto, eager, triton, tvm")
