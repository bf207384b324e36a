"""The TVM decode kernels (kernels/decode.py) called on torch tensors: built once per static shape and cache
dtype (capacity, batch and position are runtime arguments), operands checked for what the generated code
assumes (contiguous, 64-byte aligned, the declared dtype), workspaces reused between calls.

Used by the serving step (sessa_compiler/serving.py) for one-position decode steps on CPU tensors when the
compiled module's backend is ``tvm``.
"""
from __future__ import annotations

import threading

import torch

from .backend import ALIGN, aligned_empty
from . import omp_launch
from .build import lanes_for
from .kernels.decode import (MAX_FUSED, attention_decode_kernel, feedback_decode_kernel, linear_decode_kernel,
                             linears_decode_kernel)
from .target import configure_threads, resolve_target

CACHE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
BLOCK = 16          # positions per online-softmax block
ATT_TASKS = 16      # attention: about this many parallel tasks (kv heads x chunks) per batch row
FB_CHUNKS = 16      # feedback: chunks of cached positions per batch row
# The step's matrix-vector kernels, and cache reads of at most SERIAL_BYTES, run on the calling thread. Their
# parallel loops would run on torch's OpenMP workers (omp_launch.py), which spin for a while after each region, so
# on a quiet machine a launch is cheap; but when the other core is busy, every launch waits for the worker's time
# slice. SessaLayer(512, n_heads=8) step at context 1024 (about 4 KB per cached position for the attention and as
# much for the feedback), 2-core VM, 2026-12-07, medians: serial 1.29 ms, parallel reads 1.12, parallel reads and
# linears 1.07 on a quiet machine; with one core kept busy, 1.90 serial against 5.16 and 5.73 ms. So a step goes
# parallel only where its reads are large enough to repay a lost time slice (context 8192: 4.45 ms against 6.99
# on one thread, quiet). (Before omp_launch, TVM's own pool's sleeping worker made parallel GEMVs 4.33 against
# 1.60 ms serial.)
LINEAR_PARALLEL = False
LINEAR_ROWS = 16    # linear layers with at most this many rows (batch x new positions) run as TVM GEMVs
# A cache read of at most this many bytes runs on the calling thread: one thread reads about 70 GB/s from this
# VM's cache, so 6 MB take about 90 us there. SessaLayer(512, n_heads=8): contexts up to about 1.5K stay serial.
SERIAL_BYTES = 6 << 20

_BUILT: dict = {}
_LOCK = threading.Lock()


def _ok(t: torch.Tensor, dtype) -> bool:
    return t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() % ALIGN == 0


