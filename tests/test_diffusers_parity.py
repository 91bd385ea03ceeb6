"""Parity with an independent implementation: diffusers' ControlNetModel, both directions (test extra).

The diffusers models are built from diffusers' own arguments (not from our translation), saved by diffusers'
own writer, loaded by ZeroConv, and run on the same inputs; our export is loaded back by from_pretrained.
"""
from __future__ import annotations

import pytest
import torch

from zeroconv.controlnet_model import ControlNet, preset
from zeroconv.controlnet_model.blocks import timestep_embedding
from zeroconv.controlnet_model.checkpoint import CheckpointFormat, export_diffusers, load_controlnet

from .conftest import randomize

diffusers = pytest.importorskip("diffusers", reason="the diffusers parity tests need the test extra")

TIME_DIM = 4  # tiny SDXL-shaped: ADM 40 = pooled text 16 + 6 size/crop sinusoids of 4
TOLERANCE = 1e-4  # max relative difference of any residual, fp32
_COMMON = dict(in_channels=4, conditioning_channels=3, layers_per_block=1, norm_num_groups=32,
               conditioning_embedding_out_channels=(16, 16, 32, 32))
_SDXL = dict(_COMMON, block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=(2, 4, 4),
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
             projection_class_embeddings_input_dim=40)
# diffusers arguments for tiny SD1.x-, SD2.x- and SDXL-shaped ControlNets (full / mid / small), and the
# ZeroConv preset (with overrides) each must equal.
FAMILIES = {
    "sd1": (dict(_COMMON, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")), "tiny", {}),
    "sd2": (dict(_COMMON, block_out_channels=(32, 64), cross_attention_dim=48, attention_head_dim=(2, 4),
                 use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")),
            "tiny-sd2", {}),
    "sdxl": (dict(_SDXL, transformer_layers_per_block=(0, 1, 2),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")), "tiny-sdxl", {}),
    "sdxl-mid": (dict(_SDXL, transformer_layers_per_block=(0, 0, 1),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")),
                 "tiny-sdxl", dict(transformer_depth=(None, 0, 1), transformer_depth_middle=1)),
    "sdxl-small": (dict(_SDXL, transformer_layers_per_block=(0, 0, 0),
                        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D")),
                   "tiny-sdxl", dict(transformer_depth=(None, None, None), transformer_depth_middle=0)),
}


def _theirs(family: str, seed: int = 11):
    torch.manual_seed(seed)
    return randomize(diffusers.ControlNetModel(**FAMILIES[family][0]), seed).eval()


def _ours(family: str, seed: int = 4) -> ControlNet:
    _, name, overrides = FAMILIES[family]
    extra = {"extra": {"addition_time_embed_dim": TIME_DIM}} if "sdxl" in family else {}
    return randomize(ControlNet(preset(name, **overrides, **extra)), seed).eval()


def _inputs(family: str, seed: int = 0):
    context_dim = FAMILIES[family][0]["cross_attention_dim"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([17, 650])
    context = torch.randn(2, 7, context_dim, generator=gen)
    hint = torch.rand(2, 3, 64, 64, generator=gen)
    added = None
    if "sdxl" in family:
        text = torch.randn(2, 40 - 6 * TIME_DIM, generator=gen)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 4, 2, 64, 64]])
        added = {"text_embeds": text, "time_ids": time_ids}
    return x, t, context, hint, added


def _sdxl_y(added) -> torch.Tensor | None:
    """SDXL's ADM vector: pooled text, then the sinusoidal embedding of each of the 6 size/crop numbers."""
    if added is None:
        return None
    ids = timestep_embedding(added["time_ids"].flatten(), TIME_DIM).reshape(added["time_ids"].shape[0], -1)
    return torch.cat([added["text_embeds"], ids], dim=-1)


def max_rel_diff(ours: ControlNet, theirs, family: str, seed: int = 0) -> float:
    """Largest relative difference over all residuals for the same inputs."""
    x, t, context, hint, added = _inputs(family, seed)
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False, added_cond_kwargs=added)
        mine = ours(x, hint, t, context, _sdxl_y(added))
    assert len(mine.all) == len(down) + 1
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(mine.all, (*down, mid)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_folder_loads_to_the_same_residuals(family: str, tmp_path) -> None:
    theirs = _theirs(family)
    theirs.save_pretrained(tmp_path / "cn")
    loaded = load_controlnet(tmp_path / "cn")
    assert loaded.format is CheckpointFormat.DIFFUSERS
    _, name, overrides = FAMILIES[family]
    assert loaded.config.signature() == preset(name, **overrides).signature()
    assert max_rel_diff(loaded.model, theirs, family) < TOLERANCE


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_our_export_loads_in_diffusers(family: str, tmp_path) -> None:
    ours = _ours(family)
    export_diffusers(ours, tmp_path / "export")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "export").eval()
    assert max_rel_diff(ours, theirs, family, seed=2) < TOLERANCE
    back = load_controlnet(tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(), ours.state_dict().values()))


def test_diffusers_writer_variants(tmp_path) -> None:
    """What diffusers' own writer makes: fp16 variant files, legacy .bin, shards, pooled (shuffle) configs."""
    theirs = _theirs("sd2")
    theirs.save_pretrained(tmp_path / "fp16", variant="fp16")
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    theirs.save_pretrained(tmp_path / "shards", max_shard_size="200KB")
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for folder in ("fp16", "bin", "shards"):
        loaded = load_controlnet(tmp_path / folder)
        assert max_rel_diff(loaded.model, theirs, "sd2") < TOLERANCE, folder
    pooled = diffusers.ControlNetModel(**FAMILIES["sd1"][0], global_pool_conditions=True)
    pooled.save_pretrained(tmp_path / "shuffle")
    assert load_controlnet(tmp_path / "shuffle").config.global_average_pooling
