"""What export_onnx returns and how its files are run: shared by onnx_export.py (the forward) and
onnx_serving.py (decode_step and prefill), which both import it."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

from ..errors import ValidationError
from ..frontend.trace import Traced


class OnnxValidationError(ValidationError):
    """onnxruntime's outputs differ from the eager module beyond the spec's tolerance."""


@dataclass
class OnnxExport:
    """What export_onnx made: the file, the model, and the validation runs (one dict per input set)."""

    path: str
    model: object
    opset: int
    traced: Traced
    validation: list = field(default_factory=list)

    def op_counts(self) -> dict:
        return model_op_counts(self.model)

    def __repr__(self) -> str:
        def run(r):   # a forward's run: shapes and one error per output; a step export's: batch, step, error
            where = r.get("shapes") or ", ".join(f"{k} {r[k]}" for k in ("batch", "step") if k in r)
            errors = r.get("errors", [r["error"]] if "error" in r else [])
            return f"{where}: max err {max(errors, default=0):.1e}"
        runs = "; ".join(run(r) for r in self.validation)
        return f"<OnnxExport {self.path} opset {self.opset}{' validated ' + runs if runs else ''}>"


def save_onnx(model, path) -> None:
    """onnx.save, into a directory made as export_tvm makes its own (a missing parent was a raw
    FileNotFoundError); a parent that is a file is said as such."""
    import os

    import onnx

    from ..errors import ArtifactError

    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ArtifactError(f"export_onnx: cannot write {os.fspath(path)!r}: a part of {parent!r} is a file, not a "
                            f"directory ({e})") from None
    onnx.save(model, os.fspath(path))


def model_op_counts(model) -> dict:
    return dict(collections.Counter(n.op_type for n in _all_nodes(model.graph)))


def _all_nodes(g):
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.g is not None and a.g.node:
                yield from _all_nodes(a.g)
            for sg in a.graphs:
                yield from _all_nodes(sg)


def session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
