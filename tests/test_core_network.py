"""The network of the paper: zero-initialised ControlNets leave the U-Net unchanged; full-size shapes are exact."""
from __future__ import annotations

import pytest
import torch

from zeroconv.controlnet_model import ControlNet, UNetModel, init_from_unet, preset
from zeroconv.controlnet_model.config import ControlNetConfig, check_compatible

from .conftest import TINY_PRESETS, make_inputs, make_unet

# Parameter counts of the reference implementations (measured on diffusers ControlNetModel and the paper's cldm).
REFERENCE_PARAMS = {
    "sd15": 361_279_120,
    "sd21": 364_228_240,
    "sdxl": 1_251_014_160,
    "sdxl-mid": 272_586_000,
    "sdxl-small": 160_111_120,
}
REFERENCE_TENSORS = {"sd15": 340, "sd21": 340, "sdxl": 844, "sdxl-mid": 224, "sdxl-small": 140}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_full_size_parameter_counts_match_reference(name: str) -> None:
    with torch.device("meta"):
        model = ControlNet(preset(name))
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]
    assert len(model.state_dict()) == REFERENCE_TENSORS[name]


def test_sd15_unet_is_the_859m_parameter_model() -> None:
    with torch.device("meta"):
        unet = UNetModel(preset("sd15"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


@pytest.mark.parametrize("name,outputs", [("sd15", 13), ("sd21", 13), ("sdxl", 10), ("tiny", 5), ("tiny-sdxl", 7)])
def test_number_of_residuals(name: str, outputs: int) -> None:
    assert preset(name).num_outputs == outputs


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_fresh_controlnet_leaves_unet_bit_identical(name: str) -> None:
    """Eq. 3-4: with zero convolutions the controlled U-Net computes exactly what the locked one does."""
    unet = make_unet(name)
    controlnet, fresh = init_from_unet(unet)
    inputs = make_inputs(unet.config)
    with torch.no_grad():
        out = controlnet(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"], inputs["y"])
        plain = unet(inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"])
        controlled = unet(inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"], control=out)
    assert all(torch.count_nonzero(r) == 0 for r in out.all)
    assert plain.abs().sum() > 0
    assert torch.equal(plain, controlled)
    assert all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in fresh)


def test_init_from_unet_copies_encoder_weights(tiny_unet: UNetModel) -> None:
    controlnet, fresh = init_from_unet(tiny_unet)
    unet_state, control_state = tiny_unet.state_dict(), controlnet.state_dict()
    copied = [k for k in control_state if k not in fresh]
    assert copied and all(torch.equal(control_state[k], unet_state[k]) for k in copied)
    assert all(torch.count_nonzero(control_state[k]) == 0 for k in fresh if "zero_convs" in k or "middle_block_out" in k)
    assert torch.count_nonzero(control_state["input_hint_block.14.weight"]) == 0


def test_controlnet_of_another_family_is_refused_naming_both() -> None:
    sd1, sdxl = preset("sd15"), preset("sdxl")
    with pytest.raises(ValueError, match=r"SD1\.x.*SDXL"):
        check_compatible(sd1, sdxl)
    unet = make_unet("tiny-sdxl")
    controlnet, _ = init_from_unet(make_unet("tiny"))
    inputs = make_inputs(unet.config)
    with pytest.raises(ValueError, match="tiny SD1.x-shaped.*context"):
        controlnet(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"], inputs["y"])


def test_residuals_of_another_family_never_raise_a_raw_shape_error() -> None:
    sd1_net, _ = init_from_unet(make_unet("tiny"))
    sd2_unet = make_unet("tiny-sd2")
    inputs = make_inputs(preset("tiny"))
    with torch.no_grad():
        out = sd1_net(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"])
    other = make_unet("tiny-sdxl")
    other_inputs = make_inputs(other.config)
    with pytest.raises(ValueError, match="another model family"):
        other(other_inputs["x"], other_inputs["timesteps"], other_inputs["context"], other_inputs["y"], control=out)
    assert sd2_unet.config.family != sd1_net.config.family


def test_hint_of_wrong_size_is_a_clear_error(tiny_controlnet: ControlNet, tiny_inputs: dict) -> None:
    with pytest.raises(ValueError, match="8x the latent"):
        tiny_controlnet(tiny_inputs["x"], tiny_inputs["hint"][..., :32, :32], tiny_inputs["timesteps"],
                        tiny_inputs["context"])


def test_cached_hint_encoding_gives_the_same_residuals(tiny_controlnet: ControlNet, tiny_inputs: dict) -> None:
    x, hint, t, ctx = tiny_inputs["x"], tiny_inputs["hint"], tiny_inputs["timesteps"], tiny_inputs["context"]
    with torch.no_grad():
        direct = tiny_controlnet(x, hint, t, ctx)
        cached = tiny_controlnet(x, None, t, ctx, guided_hint=tiny_controlnet.encode_hint(hint))
    assert all(torch.equal(a, b) for a, b in zip(direct.all, cached.all))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="transformer_depth"):
        ControlNetConfig(family="x", channel_mult=(1, 2), transformer_depth=(1,))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("sd99")
    cfg = preset("sdxl")
    assert ControlNetConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_returns_a_contiguous_tensor(use_linear: bool) -> None:
    # A channels-last view here makes every following convolution reorder its input (issue 16); the speed
    # itself is guarded by bench/bench_comfyui_step.py, not by a timed test.
    from zeroconv.controlnet_model.blocks import SpatialTransformer

    block = SpatialTransformer(32, heads=2, dim_head=16, depth=1, context_dim=24, use_linear=use_linear).eval()
    torch.nn.init.normal_(block.proj_out.weight)
    with torch.no_grad():
        out = block(torch.randn(2, 32, 4, 6), torch.randn(2, 5, 24))
    assert out.shape == (2, 32, 4, 6) and out.is_contiguous()


def test_hint_from_a_host_image_is_encoded_in_the_standard_layout(tiny_controlnet: ControlNet) -> None:
    from zeroconv.controlnet_model.hint import image_to_hint

    hint = image_to_hint(torch.rand(2, 64, 64, 3))
    assert hint.is_contiguous()
    with torch.no_grad():
        assert tiny_controlnet.encode_hint(hint.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)).is_contiguous()
