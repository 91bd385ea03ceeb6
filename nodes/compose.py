"""Compose nodes: several ControlNets, each with its own image, strength, range, mode, mask and schedule, in one pass.

Wire `ZeroConvControlUnit` nodes in a chain (each takes the previous unit's stack; three or more controls are
three or more units in a row), then `ZeroConvComposeControlNets` turns the stack into one CONTROL_NET for any
apply node, ours or core. The residuals are summed (paper §3, composition by addition), which equals chaining
one apply node per ControlNet. Units accept ControlNets from our loader and from ComfyUI's own loaders.
"""
from __future__ import annotations

from typing import Any

import torch

from ..controlnet_model.schedule import StrengthSchedule
from .host.control import as_control, make_control
from .common import (CATEGORY, check_inputs, control_widgets, host_image_to_hint, settings_from_inputs,
                     union_widget)


class ZeroConvControlUnit:
    """One ControlNet of a composition, with its own image and settings, added to a stack.

    Args:
        control_net: from any ControlNet loader.
        image: this ControlNet's control image (B, H, W, C).
        strength, start_percent, end_percent, control_mode, fit, accelerate: as on the apply node.
        stack: the units before this one (leave empty for the first).
        mask, schedule, vae, union_type: as on the apply node, for this ControlNet only. Units of the same Union
            file with the same step range, mode, mask, schedule and fit run together in one forward, each type with
            its unit's strength.
    """

    DESCRIPTION = "One ControlNet of a composition: chain units through 'stack', then Compose ControlNets."
    RETURN_TYPES = ("ZEROCONV_CONTROL_STACK",)
    RETURN_NAMES = ("stack",)
    FUNCTION = "add"
    CATEGORY = f"{CATEGORY}/compose"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "control_net": ("CONTROL_NET",), "image": ("IMAGE",), **control_widgets(),
            },
            "optional": {"stack": ("ZEROCONV_CONTROL_STACK",), "mask": ("MASK",), "schedule": ("ZEROCONV_SCHEDULE",),
                         "vae": ("VAE",), **union_widget()},
        }

    def add(self, control_net: Any, image: torch.Tensor, strength: float, start_percent: float, end_percent: float,
            control_mode: str = "balanced", fit: str = "crop_and_resize", accelerate: str = "none", stack: tuple = (),
            mask: torch.Tensor | None = None, schedule: StrengthSchedule | None = None, vae: Any = None,
            union_type: str = "auto") -> tuple:
        check_inputs(type(self), image=image, strength=strength, start_percent=start_percent,
                     end_percent=end_percent, mask=mask)
        settings = settings_from_inputs(strength, start_percent, end_percent, control_mode, mask, schedule)
        control = as_control(control_net).applied(host_image_to_hint(image), settings, fit, vae, accelerate,
                                                  union_type)
        return (tuple(stack or ()) + tuple(part.as_unit() for part in control.parts),)


class ZeroConvComposeControlNets:
    """A stack of ControlNet units as one CONTROL_NET, added in a single pass by any apply node."""

    DESCRIPTION = ("Several ControlNets as one: connect the last ControlNet Unit. In an apply node each unit keeps "
                   "its own image, mode and mask; the apply node's image is not used, its strength multiplies and "
                   "its step range narrows every unit's.")
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "compose"
    CATEGORY = f"{CATEGORY}/compose"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"stack": ("ZEROCONV_CONTROL_STACK",)}}

    def compose(self, stack: tuple) -> tuple:
        if not stack:
            raise ValueError("the stack is empty; connect at least one ZeroConv ControlNet Unit")
        return (make_control(tuple(stack)),)


NODE_CLASS_MAPPINGS = {"ZeroConvControlUnit": ZeroConvControlUnit,
                       "ZeroConvComposeControlNets": ZeroConvComposeControlNets}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvControlUnit": "ControlNet Unit (ZeroConv)",
                              "ZeroConvComposeControlNets": "Compose ControlNets (ZeroConv)"}
