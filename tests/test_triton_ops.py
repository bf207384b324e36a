"""The generated scan, attention and feedback kernels as torch.library.triton_op ops
(sessa_compiler/backends/triton/ops.py).

On CPU tensors the ops run their kernels under Triton's interpreter: checked against the custom ops
torch.ops.sessa_compiler.selective_scan, .attention and .feedback, forward and gradients. On CUDA tensors AOT
autograd (the part of torch.compile that hands Inductor its graph) must trace into the ops and see the kernel
launches: checked on fake CUDA tensors in a process with the interpreter off (no GPU is needed to trace; nothing
runs). The feedback kernels' AOT compile for sm_90 is tests/test_triton_aot.py's (chunks of 64, as the op picks)."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sessa_compiler  # noqa: F401  (registers torch.ops.sessa_compiler.selective_scan)
from sessa_compiler.semantics.core import feedback_ref
from sessa_compiler.tolerance import TOLERANCE, relative_error
from model_helpers import scan_inputs

triton_env.require_interpreter()
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = pathlib.Path(__file__).resolve().parent.parent


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


def feedback_inputs(B, T, d_qk, d_v, gamma_sign, seed):
    """Fresh random operands with |gamma| within about 1e-3 of gamma_max = 0.999 (ill-conditioned solves)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, T, d_v, generator=gen)
    q = torch.randn(B, T, d_qk, generator=gen) * 1.5
    k = torch.randn(B, T, d_qk, generator=gen) * 1.5
    gamma = 0.999 * torch.tanh(gamma_sign * 9.0 + 0.2 * torch.randn(B, T, generator=gen))
    return [f, q, k, gamma]


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors: outputs and workspaces that the op allocates show any
    element the kernels leave unwritten (and then read or return)."""
    real = torch.empty

    def empty(*args, **kwargs):
        x = real(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def small_chunks(monkeypatch):
    """Inner chunks of 16 rows (outer chunks of 32 under the interpreter), so short sequences cross both."""
    from sessa_compiler.backends.triton import ops

    monkeypatch.setattr(ops, "FEEDBACK_CHUNK_SIZE", 16)


# T = 1; T inside one inner chunk; T across inner and outer chunks, a multiple of neither (chunks of 16, outer 32).
# d_qk=24 / d_v=40: one masked width tile (q hoisted); d_qk=80 / d_v=16: a loop over width tiles with a masked tail.
@pytest.mark.parametrize("T", [1, 17, 70])
@pytest.mark.parametrize("B, d_qk, d_v, gamma_sign", [(2, 24, 40, 1.0), (1, 80, 16, -1.0)])
def test_feedback_triton_op_matches_the_custom_op(T, B, d_qk, d_v, gamma_sign, small_chunks, nan_empty):
    f, q, k, gamma = feedback_inputs(B, T, d_qk, d_v, gamma_sign, seed=T + d_qk)
    assert T == 1 or gamma.abs().max() > 0.998
    q = q.transpose(0, 1).contiguous().transpose(0, 1)     # a non-contiguous batch stride
    got = torch.ops.sessa_compiler.feedback_triton(f, q, k, gamma, 0.3)
    want = torch.ops.sessa_compiler.feedback(f, q, k, gamma, 0.3)
    exact = feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)
    assert got.shape == f.shape and got.dtype == f.dtype and got.is_contiguous()
    assert torch.isfinite(got).all()
    assert relative_error(got, want) <= TOLERANCE[torch.float32]
    assert relative_error(got, exact) <= TOLERANCE[torch.float32]


def test_feedback_triton_op_with_the_default_chunk_sizes(nan_empty):
    """The chunk size the op picks by itself (the cost model's: 64 rows, outer chunks of 128 under the
    interpreter), across one inner block."""
    from sessa_compiler.backends.triton import ops

    assert ops.FEEDBACK_CHUNK_SIZE is None
    f, q, k, gamma = feedback_inputs(2, 70, 16, 24, -1.0, seed=5)
    got = torch.ops.sessa_compiler.feedback_triton(f, q, k, gamma, 0.25)
    assert torch.isfinite(got).all()
    assert relative_error(got, feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.25)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_feedback_triton_op_16_bit_inputs(dtype, small_chunks, nan_empty):
    """16-bit f, q_b, k_b (the result in f's dtype; lse, inverses and s in float32 workspaces); gamma float32."""
    f, q, k, gamma = feedback_inputs(2, 37, 32, 24, 1.0, seed=11)
    f, q, k = (x.to(dtype) for x in (f, q, k))
    got = torch.ops.sessa_compiler.feedback_triton(f, q, k, gamma, 0.3)
    want = torch.ops.sessa_compiler.feedback(f, q, k, gamma, 0.3)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert relative_error(got, want) <= TOLERANCE[dtype]
    exact = feedback_ref(f.double(), q.double(), k.double(), gamma.double(), 0.3)
    assert relative_error(got, exact) <= TOLERANCE[dtype]


def test_feedback_triton_op_float64_runs_the_reference():
    f, q, k, gamma = (x.double() for x in feedback_inputs(2, 9, 8, 8, 1.0, seed=2))
    got = torch.ops.sessa_compiler.feedback_triton(f, q, k, gamma, 0.3)
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.ops.sessa_compiler.feedback(f, q, k, gamma, 0.3))


