"""Depth (MiDaS DPT-Hybrid, Depth Anything V2) and segmentation (SegFormer ADE20K, Mask2Former COCO) through
transformers: random-weight models saved in the hub layout, loaded strictly through the manifest, run at their native
sizes; near = bright, the palettes, and the offline error (no real weights, no network, CPU)."""
from __future__ import annotations

import dataclasses

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from torch import nn
from transformers import (BitConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTConfig,
                          DPTForDepthEstimation, Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                          SegformerConfig, SegformerForSemanticSegmentation, SwinConfig)

from zeroconv.annotators import weights
from zeroconv.annotators.learned import depth, hf, segmentation
from zeroconv.annotators.registry import annotate, get
from zeroconv.annotators.weights import DIR_ENV, load_manifest, resolve_weight


def tiny_dpt_hybrid() -> DPTForDepthEstimation:
    """DPT-Hybrid's layout (BiT stages 1-2 + ViT) at toy widths; native input 64x64."""
    bit = BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                    embedding_size=8, num_groups=4, out_features=["stage1", "stage2", "stage3"],
                    embedding_dynamic_padding=True)
    return DPTForDepthEstimation(DPTConfig(
        is_hybrid=True, backbone_config=bit, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, image_size=64, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 32, 32],
        reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 4, 4]))


def depth_anything(small: bool = False) -> DepthAnythingForDepthEstimation:
    """Depth Anything V2 Small's config (DINOv2-S/14 at 518, DPT head 48..384, fusion 64, head 32: 24.8M
    parameters, as the hub card says), or the same layout at toy widths with a 70-pixel native side."""
    if small:
        backbone = Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518, out_indices=[3, 6, 9, 12],
                                reshape_hidden_states=False)
        return DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone))
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=70,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    return DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8))


def tiny_segformer() -> SegformerForSemanticSegmentation:
    """SegFormer's layout at toy widths, 150 ADE20K classes."""
    return SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=150, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
        decoder_hidden_size=16))


def tiny_mask2former() -> Mask2FormerForUniversalSegmentation:
    """Mask2Former with a Swin backbone at toy widths, 133 COCO panoptic classes, 10 queries."""
    swin = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=384,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=swin, num_labels=133, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
        num_queries=10))


# annotator -> (hub model, tiny net factory, native (h, w) of the test pictures)
MODELS = {
    "depth_midas": (depth.MIDAS, tiny_dpt_hybrid, (64, 64)),
    "depth_anything_v2": (depth.DEPTH_ANYTHING, depth_anything, (70, 98)),
    "seg_ade20k": (segmentation.ADE20K, tiny_segformer, (512, 512)),
    "seg_coco": (segmentation.COCO, tiny_mask2former, (384, 384)),
}


