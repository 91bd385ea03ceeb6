"""Diff ControlNets and Control-LoRA: files stored relative to a base U-Net (ComfyUI comfy/controlnet.py load_controlnet, ControlLora)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model import ControlNet, UNetModel, init_from_unet, preset
from zeroconv.controlnet_model.checkpoint import CheckpointFormat, load_controlnet, save_controlnet
from zeroconv.controlnet_model.from_unet import unet_twin

from .conftest import randomize
from .test_checkpoint import assert_same_function


def _pair(name: str) -> tuple[UNetModel, ControlNet]:
    """A base U-Net and a ControlNet trained away from it (every weight differs)."""
    unet = randomize(UNetModel(preset(name)), seed=1).eval()
    controlnet, _ = init_from_unet(unet)
    return unet, randomize(controlnet, seed=8).eval()


def _diff_state(unet: UNetModel, controlnet: ControlNet, omit: str) -> dict[str, torch.Tensor]:
    """kohya's diff layout: `control_model.` keys, deltas where the U-Net has a twin, `difference` marker."""
    base = unet.state_dict()
    stored = {"difference": torch.tensor(1.0)}
    for key, value in controlnet.state_dict().items():
        twin = unet_twin(key)
        if twin in base and key.startswith(omit):
            continue  # the writer drops deltas that are ~0; those keys must come from the base
        stored[f"control_model.{key}"] = (value - base[twin] if twin in base else value).contiguous()
    return stored


def _expected_with_base(unet: UNetModel, controlnet: ControlNet, omit: str) -> dict[str, torch.Tensor]:
    base = unet.state_dict()
    return {k: base[unet_twin(k)] if k.startswith(omit) else v for k, v in controlnet.state_dict().items()}


@pytest.mark.parametrize("container", ["safetensors", "nested_pth"])
def test_diff_controlnet_is_delta_plus_base(tmp_path, container: str) -> None:
    unet, controlnet = _pair("tiny")
    stored = _diff_state(unet, controlnet, omit="middle_block.0.in_layers.0")
    if container == "safetensors":
        path = tmp_path / "diff_control_sd15_canny_fp32.safetensors"
        save_file(stored, path)
    else:
        path = tmp_path / "diff_control_sd15_canny.pth"
        torch.save({"state_dict": stored}, path)
    with pytest.raises(ValueError, match="base model") as info:
        load_controlnet(path)
    assert path.name in str(info.value)
    expected = _expected_with_base(unet, controlnet, omit="middle_block.0.in_layers.0")
    for base in (unet, unet.state_dict(), {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}):
        loaded = load_controlnet(path, base_unet=base)
        assert loaded.format is CheckpointFormat.DIFF and loaded.metadata.control_type == "canny"
        got = loaded.model.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
    resaved = save_controlnet(loaded.model, tmp_path / "absolute.safetensors")  # now self-contained
    assert_same_function(load_controlnet(resaved).model, loaded.model)


def test_diff_controlnet_with_the_wrong_base_family(tmp_path) -> None:
    unet, controlnet = _pair("tiny")
    save_file(_diff_state(unet, controlnet, omit="none"), tmp_path / "diff_control_sd15.safetensors")
    other = randomize(UNetModel(preset("tiny-sd2")), seed=3)
    with pytest.raises(ValueError, match="another model family") as info:
        load_controlnet(tmp_path / "diff_control_sd15.safetensors", base_unet=other)
    assert "diff_control_sd15.safetensors" in str(info.value)
    with pytest.raises(ValueError, match="no LDM U-Net weights"):
        load_controlnet(tmp_path / "diff_control_sd15.safetensors", base_unet={"vae.weight": torch.zeros(1)})


def _control_lora_state(unet: UNetModel, controlnet: ControlNet, rank: int = 2):
    """Stability's layout: `lora_controlnet`, `.up`/`.down` for >=2-D U-Net twins, the rest whole or omitted."""
    base = unet.state_dict()
    gen = torch.Generator().manual_seed(3)
    stored, expected = {"lora_controlnet": torch.tensor([])}, {}
    for key, value in controlnet.state_dict().items():
        twin = unet_twin(key)
        if twin in base and value.ndim >= 2:
            module = key[: -len(".weight")]
            up = torch.randn(value.shape[0], rank, *([1] * (value.ndim - 2)), generator=gen) * 0.1
            down = torch.randn(rank, *value.shape[1:], generator=gen) * 0.1
            stored[module + ".up"], stored[module + ".down"] = up, down
            expected[key] = base[twin] + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
        elif twin in base and key.startswith("input_blocks.1."):
            expected[key] = base[twin]  # 1-D U-Net parameters may be left out: they come from the base
        else:
            stored[key] = expected[key] = value  # norms/biases stored whole; hint encoder, zero convs absolute
    return stored, expected


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_control_lora_rebuilds_low_rank_weights(tmp_path, name: str) -> None:
    unet, controlnet = _pair(name)
    stored, expected = _control_lora_state(unet, controlnet)
    path = tmp_path / "control-lora-canny-rank2.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, path)
    loaded = load_controlnet(path, base_unet=unet)
    assert loaded.format is CheckpointFormat.CONTROL_LORA and loaded.config.signature() == unet.config.signature()
    assert loaded.config.num_heads == unet.config.num_heads  # heads from the base model's config
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_control_lora_with_a_lost_factor(tmp_path) -> None:
    unet, controlnet = _pair("tiny")
    stored, _ = _control_lora_state(unet, controlnet)
    lost = next(k for k in stored if k.endswith(".down"))
    del stored[lost]
    save_file({k: v.contiguous() for k, v in stored.items()}, tmp_path / "control-lora-broken.safetensors")
    with pytest.raises(KeyError, match=lost[: -len(".down")]) as info:
        load_controlnet(tmp_path / "control-lora-broken.safetensors", base_unet=unet)
    assert "control-lora-broken.safetensors" in str(info.value)


def test_a_plain_file_ignores_the_base(tmp_path) -> None:
    unet, controlnet = _pair("tiny")
    path = save_controlnet(controlnet, tmp_path / "plain.safetensors")
    loaded = load_controlnet(path, base_unet=unet)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), controlnet.state_dict().values()))
