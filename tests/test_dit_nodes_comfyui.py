"""In a real ComfyUI: Flux and SD3 ControlNets through our nodes against ComfyUI's own loader and apply nodes.

Needs COMFYUI_PATH (tests/comfyui_host.py); skipped otherwise. For each format (XLabs, InstantX Union, SD3
diffusers, SD3.5 Stability), on the same file and the same base, built by ComfyUI itself (`comfy.supported_models`
Flux / SD3 with a small unet_config, random weights, on the CPU):
  * residuals: our loader + our apply node's control object (`pre_run`, `get_control`) equal core's
    ControlNetLoader + ControlNetApplyAdvanced (+ SetUnionControlNetType for the union file) for every host block;
  * sampling: 2 euler steps of core's KSampler (cfg 2, cond and uncond) on a 1 x 16 x 8 x 8 latent give the same
    latents with our nodes as with core's, and differ from sampling without control; our weights are handed to
    ComfyUI's model manager.
ComfyUI sizes Flux ControlNets as full Flux, so the Flux files and base are 3072 wide at depth 1 (+1 single block);
the SD3 ones are 64 x depth wide. The VAE is a stand-in (a fixed pooling to 16 channels), the same on both sides.
The union file's mode is Flux's "depth" (index 2) on our side; core's SetUnionControlNetType only lists the SDXL
names, where index 2 is "hed/pidi/scribble/ted".
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from .comfyui_host import RANDOMIZE, REQUIRES_COMFYUI, run_in_comfyui
from .conftest import randomize

pytestmark = REQUIRES_COMFYUI

SCRIPT = textwrap.dedent("""
    import json, types
    from pathlib import Path
    import comfy.model_management as mm, comfy.ops, comfy.supported_models, folder_paths, nodes
    from comfy.model_patcher import ModelPatcher
    from comfy_extras.nodes_controlnet import SetUnionControlNetType
    from safetensors.torch import save_file
    N = pack.NODE_CLASS_MAPPINGS
    ops = comfy.ops.disable_weight_init
    folder = Path(FOLDER)
    folder_paths.add_model_folder_path("controlnet", str(folder))
    if FORMAT == "xlabs":  # ComfyUI's own module gives the XLabs key layout
        from comfy.ldm.flux.controlnet import ControlNetFlux
        net = randomize(ControlNetFlux(operations=ops, in_channels=16, out_channels=16, vec_in_dim=768,
                                       context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1,
                                       depth_single_blocks=0, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                                       qkv_bias=True, guidance_embed=True), 0.02, 3)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}, str(folder / "cn.safetensors"))
        del net
    if FORMAT == "sd35":  # ComfyUI's own module gives Stability's SD3.5 layout
        from comfy.cldm.dit_embedder import ControlNetEmbedder
        net = randomize(ControlNetEmbedder(img_size=None, patch_size=2, in_chans=16, attention_head_dim=64,
                                           num_attention_heads=2, adm_in_channels=2048, num_layers=2,
                                           main_model_double=2, double_y_emb=False, device=None, dtype=torch.float32,
                                           operations=ops), 0.02, 4)
        save_file({**{k: v.contiguous() for k, v in net.state_dict().items()}, "control_type": torch.tensor(1.0)},
                  str(folder / "cn.safetensors"))
    flux = FORMAT in ("xlabs", "union")
    if flux:
        conf = comfy.supported_models.Flux(dict(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
            mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True))
        ctx_dim, pooled_dim = 4096, 768
    else:
        depth, ctx_dim, pooled_dim = (4, 64, 32) if FORMAT == "sd3" else (2, 64, 2048)
        conf = comfy.supported_models.SD3(dict(
            in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None, adm_in_channels=pooled_dim,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": ctx_dim,
                                                                             "out_features": 64 * depth}},
            num_patches=1024, pos_embed_max_size=32, pos_embed_scaling_factor=None, x_block_self_attn_layers=[]))
    conf.set_inference_dtype(torch.float32, None)
    base = conf.get_model({})
    randomize(base.diffusion_model, 0.02, 0)
    with torch.no_grad():  # buffers are left uninitialised too (MMDiT's pos_embed): draw them as well
        for buffer in base.diffusion_model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    model = ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    gen = torch.Generator().manual_seed(1)
    extra = {"guidance": 3.5} if flux else {}
    pos = [[torch.randn(1, 4, ctx_dim, generator=gen), {"pooled_output": torch.randn(1, pooled_dim, generator=gen), **extra}]]
    neg = [[torch.randn(1, 4, ctx_dim, generator=gen), {"pooled_output": torch.randn(1, pooled_dim, generator=gen), **extra}]]
    image = torch.rand(1, 64, 80, 3, generator=gen)  # another aspect: both crop and resize
    vae = types.SimpleNamespace(spacial_compression_encode=lambda: 8, encode=lambda img: torch.nn.functional.avg_pool2d(
        img.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16])
    use_vae = vae if FORMAT != "xlabs" else None

    core_cn = nodes.ControlNetLoader().load_controlnet("cn.safetensors")[0]
    if FORMAT == "union":
        core_cn = SetUnionControlNetType().set_controlnet_type(core_cn, "hed/pidi/scribble/ted")[0]
    our_cn = N["ZeroConvLoadControlNet"]().load("cn.safetensors")[0]
    core = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, core_cn, image, 0.8, 0.0, 1.0, vae=use_vae)
    ours = N["ZeroConvApplyControlNet"]().apply(pos, neg, our_cn, image, 0.8, 0.0, 1.0, vae=use_vae,
                                                union_type="depth" if FORMAT == "union" else "auto")

    # residuals at one model call, both controls prepared by pre_run on the same base
    x = torch.randn(2, 16, 8, 8, generator=gen)
    sigma = torch.tensor([0.7, 0.7])
    cond = {"c_crossattn": torch.cat([pos[0][0], neg[0][0]]), "y": torch.cat([pos[0][1]["pooled_output"],
                                                                              neg[0][1]["pooled_output"]])}
    if flux:
        cond["guidance"] = torch.tensor([3.5, 3.5])
    residuals = {}
    for name, conds in (("core", core), ("ours", ours)):
        control = conds[0][0][1]["control"]
        control.pre_run(base, base.model_sampling.percent_to_sigma)
        with torch.no_grad():
            out = control.get_control(x, sigma, cond, 1, {"cond_or_uncond": [0, 1]})
        residuals[name] = {k: [None if r is None else r.float().clone() for r in v] for k, v in out.items()}
        control.cleanup()
    report = {"lengths": {}, "rel": 0.0, "none_match": True}
    for key in ("input", "output"):
        a, b = residuals["ours"].get(key) or [], residuals["core"].get(key) or []
        report["lengths"][key] = [len(a), len(b)]
        for r, s in zip(a, b):
            report["none_match"] &= (r is None) == (s is None)
            if r is not None and s is not None:
                report["rel"] = max(report["rel"], ((r - s).abs().max() / s.abs().max()).item())

    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    out = {k: nodes.common_ksampler(model, 42, 2, 2.0, "euler", "simple", p, n, latent)[0]["samples"]
           for k, (p, n) in (("core", core), ("ours", ours), ("none", (pos, neg)))}
    patcher = our_cn.parts[0].shared.patcher
    report.update({"sampling": (out["ours"] - out["core"]).abs().max().item(),
                   "control_effect": (out["none"] - out["core"]).abs().max().item(),
                   "scale": out["core"].abs().max().item(),
                   "handed_to_model_manager": patcher is not None and any(m.model is patcher
                                                                          for m in mm.current_loaded_models)})
    print(json.dumps(report))
