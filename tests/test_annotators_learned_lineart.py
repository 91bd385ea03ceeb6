"""Lineart (informative drawings, coarse) and anime lineart (Anime2Sketch): the weight files' layout, the nets at
their native sizes with random weights, and the inversion to white lines on black (no real weights, no network)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroconv.annotators.learned import lineart
from zeroconv.annotators.learned.base import load_file, randomize
from zeroconv.annotators.registry import annotate

from .test_annotators_learned_helpers import assert_same_tensors, file_layout, manifest_size, parameter_bytes, write_pth

FILES = {
    "sk_model.pth": (lineart.SketchGenerator, 24, {
        "model0.1.weight": (64, 3, 7, 7), "model1.0.weight": (128, 64, 3, 3), "model1.3.weight": (256, 128, 3, 3),
        "model2.2.conv_block.5.weight": (256, 256, 3, 3), "model3.0.weight": (256, 128, 3, 3),
        "model3.3.weight": (128, 64, 3, 3), "model4.1.weight": (1, 64, 7, 7)}),
    "sk_model2.pth": (lineart.SketchGenerator, 24, {"model2.0.conv_block.1.bias": (256,)}),
    "netG.pth": (lineart.AnimeSketchUnet, 32, {
        "model.model.0.weight": (64, 3, 4, 4), "model.model.0.bias": (64,), "model.model.3.weight": (128, 1, 4, 4),
        "model.model.1.model.1.weight": (128, 64, 4, 4), "model.model.1.model.5.weight": (256, 64, 4, 4),
        "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.1.weight": (512, 512, 4, 4),
        "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.3.weight": (512, 512, 4, 4)}),
}


@pytest.mark.parametrize("filename", list(FILES))
def test_key_layout_and_size_match_the_real_file(filename: str, tmp_path) -> None:
    factory, count, samples = FILES[filename]
    layout = file_layout(factory)
    assert len(layout) == count, "InstanceNorm without affine parameters stores nothing"
    for key, shape in samples.items():
        assert tuple(layout[key].shape) == shape, key
    overhead = manifest_size(filename) - parameter_bytes(factory)
    assert 0 < overhead < 600 * count
    net = load_file(factory, write_pth(tmp_path / filename, layout))
    assert_same_tensors(net, layout)


def test_anime_file_saved_from_data_parallel_loads(tmp_path) -> None:
    layout = file_layout(lineart.AnimeSketchUnet, seed=3)
    net = load_file(lineart.AnimeSketchUnet, write_pth(tmp_path / "netG.pth", layout, prefix="module."))
    assert_same_tensors(net, layout)


def _constant(net: torch.nn.Module, last: torch.nn.Module, bias: float) -> torch.nn.Module:
    """Zero every weight and set the output layer's bias: the net then draws a uniform page."""
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        last.bias.fill_(bias)
    return net.eval()


@pytest.mark.parametrize("bias", [-3.0, 0.0, 4.0])
def test_lineart_is_inverted_paper(bias: float) -> None:
    net = lineart.SketchGenerator()
    _constant(net, net.model4[1], bias)
    out = lineart.lineart_batch(np.full((2, 60, 90, 3), 200, np.uint8), device="cpu", model=net)
    assert out.shape == (2, 60, 90, 3), "sides that are not multiples of 4 come back whole"
    expected = 255 * (1 - 1 / (1 + np.exp(-bias)))  # white paper (sigmoid near 1) becomes a black map
    assert np.all(np.abs(out.astype(float) - expected) <= 1)


def test_lineart_at_native_size_with_random_weights() -> None:
    net = randomize(lineart.SketchGenerator(), seed=0, std=0.05).eval()
    image = (np.random.default_rng(0).random((1, 128, 128, 3)) * 255).astype(np.uint8)
    out = annotate("lineart", image, detect_resolution=128, model_cache=lambda s, d: net)
    assert out.shape == (1, 128, 128, 3) and out.dtype == np.uint8 and out.std() > 1
    coarse = annotate("lineart_coarse", image, detect_resolution=128, model_cache=lambda s, d: net)
    assert np.array_equal(out, coarse), "same net, same map: only the weights differ"


def test_anime_lineart_resizes_to_multiples_of_256_and_back() -> None:
    net = lineart.AnimeSketchUnet()
    _constant(net, net.model.model[3], 1.0)
    out = lineart.lineart_anime_batch(np.zeros((1, 200, 300, 3), np.uint8), device="cpu", model=net)
    assert out.shape == (1, 200, 300, 3)
    expected = 255 * (1 - (np.tanh(1.0) * 0.5 + 0.5))
    assert np.all(np.abs(out.astype(float) - expected) <= 1)


def test_anime_lineart_input_stays_in_the_uint8_range() -> None:
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            seen.append(x)
            return x[:, :1] * 0

    board = np.kron(np.indices((10, 15)).sum(0) % 2, np.ones((20, 20)))[..., None].repeat(3, 2)
    lineart.lineart_anime_batch((board * 255).astype(np.uint8)[None], device="cpu", model=Probe())
    x = seen[0]
    assert x.shape[-2:] == (256, 512) and x.min() == -1.0 and x.max() == 1.0, "cubic overshoot clipped like uint8"
    levels = (x + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-3), "rounded to whole levels, as a uint8 resize is"


def test_anime_lineart_at_native_size_with_random_weights() -> None:
    net = randomize(lineart.AnimeSketchUnet(), seed=1, std=0.02).eval()
    image = (np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8)
    out = annotate("lineart_anime", image, detect_resolution=256, model_cache=lambda s, d: net)
    assert out.shape == (256, 256, 3) and out.std() > 0.5


@pytest.mark.slow
def test_lineart_at_512_with_random_weights() -> None:
    net = randomize(lineart.SketchGenerator(), seed=2).eval()
    out = lineart.lineart_batch(np.zeros((1, 512, 512, 3), np.uint8), device="cpu", model=net)
    assert out.shape == (1, 512, 512, 3)
