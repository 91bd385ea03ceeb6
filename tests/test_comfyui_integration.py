"""In a real ComfyUI: our nodes against ComfyUI's own ControlNet loader and apply node, sampling with its KSampler.

Needs a ComfyUI checkout at COMFYUI_PATH (and COMFYUI_PYTHON, an interpreter with its requirements, if not this
one); skipped otherwise, with that reason. ComfyUI runs on the CPU in a subprocess, importing our pack by path the
way it loads custom nodes. The models are small SD1.5- and SD2-shaped U-Nets with random weights (ComfyUI's
ControlNet detection needs SD1.5's 320 channels and 768-wide context), so no weights are downloaded. Measured:
  * our loader + apply vs ComfyUI's loader + apply (balanced), the same file: latents (also across the mix of the
    two, a batch of 2 latents, and a control image of another size and aspect);
  * a core ControlNet through our apply in a cond-only mode vs ours in that mode;
  * composing two ControlNets vs chaining two core apply nodes;
  * an SD1.5 ControlNet on an SD2 model: the error before sampling, naming both files and families;
  * after sampling: the U-Net untouched, our weights unchanged, our ControlNet handed to ComfyUI's model manager.
"""
from __future__ import annotations

import json
import textwrap

from .comfyui_host import RANDOMIZE, REQUIRES_COMFYUI, run_in_comfyui

pytestmark = REQUIRES_COMFYUI

