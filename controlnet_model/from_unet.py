"""A fresh ControlNet from a base U-Net's weights (Zhang et al. 2023 §3.2; cldm tool_add_control.py)."""
from __future__ import annotations

import torch
from torch import nn

from .config import ControlNetConfig, check_compatible
from .keymaps import INIT_FRESH_PREFIXES, INIT_FROM_UNET_PREFIXES
from .network import ControlNet


def unet_twin(control_key: str) -> str | None:
    """The base U-Net key a ControlNet key was copied from, or None for the ControlNet's own modules."""
    for control_prefix, unet_prefix in INIT_FROM_UNET_PREFIXES:
        if control_key.startswith(control_prefix):
            return unet_prefix + control_key[len(control_prefix):]
    return None


def init_from_unet(unet: nn.Module, config: ControlNetConfig | None = None,
                   hint_channels: int | None = None) -> tuple[ControlNet, list[str]]:
    """Copy time/label embeddings, input blocks and middle block; return the ControlNet and its fresh keys.

    Fresh keys are the condition encoder and the zero convolutions (zero-initialised); any other key the
    U-Net cannot supply is an error, since the copy would silently not be a copy.
    """
    unet_config = getattr(unet, "config", None)
    config = config or unet_config
    if config is None:
        raise ValueError("the U-Net carries no ControlNetConfig; pass config= describing its architecture")
    if unet_config is not None:
        check_compatible(config, unet_config, "the requested ControlNet config", "the base U-Net")
    if hint_channels is not None:
        config = config.replace(hint_channels=hint_channels)
    controlnet = ControlNet(config)
    unet_state = unet.state_dict()
    target = controlnet.state_dict()
    fresh, missing = [], []
    with torch.no_grad():
        for key, tensor in target.items():
            source = unet_twin(key)
            if source is not None and source in unet_state:
                if unet_state[source].shape != tensor.shape:
                    raise ValueError(f"cannot copy {source} {tuple(unet_state[source].shape)} into ControlNet "
                                     f"{key} {tuple(tensor.shape)}: the config does not describe this U-Net")
                tensor.copy_(unet_state[source])
            elif key.startswith(INIT_FRESH_PREFIXES):
                fresh.append(key)
            else:
                missing.append(key)
    if missing:
        raise KeyError(f"the base U-Net lacks {len(missing)} weights the ControlNet copies, e.g. {missing[:5]}; "
                       "is it an LDM-layout U-Net of the same family?")
    return controlnet.to(next(unet.parameters()).dtype), fresh
