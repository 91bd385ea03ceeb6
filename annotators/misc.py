"""Conditions that are the picture itself, transformed (lllyasviel/ControlNet-v1-1-nightly annotator/shuffle, the
tile and inpaint models' preprocessing): shuffle, tile, colour grid, inpaint."""
from __future__ import annotations

import numpy as np

from .common import hwc3

SHUFFLE_CELL = 256  # F: one random flow value per F x F cell, cubic in between (v1.1 content shuffle)
INPAINT_MASKED_VALUE = -1.0  # what v1.1 inpaint expects at masked pixels (xinsir union models use 0.0)


def _noise_field(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise in 0..1: uniform on a coarse grid, cubic-upsampled, cropped, min-max (v1.1 make_noise_disk)."""
    import cv2

    coarse = rng.uniform(0.0, 1.0, (height // cell + 2, width // cell + 2)).astype(np.float32)
    fine = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    fine = fine[cell:cell + height, cell:cell + width]
    fine -= fine.min()
    return fine / max(float(fine.max()), 1e-6)


def shuffle(image: np.ndarray, seed: int = 0, cell: int = SHUFFLE_CELL) -> np.ndarray:
    """Content shuffle: remap the picture through a random smooth flow (v1.1 shuffle), reproducible for a seed."""
    import cv2

    rgb = hwc3(image)
    height, width = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    map_x = _noise_field(rng, height, width, cell) * (width - 1)
    map_y = _noise_field(rng, height, width, cell) * (height - 1)
    return cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR)


def tile(image: np.ndarray, levels: int = 3) -> np.ndarray:
    """Blur for the tile model: shrink by 2**levels, then pyrUp back (aux tile)."""
    import cv2

    if not 0 <= levels <= 8:
        raise ValueError(f"tile levels must be 0..8 (halvings), got {levels}")
    rgb = hwc3(image)
    height, width = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, width >> levels), max(1, height >> levels)), interpolation=cv2.INTER_AREA)
    for _ in range(levels):
        small = cv2.pyrUp(small)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def color_grid(image: np.ndarray, factor: int = 64) -> np.ndarray:
    """Colour palette grid: shrink by `factor` (cubic), grow back (nearest) (aux color / T2I-Adapter colour)."""
    import cv2

    rgb = hwc3(image)
    height, width = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def inpaint_hint(image: np.ndarray, mask: np.ndarray, masked_value: float = INPAINT_MASKED_VALUE) -> np.ndarray:
    """The inpaint ControlNet's hint, HWC float32: RGB in 0..1, masked pixels -1.0 (v1.1 inpaint).

    `mask` is HxW (bool, uint8 0..255 or float 0..1), bilinear-resized to the picture and thresholded at 0.5.
    """
    import cv2

    rgb = hwc3(image).astype(np.float32) / 255.0
    m = np.asarray(mask)
    m = m[..., 0] if m.ndim == 3 else m
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
    if m.shape != rgb.shape[:2]:
        m = cv2.resize(m, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    rgb[m > 0.5] = masked_value
    return rgb
