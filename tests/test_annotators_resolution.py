"""Line maps at any detect/output scale ratio: thin lines survive and stay thin (issue: Canny and the binary maps
lost their edges past about 2.7x, because the shrink averaged 1-px lines away).

Recall is the share of the white pixels of the map made at the picture's own size that have a white pixel within
`TOLERANCE` px in the map made at another detect resolution and resized back. 2 px: at 0.25x one detect pixel
spans 4 output pixels, so an edge found there is placed to within half of that; at 0.5x and above 1 px is asked.
"""
from __future__ import annotations

import numpy as np
import pytest

from zeroconv.annotators.common import resize_binary
from zeroconv.annotators.registry import annotate

RATIOS = (0.25, 0.5, 1, 2, 4, 8)  # detect resolution / picture size
SIZES = ((96, 160), (128, 128))  # a non-square and a square picture
TOLERANCE = 2


def shapes(height: int, width: int) -> np.ndarray:
    """A light picture with a filled rectangle, disc and triangle of different colours."""
    import cv2

    img = np.full((height, width, 3), 235, np.uint8)
    cv2.rectangle(img, (width // 10, height // 8), (width // 3, height // 2), (30, 60, 200), -1)
    cv2.circle(img, (width * 2 // 3, height // 3), min(height, width) // 5, (200, 40, 40), -1)
    triangle = np.array([[width // 5, height * 7 // 8], [width // 2, height * 5 // 8], [width * 3 // 5, height - 6]])
    cv2.fillPoly(img, [triangle.astype(np.int32)], (20, 20, 20))
    return img


def recall(reference: np.ndarray, other: np.ndarray, tolerance: int) -> float:
    import cv2

    ref = reference[..., 0] > 127
    near = cv2.dilate((other[..., 0] > 127).astype(np.uint8), np.ones((2 * tolerance + 1,) * 2, np.uint8)) > 0
    return float((ref & near).sum() / max(1, ref.sum()))


@pytest.mark.parametrize("name", ["canny", "binary", "scribble_clean"])
@pytest.mark.parametrize("size", SIZES)
def test_line_maps_keep_their_lines_at_every_detect_resolution(name: str, size: tuple[int, int]) -> None:
    image = shapes(*size)
    reference = annotate(name, image, detect_resolution=None)
    assert (reference > 0).any()
    for ratio in RATIOS:
        out = annotate(name, image, detect_resolution=round(ratio * min(size)))
        assert out.shape == reference.shape and set(np.unique(out)) <= {0, 255}, ratio
        assert recall(reference, out, TOLERANCE) >= 0.95, (ratio, recall(reference, out, TOLERANCE))
        if ratio >= 0.5:
            assert recall(reference, out, 1) >= 0.95, (ratio, recall(reference, out, 1))
        assert (out > 0).sum() <= 1.5 * (reference > 0).sum(), f"lines got fatter at {ratio}x"


def drawing(height: int, width: int, scale: float) -> np.ndarray:
    """1-px lines at several angles and a circle, drawn at (height, width) with the geometry scaled by `scale`."""
    import cv2

    def at(*values: float) -> tuple[int, ...]:  # pixel centres, in 1/16 px (cv2's shift=4)
        return tuple(round(((v + 0.5) * scale - 0.5) * 16) for v in values)

    out = np.zeros((height, width), np.uint8)
    for (x1, y1), (x2, y2) in (((4, 5), (150, 9)), ((10, 90), (60, 12)), ((80, 20), (155, 88)), ((40, 50), (41, 94))):
        cv2.line(out, at(x1, y1), at(x2, y2), 255, 1, shift=4)
    cv2.circle(out, at(110, 55), round(25 * scale * 16), 255, 1, shift=4)
    return out[..., None].repeat(3, axis=2)


@pytest.mark.parametrize("ratio", RATIOS)
def test_thin_lines_survive_resampling_and_edges_stay_thin(ratio: float) -> None:
    height, width = 96, 160
    reference = drawing(height, width, 1.0)
    detect = drawing(round(height * ratio), round(width * ratio), ratio)
    for mode in ("binary", "edges"):
        out = resize_binary(detect, height, width, thin=mode == "edges")
        assert out.shape == reference.shape and set(np.unique(out)) <= {0, 255}
        assert recall(reference, out, TOLERANCE) >= 0.95, (mode, recall(reference, out, TOLERANCE))
    white = (out > 0).sum() / (reference > 0).sum()
    assert white <= 2.0, f"1-px edges came out {white:.1f}x as many pixels at {ratio}x"  # "edges" keeps 1-2 px
