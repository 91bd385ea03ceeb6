"""SDXL ControlNets with attention levels of 0 transformer layers (diffusers' "small" and "mid" files): ZeroConv
follows diffusers, ComfyUI does not, and this pins both (README, "Where ControlNet files load").

diffusers' Transformer2DModel with num_layers=0 still holds norm, proj_in and proj_out and applies them
(diffusers/models/transformers/transformer_2d.py), so such a level is not the identity. ComfyUI's loader
(comfy/controlnet.py, load_controlnet_state_dict) builds no transformer where the depth is 0 and reports those
weights as "leftover keys"; its residuals then differ from the ones the model was trained with. The model here is
full-size (ComfyUI recognises diffusers ControlNets only by the full SDXL small shapes) with random weights; the
attention levels (2 and 3, and the middle) keep norm/proj with 0 layers. Needs a ComfyUI at COMFYUI_PATH.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zeroconv.controlnet_model.blocks import timestep_embedding
from zeroconv.controlnet_model.checkpoint import load_controlnet

from .comfyui_host import REQUIRES_COMFYUI, run_in_comfyui
from .conftest import randomize

pytestmark = REQUIRES_COMFYUI

TOLERANCE = 1e-4  # ZeroConv against diffusers, fp32 (as tests/test_diffusers_parity.py)
SMALL = dict(in_channels=4, conditioning_channels=3, layers_per_block=2, block_out_channels=(320, 640, 1280),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             transformer_layers_per_block=(0, 0, 0), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816)
# diffusers' transformer_layers_per_block for each file kind, and the ZeroConv config it must load as
KINDS = {"small": ((0, 0, 0), (None, 0, 0), 0), "mid": ((0, 0, 1), (None, 0, 1), 1)}

COMFY_BODY = textwrap.dedent("""
    import json, logging
    import comfy.controlnet
    from safetensors.torch import load_file, save_file
    warnings = []
    logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: warnings.append(r.getMessage())})())
    inputs = load_file(INPUTS)
    model = comfy.controlnet.load_controlnet(WEIGHTS).control_model.float().eval()
    with torch.no_grad():
        out = model(inputs["x"], inputs["hint"], inputs["t"].float(), inputs["context"], y=inputs["y"])
    res = {f"r{i:02d}": r.contiguous() for i, r in enumerate([*out["output"], *out["middle"]])}
    save_file(res, OUTPUTS)
    print(json.dumps({"leftover": [w for w in warnings if "leftover" in w]}))
""")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("kind", list(KINDS))
def test_sdxl_zero_layer_levels_zeroconv_equals_diffusers_comfyui_differs(kind: str, tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers", reason="needs the test extra (diffusers)")
    layers, depth, depth_middle = KINDS[kind]
    torch.manual_seed(0)
    theirs = randomize(diffusers.ControlNetModel(**dict(SMALL, transformer_layers_per_block=layers)), seed=3,
                       std=0.02).eval()
    theirs.save_pretrained(tmp_path / "cn")
    weights = tmp_path / "cn" / "diffusion_pytorch_model.safetensors"

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([17, 650])
    context = torch.randn(2, 7, 2048, generator=gen)
    hint = torch.rand(2, 3, 64, 64, generator=gen)
    text = torch.randn(2, 1280, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [832, 1216, 0, 0, 1024, 1024]])
    y = torch.cat([text, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=-1)  # SDXL's ADM vector

    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False,
                           added_cond_kwargs={"text_embeds": text, "time_ids": time_ids})
        reference = [*down, mid]
        loaded = load_controlnet(tmp_path / "cn")
        assert (loaded.config.transformer_depth, loaded.config.transformer_depth_middle) == (depth, depth_middle)
        ours = loaded.model.float().eval()(x, hint, t, context, y).all
    assert max(_rel(a, b) for a, b in zip(ours, reference, strict=True)) < TOLERANCE

    save_file({"x": x, "t": t, "context": context, "hint": hint, "y": y}, tmp_path / "inputs.safetensors")
    names = {"INPUTS": tmp_path / "inputs.safetensors", "WEIGHTS": weights, "OUTPUTS": tmp_path / "comfy.safetensors"}
    result = run_in_comfyui("".join(f"{k} = {str(v)!r}\n" for k, v in names.items()) + COMFY_BODY)
    comfy_out = load_file(tmp_path / "comfy.safetensors")
    comfy = [comfy_out[k] for k in sorted(comfy_out)]
    assert len(comfy) == len(reference)
    # ComfyUI drops the norm/proj weights of the 0-layer levels ...
    assert result["leftover"] and "proj_in" in result["leftover"][0] and "norm" in result["leftover"][0]
    per_residual = [_rel(a, b) for a, b in zip(comfy, reference)]
    # ... so the residuals after the first attention level differ; the ones before it agree
    first_attention = 1 + 2 + 1  # conv_in, level 1's two res blocks and its downsampler come before level 2
    assert max(per_residual[:first_attention]) < TOLERANCE
    print(json.dumps({"kind": kind, "comfyui_vs_diffusers_max_rel": max(per_residual),
                      "per_residual": [round(r, 4) for r in per_residual]}))
    assert max(per_residual) > 0.05
