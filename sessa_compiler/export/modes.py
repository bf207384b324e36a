"""Exports are of the module in eval mode, as torch.onnx.export's default (training=TrainingMode.EVAL): a
module left in training mode would otherwise export its dropout as a fallback op the file cannot hold, or a
BatchNorm's statistics update. The module is put in eval mode for the export (with a warning that it was in
training mode) and every submodule's mode is restored afterwards."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def eval_mode_for_export(module, what: str):
    import torch

    modes = [(m, m.training) for m in module.modules()]
    if any(training for _, training in modes):
        # said where torch's own modules behave otherwise in training mode (a module that does not differ, the
        # default state of a freshly built one, exports the same either way)
        differ = [type(m).__name__ for m, training in modes if training and (
            (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
            or isinstance(m, torch.nn.modules.batchnorm._NormBase))]
        if differ:
            warnings.warn(f"{what}: {type(module).__name__} is in training mode; it is exported in eval mode "
                          f"({', '.join(sorted(set(differ)))}: dropout off, norms on their running statistics), as "
                          "torch.onnx.export does; call .eval() first to silence this", stacklevel=5)
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
