"""Annotators refuse bad sizes with one error naming the input, before allocating anything (a linked INT reaches the
node without the widget's range check)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroconv.annotators import common
from zeroconv.annotators.registry import annotate
from zeroconv.nodes.annotators import NODE_CLASS_MAPPINGS

PICTURE = np.zeros((64, 96, 3), np.uint8)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 64, 3), (64, 0, 3), (0, 64, 64, 3), (2, 0, 64, 3)])
def test_an_empty_image_is_named(shape) -> None:
    with pytest.raises(ValueError, match=r"image is empty"):
        annotate("canny", np.zeros(shape, np.uint8))


def test_the_node_refuses_an_empty_image_by_its_input_name() -> None:
    node = NODE_CLASS_MAPPINGS["ZeroConvCannyEdge"]()
    with pytest.raises(ValueError, match=r"^image is empty"):
        node.run(torch.zeros(1, 0, 0, 3), 512, low_threshold=100, high_threshold=200)


@pytest.mark.parametrize("value", [100_000, -5, 2.5, True])
def test_detect_resolution_out_of_range_is_refused(value) -> None:
    with pytest.raises(ValueError, match=r"detect_resolution"):
        annotate("canny", PICTURE, detect_resolution=value)


def test_the_node_declares_the_library_maximum() -> None:
    spec = NODE_CLASS_MAPPINGS["ZeroConvCannyEdge"].INPUT_TYPES()["required"]["detect_resolution"][1]
    assert spec["max"] == common.DETECT_RESOLUTION_MAX
    node = NODE_CLASS_MAPPINGS["ZeroConvCannyEdge"]()
    with pytest.raises(ValueError, match=r"detect_resolution must be 1\.\.4096"):
        node.run(torch.zeros(1, 64, 64, 3), 100_000, low_threshold=100, high_threshold=200)


def test_a_long_thin_picture_at_the_maximum_is_refused_by_canvas_size(monkeypatch) -> None:
    allocated = []
    monkeypatch.setattr(common, "resize", lambda *a, **k: allocated.append(a) or a[0])
    with pytest.raises(ValueError, match=r"detect_resolution 4096 on a 8x2000 picture makes a 4096x1024000 canvas"):
        annotate("canny", np.zeros((8, 2000, 3), np.uint8), detect_resolution=4096)
    with pytest.raises(ValueError, match=r"output size"):
        annotate("canny", PICTURE, detect_resolution=64, output_size=(100_000, 100_000))
    assert not allocated, "refused before any resize"


def test_a_batch_needing_more_memory_than_is_free_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(common, "available_memory", lambda: 64 * 2**20)
    with pytest.raises(ValueError, match=r"needs about .* GiB of memory .* but 0\.1 GiB is free"):
        annotate("canny", np.zeros((4, 64, 96, 3), np.uint8), detect_resolution=2048)
    assert annotate("canny", PICTURE, detect_resolution=64).shape == PICTURE.shape
