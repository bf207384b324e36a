"""What a forward reads outside its module, beyond plain constants, keys the compile cache and guards the compiled
module: a dict, tuple or function held by another user module (``settings.CFG["scale"]``), a helper rebound there
to a lambda, a function's own attributes, a settings class's list, what a config dataclass holds beside its fields,
torch's global switches, and the code of a user package named like a standard-library module. Each was served the
old graph (errors 0.5 to 150) before."""
import dataclasses
import sys

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.api import relative_error
from user_files import load_source

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = """
import torch
CFG = {"scale": 1.0}
SCALES = (1.0,)
ACT = torch.tanh


class Opts:
    scales = [1.0]
"""

MODEL = """
import torch
import reach_settings
from reach_settings import Opts


def act(t):
    return t * act.scale


act.scale = 1.0


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = reach_settings.ACT(self.lin(x)) * reach_settings.CFG["scale"] * reach_settings.SCALES[0]
        return act(h * Opts.scales[0])
"""


@pytest.fixture
def cache_on(cache_dir, monkeypatch):
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "1")
    return cache_dir


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    settings = load_source(tmp_path, "reach_settings", SETTINGS)
    model = load_source(tmp_path, "reach_model", MODEL)
    monkeypatch.setitem(sys.modules, "reach_settings", settings)
    monkeypatch.setitem(sys.modules, "reach_model", model)
    return settings, model


def fresh(model):
    torch.manual_seed(0)
    return model.Net().eval()


def compiled_and_checked(m, x, c=None):
    """(the compiled module, where its graph came from), after checking its outputs against the module's."""
    c = c or sc.compile(m, backend="eager")
    with torch.no_grad():
        err = relative_error(c(x), m(x))
    assert err <= 1e-5, err
    return c, c.trace_cache


EDITS = {
    "a dict's item": lambda s, m: s.CFG.__setitem__("scale", 2.0),
    "a tuple rebound": lambda s, m: setattr(s, "SCALES", (3.0,)),
    "a function rebound": lambda s, m: setattr(s, "ACT", torch.sigmoid),
    "a lambda rebound": lambda s, m: setattr(s, "ACT", lambda t: t * 7),
    "another lambda": lambda s, m: setattr(s, "ACT", lambda t: t * 8),
    "a settings class's list": lambda s, m: s.Opts.scales.__setitem__(0, 0.5),
    "a function's attribute": lambda s, m: setattr(m.act, "scale", 0.25),
}


def test_what_another_user_module_holds_keys_the_cache(cache_on, user_modules):
    """Each edit (in this process: as a value set at import from the environment or a flag would be in another)
    misses the compile cache, and the new outputs come out."""
    settings, model = user_modules
    x = torch.randn(2, 5, 8)
    assert compiled_and_checked(fresh(model), x)[1] == "miss"
    assert compiled_and_checked(fresh(model), x)[1] == "hit"
    for what, edit in EDITS.items():
        edit(settings, model)
        assert compiled_and_checked(fresh(model), x)[1] == "miss", what
        assert compiled_and_checked(fresh(model), x)[1] == "hit", what


def test_what_another_user_module_holds_guards_the_compiled_module(user_modules, monkeypatch):
    """The same edits between two calls of one compiled module: it traces again (no compile cache here)."""
    monkeypatch.setenv("SESSA_COMPILER_COMPILE_CACHE", "0")
    settings, model = user_modules
    x = torch.randn(2, 5, 8)
    m = fresh(model)
    c, _ = compiled_and_checked(m, x)
    for what, edit in EDITS.items():
        before = len(c._variants)
        edit(settings, model)
        compiled_and_checked(m, x, c)   # (raises with the error where the old graph is served)
        assert len(c._variants) == before + 1, what


@dataclasses.dataclass
class Config:
    scale: float = 1.0

    def __post_init__(self):
        self.temperature = 1.0


class Configured(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * self.cfg.scale / self.cfg.temperature


class Flags(dict):
    pass


class Flagged(torch.nn.Module):
    def __init__(self, flags):
        super().__init__()
        self.flags = flags
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * self.flags["scale"] * self.flags.gain


def test_a_dataclass_or_dict_config_is_keyed_by_all_it_holds(cache_on):
    """An attribute set in __post_init__ or later on a config dataclass, and an attribute of a dict subclass, key
    the entry as its fields and items do."""
    x = torch.randn(2, 5, 8)

    def configured(temperature):
        torch.manual_seed(0)
        cfg = Config()
        cfg.temperature = temperature
        return Configured(cfg).eval()

    assert compiled_and_checked(configured(1.0), x)[1] == "miss"
    assert compiled_and_checked(configured(1.0), x)[1] == "hit"
    assert compiled_and_checked(configured(0.5), x)[1] == "miss"

    def flagged(gain):
        torch.manual_seed(0)
        flags = Flags(scale=1.0)
        flags.gain = gain
        return Flagged(flags).eval()

    assert compiled_and_checked(flagged(1.0), x)[1] == "miss"
    assert compiled_and_checked(flagged(1.0), x)[1] == "hit"
    assert compiled_and_checked(flagged(6.0), x)[1] == "miss"


class Deterministic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return h * 2 if torch.are_deterministic_algorithms_enabled() else torch.tanh(h)


def test_torch_global_switches_guard_and_key(cache_on):
    """A forward branching on torch.are_deterministic_algorithms_enabled(): the compiled module traces again
    when it is flipped between calls, and the flag keys the compile cache."""
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    m = Deterministic().eval()
    before = torch.are_deterministic_algorithms_enabled()
    try:
        c, where = compiled_and_checked(m, x)
        assert where == "miss"
        torch.use_deterministic_algorithms(not before)
        compiled_and_checked(m, x, c)
        assert compiled_and_checked(Deterministic().eval(), x)[1] == "hit"   # the entry the call above wrote
    finally:
        torch.use_deterministic_algorithms(before)
    assert compiled_and_checked(Deterministic().eval(), x)[1] == "hit"       # the first entry, still there


STDLIB_NAMED = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * {factor}
"""


def test_a_user_module_named_like_a_standard_library_module_is_the_users_code(cache_on, tmp_path, monkeypatch):
    """A user's ``profile.py`` (or a package ``code/``, ``trace/``): its code is recorded and keyed by its source
    like any user file, not taken for the standard library's (keyed by Python's version). Editing it missed
    nothing before: the old graph came back."""
    monkeypatch.setitem(sys.modules, "profile", sys.modules.get("profile"))   # (restored after the test)
    mod = load_source(tmp_path, "profile", STDLIB_NAMED.format(factor="2.0"))
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    assert compiled_and_checked(mod.Net().eval(), x)[1] == "miss"
    torch.manual_seed(0)
    assert compiled_and_checked(mod.Net().eval(), x)[1] == "hit"
    mod = load_source(tmp_path, "profile", STDLIB_NAMED.format(factor="3.0"))   # edited, and imported again
    torch.manual_seed(0)
    assert compiled_and_checked(mod.Net().eval(), x)[1] == "miss"