SCRIPT = textwrap.dedent("""
    import json, tempfile
    from pathlib import Path
    import comfy.model_management as mm, comfy.supported_models, folder_paths, nodes
    from comfy.model_patcher import ModelPatcher
    from comfy_execution.graph import DynamicPrompt
    from comfy_execution.progress import reset_progress_state
    from comfy_execution.utils import CurrentNodeContext

    from zeroconv_pack.controlnet_model import ControlNet, ControlNetConfig
    from zeroconv_pack.controlnet_model.checkpoint import save_controlnet
    N = pack.NODE_CLASS_MAPPINGS

    def model_of(kind, extra):
        unet_config = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=1,
                           channel_mult=[1, 2], use_spatial_transformer=True, transformer_depth=[1, 1],
                           transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, adm_in_channels=None,
                           use_temporal_attention=False, legacy=False, num_head_channels=-1, **extra)
        conf = kind(unet_config)
        conf.set_inference_dtype(torch.float32, None)
        base = conf.get_model({})
        randomize(base.diffusion_model, 0.02, 0)
        return ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    model = model_of(comfy.supported_models.SD15, dict(context_dim=768, use_linear_in_transformer=False))
    cfg = ControlNetConfig(family="SD1.x", model_channels=320, channel_mult=(1, 2), num_res_blocks=1,
                           transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=768, num_heads=8)
    folder = Path(tempfile.mkdtemp())
    save_controlnet(randomize(ControlNet(cfg), 0.03, 1), folder / "cn.safetensors")
    save_controlnet(randomize(ControlNet(cfg), 0.03, 2), folder / "cn2.safetensors")
    folder_paths.add_model_folder_path("controlnet", str(folder))

    core_cn = nodes.ControlNetLoader().load_controlnet("cn.safetensors")[0]
    core_cn2 = nodes.ControlNetLoader().load_controlnet("cn2.safetensors")[0]
    our_cn = N["ZeroConvLoadControlNet"]().load("cn.safetensors")[0]
    our_cn2 = N["ZeroConvLoadControlNet"]().load("cn2.safetensors")[0]
    gen = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 768, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen)}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen)}]]
    image = torch.rand(2, 72, 100, 3, generator=gen)  # two control images of another size and aspect
    image2 = torch.rand(1, 64, 64, 3, generator=gen)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    core_apply, our_apply = nodes.ControlNetApplyAdvanced().apply_controlnet, N["ZeroConvApplyControlNet"]().apply

    def unit(cn, img, strength, start, end, stack=()):
        return N["ZeroConvControlUnit"]().add(cn, img, strength, start, end, stack=stack)[0]

    composed = N["ZeroConvComposeControlNets"]().compose(
        unit(our_cn2, image2, 0.5, 0.2, 1.0, unit(our_cn, image, 0.8, 0.0, 0.6)))[0]
    mode = dict(control_mode="controlnet_more_important")
    weights = {k: v.clone() for k, v in our_cn.parts[0].controlnet.state_dict().items()}
    unet_attrs = set(vars(model.model.diffusion_model))
    conds = {
        "core": core_apply(pos, neg, core_cn, image, 0.8, 0.0, 0.6),
        "ours": our_apply(pos, neg, our_cn, image, 0.8, 0.0, 0.6),
        "ours_in_core_apply": core_apply(pos, neg, our_cn, image, 0.8, 0.0, 0.6),
        "core_in_our_apply": our_apply(pos, neg, core_cn, image, 0.8, 0.0, 0.6),
        "mode_ours": our_apply(pos, neg, our_cn, image, 0.8, 0.0, 0.6, **mode),
        "mode_core_in_ours": our_apply(pos, neg, core_cn, image, 0.8, 0.0, 0.6, **mode),
        "chain_core": core_apply(*core_apply(pos, neg, core_cn, image, 0.8, 0.0, 0.6), core_cn2, image2, 0.5, 0.2, 1.0),
        "composed_in_core_apply": core_apply(pos, neg, composed, image2, 1.0, 0.0, 1.0),
        "none": (pos, neg),
    }
    out = {k: nodes.common_ksampler(model, 42, 6, 7.0, "euler", "normal", p, n, latent)[0]["samples"]
           for k, (p, n) in conds.items()}
    patcher = our_cn.parts[0].shared.patcher
    report = {"ours": (out["ours"] - out["core"]).abs().max().item(),
              "ours_in_core_apply": (out["ours_in_core_apply"] - out["core"]).abs().max().item(),
              "core_in_our_apply": (out["core_in_our_apply"] - out["core"]).abs().max().item(),
              "mode_core_vs_ours": (out["mode_core_in_ours"] - out["mode_ours"]).abs().max().item(),
              "mode_vs_balanced": (out["mode_ours"] - out["ours"]).abs().max().item(),
              "composed_vs_chain": (out["composed_in_core_apply"] - out["chain_core"]).abs().max().item(),
              "control_effect": (out["none"] - out["core"]).abs().max().item(),
              "scale": out["core"].abs().max().item(),
              "weights_unchanged": all(torch.equal(v, weights[k]) for k, v in
                                       our_cn.parts[0].controlnet.state_dict().items()),
              "unet_untouched": set(vars(model.model.diffusion_model)) == unet_attrs,
              "handed_to_model_manager": patcher is not None and any(m.model is patcher
                                                                     for m in mm.current_loaded_models)}

    sd2 = model_of(comfy.supported_models.SD20, dict(context_dim=1024, use_linear_in_transformer=True))
    sd2.model_options = {"transformer_options": {}}
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd21.safetensors"}},
              "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0]}}}
    reset_progress_state("p", DynamicPrompt(prompt))
    pos2 = [[torch.randn(1, 77, 1024), {}]]
    try:
        with CurrentNodeContext("p", "3"):
            p, n = our_apply(pos2, pos2, our_cn, image2, 1.0, 0.0, 1.0)
            nodes.common_ksampler(sd2, 1, 2, 7.0, "euler", "normal", p, n, {"samples": torch.zeros(1, 4, 8, 8)})
        report["family_error"] = ""
    except ValueError as exc:
        report["family_error"] = str(exc)
    print(json.dumps(report))
""")


def test_our_nodes_match_core_in_comfyui() -> None:
    report = run_in_comfyui(RANDOMIZE + SCRIPT, timeout=900)
    print(json.dumps(report, indent=1))
    tolerance = 1e-5 * report["scale"]
    assert report["control_effect"] > 1e-3 * report["scale"], "the control must change the result"
    assert report["mode_vs_balanced"] > 1e-3 * report["scale"], "the mode must change the result"
    for key in ("ours", "ours_in_core_apply", "core_in_our_apply", "mode_core_vs_ours", "composed_vs_chain"):
        assert report[key] < tolerance, (key, report[key])
    assert report["weights_unchanged"] and report["unet_untouched"] and report["handed_to_model_manager"]
    error = report["family_error"]
    assert "cn.safetensors" in error and "SD1.x" in error and "SD2.x" in error and "tiny_sd21.safetensors" in error
