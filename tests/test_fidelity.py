"""Condition fidelity metrics: edge F1 with tolerance, IoU, depth correlation."""
from __future__ import annotations

import numpy as np
import pytest

from zeroconv.training.fidelity import FidelityMetric, depth_correlation, edge_f1, iou, metric_for, score


def _square(offset: int = 0, size: int = 64) -> np.ndarray:
    edges = np.zeros((size, size, 3), np.uint8)
    a, b = 16 + offset, 48 + offset
    edges[a, a:b] = edges[b, a:b] = edges[a:b, a] = edges[a:b, b] = 255
    return edges


def test_edge_f1_tolerates_small_shifts_only() -> None:
    assert edge_f1(_square(), _square()) == 1.0
    assert edge_f1(_square(1), _square(), tolerance=2) == 1.0  # 1 px shift is within tolerance
    assert edge_f1(_square(1), _square(), tolerance=0) < 0.2  # measured 0.06: almost no exact overlap
    assert edge_f1(_square(8), _square()) < 0.4
    assert edge_f1(np.zeros((8, 8)), np.zeros((8, 8))) == 1.0
    assert edge_f1(np.zeros((64, 64)), _square()) == 0.0


def test_iou_and_depth_correlation() -> None:
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:, :5] = True
    assert iou(a, a) == 1.0 and iou(a, b) == pytest.approx(25 / 75)
    depth = np.random.default_rng(0).random((16, 16))
    assert depth_correlation(3 * depth + 1, depth) == pytest.approx(1.0)
    assert depth_correlation(-depth, depth) == pytest.approx(-1.0)
    assert depth_correlation(np.ones((4, 4)), depth[:4, :4]) == 0.0


def test_metric_table_and_size_mismatch() -> None:
    assert metric_for("canny") is FidelityMetric.EDGE_F1 and metric_for("depth") is FidelityMetric.DEPTH_CORR
    assert metric_for("shuffle") is FidelityMetric.NONE and score("none", _square(), _square()) is None
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(np.zeros((8, 8)), np.zeros((9, 9)))
