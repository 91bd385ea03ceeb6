"""T2I-Adapters against ComfyUI's own code (comfy/t2i_adapter/adapter.py, comfy/controlnet.py load_t2i_adapter):
the same file gives the same features in the same 'input' / 'middle' slots, odd latent sides included."""
from __future__ import annotations

import pytest

from .comfyui_host import REQUIRES_COMFYUI, run_in_comfyui

pytestmark = REQUIRES_COMFYUI

BODY = r'''
import json, tempfile, os
from safetensors.torch import save_file
import comfy.controlnet
from comfy.t2i_adapter.adapter import Adapter, Adapter_light
import zeroconv_pack.controlnet_model.checkpoint as ck
from zeroconv_pack.controlnet_model.config import ControlNetConfig
from zeroconv_pack.controlnet_model.t2i_adapter import place_features

def unet(mult):  # an LDM U-Net layout of that shape (placement needs only the layout)
    return ControlNetConfig(family="test", model_channels=32, channel_mult=mult, num_res_blocks=2,
                            transformer_depth=(None,) * len(mult), transformer_depth_middle=None, num_heads=1)

cases = {
    "sd1": (Adapter(cin=192, channels=[32, 64, 128, 128], nums_rb=2, ksize=1, sk=True, use_conv=False, xl=False),
            (104, 72), unet((1, 2, 4, 4))),
    "xl": (Adapter(cin=768, channels=[32, 64, 128, 128], nums_rb=2, ksize=1, sk=True, use_conv=False, xl=True),
           (112, 80), unet((1, 2, 4))),
    "light": (Adapter_light(cin=192, channels=[320, 640, 1280, 1280], nums_rb=4), (104, 72), None),
}
result = {}
tmp = tempfile.mkdtemp()
for name, (model, size, config) in cases.items():
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = os.path.join(tmp, name + ".safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    hint = torch.rand(2, 3, *size)
    from safetensors.torch import load_file
    core = comfy.controlnet.load_t2i_adapter(load_file(path)).t2i_model
    with torch.no_grad():
        theirs = core(hint)
        loaded = ck.load_t2i_adapter(path)
        ours = place_features(loaded.model(hint), loaded.config, config)
    mine = {"input": list(reversed(ours.input)), "middle": [ours.mid] if ours.mid is not None else []}
    diffs, layout_ok = [], True
    for key in theirs:
        a_list, b_list = theirs[key], mine[key]
        n = len(b_list)
        layout_ok &= [t is None for t in a_list[-n:]] == [t is None for t in b_list] if n else True
        layout_ok &= all(t is None for t in a_list[:len(a_list) - n])
        for a, b in zip(a_list[-n:], b_list):
            if a is not None and b is not None:
                diffs.append(float((a - b).abs().max() / a.abs().max()))
    result[name] = {"layout_ok": bool(layout_ok), "max_rel": max(diffs), "count": len(diffs), "kind": loaded.config.kind.value}
print(json.dumps(result))
'''


def test_features_and_slots_equal_comfyuis() -> None:
    result = run_in_comfyui(BODY)
    for name, row in result.items():
        assert row["layout_ok"], (name, row)
        assert row["count"] == 4 and row["max_rel"] < 1e-5, (name, row)
    assert result["xl"]["kind"] == "full_adapter_xl" and result["light"]["kind"] == "light_adapter"
