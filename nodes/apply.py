"""Apply node: a ControlNet with strength, step range, mode, mask, schedule and image fit, on positive and negative.

Inputs shared with core Apply ControlNet (ControlNetApplyAdvanced) keep its names, defaults and ranges. It takes
a CONTROL_NET from our loader, our compose node, or ComfyUI's own loaders, and chains after controls already in
the conditioning (core or ours) the way core does.
"""
from __future__ import annotations

from typing import Any

import torch

from ..controlnet_model.schedule import StrengthSchedule
from .host.control import as_control
from .common import (CATEGORY, check_inputs, control_widgets, host_image_to_hint, settings_from_inputs,
                     union_widget)


def attach_control(positive: list, negative: list, control: Any) -> tuple[list, list]:
    """New conditioning lists whose dicts carry the control, one copy per distinct previous control, shared by
    positive and negative (so ComfyUI batches cond and uncond in one call); the inputs are not modified."""
    made: dict[int, Any] = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for tensor, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if id(previous) not in made:
                made[id(previous)] = control.copy().set_previous_controlnet(previous)
            options["control"], options["control_apply_to_uncond"] = made[id(previous)], False
            entries.append([tensor, options])
        out.append(entries)
    return out[0], out[1]


class ZeroConvApplyControlNet:
    """Apply a ControlNet to positive and negative conditioning (core Apply ControlNet's inputs, and more).

    Args:
        positive, negative: the conditioning to control.
        control_net: from any ControlNet loader, or a composition.
        image: the control image (B, H, W, C); grey and RGBA are accepted (alpha composites over black).
        strength, start_percent, end_percent: as core; strength 0 leaves the conditioning as it is.
        control_mode, fit, accelerate: see the tooltips.
        vae: the base's VAE, for ControlNets whose hint is a VAE latent (InstantX / Shakker Flux, SD3, SD3.5);
            SD1.x/SDXL and XLabs / Mistoline Flux ControlNets do not use it.
        mask: where the control acts (1) or not (0); any size (resized per residual), one or one per latent.
        schedule: a ZeroConv strength schedule, multiplying strength over the steps.
        union_type: a union ControlNet's control type by name ("auto": core's auto, or the type core's
            SetUnionControlNetType set; SDXL Union files take ComfyUI's type names, Flux union files Flux's mode
            names); a type the file lacks, or a type for a plain ControlNet or T2I-Adapter, is refused before sampling.
    """

    DESCRIPTION = ("Adds a ControlNet to the conditioning. control_mode: balanced; prompt_more_important (soft "
                   "injection 0.825^(N-i)); controlnet_more_important (soft, conditional side only); "
                   "cfg_resolution_weighting (the paper's CFG-RW, w_i = 64/h_i, conditional side only). "
                   "A composed CONTROL_NET keeps each unit's own image, mode and mask; strength and range here "
                   "scale and narrow all of them.")
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
            "optional": {"vae": ("VAE",), "mask": ("MASK",), "schedule": ("ZEROCONV_SCHEDULE",), **union_widget()},
        }

    def apply(self, positive: list, negative: list, control_net: Any, image: torch.Tensor, strength: float,
              start_percent: float, end_percent: float, control_mode: str = "balanced", fit: str = "crop_and_resize",
              accelerate: str = "none", vae: Any = None, mask: torch.Tensor | None = None,
              schedule: StrengthSchedule | None = None, union_type: str = "auto") -> tuple:
        check_inputs(type(self), image=image, strength=strength, start_percent=start_percent,
                     end_percent=end_percent, mask=mask)
        if strength == 0.0:
            return (positive, negative)
        settings = settings_from_inputs(strength, start_percent, end_percent, control_mode, mask, schedule)
        control = as_control(control_net).applied(host_image_to_hint(image), settings, fit, vae, accelerate,
                                                  union_type)
        return attach_control(positive, negative, control)


class ZeroConvStrengthSchedule:
    """Strength over the steps: keyframes 'percent:multiplier' (hold or linear), for apply and unit nodes."""

    DESCRIPTION = ("Keyframes of sampling progress (0 = first step, 1 = last) to a strength multiplier, e.g. "
                   "'0:1.0, 0.5:0.3'. Where the multiplier is 0 the ControlNet's forward is skipped.")
    RETURN_TYPES = ("ZEROCONV_SCHEDULE",)
    RETURN_NAMES = ("schedule",)
    FUNCTION = "build"
    CATEGORY = f"{CATEGORY}/apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"keyframes": ("STRING", {"default": "0.0:1.0, 0.5:0.5", "multiline": True}),
                             "interpolation": (["hold", "linear"], {"default": "hold"})}}

    def build(self, keyframes: str, interpolation: str) -> tuple:
        try:
            return (StrengthSchedule.parse(keyframes, interpolation),)
        except ValueError as exc:
            raise ValueError(f"keyframes: {exc}") from None


NODE_CLASS_MAPPINGS = {"ZeroConvApplyControlNet": ZeroConvApplyControlNet,
                       "ZeroConvStrengthSchedule": ZeroConvStrengthSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvApplyControlNet": "Apply ControlNet (ZeroConv)",
                              "ZeroConvStrengthSchedule": "ControlNet Strength Schedule (ZeroConv)"}
