"""Flux and SD3 ControlNets: our residuals per host block equal ComfyUI core's (`comfy.controlnet.load_controlnet`
+ `get_control`) on the same file and inputs. Needs COMFYUI_PATH (tests/comfyui_host.py); skipped otherwise.

ComfyUI sizes Flux ControlNets as full Flux (3072 wide, 24 heads), so the Flux files are full width at reduced
depth (XLabs: 1 double block; Mistoline: 1 double + 1 single; InstantX Union: 1 + 1, 7 modes); the SD3 and SD3.5
ones are tiny (64 x depth wide), as is the SD3.5 host's patch embedding. Weights are random. The XLabs, Mistoline
and SD3.5 files are written by ComfyUI's own modules (their key layouts), the InstantX and SD3 ones by diffusers.
The model-sampling object handed to get_control is a stand-in with ComfyUI's flow timestep (Flux: sigma, SD3:
sigma x 1000), and the VAE one whose encode is a fixed pooling, the same on both sides.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model.dit_checkpoint import load_dit_controlnet
from zeroconv.controlnet_model.dit_control import DiTControlUnit, latent_hint, run_dit_control
from zeroconv.controlnet_model.residuals import ControlSettings
from zeroconv.controlnet_model.sd3_controlnet import SD35_CONTROL_TYPES

from .comfyui_host import REQUIRES_COMFYUI, run_in_comfyui
from .conftest import randomize

diffusers = pytest.importorskip("diffusers", reason="the SD3 / InstantX files are written by diffusers")
pytestmark = REQUIRES_COMFYUI

B, H, W, T = 2, 8, 8, 4  # batch, latent size, text tokens
STRENGTH = 0.7
BODY = textwrap.dedent("""
    import json, types
    import comfy.controlnet, comfy.ops
    from comfy.ldm.flux.controlnet import ControlNetFlux
    from safetensors.torch import save_file
    inputs = torch.load(INPUTS)
    def randomize(net):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape) * 0.02)
        return net
    host = None
    if BUILD == "sd35":  # ComfyUI's own modules give the SD3.5 layout and the host's patch embedding
        from comfy.cldm.dit_embedder import ControlNetEmbedder
        from comfy.ldm.modules.diffusionmodules.mmdit import PatchEmbed
        torch.manual_seed(4)
        net = randomize(ControlNetEmbedder(img_size=None, patch_size=2, in_chans=16, attention_head_dim=64,
                                           num_attention_heads=2, adm_in_channels=2048, num_layers=2, main_model_double=2,
                                           double_y_emb=False, device=None, dtype=torch.float32,
                                           operations=comfy.ops.disable_weight_init))
        save_file({**{k: v.contiguous() for k, v in net.state_dict().items()}, "control_type": torch.tensor(1.0)}, FILE)
        x_embedder = randomize(PatchEmbed(None, 2, 16, 128, strict_img_size=False, operations=comfy.ops.disable_weight_init))
        torch.save({"x_embedder." + k: v for k, v in x_embedder.state_dict().items()}, HOST)
        host = types.SimpleNamespace(diffusion_model=types.SimpleNamespace(x_embedder=x_embedder), model_sampling=None)
    if BUILD in ("xlabs", "mistoline"):  # ComfyUI's own module gives the XLabs / Mistoline key layout
        torch.manual_seed(3)
        mistoline = BUILD == "mistoline"
        net = randomize(ControlNetFlux(mistoline=mistoline, operations=comfy.ops.disable_weight_init, in_channels=16,
                                       out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                                       mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=int(mistoline),
                                       axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                                       guidance_embed=True))
        rename = "single_controlnet_blocks." if mistoline else "controlnet_single_blocks."  # Mistoline files' name
        save_file({k.replace("controlnet_single_blocks.", rename): v.to(torch.bfloat16).contiguous()
                   for k, v in net.state_dict().items()}, FILE)
        del net
    control = comfy.controlnet.load_controlnet(FILE, model_options={"dtype": torch.float32})
    vae = types.SimpleNamespace(spacial_compression_encode=lambda: 8,
                                encode=lambda img: torch.nn.functional.avg_pool2d(img.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16])
    control.set_cond_hint(inputs["image"], STRENGTH, (0.0, 1.0), vae=vae if LATENT else None)
    if host is not None:
        control.pre_run(host, lambda percent: 1.0 - percent)
    if MODE is not None:
        control.set_extra_arg("control_type", [MODE])
    control.model_sampling_current = types.SimpleNamespace(timestep=lambda s: s * TIME_SCALE,
                                                           calculate_input=lambda s, x: x)
    cond = {"c_crossattn": inputs["context"], "y": inputs["y"], "guidance": inputs["guidance"]}
    out = control.get_control(inputs["x"], inputs["sigma"], cond, 1, {})
    torch.save({k: [None if r is None else r.float() for r in v] for k, v in out.items()}, RESULT)
    print(json.dumps({"ok": True}))
