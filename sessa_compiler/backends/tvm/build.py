"""Kernel specs (op + static shape + dtype + schedule), PrimFunc generation, and the build cache.

A KernelSpec is everything a generated kernel depends on besides the symbolic batch and sequence
length; together with the target string it is the cache key, so one build serves every (B, T).
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from dataclasses import dataclass

from .schedules import (AttentionSchedule, FeedbackSchedule, LinearSchedule, Schedule, ScanSchedule,
                        TriSolveSchedule, default_attention, default_feedback, default_feedback_bwd, default_linear,
                        default_scan, default_tri_solve)
from .target import configure_threads, resolve_target, vector_bits


@dataclass(frozen=True)
class KernelSpec:
    """op: IR op name; static: the op's fixed sizes and attributes; dtype: compute dtype
    ("float32" or "float64"); schedule: the tunables it is generated with."""

    op: str
    static: tuple
    dtype: str
    schedule: Schedule

    @property
    def params(self) -> dict:
        return dict(self.static)

    @property
    def symbol(self) -> str:
        """A unique, stable function name for this spec (used inside exported libraries)."""
        digest = hashlib.sha1(repr((self.op, self.static, self.dtype, self.schedule)).encode()).hexdigest()[:10]
        return f"sessa_{self.op}_{digest}"

    def describe(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self.static)
        return f"{self.op}[{shape}, {self.dtype}] schedule {self.schedule.tag()}"


def feedback_spec(width: int, scale: float, dtype: str, schedule: FeedbackSchedule | None = None, lanes: int = 8):
    return KernelSpec("feedback", (("width", int(width)), ("scale", float(scale))), dtype,
                      schedule or default_feedback(width, lanes))


def feedback_bwd_spec(width: int, scale: float, dtype: str, schedule: FeedbackSchedule | None = None, lanes: int = 8):
    """The feedback backward kernel's spec (kernels/feedback_bwd.py): the forward's static sizes; its own default
    schedule (schedules.default_feedback_bwd)."""
    fwd = feedback_spec(width, scale, dtype, schedule or default_feedback_bwd(width, lanes), lanes)
    return KernelSpec("feedback_bwd", fwd.static, dtype, fwd.schedule)


def attention_spec(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str,
                   schedule: AttentionSchedule | None = None, lanes: int = 8, key_padding: bool = False):
    params = (("n_heads", int(n_heads)), ("n_kv_heads", int(n_kv_heads)), ("head_dim", int(head_dim)),
              ("scale", float(scale)), ("rope", bool(rope)))
    if key_padding:   # only then a param: the unmasked kernels keep their names
        params += (("key_padding", True),)
    return KernelSpec("attention", params, dtype, schedule or default_attention(head_dim, lanes))


def attention_bwd_spec(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str,
                       schedule: AttentionSchedule | None = None, lanes: int = 8, key_padding: bool = False,
                       fused_dq: bool = False):
    """The attention backward kernel's spec (kernels/attention_bwd.py): the forward's static sizes (and
    key_padding: the variant that reads the key-padding mask; fused_dq: the variant whose dK/dV pass also
    accumulates dQ, one task per batch row and kv head, instead of a second pass)."""
    fwd = attention_spec(n_heads, n_kv_heads, head_dim, scale, rope, dtype, schedule, lanes, key_padding)
    static = fwd.static + ((("fused_dq", True),) if fused_dq else ())
    return KernelSpec("attention_bwd", static, dtype, fwd.schedule)


def attention_lse_spec(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str,
                       schedule: AttentionSchedule | None = None, lanes: int = 8):
    """The attention forward that also returns its row log-sum-exps (kernels/attention_lse.py)."""
    fwd = attention_spec(n_heads, n_kv_heads, head_dim, scale, rope, dtype, schedule, lanes)
    return KernelSpec("attention_lse", fwd.static, dtype, fwd.schedule)


def scan_spec(channels: int, d_state: int, dtype: str, schedule: ScanSchedule | None = None, lanes: int = 8):
    return KernelSpec("scan", (("channels", int(channels)), ("d_state", int(d_state))), dtype,
                      schedule or default_scan(channels, lanes))


def tri_solve_spec(width: int, unitriangular: bool, dtype: str, schedule: TriSolveSchedule | None = None,
                   lanes: int = 8):
    return KernelSpec("tri_solve", (("width", int(width)), ("unitriangular", bool(unitriangular))), dtype,
                      schedule or default_tri_solve(width, lanes))


def linear_spec(in_features: int, out_features: int, bias: bool, dtype: str,
                schedule: LinearSchedule | None = None, lanes: int = 8):
    return KernelSpec("linear", (("in_features", int(in_features)), ("out_features", int(out_features)),
                                 ("bias", bool(bias))), dtype, schedule or default_linear(out_features, lanes))


def kernel_generator(op: str):
    """The function that generates an op's TIR kernel: ``<op>_kernel`` in ``kernels/<op>.py`` (imports tvm)."""
    import importlib

    if op not in _KERNEL_ARGS:
        raise KeyError(f"no TVM kernel generator for op '{op}'")
    return getattr(importlib.import_module(f"{__package__}.kernels.{op}"), f"{op}_kernel")


