"""The Triton backward of tri_solve (backends/triton/training.py): db = A^-T g by the tri_solve kernels on the
transposed system (lower <-> upper), dA = -db x^T, against autograd through the dense float64 tri_solve_ref,
under Triton's interpreter, with the kernel's output poisoned with NaN before the run (its sm_90 compile:
tests/test_triton_aot.py, whose sample graph solves both orientations)."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import pytest
import torch

from sessa_compiler.backends.training import backward_for
from sessa_compiler.backends.triton import training as triton_training
from sessa_compiler.semantics import tri_solve_ref
from sessa_compiler.tolerance import relative_error

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")


def _system(a_shape, b_shape, upper, seed):
    g = torch.Generator().manual_seed(seed)
    T = b_shape[-2]
    A = torch.randn(*a_shape, generator=g, dtype=torch.float64) * (0.5 / T ** 0.5) \
        + torch.diag_embed(1.0 + torch.rand(*a_shape[:-1], generator=g, dtype=torch.float64))
    A = A.triu() if upper else A.tril()
    b = torch.randn(*b_shape, generator=g, dtype=torch.float64)
    w = torch.randn(*b_shape, generator=g, dtype=torch.float64)
    return A, b, w


# T = 1, a one-row tail past the 16-row interpreter blocks (17), several blocks (37); weights broadcast (rank 2)
@pytest.mark.parametrize("T, a_lead", [(1, (2,)), (17, (2,)), (37, ())])
@pytest.mark.parametrize("upper", [False, True], ids=["lower", "upper"])
@pytest.mark.parametrize("unit", [False, True], ids=["diag", "unit"])
def test_tri_solve_backward_kernel_equals_dense_autograd(T, a_lead, upper, unit):
    A, b, w = _system((*a_lead, T, T), (2, T, 5), upper, seed=T)
    leaves = [A.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    want_dA, want_db = torch.autograd.grad(tri_solve_ref(*leaves, upper, unit), leaves, w)
    mask = torch.ones(T, T, dtype=torch.bool)
    mask = mask.triu(1 if unit else 0) if upper else mask.tril(-1 if unit else 0)
    A32, w32 = A.float(), w.float()
    x32 = tri_solve_ref(A32, b.float(), upper, unit)
    db = torch.full(w32.shape, float("nan"))                  # poisoned: every entry must be written
    triton_training.tri_solve_transposed(A32, w32, upper, unit, out=db)
    assert relative_error(db, want_db) <= 1e-5
    assert backward_for("triton", "tri_solve")[1] is triton_training.tri_solve_backward
    dA, db2 = triton_training.tri_solve_backward(w32, (A32, x32), {"upper": upper, "unitriangular": unit})
    assert dA.shape == A.shape and torch.equal(db2, db)
    assert relative_error(dA * mask, want_dA * mask) <= 1e-5 and not (dA * ~mask).any()


def test_tri_solve_backward_falls_back_for_float64():
    A, b, w = _system((2, 6, 6), (2, 6, 3), False, seed=2)
    x = tri_solve_ref(A, b)
    got = triton_training.tri_solve_backward(w, (A, x), {"upper": False, "unitriangular": False})
    want = backward_for("torch", "tri_solve")[1](w, (A, x), {"upper": False, "unitriangular": False})
    assert all(torch.equal(g, h) for g, h in zip(got, want))
