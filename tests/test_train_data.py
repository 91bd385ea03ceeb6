"""Training data: layouts (Fill50K, JSONL, folder), annotator conditions, clear errors, the step-to-rows plan."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zeroconv.training.config import Crop
from zeroconv.training.data import BatchPlan, ControlDataset, StepSampler, read_rows
from .tiny_base import write_tiny_fill50k


def _save(path: Path, size: tuple[int, int] = (48, 32), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def test_fill50k_layout_loads_with_hint_and_pixel_ranges(tmp_path: Path) -> None:
    rows = read_rows(write_tiny_fill50k(tmp_path / "fill", count=3, size=32))
    assert [r.caption.endswith("background") for r in rows] == [True] * 3
    item = ControlDataset(rows, 32)[(0, 0)]
    assert item["hint"].shape == (3, 32, 32) and 0 <= item["hint"].min() and item["hint"].max() <= 1
    assert item["pixels"].shape == (3, 32, 32) and -1 <= item["pixels"].min() and item["pixels"].max() <= 1
    assert item["hint"].max() > 0.5  # the circle outline survived


def test_jsonl_paths_are_relative_to_the_file_and_crops_are_square(tmp_path: Path) -> None:
    _save(tmp_path / "img" / "a.png", (48, 32))
    _save(tmp_path / "cond" / "a.png", (48, 32), 255)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "img/a.png", "condition": "cond/a.png",
                                                     "caption": "grey"}) + "\n")
    rows = read_rows(tmp_path / "rows.jsonl")
    item = ControlDataset(rows, 16, Crop.RANDOM)[(0, 5)]
    assert item["pixels"].shape == (3, 16, 16) and item["caption"] == "grey"
    assert item["size_cond"].tolist()[:2] == [32, 48]  # SDXL original size (h, w)


def test_folder_layout_with_txt_captions(tmp_path: Path) -> None:
    _save(tmp_path / "image" / "x.png")
    _save(tmp_path / "condition" / "x.png")
    (tmp_path / "image" / "x.txt").write_text("a caption\n")
    assert read_rows(tmp_path)[0].caption == "a caption"


def test_missing_and_unreadable_files_name_the_row(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lines = [{"image": "a.png", "condition": "a.png", "caption": ""},
             {"image": "a.png", "condition": "missing.png", "caption": ""}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(FileNotFoundError, match="d.jsonl line 2.*missing.png"):
        read_rows(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text(json.dumps({"image": "bad.png", "condition": "a.png"}))
    with pytest.raises(ValueError, match="e.jsonl line 1: cannot read image .*bad.png"):
        ControlDataset(read_rows(tmp_path / "e.jsonl"), 16)[0]
    (tmp_path / "f.jsonl").write_text(json.dumps({"image": "a.png"}))
    with pytest.raises(ValueError, match="no condition image and no annotator"):
        read_rows(tmp_path / "f.jsonl")


def test_annotator_conditions_canny_random_thresholds_and_scribble(tmp_path: Path) -> None:
    folder = write_tiny_fill50k(tmp_path / "fill", count=1, size=64)
    rows = [r.__class__(r.image, None, r.caption, r.where) for r in read_rows(folder)]
    canny = ControlDataset(rows, 64, annotator="canny")
    hints = [canny[(0, seed)]["hint"] for seed in range(4)]
    assert all(h.max() == 1.0 for h in hints)  # the disc's outline is an edge at any threshold
    scribble = ControlDataset(rows, 64, annotator="scribble_synthesis")
    assert scribble[(0, 1)]["hint"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown annotator 'nope'"):
        ControlDataset(rows, 64, annotator="nope")[(0, 0)]


def test_one_process_and_two_read_the_same_global_batches() -> None:
    one = StepSampler(10, BatchPlan(4, 1, 1), 0, seed=3, start_step=0, max_steps=5)
    r0 = StepSampler(10, BatchPlan(2, 1, 2), 0, seed=3, start_step=0, max_steps=5)
    r1 = StepSampler(10, BatchPlan(2, 1, 2), 1, seed=3, start_step=0, max_steps=5)
    accum = StepSampler(10, BatchPlan(2, 2, 1), 0, seed=3, start_step=0, max_steps=5)
    a = list(accum)
    for step, (b, x, y) in enumerate(zip(one, r0, r1)):
        assert b == x + y == a[2 * step] + a[2 * step + 1]
    resumed = list(StepSampler(10, BatchPlan(4, 1, 1), 0, seed=3, start_step=3, max_steps=5))
    assert resumed == list(one)[3:]
    rows = [i for batch in one for i, _ in batch]  # 20 draws over 10 rows: each row twice (two epochs)
    assert sorted(rows) == sorted(list(range(10)) * 2)
    assert len({s for batch in one for _, s in batch}) == 20  # augmentation seeds differ per draw
