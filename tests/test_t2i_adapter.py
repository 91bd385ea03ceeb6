"""T2I-Adapters: diffusers parity, TencentARC's original layout, placement as ComfyUI's, the input-block seam,
strength / mask / step range, the once-per-size cache, and composition with ControlNets in one pass."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model import ControlSettings, ControlUnit, preset, run_control
from zeroconv.controlnet_model.checkpoint import load_control, load_controlnet, load_t2i_adapter
from zeroconv.controlnet_model.residuals import (AdapterUnit, Residuals, compute_residuals, ldm_unet_forward,
                                                 run_adapter)
from zeroconv.controlnet_model.t2i_adapter import (AdapterConfig, AdapterKind, T2IAdapter, adapter_hint_size,
                                                   placement)

from .conftest import randomize

diffusers = pytest.importorskip("diffusers", reason="the T2I-Adapter parity tests need the test extra")

TINY = {  # diffusers T2IAdapter arguments: kind -> kwargs
    "full": dict(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
    "full_grey": dict(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=8,
                      adapter_type="full_adapter"),
    "light": dict(in_channels=3, channels=[32, 64, 64], num_res_blocks=4, downscale_factor=8,
                  adapter_type="light_adapter"),
    "xl": dict(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=16,
               adapter_type="full_adapter_xl"),
}


def _theirs(name: str, seed: int = 2):
    torch.manual_seed(seed)
    return randomize(diffusers.T2IAdapter(**TINY[name]), seed).eval()


def _features_rel(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    assert [m.shape for m in mine] == [t.shape for t in theirs]
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(mine, theirs))


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_folder_gives_diffusers_features(name: str, tmp_path) -> None:
    theirs = _theirs(name)
    theirs.save_pretrained(tmp_path / name)
    loaded = load_t2i_adapter(tmp_path / name)
    assert loaded.layout == "diffusers" and loaded.config.kind.value == TINY[name]["adapter_type"]
    image = torch.rand(2, 3, 128, 64, generator=torch.Generator().manual_seed(0))  # even sides at every level:
    # diffusers pools odd sides with ceil_mode, TencentARC and ComfyUI zero-pad them (t2i_adapter._pool)
    theirs_in = image.mean(1, keepdim=True) if TINY[name]["in_channels"] == 1 else image  # core's grey mean
    with torch.no_grad():
        assert _features_rel(loaded.model(image), theirs(theirs_in)) < 1e-4


def test_lone_diffusers_file_without_config_is_sized_from_the_tensors(tmp_path) -> None:
    theirs = _theirs("xl")
    theirs.save_pretrained(tmp_path / "repo")
    lone = tmp_path / "t2i-adapter-canny-sdxl.safetensors"
    lone.write_bytes((tmp_path / "repo" / "diffusion_pytorch_model.safetensors").read_bytes())
    loaded = load_control(lone)
    assert loaded.config.kind is AdapterKind.FULL_XL and loaded.config.channels == (32, 64, 64, 64)


def _original_full(state: dict[str, torch.Tensor], per: int = 2) -> dict[str, torch.Tensor]:
    """TencentARC's names for a diffusers full adapter, written by hand (ComfyUI load_t2i_adapter's renames)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        assert parts[0] == "adapter"
        if parts[1] == "conv_in":
            out[".".join(parts[1:])] = value
        elif parts[3] == "in_conv":
            out[f"body.{int(parts[2]) * per}.in_conv.{parts[4]}"] = value
        else:  # adapter.body.i.resnets.j.blockN.weight
            out[f"body.{int(parts[2]) * per + int(parts[4])}.{parts[5]}.{parts[6]}"] = value
    return out


