"""Annotator nodes: one per registry spec (built from the table), plus pose-from-JSON and the inpaint hint.

Each node converts IMAGE (B, H, W, C) float 0..1 to a uint8 batch, makes one `registry.annotate` call and converts
back; learned annotators get their model through HostModels (ComfyUI's model manager when present).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..annotators.common import DETECT_RESOLUTION_MAX, AnnotatorSpec, ParamSpec
from ..annotators.registry import ANNOTATORS, annotate_with_keypoints
from .common import CATEGORY
from .host.models import HostModels

ANNOTATOR_CATEGORY = f"{CATEGORY}/annotators"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
DETECT_RESOLUTION = ("INT", {"default": 512, "min": 64, "max": DETECT_RESOLUTION_MAX, "step": 64,
                             "tooltip": "the picture's short side is scaled to this for the annotator; the map "
                                        "comes back at the picture's size"})
HOST_MODELS = HostModels()  # the nodes' one cache of annotator models, loaded on first use


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE (B, H, W, C) float 0..1 -> (B, H, W, C) uint8."""
    return (images.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def to_image(maps: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> IMAGE float 0..1."""
    return torch.from_numpy(np.ascontiguousarray(maps)).float() / 255.0


def widget(param: ParamSpec) -> tuple:
    """A ComfyUI input spec from a ParamSpec."""
    options: dict[str, Any] = {"default": param.default}
    if param.tooltip:
        options["tooltip"] = param.tooltip
    if param.kind == "combo":
        return list(param.choices), options
    if param.kind in ("int", "float"):
        options.update({k: v for k, v in (("min", param.min), ("max", param.max), ("step", param.step))
                        if v is not None})
    return {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "string": "STRING"}[param.kind], options


def _device_for(spec: AnnotatorSpec) -> str | None:
    """Learned annotators run on the host's device; classical ones on the CPU, which is their reference."""
    return HOST_MODELS.device() if spec.loader is not None else None


def _node_class(spec: AnnotatorSpec) -> type:
    def input_types(cls) -> dict:
        inputs: dict[str, Any] = {"image": ("IMAGE",), "detect_resolution": DETECT_RESOLUTION}
        inputs.update({p.name: widget(p) for p in spec.params})
        if spec.seeded:
            inputs["seed"] = ("INT", {"default": 0, "min": 0, "max": SEED_MAX})
        return {"required": inputs}

    def run(self, image: torch.Tensor, detect_resolution: int, seed: int | None = None, **params: Any) -> tuple:
        maps, people = annotate_with_keypoints(spec.name, to_uint8(image), detect_resolution=detect_resolution,
                                               seed=seed, device=_device_for(spec), model_cache=HOST_MODELS,
                                               **params)
        if not spec.keypoints:
            return (to_image(maps),)
        from ..annotators.pose import to_openpose_dict

        height, width = maps.shape[1:3]
        return to_image(maps), [to_openpose_dict(p, height, width) for p in people]

    returns = ("IMAGE", "POSE_KEYPOINT") if spec.keypoints else ("IMAGE",)
    return type(spec.node_id, (), {
        "INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": returns, "FUNCTION": "run", "run": run,
        "CATEGORY": f"{ANNOTATOR_CATEGORY}/{spec.category}", "DESCRIPTION": spec.description or spec.display_name,
        "__doc__": f"{spec.display_name}: {spec.description}"})


class ZeroConvPoseFromJSON:
    """Draw OpenPose skeletons (body, hands, face) from keypoint JSON, to pose by hand.

    Args:
        pose_json: OpenPose JSON, {"people": [{"pose_keypoints_2d": [x, y, c, ...]}], "canvas_width",
            "canvas_height"}, pixel or 0..1 coordinates.
        hands, face: draw those parts when present.
        pose_keypoint: optional POSE_KEYPOINT from another node; when connected it is drawn instead of the text.
    """

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "draw"
    CATEGORY = ANNOTATOR_CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        empty = '{"people": [], "canvas_width": 512, "canvas_height": 512}'
        return {"required": {"pose_json": ("STRING", {"multiline": True, "default": empty}),
                             "hands": ("BOOLEAN", {"default": True}), "face": ("BOOLEAN", {"default": True})},
                "optional": {"pose_keypoint": ("POSE_KEYPOINT",)}}

    def draw(self, pose_json: str, hands: bool, face: bool, pose_keypoint: list | None = None) -> tuple:
        from ..annotators.pose import draw_pose, read_openpose

        frames = [read_openpose(f) for f in pose_keypoint] if pose_keypoint else [read_openpose(pose_json)]
        maps = [draw_pose(f.people, f.height, f.width, hands=hands, face=face) for f in frames]
        if len({m.shape for m in maps}) > 1:
            raise ValueError("the poses have different canvas sizes; draw them with separate nodes")
        return (to_image(np.stack(maps)),)


class ZeroConvInpaintHint:
    """The inpaint ControlNet's condition: the picture with masked pixels set to -1.0 (v1.1 inpaint).

    The IMAGE it returns holds -1.0 where the mask is over 0.5, which is what the inpaint model expects; connect it
    straight to an apply node that passes values below 0 through (ComfyUI's core apply does).

    Args:
        image: the picture to inpaint.
        mask: MASK (B, H, W) 0..1; resized to the picture, thresholded at 0.5.
        masked_value: -1.0 for ControlNet v1.1 inpaint, 0.0 for xinsir union models.
    """

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "hint"
    CATEGORY = ANNOTATOR_CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",), "mask": ("MASK",),
                             "masked_value": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 0.0, "step": 1.0})}}

    def hint(self, image: torch.Tensor, mask: torch.Tensor, masked_value: float = -1.0) -> tuple:
        from ..annotators.misc import inpaint_hint

        images, masks = to_uint8(image), mask.detach().cpu().float().reshape(-1, *mask.shape[-2:]).numpy()
        if len(masks) not in (1, len(images)):
            raise ValueError(f"{len(masks)} masks for {len(images)} images; give one mask or one per image")
        hints = [inpaint_hint(im, masks[i % len(masks)], masked_value) for i, im in enumerate(images)]
        return (torch.from_numpy(np.stack(hints)),)


_EXTRA_NODES: dict[str, tuple[type, str]] = {
    "ZeroConvPoseFromJSON": (ZeroConvPoseFromJSON, "OpenPose from JSON (ZeroConv)"),
    "ZeroConvInpaintHint": (ZeroConvInpaintHint, "Inpaint Hint, masked = -1 (ZeroConv)"),
}
NODE_CLASS_MAPPINGS: dict[str, type] = {s.node_id: _node_class(s) for s in ANNOTATORS.values()}
NODE_CLASS_MAPPINGS.update({node_id: cls for node_id, (cls, _) in _EXTRA_NODES.items()})
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {s.node_id: s.display_name for s in ANNOTATORS.values()}
NODE_DISPLAY_NAME_MAPPINGS.update({node_id: name for node_id, (_, name) in _EXTRA_NODES.items()})
