"""Thread-bound (GPU) variants of the generated TVM kernels, and their device source.

For the IR core ops `scan`, `feedback`, `attention` (and the export-only `linear`) this module
generates TIR PrimFuncs whose parallel loops are bound to ``blockIdx.x`` / ``threadIdx.x`` and asks
TVM's code generators for device source: CUDA C (``cuda``), Metal Shading Language (``metal``),
OpenCL C (``opencl``) and WGSL (``webgpu``). No device or device runtime is needed; the CUDA
source is self-contained and compiles with ``nvcc -c``. ``vulkan`` and ``rocm`` are not available
in the PyPI apache-tvm 0.27 wheel (see UNAVAILABLE).

Kernel shapes (batch ``nb`` and sequence length ``nt`` are symbolic, as in the CPU kernels):
  scan       one thread per (batch, channel); the state h[d_state] lives in registers, time runs
             sequentially in the thread.
  feedback   the chunked solve of kernels/feedback.py with its three parallel phases as three
             kernels per chunk, launched from a host loop over chunks (the launches order the
             phases): logits (block per (batch, chunk row), threads over keys, only keys strictly
             below the diagonal), strictly causal softmax times gamma (thread per (batch, row)),
             inter- plus intra-chunk substitution (thread per (batch, column of s)). Extra memory
             O(chunk * T) for one chunk of gamma * alpha, never O(T^2).
  attention  a RoPE/scale pre-pass (thread per (batch, position, head)), then one thread per query
             row, `threads` rows per block (heaviest causal blocks first), online softmax over the
             keys j <= t with the head's accumulator in registers; GQA reads kv head h // G.
  linear     thread per output element (row, column), K reduced in the thread.

The written source holds the device kernels only: grid sizes, the host loop over feedback chunks and
the device workspaces (P, QR, KR) live in TVM's host module (``tvm.compile(gpu_module(...), cuda)``).
None of these kernels has been run or timed on a GPU; they are plain thread mappings (no shared-memory
tiling, no tensor cores), checked for correctness on the CPU as below.

Correctness without a GPU: every thread-bound kernel is written so that no thread reads what
another thread of the same launch writes (each thread writes a disjoint set of elements and reads
only inputs, its own writes, or what an earlier launch wrote). For such kernels the semantics of a
thread-binding loop (all iterations, in any order) equals a serial loop, so ``unbind`` (thread
bindings -> serial loops, nothing else changed) yields a PrimFunc that LLVM builds for the CPU and
that the tests compare with the eager references (sessa_compiler/semantics/core.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import UnsupportedError

# target kind -> the TVM target (dict) whose codegen emits that source, and the file suffix
SOURCE_TARGETS = {
    "cuda": ({"kind": "cuda", "arch": "sm_90"}, "cu"),
    "metal": ({"kind": "metal"}, "metal"),
    "opencl": ({"kind": "opencl"}, "cl"),
    "webgpu": ({"kind": "webgpu"}, "wgsl"),
}
# checked with apache-tvm 0.27.0.post1: what these kinds raise in this wheel
UNAVAILABLE = {
    "vulkan": "ValueError: Cannot find global function target.build.vulkan (the wheel has no SPIR-V codegen)",
    "rocm": "RuntimeError: Cannot find ROCm path (AMDGPU codegen needs a ROCm install for device libraries)",
}
# kinds whose languages have no float64; TVM's codegen says "Cannot convert type float64 to Metal type"
# and "CodeGenWebGPU: only support f16 or f32"
FLOAT32_ONLY = {"metal", "webgpu"}
MASKED = -1.0e30
GPU_OPS = ("attention", "feedback", "scan", "linear")


@dataclass(frozen=True)
class GPUSchedule:
    """threads: threads per block (for attention: query rows per block)."""

    threads: int = 128

    def tag(self) -> str:
        return f"threads{self.threads}"


DEFAULT_THREADS = {"scan": 128, "feedback": 128, "attention": 64, "linear": 128}


def default_gpu_schedule(op: str) -> GPUSchedule:
    return GPUSchedule(DEFAULT_THREADS.get(op, 128))


# -- kernels -------------------------------------------------------------------------------------------

def scan_gpu_kernel(channels: int, d_state: int, dtype: str, sched: GPUSchedule):
    """`scan(u, delta, A, B, C, D, y)`: thread per (batch, channel), sequential over time."""
    from tvm.script import tirx as T

    DIN, N = channels, d_state
    TB = min(sched.threads, DIN)
    NCB = (DIN + TB - 1) // TB

    @T.prim_func
    def scan(u_h: T.handle, dt_h: T.handle, a_h: T.handle, b_h: T.handle, c_h: T.handle, d_h: T.handle,
             y_h: T.handle):
        T.func_attr({"global_symbol": "scan", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        U = T.match_buffer(u_h, (nb, nt, DIN), dtype)
        DT = T.match_buffer(dt_h, (nb, nt, DIN), dtype)
        A = T.match_buffer(a_h, (DIN, N), dtype)
        BM = T.match_buffer(b_h, (nb, nt, N), dtype)
        CM = T.match_buffer(c_h, (nb, nt, N), dtype)
        DV = T.match_buffer(d_h, (DIN,), dtype)
        Y = T.match_buffer(y_h, (nb, nt, DIN), dtype)
        for bx in T.thread_binding(nb * NCB, thread="blockIdx.x"):
            for tx in T.thread_binding(TB, thread="threadIdx.x"):
                h = T.alloc_buffer((N,), dtype, scope="local")
                a = T.alloc_buffer((N,), dtype, scope="local")
                r = T.alloc_buffer((3,), dtype, scope="local")   # delta, delta * u, y
                b = bx // NCB
                ch = bx % NCB * TB + tx
                if ch < DIN:
                    for n in T.unroll(N):
                        h[n] = T.Cast(dtype, 0.0)
                        a[n] = A[ch, n]
                    for t in T.serial(nt):
                        r[0] = DT[b, t, ch]
                        r[1] = r[0] * U[b, t, ch]
                        r[2] = DV[ch] * U[b, t, ch]
                        for n in T.unroll(N):
                            h[n] = T.exp(r[0] * a[n]) * h[n] + r[1] * BM[b, t, n]
                            r[2] = r[2] + h[n] * CM[b, t, n]
                        Y[b, t, ch] = r[2]

    return scan


def feedback_gpu_kernel(width: int, scale: float, dtype: str, chunk: int, sched: GPUSchedule):
    """`feedback(f, q_b, k_b, gamma, s)`: chunked solve, three launches per chunk."""
    from tvm.script import tirx as T

    D, CH = width, chunk
    TB = sched.threads
    TD = min(TB, D)                    # threads of the column-parallel solve
    NDB = (D + TD - 1) // TD
    neg = MASKED
    from tvm.tirx import FloatImm

    scale = FloatImm(dtype, float(scale))  # typed: a bare float in TVMScript is a float32 literal

    @T.prim_func
    def feedback(f_h: T.handle, q_h: T.handle, k_h: T.handle, g_h: T.handle, s_h: T.handle):
        T.func_attr({"global_symbol": "feedback", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        F = T.match_buffer(f_h, (nb, nt, D), dtype)
        Q = T.match_buffer(q_h, (nb, nt, D), dtype)
        K = T.match_buffer(k_h, (nb, nt, D), dtype)
        G = T.match_buffer(g_h, (nb, nt), dtype)
        S = T.match_buffer(s_h, (nb, nt, D), dtype)
        P = T.alloc_buffer((nb, CH, (nt + CH - 1) // CH * CH), dtype)   # gamma * alpha, this chunk's rows
        for c in T.serial((nt + CH - 1) // CH):
            # 1. logits of row c*CH+i against keys j < that row (block per (batch, row), threads over keys)
            for bx in T.thread_binding(nb * CH, thread="blockIdx.x"):
                for tx in T.thread_binding(TB, thread="threadIdx.x"):
                    acc = T.alloc_buffer((1,), dtype, scope="local")
                    b = bx // CH
                    i = bx % CH
                    for jb in T.serial(((c + 1) * CH + TB - 1) // TB):
                        if jb * TB + tx < c * CH + i and c * CH + i < nt:
                            acc[0] = T.Cast(dtype, 0.0)
                            for d in T.serial(D):
                                acc[0] = acc[0] + Q[b, c * CH + i, d] * K[b, jb * TB + tx, d]
                            P[b, i, jb * TB + tx] = acc[0] * T.Cast(dtype, scale)
            # 2. strictly causal softmax of each row, times gamma (thread per (batch, row))
            for bx in T.thread_binding((nb * CH + TB - 1) // TB, thread="blockIdx.x"):
                for tx in T.thread_binding(TB, thread="threadIdx.x"):
                    red = T.alloc_buffer((2,), dtype, scope="local")
                    b = (bx * TB + tx) // CH
                    i = (bx * TB + tx) % CH
                    if b < nb and c * CH + i < nt and c * CH + i > 0:
                        red[0] = T.Cast(dtype, neg)
                        for j in T.serial(c * CH + i):
                            red[0] = T.max(red[0], P[b, i, j])
                        red[1] = T.Cast(dtype, 0.0)
                        for j in T.serial(c * CH + i):
                            P[b, i, j] = T.exp(P[b, i, j] - red[0])
                            red[1] = red[1] + P[b, i, j]
                        red[1] = G[b, c * CH + i] / red[1]
                        for j in T.serial(c * CH + i):
                            P[b, i, j] = P[b, i, j] * red[1]
            # 3. s[row] = f[row] + P[row, :row] @ s[:row], thread per (batch, column): inter-chunk GEMM
            #    and intra-chunk substitution in one sweep (a thread only reads its own column of s)
            for bx in T.thread_binding(nb * NDB, thread="blockIdx.x"):
                for tx in T.thread_binding(TD, thread="threadIdx.x"):
                    acc = T.alloc_buffer((1,), dtype, scope="local")
                    b = bx // NDB
                    col = bx % NDB * TD + tx
                    if col < D:
                        for i in T.serial(CH):
                            if c * CH + i < nt:
                                acc[0] = F[b, c * CH + i, col]
                                for jj in T.serial(c * CH + i):
                                    acc[0] = acc[0] + P[b, i, jj] * S[b, jj, col]
                                S[b, c * CH + i, col] = acc[0]

    return feedback


def attention_gpu_kernel(n_heads: int, n_kv_heads: int, head_dim: int, scale: float, rope: bool, dtype: str,
                         sched: GPUSchedule):
    """`attention(q, k, v, inv_freq, out)`: pre-pass (RoPE, scale), then thread per query row."""
    from tvm.script import tirx as T

    H, HKV, DH = n_heads, n_kv_heads, head_dim
    G = H // HKV
    HALF = max(DH // 2, 1)
    BQ = sched.threads
    TP = 64                             # threads of the pre-pass
    neg = MASKED
    from tvm.tirx import FloatImm

    scale = FloatImm(dtype, float(scale))  # typed: a bare float in TVMScript is a float32 literal
    ROPE = bool(rope)

    @T.prim_func
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, inv_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "attention", "tirx.noalias": True})
        nb = T.int32()
        nt = T.int32()
        Q = T.match_buffer(q_h, (nb, nt, H, DH), dtype)
        K = T.match_buffer(k_h, (nb, nt, HKV, DH), dtype)
        V = T.match_buffer(v_h, (nb, nt, HKV, DH), dtype)
        INV = T.match_buffer(inv_h, (HALF,), dtype)
        O = T.match_buffer(o_h, (nb, nt, H, DH), dtype)
        QR = T.alloc_buffer((nb, nt, H, DH), dtype)     # rotated, scaled queries
        KR = T.alloc_buffer((nb, nt, HKV, DH), dtype)   # rotated keys
        # pre-pass: thread per (batch, position, head of q or k)
        for bx in T.thread_binding((nb * nt * (H + HKV) + TP - 1) // TP, thread="blockIdx.x"):
            for tx in T.thread_binding(TP, thread="threadIdx.x"):
                if bx * TP + tx < nb * nt * (H + HKV):
                    b = (bx * TP + tx) // (H + HKV) // nt
                    t = (bx * TP + tx) // (H + HKV) % nt
                    hh = (bx * TP + tx) % (H + HKV)
                    if hh < H:
                        if ROPE:
                            for i in T.serial(HALF):
                                QR[b, t, hh, 2 * i] = (Q[b, t, hh, 2 * i] * T.cos(T.Cast(dtype, t) * INV[i])
                                                       - Q[b, t, hh, 2 * i + 1] * T.sin(T.Cast(dtype, t) * INV[i])) \
                                    * T.Cast(dtype, scale)
                                QR[b, t, hh, 2 * i + 1] = (Q[b, t, hh, 2 * i] * T.sin(T.Cast(dtype, t) * INV[i])
                                                           + Q[b, t, hh, 2 * i + 1] * T.cos(T.Cast(dtype, t) * INV[i])) \
                                    * T.Cast(dtype, scale)
                        else:
                            for d in T.serial(DH):
                                QR[b, t, hh, d] = Q[b, t, hh, d] * T.Cast(dtype, scale)
                    else:
                        if ROPE:
                            for i in T.serial(HALF):
                                KR[b, t, hh - H, 2 * i] = K[b, t, hh - H, 2 * i] * T.cos(T.Cast(dtype, t) * INV[i]) \
                                    - K[b, t, hh - H, 2 * i + 1] * T.sin(T.Cast(dtype, t) * INV[i])
                                KR[b, t, hh - H, 2 * i + 1] = K[b, t, hh - H, 2 * i] * T.sin(T.Cast(dtype, t) * INV[i]) \
                                    + K[b, t, hh - H, 2 * i + 1] * T.cos(T.Cast(dtype, t) * INV[i])
                        else:
                            for d in T.serial(DH):
                                KR[b, t, hh - H, d] = K[b, t, hh - H, d]
        # main: block per (batch, head, query block), heaviest (last) query blocks first; thread per row
        for bx in T.thread_binding(nb * H * ((nt + BQ - 1) // BQ), thread="blockIdx.x"):
            for tx in T.thread_binding(BQ, thread="threadIdx.x"):
                q = T.alloc_buffer((DH,), dtype, scope="local")
                acc = T.alloc_buffer((DH,), dtype, scope="local")
                st = T.alloc_buffer((4,), dtype, scope="local")   # running max, running sum, logit, rescale
                b = bx // (H * ((nt + BQ - 1) // BQ))
                h = bx // ((nt + BQ - 1) // BQ) % H
                t = ((nt + BQ - 1) // BQ - 1 - bx % ((nt + BQ - 1) // BQ)) * BQ + tx
                if t < nt:
                    for d in T.unroll(DH):
                        q[d] = QR[b, t, h, d]
                        acc[d] = T.Cast(dtype, 0.0)
                    st[0] = T.Cast(dtype, neg)
                    st[1] = T.Cast(dtype, 0.0)
                    for j in T.serial(t + 1):
                        st[2] = T.Cast(dtype, 0.0)
                        for d in T.unroll(DH):
                            st[2] = st[2] + q[d] * KR[b, j, h // G, d]
                        st[3] = T.exp(st[0] - T.max(st[0], st[2]))
                        st[0] = T.max(st[0], st[2])
                        st[2] = T.exp(st[2] - st[0])
                        st[1] = st[1] * st[3] + st[2]
                        for d in T.unroll(DH):
                            acc[d] = acc[d] * st[3] + st[2] * V[b, j, h // G, d]
                    for d in T.unroll(DH):
                        O[b, t, h, d] = acc[d] / st[1]

    return attention


def linear_gpu_kernel(in_features: int, out_features: int, bias: bool, dtype: str, sched: GPUSchedule):
    """`linear(x [m, K], w [N, K], b [N], y [m, N])`: thread per output element."""
    from tvm.script import tirx as T

    K, N = in_features, out_features
    TB = min(sched.threads, N)
    NNB = (N + TB - 1) // TB
    BIAS = bool(bias)

    @T.prim_func
    def linear(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "linear", "tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x_h, (m, K), dtype)
        W = T.match_buffer(w_h, (N, K), dtype)
        BV = T.match_buffer(b_h, (N,), dtype)
        Y = T.match_buffer(y_h, (m, N), dtype)
        for bx in T.thread_binding(m * NNB, thread="blockIdx.x"):
            for tx in T.thread_binding(TB, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), dtype, scope="local")
                row = bx // NNB
                col = bx % NNB * TB + tx
                if col < N:
                    if BIAS:
                        acc[0] = BV[col]
                    else:
                        acc[0] = T.Cast(dtype, 0.0)
                    for k in T.serial(K):
                        acc[0] = acc[0] + X[row, k] * W[col, k]
                    Y[row, col] = acc[0]

    return linear


# -- specs -> PrimFuncs ----------------------------------------------------------------------------------

def gpu_primfunc(spec, sched: GPUSchedule | None = None):
    """The thread-bound PrimFunc for a KernelSpec (build.KernelSpec: op, static sizes, dtype, CPU
    schedule), named ``<spec.symbol>_gpu``. The feedback kernel keeps the CPU schedule's chunk size."""
    sched = sched or default_gpu_schedule(spec.op)
    p = spec.params
    if spec.op == "scan":
        func = scan_gpu_kernel(p["channels"], p["d_state"], spec.dtype, sched)
    elif spec.op == "feedback":
        func = feedback_gpu_kernel(p["width"], p["scale"], spec.dtype, spec.schedule.chunk, sched)
    elif spec.op == "attention":
        func = attention_gpu_kernel(p["n_heads"], p["n_kv_heads"], p["head_dim"], p["scale"], p["rope"], spec.dtype,
                                    sched)
    elif spec.op == "linear":
        func = linear_gpu_kernel(p["in_features"], p["out_features"], p["bias"], spec.dtype, sched)
    else:
        raise UnsupportedError(f"TVM GPU source: no thread-bound kernel for op '{spec.op}' "
                               f"(available: {', '.join(GPU_OPS)})")
    return func.with_attr("global_symbol", gpu_symbol(spec)).with_attr("sessa.gpu_schedule", sched.tag())


