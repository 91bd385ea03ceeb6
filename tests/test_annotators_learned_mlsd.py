"""M-LSD straight lines: the weight file's layout (strict load of random weights in it), the segment decoder on
hand-set output maps, thresholds, sizes that are not multiples of 16, and a run at the native 512 x 512."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from zeroconv.annotators.learned import mlsd
from zeroconv.annotators.learned.base import load_file, randomize
from zeroconv.annotators.registry import annotate, get

from .test_annotators_learned_helpers import assert_same_tensors, file_layout, manifest_size, parameter_bytes, write_pth


def test_mlsd_file_layout_loads_strictly(tmp_path) -> None:
    layout = file_layout(mlsd.MLSDLarge)
    assert tuple(layout["backbone.features.0.0.weight"].shape) == (32, 4, 3, 3), "RGB plus the constant channel"
    assert tuple(layout["backbone.features.1.conv.0.0.weight"].shape) == (32, 1, 3, 3), "t = 1: depthwise first"
    assert tuple(layout["backbone.features.2.conv.0.0.weight"].shape) == (96, 16, 1, 1), "t = 6: expand first"
    assert tuple(layout["backbone.features.13.conv.3.running_var"].shape) == (96,)
    assert "backbone.features.14.conv.0.0.weight" not in layout, "the backbone stops after the 96-channel stage"
    assert tuple(layout["block15.conv1.0.weight"].shape) == (64, 96, 1, 1)
    assert tuple(layout["block21.conv2.0.weight"].shape) == (64, 16, 1, 1)
    assert tuple(layout["block23.conv3.weight"].shape) == (16, 64, 1, 1)
    # mlsd_large_512_fp32.pth is fp32: 4 bytes a value (8 for the BatchNorm counters) plus a little pickle per tensor
    overhead = manifest_size(mlsd.WEIGHTS) - parameter_bytes(mlsd.MLSDLarge)
    assert 0 < overhead < 600 * len(layout)
    net = load_file(mlsd.MLSDLarge, write_pth(tmp_path / mlsd.WEIGHTS, layout))
    assert_same_tensors(net, layout)
    with pytest.raises(KeyError, match="missing"):
        load_file(mlsd.MLSDLarge, write_pth(tmp_path / "cut.pth", {k: v for k, v in layout.items()
                                                                   if not k.startswith("block23")}))


class FixedMaps(nn.Module):
    """Stands in for the net: returns the same (1, 9, h, w) maps whatever the input (records the input it got)."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = nn.Parameter(maps, requires_grad=False)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.maps.expand(x.shape[0], -1, -1, -1)


def _one_segment_maps(h: int = 64, w: int = 64, centre=(20, 30), offsets=(-10.0, 0.0, 10.0, 0.0),
                      logit: float = 5.0) -> torch.Tensor:
    maps = torch.zeros(1, 9, h, w)
    maps[:, 0] = -10.0
    y, x = centre
    maps[0, 0, y, x] = logit
    maps[0, 1:5, y, x] = torch.tensor(offsets)
    return maps


def test_a_peak_with_its_displacements_becomes_one_segment_at_twice_the_map_scale() -> None:
    net = FixedMaps(_one_segment_maps())
    out = mlsd.mlsd_batch(np.zeros((2, 128, 128, 3), np.uint8), device="cpu", model=net)[..., 0]
    assert out.shape == (2, 128, 128) and set(np.unique(out)) == {0, 255}
    # centre (x 30, y 20), ends 10 map px left and right -> (20, 20)-(40, 20) in the map -> (40, 40)-(80, 40)
    rows, cols = np.nonzero(out[0])
    assert set(rows) == {40} and cols.min() == 40 and cols.max() == 80
    assert (out[0] == out[1]).all()
    seen = net.seen
    assert seen is not None and seen.shape == (2, 4, 128, 128)
    assert torch.allclose(seen[:, 3], torch.full_like(seen[:, 3], 1 / 127.5 - 1)), "constant 4th channel"
    assert torch.allclose(seen[:, :3], torch.full_like(seen[:, :3], -1.0)), "black RGB scaled to -1"


