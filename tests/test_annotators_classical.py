"""Weight-free annotators measured on synthetic pictures drawn here (the rules of lllyasviel/ControlNet annotator/)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from zeroconv.annotators import classical
from zeroconv.annotators.registry import annotate

SIZE, CENTRE, RADIUS = 128, 64, 40


def disk(size: int = SIZE, radius: int = RADIUS) -> np.ndarray:
    image = np.full((size, size, 3), 30, np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, (220, 200, 40), -1)
    return image


def distance_to_circle(mask: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.abs(np.hypot(xs - cx, ys - cy) - radius)


@pytest.mark.parametrize("detect_resolution", [None, 256])
def test_canny_edges_of_a_disk_lie_on_its_boundary(detect_resolution: int | None) -> None:
    edges = annotate("canny", disk(), detect_resolution=detect_resolution)
    assert edges.shape == (SIZE, SIZE, 3) and set(np.unique(edges)) <= {0, 255}
    mask = edges[..., 0] > 0
    off = distance_to_circle(mask, CENTRE - 0.5, CENTRE - 0.5, RADIUS)
    assert mask.sum() > 150 and off.max() <= 2.0, off.max()  # every edge pixel within 2 px of the circle
    ys, xs = np.nonzero(mask)
    sectors = np.unique(np.floor((np.arctan2(ys - CENTRE, xs - CENTRE) + np.pi) / (2 * np.pi) * 36) % 36)
    assert len(sectors) == 36, "edges go all the way round (every 10-degree sector)"


def test_xdog_marks_dark_lines_white_on_black() -> None:
    paper = np.full((96, 96, 3), 240, np.uint8)
    cv2.line(paper, (10, 48), (86, 48), (20, 20, 20), 2)
    lines = classical.xdog(paper)[..., 0] > 0
    assert lines[47:50, 20:76].all(axis=1).any(), "the drawn line is white"
    assert not lines[:30].any() and not lines[70:].any(), "blank paper stays black"


def test_lineart_standard_is_bright_on_lines_and_black_on_paper() -> None:
    paper = np.full((96, 96, 3), 235, np.uint8)
    cv2.line(paper, (48, 5), (48, 90), (30, 30, 30), 2)
    out = classical.lineart_standard(paper)[..., 0]
    assert out[40:56, 47:50].min() >= 100 and out[:, :30].max() == 0


def test_lines_found_on_a_drawn_grid_match_its_lines() -> None:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for c in (32, 64, 96):
        image[:, c - 1:c + 1] = 255
        image[c - 1:c + 1, :] = 255
    lines = annotate("lines", image, detect_resolution=None)[..., 0] > 0
    near_grid = np.zeros_like(lines)
    for c in (32, 64, 96):
        near_grid[:, c - 3:c + 3] = near_grid[c - 3:c + 3, :] = True
    precision = (lines & near_grid).sum() / lines.sum()
    assert lines.sum() > 500 and precision > 0.97, precision
    for c in (32, 64, 96):  # each grid line is found along >= 85% of its length
        assert lines[:, c - 3:c + 3].any(axis=1).mean() >= 0.85
        assert lines[c - 3:c + 3, :].any(axis=0).mean() >= 0.85


def sphere_depth(size: int = SIZE, radius: int = 50) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    height = np.sqrt(np.clip(radius**2 - xx**2 - yy**2, 0, None))
    return (height / height.max() * 255).astype(np.uint8)  # near = bright


def test_normal_from_depth_of_a_sphere_points_outwards() -> None:
    normal = classical.normal_from_depth(sphere_depth(), background_threshold=0.05).astype(np.float32)
    n = normal / 127.5 - 1.0  # channels (z towards viewer, y up, x left), as fed to the v1.0 normal model
    z, up, left = n[..., 0], n[..., 1], n[..., 2]
    c, d = CENTRE, 35
    assert left[c, c - d] > 0.3 and left[c, c + d] < -0.3, "B: the left side faces left, the right side right"
    assert up[c - d, c] > 0.3 and up[c + d, c] < -0.3, "G: the top faces up, the bottom down"
    assert z[c, c] > 0.99 and abs(up[c, c]) < 0.05 and abs(left[c, c]) < 0.05, "R: the centre faces the viewer"
    assert np.allclose(np.linalg.norm(n[c - d:c + d, c - d:c + d], axis=2), 1.0, atol=0.02), "unit normals"
    assert (normal[2, 2] == [255, 127, 127]).all(), "background is flat, facing the viewer"


def scene() -> np.ndarray:
    image = disk(256, 90)
    cv2.rectangle(image, (20, 20), (80, 120), (255, 255, 255), 3)
    return image


def test_scribble_synthesis_is_reproducible_for_a_seed_and_varies_across_seeds() -> None:
    image = scene()
    runs = {s: annotate("scribble_synthesis", image, detect_resolution=None, seed=s) for s in range(6)}
    again = annotate("scribble_synthesis", image, detect_resolution=None, seed=3)
    assert np.array_equal(runs[3], again)
    distinct = {r.tobytes() for r in runs.values()}
    assert len(distinct) == 6, "six seeds, six different scribbles"
    coverage = [float((r[..., 0] > 0).mean()) for r in runs.values()]
    assert min(coverage) > 0.01 and max(coverage) < 0.5 and np.ptp(coverage) > 0.005, coverage
    for r in runs.values():
        assert set(np.unique(r)) <= {0, 255}


def test_scribble_strokes_follow_the_picture() -> None:
    image = disk(256, 90)
    scribble = annotate("scribble_synthesis", image, detect_resolution=None, seed=0)[..., 0] > 0
    off = distance_to_circle(scribble, 127.5, 127.5, 90)
    assert scribble.sum() > 200 and np.mean(off < 16) > 0.95, "strokes lie along the disk's outline"


def test_user_scribble_becomes_clean_white_on_black() -> None:
    paper = np.full((64, 64, 3), 250, np.uint8)
    paper[30:34, 10:50] = (200, 10, 10)  # a red pen stroke (min channel dark)
    paper[5, 5] = 0  # a speck of dust
    out = classical.clean_user_scribble(paper)
    assert out[32, 20].min() == 255 and out[5, 5].max() == 0 and out[50, 50].max() == 0
    already = 255 - classical.clean_user_scribble(paper)  # white strokes on black are kept as they are
    assert np.array_equal(classical.clean_user_scribble(already), 255 - already)


def test_binary_inverts_dark_strokes_with_otsu_or_a_fixed_threshold() -> None:
    paper = np.full((32, 32, 3), 200, np.uint8)
    paper[10:20, 10:20] = 40
    for threshold in (0, 128):
        out = classical.binary(paper, threshold)[..., 0]
        assert (out[10:20, 10:20] == 255).all() and out[0, 0] == 0


def test_shuffle_is_seeded_and_keeps_the_palette() -> None:
    image = np.zeros((96, 128, 3), np.uint8)
    image[:, :64] = (255, 0, 0)
    image[:, 64:] = (0, 0, 255)
    a, b = classical.shuffle(image, seed=1), classical.shuffle(image, seed=1)
    c = classical.shuffle(image, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a[..., 1].max() == 0, "remapping samples the picture: no new colours appear"
    assert not np.array_equal(a, image)


def test_tile_blurs_and_color_grid_makes_blocks() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    blurred = classical.tile(noise, levels=3)
    assert blurred.shape == noise.shape and blurred.astype(float).std() < 0.3 * noise.astype(float).std()
    grid = classical.color_grid(noise, factor=32)
    blocks = grid.reshape(4, 32, 4, 32, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "each 32x32 cell is one colour"


def test_inpaint_hint_marks_masked_pixels_minus_one() -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[:8] = 255
    hint = classical.inpaint_hint(np.full((32, 32, 3), 128, np.uint8), mask)  # mask resized to the picture
    assert hint.dtype == np.float32 and (hint[:16] == -1.0).all() and np.allclose(hint[16:], 128 / 255)
    assert (classical.inpaint_hint(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool), 0.0) == 0).all()
