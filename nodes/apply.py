"""Apply node: a ControlNet with strength, step range, mode, mask and image fit, on positive and negative."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..controlnet_model.accelerate import Acceleration
from ..controlnet_model.hint import HintFit
from ..controlnet_model.residuals import ControlMode, ControlSettings
from ..controlnet_model.schedule import StrengthSchedule
from .comfy_adapter import ZeroConvControl, make_control
from .common import CATEGORY, host_image_to_hint

MODES = [m.value for m in ControlMode]
FITS = [f.value for f in HintFit]
ACCELERATIONS = [a.value for a in Acceleration]


def control_widgets() -> dict:
    """Strength, step range, mode and fit widgets shared by the apply and compose nodes (core names and ranges)."""
    return {
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        "control_mode": (MODES, {"default": "balanced"}),
        "fit": (FITS, {"default": "crop_and_resize", "tooltip": "how the image is fitted to the latent"}),
        "accelerate": (ACCELERATIONS, {"default": "none",
                                       "tooltip": "compile or CUDA-graph the ControlNet forward (CUDA only)"}),
    }


def attach_control(positive: list, negative: list, make: Any) -> tuple[list, list]:
    """New conditioning lists whose dicts carry one new control per distinct previous control (shared by both)."""
    made: dict[int, Any] = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for tensor, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if id(previous) not in made:
                made[id(previous)] = make(previous)
            options["control"], options["control_apply_to_uncond"] = made[id(previous)], False
            entries.append([tensor, options])
        out.append(entries)
    return out[0], out[1]


def settings_from_inputs(strength: float, start_percent: float, end_percent: float, control_mode: str,
                         mask: torch.Tensor | None, schedule: StrengthSchedule | None) -> ControlSettings:
    return ControlSettings(strength=strength, start_percent=start_percent, end_percent=end_percent,
                           mode=ControlMode(control_mode), mask=mask, schedule=schedule)


def controlled(control_net: Any, hint: torch.Tensor, settings: ControlSettings, fit: str, vae: Any,
               acceleration: str = "none") -> Any:
    """A ready control object from ours (all options) or a core CONTROL_NET (balanced, no mask/schedule)."""
    if isinstance(control_net, ZeroConvControl):
        return make_control(tuple(p.applied(hint, settings, HintFit(fit)).with_acceleration(acceleration)
                                  for p in control_net.parts))
    if acceleration != "none" or settings.mode is not ControlMode.BALANCED or settings.mask is not None \
            or settings.schedule is not None:
        raise ValueError("modes other than balanced, masks, schedules and acceleration need a ControlNet loaded "
                         "by ZeroConv's loader; this one came from another loader")
    return control_net.copy().set_cond_hint(hint, settings.strength, (settings.start_percent, settings.end_percent),
                                            vae=vae)


class ZeroConvApplyControlNet:
    """Apply a ControlNet to positive and negative conditioning (same inputs as core Apply ControlNet, and more)."""

    DESCRIPTION = ("Adds a ControlNet to the conditioning. control_mode: balanced; prompt_more_important (soft "
                   "injection 0.825^(N-i)); controlnet_more_important (soft, conditional side only); "
                   "cfg_resolution_weighting (the paper's CFG-RW, w_i = 64/h_i, conditional side only).")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    CATEGORY = f"{CATEGORY}/apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",), **control_widgets(),
            },
            "optional": {"vae": ("VAE",), "mask": ("MASK",), "schedule": ("ZEROCONV_SCHEDULE",)},
        }

    def apply(self, positive: list, negative: list, control_net: Any, image: torch.Tensor, strength: float,
              start_percent: float, end_percent: float, control_mode: str = "balanced", fit: str = "crop_and_resize",
              accelerate: str = "none", vae: Any = None, mask: torch.Tensor | None = None,
              schedule: StrengthSchedule | None = None) -> tuple:
        if strength == 0.0:
            return (positive, negative)
        settings = settings_from_inputs(strength, start_percent, end_percent, control_mode, mask, schedule)
        hint = host_image_to_hint(image)
        control = controlled(control_net, hint, settings, fit, vae, accelerate)
        return attach_control(positive, negative, lambda previous: control.copy().set_previous_controlnet(previous))


class ZeroConvStrengthSchedule:
    """Strength over the steps: keyframes 'percent:multiplier' (hold or linear), for apply and compose nodes."""

    RETURN_TYPES = ("ZEROCONV_SCHEDULE",)
    FUNCTION = "build"
    CATEGORY = f"{CATEGORY}/apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"keyframes": ("STRING", {"default": "0.0:1.0, 0.5:0.5", "multiline": True}),
                             "interpolation": (["hold", "linear"], {"default": "hold"})}}

    def build(self, keyframes: str, interpolation: str) -> tuple:
        return (StrengthSchedule.parse(keyframes, interpolation),)


NODE_CLASS_MAPPINGS = {"ZeroConvApplyControlNet": ZeroConvApplyControlNet,
                       "ZeroConvStrengthSchedule": ZeroConvStrengthSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvApplyControlNet": "Apply ControlNet (ZeroConv)",
                              "ZeroConvStrengthSchedule": "ControlNet Strength Schedule (ZeroConv)"}
