"""Thread-bound (GPU) kernels of the TVM backend: device source for CUDA / Metal / OpenCL / WebGPU,
the CUDA source compiled with the machine's nvcc, and the same kernels checked numerically on the CPU
(thread bindings turned into serial loops, in both iteration orders) against the plain references.

No GPU is needed: nothing here runs on a device.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import tvm

from sessa_compiler.api import relative_error
from sessa_compiler.semantics import attention_ref, feedback_ref, scan_ref
from sessa_compiler.backends.tvm import gpu_source as gs
from sessa_compiler.backends.tvm.build import attention_spec, feedback_spec, linear_spec, scan_spec
from sessa_compiler.backends.tvm.schedules import FeedbackSchedule
from sessa_compiler.errors import UnsupportedError

TOL = {"float32": 2e-5, "float64": 1e-10}
TORCH = {"float32": torch.float32, "float64": torch.float64}


def specs(dtype):
    """One spec per kernel shape: every op, GQA + RoPE and plain attention, bias and no bias, a
    feedback chunk small enough that the tests cross several chunks."""
    return {
        "scan": scan_spec(48, 4, dtype),
        "feedback": feedback_spec(32, 32 ** -0.5, dtype, FeedbackSchedule(16, 16, 4, 16, 4)),
        "attention_gqa_rope": attention_spec(4, 2, 16, 0.25, True, dtype),
        "attention_plain": attention_spec(2, 2, 8, 8 ** -0.5, False, dtype),
        "linear_bias": linear_spec(24, 200, True, dtype),
        "linear": linear_spec(24, 40, False, dtype),
    }


# how many launches each kernel's host code makes (feedback: 3 per chunk; attention: pre-pass + main)
N_KERNELS = {"scan": 1, "feedback": 3, "attention_gqa_rope": 2, "attention_plain": 2, "linear_bias": 1, "linear": 1}
SCHEDULES = [None, {op: gs.GPUSchedule(32) for op in gs.GPU_OPS}]   # default threads, and fewer than the sizes


# -- source ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_sources():
    return {(name, dt): gs.generate_source(spec, "cuda") for dt in ("float32", "float64")
            for name, spec in specs(dt).items()}


@pytest.mark.parametrize("name", list(N_KERNELS))
def test_cuda_source_is_thread_bound(cuda_sources, name):
    for dt in ("float32", "float64"):
        src = cuda_sources[(name, dt)]
        spec = specs(dt)[name]
        assert src.count('extern "C" __global__') == 2 * N_KERNELS[name], src[:2000]   # declaration + definition
        assert gs.gpu_symbol(spec) + "_kernel" in src
        assert "threadIdx.x" in src and "blockIdx.x" in src
        assert ("double* __restrict__" if dt == "float64" else "float* __restrict__") in src
        if name.startswith("attention"):
            assert "expf(" in src if dt == "float32" else "exp(" in src
        if name == "attention_gqa_rope":
            assert "cosf(" in src if dt == "float32" else "cos(" in src


def test_bound_kernels_bind_blocks_and_threads_and_unbind_removes_them():
    for spec in specs("float32").values():
        func = gs.gpu_primfunc(spec)
        assert gs.thread_bindings(func) == {"blockIdx.x", "threadIdx.x"}, spec.op
        assert gs.thread_bindings(gs.unbind(func)) == set()
        assert gs.thread_bindings(gs.unbind(func, reverse=True)) == set()


def test_cuda_source_compiles_with_nvcc(tmp_path, cuda_sources):
    nvcc = gs.nvcc_path()
    assert nvcc is not None, ("nvcc is part of this machine image (/usr/local/bin/nvcc, CUDA 13) but was not found on "
                              "PATH or in /usr/local/cuda/bin: the CUDA source cannot be checked")
    # one translation unit with every kernel, float32 and float64 (one nvcc call: about 3-5 s)
    src = gs.generate_source(list(specs("float32").values()) + list(specs("float64").values()), "cuda")
    obj = gs.compile_cuda_source(src, tmp_path, arch="sm_90")
    assert os.path.getsize(obj) > 0


@pytest.mark.parametrize("kind, markers", [
    ("metal", ("kernel void", "threadgroup_position_in_grid", "thread_position_in_threadgroup")),
    ("opencl", ("__kernel void", "get_group_id(0)", "get_local_id(0)")),
    ("webgpu", ("@compute", "workgroup_id", "local_invocation_id")),
])
def test_other_targets_give_source(kind, markers):
    for name, spec in specs("float32").items():
        src = gs.generate_source(spec, kind)
        assert gs.gpu_symbol(spec) in src, (kind, name)
        for m in markers:
            assert m in src, (kind, name, m)


def test_opencl_float64_and_float32_only_targets():
    assert "cl_khr_fp64" in gs.generate_source(specs("float64")["scan"], "opencl")
    for kind in gs.FLOAT32_ONLY:
        with pytest.raises(UnsupportedError, match="float64"):
            gs.generate_source(specs("float64")["scan"], kind)


@pytest.mark.parametrize("kind", sorted(gs.UNAVAILABLE))
def test_unavailable_targets_are_refused_with_the_reason(kind):
    with pytest.raises(UnsupportedError, match="not available in this TVM wheel"):
        gs.generate_source(specs("float32")["scan"], kind)
    # and the recorded reason is still true for this wheel
    with pytest.raises((ValueError, RuntimeError)):
        tvm.compile(tvm.IRModule({"f": gs.gpu_primfunc(specs("float32")["scan"])}), target=tvm.target.Target(kind))


# -- numerics on the CPU -----------------------------------------------------------------------------------
def _inputs(name, spec, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    dt = TORCH[spec.dtype]
    p = spec.params

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=dt)

    if name == "scan":
        C, N = p["channels"], p["d_state"]
        args = [rn(B, T, C), torch.nn.functional.softplus(rn(B, T, C)), -torch.exp(rn(C, N)), rn(B, T, N),
                rn(B, T, N), rn(C)]
        return args, torch.zeros(B, T, C, dtype=dt), lambda: scan_ref(*(a.double() for a in args))
    if name == "feedback":
        D = p["width"]
        f, q, k = rn(B, T, D), rn(B, T, D), rn(B, T, D)
        gamma = 0.999 * torch.tanh(0.5 * rn(B, T))
        return [f, q, k, gamma], torch.zeros(B, T, D, dtype=dt), \
            lambda: feedback_ref(f.double(), q.double(), k.double(), gamma.double(), p["scale"])
    if name.startswith("attention"):
        H, HKV, DH = p["n_heads"], p["n_kv_heads"], p["head_dim"]
        q, k, v = rn(B, T, H, DH), rn(B, T, HKV, DH), rn(B, T, HKV, DH)
        inv = 1.0 / (10000.0 ** (torch.arange(0, DH, 2, dtype=dt) / DH))
        return [q, k, v, inv], torch.zeros(B, T, H, DH, dtype=dt), \
            lambda: attention_ref(q.double(), k.double(), v.double(), p["scale"], True,
                                  inv.double() if p["rope"] else None)
    K, N = p["in_features"], p["out_features"]
    x, w, b = rn(B * T, K), rn(N, K), rn(N)
    return [x, w, b], torch.zeros(B * T, N, dtype=dt), \
        lambda: x.double() @ w.double().T + (b.double() if p["bias"] else 0.0)


@pytest.mark.parametrize("sched", SCHEDULES, ids=["default_threads", "threads32"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(N_KERNELS))
def test_thread_bound_kernel_matches_reference_on_cpu(name, dtype, sched):
    spec = specs(dtype)[name]
    gsched = (sched or {}).get(spec.op)
    for reverse in (False, True):
        fn = gs.build_cpu_check(spec, gsched, reverse=reverse)
        for B, T in ((1, 1), (2, 37), (2, 70)):
            args, out, ref = _inputs(name, spec, B, T, seed=T)
            fn(*args, out)
            err = relative_error(out, ref().to(out.dtype))
            assert err < TOL[dtype], (name, dtype, reverse, B, T, err)


def test_reverse_order_check_catches_a_racy_kernel():
    """The order check is meaningful: a kernel whose threads read each other's writes in one launch
    gives different results serially forward and backward."""
    from tvm.script import tirx as T

    @T.prim_func
    def racy(a_h: T.handle):
        T.func_attr({"global_symbol": "racy", "tirx.noalias": True})
        A = T.match_buffer(a_h, (64,), "float32")
        for bx in T.thread_binding(1, thread="blockIdx.x"):
            for tx in T.thread_binding(63, thread="threadIdx.x"):
                A[tx + 1] = A[tx + 1] + A[tx]

    outs = []
    for reverse in (False, True):
        ex = tvm.compile(tvm.IRModule({"racy": gs.unbind(racy, reverse)}), target="llvm")
        a = torch.ones(64)
        ex["racy"](a)
        outs.append(a)
    assert not torch.equal(outs[0], outs[1])


# -- from a model, and through export ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mamba():
    from sessa_compiler.models import MambaLayer
    torch.manual_seed(0)
    return MambaLayer(16, d_state=4).eval()


def test_emit_from_a_model_and_the_export_option(mamba, tmp_path):
    from sessa_compiler.export.tvm_export import export_tvm

    path = tmp_path / "mamba"
    export_tvm(mamba, (torch.randn(2, 9, 16),), str(path), gpu_source=["cuda", "opencl", "metal", "webgpu"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["gpu_sources"] == {"cuda": "gpu/kernels.cu", "opencl": "gpu/kernels.cl",
                                       "metal": "gpu/kernels.metal", "webgpu": "gpu/kernels.wgsl"}
    cu = (path / "gpu" / "kernels.cu").read_text()
    assert "sessa_scan_" in cu and "sessa_linear_" in cu and "__global__" in cu
    assert "not generated: " in cu   # elementwise ops are named, not silently dropped
    for rel_path in manifest["gpu_sources"].values():
        assert (path / rel_path).stat().st_size > 0
    assert (path / "model.so").exists()   # the CPU library is still written as before
