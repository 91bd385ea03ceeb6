"""Flux and SD3 ControlNets through our nodes, with stand-in MODELs (no ComfyUI): the family check before the first
step, the VAE a latent format needs, union modes by Flux's names, and the control dict our control object returns
(token-space residuals equal to the library's, with guidance, step range and token mask)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model.config import preset
from zeroconv.controlnet_model.dit_checkpoint import load_dit_controlnet
from zeroconv.controlnet_model.dit_control import DiTControlUnit, latent_hint, run_dit_control
from zeroconv.controlnet_model.network import ControlNet
from zeroconv.controlnet_model.residuals import ControlSettings
from zeroconv.nodes.apply import ZeroConvApplyControlNet
from zeroconv.nodes.compose import ZeroConvComposeControlNets, ZeroConvControlUnit
from zeroconv.nodes.host.control import ControlPart, make_control
from zeroconv.nodes.loaders import ZeroConvLoadControlNet

from .conftest import randomize
from .test_adapter_standins import one_thread  # noqa: F401 (autouse fixture)
from .test_dit_controlnet import FLUX, SD3 as SD3_KW, flux_layout_keys

diffusers = pytest.importorskip("diffusers", reason="the InstantX / SD3 files are written by diffusers")
B, H, W, T = 1, 8, 6, 5


class FlowSampling:
    """Flux's model sampling: timestep = sigma, input unscaled, sigma from 1 to 0 over progress."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def percent_to_sigma(self, percent: float) -> float:
        return 1.0 - percent


class Flux(SimpleNamespace):
    """Stands for comfy.model_base.Flux (the family is read from the class name)."""


class SD3(SimpleNamespace):
    """Stands for comfy.model_base.SD3."""


SDXL_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2], "context_dim": 2048,
             "transformer_depth": [0, 0, 2, 2, 10, 10], "in_channels": 4, "adm_in_channels": 2816}


def sdxl_model() -> SimpleNamespace:
    return SimpleNamespace(model_sampling=FlowSampling(), model_config=SimpleNamespace(unet_config=SDXL_UNET),
                           latent_format=SimpleNamespace(latent_channels=4))


class StandInVAE:
    """encode: IMAGE (B, H, W, C) -> a fixed pooling to 16 latent channels at 1/8."""

    calls = 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        StandInVAE.calls += 1
        return torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16]


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """Tiny Flux XLabs, InstantX Union (7 modes) and SD3 files in the ControlNet folder."""
    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=gen).mul(0.05) for k, s in flux_layout_keys(1, 0, False).items()},
              tmp_path / "xlabs.safetensors")
    torch.manual_seed(0)
    union = randomize(diffusers.FluxControlNetModel(**FLUX, num_layers=1, num_single_layers=1, guidance_embeds=True,
                                                    num_mode=7), seed=1)
    save_file({k: v.contiguous() for k, v in union.state_dict().items()}, tmp_path / "union.safetensors")
    sd3 = randomize(diffusers.SD3ControlNetModel(**SD3_KW), seed=2)
    save_file({k: v.contiguous() for k, v in sd3.state_dict().items()}, tmp_path / "sd3.safetensors")
    return tmp_path


def load(name: str):
    return ZeroConvLoadControlNet().load(name)[0]


def conds(width: int = 24) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    extra = {"y": torch.randn(1, 20, generator=gen), "guidance": torch.tensor([3.5])}
    return ([[torch.randn(1, T, width, generator=gen), dict(extra)]],
            [[torch.randn(1, T, width, generator=gen), dict(extra)]])


def image() -> torch.Tensor:
    return torch.rand(1, 8 * H, 8 * W, 3, generator=torch.Generator().manual_seed(3))


def apply(control_net, vae=None, union_type: str = "auto", **kw):
    positive, negative = conds()
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0)
    args.update(kw)
    return ZeroConvApplyControlNet().apply(positive, negative, control_net, image(), vae=vae, union_type=union_type,
                                           **args)


def control_of(conditioning: list):
    return conditioning[0][1]["control"]


# ---- refusals -----------------------------------------------------------------------------------------------
def test_flux_controlnet_on_sdxl_model_is_refused_before_the_first_step(files) -> None:
    positive, _ = apply(load("xlabs.safetensors"))
    with pytest.raises(ValueError, match=r"xlabs.safetensors is a Flux.1 ControlNet but the sampled model is SDXL"):
        control_of(positive).pre_run(sdxl_model(), FlowSampling().percent_to_sigma)


def test_sd_controlnet_on_flux_and_sd3_controlnet_on_flux_are_refused(files) -> None:
    sd = make_control((ControlPart(ControlNet(preset("tiny")), name="sd15_canny.safetensors"),))
    with pytest.raises(ValueError, match=r"sd15_canny.safetensors is a tiny SD1.x-shaped ControlNet but the sampled "
                                         r"model is Flux.1"):
        sd.pre_run(Flux(model_sampling=FlowSampling()), FlowSampling().percent_to_sigma)
    positive, _ = apply(load("sd3.safetensors"), vae=StandInVAE())
    with pytest.raises(ValueError, match=r"sd3.safetensors is a SD3 / SD3.5 ControlNet but the sampled model is Flux"):
        control_of(positive).pre_run(Flux(model_sampling=FlowSampling()), FlowSampling().percent_to_sigma)