@torch.no_grad()
def save_hub_layout(net: nn.Module, root: Path, model: hf.HubModel, seed: int = 0) -> Path:
    """Random weights (seeded) saved with save_pretrained under root/<repo_id>/, as the manifest names the files."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if isinstance(net, (DPTForDepthEstimation, DepthAnythingForDepthEstimation)):
        # the depth heads end in a ReLU: lift the last conv so random weights give a varying, non-zero map
        [m for m in net.head.modules() if isinstance(m, nn.Conv2d)][-1].bias.fill_(1.0)
    folder = root / model.repo_id
    net.save_pretrained(folder)
    assert (folder / hf.CONFIG_FILE).is_file() and (folder / hf.WEIGHTS_FILE).is_file()
    return folder


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """An annotator folder (ZEROCONV_ANNOTATOR_DIR), offline, with the hub cache out of reach."""
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    monkeypatch.setenv("ZEROCONV_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    real = weights.load_manifest  # toy files of the real layout: their hashes are not the published ones
    monkeypatch.setattr(weights, "load_manifest", lambda path=None: {
        k: dataclasses.replace(e, size=None, sha256=None) for k, e in real(path).items()})
    return tmp_path


def pictures(height: int, width: int, count: int = 2, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((count, height, width, 3)) * 255).astype(np.uint8)


def test_manifest_rows_name_each_hub_file() -> None:
    manifest = load_manifest()
    for name, (model, _, _) in MODELS.items():
        assert get(name).weights == model.files
        for filename in model.files:
            entry = manifest[filename]
            assert entry.repo_id == model.repo_id and entry.file in (hf.CONFIG_FILE, hf.WEIGHTS_FILE)
            assert name in entry.used_by and entry.license


@pytest.mark.parametrize("name", list(MODELS))
def test_loads_strictly_from_the_hub_layout_and_runs_at_native_size(name: str, weights_dir) -> None:
    model, factory, (height, width) = MODELS[name]
    reference = factory()
    save_hub_layout(reference, weights_dir, model)
    net = get(name).loader("cpu")
    assert type(net) is type(reference) and not net.training
    for key, value in reference.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    images = pictures(height, width)
    first = annotate(name, images, detect_resolution=None, model_cache=lambda s, d: net)
    again = annotate(name, images, detect_resolution=None, model_cache=lambda s, d: net)
    assert first.shape == (2, height, width, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again), "same pictures, same map"
    if name.startswith("depth"):
        assert np.array_equal(first[..., 0], first[..., 2]), "grey repeated to 3 channels"
        assert all(m.min() == 0 and m.max() == 255 for m in first), "min-max per image"
    else:
        colors = {tuple(c) for c in segmentation.palette(segmentation.ADE20K_PALETTE if name == "seg_ade20k"
                                                          else segmentation.COCO_PALETTE)}
        assert {tuple(c) for c in first.reshape(-1, 3)} <= colors, "every pixel is a class colour"
    single = annotate(name, images[1], detect_resolution=None, model_cache=lambda s, d: net)
    assert np.abs(single.astype(int) - first[1]).max() <= 1, "a batch gives each picture its own map"


def test_depth_anything_v2_small_real_config(weights_dir) -> None:
    reference = depth_anything(small=True)
    assert 24.7e6 < sum(p.numel() for p in reference.parameters()) < 24.9e6
    save_hub_layout(reference, weights_dir, depth.DEPTH_ANYTHING)
    net = depth.load_depth_anything("cpu")
    out = annotate("depth_anything_v2", pictures(518, 518), detect_resolution=None, model_cache=lambda s, d: net)
    assert out.shape == (2, 518, 518, 3) and all(m.min() == 0 and m.max() == 255 for m in out)


def test_input_sizes_follow_each_model() -> None:
    midas = SimpleNamespace(image_size=384)
    assert depth.midas_input_size(midas, 512, 768) == (384, 384)
    anything = SimpleNamespace(patch_size=14, backbone_config=SimpleNamespace(image_size=518))
    assert depth.depth_anything_input_size(anything, 512, 640) == (518, 644)
    assert hf.short_side_multiple(600, 450, 512, 32) == (672, 512)


def test_normalised_depth_puts_the_nearest_point_at_white() -> None:
    disparity = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]], [[[7.0, 7.0], [7.0, 7.0]]]])
    out = depth.normalise_depth(disparity)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]])), "larger inverse depth is brighter"
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a flat map is black, not NaN"


class BrightIsNear(nn.Module):
    """Stands in for a transformers depth model: predicted inverse depth = the input's mean brightness."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(predicted_depth=pixel_values.mean(dim=1) * self.scale)


@pytest.mark.parametrize("name, config", [
    ("depth_midas", SimpleNamespace(image_size=32)),
    ("depth_anything_v2", SimpleNamespace(patch_size=14, backbone_config=SimpleNamespace(image_size=28)))])
def test_near_is_bright_through_the_annotator(name: str, config: SimpleNamespace) -> None:
    images = np.full((2, 64, 96, 3), 40, np.uint8)
    images[0, :, 48:] = 220  # image 0: right half near
    images[1, 32:] = 220  # image 1: bottom half near
    out = annotate(name, images, detect_resolution=None, model_cache=lambda s, d: BrightIsNear(config))
    assert out[0, 20, 80, 0] > 240 and out[0, 20, 10, 0] < 15, "near half white, far half black (bicubic ringing aside)"
    assert out[1, 60, 50, 0] > 240 and out[1, 5, 50, 0] < 15
    assert all(m.min() == 0 and m.max() == 255 for m in out)


