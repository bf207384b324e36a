"""Sizes used as floats in a forward (``n * 2.0``, ``float(T)``) stay symbolic: ``torch.full_like(v, T * 2.0)`` had
the traced length's value baked in (error 4 at the next length), ``v.shape[0] * 1.0 + t`` failed to lower. And
an operand that a call's sizes make empty while the op's output is not (``h[:, 1:].sum(1)`` at T = 1, a shifted
language-model loss at T = 1): TVM's reductions over nothing returned an uninitialised buffer (another output's
values, or a finite loss where the module gives NaN); such calls now run on the interpreter."""
import pytest
import torch

import sessa_compiler as sc

pytestmark = pytest.mark.usefixtures("one_thread")


class SizeFloats(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, v):
        n = v.shape[1]
        h = self.lin(v)
        return (torch.full_like(h, n * 2.0), h / (n * 0.5), h.sum() + v.shape[0] * 1.0, h * float(n) ** 0.5)


class EmptyOperands(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, h):
        y = self.lin(h)
        return y.sum(1), y[:, 1:].sum(1), y[:, 1:].mean(1), y[:, 1:].reshape(-1).sum()


class ShiftedLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 11)

    def forward(self, h, labels):
        logits = self.head(h)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))


def assert_same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_sizes_as_floats_follow_the_call(backend):
    torch.manual_seed(0)
    m = SizeFloats()
    c = sc.compile(m, backend=backend)
    with torch.no_grad():
        for B, T in ((2, 5), (2, 3), (1, 8)):
            v = torch.randn(B, T, 4)
            assert_same(c(v), m(v))


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_operands_empty_at_the_calls_sizes(backend):
    torch.manual_seed(0)
    m, loss = EmptyOperands(), ShiftedLoss()
    c, closs = sc.compile(m, backend=backend), sc.compile(loss, backend=backend)
    with torch.no_grad():
        for B, T in ((2, 5), (2, 1), (3, 1), (1, 1), (2, 2)):
            h, labels = torch.randn(B, T, 4), torch.randint(0, 11, (B, T))
            got = c(h)
            assert_same(got, m(h))
            assert_same([closs(h, labels)], [loss(h, labels)])
            if T == 1:
                assert (got[1] == 0).all() and torch.isnan(got[2]).all() and got[3] == 0
                assert torch.isnan(closs(h, labels))


def test_the_tvm_export_says_where_an_operand_is_empty(tmp_path):
    torch.manual_seed(0)
    m = EmptyOperands().eval()
    with pytest.warns(UserWarning, match=r"empty where 4\*B\*\(T - 1\) = 0"):
        sc.export_tvm(m, (torch.randn(2, 5, 4),), str(tmp_path / "lib"))
    lib = sc.load_tvm(str(tmp_path / "lib"))
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        for got, want in zip(lib(x), m(x)):
            torch.testing.assert_close(torch.as_tensor(got), want)   # where nothing is empty: the module's values


class ZeroWidthPieces(torch.nn.Module):
    """Hugging Face Mamba2 splits its projection with a zero-width piece (d_mlp = 0)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 10)

    def forward(self, x):
        a, b, c, d = torch.split(self.lin(x), [0, 3, 0, 7], dim=-1)
        return b * 2, torch.cat([a, d], -1) + 1, c * 2, torch.split(x, [4, 0], -1)[0] * 3


def test_zero_width_split_pieces_build_in_the_whole_graph():
    torch.manual_seed(0)
    m = ZeroWidthPieces()
    c = sc.compile(m, backend="tvm")
    with torch.no_grad():
        for T in (5, 2):
            x = torch.randn(2, T, 4)
            assert_same(c(x), m(x))
    assert "whole graph in TVM" in c.explain()


class SizeFloatsNoPow(SizeFloats):
    def forward(self, v):
        return super().forward(v)[:3]   # (float(T) ** 0.5 makes torch.export fix T)


@pytest.mark.parametrize("export", ["onnx", "tvm"])
def test_sizes_as_floats_in_the_exports(export, tmp_path):
    torch.manual_seed(0)
    m = SizeFloatsNoPow().eval()
    v = torch.randn(2, 5, 4)
    if export == "onnx":
        import onnxruntime as ort

        sc.export_onnx(m, (v,), str(tmp_path / "m.onnx"))
        session = ort.InferenceSession(str(tmp_path / "m.onnx"))
        run = lambda x: [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]
    else:
        sc.export_tvm(m, (v,), str(tmp_path / "lib"))
        lib = sc.load_tvm(str(tmp_path / "lib"))
        run = lambda x: [torch.as_tensor(o) for o in lib(x)]
    with torch.no_grad():
        for B, T in ((2, 5), (3, 2), (1, 9)):
            x = torch.randn(B, T, 4)
            assert_same(run(x), m(x))
