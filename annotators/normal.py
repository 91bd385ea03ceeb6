"""Normal map from a depth map, ControlNet v1.0's "normal from MiDaS" (lllyasviel/ControlNet gradio_normal2image.py).

Orientation of the map as fed to the normal ControlNet (v1.0 reverses the (x, y, z) channels to (z, y, x)):
R = z, towards the viewer (flat, facing surfaces are R 255); G = y, up (a surface facing up is bright in G);
B = x = Sobel_x of near-bright depth, which is positive where the surface faces left (B bright on the left
side of a ball, dark on its right). 127.5 means 0 in G and B.
"""
from __future__ import annotations

import math

import numpy as np

from .common import hwc3

NORMAL_Z = 2 * math.pi  # constant z before normalising (v1.0, "a")


def normal_from_depth(depth: np.ndarray, background_threshold: float = 0.4) -> np.ndarray:
    """Normal map (HWC uint8, channels z, y, x) from depth with near = bright (v1.0 MiDaS normal, Sobel ksize 3)."""
    return normal_from_values(hwc3(depth).astype(np.float32).mean(axis=2), background_threshold)


def normal_from_values(d: np.ndarray, background_threshold: float = 0.4) -> np.ndarray:
    """Normal map (HWC uint8, channels z, y, x) from (H, W) near-is-larger values in any unit (0..255 grey, or a
    depth net's raw inverse depth as v1.0 used): Sobel x and y, z = NORMAL_Z; flat where the value lies in the
    lowest `background_threshold` share of its range."""
    import cv2

    if not 0.0 <= background_threshold <= 1.0:
        raise ValueError(f"background_threshold is a share of the depth range, 0..1; got {background_threshold}")
    d = np.ascontiguousarray(d, dtype=np.float32)
    x = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    span = float(d.max() - d.min())
    background = (d - d.min()) / span < background_threshold if span > 0 else np.ones_like(d, bool)
    x[background] = 0
    y[background] = 0
    normal = np.stack([np.full_like(d, NORMAL_Z), y, x], axis=2)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
