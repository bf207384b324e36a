"""export_tvm / load_tvm: the exported directory reproduces the module at several T (symbolic B and T),
runs in a subprocess where torch cannot be imported, and export refuses graphs with ops TVM cannot
lower, naming them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tvm  # noqa: E402,F401 - pinned in requirements/all.txt, so CI always runs these tests

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.errors import UnsupportedError  # noqa: E402
from sessa_compiler.models import Decoder, MambaLayer, SessaLayer  # noqa: E402
from model_helpers import randomize

BLOCK_TORCH = r'''
import importlib.abc, importlib.util, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process: " + name)
        return None
sys.meta_path.insert(0, BlockTorch())
try:
    import torch  # noqa: F401
    raise SystemExit("the torch blocker does not work")
except ImportError:
    pass
import numpy as np
model_dir, x_path, y_path = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("sessa_tvm_runtime", model_dir + "/sessa_tvm_runtime.py")
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
model = rt.load_tvm(model_dir)
np.save(y_path, model(np.load(x_path)))
assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules)
print("ok without torch")
'''


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def sessa_export(tmp_path_factory):
    m = randomize(SessaLayer(32, n_heads=4, n_kv_heads=2), gamma_bias=4.0)
    path = str(tmp_path_factory.mktemp("tvm") / "sessa")
    sc.export_tvm(m, (torch.randn(2, 9, 32),), path)
    return m, path


def test_export_directory_layout(sessa_export):
    m, path = sessa_export
    names = set(os.listdir(path))
    assert {"model.so", "weights.npz", "manifest.json", "sessa_tvm_runtime.py"} <= names
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["inputs"][0]["shape"] == ["B", "T", 32]
    assert "znver" in manifest["target"] or "mcpu" in manifest["target"]
    weights = np.load(os.path.join(path, "weights.npz"), allow_pickle=False)   # no pickle inside
    assert len(weights.files) == len(manifest["params"]) == len(m.state_dict())


def test_load_tvm_matches_module_at_every_length(sessa_export):
    m, path = sessa_export
    model = sc.load_tvm(path)
    for B, T in ((1, 1), (2, 9), (3, 70)):
        x = torch.randn(B, T, 32)
        with torch.no_grad():
            ref = m(x).numpy()
        assert rel(model(x.numpy()), ref) < 1e-4, (B, T)
    strided = np.random.randn(2, 64, 20).astype(np.float32).transpose(0, 2, 1)[:, :, ::2]   # (2, 20, 32) view
    with torch.no_grad():
        ref = m(torch.from_numpy(np.ascontiguousarray(strided))).numpy()
    assert rel(model(strided), ref) < 1e-4
    with pytest.raises(ValueError):
        model(np.zeros((2, 5, 31), np.float32))
    with pytest.raises(ValueError):
        model(np.zeros((2, 5, 32), np.float64))


def test_loaded_library_runs_where_torch_cannot_be_imported(sessa_export, tmp_path):
    m, path = sessa_export
    x = np.random.default_rng(0).standard_normal((2, 23, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run.py"
    script.write_text(BLOCK_TORCH)
    proc = subprocess.run([sys.executable, str(script), path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok without torch" in proc.stdout
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert rel(np.load(tmp_path / "y.npy"), ref) < 1e-4


def test_export_mamba_layer(tmp_path):
    m = randomize(MambaLayer(16, d_state=4))
    sc.export_tvm(m, (torch.randn(1, 8, 16),), str(tmp_path / "mamba"))
    model = sc.load_tvm(str(tmp_path / "mamba"))
    for T in (1, 29):
        x = torch.randn(2, T, 16)
        with torch.no_grad():
            assert rel(model(x.numpy()), m(x).numpy()) < 1e-4


def test_export_decoder(tmp_path):
    dec = randomize(Decoder(29, 16, "SMT", n_heads=2, d_state=4))
    sc.export_tvm(dec, (torch.randint(0, 29, (1, 8)),), str(tmp_path / "dec"))
    model = sc.load_tvm(str(tmp_path / "dec"))
    idx = torch.randint(0, 29, (2, 17))
    with torch.no_grad():
        assert rel(model(idx.numpy()), dec(idx).numpy()) < 1e-4


def test_unrecognised_block_exports_through_the_fallback_table(tmp_path):
    """sort, cumsum and flip along T (fallbacks of semantics/fallback_forms.py) in Relax, at new B and T."""
    from styles.unrecognised import OddBlock
    m = OddBlock(8).eval()
    sc.export_tvm(m, (torch.randn(1, 5, 8),), str(tmp_path / "odd"))
    model = sc.load_tvm(str(tmp_path / "odd"))
    for B, T in ((1, 1), (3, 23)):
        x = torch.randn(B, T, 8)
        with torch.no_grad():
            assert rel(model(x.numpy()), m(x).numpy()) < 1e-4


class ModeBlock(torch.nn.Module):
    def forward(self, x):
        return x + torch.mode(x, dim=1).values.unsqueeze(1)


def test_export_fails_naming_ops_without_tvm_lowering(tmp_path):
    with pytest.raises(UnsupportedError) as err:
        sc.export_tvm(ModeBlock(), (torch.randn(1, 5, 8),), str(tmp_path / "odd"))
    msg = str(err.value)
    assert "no TVM lowering" in msg and "fallback(aten.mode.default)" in msg
    assert not os.path.exists(tmp_path / "odd" / "model.so")


class _Switch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = torch.nn.Linear(8, 8), "relu"

    def forward(self, x):
        h = self.lin(x)
        return torch.relu(h) if self.act == "relu" else torch.tanh(h)


def test_a_directory_exported_again_loads_the_new_program(tmp_path):
    """The dynamic loader hands back a library already loaded from the same path: loading a directory exported
    again in the same process ran the old program."""
    import numpy as np

    torch.manual_seed(0)
    m = _Switch().eval()
    x = torch.randn(2, 5, 8)
    d = str(tmp_path / "exp")
    sc.export_tvm(m, (x,), d)
    with torch.no_grad():
        assert np.abs(sc.load_tvm(d)(x.numpy()) - m(x).numpy()).max() < 1e-5
        m.act = "tanh"
        sc.export_tvm(m, (x,), d)
        assert np.abs(sc.load_tvm(d)(x.numpy()) - m(x).numpy()).max() < 1e-5
        assert np.abs(sc.load_tvm(d)(x.numpy()) - m(x).numpy()).max() < 1e-5   # and once more
