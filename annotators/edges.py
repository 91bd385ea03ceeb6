"""Edge and line maps without weights (lllyasviel/ControlNet annotator/canny, mlsd): HWC uint8 RGB in, white-on-
black HWC uint8 out."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import hwc3

if TYPE_CHECKING:
    import torch

# kornia's canny works on one channel in 0..1 with a Sobel normalised by 8 and an L2 magnitude; OpenCV's on 0..255
# with a raw Sobel, an L1 magnitude and the strongest channel. We run kornia per channel and take the union, and
# divide OpenCV thresholds by 255 * 8 (the scales) * 0.6 (L2 < L1, plus kornia's blur); the factor and the blur were
# chosen by measuring F1 within 1 px against OpenCV (tests/test_annotators_edges.py).
KORNIA_THRESHOLD_SCALE = 255.0 * 8.0 * 0.6
KORNIA_SIGMA = 0.5  # kornia always blurs first; a narrow 3x3 Gaussian stays close to OpenCV's no blur


def _check_thresholds(low: float, high: float) -> None:
    if not 0 <= low <= high <= 255 * 8:
        raise ValueError(f"Canny needs 0 <= low_threshold <= high_threshold, got {low}, {high}; try 100 and 200")


def canny(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """OpenCV Canny on the RGB picture (3x3 Sobel, L1 gradient, hysteresis on 0..255), ControlNet's canny annotator."""
    import cv2

    _check_thresholds(low_threshold, high_threshold)
    return hwc3(cv2.Canny(hwc3(image), low_threshold, high_threshold, apertureSize=3, L2gradient=False))


def canny_torch(images: np.ndarray, low_threshold: int = 100, high_threshold: int = 200, *,
                device: "str | torch.device" = "cpu") -> np.ndarray:
    """Canny on an (N, H, W, 3) uint8 batch with kornia on a torch device (the GPU path); OpenCV-scale thresholds."""
    import kornia
    import torch

    _check_thresholds(low_threshold, high_threshold)
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    n, c, h, w = batch.shape
    _, edges = kornia.filters.canny(batch.reshape(n * c, 1, h, w), low_threshold / KORNIA_THRESHOLD_SCALE,
                                    high_threshold / KORNIA_THRESHOLD_SCALE, kernel_size=(3, 3),
                                    sigma=(KORNIA_SIGMA, KORNIA_SIGMA))
    edge = edges.reshape(n, c, h, w).amax(dim=1, keepdim=True) > 0  # (N, 1, H, W): any channel, like OpenCV
    out = edge.to(torch.uint8).mul_(255).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    return out.contiguous().cpu().numpy()


def xdog(image: np.ndarray, threshold: int = 32) -> np.ndarray:
    """Lines where the picture is darker than its surround in every channel: Gaussians sigma 5.0 minus 0.5 (v1.1 XDoG)."""
    import cv2

    rgb = hwc3(image).astype(np.float32)
    darkness = (cv2.GaussianBlur(rgb, (0, 0), 5.0) - cv2.GaussianBlur(rgb, (0, 0), 0.5)).min(axis=2).clip(0, 255)
    return hwc3(((2 * darkness > threshold) * 255).astype(np.uint8))


def lineart_standard(image: np.ndarray, gaussian_sigma: float = 6.0, intensity_threshold: int = 8) -> np.ndarray:
    """Soft lines: how much darker than its sigma-6 blur each pixel is, scaled by the median strong value (aux)."""
    import cv2

    rgb = hwc3(image).astype(np.float32)
    intensity = (cv2.GaussianBlur(rgb, (0, 0), gaussian_sigma) - rgb).min(axis=2).clip(0, 255)
    strong = intensity[intensity > intensity_threshold]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return hwc3((intensity / scale * 127).clip(0, 255).astype(np.uint8))


def straight_lines(image: np.ndarray, threshold: int = 50, min_length: int = 20, max_gap: int = 4) -> np.ndarray:
    """1-px white straight segments on black, by the probabilistic Hough transform on Canny edges (offline M-LSD map)."""
    import cv2

    rgb = hwc3(image)
    edges = cv2.Canny(rgb, 50, 150)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold, minLineLength=min_length, maxLineGap=max_gap)
    out = np.zeros(rgb.shape[:2], np.uint8)
    for x1, y1, x2, y2 in ([] if lines is None else lines.reshape(-1, 4)):
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), 255, 1)
    return hwc3(out)


def binary(image: np.ndarray, threshold: int = 0) -> np.ndarray:
    """Dark strokes become white on black: Otsu's threshold (threshold 0) or a fixed one, inverted (aux binary)."""
    import cv2

    grey = cv2.cvtColor(hwc3(image), cv2.COLOR_RGB2GRAY)
    flags = cv2.THRESH_BINARY_INV | (cv2.THRESH_OTSU if threshold == 0 else 0)
    return hwc3(cv2.threshold(grey, threshold, 255, flags)[1])
