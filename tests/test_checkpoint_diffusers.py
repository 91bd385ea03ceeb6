"""diffusers layouts without the diffusers package: the 1:1 rename table both ways, folders, variants, shards,
single files without config.json (diffusers ControlNetModel.from_single_file)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model import ControlNet, preset
from zeroconv.controlnet_model.checkpoint import (CheckpointFormat, apply_rules, diffusers_layout, export_diffusers,
                                                  invert, layout_of, ldm_diffusers_rules, load_controlnet)

from .conftest import randomize
from .test_checkpoint import assert_same_function, assert_same_weights

SDXL_TINY = {"extra": {"addition_time_embed_dim": 4}}  # ADM 40 = pooled text 16 + 6 x 4
VARIANTS = {  # tiny stand-ins for each family and the SDXL mid / small ControlNets
    "sd1": ("tiny", {}), "sd2": ("tiny-sd2", {}), "sdxl": ("tiny-sdxl", SDXL_TINY),
    "sdxl-mid": ("tiny-sdxl", dict(transformer_depth=(None, 0, 1), transformer_depth_middle=1, **SDXL_TINY)),
    "sdxl-small": ("tiny-sdxl", dict(transformer_depth=(None, None, None), transformer_depth_middle=0, **SDXL_TINY)),
}


def variant(name: str, seed: int = 4) -> ControlNet:
    base, overrides = VARIANTS[name]
    return randomize(ControlNet(preset(base, **overrides)), seed=seed).eval()


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sdxl-mid", "sdxl-small", "tiny", "tiny-sd2", "tiny-sdxl"])
def test_rename_table_is_one_to_one_and_inverts(name: str) -> None:
    with torch.device("meta"):
        state = ControlNet(preset(name)).state_dict()
    rules = ldm_diffusers_rules(layout_of(preset(name)))
    converted, unmatched = apply_rules(state, rules)
    assert not unmatched and len(converted) == len(state)
    assert all(k.startswith(("controlnet_", "conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"))
               for k in converted)
    assert diffusers_layout(converted) == layout_of(preset(name))
    back, unmatched = apply_rules(converted, invert(rules))
    assert not unmatched and back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def test_full_size_key_names_match_diffusers_vocabulary() -> None:
    """Spot checks against the documented diffusers names (formats §2.3)."""
    with torch.device("meta"):
        state = ControlNet(preset("sd15")).state_dict()
    converted, _ = apply_rules(state, ldm_diffusers_rules(layout_of(preset("sd15"))))
    for key in ("controlnet_cond_embedding.blocks.5.weight", "controlnet_cond_embedding.conv_out.bias",
                "down_blocks.1.resnets.0.conv_shortcut.weight", "down_blocks.2.downsamplers.0.conv.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight", "mid_block.resnets.1.norm2.bias",
                "controlnet_down_blocks.11.weight", "controlnet_mid_block.bias", "time_embedding.linear_2.weight"):
        assert key in converted, key
    assert converted["down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (640, 320, 1, 1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_diffusers_folder_round_trips_exactly(tmp_path, name: str) -> None:
    model = variant(name)
    folder = export_diffusers(model, tmp_path / "cn")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"
    loaded = load_controlnet(folder)
    assert loaded.format is CheckpointFormat.DIFFUSERS
    assert loaded.config.num_heads == model.config.num_heads
    assert loaded.config.num_head_channels == model.config.num_head_channels
    assert_same_weights(loaded.model, dict(model.state_dict()))
    assert_same_function(loaded.model, model)


def test_single_file_without_config_and_fp16_variant(tmp_path) -> None:
    """A lone diffusers-named file (e.g. diffusers_xl_canny_full.safetensors): shapes decide the architecture."""
    model = variant("sd1")
    folder = export_diffusers(model, tmp_path / "export", dtype=torch.float16)
    single = tmp_path / "diffusers_sd15_canny.safetensors"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text('{"attention_head_dim": 1}')  # unrelated: not read for a lone file
    loaded = load_controlnet(single)
    assert loaded.format is CheckpointFormat.DIFFUSERS and loaded.model.dtype == torch.float16
    assert loaded.config.signature() == model.config.signature() and loaded.metadata.control_type == "canny"
    assert_same_weights(loaded.model, {k: v.half() for k, v in model.state_dict().items()})
    variant_folder = tmp_path / "variant"
    variant_folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").rename(variant_folder / "diffusion_pytorch_model.fp16.safetensors")
    (folder / "config.json").rename(variant_folder / "config.json")
    assert load_controlnet(variant_folder, dtype=torch.float32).config.num_heads == model.config.num_heads


def test_sharded_and_bin_folders(tmp_path) -> None:
    model = variant("sd2")
    folder = export_diffusers(model, tmp_path / "cn")
    from safetensors.torch import load_file

    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(load_controlnet(folder).model, dict(model.state_dict()))
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save(state, bin_folder / "diffusion_pytorch_model.bin")
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    assert_same_weights(load_controlnet(bin_folder).model, dict(model.state_dict()))


def test_bgr_hint_order_is_folded_into_the_first_conv(tmp_path) -> None:
    model = variant("sd1")
    folder = export_diffusers(model, tmp_path / "cn")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "controlnet_conditioning_channel_order": "bgr"}))
    loaded = load_controlnet(folder)
    flipped = model.state_dict()["input_hint_block.0.weight"].flip(1)
    assert torch.equal(loaded.model.state_dict()["input_hint_block.0.weight"], flipped)


def test_shuffle_pooling_from_config_json(tmp_path) -> None:
    folder = export_diffusers(ControlNet(preset("tiny", global_average_pooling=True)), tmp_path / "shuffle")
    assert json.loads((folder / "config.json").read_text())["global_pool_conditions"] is True
    assert load_controlnet(folder).config.global_average_pooling


def test_diffusers_file_with_stray_keys_is_refused(tmp_path) -> None:
    folder = export_diffusers(variant("sd1"), tmp_path / "cn")
    from safetensors.torch import load_file

    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_file({**state, "down_blocks.0.extra_adapter.weight": torch.zeros(1)},
              folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(KeyError, match="extra_adapter") as info:
        load_controlnet(folder)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_controlnet(folder)
