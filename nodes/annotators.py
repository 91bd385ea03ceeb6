"""Annotator nodes, one per registry entry (built from the table), and a pose-from-JSON node."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..annotators.registry import ANNOTATORS, AnnotatorSpec, annotate
from .common import CATEGORY


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE (B, H, W, C) float 0..1 -> (B, H, W, C) uint8."""
    return (images.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def to_image(maps: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(maps.astype(np.float32) / 255.0)


def _node_class(spec: AnnotatorSpec) -> type:
    def input_types(cls) -> dict:
        widgets: dict[str, Any] = {"image": ("IMAGE",),
                                   "detect_resolution": ("INT", {"default": 512, "min": 0, "max": 4096, "step": 64})}
        for p in spec.params:
            widgets[p.name] = (p.kind, {"default": p.default, "min": p.min, "max": p.max, "step": p.step})
        if spec.seeded:
            widgets["seed"] = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})
        return {"required": widgets}

    def run(self, image: torch.Tensor, detect_resolution: int, **params: Any) -> tuple:
        return (to_image(annotate(spec.name, to_uint8(image), detect_resolution, **params)),)

    return type(spec.node_id, (), {"INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": ("IMAGE",),
                                   "FUNCTION": "run", "run": run, "CATEGORY": f"{CATEGORY}/annotators",
                                   "DESCRIPTION": spec.display_name})


class ZeroConvPoseFromJSON:
    """Draw OpenPose skeletons (body, hands, face) from keypoint JSON, to pose by hand."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "draw"
    CATEGORY = f"{CATEGORY}/annotators"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        empty = '{"people": [], "canvas_width": 512, "canvas_height": 512}'
        return {"required": {"pose_json": ("STRING", {"multiline": True, "default": empty}),
                             "hands": ("BOOLEAN", {"default": True}), "face": ("BOOLEAN", {"default": True})}}

    def draw(self, pose_json: str, hands: bool, face: bool) -> tuple:
        from ..annotators.pose import draw_pose, parse_openpose_json  # OpenCV loads on first use, not at import

        people, height, width = parse_openpose_json(pose_json)
        return (to_image(draw_pose(people, height, width, hands, face)[None]),)


NODE_CLASS_MAPPINGS: dict[str, type] = {s.node_id: _node_class(s) for s in ANNOTATORS.values()}
NODE_CLASS_MAPPINGS["ZeroConvPoseFromJSON"] = ZeroConvPoseFromJSON
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {s.node_id: s.display_name for s in ANNOTATORS.values()}
NODE_DISPLAY_NAME_MAPPINGS["ZeroConvPoseFromJSON"] = "OpenPose from JSON (ZeroConv)"
