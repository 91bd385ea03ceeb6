"""Faster ControlNet forwards for sampling: torch.compile or CUDA graphs, with shapes static within a run.

A sampling run calls the ControlNet with the same shapes at every step (the hint is encoded once and passed as
`guided_hint`), so one CUDA graph per input signature can be captured and replayed. Both modes need a CUDA
device; elsewhere they fall back to the eager forward and say so in the log.
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import torch
from torch import nn

from .network import ControlNet, ControlNetOutput
from .union import UnionCondition, as_condition

logger = logging.getLogger(__name__)


class Acceleration(str, Enum):
    NONE = "none"
    COMPILE = "compile"
    CUDA_GRAPH = "cuda_graph"


class _Graph:
    """One captured forward: static input buffers, the graph, and its static outputs."""

    def __init__(self, module: Any, inputs: dict[str, torch.Tensor | None], warmup: int = 3):
        self.inputs = {k: None if v is None else v.clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # allocator and cuDNN settle before capture
                module(**self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output: ControlNetOutput = module(**self.inputs)

    def __call__(self, inputs: dict[str, torch.Tensor | None]) -> ControlNetOutput:
        for key, value in inputs.items():
            if value is not None:
                self.inputs[key].copy_(value)
        self.graph.replay()
        # The graph's outputs are overwritten by the next replay (the other half of a split CFG batch, the next
        # unit of a composition sharing this network): hand out copies, a few MB per call.
        return ControlNetOutput(tuple(t.clone() for t in self.output.down), self.output.mid.clone())


class AcceleratedControlNet(nn.Module):
    """A ControlNet whose forward runs compiled or from CUDA graphs; same interface as ControlNet."""

    def __init__(self, controlnet: ControlNet, mode: Acceleration | str):
        super().__init__()
        self.inner = controlnet
        self.mode = Acceleration(mode)
        self._compiled: Any = None
        self._compiled_union: dict[tuple, Any] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._warned = False

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_hint(hint)

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, guided_hint: torch.Tensor | None = None, *,
                conditions: Any = None) -> ControlNetOutput:
        if self.mode is Acceleration.NONE or not self._usable(x):
            if conditions is not None:
                return self.inner(x, hint, timesteps, context, y, guided_hint, conditions=conditions)
            return self.inner(x, hint, timesteps, context, y, guided_hint)
        if conditions is not None:
            return self._union(x, timesteps, context, y, [as_condition(c) for c in conditions])
        if guided_hint is None:
            guided_hint = self.inner.encode_hint(hint)
        inputs = {"x": x, "hint": None, "timesteps": timesteps, "context": context, "y": y, "guided_hint": guided_hint}
        if self.mode is Acceleration.COMPILE:
            if self._compiled is None:
                self._compiled = torch.compile(self.inner, dynamic=False)
            return self._compiled(**inputs)
        key = tuple((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in inputs.items())
        if key not in self._graphs:
            self._graphs[key] = _Graph(self.inner, inputs)
        return self._graphs[key](inputs)

    def _union(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
               conditions: list[UnionCondition]) -> ControlNetOutput:
        """A Union forward with several conditions: the encoded hints are graph / compiled inputs; the types and
        scales are part of the signature (a new combination compiles or captures anew)."""
        encoded = [c.encoded if c.encoded is not None else self.inner.encode_hint(c.hint) for c in conditions]
        spec = tuple((c.control_type, float(c.scale)) for c in conditions)
        inner = self.inner

        def run(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                **hints: torch.Tensor) -> ControlNetOutput:
            conds = [UnionCondition(t, None, s, hints[f"encoded_{i}"]) for i, (t, s) in enumerate(spec)]
            return inner(x, None, timesteps, context, y, conditions=conds)

        inputs = {"x": x, "timesteps": timesteps, "context": context, "y": y,
                  **{f"encoded_{i}": e for i, e in enumerate(encoded)}}
        if self.mode is Acceleration.COMPILE:
            if spec not in self._compiled_union:
                self._compiled_union[spec] = torch.compile(run, dynamic=False)
            return self._compiled_union[spec](**inputs)
        key = (spec, *((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in inputs.items()))
        if key not in self._graphs:
            self._graphs[key] = _Graph(run, inputs)
        return self._graphs[key](inputs)

    def _usable(self, x: torch.Tensor) -> bool:
        if x.is_cuda and not torch.is_grad_enabled():
            return True
        if not self._warned:
            reason = "gradients are on" if torch.is_grad_enabled() else f"the device is {x.device.type}, not CUDA"
            logger.warning("ControlNet acceleration %r falls back to the eager forward: %s", self.mode.value, reason)
            self._warned = True
        return False

    def release(self) -> None:
        """Drop captured graphs and compiled code (their memory) at the end of a run."""
        self._graphs.clear()
        self._compiled = None
        self._compiled_union.clear()


def accelerate(controlnet: ControlNet, mode: Acceleration | str) -> ControlNet | AcceleratedControlNet:
    """The ControlNet itself for 'none', else a wrapper that compiles or graphs its forward."""
    return controlnet if Acceleration(mode) is Acceleration.NONE else AcceleratedControlNet(controlnet, mode)
