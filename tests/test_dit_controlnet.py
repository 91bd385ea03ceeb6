"""Flux and SD3 ControlNets on tiny configs (CPU): strict loads in each format's real key layout, forward parity
with diffusers' FluxControlNetModel / SD3ControlNetModel, the host-block table against ComfyUI's rules, and the
errors a user meets (wrong family, no VAE latent, a union mode the file lacks)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model.checkpoint import CheckpointFormat, detect_format, load_controlnet
from zeroconv.controlnet_model.dit_blocks import image_ids, patchify
from zeroconv.controlnet_model.dit_checkpoint import LoadedDiTControlNet, load_dit_controlnet
from zeroconv.controlnet_model.config import check_family
from zeroconv.controlnet_model.dit_control import (DiTControlUnit, check_hint, flux_union_mode, host_lists,
                                                   latent_hint, run_dit_control)
from zeroconv.controlnet_model.flux_controlnet import HintInput
from zeroconv.controlnet_model.residuals import ControlSettings

from .conftest import randomize

diffusers = pytest.importorskip("diffusers", reason="the parity tests need the test extra")

TOLERANCE = 1e-4  # max relative difference of any residual, fp32
B, H, W, T = 2, 8, 6, 5
HIDDEN, HEAD = 64, 32  # tiny Flux: 2 heads of 32 -> rotary axes (4, 14, 14)
FLUX = dict(in_channels=64, attention_head_dim=HEAD, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=20, axes_dims_rope=[4, 14, 14])
SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
           joint_attention_dim=24, caption_projection_dim=128, pooled_projection_dim=20, out_channels=16,
           pos_embed_max_size=16)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, 16, H, W, generator=gen), "latent": torch.randn(B, 16, H, W, generator=gen),
            "image": torch.rand(B, 3, 8 * H, 8 * W, generator=gen), "context": torch.randn(B, T, 24, generator=gen),
            "y": torch.randn(B, 20, generator=gen), "sigma": torch.tensor([0.3, 0.8]), "guidance": torch.tensor([3.5, 2.0])}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _flux_diffusers(tmp_path, **kw):
    torch.manual_seed(0)
    net = randomize(diffusers.FluxControlNetModel(**FLUX, **kw), seed=1).eval()
    net.save_pretrained(tmp_path / "flux")
    return net, tmp_path / "flux"


@pytest.mark.parametrize("kw, mode", [(dict(num_layers=2, num_single_layers=2, guidance_embeds=True, num_mode=7), 4),
                                      (dict(num_layers=1, num_single_layers=0), None)], ids=["union-dev", "schnell"])
def test_flux_instantx_equals_diffusers(tmp_path, kw, mode) -> None:
    theirs, folder = _flux_diffusers(tmp_path, **kw)
    loaded = load_dit_controlnet(folder)
    assert loaded.format is CheckpointFormat.FLUX_INSTANTX and loaded.config.num_union_modes == (7 if mode else 0)
    i = _inputs()
    guidance = i["guidance"] if kw.get("guidance_embeds") else None
    with torch.no_grad():
        ours = loaded.model(i["x"], i["latent"], i["sigma"], i["context"], i["y"], guidance, mode=mode)
        ref = theirs(hidden_states=patchify(i["x"]), controlnet_cond=patchify(i["latent"]),
                     controlnet_mode=None if mode is None else torch.full((B, 1), mode),
                     encoder_hidden_states=i["context"], pooled_projections=i["y"], timestep=i["sigma"],
                     img_ids=image_ids(1, H // 2, W // 2)[0], txt_ids=torch.zeros(T, 3), guidance=guidance)
    expected = list(ref.controlnet_block_samples) + list(ref.controlnet_single_block_samples or [])
    assert len(ours.main) + len(ours.single) == len(expected)
    assert max(_rel(a, b) for a, b in zip(ours.main + ours.single, expected)) < TOLERANCE


def test_sd3_diffusers_equals_diffusers(tmp_path) -> None:
    torch.manual_seed(0)
    theirs = randomize(diffusers.SD3ControlNetModel(**SD3), seed=2).eval()
    theirs.save_pretrained(tmp_path / "sd3")
    loaded = load_controlnet(tmp_path / "sd3")  # the general loader hands transformer formats on
    assert isinstance(loaded, LoadedDiTControlNet) and loaded.format is CheckpointFormat.SD3_DIFFUSERS
    assert loaded.config.depth == 2 and loaded.config.num_blocks == 2
    i = _inputs()
    t = i["sigma"] * 1000
    with torch.no_grad():
        ours = loaded.model(i["x"], i["latent"], t, i["context"])
        ref = theirs(hidden_states=i["x"], controlnet_cond=i["latent"], encoder_hidden_states=i["context"],
                     pooled_projections=torch.zeros(B, 20), timestep=t).controlnet_block_samples
    assert max(_rel(a, b) for a, b in zip(ours.main, ref)) < TOLERANCE


# ---- the XLabs / Mistoline layouts, by hand from ComfyUI comfy/ldm/flux/controlnet.py + layers.py --------------
def _lin(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def flux_layout_keys(depth: int, single: int, mistoline: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ComfyUI's ControlNetFlux (XLabs or Mistoline) at width 64, 2 heads, dev (guidance)."""
    h = HIDDEN
    keys = {**_lin("img_in", h, 64), **_lin("time_in.in_layer", h, 256), **_lin("time_in.out_layer", h, h),
            **_lin("vector_in.in_layer", h, 20), **_lin("vector_in.out_layer", h, h), **_lin("txt_in", h, 24),
            **_lin("guidance_in.in_layer", h, 256), **_lin("guidance_in.out_layer", h, h),
            **_lin("pos_embed_input", h, 64)}
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            keys.update({**_lin(f"{p}_mod.lin", 6 * h, h), **_lin(f"{p}_attn.qkv", 3 * h, h),
                         **_lin(f"{p}_attn.proj", h, h), **_lin(f"{p}_mlp.0", 4 * h, h), **_lin(f"{p}_mlp.2", h, 4 * h),
                         f"{p}_attn.norm.query_norm.scale": (HEAD,), f"{p}_attn.norm.key_norm.scale": (HEAD,)})
        keys.update(_lin(f"controlnet_blocks.{i}" + (".linear" if mistoline else ""), h, h))
    for i in range(single):
        p = f"single_blocks.{i}"
        keys.update({**_lin(f"{p}.linear1", 7 * h, h), **_lin(f"{p}.linear2", h, 5 * h),
                     **_lin(f"{p}.modulation.lin", 3 * h, h),
                     f"{p}.norm.query_norm.scale": (HEAD,), f"{p}.norm.key_norm.scale": (HEAD,)})
        keys.update(_lin(f"single_controlnet_blocks.{i}.linear" if mistoline else f"controlnet_single_blocks.{i}", h, h))
    kernels = [3, 1, 3, 3, 3, 3, 3, 3, 1, 3] if mistoline else [3] * 8
    prefix = "input_cond_block.encoder" if mistoline else "input_hint_block"
    for n, k in enumerate(kernels):
        keys.update({f"{prefix}.{2 * n}.weight": (16, 3 if n == 0 else 16, k, k), f"{prefix}.{2 * n}.bias": (16,)})
    return keys