def gpu_symbol(spec) -> str:
    return spec.symbol + "_gpu"


def unbind(func, reverse: bool = False):
    """The same PrimFunc with every thread-binding loop turned into a serial loop (nothing else
    changes), so LLVM can build it for the CPU. Exact for kernels without cross-thread
    communication inside a launch, which is how every kernel here is written.

    reverse=True runs every former block / thread loop backwards (index = extent - 1 - i): a kernel
    whose threads depended on each other's writes within a launch would, in general, give a
    different answer in the two orders, so the tests run both."""
    import tvm_ffi
    from tvm import tirx

    def serial(loop):
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        if not reverse:
            return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body,
                            annotations=loop.annotations)
        i = tirx.Var(str(loop.loop_var.name) + "_rev", loop.loop_var.ty)
        body = tirx.SeqStmt([tirx.Bind(loop.loop_var, loop.min + loop.extent - 1 - i), loop.body])
        return tirx.For(i, loop.min, loop.extent, tirx.ForKind.SERIAL, body, annotations=loop.annotations)

    return tvm_ffi.structural_map(func, (tirx.For, serial))


def thread_bindings(func) -> set:
    """The thread tags ("blockIdx.x", "threadIdx.x", ...) the PrimFunc's loops are bound to."""
    import tvm_ffi
    from tvm import tirx

    tags = set()

    def visit(loop):
        if loop.kind == tirx.ForKind.THREAD_BINDING:
            tags.add(str(loop.thread_binding.thread_tag))

    tvm_ffi.structural_walk(func, (tirx.For, visit))
    return tags


