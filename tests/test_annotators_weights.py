"""Annotator weights gone wrong: a manifest naming only annotators we build, and damaged, partial or undownloadable
files each reported once, naming the file, where it comes from, and `zeroconv fetch-weights` (no network)."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch

from zeroconv.annotators.learned import depth, hed, hf
from zeroconv.annotators.learned.base import build, load_file
from zeroconv.annotators.registry import ANNOTATORS
from zeroconv.annotators.weights import DIR_ENV, load_manifest, resolve_weight

from .test_annotators_learned_depth_seg import tiny_dpt_hybrid


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """ZEROCONV_ANNOTATOR_DIR in tmp_path, the hub cache out of reach."""
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    return tmp_path


def truncated(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """`tensors` saved in the format the suffix names, then cut to half its bytes (an interrupted download)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_manifest_rows_are_for_the_annotators_we_build() -> None:
    manifest = load_manifest()
    for entry in manifest.values():
        assert set(entry.used_by) <= set(ANNOTATORS), f"{entry.name} is for {entry.used_by}, not built here"
    for spec in ANNOTATORS.values():
        assert set(spec.weights) <= set(manifest), spec.name


def test_a_truncated_safetensors_in_the_hub_layout_is_named_with_its_source(weights_dir, monkeypatch) -> None:
    monkeypatch.setenv("ZEROCONV_OFFLINE", "1")
    folder = weights_dir / depth.MIDAS.repo_id
    tiny_dpt_hybrid().config.save_pretrained(folder)
    weights = truncated(folder / hf.WEIGHTS_FILE, {"w": torch.zeros(4096)})
    with pytest.raises(ValueError) as err:  # this row has no recorded hash: the read itself fails
        hf.load_pretrained(depth.MIDAS)
    message = str(err.value)
    assert str(weights) in message and "https://huggingface.co/Intel/dpt-hybrid-midas" in message
    assert "zeroconv fetch-weights Intel/dpt-hybrid-midas/model.safetensors" in message and "delete it" in message


def test_a_truncated_pth_is_named_with_its_source(weights_dir) -> None:
    path = truncated(weights_dir / hed.WEIGHTS, {"block1.convs.0.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ValueError) as err:
        load_file(hed.ControlNetHED, path)
    message = str(err.value)
    assert str(path) in message and "lllyasviel/Annotators" in message and "zeroconv fetch-weights" in message


def test_a_partial_file_with_a_recorded_size_is_refused_before_reading(weights_dir, monkeypatch) -> None:
    monkeypatch.setenv("ZEROCONV_OFFLINE", "1")
    path = truncated(weights_dir / hed.WEIGHTS, {"x": torch.zeros(16)})
    with pytest.raises(ValueError, match=r"bytes but the manifest records 29444406.*zeroconv fetch-weights "
                                         r"ControlNetHED\.pth"):
        build(hed.ControlNetHED, hed.WEIGHTS, "cpu")
    assert path.exists(), "the file is the user's to delete: nothing is removed behind their back"


def test_a_failed_download_names_the_file_the_repository_and_where_to_put_it(weights_dir, monkeypatch) -> None:
    monkeypatch.delenv("ZEROCONV_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'. Check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError) as err:
        resolve_weight(hed.WEIGHTS, offline=False)
    message = str(err.value)
    assert "ControlNetHED.pth" in message and "https://huggingface.co/lllyasviel/Annotators" in message
    assert f"put it in {weights_dir}" in message and "zeroconv fetch-weights ControlNetHED.pth" in message
