"""Weight-free annotators measured on synthetic pictures made here."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from zeroconv.annotators import classical
from zeroconv.annotators.pose import COLORS, LIMBS, draw_pose, parse_openpose_json
from zeroconv.annotators.registry import ANNOTATORS, annotate, suggest_annotator
from zeroconv.nodes.annotators import NODE_CLASS_MAPPINGS


def _disk(size=128, radius=40) -> np.ndarray:
    image = np.full((size, size, 3), 30, np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, (220, 200, 40), -1)
    return image


def test_canny_edges_of_a_disk_lie_on_its_boundary() -> None:
    edges = annotate("canny", _disk(), detect_resolution=0)[..., 0]
    ys, xs = np.nonzero(edges)
    distance = np.hypot(xs - 64, ys - 64)
    assert len(xs) > 150
    assert np.abs(distance - 40).max() <= 2.0
    angles = np.arctan2(ys - 64, xs - 64)
    assert len(np.unique(np.round(angles * 8 / np.pi))) >= 15, "edges go all the way round"


def test_lines_found_on_a_grid_match_its_lines() -> None:
    image = np.zeros((128, 128, 3), np.uint8)
    for c in (32, 64, 96):
        image[:, c - 1:c + 1] = 255
        image[c - 1:c + 1, :] = 255
    lines = annotate("lines", image, detect_resolution=0)[..., 0] > 0
    assert lines.sum() > 500
    on_grid = np.zeros_like(lines)
    for c in (32, 64, 96):
        on_grid[:, c - 3:c + 3] = True
        on_grid[c - 3:c + 3, :] = True
    assert (lines & on_grid).sum() / lines.sum() > 0.95
    for c in (32, 64, 96):
        assert lines[:, c - 3:c + 3].any(axis=1).mean() > 0.8 and lines[c - 3:c + 3, :].any(axis=0).mean() > 0.8


def test_normal_from_depth_of_a_sphere_points_outwards() -> None:
    size, r = 128, 50
    yy, xx = np.mgrid[:size, :size] - size // 2
    inside = xx**2 + yy**2 < r**2
    depth = np.where(inside, np.sqrt(np.clip(r**2 - xx**2 - yy**2, 0, None)), 0)
    normal = classical.normal_from_depth((depth / depth.max() * 255).astype(np.uint8), background_threshold=0.05)
    n = normal.astype(np.float32) / 127.5 - 1.0
    right, left, top, bottom = n[64, 64 + 35], n[64, 64 - 35], n[64 - 35, 64], n[64 + 35, 64]
    assert right[0] > 0.3 and left[0] < -0.3, "x points right on the right side"
    assert top[1] > 0.3 and bottom[1] < -0.3, "y points up at the top"
    assert n[64, 64][2] > 0.95, "the centre faces the viewer"


def test_pose_renderer_draws_each_limb_in_its_colour() -> None:
    body = [[256, 60], [256, 120], [200, 120], [180, 200], [170, 280], [312, 120], [332, 200], [342, 280],
            [220, 280], [215, 380], [210, 470], [292, 280], [297, 380], [302, 470], [240, 50], [272, 50],
            [225, 60], [287, 60]]
    text = json.dumps({"people": [{"pose_keypoints_2d": [v for x, y in body for v in (x, y, 1.0)]}],
                       "canvas_width": 512, "canvas_height": 512})
    people, h, w = parse_openpose_json(text)
    canvas = draw_pose(people, h, w)
    for k, (i, j) in enumerate(LIMBS):
        (x1, y1), (x2, y2) = body[i], body[j]
        if np.hypot(x2 - x1, y2 - y1) < 40:
            continue  # short face limbs are covered by keypoint circles
        px = canvas[int(y1 + 0.5 * (y2 - y1)) + 0, int(x1 + 0.5 * (x2 - x1))].astype(float)
        assert np.abs(px - np.array(COLORS[k]) * 0.6).max() <= 2, (k, px)
    assert (canvas[60, 256] == COLORS[0]).all(), "keypoints are drawn at full colour on top"
    assert canvas[5, 5].max() == 0


def test_scribble_synthesis_is_seeded() -> None:
    image = _disk(256, 90)
    cv2.rectangle(image, (20, 20), (80, 120), (255, 255, 255), 3)
    a, b = (annotate("scribble_synthesis", image, 0, seed=s) for s in (1, 1))
    c = annotate("scribble_synthesis", image, 0, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() == 255 and set(np.unique(a)) <= {0, 255}


def test_user_scribble_becomes_white_on_black() -> None:
    paper = np.full((64, 64, 3), 255, np.uint8)
    paper[30:34, 10:50] = 0
    out = classical.clean_user_scribble(paper)
    assert out[32, 20].min() == 255 and out[5, 5].max() == 0


def test_inpaint_hint_marks_masked_pixels() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    hint = classical.inpaint_hint(np.full((32, 32, 3), 128, np.uint8), mask)
    assert (hint[:16] == -1.0).all() and np.allclose(hint[16:], 128 / 255)


@pytest.mark.parametrize("name", sorted(ANNOTATORS))
def test_every_node_runs_on_a_batch_of_grey_and_rgba(name: str) -> None:
    node = NODE_CLASS_MAPPINGS[ANNOTATORS[name].node_id]()
    grey = torch.rand(2, 96, 80, 1)
    rgba = torch.rand(1, 64, 64, 4)
    for image in (grey, rgba):
        kwargs = {"seed": 3} if ANNOTATORS[name].seeded else {}
        out = node.run(image, 64, **kwargs)[0]
        assert out.shape == (*image.shape[:3], 3) and out.dtype == torch.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_suggested_annotator_follows_the_control_type() -> None:
    assert suggest_annotator("canny") == "canny" and suggest_annotator("mlsd") == "lines"
    assert suggest_annotator("unknown") is None
    with pytest.raises(ValueError, match="unknown annotator"):
        annotate("nope", np.zeros((8, 8, 3), np.uint8))


def test_kornia_canny_agrees_with_opencv_within_one_pixel() -> None:
    pytest.importorskip("kornia", reason="the GPU Canny path needs kornia (annotators-gpu extra)")
    from zeroconv.annotators.registry import annotate_on_device

    rng = np.random.default_rng(0)
    images = []
    for _ in range(3):
        image = np.full((128, 128, 3), int(rng.integers(0, 80)), np.uint8)
        for _ in range(4):
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            cv2.circle(image, tuple(int(v) for v in rng.integers(20, 108, 2)), int(rng.integers(8, 40)), colour, -1)
        images.append(image)
    batch = np.stack(images)
    ours = annotate_on_device("canny", batch, "cpu")[..., 0] > 0
    reference = np.stack([classical.canny(im)[..., 0] > 0 for im in images])
    kernel = np.ones((3, 3), np.uint8)
    for a, b in zip(reference, ours):
        precision = (b & (cv2.dilate(a.astype(np.uint8), kernel) > 0)).sum() / max(b.sum(), 1)
        recall = (a & (cv2.dilate(b.astype(np.uint8), kernel) > 0)).sum() / max(a.sum(), 1)
        assert 2 * precision * recall / (precision + recall) >= 0.85
