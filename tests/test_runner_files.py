"""The runner's folders behave like ComfyUI's folder_paths: model lists, annotated names, save counters, images."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from zeroconv.workflow_runner import files
from zeroconv.workflow_runner.files import HostPaths


def test_model_lists_search_subfolders_then_the_folder(tmp_path) -> None:
    (tmp_path / "checkpoints" / "sd15").mkdir(parents=True)
    (tmp_path / "checkpoints" / "sd15" / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.ckpt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    paths = HostPaths(models_dirs=(tmp_path,))
    names = files.list_models("checkpoints", paths)
    assert "sd15/a.safetensors" in names and "b.ckpt" in names and "notes.txt" not in names
    assert files.resolve_model("checkpoints", "sd15/a.safetensors", paths) == \
        (tmp_path / "checkpoints" / "sd15" / "a.safetensors").resolve()
    with pytest.raises(FileNotFoundError, match="--models-dir"):
        files.resolve_model("checkpoints", "c.safetensors", paths)


def test_annotated_image_names_and_paths(tmp_path) -> None:
    paths = HostPaths(input_dir=tmp_path / "in", output_dir=tmp_path / "out", base_dir=tmp_path)
    for folder in (paths.input_dir, paths.output_dir):
        folder.mkdir()
        Image.new("RGBA", (5, 4), (255, 0, 0, 64)).save(folder / "x.png")
    assert files.resolve_image("x.png", paths) == paths.input_dir / "x.png"
    assert files.resolve_image("x.png [output]", paths) == paths.output_dir / "x.png"
    assert files.list_images(paths) == ["x.png"]
    image, mask = files.load_image(paths.input_dir / "x.png")
    assert image.shape == (1, 4, 5, 3) and torch.allclose(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert mask.shape == (1, 4, 5) and mask[0, 0, 0] == pytest.approx(1 - 64 / 255)
    Image.new("RGB", (5, 4)).save(paths.input_dir / "rgb.png")
    assert files.load_image(paths.input_dir / "rgb.png")[1].shape == (1, 64, 64)  # ComfyUI's no-alpha mask


def test_save_counter_continues_and_prefix_vars(tmp_path) -> None:
    folder, stem, counter, sub = files.save_path("shots/img_%width%x%height%", tmp_path, 64, 32)
    assert (folder, stem, counter, sub) == ((tmp_path / "shots").resolve(), "img_64x32", 1, "shots")
    (folder / "img_64x32_00007_.png").write_bytes(b"")
    assert files.save_path("shots/img_%width%x%height%", tmp_path, 64, 32)[2] == 8
    files.save_png(torch.full((2, 3, 3), 0.5), folder / "p.png", {"prompt": {"1": {}}})
    with Image.open(folder / "p.png") as png:
        assert png.text["prompt"] == '{"1": {}}' and np.asarray(png)[0, 0, 0] == 127
