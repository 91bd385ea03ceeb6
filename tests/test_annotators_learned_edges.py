"""HED soft edges (and the HED scribble): the weight file's layout and precision, the side-output fusion and the
'safe' quantisation, measured with random or hand-set weights (no real weights, no network)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroconv.annotators.learned import hed
from zeroconv.annotators.learned.base import load_file, randomize
from zeroconv.annotators.registry import annotate

from .test_annotators_learned_helpers import assert_same_tensors, file_layout, manifest_size, parameter_bytes, write_pth


def test_hed_file_layout_is_fp16_with_named_blocks(tmp_path) -> None:
    layout = file_layout(hed.ControlNetHED, dtype=torch.float16)
    assert len(layout) == 37 and tuple(layout["norm"].shape) == (1, 3, 1, 1)
    assert tuple(layout["block1.convs.0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(layout["block3.convs.2.weight"].shape) == (256, 256, 3, 3)
    assert tuple(layout["block5.projection.weight"].shape) == (1, 512, 1, 1)
    # ControlNetHED.pth is saved in half precision: 2 bytes a value plus a little pickle per tensor
    overhead = manifest_size(hed.WEIGHTS) - parameter_bytes(hed.ControlNetHED, bytes_per_value=2)
    assert 0 < overhead < 600 * len(layout)
    net = load_file(hed.ControlNetHED, write_pth(tmp_path / hed.WEIGHTS, layout))
    assert next(net.parameters()).dtype == torch.float32, "fp16 weights run in fp32 on the CPU"
    assert_same_tensors(net, layout)


def _constant_hed(biases: list[float]) -> hed.ControlNetHED:
    """A HED whose side outputs are constants: zero weights, projection biases as given."""
    net = hed.ControlNetHED()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for b, bias in enumerate(biases, start=1):
            getattr(net, f"block{b}").projection.bias.fill_(bias)
    return net.eval()


def test_output_is_the_sigmoid_of_the_mean_side_output() -> None:
    net = _constant_hed([0.5, -1.0, 2.0, 0.0, 1.5])
    out = hed.hed_batch(np.zeros((2, 64, 96, 3), np.uint8), device="cpu", model=net)
    expected = round(255 / (1 + np.exp(-0.6)))  # mean of the biases is 0.6
    assert out.shape == (2, 64, 96, 3) and out.dtype == np.uint8
    assert np.all(np.abs(out.astype(int) - expected) <= 1)


def test_safe_mode_keeps_three_levels() -> None:
    x = torch.linspace(0, 1, 101)
    assert sorted(set(hed.safe_step(x).clamp(0, 1).tolist())) == [0.0, 0.5, 1.0]
    assert hed.safe_step(torch.tensor([0.3, 0.34, 0.66, 0.67])).tolist() == [0.0, 0.5, 0.5, 1.0]


def test_edges_follow_the_picture_through_the_learned_offset() -> None:
    # one 3x3 conv that answers red minus `norm`: a red square on black lights up its inside, not the background
    net = _constant_hed([0.0] * 5)
    with torch.no_grad():
        net.norm.copy_(torch.tensor([100.0, 0.0, 0.0]).view(1, 3, 1, 1))
        net.block1.convs[0].weight[0, 0, 1, 1] = 1.0
        net.block1.convs[1].weight[0, 0, 1, 1] = 1.0
        net.block1.projection.weight[0, 0] = 0.05
    image = np.zeros((1, 64, 64, 3), np.uint8)
    image[0, 16:48, 16:48, 0] = 255
    out = hed.hed_batch(image, device="cpu", model=net)[0, ..., 0].astype(int)
    assert out[32, 32] > 180 and out[4, 4] == 128, "inside: sigmoid(0.05 x 155 / 5); outside: relu cuts -100 to 0"


def test_hed_annotators_run_through_the_registry_at_native_size() -> None:
    torch.manual_seed(0)
    net = randomize(hed.ControlNetHED(), seed=1, std=0.05).eval()
    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    soft = annotate("hed", image, detect_resolution=96, model_cache=lambda s, d: net)
    assert soft.shape == (96, 128, 3) and (soft[..., 0] == soft[..., 2]).all()
    assert len(np.unique(soft)) > 10, "soft edges are grey levels"
    safe = annotate("hed", image, detect_resolution=96, model_cache=lambda s, d: net, safe=True)
    assert set(np.unique(safe)) <= {0, 128, 255}  # detect size = picture size, so nothing is blended
    scribble = annotate("scribble_hed", image, detect_resolution=96, model_cache=lambda s, d: net)
    assert set(np.unique(scribble)) <= {0, 255}


def _bar_hed() -> hed.ControlNetHED:
    net = _constant_hed([-5.0] * 5)  # dark background, as a trained HED gives
    with torch.no_grad():
        net.block1.convs[0].weight[0, 0, 1, 1] = 1.0
        net.block1.convs[1].weight[0, 0, 1, 1] = 1.0
        net.block1.projection.weight[0, 0] = 0.2
    return net


def test_scribble_from_hed_is_thin_white_strokes() -> None:
    net = _bar_hed()
    image = np.zeros((1, 128, 128, 3), np.uint8)
    image[0, :, 58:68, 0] = 255  # a bright vertical bar -> a soft ridge
    out = hed.scribble_strokes(hed.hed_batch(image, device="cpu", model=net)[0])[..., 0]
    assert set(np.unique(out)) == {0, 255}
    columns = np.nonzero(out[64])[0]
    assert abs(columns.mean() - 62.5) <= 1 and len(columns) < 26, "one stroke (ridge widened by sigma 3) on the bar"
    assert not out[:, :40].any() and not out[:, 90:].any()


def test_scribble_stroke_width_does_not_depend_on_the_detect_resolution() -> None:
    net = _bar_hed()
    image = np.zeros((128, 192, 3), np.uint8)
    image[:, 88:98, 0] = 255
    widths = {}
    for detect in (64, 128, 256):
        out = annotate("scribble_hed", image, detect_resolution=detect, model_cache=lambda s, d: net)[..., 0]
        assert out.shape == (128, 192) and set(np.unique(out)) == {0, 255}
        columns = np.nonzero(out[64])[0]
        assert abs(columns.mean() - 92.5) <= 1.5, detect
        widths[detect] = len(columns)
    assert max(widths.values()) - min(widths.values()) <= 2, widths  # thinned/thickened at output size


@pytest.mark.slow
def test_hed_at_512_with_random_weights() -> None:
    net = randomize(hed.ControlNetHED(), seed=2).eval()
    out = hed.hed_batch(np.zeros((1, 512, 512, 3), np.uint8), device="cpu", model=net)
    assert out.shape == (1, 512, 512, 3)
