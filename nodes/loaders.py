"""Loader node: any ControlNet file to a CONTROL_NET that our and ComfyUI's apply nodes accept."""
from __future__ import annotations

import logging
from typing import Any

from ..annotators.registry import suggest_annotator
from ..controlnet_model.checkpoint import load_controlnet, load_controlnet_cached
from .comfy_adapter import ControlPart, make_control
from .common import CATEGORY, list_controlnets, resolve_controlnet

logger = logging.getLogger(__name__)


class ZeroConvLoadControlNet:
    """Load a ControlNet checkpoint (LDM v1.0/v1.1 layouts, pruned fp16, our native files)."""

    DESCRIPTION = "Loads a ControlNet file from the controlnet model folder; the result works with core apply nodes too."
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"control_net_name": (list_controlnets(), {"tooltip": "file in models/controlnet"})},
                "optional": {"model": ("MODEL", {"tooltip": "the base model, for diff and Control-LoRA files"})}}

    def load(self, control_net_name: str, model: Any = None) -> tuple:
        path = resolve_controlnet(control_net_name)
        if model is None:
            loaded = load_controlnet_cached(path)
        else:  # relative to this base model: not cached across models
            loaded = load_controlnet(path, base_unet=model.model.diffusion_model)
        if loaded.metadata.control_type:
            suggestion = suggest_annotator(loaded.metadata.control_type)
            logger.info("%s is a %s ControlNet; make its condition with the %s annotator", path.name,
                        loaded.metadata.control_type, suggestion or loaded.metadata.annotator or "matching")
        return (make_control((ControlPart(loaded.model, name=path.name),)),)


NODE_CLASS_MAPPINGS = {"ZeroConvLoadControlNet": ZeroConvLoadControlNet}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvLoadControlNet": "Load ControlNet (ZeroConv)"}
