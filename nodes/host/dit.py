"""Flux and SD3 hosts: which family the sampled MODEL is, the family check, the VAE encode and the weights an
SD3.5 ControlNet borrows from its host. The rules are the library's (`controlnet_model/dit_control.py`,
`config.check_family`); this module only reads ComfyUI's objects.

ComfyUI's sampler hands `pre_run` its `comfy.model_base.BaseModel`: `comfy.model_base.Flux` (and subclasses: Flux
inpaint, schnell, Kontext) for Flux.1, `comfy.model_base.SD3` for SD3 / SD3.5. Their transformers add the
residuals of the control dict themselves (comfy/ldm/flux/model.py: "input" after double blocks, "output" after
single blocks; comfy/ldm/modules/diffusionmodules/mmdit.py: "output" after joint blocks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ...controlnet_model.config import ControlNetConfig, check_family
from ...controlnet_model.residuals import ControlMode, control_kind
from ...controlnet_model.dit_control import dit_format_of, needs_vae, spec_of, union_mode_of
from . import comfy_available

# comfy.model_base class names (any base class counts) and unet_config markers, to a library family
HOST_CLASSES = {"Flux": "flux", "SD3": "sd3"}
HOST_MARKERS = (("image_model", "flux", "flux"), ("pos_embed_scaling_factor", None, "sd3"))


# dtypes a family's ControlNets run in, in ComfyUI's order of preference (comfy/supported_models.py Flux, SD3)
FAMILY_DTYPES = {"flux": (torch.bfloat16, torch.float16, torch.float32),
                 "sd3": (torch.float16, torch.bfloat16, torch.float32)}


def file_family(path: Path) -> str | None:
    """"flux" or "sd3" for a transformer ControlNet file (by its marker keys; no tensor is read), else None."""
    from ...controlnet_model.checkpoint import detect_format
    from ...controlnet_model.dit_control import DIT_FORMATS
    from ...controlnet_model.safetensors_io import open_weights

    try:
        fmt = detect_format(open_weights(path).keys())
    except (ValueError, KeyError, OSError):
        return None
    fmt = getattr(fmt, "value", fmt)
    return DIT_FORMATS[fmt].family if fmt in DIT_FORMATS else None


def transformer_family(model: Any) -> str | None:
    """"flux" or "sd3" when the sampled model is a Flux.1 or SD3 transformer, else None (a U-Net, or unknown)."""
    for cls in type(model).__mro__:
        if cls.__name__ in HOST_CLASSES:
            return HOST_CLASSES[cls.__name__]
    unet_config = getattr(getattr(model, "model_config", None), "unet_config", None)
    if isinstance(unet_config, dict):
        for key, value, family in HOST_MARKERS:
            if key in unet_config and unet_config[key] == value:
                return family
    return None


def check_part(controlnet: Any, host_family: str | None, unet_config: ControlNetConfig | None, name: str,
               model_name: str) -> None:
    """One of our control models against the sampled model, before the first step; a mismatch names both.
    host_family: transformer_family(model); unet_config: the U-Net's config when the model is a U-Net."""
    fmt = dit_format_of(controlnet)
    if fmt is not None:
        host = host_family or (unet_config.family if unet_config is not None else None)
        if host is not None:
            check_family(spec_of(fmt).family, host, f"ControlNet {name}", model_name)
    elif host_family is not None:
        check_family(controlnet.config.family, host_family, f"ControlNet {name}", model_name)
    elif unet_config is not None:  # a U-Net control model: its kind's own check (CONTROL_KINDS)
        control_kind(controlnet).check(controlnet, unet_config, name, model_name)


def check_apply(controlnet: Any, vae: Any, union_type: str, name: str, mode: ControlMode = ControlMode.BALANCED) -> None:
    """What an apply node can refuse at once for a transformer ControlNet: a latent format without a VAE, a union
    mode the file does not have, a control mode other than balanced (those scale U-Net residuals)."""
    fmt = dit_format_of(controlnet)
    if fmt is None:
        return
    if ControlMode(mode) is not ControlMode.BALANCED:
        raise ValueError(f"control_mode: {ControlMode(mode).value!r} applies to U-Net ControlNets; use 'balanced' "
                         f"with {name} ({fmt})")
    union_mode_of(controlnet, union_type, name)
    if vae is None and needs_vae(fmt):
        raise ValueError(f"vae: {name} ({fmt}) encodes its control image with the base model's VAE; connect the "
                         "model's VAE to the vae input of this node")


def borrow_host_weights(controlnet: Any, model: Any) -> None:
    """An SD3.5 ControlNet takes the host's patch embedding before the first step (ComfyUI ControlNetSD35.pre_run)."""
    borrow = getattr(controlnet, "borrow_from_host", None)
    diffusion_model = getattr(model, "diffusion_model", None)
    if borrow is None or diffusion_model is None:
        return
    wanted = set(controlnet.host_keys())
    borrow({k: v for k, v in diffusion_model.state_dict().items() if k in wanted})


def vae_encoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The VAE as pixels (B, 3, H, W) in [0, 1] -> raw latent; inside ComfyUI the models loaded before are loaded
    again after the encode (as comfy/controlnet.py ControlNet.get_control does). None when there is no VAE."""
    if vae is None:
        return None

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        if not comfy_available():
            return vae.encode(pixels.movedim(1, -1))
        import comfy.model_management as mm

        loaded = mm.loaded_models(only_currently_used=True)
        latent = vae.encode(pixels.movedim(1, -1))
        mm.load_models_gpu(loaded)
        return latent

    return encode
