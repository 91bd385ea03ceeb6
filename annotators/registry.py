"""The annotators as data: what each computes, its parameters, and the node id that exposes it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "INT", "FLOAT" or "BOOLEAN", as ComfyUI widgets
    default: Any
    min: float = 0
    max: float = 255
    step: float = 1


@dataclass(frozen=True)
class AnnotatorSpec:
    name: str
    node_id: str  # public API: saved workflows name it
    display_name: str
    fn: str  # name in classical.py: HWC uint8 RGB (+ params) -> HWC uint8 RGB; resolved on use (cv2 loads lazily)
    params: tuple[Param, ...] = ()

    def function(self) -> Callable[..., np.ndarray]:
        from . import classical

        return getattr(classical, self.fn)
    seeded: bool = False  # takes seed=
    control_types: tuple[str, ...] = ()  # ControlNet types whose condition this makes
    torch_fn: str | None = None  # batched torch version in classical.py, used on a CUDA device


ANNOTATORS: dict[str, AnnotatorSpec] = {s.name: s for s in (
    AnnotatorSpec("canny", "ZeroConvCannyEdge", "Canny Edges (ZeroConv)", "canny",
                  (Param("low_threshold", "INT", 100), Param("high_threshold", "INT", 200)), control_types=("canny",),
                  torch_fn="canny_kornia"),
    AnnotatorSpec("scribble_synthesis", "ZeroConvScribbleSynthesis", "Scribble from Picture (ZeroConv)",
                  "synthesize_scribble", seeded=True, control_types=("scribble",)),
    AnnotatorSpec("scribble_clean", "ZeroConvScribbleClean", "Clean User Scribble (ZeroConv)",
                  "clean_user_scribble", (Param("threshold", "INT", 127),), control_types=("scribble",)),
    AnnotatorSpec("scribble_xdog", "ZeroConvScribbleXDoG", "XDoG Lines (ZeroConv)", "xdog",
                  (Param("threshold", "INT", 32),), control_types=("scribble", "lineart")),
    AnnotatorSpec("lines", "ZeroConvStraightLines", "Straight Lines, Hough (ZeroConv)", "straight_lines",
                  (Param("threshold", "INT", 50, 1, 500), Param("min_length", "INT", 20, 1, 1000),
                   Param("max_gap", "INT", 4, 0, 100)), control_types=("mlsd",)),
    AnnotatorSpec("normal_from_depth", "ZeroConvNormalFromDepth", "Normal from Depth (ZeroConv)",
                  "normal_from_depth", (Param("background_threshold", "FLOAT", 0.4, 0.0, 1.0, 0.01),),
                  control_types=("normal",)),
    AnnotatorSpec("shuffle", "ZeroConvShuffle", "Content Shuffle (ZeroConv)", "shuffle", seeded=True,
                  control_types=("shuffle",)),
    AnnotatorSpec("tile", "ZeroConvTileBlur", "Tile Blur (ZeroConv)", "tile", (Param("levels", "INT", 3, 0, 6),),
                  control_types=("tile",)),
    AnnotatorSpec("color_grid", "ZeroConvColorGrid", "Colour Grid (ZeroConv)", "color_grid",
                  (Param("factor", "INT", 64, 2, 256),), control_types=("color",)),
    AnnotatorSpec("binary", "ZeroConvBinary", "Binary Lines (ZeroConv)", "binary",
                  (Param("threshold", "INT", 0),), control_types=("scribble",)),
)}


def suggest_annotator(control_type: str) -> str | None:
    """The annotator that makes a ControlNet type's condition (from a checkpoint's metadata)."""
    return next((s.name for s in ANNOTATORS.values() if control_type in s.control_types), None)


def _resize(image: np.ndarray, short_side: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def annotate_on_device(name: str, images: np.ndarray, device: str, **params: Any) -> np.ndarray:
    """A batch (N, H, W, 3) uint8 through the annotator's torch version on `device` (e.g. Canny with kornia)."""
    import torch

    from . import classical

    spec = ANNOTATORS[name]
    if spec.torch_fn is None:
        raise ValueError(f"the {name} annotator has no GPU version; run it with device=None")
    batch = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
    out = getattr(classical, spec.torch_fn)(batch, **params)
    return (out.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


def annotate(name: str, image: np.ndarray, detect_resolution: int = 512, seed: int = 0, **params: Any) -> np.ndarray:
    """Run an annotator on one HWC or a batch of NHWC uint8 images; the map comes back at the input size."""
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; choose one of {sorted(ANNOTATORS)}")
    import cv2

    from .classical import hwc3

    spec = ANNOTATORS[name]
    if image.ndim == 4:
        return np.stack([annotate(name, im, detect_resolution, seed + i, **params) for i, im in enumerate(image)])
    image = hwc3(image)
    h, w = image.shape[:2]
    work = _resize(image, detect_resolution) if detect_resolution else image
    fn = spec.function()
    out = fn(work, seed=seed, **params) if spec.seeded else fn(work, **params)
    return out if out.shape[:2] == (h, w) else cv2.resize(out, (w, h), interpolation=cv2.INTER_NEAREST)