def test_feedback_triton_op_backward_matches_the_custom_op(small_chunks):
    args = feedback_inputs(2, 45, 24, 20, 1.0, seed=4)
    leaves = [a.clone().requires_grad_(True) for a in args]
    twins = [a.clone().requires_grad_(True) for a in args]
    got = torch.ops.sessa_compiler.feedback_triton(*leaves, 0.3)
    want = torch.ops.sessa_compiler.feedback(*twins, 0.3)
    assert relative_error(got, want) <= TOLERANCE[torch.float32]
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(6))
    got.backward(g)
    want.backward(g)
    for a, b in zip(leaves, twins):
        assert a.grad is not None and a.grad.abs().max() > 0
        assert relative_error(a.grad, b.grad) <= TOLERANCE[torch.float32]


# The start of both programs below: AOT autograd hands `compiler` its forward graph, which raises with the graph's
# call targets and the names of the Triton kernels its wrap_triton launches run.
RECORDER = r"""
import torch
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
import sessa_compiler

class Seen(Exception):
    pass

def compiler(gm, example_inputs):
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    names = [str(n.target) for n in calls]
    kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in calls
               if "triton_kernel_wrapper" in str(n.target)]
    raise Seen(repr((names, kernels)))
"""


def run_traced(program: str, tmp_path) -> str:
    """RECORDER + program in a process with Triton's interpreter off (kernels and caches under tmp_path): its
    stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), SESSA_COMPILER_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", RECORDER + program], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


TRACE = r"""
import sessa_compiler
from sessa_compiler.backends.triton import ops

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
    f, qb, kb, gamma = (torch.empty(s, device="cuda") for s in ((2, 600, 24), (2, 600, 16), (2, 600, 16), (2, 600)))
    try:   # T = 600: outer chunks of 256 rows on a GPU, so three of them
        aot_function(lambda *a: torch.ops.sessa_compiler.feedback_triton(*a, 0.25) - 1,
                     fw_compiler=compiler)(f, qb, kb, gamma)
    except Seen as e:
        print(e)
"""


def test_aot_autograd_sees_the_kernel_launches_on_cuda_tensors(tmp_path):
    stdout = run_traced(TRACE, tmp_path)
    lines = stdout.strip().splitlines()
    assert len(lines) == 3, stdout
    (scan_names, scan_kernels), (attention_names, attention_kernels), (feedback_names, feedback_kernels) = (
        eval(line) for line in lines)  # noqa: S307
    assert "triton_kernel_wrapper_functional" in scan_names, scan_names
    # traced into, not opaque ops
    assert not any("sessa_compiler" in n for n in scan_names + attention_names + feedback_names)
    assert scan_kernels == ["scan_chunked"]
    assert attention_kernels == ["rope_rotate", "rope_rotate", "attention_fwd"]
    # every kernel launch of the feedback op is a wrap_triton launch: three per outer chunk (one pass: no lse or
    # inverse pass); the other calls are the workspaces' allocations, the launches' results and the final subtraction
    assert feedback_kernels == ["feedback_probs_online", "feedback_update_online", "feedback_solve_online"] * 3
    assert feedback_names.count("triton_kernel_wrapper_functional") == len(feedback_kernels)
    others = [n for n in feedback_names if "triton_kernel_wrapper" not in n]
    assert {n for n in others} == {"aten.empty.memory_format", "<built-in function getitem>", "aten.sub.Tensor"}, others


COMPILED_TRACE = r"""
import sessa_compiler as sc
from sessa_compiler import api
from sessa_compiler.models import SessaMixer

class Holder(torch.nn.Module):   # torch.compile's call of the compiled module, parameters as graph inputs
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return api._traced_call(self.c, (x,), {})

m = SessaMixer(32, n_heads=4).eval()
c = sc.compile(m, backend=BACKEND)
c(torch.randn(2, 9, 32))   # traced on CPU
holder = Holder(c)
names = [n for n, _ in holder.named_parameters()] + [n for n, _ in holder.named_buffers()]
with FakeTensorMode(allow_non_fake_inputs=True):
    x = torch.empty(2, 300, 32, device="cuda")
    state = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in list(holder.parameters()) +
             list(holder.buffers())]
    try:
        aot_function(lambda x, *s: torch.func.functional_call(holder, dict(zip(names, s)), (x,)) * 2,
                     fw_compiler=compiler)(x, *state)
    except Seen as e:
        print(e)
"""


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_torch_compile_of_a_compiled_module_on_cuda_records_the_triton_ops(tmp_path, backend):
    """torch.compile of a module compiled for Triton (or auto) records its core ops, on CUDA tensors, as the
    triton_ops, so the graph handed to Inductor holds their kernel launches (checked as AOT autograd traces
    the compiled module's call on fake CUDA tensors, T = 300: two outer chunks of the feedback's solve); a
    module compiled for eager records the portable custom ops."""
    stdout = run_traced(COMPILED_TRACE.replace("BACKEND", repr(backend)), tmp_path)
    names, kernels = eval(stdout.strip().splitlines()[-1])  # noqa: S307
    if backend == "eager":
        assert kernels == [] and {"sessa_compiler.attention.default", "sessa_compiler.feedback.default"} <= set(names)
        return
    assert not any("sessa_compiler" in n for n in names), names
    assert kernels == ["rope_rotate", "rope_rotate", "attention_fwd"] + [
        "feedback_probs_online", "feedback_update_online", "feedback_solve_online"] * 2