def test_palettes_hold_the_documented_colours() -> None:
    ade, coco = segmentation.palette("ade20k"), segmentation.palette("coco_panoptic")
    assert ade.shape == (150, 3) and coco.shape == (133, 3) and ade.dtype == coco.dtype == np.uint8
    assert ade[:3].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230]], "wall, building, sky"
    assert segmentation.class_names("ade20k")[:3] == ("wall", "building", "sky")
    # the published ADE20K palette repeats one colour: road (6) and skyscraper (48) are both (140, 140, 140)
    assert len({tuple(c) for c in ade}) == 149 and ade[6].tolist() == ade[48].tolist() == [140, 140, 140]
    assert len({tuple(c) for c in coco}) == 133, "COCO panoptic colours are distinct"
    assert coco[0].tolist() == [220, 20, 60] and segmentation.class_names("coco_panoptic")[0] == "person"
    assert coco[-1].tolist() == [250, 141, 255] and segmentation.class_names("coco_panoptic")[-1] == "rug-merged"


def test_paint_gives_each_class_its_colour() -> None:
    labels = torch.tensor([[[0, 1], [2, 149]]])
    painted = segmentation.paint(labels, segmentation.palette("ade20k"))
    assert painted.shape == (1, 2, 2, 3) and painted.dtype == np.uint8
    assert painted[0].tolist() == [[[120, 120, 120], [180, 120, 120]], [[6, 230, 230], [92, 0, 255]]]
    with pytest.raises(ValueError, match="0..132"):
        segmentation.paint(np.array([[[133]]]), segmentation.palette("coco_panoptic"))


def test_seg_maps_come_back_with_nearest() -> None:
    net = tiny_segformer().eval()
    out = annotate("seg_ade20k", pictures(256, 256, count=1), detect_resolution=None, output_size=(300, 301),
                   model_cache=lambda s, d: net)
    colors = {tuple(c) for c in segmentation.palette("ade20k")}
    assert out.shape == (1, 300, 301, 3) and {tuple(c) for c in out.reshape(-1, 3)} <= colors, "no blended colours"