def _original_light(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[3] == "resnets":
            out[f"body.{parts[2]}.body.{parts[4]}.{parts[5]}.{parts[6]}"] = value
        else:
            out[".".join(parts[1:])] = value
    return out


@pytest.mark.parametrize("name", ["full_grey", "light"])
def test_original_layout_pth_and_safetensors_load_to_the_diffusers_weights(name: str, tmp_path) -> None:
    theirs = _theirs(name)
    theirs.save_pretrained(tmp_path / "diffusers")
    reference = load_t2i_adapter(tmp_path / "diffusers").model.state_dict()
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    original = _original_full(state) if name == "full_grey" else _original_light(state)
    torch.save({"adapter": original} if name == "light" else original, tmp_path / "t2iadapter.pth")
    save_file(original, tmp_path / "t2iadapter.safetensors")
    for file in ("t2iadapter.pth", "t2iadapter.safetensors"):
        loaded = load_t2i_adapter(tmp_path / file)
        assert loaded.layout == "original"
        assert loaded.model.state_dict().keys() == reference.keys()
        assert all(torch.equal(loaded.model.state_dict()[k], reference[k]) for k in reference), file


def test_style_adapter_and_controlnet_loader_refusals(tmp_path) -> None:
    style = {"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8), "ln_pre.weight": torch.ones(16),
             "transformer_layes.0.attn.in_proj_weight": torch.zeros(48, 16)}
    save_file(style, tmp_path / "t2iadapter_style_sd14v1.safetensors")
    with pytest.raises(ValueError, match="style adapter.*StyleModelLoader"):
        load_t2i_adapter(tmp_path / "t2iadapter_style_sd14v1.safetensors")
    _theirs("full").save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="is a T2I-Adapter, not a ControlNet"):
        load_controlnet(tmp_path / "adapter")


def test_placement_is_comfyuis_for_sd15_and_sdxl() -> None:
    """comfy/t2i_adapter/adapter.py Adapter.forward: SD1 features after input blocks 2, 5, 8, 11; XL 3, 5, 8 and
    the middle (its reversed 'input' list popped from the end by openaimodel apply_control)."""
    assert placement(AdapterConfig(AdapterKind.FULL)) == [2, 5, 8, 11]
    assert placement(AdapterConfig(AdapterKind.LIGHT, num_res_blocks=4)) == [2, 5, 8, 11]
    assert placement(AdapterConfig(AdapterKind.FULL_XL)) == [3, 5, 8, None]
    with pytest.raises(ValueError, match="another model family"):
        placement(AdapterConfig(AdapterKind.FULL_XL), preset("sd15"))


# ---- on a U-Net ----------------------------------------------------------------------------------------
def _adapter(seed: int = 5) -> T2IAdapter:
    return randomize(T2IAdapter(AdapterConfig(AdapterKind.FULL, channels=(32, 64), num_res_blocks=2)), seed).eval()


def test_features_enter_after_the_right_input_blocks(tiny_unet, tiny_inputs) -> None:
    """tiny U-Net blocks: 0 conv_in (32), 1 res (32), 2 down (32, /2), 3 res (64, /2): features go after 1 and 3.
    Hand computation: forward hooks add the features to those blocks' outputs in an unpatched forward."""
    adapter = _adapter()
    unit = AdapterUnit(adapter, tiny_inputs["hint"], unet_config=tiny_unet.config)
    x, t, context = tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"]
    out = run_adapter(unit, x, 0.5)
    assert [i for i, f in enumerate(out.input) if f is not None] == [1, 3] and out.mid is None
    with torch.no_grad():
        features = adapter(tiny_inputs["hint"])
        handles = [tiny_unet.input_blocks[i].register_forward_hook(lambda m, a, o, f=f: o + f)
                   for i, f in zip((1, 3), features)]
        by_hand = tiny_unet(x, t, context)
        for h in handles:
            h.remove()
        seam = ldm_unet_forward(tiny_unet, x, t, context, None, out)
        host = tiny_unet(x, t, context, control={"input": list(reversed(out.input))})  # ComfyUI's dict
        plain = tiny_unet(x, t, context)
    torch.testing.assert_close(seam, by_hand)
    torch.testing.assert_close(host, by_hand)
    assert (seam - plain).abs().max() > 1e-4


