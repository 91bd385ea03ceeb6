"""Checkpoint reading and writing: LDM layouts, native files with metadata, and bad files."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model import ControlNet, preset
from zeroconv.controlnet_model.checkpoint import (CheckpointFormat, ControlNetMetadata, detect_format, infer_config,
                                                  load_controlnet, read_metadata, save_controlnet)

from .conftest import randomize


@pytest.fixture
def net() -> ControlNet:
    torch.manual_seed(0)
    return randomize(ControlNet(preset("tiny-sd2")), seed=2)


def _same(a: ControlNet, b: ControlNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sdxl-mid", "sdxl-small", "tiny-sd2", "tiny-sdxl"])
def test_config_inferred_from_shapes(name: str) -> None:
    with torch.device("meta"):
        model = ControlNet(preset(name))
    inferred, reference = infer_config(model.state_dict()), preset(name)
    assert inferred.signature() == reference.signature()
    assert inferred.transformer_depth == reference.transformer_depth
    assert inferred.transformer_depth_middle == reference.transformer_depth_middle


def test_native_round_trip_with_metadata(net: ControlNet, tmp_path) -> None:
    path = save_controlnet(net, tmp_path / "canny.safetensors",
                           ControlNetMetadata(control_type="canny", annotator="canny", resolution=512))
    loaded = load_controlnet(path)
    assert loaded.format is CheckpointFormat.LDM and _same(loaded.model, net)
    assert loaded.config == net.config
    meta = read_metadata(path)
    assert (meta.control_type, meta.annotator, meta.resolution, meta.family) == ("canny", "canny", 512, "tiny SD2.x-shaped")
    assert len(meta.content_hash) == 64
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("layout", ["v10_full_pth", "lightning_ckpt", "pruned_fp16", "v11_bare_pth"])
def test_ldm_layouts_load_to_the_same_weights(net: ControlNet, tmp_path, layout: str) -> None:
    state = net.state_dict()
    prefixed = {f"control_model.{k}": v for k, v in state.items()}
    if layout == "v10_full_pth":
        file = tmp_path / "control_sd21_canny.pth"
        torch.save({**prefixed, "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
                    "betas": torch.zeros(10)}, file)
    elif layout == "lightning_ckpt":
        file = tmp_path / "epoch=1-step=10.ckpt"
        torch.save({"state_dict": prefixed}, file)
    elif layout == "pruned_fp16":
        file = tmp_path / "control_canny-fp16.safetensors"
        save_file({k: v.half().contiguous() for k, v in prefixed.items()}, file)
    else:
        file = tmp_path / "control_v11p_sd21_canny.pth"
        torch.save(dict(state), file)
    loaded = load_controlnet(file, dtype=torch.float32)
    expected = {k: (v.half().float() if layout == "pruned_fp16" else v) for k, v in state.items()}
    assert all(torch.equal(loaded.model.state_dict()[k], expected[k]) for k in expected)
    assert loaded.model.dtype == torch.float32


def test_dtype_asked_for(net: ControlNet, tmp_path) -> None:
    path = save_controlnet(net, tmp_path / "a.safetensors")
    assert load_controlnet(path, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_shuffle_is_read_from_the_name(net: ControlNet, tmp_path) -> None:
    torch.save(dict(net.state_dict()), tmp_path / "control_v11e_sd21_shuffle.pth")
    assert load_controlnet(tmp_path / "control_v11e_sd21_shuffle.pth").config.global_average_pooling


def test_detection_table() -> None:
    assert detect_format(["control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight"]) \
        is CheckpointFormat.LDM_PREFIXED
    assert detect_format(["zero_convs.0.0.weight", "input_hint_block.0.weight"]) is CheckpointFormat.LDM
    assert detect_format(["difference", "control_model.zero_convs.0.0.weight"]) is CheckpointFormat.DIFF
    assert detect_format(["lora_controlnet"]) is CheckpointFormat.CONTROL_LORA
    assert detect_format(["controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight"]) \
        is CheckpointFormat.DIFFUSERS
    with pytest.raises(ValueError, match="marker keys"):
        detect_format(["foo.weight"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bad_files_give_one_clear_error(net: ControlNet, tmp_path) -> None:
    good = save_controlnet(net, tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "unknown.safetensors")
    save_file({"union": torch.zeros(1), "control_add_embedding.linear_1.bias": torch.zeros(2)},
              tmp_path / "union.safetensors")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    cases = {"truncated.safetensors": "truncated", "header.safetensors": "corrupt", "empty.safetensors": "empty",
             "unknown.safetensors": "unknown checkpoint layout",
             "union.safetensors": "not supported", "evil.pth": "refused"}
    for name, match in cases.items():
        with pytest.raises((ValueError, KeyError), match=match) as info:
            load_controlnet(tmp_path / name)
        assert name in str(info.value) or name == "unknown.safetensors"
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    with pytest.raises(FileNotFoundError, match="no diffusers weights"):
        load_controlnet(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="models/controlnet"):
        load_controlnet(tmp_path / "missing.safetensors")


def test_failed_write_keeps_the_good_file(net: ControlNet, tmp_path, monkeypatch) -> None:
    path = save_controlnet(net, tmp_path / "keep.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_controlnet(net, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def _tiny_pair():
    from zeroconv.controlnet_model import UNetModel, init_from_unet

    unet = randomize(UNetModel(preset("tiny")), seed=1)
    controlnet, _ = init_from_unet(unet)
    return unet, randomize(controlnet, seed=8)


def test_diff_controlnet_needs_and_uses_the_base(tmp_path) -> None:
    from zeroconv.controlnet_model.from_unet import unet_twin

    unet, controlnet = _tiny_pair()
    base = unet.state_dict()
    stored = {"difference": torch.tensor(1.0)}
    for key, value in controlnet.state_dict().items():
        twin = unet_twin(key)
        delta = value - base[twin] if twin in base else value
        if twin in base and key.startswith("middle_block.0.in_layers.0"):
            continue  # the writer omits keys whose delta is ~0; here they must come from the base
        stored[f"control_model.{key}"] = delta
    expected = dict(controlnet.state_dict())
    expected["middle_block.0.in_layers.0.weight"] = base["middle_block.0.in_layers.0.weight"]
    expected["middle_block.0.in_layers.0.bias"] = base["middle_block.0.in_layers.0.bias"]
    save_file({k: v.contiguous() for k, v in stored.items()}, tmp_path / "diff_control_sd15_canny.safetensors")
    with pytest.raises(ValueError, match="base model"):
        load_controlnet(tmp_path / "diff_control_sd15_canny.safetensors")
    loaded = load_controlnet(tmp_path / "diff_control_sd15_canny.safetensors", base_unet=unet)
    assert loaded.format is CheckpointFormat.DIFF
    for key, value in expected.items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_control_lora_rebuilds_low_rank_weights(tmp_path) -> None:
    from zeroconv.controlnet_model.from_unet import unet_twin

    unet, controlnet = _tiny_pair()
    base = unet.state_dict()
    gen = torch.Generator().manual_seed(3)
    stored, expected = {"lora_controlnet": torch.tensor([])}, {}
    for key, value in controlnet.state_dict().items():
        twin = unet_twin(key)
        if twin in base and value.ndim >= 2:
            module = key[: -len(".weight")]
            up = torch.randn(value.shape[0], 2, *([1] * (value.ndim - 2)), generator=gen) * 0.1
            down = torch.randn(2, *value.shape[1:], generator=gen) * 0.1
            stored[module + ".up"], stored[module + ".down"] = up, down
            expected[key] = base[twin] + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
        elif twin in base:
            expected[key] = base[twin]  # 1-D U-Net parameters may be left out: they come from the base
        else:
            stored[key] = expected[key] = value
    save_file({k: v.contiguous() for k, v in stored.items()}, tmp_path / "control-lora-canny-rank2.safetensors")
    loaded = load_controlnet(tmp_path / "control-lora-canny-rank2.safetensors", base_unet=unet.state_dict())
    assert loaded.format is CheckpointFormat.CONTROL_LORA
    for key, value in expected.items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