@pytest.mark.parametrize("mistoline", [False, True], ids=["xlabs", "mistoline"])
def test_flux_pixel_hint_layouts_load_strictly(tmp_path, mistoline) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).mul(0.05).to(torch.float16)
             for k, s in flux_layout_keys(2, 1, mistoline).items()}
    save_file(state, tmp_path / "cn.safetensors")
    loaded = load_dit_controlnet(tmp_path / "cn.safetensors")
    want = HintInput.PIXELS_MISTOLINE if mistoline else HintInput.PIXELS
    assert loaded.config.hint is want and loaded.model.dtype == torch.float16
    assert (loaded.config.depth, loaded.config.depth_single, loaded.config.guidance_embed) == (2, 1, True)
    i = _inputs()
    with torch.no_grad():
        res = run_dit_control(DiTControlUnit(loaded.model.float(), loaded.format.value, i["image"]), i["x"],
                              i["sigma"], i["context"], i["y"], i["guidance"])
    assert len(res.input) == 19 and len(res.output) == 38
    assert res.input[0] is res.input[2] and res.input[1] is res.input[3]  # tiled b0, b1, b0, b1, ...
    assert res.input[0].shape == (B, (H // 2) * (W // 2), HIDDEN)
    state["unexpected.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(KeyError, match="unexpected.weight"):
        load_dit_controlnet(tmp_path / "bad.safetensors")


def test_float8_file_loads_cast_up(tmp_path) -> None:
    theirs, folder = _flux_diffusers(tmp_path, num_layers=1, num_single_layers=1)
    state = {k: v.to(torch.float8_e4m3fn) for k, v in theirs.state_dict().items()}
    save_file(state, tmp_path / "fp8.safetensors")
    loaded = load_dit_controlnet(tmp_path / "fp8.safetensors")
    assert loaded.model.dtype == torch.bfloat16
    assert torch.equal(loaded.model.img_in.weight, state["x_embedder.weight"].to(torch.bfloat16))
    assert load_dit_controlnet(tmp_path / "fp8.safetensors", dtype=torch.float32).model.dtype == torch.float32


def test_detection_by_comfyui_marker_keys() -> None:
    cases = {"flux_xlabs": ["controlnet_blocks.0.weight", "double_blocks.0.img_attn.norm.key_norm.scale"],
             "flux_mistoline": ["controlnet_blocks.0.linear.weight"],
             "flux_instantx": ["controlnet_blocks.0.weight", "controlnet_x_embedder.weight"],
             "sd3_diffusers": ["controlnet_blocks.0.weight", "pos_embed_input.proj.weight"],
             "sd35": ["controlnet_blocks.0.weight", "pos_embed_input.proj.weight",
                      "transformer_blocks.0.adaLN_modulation.1.bias"]}
    for fmt, keys in cases.items():
        assert detect_format(keys) is CheckpointFormat(fmt)


# ---- host blocks: ComfyUI's lists, written out -------------------------------------------------------------
def test_host_block_table_matches_comfyui() -> None:
    # XLabs, 2 double blocks -> 19 host double blocks tiled; 0 single blocks -> no "output"
    assert host_lists("flux_xlabs", 2) == {"input": [0, 1] * 9 + [0], "output": []}
    # InstantX Union: 5 double (each ceil(19/5) = 4 times, cut to 19), 10 single (each 4 times, cut to 38)
    lists = host_lists("flux_instantx", 5, 10)
    assert lists["input"] == [b for b in range(5) for _ in range(4)][:19]
    assert lists["output"] == [b for b in range(5, 15) for _ in range(4)][:38]
    # Union-Pro 2.0: 6 double blocks, each 4 times -> 19; nothing for the single blocks
    assert host_lists("flux_instantx", 6)["input"] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3
    # SD3 diffusers on a depth-24 base: 12 blocks each twice, the last once -> 23 lists (host block 23 gets none)
    sd3 = host_lists("sd3_diffusers", 12, depth=24)["output"]
    assert len(sd3) == 23 and sd3[:4] == [0, 0, 1, 1] and sd3[-3:] == [10, 10, 11]
    # SD3.5 Large (depth 38), 19 blocks: each ceil(38/19) = 2 times
    assert host_lists("sd35", 19, depth=38)["output"] == [b for b in range(19) for _ in range(2)]


def test_strength_and_token_mask_scale_residuals(tmp_path) -> None:
    _, folder = _flux_diffusers(tmp_path, num_layers=1, num_single_layers=1)
    loaded = load_dit_controlnet(folder)
    i = _inputs()
    hint = latent_hint("flux_instantx", i["latent"])
    mask = torch.zeros(1, 8 * H, 8 * W)
    mask[:, : 4 * H] = 1.0  # top half of the image
    runs = {}
    for name, settings in {"full": ControlSettings(), "half": ControlSettings(strength=0.5),
                           "masked": ControlSettings(mask=mask), "off": ControlSettings(start_percent=0.5)}.items():
        with torch.no_grad():
            runs[name] = run_dit_control(DiTControlUnit(loaded.model, "flux_instantx", hint, settings=settings),
                                         i["x"], i["sigma"], i["context"], i["y"], percent=0.2)
    assert runs["off"] is None
    torch.testing.assert_close(runs["half"].input[0], runs["full"].input[0] * 0.5)
    tokens = (H // 2) * (W // 2)
    torch.testing.assert_close(runs["masked"].output[0][:, : tokens // 2], runs["full"].output[0][:, : tokens // 2])
    assert runs["masked"].output[0][:, tokens // 2:].abs().max() == 0
    both = runs["full"] + runs["half"]
    torch.testing.assert_close(both.input[5], runs["full"].input[5] * 1.5)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_family_check_refuses_both_directions() -> None:
    check_family("flux", "flux")
    with pytest.raises(ValueError, match=r"Flux\.1 ControlNet but the model is SDXL"):
        check_family("flux", "SDXL")
    with pytest.raises(ValueError, match=r"SD1\.x ControlNet but the model is Flux\.1"):
        check_family("SD1.x", "flux")
    with pytest.raises(ValueError, match=r"SD3 / SD3\.5 ControlNet but my model is Flux\.1"):
        check_family("sd3", "flux", host_name="my model")


def test_latent_format_without_vae_latent_is_refused() -> None:
    i = _inputs()
    with pytest.raises(ValueError, match="needs a VAE input"):
        check_hint("flux_instantx", i["image"], 16, "union.safetensors")
    with pytest.raises(ValueError, match="needs a VAE input"):
        check_hint("sd3_diffusers", None, 16)
    check_hint("flux_instantx", i["latent"], 16)
    check_hint("flux_xlabs", i["image"], 16)


def test_bad_union_mode_names_mode_file_and_count() -> None:
    assert flux_union_mode("depth", 7) == 2 and flux_union_mode("low quality", 7) == 6
    assert flux_union_mode(None, 7) is None
    with pytest.raises(ValueError, match=r"'low quality' is not one of the 6 modes union6\.safetensors has"):
        flux_union_mode("low quality", 6, "union6.safetensors")
    with pytest.raises(ValueError, match="7 modes"):
        flux_union_mode(9, 7)
    with pytest.raises(ValueError, match="has no union modes"):
        flux_union_mode("canny", 0, "pro2.safetensors")


def sd35_layout_keys(blocks: int, hidden: int = 128) -> dict[str, tuple[int, ...]]:
    """ComfyUI's ControlNetEmbedder (comfy/cldm/dit_embedder.py) names and shapes, with its own x_embedder."""
    h = hidden
    keys = {"x_embedder.proj.weight": (h, 16, 2, 2), "x_embedder.proj.bias": (h,),
            "pos_embed_input.proj.weight": (h, 16, 2, 2), "pos_embed_input.proj.bias": (h,),
            **_lin("t_embedder.mlp.0", h, 256), **_lin("t_embedder.mlp.2", h, h),
            **_lin("y_embedder.mlp.0", h, 2048), **_lin("y_embedder.mlp.2", h, h)}
    for i in range(blocks):
        p = f"transformer_blocks.{i}"
        keys.update({**_lin(f"{p}.adaLN_modulation.1", 6 * h, h), **_lin(f"{p}.attn.qkv", 3 * h, h),
                     **_lin(f"{p}.attn.proj", h, h), **_lin(f"{p}.mlp.fc1", 4 * h, h), **_lin(f"{p}.mlp.fc2", h, 4 * h),
                     **_lin(f"controlnet_blocks.{i}", h, h)})
    return keys


def test_sd35_layout_loads_strictly_and_borrows_the_host_patch_embedding(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).mul(0.05).to(torch.bfloat16) for k, s in sd35_layout_keys(3).items()}
    save_file({**state, "control_type": torch.tensor(2.0)}, tmp_path / "sd35.safetensors")
    loaded = load_controlnet(tmp_path / "sd35.safetensors", dtype=torch.float32)
    cfg = loaded.config
    assert loaded.format is CheckpointFormat.SD35 and (cfg.num_blocks, cfg.depth, cfg.control_type) == (3, 2, 2)
    assert not any(k.startswith("x_embedder") for k in loaded.model.state_dict())
    i = _inputs()
    unit = DiTControlUnit(loaded.model, "sd35", latent_hint("sd35", i["latent"]))
    with pytest.raises(ValueError, match="borrow_from_host"):
        run_dit_control(unit, i["x"], i["sigma"] * 1000, i["context"], torch.randn(B, 2048))
    with pytest.raises(KeyError, match="x_embedder.proj.bias"):
        loaded.model.borrow_from_host({"x_embedder.proj.weight": state["x_embedder.proj.weight"]})
    loaded.model.borrow_from_host({k: v for k, v in state.items() if k.startswith("x_embedder")})
    with torch.no_grad():
        res = run_dit_control(unit, i["x"], i["sigma"] * 1000, None, torch.randn(B, 2048))
    assert len(res.output) == 2 and res.output[0].shape == (B, (H // 2) * (W // 2), 128)  # depth 2: first 2 blocks


def test_inpaint_file_takes_the_keep_mask_as_a_17th_latent_channel(tmp_path) -> None:
    theirs, _ = _flux_diffusers(tmp_path, num_layers=1, num_single_layers=0)
    state = dict(theirs.state_dict())
    state["controlnet_x_embedder.weight"] = torch.randn(HIDDEN, 17 * 4) * 0.05  # alimama-style inpaint layout
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inpaint.safetensors")
    loaded = load_dit_controlnet(tmp_path / "inpaint.safetensors")
    assert loaded.config.inpaint
    i = _inputs()
    keep = torch.ones(1, 8 * H, 8 * W)
    keep[:, :, : 4 * W] = 0.0
    hint = latent_hint("flux_instantx", i["latent"], keep, channels=17)
    assert hint.shape == (B, 17, H, W) and hint[:, 16, :, : W // 2].eq(0).all() and hint[:, 16, :, W // 2:].eq(1).all()
    with torch.no_grad():
        assert run_dit_control(DiTControlUnit(loaded.model, "flux_instantx", hint), i["x"], i["sigma"],
                               i["context"], i["y"]) is not None
    with pytest.raises(ValueError, match="inpaint ControlNet.*17 channels"):
        run_dit_control(DiTControlUnit(loaded.model, "flux_instantx", i["latent"]), i["x"], i["sigma"],
                        i["context"], i["y"])