# each generator's arguments before (dtype, schedule), read from the spec's params
_KERNEL_ARGS = {"feedback": ("width", "scale"), "feedback_bwd": ("width", "scale"), "attention": ("n_heads", "n_kv_heads", "head_dim", "scale", "rope"),
                "attention_bwd": ("n_heads", "n_kv_heads", "head_dim", "scale", "rope"),
                "attention_lse": ("n_heads", "n_kv_heads", "head_dim", "scale", "rope"),
                "scan": ("channels", "d_state"), "tri_solve": ("width", "unitriangular"),
                "linear": ("in_features", "out_features", "bias")}


_PRIMFUNCS: dict = {}
_PRIMFUNC_LOCK = threading.Lock()


def primfunc(spec: KernelSpec):
    """Generate the TIR PrimFunc for a spec, named by its unique symbol. Memoised per spec in this process:
    generating one parses the generator's TVMScript (0.1-0.5 s), and a model's identical layers (and every
    compile of a module of the same shapes) ask for the same specs again; a PrimFunc is immutable, so one
    serves every IRModule that holds it."""
    with _PRIMFUNC_LOCK:
        func = _PRIMFUNCS.get(spec)
    if func is not None:
        return func
    p = spec.params
    extra = {"key_padding": True} if spec.op.startswith("attention") and p.get("key_padding", False) else {}
    if p.get("fused_dq", False):
        extra["fused_dq"] = True
    func = kernel_generator(spec.op)(*(p[k] for k in _KERNEL_ARGS[spec.op]), spec.dtype, spec.schedule, **extra)
    # the tunables travel with the kernel (readable in the TVMScript and by an autotuner)
    func = func.with_attr("global_symbol", spec.symbol).with_attr("sessa.schedule", spec.schedule.tag())
    with _PRIMFUNC_LOCK:
        return _PRIMFUNCS.setdefault(spec, func)


def generator_source(op: str) -> str:
    """The source code that generates an op's kernel: the generator's module, every module of this package it
    uses (schedules, TIR helpers, another generator), and this module (specs, primfunc). Editing any of them
    changes the text. Once tvm is imported (or the generator is), read with ``inspect`` from the generator in
    use (``kernel_generator``); before that, from the files (generator_source_from_files: the same text),
    since importing the generator imports tvm, which a warm compile's schedule lookup does not otherwise need."""
    import sys

    if "tvm" in sys.modules or f"{__package__}.kernels.{op}" in sys.modules:
        return _generator_source_in_use(op)
    return generator_source_from_files(op)


def _generator_source_in_use(op: str) -> str:
    import inspect
    import sys

    gen = inspect.getmodule(kernel_generator(op))
    used = {gen.__name__: gen, __name__: sys.modules[__name__]}
    for value in vars(gen).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.startswith(__package__ + "."):
            used[name] = sys.modules[name]
    return "\n".join(f"# {name}\n{inspect.getsource(mod)}" for name, mod in sorted(used.items()))


