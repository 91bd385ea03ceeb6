"""What every annotator shares: image conventions (HWC uint8 RGB in; white-on-black maps out, as
lllyasviel/ControlNet's annotator/util.py HWC3 and resize_image) and the spec that describes one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

PAD_MULTIPLE = 64  # A1111/aux resize_image_with_pad: edge-pad the detect-resolution image to multiples of 64
DETECT_RESOLUTION_MAX = 4096  # the largest detect_resolution (the nodes declare it as their widget's maximum)
MAX_CANVAS_PIXELS = 2 * DETECT_RESOLUTION_MAX**2  # one picture at detect or output size: 4096 x 8192 at most
WORK_BYTES_PER_PIXEL = 48  # what an annotator holds per canvas pixel at once, about: uint8 copies, float32 RGB maps
PARAM_KINDS = ("int", "float", "bool", "combo", "string")
RESAMPLE_MODES = ("linear", "nearest", "binary", "edges")
# Links from a white pixel to the white neighbours after it (right, down, down-right, down-left) drawn when 1-px
# edge maps grow ("edges"): the line through the pixel centres, so edges stay 1 px wide at any size.
_LINKS = ((0, 1), (1, 0), (1, 1), (1, -1))


def hwc3(image: np.ndarray) -> np.ndarray:
    """Grey to 3 channels, RGBA composited over white, uint8 HWC (ControlNet annotator/util.py HWC3)."""
    if image.dtype != np.uint8:
        raise ValueError(f"annotators take uint8 images, got {image.dtype}; scale 0..1 floats by 255 first")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        rgb = image[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return rgb.round().clip(0, 255).astype(np.uint8)
    return image


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to `short_side`, aspect kept (ControlNet resize_image)."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: np.ndarray, height: int, width: int, mode: str = "linear") -> np.ndarray:
    """Resize HWC uint8. linear: area shrinking, cubic growing; nearest: label and colour maps; binary and edges:
    0/255 line maps, kept binary and with their thin lines (resize_binary)."""
    import cv2

    if image.shape[:2] == (height, width):
        return image
    if mode in ("binary", "edges"):
        return resize_binary(image, height, width, thin=mode == "edges")
    shrink = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_NEAREST if mode == "nearest" else cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    out = cv2.resize(image, (width, height), interpolation=interpolation)
    return out[..., None] if out.ndim == 2 else out


def resize_binary(image: np.ndarray, height: int, width: int, thin: bool = False) -> np.ndarray:
    """A white-on-black line map (HWC uint8, white where any channel > 127) resized and kept 0/255.

    Shrinking by s (the larger of the two side ratios): a pixel is white when the white share of its footprint
    (area average) is at least 1 / (2 s), half what a 1-px line crossing it gives, so every 1-px line survives as a
    1-2 px line while single specks much smaller than a pixel vanish; a plain area average thresholded at one half
    loses every line thinner than s / 2 (the old behaviour: Canny edges gone past 2-3x). Growing: `thin` (1-px edge
    maps: Canny, straight lines) draws the lines through the grown pixel centres, 1 px wide at any size; otherwise
    (strokes: scribbles, binary) the map is grown bilinearly and thresholded at one half, strokes scaled with the
    picture. Where one side grows and the other shrinks, the shrink is done first.
    """
    import cv2

    mask = image.max(axis=2) > 127 if image.ndim == 3 else image > 127
    in_h, in_w = mask.shape
    if (height < in_h) != (width < in_w) and height != in_h and width != in_w:
        step = resize_binary(image, min(height, in_h), min(width, in_w), thin)
        return resize_binary(step, height, width, thin)
    if height <= in_h and width <= in_w:
        s = max(in_h / height, in_w / width)
        cover = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        out = cover * (2.0 * s) >= 1.0 - 1e-4
    elif thin:
        out = _grow_thin(mask, height, width)
    else:
        out = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5
    out = out.astype(np.uint8) * 255
    return np.repeat(out[..., None], image.shape[2] if image.ndim == 3 else 1, axis=2)


def _grow_thin(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 1-px line map grown to (height, width) as 1-px lines: each white pixel's centre, and the segments joining
    it to its white 8-neighbours (a diagonal only where no 4-neighbour path joins the two), sampled densely."""
    in_h, in_w = mask.shape
    gy, gx = height / in_h, width / in_w
    out = np.zeros((height, width), bool)
    ys, xs = np.nonzero(mask)

    def put(y: np.ndarray, x: np.ndarray) -> None:
        out[np.clip(np.rint((y + 0.5) * gy - 0.5), 0, height - 1).astype(np.intp),
            np.clip(np.rint((x + 0.5) * gx - 0.5), 0, width - 1).astype(np.intp)] = True

    put(ys, xs)
    padded = np.pad(mask, 1)
    for dy, dx in _LINKS:
        linked = padded[ys + 1 + dy, xs + 1 + dx]
        if dy and dx:
            linked &= ~(padded[ys + 1 + dy, xs + 1] | padded[ys + 1, xs + 1 + dx])
        y0, x0 = ys[linked].astype(np.float64), xs[linked].astype(np.float64)
        steps = int(np.ceil(2 * max(gy * abs(dy), gx * abs(dx)))) + 1
        for t in np.linspace(0.0, 1.0, steps):
            put(y0 + t * dy, x0 + t * dx)
    return out


