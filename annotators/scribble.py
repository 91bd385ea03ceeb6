"""Scribbles: synthesised from a picture the way the paper trains its scribble model, and a user's own cleaned up.

Synthesis (Zhang et al. 2023, appendix: edges with random thresholds, random masking, random morphological
transforms, random non-maximum suppression; lllyasviel/ControlNet gradio_fake_scribble2image.py: NMS at 127 after a
sigma-3
blur with 4 directional dilations, then a sigma-3 blur thresholded at 4). Offline the soft edges come from Canny or
the gradient magnitude, randomised; a learned soft edge map (HED) can be passed to `scribble_from_soft_edges`.
"""
from __future__ import annotations

import numpy as np

from .common import hwc3
from .edges import canny

NMS_THRESHOLD = 127
NMS_SIGMA = 3.0
STROKE_SIGMA, STROKE_THRESHOLD = 3.0, 4
# 3x3 line kernels for the four directions NMS compares along: horizontal, vertical, both diagonals.
NMS_KERNELS = (
    ((0, 0, 0), (1, 1, 1), (0, 0, 0)),
    ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
    ((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
)
# Ranges the random augmentations draw from (per call, from the seeded generator).
CANNY_LOW_RANGE = (50, 150)  # high threshold is drawn in (low, 3 * low]
GRADIENT_SIGMA_RANGE = (1.0, 3.0)  # blur before the gradient magnitude, px
EDGE_WIDTH_CHOICES = (5, 7, 9)  # px an edge is widened to, so it looks like HED's soft boundary
NMS_THRESHOLD_RANGE = (90, 150)  # around the reference 127
MORPH_SIZES = (1, 3, 5)
MASK_CELLS_RANGE = (3, 9)
MASK_DROP_RANGE = (0.0, 0.35)


def nms(soft: np.ndarray, threshold: int = NMS_THRESHOLD, sigma: float = NMS_SIGMA) -> np.ndarray:
    """Thin a soft edge map (HxW 0..255) to its ridges: blur, keep pixels that are maxima along some direction."""
    import cv2

    x = cv2.GaussianBlur(soft.astype(np.float32), (0, 0), sigma)
    ridge = np.zeros_like(x)
    for kernel in NMS_KERNELS:
        is_max = cv2.dilate(x, np.array(kernel, np.uint8)) == x
        ridge[is_max] = x[is_max]
    return ((ridge > threshold) * 255).astype(np.uint8)


def strokes(thin: np.ndarray) -> np.ndarray:
    """Ridges to scribble strokes: Gaussian sigma 3, everything above 4 becomes white (v1.1 fake scribble)."""
    import cv2

    return ((cv2.GaussianBlur(thin.astype(np.float32), (0, 0), STROKE_SIGMA) > STROKE_THRESHOLD) * 255).astype(np.uint8)


def _random_soft_edges(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HxW float soft edge map standing in for HED: widened random-threshold Canny, or the gradient magnitude of a
    randomly blurred picture (the paper's random thresholds); scaled so its sigma-3 blur peaks at 255."""
    import cv2

    if rng.random() < 0.5:
        low = int(rng.integers(*CANNY_LOW_RANGE, endpoint=True))
        edges = canny(image, low, int(rng.integers(low + 1, 3 * low, endpoint=True)))[..., 0]
        width = int(rng.choice(EDGE_WIDTH_CHOICES))
        soft = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))).astype(np.float32)
    else:
        blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), float(rng.uniform(*GRADIENT_SIGMA_RANGE)))
        gx, gy = cv2.Sobel(blurred, cv2.CV_32F, 1, 0), cv2.Sobel(blurred, cv2.CV_32F, 0, 1)
        soft = np.hypot(gx, gy).max(axis=2)
    peak = float(cv2.GaussianBlur(soft, (0, 0), NMS_SIGMA).max())
    return soft * (255.0 / peak) if peak > 0 else soft


def _random_morphology(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dilate, erode, open or close with a random square kernel."""
    import cv2

    size = int(rng.choice(MORPH_SIZES))
    if size == 1:
        return mask
    kernel = np.ones((size, size), np.uint8)
    op = (cv2.MORPH_DILATE, cv2.MORPH_ERODE, cv2.MORPH_OPEN, cv2.MORPH_CLOSE)[int(rng.integers(4))]
    return cv2.morphologyEx(mask, op, kernel)


def _random_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Drop a random share of the strokes in a random grid of cells (random masking)."""
    import cv2

    cells = int(rng.integers(*MASK_CELLS_RANGE, endpoint=True))
    keep = rng.random((cells, cells)) >= rng.uniform(*MASK_DROP_RANGE)
    height, width = mask.shape
    return mask * cv2.resize(keep.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)


def scribble_from_soft_edges(soft: np.ndarray, seed: int, nms_threshold: int | None = None) -> np.ndarray:
    """Scribble (HWC uint8, white on black) from a soft edge map HxW 0..255 (HED), with the random augmentations."""
    rng = np.random.default_rng(seed)
    threshold = int(rng.integers(*NMS_THRESHOLD_RANGE, endpoint=True)) if nms_threshold is None else nms_threshold
    scribble = strokes(nms(soft, threshold))
    return hwc3(_random_mask(_random_morphology(scribble, rng), rng))


def synthesize_scribble(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Human-like scribble from a picture, reproducible for a seed (paper appendix; offline edges instead of HED)."""
    rng = np.random.default_rng(seed)
    soft = _random_soft_edges(hwc3(image), rng)
    return scribble_from_soft_edges(soft, int(rng.integers(2**31)))


def clean_user_scribble(image: np.ndarray, threshold: int = 127, min_area: int = 16) -> np.ndarray:
    """A user's drawing to the white-on-black scribble the models expect (v1.0: stroke where min(R,G,B) < 127).

    Dark strokes on light paper are inverted; a drawing that is already light on dark is kept as it is. Gaps of a
    pixel are closed and specks under `min_area` pixels (scanner dust) removed.
    """
    import cv2

    rgb = hwc3(image)
    on_paper = np.median(rgb.mean(axis=2)) >= 128
    stroke = rgb.min(axis=2) < threshold if on_paper else rgb.max(axis=2) > 255 - threshold
    mask = cv2.morphologyEx(stroke.astype(np.uint8) * 255, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
    mask[np.isin(labels, small[small > 0])] = 0
    return hwc3(mask)