def build_cpu_check(spec, sched: GPUSchedule | None = None, target=None, reverse: bool = False):
    """Build the unbound thread-bound kernel for the CPU (LLVM); returns a callable on TVM tensors
    or DLPack-compatible arrays (contiguous, aligned), with the CPU kernel's argument order."""
    import tvm

    from .target import resolve_target

    func = unbind(gpu_primfunc(spec, sched), reverse)
    ex = tvm.compile(tvm.IRModule({gpu_symbol(spec): func}), target=resolve_target(target))
    fn = ex[gpu_symbol(spec)]

    def call(*args):
        return fn(*args)

    call.executable = ex
    return call


# -- source generation -----------------------------------------------------------------------------------

def _target(kind: str):
    import tvm

    if kind in UNAVAILABLE:
        raise UnsupportedError(f"TVM GPU source for '{kind}' is not available in this TVM wheel: {UNAVAILABLE[kind]}")
    if kind not in SOURCE_TARGETS:
        raise UnsupportedError(f"TVM GPU source: unknown target kind '{kind}' "
                               f"(supported: {', '.join(SOURCE_TARGETS)})")
    return tvm.target.Target(SOURCE_TARGETS[kind][0])


def _specs_of(obj, lanes: int = 8) -> tuple[list, list]:
    """KernelSpecs for a Graph / Node / KernelSpec / list of those, and notes on what was left out."""
    from ...ir.graph import Graph, Node
    from .build import KernelSpec, linear_spec
    from .lowering import kernel_dtype, lower_node

    if isinstance(obj, KernelSpec):
        return [obj], []
    if isinstance(obj, Graph):
        obj = list(obj.nodes)
    if isinstance(obj, Node):
        obj = [obj]
    specs, notes = [], []
    for item in obj:
        if isinstance(item, KernelSpec):
            specs.append(item)
            continue
        if not isinstance(item, Node):
            raise TypeError(f"generate_source: expected a Graph, Node or KernelSpec, got {type(item).__name__}")
        if item.op in ("attention", "feedback", "scan"):
            low = lower_node(item, lanes)
            if low.spec is None:
                notes.append(f"{item.op}: {low.reason}")
            elif low.spec.params.get("key_padding", False):
                notes.append(f"{item.op}: a key-padding mask has no GPU kernel (the CPU kernel and the Relax form "
                             "read it)")
            else:
                specs.append(low.spec)
        elif item.op == "linear":
            x, w = item.inputs[0].type, item.inputs[1].type
            dtype = kernel_dtype(x.dtype.name)
            if dtype is None or not all(isinstance(s, int) for s in w.shape):
                notes.append(f"linear: dtype {x.dtype} or weight shape {w.shape} has no GPU kernel")
            else:
                N, K = (int(s) for s in w.shape)
                has_bias = len(item.inputs) > 2 and item.inputs[2] is not None
                specs.append(linear_spec(K, N, has_bias, dtype))
        else:
            notes.append(f"{item.op}: no thread-bound kernel for this op in gpu_source (only {', '.join(GPU_OPS)})")
    unique = list(dict.fromkeys(specs))
    return unique, list(dict.fromkeys(notes))


