"""CUDA graphs for compiled Triton calls: the second call at a shape records its launches, later calls replay.

A forward at one shape issues a fixed sequence of launches (about 113 for a SessaLayer at T=8192: the
feedback solve's host loop makes three per outer chunk of 256 rows), each costing ~10 us of Python and
driver time. ``GraphedCalls`` keeps, per call signature (the inputs' shapes, strides, dtypes and device,
and the parameters' storage), a count of calls:

1. the first call runs eagerly (it compiles the kernels and warms the allocator);
2. the second copies the inputs into static buffers and runs once more inside ``torch.cuda.graph``: every
   launch, its grid and its scalar arguments, and every buffer it allocates (from the graph's private
   pool) are recorded;
3. every later call copies its inputs into the static buffers, replays the graph (one host call; no
   Python, no allocation, no host synchronisation inside the sequence) and returns clones of the static
   outputs (the next replay overwrites them).

This is only sound when the launch sequence depends on the shapes alone, never on the values: no
``.item()``/``nonzero``-style host synchronisation and no data-dependent branch between launches.
tests/test_triton_cuda_graphs.py checks that on CPU (Triton's interpreter) by recording the launch plan
of two calls with different values; ``plan_signature`` is what it compares.

Calls with autograd (an input or parameter requiring grad, grad mode on), non-contiguous inputs, calls
made while another graph
being captured (an outer ``torch.cuda.graph`` of the whole call), and CPU tensors run eagerly. Replaced
parameter tensors (a new storage) give a new signature and a new recording; in-place updates of the same
storage are seen by the replay.
"""
from __future__ import annotations

import collections
import threading

import torch

MAX_GRAPHS = 8   # recorded signatures kept per program (least recently used dropped)


def call_signature(inputs, params: dict) -> tuple:
    """What a recording is valid for: each input's shape, strides, dtype and device; each parameter's storage."""
    ins = tuple((tuple(x.shape), tuple(x.stride()), x.dtype, x.device) if isinstance(x, torch.Tensor) else
                ("value", x) for x in inputs)
    ps = tuple((k, p.data_ptr(), tuple(p.shape), p.dtype) for k, p in sorted(params.items())
               if isinstance(p, torch.Tensor))
    return ins, ps


def graphable(inputs, params: dict) -> bool:
    """Whether this call may be recorded: CUDA tensors, no autograd, not inside another capture."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or not all(x.is_cuda and x.is_contiguous() for x in tensors):   # static copies: dense inputs
        return False
    if torch.is_grad_enabled() and (any(x.requires_grad for x in tensors) or any(
            isinstance(p, torch.Tensor) and p.requires_grad for p in params.values())):
        return False
    return not torch.cuda.is_current_stream_capturing()


class _Recorded:
    __slots__ = ("calls", "graph", "static_inputs", "static_outputs")

    def __init__(self):
        self.calls, self.graph, self.static_inputs, self.static_outputs = 0, None, None, None


class GraphedCalls:
    """Per-signature recording and replay of ``run(inputs, params) -> list of tensors``."""

    def __init__(self, run, max_graphs: int = MAX_GRAPHS):
        self.run = run
        self.max_graphs = max_graphs
        self.recorded: collections.OrderedDict = collections.OrderedDict()
        self.captures = 0
        self.replays = 0
        self.lock = threading.Lock()

    def __call__(self, inputs, params):
        if not graphable(inputs, params):
            return self.run(inputs, params)
        with self.lock:
            key = call_signature(inputs, params)
            rec = self.recorded.get(key)
            if rec is None:
                rec = self.recorded[key] = _Recorded()
                while len(self.recorded) > self.max_graphs:
                    self.recorded.popitem(last=False)
            self.recorded.move_to_end(key)
            rec.calls += 1
            if rec.calls == 1:
                return self.run(inputs, params)
            if rec.graph is None:
                self._record(rec, inputs, params)
            for static, x in zip(rec.static_inputs, inputs):
                if isinstance(static, torch.Tensor):
                    static.copy_(x)
            rec.graph.replay()
            self.replays += 1
            return [o.clone() if isinstance(o, torch.Tensor) else o for o in rec.static_outputs]

    def _record(self, rec: _Recorded, inputs, params) -> None:
        statics = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
                   if isinstance(x, torch.Tensor) else x for x in inputs]
        for s, x in zip(statics, inputs):
            if isinstance(s, torch.Tensor):
                s.copy_(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = self.run(statics, params)
        rec.graph, rec.static_inputs, rec.static_outputs = graph, statics, list(outs)
        self.captures += 1