def test_thresholds_drop_weak_and_short_segments() -> None:
    image = np.zeros((1, 128, 128, 3), np.uint8)
    weak = FixedMaps(_one_segment_maps(logit=-3.0))  # sigmoid(-3) = 0.047 < 0.1
    assert not mlsd.mlsd_batch(image, device="cpu", model=weak).any()
    assert mlsd.mlsd_batch(image, device="cpu", model=weak, value_threshold=0.04).any()
    net = FixedMaps(_one_segment_maps())  # 20 map px long
    assert not mlsd.mlsd_batch(image, device="cpu", model=net, distance_threshold=20.5).any()
    assert mlsd.mlsd_batch(image, device="cpu", model=net, distance_threshold=19.5).any()


def test_only_local_maxima_of_the_heatmap_are_centres() -> None:
    maps = _one_segment_maps()
    maps[0, 0, 20, 31] = 4.0  # a weaker neighbour of the peak: not a 3x3 maximum, so no second segment
    maps[0, 1:5, 20, 31] = torch.tensor([0.0, -10.0, 0.0, 10.0])  # it would draw a vertical line
    segments = mlsd.decode_segments(maps, 0.1, 0.1)
    assert len(segments) == 1 and segments[0].shape == (1, 4)
    assert np.allclose(segments[0][0], [20, 20, 40, 20])


def test_sides_that_are_not_multiples_of_16_are_resized_and_segments_scaled_back() -> None:
    net = FixedMaps(_one_segment_maps(h=104, w=152))  # a 200 x 300 picture runs at 208 x 304
    out = mlsd.mlsd_batch(np.zeros((1, 200, 300, 3), np.uint8), device="cpu", model=net)[0, ..., 0]
    assert net.seen is not None and tuple(net.seen.shape[-2:]) == (208, 304)
    rows, cols = np.nonzero(out)
    assert set(rows) == {int(40 * 200 / 208)}
    assert cols.min() == int(40 * 300 / 304) and cols.max() == int(80 * 300 / 304)


def test_mlsd_runs_at_its_native_512_through_the_registry() -> None:
    spec = get("mlsd")
    assert spec.node_id == "ZeroConvMLSD" and spec.weights == (mlsd.WEIGHTS,) and "mlsd" in spec.control_types
    net = randomize(mlsd.MLSDLarge(), seed=3, std=0.2).eval()
    with torch.no_grad():
        net.block23.conv3.bias[7] = 3.0  # centre logits high: random weights then draw some segments
        net.block23.conv3.bias[8:12] = torch.tensor([-20.0, -5.0, 20.0, 5.0])
    image = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    first = annotate("mlsd", image, detect_resolution=512, model_cache=lambda s, d: net)
    again = annotate("mlsd", image, detect_resolution=512, model_cache=lambda s, d: net)
    assert first.shape == (512, 512, 3) and set(np.unique(first)) == {0, 255}
    assert (first == again).all(), "deterministic"


def test_fetch_weights_obeys_the_offline_environment(tmp_path, monkeypatch, caplog) -> None:
    import logging

    import huggingface_hub

    from zeroconv.cli import main

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted while offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setenv("ZEROCONV_OFFLINE", "1")
    with caplog.at_level(logging.INFO):
        assert main(["fetch-weights", "mlsd", "--dir", str(tmp_path)]) == 1
    assert "downloads are off" in caplog.text and mlsd.WEIGHTS in caplog.text
    (tmp_path / mlsd.WEIGHTS).write_bytes(b"not the weights")  # present but wrong: its sha256 is checked
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["fetch-weights", "mlsd", "--dir", str(tmp_path)]) == 1
    assert "1 of 1 weight files are missing or failed verification" in caplog.text