def test_strength_mask_step_range_and_cond_rows(tiny_unet, tiny_inputs) -> None:
    x = tiny_inputs["x"]
    adapter = _adapter()
    base = run_adapter(AdapterUnit(adapter, tiny_inputs["hint"], unet_config=tiny_unet.config), x, 0.5)
    half = run_adapter(AdapterUnit(adapter, tiny_inputs["hint"], ControlSettings(strength=0.5),
                                   unet_config=tiny_unet.config), x, 0.5)
    for a, b in zip(base.all, half.all):
        torch.testing.assert_close(b, a * 0.5)
    zero = AdapterUnit(adapter, tiny_inputs["hint"], ControlSettings(strength=0.0), unet_config=tiny_unet.config)
    assert run_adapter(zero, x, 0.5) is None and zero.cache.runs == 0  # not even run
    ranged = AdapterUnit(adapter, tiny_inputs["hint"], ControlSettings(start_percent=0.2, end_percent=0.6),
                         unet_config=tiny_unet.config)
    assert run_adapter(ranged, x, 0.1) is None and run_adapter(ranged, x, 0.7) is None
    assert run_adapter(ranged, x, 0.4) is not None
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    masked = run_adapter(AdapterUnit(adapter, tiny_inputs["hint"], ControlSettings(mask=mask),
                                     unet_config=tiny_unet.config), x, 0.5)
    for a, m in zip(base.all, masked.all):
        w = a.shape[-1]
        torch.testing.assert_close(m[..., : w // 2], a[..., : w // 2])
        assert m[..., w // 2 + 1:].abs().max() == 0
    cond_only = AdapterUnit(adapter, tiny_inputs["hint"], ControlSettings(mode="controlnet_more_important"),
                            unet_config=tiny_unet.config)
    rows = run_adapter(cond_only, x, 0.5, cond_rows=torch.tensor([True, False]))
    assert all(r[1].abs().max() == 0 and r[0].abs().max() > 0 for r in rows.all)


def test_runs_once_per_latent_size(tiny_unet, tiny_inputs) -> None:
    unit = AdapterUnit(_adapter(), torch.rand(1, 3, 70, 50), unet_config=tiny_unet.config)  # any size: fitted
    for _ in range(3):
        out = run_adapter(unit, tiny_inputs["x"], 0.5)
    assert unit.cache.runs == 1 and out.input[1].shape[-2:] == tiny_inputs["x"].shape[-2:]
    odd = torch.randn(2, 4, 5, 7)  # odd sides: pooled as TencentARC / ComfyUI, matching the U-Net's ceil(h / 2)
    out = run_adapter(unit, odd, 0.5)
    assert unit.cache.runs == 2 and out.input[3].shape[-2:] == (3, 4)
    assert adapter_hint_size(unit.adapter, (5, 7)) == (40, 56)
    with torch.no_grad():  # the U-Net's own stride-2 conv gives the same size
        assert tiny_unet.input_blocks[2](torch.randn(1, 32, 5, 7), None).shape[-2:] == (3, 4)


def test_adapter_and_controlnet_compose_in_one_pass(tiny_unet, tiny_controlnet, tiny_inputs) -> None:
    x, t, context, hint = tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"], tiny_inputs["hint"]
    control = ControlUnit(tiny_controlnet, hint, ControlSettings(strength=0.8))
    adapter = AdapterUnit(_adapter(), hint, ControlSettings(strength=0.6), unet_config=tiny_unet.config)
    with torch.no_grad():
        total = compute_residuals([control, adapter], x, t, context, percent=0.5, unet_config=tiny_unet.config)
        alone_c = run_control(control, x, t, context, None, 0.5)
        alone_a = run_adapter(adapter, x, 0.5)
        both = ldm_unet_forward(tiny_unet, x, t, context, None, total)
        by_parts = ldm_unet_forward(tiny_unet, x, t, context, None, Residuals(alone_c, alone_a))
    assert isinstance(total, Residuals)
    for a, b in zip(total.control.all, alone_c.all):
        torch.testing.assert_close(a, b)
    for a, b in zip(total.adapter.all, alone_a.all):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(both, by_parts)
    two = compute_residuals([adapter, adapter], x, t, context, percent=0.5)
    for a, b in zip(two.adapter.all, alone_a.all):
        torch.testing.assert_close(a, 2 * b)