def generator_source_from_files(op: str) -> str:
    """generator_source without importing the generator: ``kernels/<op>.py``, the modules of this package it
    imports at its top level (read with ``ast``) and this module, read from their files as ``inspect`` reads them."""
    import ast
    import tokenize

    if op not in _KERNEL_ARGS:
        raise KeyError(f"no TVM kernel generator for op '{op}'")
    here = Path(__file__).parent

    def path_of(name: str) -> Path | None:   # a module of this package (sessa_compiler.backends.tvm.*) -> its file
        parts = name[len(__package__) + 1:].split(".")
        for p in (here.joinpath(*parts).with_suffix(".py"), here.joinpath(*parts, "__init__.py")):
            if p.is_file():
                return p
        return None

    def read(p: Path) -> str:
        with tokenize.open(p) as f:   # as inspect.getsource reads it
            return f.read()

    gen_name = f"{__package__}.kernels.{op}"
    gen_source = read(path_of(gen_name))
    used = {gen_name: gen_source, __name__: read(Path(__file__))}
    gen_package = gen_name.rsplit(".", 1)[0]
    for stmt in ast.parse(gen_source).body:
        if not isinstance(stmt, ast.ImportFrom):
            continue
        if stmt.level:
            base = gen_package.rsplit(".", stmt.level - 1)[0] if stmt.level > 1 else gen_package
            module = f"{base}.{stmt.module}" if stmt.module else base
        else:
            module = stmt.module or ""
        if not module.startswith(__package__ + "."):
            continue
        for alias in stmt.names:   # `from .. import schedules` imports a module; `from ..schedules import X` one
            sub = f"{module}.{alias.name}"
            name = sub if path_of(sub) is not None and stmt.module is None else module
            p = path_of(name)
            if p is not None and name not in used:
                used[name] = read(p)
    return "\n".join(f"# {name}\n{text}" for name, text in sorted(used.items()))


def kernel_source(spec: KernelSpec) -> str:
    """Readable TVMScript of the kernel, with a header naming the IR op, shapes and tunables."""
    header = (f"# generated by sessa_compiler.backends.tvm from IR op '{spec.op}'\n"
              f"# static sizes: {dict(spec.static)}; batch and sequence length are symbolic (nb, nt)\n"
              f"# dtype: {spec.dtype}; schedule: {spec.schedule.as_dict()}\n")
    return header + primfunc(spec).script()


ALIGN = 64   # bytes: generated code assumes aligned data and nothing checks it


def aligned_empty(shape, dtype):
    """torch.empty(shape, dtype) whose data is ALIGN-byte aligned."""
    import torch

    t = torch.empty(shape, dtype=dtype)
    if t.data_ptr() % ALIGN == 0:
        return t
    n = 1
    for s in shape:
        n *= int(s)
    raw = torch.empty(n + ALIGN, dtype=dtype)
    off = (-raw.data_ptr() % ALIGN) // raw.element_size()
    return raw[off:off + n].view(shape)


class Kernel:
    """A built kernel: call with tensors (DLPack-compatible, contiguous, 64-byte aligned)."""

    def __init__(self, spec: KernelSpec, target, executable, fn=None):
        self.spec = spec
        self.target = target
        self._executable = executable  # keeps the code alive (an executable, or a library loaded from the cache)
        self.fn = executable[spec.symbol] if fn is None else fn

    def __call__(self, *args):
        return self.fn(*args)

    def source(self) -> str:
        return kernel_source(self.spec)


_CACHE: dict = {}
_LOCK = threading.Lock()


def build(spec: KernelSpec, target=None) -> Kernel:
    """Build the kernel for a spec on a target, or fetch it from the in-process cache, else from the persistent
    compile cache (lib_cache.load_or_build_kernel: a new process does not build it again)."""
    import tvm

    from .lib_cache import load_or_build_kernel

    configure_threads()
    target = resolve_target(target)
    key = (spec, str(target))
    with _LOCK:
        kernel = _CACHE.get(key)
        if kernel is None:
            fields = {"spec": repr((spec.op, spec.static, spec.dtype, spec.schedule)), "target": str(target)}
            if spec.op in _KERNEL_ARGS:   # a generator edited or replaced in this process (the package hash covers files)
                fields["generator"] = hashlib.sha1(generator_source(spec.op).encode()).hexdigest()
            executable, fn = load_or_build_kernel(
                fields, spec.symbol, lambda: tvm.compile(tvm.IRModule({spec.symbol: primfunc(spec)}), target=target))
            kernel = _CACHE[key] = Kernel(spec, target, executable, fn)
    return kernel


def lanes_for(target) -> int:
    """float32 lanes per vector register of the target (the schedules' default vector width)."""
    return vector_bits(target) // 32
