"""Load an exported TVM library and run it on numpy arrays: needs numpy and tvm, never torch.

This file imports nothing from sessa_compiler, so it also works when loaded by path in a process
where torch cannot be imported (export_tvm copies it into the exported directory as
`sessa_tvm_runtime.py`):

    import importlib.util
    spec = importlib.util.spec_from_file_location("rt", "model_dir/sessa_tvm_runtime.py")
    rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
    model = rt.load_tvm("model_dir"); y = model(x)
"""
from __future__ import annotations

import json
import os

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "sessa-tvm/1"


def manifest_dim(d):
    """A dimension as the manifest writes it: an int, or the name of a symbolic dim ("B", "T", "P")."""
    return d if isinstance(d, int) else str(d)


def export_dir_problem(path) -> str | None:
    """Why ``path`` is not a directory written by export_tvm (a sentence a user can act on), or None."""
    path = str(path)
    hint = "pass the directory that sessa_compiler.export_tvm(module, example_inputs, path) wrote"
    if not os.path.exists(path):
        return f"{path!r} does not exist; {hint}"
    if not os.path.isdir(path):
        return f"{path!r} is a file, expected a directory; {hint}"
    missing = [f for f in (MANIFEST,) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        return f"{path!r} has no {MANIFEST}, so it is not a TVM export (or it is incomplete); {hint}"
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        return f"{os.path.join(path, MANIFEST)!r} cannot be read as JSON ({e}); export the model again"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return f"{path!r}: not a sessa TVM export (format {got!r}, expected {FORMAT!r}); {hint}"
    for key in ("library", "weights"):
        name = manifest.get(key)
        if not isinstance(name, str) or not os.path.isfile(os.path.join(path, name)):
            return f"{path!r}: the manifest's {key} file {name!r} is missing; export the model again"
    return None


_LOADED: dict = {}   # real path of a library loaded in this process -> the sha256 of what was loaded


def _library_path(lib: str) -> str:
    """The path to load ``lib`` from. The dynamic loader hands back a library already loaded from the same path,
    whatever the file holds now: a directory exported again (another program, other input dtypes) would run the
    old program. A library whose bytes differ from what this process loaded from that path is loaded from a
    private copy named by its content."""
    import hashlib
    import shutil
    import tempfile

    with open(lib, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    real = os.path.realpath(lib)
    first = _LOADED.setdefault(real, digest)
    if first == digest:
        return lib
    copy = os.path.join(tempfile.mkdtemp(prefix="sessa-tvm-"), f"{digest}.so")   # private (0700), unique
    shutil.copyfile(lib, copy)
    return copy


class TVMModel:
    """A loaded library: call with numpy arrays (one per graph input), get numpy arrays back."""

    def __init__(self, path: str):
        import tvm
        from tvm import relax

        self.path = path
        problem = export_dir_problem(path)
        if problem is not None:  # torch-free use: a plain ValueError with the same message
            raise ValueError(f"load_tvm: {problem}")
        with open(os.path.join(path, MANIFEST)) as fh:
            self.manifest = json.load(fh)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: not a sessa TVM export (format {self.manifest.get('format')!r}, "
                             f"expected {FORMAT!r})")
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else (os.cpu_count() or 1)))
        self._tvm = tvm
        self.device = tvm.cpu()
        lib = tvm.runtime.load_module(_library_path(os.path.join(path, self.manifest["library"])))
        self._vm = relax.VirtualMachine(lib, self.device)
        weights = np.load(os.path.join(path, self.manifest["weights"]), allow_pickle=False)
        self._params = [tvm.runtime.tensor(np.require(weights[p["key"]], requirements="C"), self.device)
                        for p in self.manifest["params"]]
        self._main = self._vm["main"]

    @property
    def inputs(self) -> list:
        return self.manifest["inputs"]

    def __call__(self, *arrays):
        specs = self.manifest["inputs"]
        if len(arrays) != len(specs):
            raise ValueError(f"expected {len(specs)} inputs ({', '.join(s['name'] for s in specs)}), got {len(arrays)}")
        args = []
        symbols: dict = {}
        for a, s in zip(arrays, specs):
            a = np.asarray(a)
            if a.dtype != np.dtype(s["dtype"]):
                raise ValueError(f"input {s['name']}: expected dtype {s['dtype']}, got {a.dtype}")
            if a.ndim != len(s["shape"]):
                raise ValueError(f"input {s['name']}: expected shape {s['shape']}, got {a.shape}")
            for d, n in zip(s["shape"], a.shape):
                if isinstance(d, int) and d != n:
                    raise ValueError(f"input {s['name']}: expected shape {s['shape']}, got {a.shape}")
                if isinstance(d, str) and symbols.setdefault(d, n) != n:
                    raise ValueError(f"input {s['name']}: dimension {d} is {symbols[d]} elsewhere but {n} here")
            # tvm.runtime.tensor copies into its own aligned buffer: strided or misaligned numpy views are safe
            args.append(self._tvm.runtime.tensor(np.require(a, requirements="C"), self.device))
        if self.manifest.get("method") == "prefill":   # x and its key-padding masks run position by position
            n = sum(1 for s in self.manifest["inputs"] if len(s["shape"]) > 1 and s["shape"][1] == "T")
            return self._prefill([np.asarray(a) for a in arrays[:n]], args[n:])
        out = self._main(*args, *self._params)
        # (a step program with no caches returns a one-element tuple for its one output)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return tuple(o.numpy() for o in outs) if len(outs) > 1 else outs[0].numpy()


    def _prefill(self, seqs: list, caches: list):
        """prefill(x, *masks, *caches): the library's one-position step over x's positions in order (caches stay
        TVM tensors between steps), each step given x's and the masks' position t; y concatenated along the
        sequence dim, then the grown caches."""
        if seqs[0].shape[1] == 0:
            raise ValueError("input x: the prefill needs at least one position (T >= 1)")
        n_y = sum(1 for o in self.manifest["outputs"] if not o["name"].endswith(".new"))   # the module's outputs
        ys = []
        for t in range(seqs[0].shape[1]):
            step = [self._tvm.runtime.tensor(np.ascontiguousarray(a[:, t:t + 1]), self.device) for a in seqs]
            outs = list(self._main(*step, *caches, *self._params))
            ys.append([y.numpy() for y in outs[:n_y]])
            caches = outs[n_y:]
        return tuple(np.concatenate(parts, axis=1) for parts in zip(*ys)) + tuple(c.numpy() for c in caches)


def load_tvm(path: str) -> TVMModel:
    """Load a directory written by sessa_compiler.export_tvm; returns a callable on numpy arrays."""
    return TVMModel(str(path))