def _arg(t: torch.Tensor) -> torch.Tensor:
    """float32, contiguous, aligned (a copy when it is not); detached only where it needs to be (a detach is a
    new tensor object: a few hundred ns on every operand of every kernel call)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    if not t.is_contiguous() or t.data_ptr() % ALIGN:
        out = aligned_empty(tuple(t.shape), torch.float32)
        out.copy_(t)
        t = out
    return t


def _bits(cache: torch.Tensor) -> torch.Tensor:
    """bfloat16 caches reach the kernels as their int16 bit patterns (widened to float32 by a shift there)."""
    return cache.view(torch.int16) if cache.dtype == torch.bfloat16 else cache


class DecodeKernels:
    """Builds and calls the decode kernels for one target (None: this machine's CPU)."""

    def __init__(self, target=None):
        configure_threads()
        self.target = resolve_target(target)
        self.lanes = lanes_for(self.target)
        self.rows = LINEAR_ROWS  # steps with at most this many rows (batch x positions) run their linears here
        self.calls = 0          # attention and feedback kernel calls
        self.parallel_calls = 0  # of those, the ones with a parallel loop (reads over SERIAL_BYTES)
        self.linear_calls = 0
        self._work: dict = {}
        self._fns: dict = {}

    def _build(self, key: tuple, make):
        fn = self._fns.get(key)   # per step: one dict lookup
        if fn is None:
            import tvm

            from .lib_cache import load_or_build_kernel

            full = key + (str(self.target),)
            symbol = f"sessa_{key[0]}"
            with _LOCK:
                built = _BUILT.get(full)
                if built is None:   # else from the persistent cache (a new process serving the same model)
                    built = _BUILT[full] = load_or_build_kernel(
                        {"decode": repr(key), "target": str(self.target)}, symbol,
                        lambda: tvm.compile(tvm.IRModule({symbol: make().with_attr("global_symbol", symbol)}),
                                            target=self.target))
            fn = self._fns[key] = built[1]
        return fn

    @staticmethod
    def own_threads(n: int) -> int:
        """The kernels' parallel loops called from this thread run on ``n`` threads whatever torch's count is (0:
        torch's count); -> the previous setting. A serving step sets torch to one thread for its small ops and
        this to the count it had (omp_launch.own_threads; nothing where TVM's own pool runs the loops)."""
        return omp_launch.own_threads(n)

    def _no_mask(self, batch: int) -> torch.Tensor:
        """The unread mask argument of an unmasked attention step: uint8 [B, 1]."""
        m = self._work.get(("no_mask", batch))
        if m is None:
            m = self._work[("no_mask", batch)] = torch.ones(batch, 1, dtype=torch.uint8)
        return m

    def _workspace(self, shape: tuple) -> torch.Tensor:
        key = (shape, threading.get_ident())     # per thread: concurrent steps never share one
        w = self._work.get(key)
        if w is None:
            w = self._work[key] = aligned_empty(shape, torch.float32)
        return w

    # -- attention ------------------------------------------------------------------------------------------
    def supports_attention(self, K: torch.Tensor, V: torch.Tensor) -> bool:
        return K.dtype in CACHE_DTYPES and V.dtype == K.dtype and _ok(K, K.dtype) and _ok(V, V.dtype)

    def supports_mask(self, M: torch.Tensor) -> bool:
        return M.dtype == torch.bool and M.device.type == "cpu" and M.is_contiguous()

    def attention(self, q, k, v, inv_freq, K, V, t0: int, scale: float, rope: bool, keep=None) -> torch.Tensor:
        """q [B, H, d], k [B, Hkv, d], v [B, Hkv, dv] (new position t0, unrotated) -> out [B, H, dv] float32;
        K/V [B, Hkv, L, d|dv] get position t0 written. ``keep`` (bool [B, L], position t0 already written): a
        key-padding mask of the cached positions; a row with no real key gives the mean of v over [0, t0]."""
        B, H, d = q.shape
        Hkv, dv = K.shape[1], V.shape[-1]
        chunks = max(1, ATT_TASKS // Hkv)
        par = B * Hkv * (t0 + 1) * (d + dv) * K.element_size() > SERIAL_BYTES
        masked = keep is not None
        key = ("attention_decode", H, Hkv, d, dv, float(scale), bool(rope), CACHE_DTYPES[K.dtype], chunks, BLOCK,
               self.lanes, par) + (("key_padding",) if masked else ())
        fn = self._build(key, lambda: attention_decode_kernel(H, Hkv, d, dv, scale, rope, CACHE_DTYPES[K.dtype],
                                                              chunks, BLOCK, self.lanes, par, key_padding=masked))
        if inv_freq is None:
            inv_freq = torch.zeros(max(d // 2, 1))
        out = aligned_empty((B, H, dv), torch.float32)
        work = self._workspace((B, Hkv, chunks, H // Hkv, dv + 2))
        km = keep.view(torch.uint8) if masked else self._no_mask(B)
        fn(_arg(q), _arg(k), _arg(v), _arg(inv_freq), _bits(K), _bits(V), km, int(t0), work, out)
        self.calls += 1
        self.parallel_calls += par
        return out

    # -- feedback -------------------------------------------------------------------------------------------
    def supports_feedback(self, KB: torch.Tensor, S: torch.Tensor) -> bool:
        return KB.dtype in CACHE_DTYPES and _ok(KB, KB.dtype) and _ok(S, torch.float32)

    def feedback(self, f, q_b, k_b, gamma, KB, S, t0: int, scale: float) -> torch.Tensor:
        """f, q_b, k_b [B, W], gamma [B] at position t0 -> s [B, W] float32; KB[:, t0] = k_b, S[:, t0] = s."""
        B, W = f.shape
        par = B * t0 * W * (KB.element_size() + S.element_size()) > SERIAL_BYTES
        key = ("feedback_decode", W, float(scale), CACHE_DTYPES[KB.dtype], FB_CHUNKS, BLOCK, self.lanes, par)
        fn = self._build(key, lambda: feedback_decode_kernel(W, scale, CACHE_DTYPES[KB.dtype], FB_CHUNKS, BLOCK,
                                                             self.lanes, par))
        out = aligned_empty((B, W), torch.float32)
        work = self._workspace((B, FB_CHUNKS, W + 2))
        fn(_arg(f), _arg(q_b), _arg(k_b), _arg(gamma), _bits(KB), S, int(t0), work, out)
        self.calls += 1
        self.parallel_calls += par
        return out

    # -- linear layers of a step ---------------------------------------------------------------------------
    def linear(self, torch_linear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
        """x @ w.T + b through the TVM GEMV when the step has few rows and float32 weights laid out as the
        kernel assumes (so no torch thread pool wakes inside a step), else through ``torch_linear``."""
        call = self.linear_call(x, ((w, b),), fused=False)
        if call is None:
            return torch_linear(x, w, b)
        return self.run_linear(call, x)[0]

    def linears(self, torch_linear, x: torch.Tensor, *weights_and_biases):
        """Several linear layers of the same input x (operands w0, b0, w1, b1, ...; a bias may be None) in one
        kernel launch: a tuple of their outputs. Falls back to ``torch_linear`` per layer as ``linear`` does."""
        pairs = tuple(zip(weights_and_biases[0::2], weights_and_biases[1::2]))
        call = self.linear_call(x, pairs, fused=True)
        if call is None:
            return tuple(torch_linear(x, w, b) for w, b in pairs)
        return self.run_linear(call, x)

    def site(self, torch_linear, fused: bool = False, own_outputs: bool = False) -> "LinearSite":
        """A call site of ``linear`` (``fused``: of ``linears``) for one node of a step plan (LinearSite)."""
        return LinearSite(self, torch_linear, fused, own_outputs)

    def linear_call(self, x: torch.Tensor, pairs: tuple, fused: bool):
        """How ``linear`` (one pair) or ``linears`` runs x against the (weight, bias) pairs: (kernel, rows, IN,
        operands between the input and the outputs, output widths, operands after the outputs), or None where
        torch must (too many rows, not float32, weights not contiguous and aligned, more than MAX_FUSED layers).
        The operands include this thread's dummies for absent biases and unused slots of a fused call."""
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if (not 0 < rows <= LINEAR_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or len(pairs) > MAX_FUSED
                or not all(w.dim() == 2 and w.shape[1] == x.shape[-1] and _ok(w, torch.float32)
                           and (b is None or _ok(b, torch.float32)) for w, b in pairs)):
            return None
        IN = int(x.shape[-1])
        outs = tuple(int(w.shape[0]) for w, _ in pairs)
        biases = tuple(b is not None for _, b in pairs)
        par = LINEAR_PARALLEL
        if not fused:
            (w, b), = pairs
            key = ("linear_decode", IN, outs[0], biases[0], self.lanes, par)
            fn = self._build(key, lambda: linear_decode_kernel(IN, outs[0], biases[0], self.lanes, par))
            return fn, rows, IN, (w, b if b is not None else self._workspace((outs[0],))), outs, ()
        key = ("linears_decode", IN, outs, biases, self.lanes, par)
        fn = self._build(key, lambda: linears_decode_kernel(IN, outs, biases, self.lanes, par))
        spare = MAX_FUSED - len(pairs)
        dummy_w, dummy_b = self._workspace((1, IN)), self._workspace((1,))
        ws = [w for w, _ in pairs] + [dummy_w] * spare
        bs = [b if b is not None else self._workspace((w.shape[0],)) for w, b in pairs] + [dummy_b] * spare
        return fn, rows, IN, tuple(ws + bs), outs, (self._workspace((rows, 1)),) * spare

    def run_linear(self, call: tuple, x: torch.Tensor, results: list | None = None, views: tuple | None = None):
        """Runs a ``linear_call`` on x: the outputs [..., width] as a tuple (written into ``results`` [rows, width]
        and returned as ``views`` of them when given)."""
        fn, rows, IN, before, outs, after = call
        if results is None:
            results = [aligned_empty((rows, o), torch.float32) for o in outs]
        fn(_arg(x.reshape(rows, IN)), *before, *results, *after)
        self.linear_calls += len(outs)
        if views is not None:
            return views
        lead = x.shape[:-1]
        return tuple([r.view(*lead, o) for r, o in zip(results, outs)])


class LinearSite:
    """One linear node of a decode-step plan (``DecodeKernels.site``): ``site(x, w0, b0, ...)`` gives what
    ``linear`` (or, ``fused``, ``linears``) gives. Those resolve the kernel at every call (operand checks, the
    kernel key, the dummies: about 10 us of Python per call, four calls per Sessa layer step); a site keeps what
    its last resolution found (``linear_call``) with the input shape, the weight and bias objects and their data
    pointers and the calling thread, and reuses it while all of those come back unchanged (a weight given other
    storage, as by ``p.data = ...``, or another shape, dtype or thread resolves again).

    ``own_outputs``: the plan found that no graph output can share storage with this node's outputs (they are
    consumed only by ops that allocate their results), so the site writes every call into the same output
    buffers, kept with the memo (so per thread), and returns the same views of them: no allocation and no view
    per call. Such outputs are overwritten by the next step: the plan must not hand them out."""

    __slots__ = ("kernels", "torch_linear", "fused", "own", "memo")

    def __init__(self, kernels: DecodeKernels, torch_linear, fused: bool, own_outputs: bool = False):
        self.kernels, self.torch_linear, self.fused = kernels, torch_linear, fused
        self.own, self.memo = own_outputs, None

    def __call__(self, x: torch.Tensor, *wb):
        if not self.fused and len(wb) == 1:   # linear(x, w): no bias
            wb = (wb[0], None)
        m = self.memo
        if m is None or not self._same(m, x, wb):
            pairs = tuple(zip(wb[0::2], wb[1::2]))
            call = self.kernels.linear_call(x, pairs, self.fused)
            if call is None:
                self.memo = None
                outs = tuple(self.torch_linear(x, w, b) for w, b in pairs)
                return outs if self.fused else outs[0]
            results = views = None
            if self.own:
                rows, outs = call[1], call[4]
                results = [aligned_empty((rows, o), torch.float32) for o in outs]
                views = tuple([r.view(*x.shape[:-1], o) for r, o in zip(results, outs)])
            m = self.memo = (x.shape, x.dtype, wb, tuple(t.data_ptr() if t is not None else 0 for t in wb),
                             threading.get_ident(), call, results, views)
        outs = self.kernels.run_linear(m[5], x, m[6], m[7])
        return outs if self.fused else outs[0]

    @staticmethod
    def _same(m: tuple, x: torch.Tensor, wb: tuple) -> bool:
        if x.shape != m[0] or x.dtype != m[1] or not x.is_cpu or m[4] != threading.get_ident() or len(wb) != len(m[2]):
            return False
        for t, t0, p in zip(wb, m[2], m[3]):
            if t is not t0 or (t is not None and (t.data_ptr() != p or not t.is_contiguous())):
                return False
        return True
