"""Backends: eager (the IR interpreter, the definition), triton (generated GPU kernels), tvm (generated CPU kernels)."""
from __future__ import annotations

from ..errors import ConfigError, UnsupportedError
from .base import Backend, CompileContext
from .eager import EagerBackend


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _triton_installed() -> bool:
    return _installed("triton")


def available_backends() -> list:
    """Backends whose compiler is installed (triton still needs CUDA tensors or the interpreter)."""
    return ["eager"] + [b for b in ("triton", "tvm") if _installed(b)]


# float dtypes the TVM backend computes natively (it casts bf16/f16 to f32 around its kernels)
_TVM_NATIVE = {"f32", "f64"}


def _kwargs_for(cls, options: dict) -> dict:
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in accepted}


class AutoBackend(Backend):
    """"auto", decided at each call from the inputs' device and the graph's dtypes:
    CUDA inputs -> triton (when installed); CPU inputs and a graph computing in float32/float64 -> tvm
    (when installed); otherwise eager. `why` says what the last decision was based on."""

    def __init__(self, **options):
        self.options = options
        self.current = EagerBackend(**_kwargs_for(EagerBackend, options))
        self.why = "not called yet: eager until the first call shows the inputs' device"
        self._backends: dict = {"eager": self.current}
        self._runners: dict = {}
        self._graph_floats = None  # float dtypes the prepared graph computes in (read at every call)
        self._contexts: dict = {}  # id(graph) -> the CompileContext it was prepared with

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def differentiable(self) -> bool:
        return self.current.differentiable

    def _cpu_choice(self) -> tuple:
        if not _installed("tvm"):
            return "eager", "CPU inputs; tvm is not installed"
        floats = self._graph_floats
        if floats is None:
            return "eager", "CPU inputs; no graph"
        if not floats <= _TVM_NATIVE:
            return "eager", (f"CPU inputs, but the graph computes in {', '.join(sorted(floats - _TVM_NATIVE))}, "
                             "which TVM would run in float32")
        return "tvm", f"CPU inputs and a graph in {', '.join(sorted(floats)) or 'integers only'}"

    def resolve(self, inputs):
        """The backend these inputs run on (and the one `name`/`differentiable` describe from now on)."""
        on_cuda = any(getattr(x, "is_cuda", False) for x in inputs)
        if on_cuda:
            choice, why = ("triton", "CUDA inputs") if _triton_installed() else \
                ("eager", "CUDA inputs; triton is not installed")
        else:
            choice, why = self._cpu_choice()
        if choice not in self._backends:
            if choice == "triton":
                from .triton import TritonBackend as cls
            else:
                from .tvm import TVMBackend as cls
            self._backends[choice] = cls(**_kwargs_for(cls, self.options))
        self.current, self.why = self._backends[choice], why
        return self.current

    def prepare(self, graph, ctx: CompileContext | None = None):
        self._contexts[id(graph)] = ctx = ctx or CompileContext()
        values = list(graph.inputs) + list(graph.param_values.values()) + [v for n in graph.nodes for v in n.outputs]
        self._graph_floats = {v.type.dtype.name for v in values if v.type.dtype.is_float}

        def run(inputs, params):
            backend = self.resolve(inputs)
            key = (backend.name, id(graph))
            if key not in self._runners:
                self._runners[key] = backend.prepare(graph, ctx)
            return self._runners[key](inputs, params)
        return run

    def describe(self, graph) -> str:
        # Say what will run, not what would run if nothing were prepared: build the chosen backend's program
        # now (it is built at the first call otherwise, and then this report would change).
        key = (self.current.name, id(graph))
        if self._graph_floats is not None and key not in self._runners:
            self._runners[key] = self.current.prepare(graph, self._contexts.get(id(graph)))
        return f"backend auto -> {self.current.name} ({self.why})\n  " + self.current.describe(graph)

    def kernel_sources(self, graph) -> dict:
        return self.current.kernel_sources(graph)


# The options each backend's constructor takes (tests/test_errors.py checks this against the signatures;
# kept as a table so that checking a key imports neither triton nor tvm).
BACKEND_OPTIONS = {
    "eager": ("print_ir",),
    "triton": ("print_ir", "feedback_chunk_size", "scan_chunk_size", "scan_strategy", "interpret", "fuse",
               "half_in_float32", "cuda_graphs", "feedback_one_pass"),
    "tvm": ("target", "schedules", "feedback_chunk_size", "print_ir", "whole_graph", "decode_kernels"),
}


def check_options(name: str, options: dict) -> None:
    """A ConfigError for an option no backend takes (a misspelt key), or one this backend does not take."""
    import difflib

    known = sorted({k for keys in BACKEND_OPTIONS.values() for k in keys})
    accepted = known if name == "auto" else sorted(BACKEND_OPTIONS.get(name, known))
    for key in options:
        if key in accepted:
            continue
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"compile: unknown option {key!r}; {hint}options are {', '.join(known)}")
        takers = [b for b, keys in BACKEND_OPTIONS.items() if key in keys]
        raise ConfigError(f"compile: option {key!r} is for backend {' or '.join(takers)}, not {name!r}; "
                          f"{name} takes {', '.join(accepted) or 'no options'}")


def get_backend(name: str, **options):
    """options (print_ir, feedback_chunk_size, ...) go to backends that take them; a key no backend takes,
    or one the named backend does not take, is a ConfigError."""
    if name in BACKEND_OPTIONS or name == "auto":
        check_options(name, options)
    if name == "eager":
        return EagerBackend(**options)
    if name == "auto":
        return AutoBackend(**options)
    if name == "triton":
        from .triton import TritonBackend  # imports triton; UnsupportedError when it is missing

        return TritonBackend(**options)
    if name == "tvm":
        from .tvm import TVMBackend  # tvm itself is imported when the backend is created

        return TVMBackend(**options)
    raise UnsupportedError(f"unknown backend '{name}'; expected one of auto, eager, triton, tvm")