def gpu_module(obj, target_kind: str = "cuda", schedules: dict | None = None):
    """The IRModule of thread-bound kernels for `obj` (Graph, Node, KernelSpec or a list of them)."""
    import tvm

    specs, _ = _specs_of(obj)
    if not specs:
        raise UnsupportedError("TVM GPU source: nothing to generate (no attention, feedback, scan or linear op)")
    schedules = schedules or {}
    funcs = {}
    for spec in specs:
        if target_kind in FLOAT32_ONLY and spec.dtype != "float32":
            raise UnsupportedError(f"TVM GPU source: {target_kind} has no {spec.dtype}; generate float32 kernels")
        funcs[gpu_symbol(spec)] = gpu_primfunc(spec, schedules.get(spec.op))
    return tvm.IRModule(funcs)


def generate_source(obj, target_kind: str = "cuda", schedules: dict | None = None) -> str:
    """Device source (CUDA C, Metal, OpenCL C or WGSL) of the thread-bound kernels for `obj`: an IR
    Graph (every attention / feedback / scan / linear node), a Node, a KernelSpec, or a list.
    `schedules` maps op name -> GPUSchedule. Needs no GPU."""
    import tvm

    target = _target(target_kind)
    specs, notes = _specs_of(obj)
    ex = tvm.compile(gpu_module(specs, target_kind, schedules), target=target)
    devs = [m for m in ex.mod.imports if str(m.kind) != "llvm"]
    src = "\n".join(m.inspect_source() for m in devs)
    schedules = schedules or {}
    header = [(f"// generated by sessa_compiler.backends.tvm.gpu_source for target '{target_kind}' "
               f"({SOURCE_TARGETS[target_kind][0]}); batch and sequence length are kernel arguments")]
    for spec in specs:
        sizes = ", ".join(f"{k}={v}" for k, v in spec.static)
        if spec.op == "feedback":
            sizes += f", chunk={spec.schedule.chunk}"
        sched = schedules.get(spec.op) or default_gpu_schedule(spec.op)
        header.append(f"//   {gpu_symbol(spec)}: {spec.op}[{sizes}, {spec.dtype}] gpu schedule {sched.tag()}")
    for n in notes:
        header.append(f"//   not generated: {n}")
    return "\n".join(header) + "\n" + src


