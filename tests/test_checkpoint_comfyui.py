"""ComfyUI core reads what we write: our native file and our diffusers export load in `comfy.controlnet` with every
key placed and the same weights. Needs a ComfyUI checkout at COMFYUI_PATH (COMFYUI_PYTHON: an interpreter with
its requirements, if not this one); skipped otherwise. SD1.5-shaped (ComfyUI detects the family from the keys),
two levels to stay small; random weights, nothing downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zeroconv.controlnet_model import ControlNet, ControlNetConfig, preset
from zeroconv.controlnet_model.checkpoint import export_diffusers, save_controlnet

from .conftest import randomize

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run in ComfyUI")]

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, sys.argv[1])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.controlnet, comfy.utils
    warnings = []
    logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: warnings.append(r.getMessage())})())
    out = {}
    for path in sys.argv[2:]:
        control = comfy.controlnet.load_controlnet(path)
        state = {k: v.float() for k, v in control.control_model.state_dict().items()}
        out[path] = {"keys": sorted(state), "sums": {k: float(v.double().sum()) for k, v in state.items()}}
    out["warnings"] = [w for w in warnings if "missing" in w or "leftover" in w or "unexpected" in w]
    print(json.dumps(out))
""")


def _comfy_load(*paths) -> dict:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, "-c", SCRIPT, COMFYUI_PATH, *map(str, paths)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_read_as(result: dict, path, model: ControlNet, dtype: torch.dtype) -> None:
    """Every key placed (nothing missing or left over) and each tensor's sum equal to ours in the file dtype."""
    state = model.state_dict()
    assert result["warnings"] == []
    assert result[str(path)]["keys"] == sorted(state)
    for key, value in state.items():
        assert result[str(path)]["sums"][key] == pytest.approx(float(value.to(dtype).double().sum()), rel=1e-9,
                                                               abs=1e-9), key


def test_comfyui_core_loads_our_native_file(tmp_path) -> None:
    cfg = ControlNetConfig(family="SD1.x", model_channels=320, channel_mult=(1, 2), num_res_blocks=1,
                           transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=768, num_heads=8)
    model = randomize(ControlNet(cfg), seed=3, std=0.02)
    native = save_controlnet(model, tmp_path / "cn_native.safetensors", dtype=torch.float16)
    _assert_read_as(_comfy_load(native), native, model, torch.float16)


@pytest.mark.slow
def test_comfyui_core_loads_our_full_size_diffusers_export(tmp_path) -> None:
    """ComfyUI recognises diffusers ControlNets by their full-size shapes, so this one is SD1.5-sized (fp16)."""
    model = randomize(ControlNet(preset("sd15")), seed=3, std=0.02)
    folder = export_diffusers(model, tmp_path / "cn_diffusers", dtype=torch.float16)
    weights = folder / "diffusion_pytorch_model.safetensors"
    _assert_read_as(_comfy_load(weights), weights, model, torch.float16)
