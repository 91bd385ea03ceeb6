"""Union ControlNet against ComfyUI core's own network (comfy/cldm/cldm.py ControlNet with
union_controlnet_num_control_type): the same weights give the same residuals for one type and for "auto"."""
from __future__ import annotations

from .comfyui_host import REQUIRES_COMFYUI, run_in_comfyui

pytestmark = REQUIRES_COMFYUI

BODY = r'''
import json
import comfy.ops
from comfy.cldm.cldm import ControlNet as CoreControlNet
from zeroconv_pack.controlnet_model.config import ControlNetConfig
from zeroconv_pack.controlnet_model.union import UnionConfig, UnionControlNet

# core fixes the Union token width (320) and type sinusoid (256): an SDXL-shaped ControlNet with 320 channels
cfg = UnionConfig(num_control_types=8, type_embed_dim=256).attach(ControlNetConfig(
    family="small SDXL-shaped", model_channels=320, channel_mult=(1, 2), num_res_blocks=1,
    transformer_depth=(None, 1), transformer_depth_middle=1, context_dim=64, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=40))
torch.manual_seed(0)
ours = UnionControlNet(cfg).eval()
with torch.no_grad():
    for p in ours.parameters():
        p.normal_(0, 0.03)
core = CoreControlNet(image_size=None, in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=1,
                      channel_mult=(1, 2), num_classes="sequential", adm_in_channels=40, num_head_channels=64,
                      use_spatial_transformer=True, transformer_depth=[0, 1], context_dim=64,
                      use_linear_in_transformer=True, transformer_depth_middle=1, union_controlnet_num_control_type=8,
                      operations=comfy.ops.disable_weight_init).eval()
# the renaming core's load_controlnet_state_dict makes for Union files
state = {k.replace(".attn.in_proj_", ".attn.in_proj."): v for k, v in ours.state_dict().items()}
missing, unexpected = core.load_state_dict(state, strict=False)
gen = torch.Generator().manual_seed(1)
x = torch.randn(2, 4, 8, 8, generator=gen)
t = torch.tensor([30, 700])
ctx = torch.randn(2, 7, 64, generator=gen)
y = torch.randn(2, 40, generator=gen)
hint = torch.rand(1, 3, 64, 64, generator=gen).expand(2, -1, -1, -1)  # one control image for the batch

def rel(mine, theirs):
    pairs = list(zip(mine.down, theirs["output"])) + [(mine.mid, theirs["middle"][0])]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)

out = {"missing": list(missing), "unexpected": list(unexpected)}
with torch.no_grad():
    for index in (0, 3, 7):
        out[f"type {index}"] = rel(ours(x, None, t, ctx, y, conditions=[(index, hint, 1.0)]),
                                   core(x, hint, t, ctx, y, control_type=[index]))
    out["auto"] = rel(ours(x, hint, t, ctx, y), core(x, hint, t, ctx, y, control_type=[]))
print(json.dumps(out))
'''


def test_single_type_and_auto_equal_core() -> None:
    result = run_in_comfyui(BODY)
    assert not result["missing"] and not result["unexpected"], result
    for key in ("type 0", "type 3", "type 7", "auto"):
        assert result[key] < 1e-5, (key, result)