def source_suffix(target_kind: str) -> str:
    return SOURCE_TARGETS[target_kind][1]


def emit_graph(graph, out_dir, targets=("cuda",), schedules: dict | None = None) -> dict:
    """Write kernels.<suffix> for each target kind into `out_dir`; returns {kind: file name}."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for kind in targets:
        name = f"kernels.{source_suffix(kind) if kind in SOURCE_TARGETS else kind}"
        src = generate_source(graph, kind, schedules)
        with open(os.path.join(out_dir, name), "w") as fh:
            fh.write(src)
        written[kind] = name
    return written


def nvcc_path() -> str | None:
    """The machine's nvcc: $PATH, then /usr/local/cuda/bin."""
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found
    for p in ("/usr/local/cuda/bin/nvcc",):
        if os.path.exists(p):
            return p
    return None


def compile_cuda_source(src: str, out_dir, arch: str = "sm_90", name: str = "kernels") -> str:
    """`nvcc -c` the CUDA source into an object file (a check that the source is valid CUDA);
    returns the object's path. Raises UnsupportedError when nvcc is missing, RuntimeError with
    nvcc's output when it fails."""
    import subprocess

    nvcc = nvcc_path()
    if nvcc is None:
        raise UnsupportedError("nvcc not found on PATH or in /usr/local/cuda/bin")
    os.makedirs(out_dir, exist_ok=True)
    cu = os.path.join(out_dir, f"{name}.cu")
    obj = os.path.join(out_dir, f"{name}.o")
    with open(cu, "w") as fh:
        fh.write(src)
    proc = subprocess.run([nvcc, "-c", f"-arch={arch}", "-o", obj, cu], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return obj
