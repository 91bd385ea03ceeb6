"""Loader node: any ControlNet file to a CONTROL_NET that our and ComfyUI's apply nodes accept."""
from __future__ import annotations

import logging
from typing import Any

from ..annotators.registry import suggest_annotator
from .host.control import load_control
from .common import CATEGORY, list_controlnets, resolve_controlnet

logger = logging.getLogger(__name__)


class ZeroConvLoadControlNet:
    """Load a ControlNet checkpoint from ComfyUI's `controlnet` model folder.

    Args:
        control_net_name: a file in models/controlnet (outside ComfyUI: in the folder named by the environment
            variable ZEROCONV_CONTROLNET_DIR). A name that is not found as written (renamed file, other path
            separators or precision) is looked up by normalised name, then by the name or content hash recorded
            in the file's metadata; the log says which file was used.
        model: the base model, needed for diff ControlNets and Control-LoRA files (they store weights relative to it).

    Reads LDM v1.0 (whole-SD, prefixed, pruned fp16), v1.1, diffusers files and folders, our native files,
    diff / Control-LoRA files, SDXL Union ControlNets (xinsir ControlNet++, 6 or 8 types; choose the type with
    union_type on the apply node or core's SetUnionControlNetType), T2I-Adapters (SD1.x full and light, SDXL),
    and the transformer ControlNets of Flux.1 (XLabs, Mistoline, InstantX / Shakker Union) and SD3 / SD3.5
    (diffusers-trained, Stability's); inside ComfyUI, formats ZeroConv does not read go through ComfyUI's own
    loader.
    Weights are cached per file; ComfyUI's memory manager moves them to the GPU while sampling.
    """

    DESCRIPTION = ("Loads a ControlNet file from the controlnet model folder; the result also works in core apply "
                   "nodes and chains with core ControlNets. Connect a MODEL for diff and Control-LoRA files.")
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"control_net_name": (list_controlnets(), {"tooltip": "file in models/controlnet"})},
                "optional": {"model": ("MODEL", {"tooltip": "the base model, for diff and Control-LoRA files"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, control_net_name: str | None) -> bool | str:
        """Accept a name that resolves (renamed files too), so ComfyUI's list check does not refuse it first."""
        if control_net_name is None:  # converted to an input and linked: checked when the node runs
            return True
        try:
            resolve_controlnet(control_net_name)
        except FileNotFoundError as exc:
            return str(exc)
        return True

    def load(self, control_net_name: str, model: Any = None) -> tuple:
        path = resolve_controlnet(control_net_name)
        control, metadata = load_control(path, model)
        if metadata is not None and metadata.control_type:
            suggestion = suggest_annotator(metadata.control_type)
            logger.info("%s is a %s ControlNet; make its condition with the %s annotator", path.name,
                        metadata.control_type, suggestion or metadata.annotator or "matching")
        return (control,)


NODE_CLASS_MAPPINGS = {"ZeroConvLoadControlNet": ZeroConvLoadControlNet}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvLoadControlNet": "Load ControlNet (ZeroConv)"}
