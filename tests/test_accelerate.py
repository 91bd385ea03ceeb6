"""Compiled / CUDA-graphed ControlNet forwards: the same residuals, and a logged fallback off CUDA."""
from __future__ import annotations

import logging

import pytest
import torch

from zeroconv.controlnet_model.accelerate import Acceleration, AcceleratedControlNet, accelerate


def _call(net, inputs):
    with torch.no_grad():
        guided = net.encode_hint(inputs["hint"])
        return net(inputs["x"], None, inputs["timesteps"], inputs["context"], guided_hint=guided)


@pytest.mark.parametrize("mode", ["compile", "cuda_graph"])
def test_falls_back_on_cpu_with_a_log_line(mode, tiny_controlnet, tiny_inputs, caplog) -> None:
    wrapped = accelerate(tiny_controlnet, mode)
    assert isinstance(wrapped, AcceleratedControlNet) and wrapped.config is tiny_controlnet.config
    with caplog.at_level(logging.WARNING):
        fast, eager = _call(wrapped, tiny_inputs), _call(tiny_controlnet, tiny_inputs)
    assert all(torch.equal(a, b) for a, b in zip(fast.all, eager.all))
    assert "falls back to the eager forward" in caplog.text and "cpu" in caplog.text
    assert accelerate(tiny_controlnet, "none") is tiny_controlnet


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_the_eager_result(tiny_controlnet, tiny_inputs) -> None:
    net = tiny_controlnet.cuda()
    inputs = {k: v.cuda() for k, v in tiny_inputs.items() if v is not None}
    graphed = accelerate(net, Acceleration.CUDA_GRAPH)
    eager = _call(net, inputs)
    for _ in range(3):
        replayed = _call(graphed, inputs)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(replayed.all, eager.all))
