"""The compile cache's recorder (compile_cache.Recorder) keeps its profile hook off inside torch's own functions
(a set hook slows every Python instruction, about doubling torch.export), and still records every function of
the user's that the trace runs, also those torch calls back inside its functions (a custom op's fake kernel,
torch.cond still traces under the recorder's mode)."""
import sys

import pytest
import torch

import sessa_compiler.compile_cache as compile_cache
from sessa_compiler.frontend.trace import export_program
from sessa_compiler.models import SessaLayer
from user_files import load_source

HELPERS = '''
import torch


@torch.library.custom_op("sessa_test_recorder::shift", mutates_args=())
def shift(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@shift.register_fake
def shift_fake(x):
    return torch.empty_like(x)


def bigger(x):
    return x * 2


def smaller(x):
    return x / 2


def act(x):
    return torch.tanh(x)
'''

MODEL = '''
import torch
import rec_helpers


class User(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = rec_helpers.act(self.lin(x))
        y = torch.cond(y.sum() > 0, rec_helpers.bigger, rec_helpers.smaller, (y,))
        return torch.ops.sessa_test_recorder.shift(y)
'''


class Counting(compile_cache.Recorder):
    events = 0

    def _hook(self, frame, event, arg):
        Counting.events += 1
        return super()._hook(frame, event, arg)


def _recorded(module, x):
    Counting.events = 0
    with Counting(module) as rec:
        export_program(module, (x,))
    return rec.manifest(), Counting.events


def test_the_hook_is_off_inside_torchs_functions():
    torch.manual_seed(0)
    m, x = SessaLayer(16, n_heads=2).eval(), torch.randn(2, 7, 16)
    export_program(m, (x,))   # imports done
    events = []
    seen = lambda *a: events.append(1)   # noqa: E731 - every event of the module's forward
    pre = m.register_forward_pre_hook(lambda *a: sys.setprofile(seen))
    post = m.register_forward_hook(lambda *a: sys.setprofile(None))
    try:
        export_program(m, (x,))
    finally:
        pre.remove(), post.remove()
        sys.setprofile(None)
    manifest, recorded = _recorded(m, x)
    assert manifest is not None and sys.getprofile() is None
    assert not torch.overrides._get_current_function_mode_stack()   # the recorder's mode is gone
    # the hook was called for a small part of the forward's events (all of them before)
    assert recorded < 0.1 * len(events), (recorded, len(events))


def test_user_code_torch_runs_inside_its_functions_is_still_recorded(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("rec_helpers", "rec_model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    load_source(tmp_path, "rec_helpers", HELPERS)
    model = load_source(tmp_path, "rec_model", MODEL)
    torch.manual_seed(0)
    m, x = model.User().eval(), torch.randn(2, 5, 8)
    export_program(m, (x,))   # what the first trace imports (import hooks run: pytest's) is not compared
    _recorded(m, x)   # nor what the first recorded trace does once (about 100k more events, under torch.cond)
    manifest, fewer = _recorded(m, x)
    assert manifest is not None
    names = {path for (_, path) in manifest["functions"]}
    # (torch.cond's branches are run by dynamo's bytecode interpreter, never as Python frames: no profile hook sees
    # them, with or without the mode; their file is keyed through act's)
    assert {"act", "shift_fake", "User.forward"} <= names, names
    monkeypatch.setattr(compile_cache, "_modes_are_torchs", lambda: False)   # the hook on throughout
    everything, more = _recorded(m, x)
    for part in ("files", "functions", "globals"):
        assert everything[part] == manifest[part], part
    # every library the hook saw run is keyed (those torch's tracing runs inside its functions, sympy for symbolic
    # sizes, by the list compile_cache._TORCH_RUNS)
    assert everything["libraries"].items() <= manifest["libraries"].items()
    assert fewer < more


@pytest.mark.parametrize("arg, plain", [
    ((torch.ones(2), 3, 1.5, None, slice(0, 2), torch.float32, torch.Size([2])), True),
    ([{"a": torch.ones(1)}], True),
    ((lambda t: t,), False),                     # torch could call it
    ((torch.ones(2), object()), False),          # its __index__, __len__... could run
])
def test_what_counts_as_plain_arguments(arg, plain):
    assert compile_cache._plain(arg) is plain
