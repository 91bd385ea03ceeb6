"""Parity with an independent implementation: diffusers' ControlNetModel, both directions (test extra)."""
from __future__ import annotations

import pytest
import torch

from zeroconv.controlnet_model import ControlNet, preset
from zeroconv.controlnet_model.blocks import timestep_embedding
from zeroconv.controlnet_model.checkpoint import CheckpointFormat, export_diffusers, load_controlnet
from zeroconv.controlnet_model.diffusers_format import diffusers_config

from .conftest import randomize

diffusers = pytest.importorskip("diffusers", reason="the diffusers parity tests need the test extra")
TIME_DIM = 4  # tiny SDXL-shaped: ADM 40 = pooled text 16 + 6 x 4


def _diffusers_model(name: str, seed: int):
    config = diffusers_config(preset(name))
    config.pop("_class_name")
    torch.manual_seed(seed)
    return randomize(diffusers.ControlNetModel(**config), seed).eval()


def _inputs(name: str, seed: int = 0):
    cfg = preset(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([17, 650])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    hint = torch.rand(2, 3, 64, 64, generator=gen)
    added = None
    if cfg.adm_in_channels:
        text = torch.randn(2, cfg.adm_in_channels - 6 * TIME_DIM, generator=gen)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 4, 2, 64, 64]])
        added = {"text_embeds": text, "time_ids": time_ids}
    return x, t, context, hint, added


def _sdxl_y(added) -> torch.Tensor | None:
    """SDXL's ADM vector: pooled text, then the sinusoidal embedding of each of the 6 size/crop numbers."""
    if added is None:
        return None
    ids = timestep_embedding(added["time_ids"].flatten(), TIME_DIM).reshape(added["time_ids"].shape[0], -1)
    return torch.cat([added["text_embeds"], ids], dim=-1)


def _max_rel(ours, theirs) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_diffusers_folder_loads_to_the_same_residuals(name: str, tmp_path) -> None:
    model = _diffusers_model(name, seed=11)
    model.save_pretrained(tmp_path / "cn")
    loaded = load_controlnet(tmp_path / "cn")
    assert loaded.format is CheckpointFormat.DIFFUSERS
    x, t, context, hint, added = _inputs(name)
    with torch.no_grad():
        down, mid = model(x, t, context, hint, return_dict=False, added_cond_kwargs=added)
        ours = loaded.model(x, hint, t, context, _sdxl_y(added))
    assert _max_rel(ours.all, (*down, mid)) < 1e-4


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_our_export_loads_in_diffusers(name: str, tmp_path) -> None:
    ours = randomize(ControlNet(preset(name)), seed=4).eval()
    export_diffusers(ours, tmp_path / "export")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "export").eval()
    x, t, context, hint, added = _inputs(name, seed=2)
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False, added_cond_kwargs=added)
        mine = ours(x, hint, t, context, _sdxl_y(added))
    assert _max_rel(mine.all, (*down, mid)) < 1e-4
    back = load_controlnet(tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(), ours.state_dict().values()))
