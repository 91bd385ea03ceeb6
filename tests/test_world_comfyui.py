"""The demo-world workflow in a real ComfyUI: our world-base loader hands ComfyUI its own ModelPatcher, and core
CLIPTextEncode, EmptyLatentImage, KSampler and VAEDecode with our ControlNet nodes draw the same picture as
`zeroconv run workflows/demo_world.json` on ComfyUI's executor; the offline run (library DDIM) draws a close one.

Needs a ComfyUI checkout at COMFYUI_PATH (and COMFYUI_PYTHON, an interpreter with its requirements, if not this
one); skipped otherwise. The base and ControlNet have random weights (made here), so no file
from models/ is needed.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zeroconv.controlnet_model.checkpoint import save_controlnet
from zeroconv.controlnet_model.from_unet import init_from_unet
from zeroconv.demo.world_base import build_world_base, save_world_base
from zeroconv.workflow_runner import run_workflow
from zeroconv.workflow_runner.files import HostPaths

from .comfyui_host import REQUIRES_COMFYUI, run_cli_in_comfyui, run_in_comfyui

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "demo_world.json"
CAPTION = "red circle with blue background"  # the workflow's prompt

pytestmark = REQUIRES_COMFYUI

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    import comfy.model_patcher, folder_paths, nodes as core
    N = pack.NODE_CLASS_MAPPINGS

    base_file, controlnet_file, outline_file, out_file = ARGS
    folder_paths.add_model_folder_path("controlnet", str(Path(controlnet_file).parent))
    model, clip, vae = N["ZeroConvLoadWorldBase"]().load(base_file)
    assert isinstance(model, comfy.model_patcher.ModelPatcher), type(model)
    positive = core.CLIPTextEncode().encode(clip, {caption!r})[0]
    negative = core.CLIPTextEncode().encode(clip, "")[0]
    latent = core.EmptyLatentImage().generate(64, 64, 1)[0]
    control = N["ZeroConvLoadControlNet"]().load(Path(controlnet_file).name)[0]
    image = torch.from_numpy(np.asarray(Image.open(outline_file).convert("RGB"), np.float32) / 255.0)[None]
    pictures = {{}}
    for name, (pos, neg) in {{"with": N["ZeroConvApplyControlNet"]().apply(positive, negative, control, image, 1.0,
                                                                          0.0, 1.0),
                             "without": (positive, negative)}}.items():
        sampled = core.KSampler().sample(model, 2024, 20, 3.0, "ddim", "ddim_uniform", pos, neg, latent, 1.0)[0]
        decoded = core.VAEDecode().decode(vae, sampled)[0]
        pictures[name] = np.clip(decoded[0].numpy() * 255.0, 0, 255).astype(np.uint8).tolist()
    Path(out_file).write_text(json.dumps(pictures))
    print(json.dumps({{"ok": True}}))
""").format(caption=CAPTION)


def _random(module: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


@pytest.fixture(scope="module")
def world_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("world")
    base = build_world_base(seed=0, latent_scale_factor=1.7)
    _random(base.unet, 0.02, 1)
    save_world_base(base, folder / "world_base.safetensors", dtype=torch.float32)
    controlnet, _ = init_from_unet(base.unet)
    for module in (*controlnet.zero_convs, controlnet.middle_block_out):  # trained ControlNets have non-zero convs
        _random(module, 0.5, 2)
    (folder / "cn").mkdir()
    save_controlnet(controlnet, folder / "cn" / "world_controlnet.safetensors")
    return {"base": folder / "world_base.safetensors", "controlnet": folder / "cn" / "world_controlnet.safetensors",
            "folder": folder}


def test_demo_world_workflow_draws_the_same_picture_in_comfyui(world_files: dict[str, Path]) -> None:
    outline = REPO / "workflows" / "inputs" / "world_outline.png"
    out = world_files["folder"] / "comfyui.json"
    args = [str(world_files["base"]), str(world_files["controlnet"]), str(outline), str(out)]
    assert run_in_comfyui(f"ARGS = {args!r}\n" + SCRIPT) == {"ok": True}
    theirs = {k: np.array(v, dtype=np.uint8) for k, v in json.loads(out.read_text()).items()}
    changed = theirs["with"] != theirs["without"]  # random weights saturate most pixels; the control moves others
    assert changed.mean() > 0.01

    done = run_cli_in_comfyui(["run", str(WORKFLOW), "--host", "comfyui", "--set",
                               f"1.base_name={world_files['base']}", "--controlnet-dir",
                               str(world_files["controlnet"].parent), "--input-dir", str(outline.parent),
                               "--output-dir", str(world_files["folder"] / "comfy_out")])
    assert done.returncode == 0, done.stderr[-3000:]
    executed = np.asarray(Image.open(done.stdout.strip().splitlines()[-1]).convert("RGB"))
    assert np.abs(executed.astype(int) - theirs["with"].astype(int)).max() <= 1  # 8-bit rounding only

    paths = HostPaths(input_dir=outline.parent, output_dir=world_files["folder"] / "out",
                      controlnet_dir=world_files["controlnet"].parent, base_dir=WORKFLOW.parent)
    result = run_workflow(WORKFLOW, paths, overrides=[f"1.base_name={world_files['base']}"])
    offline = np.asarray(Image.open(result.saved[0]).convert("RGB")).astype(int)
    to_with, to_without = (np.abs(offline - theirs[k].astype(int)).mean() for k in ("with", "without"))
    print(f"offline vs ComfyUI: mean |diff| {to_with:.2f} (with control), {to_without:.2f} (without)")
    # the library's DDIM draws ComfyUI's picture (measured: mean |diff| 0.02 of 255; 0.40 to the uncontrolled one)
    assert offline.shape == (64, 64, 3) and to_with < 0.2 and to_with < to_without