def test_latent_format_without_vae_names_the_vae_input(files) -> None:
    with pytest.raises(ValueError, match=r"^vae: union.safetensors \(flux_instantx\) .* connect the model's VAE"):
        apply(load("union.safetensors"))
    with pytest.raises(ValueError, match=r"^vae: sd3.safetensors"):
        ZeroConvControlUnit().add(load("sd3.safetensors"), image(), 1.0, 0.0, 1.0)
    apply(load("xlabs.safetensors"))  # pixel formats need none


def test_bad_union_mode_lists_the_files_modes(files) -> None:
    with pytest.raises(ValueError, match=r"^union_type: union mode 'openpose' .* valid for this file: auto, canny, "
                                         r"tile, depth, blur, pose, gray, low quality"):
        apply(load("union.safetensors"), vae=StandInVAE(), union_type="openpose")
    with pytest.raises(ValueError, match=r"^union_type: .*xlabs.safetensors has no union modes"):
        apply(load("xlabs.safetensors"), union_type="canny")
    with pytest.raises(ValueError, match=r"^union_type: sd3.safetensors .* no union modes"):
        apply(load("sd3.safetensors"), vae=StandInVAE(), union_type="depth")


# ---- what the control object returns ----------------------------------------------------------------------
def _call(control, model, x, sigma: float, positive: list) -> dict | None:
    context, options = positive[0]
    control.pre_run(model, FlowSampling().percent_to_sigma)
    cond = {"c_crossattn": context, "y": options["y"], "guidance": options["guidance"]}
    return control.get_control(x, torch.tensor([sigma]), cond, 1, {"cond_or_uncond": [0]})


def test_union_residuals_equal_the_library_with_vae_guidance_mode_and_token_mask(files) -> None:
    mask = torch.zeros(1, 8 * H, 8 * W)
    mask[:, :, : 8 * W // 3] = 1.0  # the first of 3 token columns
    StandInVAE.calls = 0
    positive, _ = apply(load("union.safetensors"), vae=StandInVAE(), union_type="depth", strength=0.6, mask=mask)
    x = torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(5))
    control = control_of(positive)
    out = _call(control, Flux(model_sampling=FlowSampling()), x, 0.7, positive)
    again = control.get_control(x, torch.tensor([0.4]), {"c_crossattn": positive[0][0], **positive[0][1]}, 1, {})
    assert StandInVAE.calls == 1 and again is not None  # the hint is encoded once per run and shape
    assert len(out["input"]) == 19 and len(out["output"]) == 38 and out["middle"] == []

    loaded = load_dit_controlnet(files / "union.safetensors")
    hint = latent_hint("flux_instantx", StandInVAE().encode(image()), channels=16)
    unit = DiTControlUnit(loaded.model, "flux_instantx", hint, 2, ControlSettings(0.6, mask=mask))
    context, options = positive[0]
    with torch.no_grad():
        want = run_dit_control(unit, x, torch.tensor([0.7]), context, options["y"], options["guidance"])
    for got, ref in zip(out["input"] + out["output"], want.input + want.output):
        assert torch.allclose(got, ref, atol=1e-6)
    tokens = out["input"][0].reshape(1, H // 2, W // 2, -1)
    assert tokens[:, :, 1:].abs().max() == 0 and tokens[:, :, :1].abs().max() > 0  # the token mask


def test_step_range_gates_and_units_compose_in_one_pass(files) -> None:
    cn = load("xlabs.safetensors")
    positive, _ = apply(cn, start_percent=0.5)
    x = torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(5))
    assert _call(control_of(positive), Flux(model_sampling=FlowSampling()), x, 0.9, positive) is None  # before 0.5
    single = _call(control_of(positive), Flux(model_sampling=FlowSampling()), x, 0.3, positive)

    first = ZeroConvControlUnit().add(cn, image(), 1.0, 0.5, 1.0)[0]
    stack = ZeroConvControlUnit().add(load("union.safetensors"), image(), 0.5, 0.0, 1.0, stack=first,
                                      vae=StandInVAE(), union_type="canny")[0]
    composed = ZeroConvComposeControlNets().compose(stack)[0]
    positive, _ = apply(composed)
    both = _call(control_of(positive), Flux(model_sampling=FlowSampling()), x, 0.3, positive)
    union = make_control((stack[1],))
    alone = _call(union, Flux(model_sampling=FlowSampling()), x, 0.3, positive)
    for i in range(19):
        assert torch.allclose(both["input"][i], single["input"][i] + alone["input"][i], atol=1e-6)


def test_non_balanced_control_mode_is_refused_for_transformer_controlnets(files) -> None:
    with pytest.raises(ValueError, match=r"^control_mode: 'prompt_more_important' .* use 'balanced' with xlabs"):
        apply(load("xlabs.safetensors"), control_mode="prompt_more_important")
