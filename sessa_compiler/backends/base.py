"""What every backend is: the ``Backend`` interface, and the ``CompileContext`` that compile() hands it.

A backend turns a traced graph into a runner ``run(inputs, params) -> outputs``. compile() calls
``prepare(graph, ctx)`` once per traced graph; the context carries what the backend may use to
choose its configuration (the example inputs, their device, the options given to compile) and
collects what the backend's pass pipeline did (``ctx.pass_records``), so nothing is pinned on the
graph or kept on pass objects.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..ir.graph import Graph

Runner = Callable[[list, dict], list]


@dataclass
class CompileContext:
    """One prepare() call's inputs and records.

    example_inputs: the graph's inputs for the example call (configs are chosen per shape class and
    device from them); empty when compile() was given none. device: theirs (None without them).
    options: the options given to compile (the backend was constructed with the ones it takes).
    pass_records: one ``PassRecord`` per pass each pipeline run appended (what it did, its decisions).
    """

    example_inputs: tuple = ()
    options: dict = field(default_factory=dict)
    pass_records: list = field(default_factory=list)

    @property
    def device(self) -> torch.device | None:
        for x in self.example_inputs:
            if isinstance(x, torch.Tensor):
                return x.device
        return None


class Backend(abc.ABC):
    """The interface compile() uses; eager, triton, tvm and auto implement it."""

    name: ClassVar[str]
    differentiable: ClassVar[bool] = False   # False: compile() recomputes the backward on eager
    # prepare_training's attention kernel returns its row log-sum-exps (else a blocked pass computes them)
    training_lse_from_forward: ClassVar[bool] = False
    # the same for the feedback kernel's row log-sum-exps (None: as training_lse_from_forward)
    training_feedback_lse_from_forward: ClassVar[bool | None] = None

    @abc.abstractmethod
    def prepare(self, graph: Graph, ctx: CompileContext | None = None) -> Runner:
        """A runner for this graph (kernels may be built now or at the first call)."""

    @abc.abstractmethod
    def describe(self, graph: Graph) -> str:
        """What runs the graph: passes, kernels, configs and where they came from (for explain())."""

    def kernel_sources(self, graph: Graph) -> dict:
        """Generated kernel source by IR value name ({} for a backend that generates none)."""
        return {}

    def prepare_training(self, graph: Graph, ctx: CompileContext | None = None) -> Runner | None:
        """A runner for calls that need gradients whose core ops run this backend's forward kernels and backward
        kernels (backends/training.py), or None: compile() then recomputes the backward on eager."""
        return None

    def resolve(self, inputs) -> Backend:
        """The backend that runs these inputs: itself, except for auto, which picks one per call."""
        return self
