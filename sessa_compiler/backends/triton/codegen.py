"""Kernel source generation and the compile cache.

A generator (feedback.py, attention.py, scan.py) turns one IR node plus the concrete dtypes into a
``KernelSource``: readable Triton source with a header (IR op, specialisation, tunables), the
kernel's argument signature (for ahead-of-time compilation) and its launch grid rule. Everything
that the IR fixes (widths, heads, GQA group, RoPE, chunk size, dtypes) is baked into the source as
constants; the batch size and the sequence length stay runtime arguments that Triton does not
specialise on, so a new T reuses the compiled kernel.

``KERNEL_CACHE`` maps (source, interpret) to the loaded module: one entry per specialisation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field

KERNEL_DTYPES = ("f32", "f16", "bf16")  # operand dtypes with generated kernels (others run the torch implementation)
TRITON_DTYPE = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "f64": "tl.float64"}
AOT_POINTER = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16", "f64": "*fp64"}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_block(n: int, cap: int = 64) -> int:
    """A tile size for a dot operand dim: a power of two, at least 16 (tl.dot on every version)."""
    return max(16, min(cap, next_pow2(n)))


@dataclass
class KernelSource:
    """One generated kernel: its source and what is needed to launch or AOT-compile it."""

    name: str                    # the @triton.jit function in the source
    ir_op: str
    specialisation: dict         # fixed by the IR node and dtypes
    tunables: dict               # block sizes, precisions, warps: what the autotuner may change
    body: str                    # the Triton source below the header
    signature: dict              # arg name -> "*fp32" | "i32" | ...  (AOT signature, no constexprs)
    do_not_specialize: tuple = ()
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = True
    parts: tuple = ()            # further kernels the same launcher runs (each a KernelSource)

    @property
    def header(self) -> str:
        lines = [f"# sessa_compiler generated Triton kernel `{self.name}`",
                 f"# IR op: {self.ir_op}",
                 "# specialisation: " + ", ".join(f"{k}={v}" for k, v in self.specialisation.items()),
                 "# tunables: " + ", ".join(f"{k}={v}" for k, v in self.tunables.items())
                 + f", num_warps={self.num_warps}, num_stages={self.num_stages}",
                 "# runtime (not specialised): " + ", ".join(self.do_not_specialize)]
        return "\n".join(lines) + "\n"

    @property
    def source(self) -> str:
        dns = ", ".join(repr(a) for a in self.do_not_specialize)
        return (self.header + "import triton\nimport triton.language as tl\n\n"
                + self.body.replace("@triton.jit\ndef " + self.name,
                                    f"@triton.jit(do_not_specialize=[{dns}])\ndef " + self.name))

    @property
    def key(self) -> str:
        return hashlib.sha256(self.full_source.encode()).hexdigest()[:16]

    @property
    def full_source(self) -> str:
        """This kernel's source followed by its parts' (what ``kernel_sources()`` shows)."""
        return "\n\n".join([self.source] + [p.full_source for p in self.parts])

    def all_kernels(self) -> list:
        """This kernel and its parts, each compiled on its own."""
        return [self] + [k for p in self.parts for k in p.all_kernels()]


@dataclass
class LoadedKernel:
    source: KernelSource
    fn: object                   # the JITFunction (or InterpretedFunction)
    path: str
    interpret: bool
    launches: int = 0
    parts: dict = field(default_factory=dict)   # name -> LoadedKernel of each of source.parts


@dataclass
class KernelCache:
    """Generated modules per specialisation; ``generated`` counts how many were built."""

    entries: dict = field(default_factory=dict)
    generated: int = 0
    directory: str = field(default_factory=lambda: os.environ.get("SESSA_COMPILER_KERNEL_DIR") or
                           os.path.join(tempfile.gettempdir(), f"sessa_compiler_kernels_{os.getuid()}"))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, src: KernelSource, interpret: bool) -> LoadedKernel:
        key = (src.key, interpret)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                return hit
            os.makedirs(self.directory, exist_ok=True)
            modname = f"sessa_kernel_{src.name}_{src.key}{'_interp' if interpret else ''}"
            path = os.path.join(self.directory, modname + ".py")
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                fh.write(src.source)
            os.replace(tmp, path)
            fn = _import_kernel(modname, path, src.name, interpret)
            entry = LoadedKernel(src, fn, path, interpret)
        parts = {p.name: self.load(p, interpret) for p in src.parts}   # outside the lock: load takes it
        with self.lock:
            entry.parts = parts
            self.entries[key] = entry
            self.generated += 1
            return entry


def _import_kernel(modname: str, path: str, name: str, interpret: bool):
    """Import the generated file; TRITON_INTERPRET is read when @triton.jit runs, so set it around the import."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module  # triton resolves globals of the function through its module
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return getattr(module, name)


KERNEL_CACHE = KernelCache()


def dot_policy(dtype: str, interpret: bool) -> dict:
    """How tl.dot is fed, per input dtype (recorded as tunables in every header).

    - ``dot_dtype``/``dot_precision``: products of *inputs* (logits, P @ V). fp32 models use
      3xTF32 on tensor cores (about fp32 accuracy; plain TF32 would miss the spec's 1e-4). 16-bit
      models feed their own dtype to the tensor cores, except under the interpreter, whose bf16
      arithmetic is broken: there every dot runs in fp32.
    - ``solve_precision``: products whose operands are fp32 accumulators (the feedback solve and
      the block inverses): 3xTF32 for fp32 models, TF32 for 16-bit models (still 3 more mantissa
      bits than bf16).
    """
    if dtype == "f32" or interpret:
        return {"dot_dtype": "tl.float32", "dot_precision": "tf32x3",
                "solve_precision": "tf32x3" if dtype == "f32" else "tf32"}
    return {"dot_dtype": TRITON_DTYPE[dtype], "dot_precision": "tf32", "solve_precision": "tf32"}
