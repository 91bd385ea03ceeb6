"""Compose nodes: several ControlNets, each with its own image, strength, range, mask and schedule, in one pass.

Wire `ZeroConvControlUnit` nodes in a chain (each takes the previous stack), then `ZeroConvComposeControlNets`
turns the stack into one CONTROL_NET for an apply node (ours or core). The sum equals chaining apply nodes
(paper §3: composition by addition); the apply node's own image is not used for composed units.
"""
from __future__ import annotations

from typing import Any

import torch

from ..controlnet_model.accelerate import Acceleration
from ..controlnet_model.hint import HintFit
from ..controlnet_model.schedule import StrengthSchedule
from .apply import control_widgets, settings_from_inputs
from .comfy_adapter import ControlPart, ZeroConvControl, make_control
from .common import CATEGORY, host_image_to_hint


class ZeroConvControlUnit:
    """One ControlNet of a composition, added to a stack."""

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
            "optional": {"stack": ("ZEROCONV_CONTROL_STACK",), "mask": ("MASK",), "schedule": ("ZEROCONV_SCHEDULE",)},
        }

    def add(self, control_net: Any, image: torch.Tensor, strength: float, start_percent: float, end_percent: float,
            control_mode: str = "balanced", fit: str = "crop_and_resize", accelerate: str = "none", stack: tuple = (),
            mask: torch.Tensor | None = None, schedule: StrengthSchedule | None = None) -> tuple:
        if not isinstance(control_net, ZeroConvControl):
            raise ValueError("composition needs ControlNets loaded by ZeroConv's loader; chain core apply nodes instead")
        settings = settings_from_inputs(strength, start_percent, end_percent, control_mode, mask, schedule)
        hint = host_image_to_hint(image)
        parts = tuple(ControlPart(p.controlnet, hint, settings, HintFit(fit), p.name, composed=True,
                                  acceleration=Acceleration(accelerate)) for p in control_net.parts)
        return (tuple(stack) + parts,)


class ZeroConvComposeControlNets:
    """A stack of ControlNet units as one CONTROL_NET, added in a single pass by any apply node."""

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "compose"
    CATEGORY = f"{CATEGORY}/compose"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"stack": ("ZEROCONV_CONTROL_STACK",)}}

    def compose(self, stack: tuple) -> tuple:
        if not stack:
            raise ValueError("the stack is empty; connect at least one ZeroConv Control Unit")
        return (make_control(tuple(stack)),)


NODE_CLASS_MAPPINGS = {"ZeroConvControlUnit": ZeroConvControlUnit,
                       "ZeroConvComposeControlNets": ZeroConvComposeControlNets}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvControlUnit": "ControlNet Unit (ZeroConv)",
                              "ZeroConvComposeControlNets": "Compose ControlNets (ZeroConv)"}