""")


def _inputs(tmp_path, context_dim: int, pooled: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(B, 16, H, W, generator=gen), "image": torch.rand(B, 3, 8 * H, 8 * W, generator=gen),
              "context": torch.randn(B, T, context_dim, generator=gen), "y": torch.randn(B, pooled, generator=gen),
              "guidance": torch.full((B,), 3.5), "sigma": torch.tensor([0.9, 0.4])}
    torch.save(inputs, tmp_path / "inputs.pt")
    return inputs


def _comfy(tmp_path, file, latent: bool, mode, time_scale: float, build: str | None = None) -> dict:
    consts = dict(INPUTS=str(tmp_path / "inputs.pt"), FILE=str(file), RESULT=str(tmp_path / "comfy.pt"),
                  HOST=str(tmp_path / "host.pt"), LATENT=latent, MODE=mode, TIME_SCALE=time_scale, STRENGTH=STRENGTH,
                  BUILD=build)
    run_in_comfyui("".join(f"{k} = {v!r}\n" for k, v in consts.items()) + BODY, timeout=900)
    return torch.load(tmp_path / "comfy.pt")


def _ours(file, fmt_latent: bool, inputs: dict, mode, time_scale: float, host=None):
    loaded = load_dit_controlnet(file, dtype=torch.float32)
    hint = inputs["image"]
    if host is not None:
        loaded.model.borrow_from_host(torch.load(host))
        hint = SD35_CONTROL_TYPES[loaded.config.control_type][1](hint)
    if fmt_latent:  # the stand-in VAE's encode, then the format's latent scaling
        raw = torch.nn.functional.avg_pool2d(hint, 8).repeat(1, 6, 1, 1)[:, :16]
        hint = latent_hint(loaded.format.value, raw, channels=loaded.config.hint_channels // (
            4 if loaded.format.value.startswith("flux") else 1))
    unit = DiTControlUnit(loaded.model, loaded.format.value, hint, mode, ControlSettings(strength=STRENGTH))
    with torch.no_grad():
        return run_dit_control(unit, inputs["x"], inputs["sigma"] * time_scale, inputs["context"], inputs["y"],
                               inputs["guidance"])


def _assert_same(ours, theirs: dict) -> None:
    """Same residual (or None) for every host block, both keys; relative difference < 1e-4 (fp32)."""
    for key in ("input", "output"):
        mine, core = list(getattr(ours, key)), list(theirs.get(key, []))
        assert len(mine) == len(core), (key, len(mine), len(core))
        for i, (a, b) in enumerate(zip(mine, core)):
            assert (a is None) == (b is None), (key, i)
            if a is not None:
                assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-4 * b.abs().max(), (key, i)


@pytest.mark.parametrize("layout", ["xlabs", "mistoline"])
def test_xlabs_and_mistoline_residuals_equal_comfyui(tmp_path, layout) -> None:
    inputs = _inputs(tmp_path, 4096, 768)
    file = tmp_path / f"{layout}.safetensors"
    theirs = _comfy(tmp_path, file, latent=False, mode=None, time_scale=1.0, build=layout)
    ours = _ours(file, False, inputs, None, 1.0)
    assert len(ours.input) == 19 and len(ours.output) == (38 if layout == "mistoline" else 0)
    _assert_same(ours, theirs)


def test_instantx_union_residuals_equal_comfyui(tmp_path) -> None:
    torch.manual_seed(0)
    net = randomize(diffusers.FluxControlNetModel(num_layers=1, num_single_layers=1, guidance_embeds=True, num_mode=7),
                    seed=5, std=0.02)
    file = tmp_path / "instantx_union.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}, file)
    del net
    inputs = _inputs(tmp_path, 4096, 768)
    theirs = _comfy(tmp_path, file, latent=True, mode=2, time_scale=1.0)
    ours = _ours(file, True, inputs, 2, 1.0)
    assert len(ours.input) == 19 and len(ours.output) == 38
    _assert_same(ours, theirs)


def test_sd3_residuals_equal_comfyui(tmp_path) -> None:
    torch.manual_seed(0)
    net = randomize(diffusers.SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                                 attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
                                                 caption_projection_dim=256, pooled_projection_dim=32, out_channels=16,
                                                 pos_embed_max_size=32), seed=6, std=0.02)
    file = tmp_path / "sd3.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, file)
    inputs = _inputs(tmp_path, 64, 32)
    theirs = _comfy(tmp_path, file, latent=True, mode=None, time_scale=1000.0)
    ours = _ours(file, True, inputs, None, 1000.0)
    assert len(ours.output) == len(theirs["output"])  # depth 4, 2 blocks: 2 + 1 (the last one once less)
    _assert_same(ours, theirs)


def test_sd35_residuals_equal_comfyui(tmp_path) -> None:
    """Stability's layout (canny control_type), the host's patch embedding borrowed by both sides."""
    inputs = _inputs(tmp_path, 64, 2048)
    file = tmp_path / "sd35.safetensors"
    theirs = _comfy(tmp_path, file, latent=True, mode=None, time_scale=1000.0, build="sd35")
    ours = _ours(file, True, inputs, None, 1000.0, host=tmp_path / "host.pt")
    theirs["output"] = theirs["output"][:2]  # ComfyUI's list runs past the base's depth (2); its blocks stop there
    _assert_same(ours, theirs)
