"""In a real ComfyUI: Union ControlNets and T2I-Adapters through our nodes against core's loader and apply nodes.

FULL-SIZE random weights (no download): an SDXL Union ProMax-shaped file (8 types, 1.25 G parameters, stored
fp16 as users download it: a lone diffusers-keyed `diffusion_pytorch_model_promax.safetensors`), and full-size
SD1.5 and SDXL T2I-Adapters in TencentARC's layout, made with core's own classes. Each test compares the
`get_control` dicts of one cond + uncond model call (16x16 latent), on the same inputs:
  * Union: our loader + our apply with union_type = core's ControlNetLoader + SetUnionControlNetType +
    ControlNetApplyAdvanced; also our CONTROL_NET through SetUnionControlNetType and core's apply node, and
    SetUnionControlNetType on ours into our apply node (auto);
  * T2I-Adapter: our loader + our apply = core's loader + core's apply (and ours through core's apply).
Core's and our objects are loaded one after the other (peak memory ~ one fp32 copy, 5 GB for the Union file).
Skipped without COMFYUI_PATH. Marked slow: about a minute or two on 2 cores.
"""
from __future__ import annotations

import json

import pytest

from .comfyui_host import REQUIRES_COMFYUI, run_in_comfyui

pytestmark = [*REQUIRES_COMFYUI, pytest.mark.slow]

COMMON = r'''
import gc, json, tempfile
from pathlib import Path
from types import SimpleNamespace
import comfy.model_sampling, folder_paths, nodes
from comfy_extras.nodes_controlnet import SetUnionControlNetType
N = pack.NODE_CLASS_MAPPINGS
folder = Path(tempfile.mkdtemp())
folder_paths.add_model_folder_path("controlnet", str(folder))
class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    pass
ms = Sampling()
model = SimpleNamespace(model_sampling=ms)
gen = torch.Generator().manual_seed(1)

def conds(width, pooled):
    made = lambda: [[torch.randn(1, 77, width, generator=gen), {}]]
    return made(), made()

def call(positive, x, sigma, context, y):
    """One cond + uncond model call of the control the conditioning carries, as ComfyUI's sampler makes it."""
    control = positive[0][1]["control"]
    control.pre_run(model, ms.percent_to_sigma)
    cond = {"c_crossattn": context}
    if y is not None:
        cond["y"] = y
    try:
        with torch.no_grad():
            out = control.get_control(x, torch.full((x.shape[0],), sigma), cond, 2, {"cond_or_uncond": [0, 1]})
    finally:
        control.cleanup()
    return {k: [None if t is None else t.detach().float().clone() for t in v] for k, v in out.items()}

def compare(a, b):
    """max relative difference over every residual; None slots and list lengths must agree."""
    worst, layout = 0.0, True
    for key in set(a) | set(b):
        la, lb = a.get(key) or [], b.get(key) or []
        layout &= len(la) == len(lb) and [t is None for t in la] == [t is None for t in lb]
        for s, t in zip(la, lb):
            if s is not None and t is not None:
                worst = max(worst, float((s - t).abs().max() / t.abs().max().clamp_min(1e-20)))
    return {"rel": worst, "layout": bool(layout)}
'''

UNION = COMMON + r'''
from zeroconv_pack.controlnet_model.checkpoint import export_diffusers
from zeroconv_pack.controlnet_model.config import preset
from zeroconv_pack.controlnet_model.union import UnionConfig, UnionControlNet

cfg = UnionConfig(num_control_types=8, type_embed_dim=256).attach(preset("sdxl"))
torch.set_default_dtype(torch.float16)
with torch.device("meta"):
    net = UnionControlNet(cfg)
net = net.to_empty(device="cpu")
torch.set_default_dtype(torch.float32)
with torch.no_grad():
    for name, p in net.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
params = sum(p.numel() for p in net.parameters())
export_diffusers(net, folder / "repo", dtype=torch.float16)
(folder / "repo" / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model_promax.safetensors")
del net
gc.collect()

name = "diffusion_pytorch_model_promax.safetensors"
pos, neg = conds(2048, True)
image = torch.rand(1, 96, 160, 3, generator=gen)  # another size and aspect: crop and resize, as core
x = torch.randn(2, 4, 16, 16, generator=gen)
context = torch.cat([pos[0][0], neg[0][0]])
y = torch.randn(2, 2816, generator=gen)
sigma = float(ms.percent_to_sigma(0.3))
core_apply = nodes.ControlNetApplyAdvanced().apply_controlnet
our_apply = N["ZeroConvApplyControlNet"]().apply
set_type = SetUnionControlNetType().set_controlnet_type

core = nodes.ControlNetLoader().load_controlnet(name)[0]
core_dtype = str(next(core.control_model.parameters()).dtype)
out = {"params": params}
core_out = {t: call(core_apply(pos, neg, set_type(core, t)[0], image, 0.8, 0.0, 1.0)[0], x, sigma, context, y)
            for t in ("depth", "canny/lineart/anime_lineart/mlsd", "auto")}
del core
gc.collect()

ours = N["ZeroConvLoadControlNet"]().load(name)[0]
part = ours.parts[0]
out["ours_is_native"] = part.host is None and type(part.controlnet).__name__ == "UnionControlNet"
out["types"] = part.controlnet.num_control_types
out["dtypes"] = [core_dtype, str(part.controlnet.dtype)]
runs = {
    "depth_union_type": call(our_apply(pos, neg, ours, image, 0.8, 0.0, 1.0, union_type="depth")[0],
                            x, sigma, context, y),
    "canny_union_type": call(our_apply(pos, neg, ours, image, 0.8, 0.0, 1.0, union_type="canny")[0],
                            x, sigma, context, y),
    "depth_core_node_our_apply": call(our_apply(pos, neg, set_type(ours, "depth")[0], image, 0.8, 0.0, 1.0)[0],
                                      x, sigma, context, y),
    "depth_core_node_core_apply": call(core_apply(pos, neg, set_type(ours, "depth")[0], image, 0.8, 0.0, 1.0)[0],
                                       x, sigma, context, y),
    "auto": call(our_apply(pos, neg, ours, image, 0.8, 0.0, 1.0)[0], x, sigma, context, y),
}
against = {"depth_union_type": "depth", "canny_union_type": "canny/lineart/anime_lineart/mlsd",
           "depth_core_node_our_apply": "depth", "depth_core_node_core_apply": "depth", "auto": "auto"}
for key, run in runs.items():
    out[key] = compare(run, core_out[against[key]])
out["types_differ"] = compare(core_out["depth"], core_out["canny/lineart/anime_lineart/mlsd"])["rel"]
print(json.dumps(out))
'''

