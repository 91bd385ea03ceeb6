"""How well a generated image obeys its condition: run the control's annotator on the sample and compare.

The paper watches for 'sudden convergence' (Zhang et al. 2023 §4.3, Fig. 21) by eye; these numbers make it
visible in a curve: edge F1 with a pixel tolerance for edge-like controls (as in BSDS-style edge benchmarks),
IoU for binary masks, and Pearson correlation for depth maps.
"""
from __future__ import annotations

from enum import Enum

import numpy as np


class FidelityMetric(str, Enum):
    EDGE_F1 = "edge_f1"
    IOU = "iou"
    DEPTH_CORR = "depth_corr"
    NONE = "none"


# Metric for each annotator (and control type) whose output it fits; others get none.
METRIC_BY_CONTROL: dict[str, FidelityMetric] = {
    "canny": FidelityMetric.EDGE_F1,
    "scribble": FidelityMetric.EDGE_F1,
    "scribble_synthesis": FidelityMetric.EDGE_F1,
    "scribble_clean": FidelityMetric.EDGE_F1,
    "scribble_xdog": FidelityMetric.EDGE_F1,
    "lineart": FidelityMetric.EDGE_F1,
    "softedge": FidelityMetric.EDGE_F1,
    "hed": FidelityMetric.EDGE_F1,
    "mlsd": FidelityMetric.EDGE_F1,
    "lines": FidelityMetric.EDGE_F1,
    "binary": FidelityMetric.IOU,
    "seg": FidelityMetric.IOU,
    "mask": FidelityMetric.IOU,
    "depth": FidelityMetric.DEPTH_CORR,
}

# Annotator used to *measure* a sample of each control type: deterministic versions of the training ones
# (fixed Canny thresholds instead of random ones; plain XDoG lines for scribbles).
MEASURING_ANNOTATOR: dict[str, str] = {
    "canny": "canny",
    "scribble": "scribble_xdog",
    "scribble_synthesis": "scribble_xdog",
    "scribble_clean": "scribble_xdog",
    "scribble_xdog": "scribble_xdog",
    "lines": "lines",
    "mlsd": "lines",
    "binary": "binary",
}


def metric_for(name: str) -> FidelityMetric:
    """The metric that fits an annotator or control type ('none' when nothing fits)."""
    return METRIC_BY_CONTROL.get(name, FidelityMetric.NONE)


def _as_mask(x: np.ndarray, threshold: float) -> np.ndarray:
    """HWC or HW, uint8 (0..255) or float (0..1), to a boolean HW mask."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x.max(axis=2)
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return x.astype(np.float32) / scale > threshold


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def edge_f1(predicted: np.ndarray, reference: np.ndarray, tolerance: int = 2, threshold: float = 0.5) -> float:
    """F1 of edge pixels, a pixel counting as matched within `tolerance` px of the other map's edges.

    Precision: predicted edge pixels near a reference edge; recall: reference edge pixels near a predicted edge.
    Two empty maps agree perfectly (1.0); one empty map against edges scores 0.
    """
    pred, ref = _as_mask(predicted, threshold), _as_mask(reference, threshold)
    if pred.shape != ref.shape:
        raise ValueError(f"edge maps differ in size: {pred.shape} vs {ref.shape}; resize one to the other")
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    precision = (pred & _dilate(ref, tolerance)).sum() / pred.sum()
    recall = (ref & _dilate(pred, tolerance)).sum() / ref.sum()
    return float(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))


def iou(predicted: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of two binary masks (1.0 when both are empty)."""
    pred, ref = _as_mask(predicted, threshold), _as_mask(reference, threshold)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in size: {pred.shape} vs {ref.shape}; resize one to the other")
    union = (pred | ref).sum()
    return 1.0 if union == 0 else float((pred & ref).sum() / union)


def depth_correlation(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Pearson correlation of two depth maps (scale and offset free; 0 when either is constant)."""
    a, b = np.asarray(predicted, np.float64), np.asarray(reference, np.float64)
    a = a.mean(axis=2) if a.ndim == 3 else a
    b = b.mean(axis=2) if b.ndim == 3 else b
    if a.shape != b.shape:
        raise ValueError(f"depth maps differ in size: {a.shape} vs {b.shape}; resize one to the other")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return 0.0 if denom == 0 else float((a * b).sum() / denom)


def score(metric: FidelityMetric | str, predicted: np.ndarray, reference: np.ndarray) -> float | None:
    """The chosen metric on one pair, or None for 'none'."""
    metric = FidelityMetric(metric)
    if metric is FidelityMetric.EDGE_F1:
        return edge_f1(predicted, reference)
    if metric is FidelityMetric.IOU:
        return iou(predicted, reference)
    if metric is FidelityMetric.DEPTH_CORR:
        return depth_correlation(predicted, reference)
    return None
