"""The generated scan kernel as a torch.library.triton_op (sessa_compiler/backends/triton/ops.py).

On CPU tensors the op runs its kernel under Triton's interpreter: checked against the custom op
torch.ops.sessa_compiler.selective_scan, forward and gradients. On CUDA tensors AOT autograd (the part of
torch.compile that hands Inductor its graph) must trace into the op and see the kernel launch: checked on fake
CUDA tensors in a process with the interpreter off (no GPU is needed to trace; nothing runs)."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sessa_compiler  # noqa: F401  (registers torch.ops.sessa_compiler.selective_scan)
from sessa_compiler.tolerance import TOLERANCE, relative_error

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def scan_inputs(B, T, d_inner, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, d_inner, generator=gen)
    dt = torch.rand(B, T, d_inner, generator=gen) * 0.5
    A = -torch.rand(d_inner, n, generator=gen) * 3
    Bm, Cm = torch.randn(B, T, n, generator=gen), torch.randn(B, T, n, generator=gen)
    D = torch.randn(d_inner, generator=gen)
    return [u, dt, A, Bm, Cm, D]


def test_scan_triton_op_matches_the_custom_op_forward_and_backward():
    from sessa_compiler.backends.triton import ops  # noqa: F401  (registers the triton_op)

    args = scan_inputs(2, 13, 20, 5)
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous batch stride
    leaves = [a.clone().requires_grad_(True) for a in args]
    twins = [a.clone().requires_grad_(True) for a in args]
    got = torch.ops.sessa_compiler.selective_scan_triton(*leaves)
    want = torch.ops.sessa_compiler.selective_scan(*twins)
    assert relative_error(got, want) <= TOLERANCE[torch.float32]
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    got.backward(g)
    want.backward(g)
    for a, b in zip(leaves, twins):
        assert relative_error(a.grad, b.grad) <= TOLERANCE[torch.float32]


TRACE = r"""
import torch
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
import sessa_compiler
from sessa_compiler.backends.triton import ops

class Seen(Exception):
    pass

def compiler(gm, example_inputs):
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    names = [str(n.target) for n in calls]
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in calls
               if "triton_kernel_wrapper" in str(n.target)]
    raise Seen(repr((names, kernels)))

with FakeTensorMode():
    shapes = [(2, 9, 20), (2, 9, 20), (20, 5), (2, 9, 5), (2, 9, 5), (20,)]
    args = [torch.empty(s, device="cuda") for s in shapes]
    try:
        aot_function(lambda *a: torch.ops.sessa_compiler.selective_scan_triton(*a) * 2, fw_compiler=compiler)(*args)
    except Seen as e:
        print(e)
"""


def test_aot_autograd_sees_the_scan_kernel_launch_on_cuda_tensors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    out = subprocess.run([sys.executable, "-c", TRACE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    names, kernels = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr of two lists of str
    assert "triton_kernel_wrapper_functional" in names, names
    assert not any("selective_scan" in n for n in names), names  # traced into, not an opaque op
    assert kernels == ["scan_chunked"]