def available_memory() -> int | None:
    """Bytes of memory free now (Linux sysconf), None where the system does not say."""
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_image(image: np.ndarray, name: str = "image") -> None:
    """An image or batch with no pixels (or no images) is refused here, before anything divides by its size."""
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"{name} must be a picture (HxWxC or a batch NxHxWxC), got {type(image).__name__} "
                         f"{shape}; connect an image")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {tuple(shape)}): it has no pixels or no pictures; connect a "
                         f"picture at least 1x1 (an upstream crop or batch node may have produced nothing)")


def check_sizes(height: int, width: int, count: int, detect_resolution: int | None,
                output_hw: tuple[int, int]) -> None:
    """Refuse, before allocating, a detect_resolution or output size beyond DETECT_RESOLUTION_MAX, beyond
    MAX_CANVAS_PIXELS per picture, or needing more memory than is free (a linked INT bypasses the widget's range)."""
    if detect_resolution is not None and (isinstance(detect_resolution, bool)
                                          or not isinstance(detect_resolution, (int, np.integer))):
        raise ValueError(f"detect_resolution must be a whole number of pixels, got {detect_resolution!r}")
    if detect_resolution and not 1 <= detect_resolution <= DETECT_RESOLUTION_MAX:
        raise ValueError(f"detect_resolution must be 1..{DETECT_RESOLUTION_MAX} px (the node's maximum), got "
                         f"{detect_resolution}; lower it")
    canvases = [("output size", output_hw)]
    if detect_resolution:
        scaled_h, scaled_w = short_side_size(height, width, detect_resolution)
        canvases.append((f"detect_resolution {detect_resolution}",
                         (scaled_h + -scaled_h % PAD_MULTIPLE, scaled_w + -scaled_w % PAD_MULTIPLE)))
    if min(output_hw) < 1:
        raise ValueError(f"output size must be at least 1x1 px, got {output_hw[0]}x{output_hw[1]}")
    free = available_memory()
    for what, (h, w) in canvases:
        pixels = h * w
        if pixels > MAX_CANVAS_PIXELS:
            raise ValueError(f"{what} on a {height}x{width} picture makes a {h}x{w} canvas ({pixels / 1e6:.0f} "
                             f"Mpx), over the {MAX_CANVAS_PIXELS / 1e6:.0f} Mpx an annotator may use; lower "
                             f"detect_resolution or crop the picture")
        need = count * pixels * WORK_BYTES_PER_PIXEL
        if free is not None and need > free:
            raise ValueError(f"{what} on {count} picture(s) of {height}x{width} needs about {need / 2**30:.1f} GiB "
                             f"of memory ({h}x{w} canvases), but {free / 2**30:.1f} GiB is free; lower "
                             f"detect_resolution or annotate fewer pictures at once")


@dataclass(frozen=True)
class DetectFit:
    """How an image was fitted to the detect resolution, so the map can be brought back (aux resize_image_with_pad)."""

    height: int  # original size
    width: int
    scaled_height: int  # after scaling the short side, before padding
    scaled_width: int
    pad_bottom: int
    pad_right: int

    def restore(self, control: np.ndarray, output_size: tuple[int, int] | None = None,
                mode: str = "linear") -> np.ndarray:
        """Crop the padding off a map made at detect resolution and resize it to the output (h, w)."""
        cropped = control[:self.scaled_height, :self.scaled_width]
        height, width = output_size or (self.height, self.width)
        return resize(cropped, height, width, mode)

    def restore_points(self, x: float, y: float) -> tuple[float, float]:
        """A 0..1 coordinate on the padded detect canvas to 0..1 on the original picture."""
        padded_h, padded_w = self.scaled_height + self.pad_bottom, self.scaled_width + self.pad_right
        return x * padded_w / self.scaled_width, y * padded_h / self.scaled_height