""")


def _diffusers_file(fmt: str, folder) -> None:
    diffusers = pytest.importorskip("diffusers", reason="the InstantX / SD3 files are written by diffusers")
    torch.manual_seed(0)
    if fmt == "union":
        net = randomize(diffusers.FluxControlNetModel(num_layers=1, num_single_layers=1, guidance_embeds=True,
                                                      num_mode=7), seed=5, std=0.02)
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}
    else:
        net = randomize(diffusers.SD3ControlNetModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                                     attention_head_dim=64, num_attention_heads=4,
                                                     joint_attention_dim=64, caption_projection_dim=256,
                                                     pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32),
                        seed=6, std=0.02)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, folder / "cn.safetensors")


@pytest.mark.parametrize("fmt", ["xlabs", "union", "sd3", "sd35"])
def test_our_nodes_give_cores_residuals_and_latents(tmp_path, fmt) -> None:
    if fmt in ("union", "sd3"):
        _diffusers_file(fmt, tmp_path)
    report = run_in_comfyui(f"FOLDER = {str(tmp_path)!r}\nFORMAT = {fmt!r}\n" + RANDOMIZE + SCRIPT, timeout=900)
    print(fmt, json.dumps(report))
    for key, (mine, core) in report["lengths"].items():
        assert mine == core, (key, mine, core)
    assert report["none_match"] and report["rel"] < 1e-4, report
    assert report["control_effect"] > 1e-3 * report["scale"], "the control must change the result"
    assert report["sampling"] <= 1e-4 * report["scale"], report
    assert report["handed_to_model_manager"]