def test_a_file_with_a_missing_tensor_is_refused_by_name(weights_dir) -> None:
    folder = save_hub_layout(depth_anything(), weights_dir, depth.DEPTH_ANYTHING)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / hf.WEIGHTS_FILE))
    del tensors["head.conv1.weight"]
    save_file(tensors, str(folder / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="head.conv1.weight"):
        depth.load_depth_anything("cpu")


def test_a_config_of_another_model_is_refused(weights_dir) -> None:
    folder = save_hub_layout(tiny_segformer(), weights_dir, segmentation.ADE20K)
    with pytest.raises(ValueError, match="segformer"):
        hf.load_files("DPTForDepthEstimation", folder / hf.CONFIG_FILE, folder / hf.WEIGHTS_FILE)


def test_offline_without_the_files_names_them(weights_dir) -> None:
    with pytest.raises(FileNotFoundError, match="Intel/dpt-hybrid-midas/config.json") as error:
        get("depth_midas").loader("cpu")
    assert str(weights_dir / "Intel/dpt-hybrid-midas/config.json") in str(error.value), "says where to put it"
    (weights_dir / "config.json").write_text("{}")  # a bare config.json is not taken for any repository's
    with pytest.raises(FileNotFoundError, match="mask2former-swin-tiny-coco-panoptic/config.json"):
        get("seg_coco").loader("cpu")


def test_a_named_row_downloads_into_its_repository_folder(weights_dir, monkeypatch) -> None:
    calls = []

    def fake_download(repo_id: str, filename: str, revision: str, local_dir: str | None) -> str:
        calls.append((repo_id, filename, revision, local_dir))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("{}")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = resolve_weight(segmentation.ADE20K.config_name, offline=False, progress=False)
    assert path == weights_dir / "nvidia/segformer-b2-finetuned-ade-512-512/config.json"
    repo_id, filename, revision, _ = calls[0]
    assert (repo_id, filename) == ("nvidia/segformer-b2-finetuned-ade-512-512", "config.json") and len(revision) == 40
    assert resolve_weight(segmentation.ADE20K.config_name) == path and len(calls) == 1, "found locally the next time"


def test_manifest_refuses_two_rows_of_one_name(tmp_path) -> None:
    row = {"file": "config.json", "repo_id": "a/b", "revision": "main", "size": None, "sha256": None,
           "license": "x", "used_by": ["y"]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps([row, {**row, "repo_id": "c/d"}]))
    with pytest.raises(ValueError, match="two entries are named 'config.json'"):
        load_manifest(path)
    path.write_text(json.dumps([{**row, "name": "a/b/model.json"}]))
    with pytest.raises(ValueError, match="must end with '/config.json'"):
        load_manifest(path)
    path.write_text(json.dumps([{**row, "name": "a/b/config.json"},
                                {**row, "repo_id": "c/d", "name": "c/d/config.json"}]))
    assert sorted(load_manifest(path)) == ["a/b/config.json", "c/d/config.json"]


def test_importing_the_pack_does_not_import_transformers() -> None:
    code = "import sys, zeroconv.annotators.learned; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_normal_from_midas_uses_the_raw_depth_and_points_outwards() -> None:
    size, radius = 96, 36
    yy, xx = np.mgrid[:size, :size] - size // 2
    height = np.sqrt(np.clip(radius**2 - xx**2 - yy**2, 0, None))
    image = np.repeat((height / height.max() * 255).astype(np.uint8)[..., None], 3, axis=2)  # bright = near
    net = BrightIsNear(SimpleNamespace(image_size=size))
    with torch.no_grad():
        net.scale.fill_(40.0)  # raw inverse depth spanning -40..40, as a depth net's output is unnormalised
    out = annotate("normal_midas", image, detect_resolution=None, model_cache=lambda s, d: net,
                   background_threshold=0.05)
    n = out.astype(np.float32) / 127.5 - 1.0  # channels (z towards the viewer, y up, x left)
    c, d = size // 2, 25
    assert n[c, c - d, 2] > 0.3 and n[c, c + d, 2] < -0.3, "B: the left side faces left, the right side right"
    assert n[c - d, c, 1] > 0.3 and n[c + d, c, 1] < -0.3, "G: the top faces up, the bottom down"
    assert n[c, c, 0] > 0.99, "R: the centre faces the viewer"
    assert (out[2, 2] == [255, 127, 127]).all(), "the background is flat"
    with torch.no_grad():
        net.scale.fill_(4.0)  # the same shape, a tenth of the raw depth: flatter normals (v1.0 used raw values)
    flatter = annotate("normal_midas", image, detect_resolution=None, model_cache=lambda s, d: net,
                       background_threshold=0.05).astype(np.float32) / 127.5 - 1.0
    assert abs(flatter[c, c - d, 2]) < abs(n[c, c - d, 2])


def test_annotators_sharing_a_loader_share_one_model(monkeypatch) -> None:
    import dataclasses

    from zeroconv.annotators import registry
    from zeroconv.nodes.host.models import HostModels

    loads = []

    def loader(device: str) -> nn.Module:
        loads.append(device)
        return BrightIsNear(SimpleNamespace(image_size=32))

    for name in ("depth_midas", "normal_midas"):  # the same MiDaS weights behind both
        monkeypatch.setitem(registry.ANNOTATORS, name, dataclasses.replace(registry.get(name), loader=loader))
    image = pictures(32, 32, count=1)[0]
    for cache in (registry.LocalModels(), HostModels()):
        loads.clear()
        annotate("depth_midas", image, detect_resolution=None, device="cpu", model_cache=cache)
        annotate("normal_midas", image, detect_resolution=None, device="cpu", model_cache=cache)
        assert loads == ["cpu"], type(cache).__name__
        cache.free("normal_midas")  # frees the shared model: the next use loads it again
        annotate("depth_midas", image, detect_resolution=None, device="cpu", model_cache=cache)
        assert loads == ["cpu", "cpu"], type(cache).__name__
