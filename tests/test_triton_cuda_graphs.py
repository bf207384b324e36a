"""CUDA graphs for compiled Triton calls (backends/triton/cuda_graphs.py), checked on CPU.

A recording is replayed for every later call with the same signature, so the launch sequence must depend on
the shapes alone: the plan (each Triton launch's kernel, grid and scalar arguments, and every torch op between
launches with its shapes) is recorded under Triton's interpreter for calls with different values and must
not change, and nothing in it may synchronise with the host. The record/replay protocol runs against a fake
CUDA graph (no GPU here); benchmarks/gpu_check.py times the real one."""
from tests import triton_env  # noqa: I001  (sets TRITON_INTERPRET before triton is imported)

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton_env.require_interpreter()

import triton.runtime.interpreter as interpreter

import sessa_compiler as sc
from sessa_compiler.backends.triton import cuda_graphs
from sessa_compiler.backends.triton.backend import TritonBackend
from sessa_compiler.models import SessaLayer

# ops that make the host wait for the device (or read device values into Python) on CUDA
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2",
            "unique_consecutive", "unique_dim", "allclose", "any", "all"}


class PlanRecorder(TorchDispatchMode):
    """Every torch op outside a kernel launch (name, tensor shapes, other arguments) and every Triton launch
    (kernel, grid, scalar arguments), in order."""

    def __init__(self):
        super().__init__()
        self.plan, self.in_launch = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_launch:
            desc = tuple(("T", tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a)
                         for a in list(args) + list(kwargs.values()))
            self.plan.append(("op", func.overloadpacket.__name__, desc))
        return func(*args, **kwargs)


@pytest.fixture
def recorder(monkeypatch):
    rec = PlanRecorder()
    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        g = grid(kwargs) if callable(grid) else grid
        scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
        rec.plan.append(("launch", self.fn.__name__, tuple(g), scalars,
                         tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        rec.in_launch = True
        try:
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            rec.in_launch = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return rec


def layer_program(gamma_bias=None):
    torch.manual_seed(0)
    m = SessaLayer(32, n_heads=2).eval()
    if gamma_bias is not None:
        with torch.no_grad():
            m.mixer.gamma_bias.fill_(gamma_bias)
    graph = sc.trace(m, (torch.randn(1, 8, 32),))
    prog = TritonBackend(interpret=True, feedback_chunk_size=16).build_program(graph)
    return prog, graph.params


@pytest.mark.parametrize("gamma_bias", [None, 6.0], ids=["default", "gamma-near-max"])
def test_launch_plan_depends_on_shapes_only_and_never_syncs(recorder, gamma_bias):
    """Two calls at T=37 (crossing inner and outer chunks) with unrelated values, one of them 100x larger:
    the same launches with the same grids and scalars, the same torch ops between them, none synchronising."""
    prog, params = layer_program(gamma_bias)
    plans = []
    for seed, mult in ((1, 1.0), (2, 100.0)):
        x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(seed)) * mult
        recorder.plan = []
        with torch.no_grad(), recorder:
            out = prog.run([x], params)[0]
        assert torch.isfinite(out).all()
        plans.append(recorder.plan)
    launches = [p for p in plans[0] if p[0] == "launch"]
    names = {p[1] for p in launches}
    assert {"attention_fwd", "feedback_probs_online", "feedback_update_online", "feedback_solve_online"} <= names
    assert "feedback_lse" not in names and "feedback_diag_inverse" not in names   # one pass
    assert sum(p[1] == "feedback_solve_online" for p in launches) >= 2   # more than one outer chunk
    assert plans[0] == plans[1]
    synced = sorted({p[1] for p in plans[0] if p[0] == "op" and p[1] in SYNC_OPS})
    assert not synced, synced


def test_plan_recorder_sees_a_sync_and_a_data_dependent_branch(recorder):
    """The recorder can fail: a step that reads a value on the host and branches on it."""
    def step(x):
        return x * 2 if (x.sum() > 0).item() else x - 1

    plans = []
    for sign in (1.0, -1.0):
        recorder.plan = []
        with recorder:
            step(torch.full((3,), sign))
        plans.append(recorder.plan)
    assert plans[0] != plans[1]
    assert any(p[0] == "op" and p[1] in SYNC_OPS for p in plans[0])


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: capture runs the code once (as CUDA records it); replay redoes the
    recorded work on the same buffers (reads the static inputs, writes the static outputs in place)."""
    captured = []

    def __init__(self):
        self.work = None

    def replay(self):
        self.work()


class FakeCapture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        FakeGraph.captured.append(self.graph)

    def __exit__(self, *exc):
        return False


def test_second_call_records_and_later_calls_replay(monkeypatch):
    calls, replaying = [], [False]

    def run(inputs, params):
        if not replaying[0]:
            calls.append(tuple(x.shape for x in inputs))
        return [inputs[0] * params["w"] + 1]

    def replayed(statics, outs, params):
        replaying[0] = True
        outs[0].copy_(run(statics, params)[0])
        replaying[0] = False

    graphed = cuda_graphs.GraphedCalls(run)
    monkeypatch.setattr(cuda_graphs, "graphable", lambda inputs, params: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    real_record = graphed._record

    def record(rec, inputs, params):
        real_record(rec, inputs, params)
        statics, outs = rec.static_inputs, rec.static_outputs
        rec.graph.work = lambda: replayed(statics, outs, params)   # what the recorded launches do

    monkeypatch.setattr(graphed, "_record", record)
    params = {"w": torch.tensor(3.0)}
    xs = [torch.randn(4, 5) for _ in range(4)]
    outs = [graphed([x], params)[0] for x in xs]
    for x, o in zip(xs, outs):
        assert torch.equal(o, x * 3 + 1)            # each call saw its own inputs
    assert graphed.captures == 1 and graphed.replays == 3
    assert len(calls) == 2                          # the eager first call and the capture; then replays only
    assert outs[2].data_ptr() != outs[3].data_ptr()  # clones: a replay does not overwrite what a call returned
    graphed([torch.randn(2, 5)], params)            # a new shape runs eagerly first
    assert graphed.captures == 1 and len(graphed.recorded) == 2


def test_calls_that_cannot_be_recorded_run_eagerly():
    x = torch.randn(3, 4)
    assert not cuda_graphs.graphable([x], {})                          # CPU tensors
    assert cuda_graphs.call_signature([x], {}) != cuda_graphs.call_signature([x.t().contiguous().t()], {})
    seen = []
    graphed = cuda_graphs.GraphedCalls(lambda i, p: seen.append(1) or [i[0]])
    for _ in range(3):
        graphed([x], {})
    assert len(seen) == 3 and graphed.captures == 0


def test_cuda_graphs_is_a_triton_option():
    assert TritonBackend().cuda_graphs and not TritonBackend(cuda_graphs=False).cuda_graphs
    m = SessaLayer(32, n_heads=2).eval()
    compiled = sc.compile(m, backend="triton", options={"cuda_graphs": False, "feedback_chunk_size": 16})
    with torch.no_grad():
        assert compiled(torch.randn(1, 5, 32)).shape == (1, 5, 32)
