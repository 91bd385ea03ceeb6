"""In a real ComfyUI: our loader + apply give the same latents as ComfyUI's own loader + apply (balanced mode).

Needs a ComfyUI checkout at COMFYUI_PATH (and COMFYUI_PYTHON, an interpreter with its requirements, if not this
one); skipped otherwise. The model is a small SD1.5-shaped U-Net with random weights (ComfyUI's model detection
needs SD1.5's 320 channels and 768-wide context), so no weights are downloaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run in ComfyUI")]

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, {comfy!r})
    from comfy.cli_args import args
    args.cpu = True
    import torch
    import comfy.model_management as mm, comfy.supported_models, folder_paths, nodes
    from comfy.model_patcher import ModelPatcher

    spec = importlib.util.spec_from_file_location("zeroconv_pack", {init!r}, submodule_search_locations=[{repo!r}])
    pack = importlib.util.module_from_spec(spec); sys.modules["zeroconv_pack"] = pack; spec.loader.exec_module(pack)
    from zeroconv_pack.controlnet_model import ControlNet, ControlNetConfig
    from zeroconv_pack.controlnet_model.checkpoint import save_controlnet

    torch.manual_seed(0)
    unet_config = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=1,
                       channel_mult=[1, 2], use_spatial_transformer=True, transformer_depth=[1, 1],
                       transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
                       use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
                       legacy=False, num_head_channels=-1)
    conf = comfy.supported_models.SD15(unet_config)
    conf.set_inference_dtype(torch.float32, None)
    base = conf.get_model({{}})
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    model = ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    cfg = ControlNetConfig(family="SD1.x", model_channels=320, channel_mult=(1, 2), num_res_blocks=1,
                           transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=768, num_heads=8)
    cn = ControlNet(cfg)
    with torch.no_grad():
        for p in cn.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    folder = Path(tempfile.mkdtemp())
    save_controlnet(cn, folder / "cn.safetensors")
    folder_paths.add_model_folder_path("controlnet", str(folder))

    core_cn = nodes.ControlNetLoader().load_controlnet("cn.safetensors")[0]
    our_cn = pack.NODE_CLASS_MAPPINGS["ZeroConvLoadControlNet"]().load("cn.safetensors")[0]
    gen = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 768, generator=gen), {{"pooled_output": torch.randn(1, 768, generator=gen)}}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {{"pooled_output": torch.randn(1, 768, generator=gen)}}]]
    image = torch.rand(1, 64, 64, 3, generator=gen)
    latent = {{"samples": torch.zeros(1, 4, 8, 8)}}
    apply = pack.NODE_CLASS_MAPPINGS["ZeroConvApplyControlNet"]()
    out = {{}}
    for label, (p, n) in {{
        "core": nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, core_cn, image, 0.8, 0.0, 0.6),
        "ours": apply.apply(pos, neg, our_cn, image, 0.8, 0.0, 0.6),
        "ours_in_core_apply": nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, our_cn, image, 0.8, 0.0, 0.6),
        "core_in_our_apply": apply.apply(pos, neg, core_cn, image, 0.8, 0.0, 0.6),
        "none": (pos, neg),
    }}.items():
        out[label] = nodes.common_ksampler(model, 42, 6, 7.0, "euler", "normal", p, n, latent)[0]["samples"]
    print(json.dumps({{k: (v - out["core"]).abs().max().item() for k, v in out.items()}}
                     | {{"scale": out["core"].abs().max().item()}}))
""")


def test_our_nodes_match_core_in_comfyui() -> None:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    script = SCRIPT.format(comfy=COMFYUI_PATH, init=str(REPO / "__init__.py"), repo=str(REPO))
    done = subprocess.run([python, "-c", script], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs["none"] > 1e-3 * diffs["scale"], "the control must change the result"
    assert diffs["ours"] < 1e-4 * diffs["scale"]
    assert diffs["ours_in_core_apply"] < 1e-4 * diffs["scale"]
    assert diffs["core_in_our_apply"] < 1e-4 * diffs["scale"]