def resize_to_detect(image: np.ndarray, detect_resolution: int | None,
                     pad_multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, DetectFit]:
    """Scale the short side to `detect_resolution` and edge-pad to multiples of 64 (§5.1); None keeps the image."""
    height, width = image.shape[:2]
    if not detect_resolution:
        return image, DetectFit(height, width, height, width, 0, 0)
    if detect_resolution < 1:
        raise ValueError(f"detect_resolution must be a positive number of pixels, got {detect_resolution}")
    scaled_h, scaled_w = short_side_size(height, width, detect_resolution)
    scaled = resize(image, scaled_h, scaled_w)
    pad_b, pad_r = -scaled_h % pad_multiple, -scaled_w % pad_multiple
    padded = np.pad(scaled, ((0, pad_b), (0, pad_r), (0, 0)), mode="edge") if pad_b or pad_r else scaled
    return padded, DetectFit(height, width, scaled_h, scaled_w, pad_b, pad_r)


@dataclass(frozen=True)
class ParamSpec:
    """One annotator parameter; the node builds its widget from it (ComfyUI INPUT_TYPES)."""

    name: str
    kind: str  # one of PARAM_KINDS
    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()  # for kind "combo"
    tooltip: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"ParamSpec {self.name}: kind must be one of {PARAM_KINDS}, got {self.kind!r}")
        if self.kind == "combo" and self.default not in self.choices:
            raise ValueError(f"ParamSpec {self.name}: default {self.default!r} is not one of {self.choices}")


@dataclass(frozen=True)
class AnnotatorSpec:
    """One annotator as data: what computes it, its parameters, weights, and the node id that exposes it."""

    name: str
    node_id: str  # public API (saved workflows name it): "ZeroConv..." and never renamed
    display_name: str
    fn: Callable[..., Any]  # (HWC uint8 RGB, **params[, seed=][, model=]) -> HWC uint8 RGB control map
    params: tuple[ParamSpec, ...] = ()
    weights: tuple[str, ...] = ()  # manifest file names it needs; empty for classical annotators
    control_types: tuple[str, ...] = ()  # ControlNet types it makes conditions for, e.g. ("canny",)
    seeded: bool = False  # fn takes seed= (an int); reproducible for a seed
    category: str = "classical"  # node sub-menu: "classical", "learned", ...
    loader: Callable[[str], Any] | None = None  # device -> model (nn.Module); fn/batch_fn then get model=
    batch_fn: Callable[..., np.ndarray] | None = None  # (N,H,W,3) uint8 -> same, on a torch device (device=,
    # model= when it has a loader, seeds= a list when seeded); used for learned annotators and for a GPU device
    batch_requires: tuple[str, ...] = ()  # optional modules batch_fn needs (e.g. kornia); CPU path when missing
    resample: str = "linear"  # how the map goes back to output size: "linear", "nearest" (labels, colour blocks,
    # skeletons), "binary" (0/255 strokes, scaled with the picture) or "edges" (0/255 1-px lines, kept 1 px)
    finish: Callable[[np.ndarray], np.ndarray] | None = None  # HWC uint8 -> HWC uint8, run on the map at output
    # size after resampling (HED scribble thins and thickens there, as the reference does)
    at_output_size: bool = False  # runs on the picture at output size, ignoring detect_resolution (shuffle)
    keypoints: bool = False  # fn returns (map, list[pose.Person]) with 0..1 coordinates (OpenPose)
    description: str = ""  # node tooltip

    def __post_init__(self) -> None:
        if not self.node_id.startswith("ZeroConv"):
            raise ValueError(f"annotator {self.name}: node_id must start with 'ZeroConv', got {self.node_id!r}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"annotator {self.name}: resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        reserved = {"image", "detect_resolution", "seed", "model", "device"} & {p.name for p in self.params}
        if reserved:
            raise ValueError(f"annotator {self.name}: parameter names {sorted(reserved)} are reserved; rename them")

    def defaults(self) -> dict[str, Any]:
        """Parameter name -> default value."""
        return {p.name: p.default for p in self.params}

