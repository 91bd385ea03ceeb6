"""The demo world: seeded pictures, Fill50K layout on disk, outlines that enclose the filled shape, measuring."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zeroconv.demo import world
from zeroconv.demo.world import (PALETTE, SHAPES, ShapeSpec, colours_match, nearest_colour,
                                     random_specs, render_outline, render_target, segment_shape, shape_mask,
                                     write_dataset)


def test_same_seed_same_world_and_captions_name_both_colours() -> None:
    a, b = random_specs(50, seed=3), random_specs(50, seed=3)
    assert a == b and a != random_specs(50, seed=4)
    for spec in a:
        assert spec.colour != spec.background
        assert spec.caption == f"{spec.colour} {spec.shape} with {spec.background} background"
    assert {s.shape for s in random_specs(200, seed=0)} == set(SHAPES)


def test_target_is_two_colours_and_outline_is_a_thin_white_line_on_black() -> None:
    spec = ShapeSpec("circle", "red", "blue", cx=0.5, cy=0.5, radius=0.3, angle=0.0)
    target, outline, mask = render_target(spec, 64), render_outline(spec, 64), shape_mask(spec, 64)
    assert target.shape == outline.shape == (64, 64, 3) and target.dtype == outline.dtype == np.uint8
    assert abs(mask.mean() - np.pi * 0.3**2) < 0.01  # the disc's area share
    assert (target[mask] == PALETTE["red"]).all(axis=-1).mean() > 0.9
    assert (target[~mask] == PALETTE["blue"]).all(axis=-1).mean() > 0.9
    ink = outline[..., 0].astype(float).sum() / 255
    perimeter = 2 * np.pi * 0.3 * 64
    assert 1.0 * perimeter < ink < 2.0 * perimeter  # about 1.5 px wide
    assert outline[32, 32].max() == 0 and outline[0, 0].max() == 0  # black inside and outside


@pytest.mark.parametrize("shape", SHAPES)
def test_outline_lies_on_the_filled_shape_boundary(shape: str) -> None:
    spec = ShapeSpec(shape, "yellow", "black", cx=0.45, cy=0.55, radius=0.3, angle=0.4)
    line = render_outline(spec, 64)[..., 0] > 127
    mask = shape_mask(spec, 64)
    boundary = mask ^ np.pad(mask, 1, mode="edge")[:-2, 1:-1] | mask ^ np.pad(mask, 1, mode="edge")[1:-1, :-2]
    near = np.zeros_like(boundary)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(boundary, dy, 0), dx, 1)
    assert (line & near).sum() / line.sum() > 0.95


def test_write_dataset_makes_the_fill50k_layout(tmp_path) -> None:
    jsonl = write_dataset(tmp_path, count=5, size=32, seed=1)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert jsonl.name == "prompt.json" and len(rows) == 5
    assert set(rows[0]) == {"source", "target", "prompt"}
    specs = random_specs(5, seed=1)
    assert [r["prompt"] for r in rows] == [s.caption for s in specs]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / rows[2]["target"])), render_target(specs[2], 32))
    assert np.array_equal(np.asarray(Image.open(tmp_path / rows[2]["source"])), render_outline(specs[2], 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        write_dataset(tmp_path / "bad", count=1, size=30)


def test_training_data_reader_reads_the_world(tmp_path) -> None:
    data = pytest.importorskip("zeroconv.training.data")
    write_dataset(tmp_path, count=3, size=32, seed=2)
    rows = data.read_rows(tmp_path)
    assert [r.caption for r in rows] == [s.caption for s in random_specs(3, seed=2)]


def test_measuring_a_perfect_picture_scores_perfectly() -> None:
    specs = random_specs(20, seed=5)
    targets = [render_target(s, 64) for s in specs]
    for spec, image in zip(specs, targets):
        seg = segment_shape(image, spec)
        mask = shape_mask(spec, 64)
        assert (seg & mask).sum() / (seg | mask).sum() > 0.9
        assert colours_match(image, seg, spec)
    assert nearest_colour((250, 10, 5)) == "red" and nearest_colour((0, 120, 10)) == "green"


def test_bad_specs_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="must differ"):
        ShapeSpec("circle", "red", "red", 0.5, 0.5, 0.2, 0.0)
    with pytest.raises(ValueError, match="palette"):
        ShapeSpec("circle", "mauve", "red", 0.5, 0.5, 0.2, 0.0)
    with pytest.raises(ValueError, match="shape"):
        ShapeSpec("hexagon", "blue", "red", 0.5, 0.5, 0.2, 0.0)


def test_cli_writes_the_dataset(tmp_path) -> None:
    assert world.main(["--out", str(tmp_path), "--count", "2", "--size", "16", "--seed", "0"]) == 0
    assert len((tmp_path / "prompt.json").read_text().splitlines()) == 2