T2I = COMMON + r'''
from safetensors.torch import save_file
from comfy.t2i_adapter.adapter import Adapter

shapes = {  # TencentARC's full adapters: SD1.5 (t2iadapter_*_sd15v2) and SDXL (t2i-adapter-*-sdxl-1.0)
    "t2iadapter_canny_sd15v2.safetensors": dict(cin=64, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1,
                                                 sk=True, use_conv=False, xl=False),
    "t2iadapter_canny_sdxl.safetensors": dict(cin=256, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1,
                                              sk=True, use_conv=False, xl=True),
}
core_apply = nodes.ControlNetApplyAdvanced().apply_controlnet
our_apply = N["ZeroConvApplyControlNet"]().apply
out = {}
for name, kwargs in shapes.items():
    adapter = Adapter(**kwargs)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(folder / name))
    xl = kwargs["xl"]
    pos, neg = conds(2048 if xl else 768, xl)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.cat([pos[0][0], neg[0][0]])
    y = torch.randn(2, 2816, generator=gen) if xl else None
    image = torch.rand(1, 120, 136, 3, generator=gen)  # another aspect: cropped as core
    sigma = float(ms.percent_to_sigma(0.3))
    core = nodes.ControlNetLoader().load_controlnet(name)[0]
    ours = N["ZeroConvLoadControlNet"]().load(name)[0]
    theirs = call(core_apply(pos, neg, core, image, 0.7, 0.0, 1.0)[0], x, sigma, context, y)
    row = {"native": ours.parts[0].host is None and type(ours.parts[0].controlnet).__name__ == "T2IAdapter",
           "kind": ours.parts[0].controlnet.config.kind.value,
           "input_len": [len(theirs["input"]), len(call(our_apply(pos, neg, ours, image, 0.7, 0.0, 1.0)[0],
                                                        x, sigma, context, y)["input"])],
           "ours": compare(call(our_apply(pos, neg, ours, image, 0.7, 0.0, 1.0)[0], x, sigma, context, y), theirs),
           "ours_in_core_apply": compare(call(core_apply(pos, neg, ours, image, 0.7, 0.0, 1.0)[0], x, sigma,
                                              context, y), theirs)}
    try:
        our_apply(pos, neg, ours, image, 0.7, 0.0, 1.0, union_type="canny")
        row["union_type_error"] = ""
    except ValueError as exc:
        row["union_type_error"] = str(exc)
    out[name] = row
print(json.dumps(out))
'''


def test_union_through_our_nodes_equals_core_loader_set_type_and_apply() -> None:
    out = run_in_comfyui(UNION, timeout=1200)
    print(json.dumps(out, indent=1))
    assert out["ours_is_native"] and out["types"] == 8 and out["params"] > 1.2e9
    assert out["types_differ"] > 1e-2  # the type matters, so equality below is meaningful
    for key in ("depth_union_type", "canny_union_type", "depth_core_node_our_apply", "depth_core_node_core_apply",
                "auto"):
        assert out[key]["layout"] and out[key]["rel"] < 1e-4, (key, out[key])


def test_t2i_adapters_through_our_nodes_equal_core() -> None:
    out = run_in_comfyui(T2I, timeout=900)
    print(json.dumps(out, indent=1))
    for name, row in out.items():
        assert row["native"], (name, row)
        assert row["input_len"][0] == row["input_len"][1], (name, row)
        for key in ("ours", "ours_in_core_apply"):
            assert row[key]["layout"] and row[key]["rel"] < 1e-5, (name, key, row[key])
        assert "T2I-Adapter, which has no control types" in row["union_type_error"], row
    assert out["t2iadapter_canny_sdxl.safetensors"]["kind"] == "full_adapter_xl"
