"""The generated scan and attention kernels as torch.library.triton_op ops (sessa_compiler/backends/triton/ops.py).

On CPU tensors the ops run their kernels under Triton's interpreter: checked against the custom ops
torch.ops.sessa_compiler.selective_scan and .attention, forward and gradients. On CUDA tensors AOT autograd (the
part of torch.compile that hands Inductor its graph) must trace into the ops and see the kernel launches: checked
on fake CUDA tensors in a process with the interpreter off (no GPU is needed to trace; nothing runs)."""
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


@pytest.mark.parametrize("rope, causal", [(True, True), (False, True), (False, False)])
def test_attention_triton_op_matches_the_custom_op_forward_and_backward(rope, causal):
    from sessa_compiler.backends.triton import ops  # noqa: F401  (registers the triton_op)

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, 4, 16, generator=g)
    k, v = torch.randn(2, 37, 2, 16, generator=g), torch.randn(2, 37, 2, 16, generator=g)   # GQA
    inv = 10000.0 ** (-torch.arange(8) / 8.0) if rope else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    twins = [x.clone().requires_grad_(True) for x in (q, k, v)]
    got = torch.ops.sessa_compiler.attention_triton(*leaves, inv, 0.25, causal)
    want = torch.ops.sessa_compiler.attention(*twins, inv, 0.25, causal)
    assert relative_error(got, want) <= TOLERANCE[torch.float32]
    grad = torch.randn(want.shape, generator=g)
    got.backward(grad)
    want.backward(grad)
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
    q, k, v = (torch.empty(2, 9, h, 16, device="cuda") for h in (4, 2, 2))
    inv = torch.empty(8, device="cuda")
    try:
        aot_function(lambda q, k, v, inv: torch.ops.sessa_compiler.attention_triton(q, k, v, inv, 0.25, True) + 1,
                     fw_compiler=compiler)(q, k, v, inv)
    except Seen as e:
        print(e)
"""


def test_aot_autograd_sees_the_kernel_launches_on_cuda_tensors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    out = subprocess.run([sys.executable, "-c", TRACE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout
    (scan_names, scan_kernels), (attention_names, attention_kernels) = (eval(line) for line in lines)  # noqa: S307
    assert "triton_kernel_wrapper_functional" in scan_names, scan_names
    assert not any("sessa_compiler" in n for n in scan_names + attention_names)  # traced into, not opaque ops
    assert scan_kernels == ["scan_chunked"]
    assert attention_kernels == ["rope_rotate", "rope_rotate", "attention_fwd"]
