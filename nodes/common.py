"""Shared node helpers: ControlNet file names, the control widgets, settings from widgets, hint layout."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from ..controlnet_model.accelerate import Acceleration
from ..controlnet_model.hint import HintFit, image_to_hint
from ..controlnet_model.residuals import ControlMode, ControlSettings
from ..controlnet_model.schedule import StrengthSchedule
from .host import folders
from .host.folders import PACKAGE_MODELS

logger = logging.getLogger(__name__)

CATEGORY = "ZeroConv"
MODES = [m.value for m in ControlMode]
FITS = [f.value for f in HintFit]
ACCELERATIONS = [a.value for a in Acceleration]
PACKAGED_CONTROLNETS = "*controlnet*.safetensors"  # which of them are ControlNets (offered after the host's)


def control_widgets() -> dict:
    """Strength, step range, mode, fit and acceleration widgets of the apply and unit nodes.

    strength, start_percent and end_percent have core Apply ControlNet's names, defaults and ranges.
    """
    return {
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        "control_mode": (MODES, {"default": "balanced", "tooltip": "balanced; prompt_more_important (soft "
                                 "injection); controlnet_more_important (soft, conditional side only); "
                                 "cfg_resolution_weighting (the paper's CFG-RW, conditional side only)"}),
        "fit": (FITS, {"default": "crop_and_resize", "tooltip": "how the image is fitted to the latent: centre crop "
                       "then resize (as core), stretch, or fit inside and pad with black (no control there)"}),
        "accelerate": (ACCELERATIONS, {"default": "none", "tooltip": "compile or CUDA-graph the ControlNet forward "
                                       "(CUDA only; elsewhere the eager forward runs and the log says so)"}),
    }


def union_widget() -> dict:
    """The optional union_type input of the apply and unit nodes: a union ControlNet's type by name, checked against
    the file by the host (SDXL Union: ComfyUI's SetUnionControlNetType names or a part such as "canny"; Flux union
    files: canny, tile, depth, blur, pose, gray, low quality)."""
    return {"union_type": ("STRING", {"default": "auto", "tooltip": "union ControlNets only: the control type. SDXL "
                                      "Union: openpose, depth, hed/pidi/scribble/ted or a part, canny/lineart/"
                                      "anime_lineart/mlsd or a part, normal, segment, tile, repaint. Flux union: "
                                      "canny, tile, depth, blur, pose, gray, low quality. auto as core (or the type "
                                      "set by SetUnionControlNetType)"})}


def check_inputs(node: type, **values: object) -> None:
    """Validate a node's numeric, image and mask inputs before any work, by its INPUT_TYPES declaration: numbers are
    finite and inside the declared min/max, images are (B, H, W, C) with H, W > 0 and 1, 3 or 4 channels, masks are
    not empty. The error names the input and says what to give."""
    declared = {name: spec for section in ("required", "optional")
                for name, spec in node.INPUT_TYPES().get(section, {}).items()}
    for name, value in values.items():
        if value is None:
            continue
        kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
        if kind in ("INT", "FLOAT"):
            low, high = options.get("min", -math.inf), options.get("max", math.inf)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"{name} is {value!r}; give a number from {low} to {high}")
        elif kind == "IMAGE":
            shape = tuple(getattr(value, "shape", ()))
            if len(shape) != 4 or shape[1] == 0 or shape[2] == 0 or shape[0] == 0 or shape[3] not in (1, 3, 4):
                raise ValueError(f"{name} has shape {shape} ({shape[-1] if shape else 0} channels); give an IMAGE (B, H, W, C) with H and W above 0 and "
                                 "1, 3 or 4 channels (grey, RGB, RGBA)")
        elif kind == "MASK" and value.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); give a mask of at least 1x1 or "
                             "disconnect it")


def settings_from_inputs(strength: float, start_percent: float, end_percent: float, control_mode: str,
                         mask: torch.Tensor | None, schedule: StrengthSchedule | None) -> ControlSettings:
    """The library's settings from widget values; an empty mask is refused (it would silently disable the control)."""
    if mask is not None and not bool((mask > 0).any()):
        raise ValueError("the mask is all zero, so the ControlNet would do nothing; LoadImage gives an all-zero 64x64 "
                         "mask for images without transparency: paint the area to control transparent, or disconnect "
                         "the mask")
    if start_percent > end_percent:
        raise ValueError(f"start_percent {start_percent} is after end_percent {end_percent}; the control would never "
                         "act: swap them")
    return ControlSettings(strength=strength, start_percent=start_percent, end_percent=end_percent,
                           mode=ControlMode(control_mode), mask=mask, schedule=schedule)


def list_controlnets() -> list[str]:
    """File names (relative to each ControlNet folder, '/'-separated) for the loader's combo."""
    return list(dict.fromkeys([*folders.model_names("controlnet"), *_packaged_controlnets()]))


def _packaged_controlnets() -> list[str]:
    return [p.name for p in sorted(PACKAGE_MODELS.glob(PACKAGED_CONTROLNETS))]


def _normalise(name: str, precision: bool = True) -> str:
    """Case, separators, extension (and, when precision is False, an _fp16/_bf16/_fp32 suffix) do not count."""
    stem = Path(name.replace("\\", "/")).stem.lower().replace("-", "_").replace(" ", "_").replace(".", "_")
    return stem if precision else re.sub(r"_(fp16|bf16|fp32)$", "", stem)


def resolve_controlnet(name: str) -> Path:
    """The file a workflow names. If it is not found as written: the file with the same normalised name, then
    the same name but another precision, then the native file whose metadata records that name or content hash.
    Which file was used is logged."""
    found = folders.find_model("controlnet", name)
    if found is not None:
        return found
    dirs = folders.model_folders("controlnet")
    if name in _packaged_controlnets():
        return PACKAGE_MODELS / name
    files = [folder / n for folder in dirs for n in folders.weight_files(folder)]
    for precision, why in ((True, "same name after normalising"), (False, "same name, other precision")):
        matches = [f for f in files if _normalise(f.name, precision) == _normalise(name, precision)]
        if matches:
            logger.warning("ControlNet %r not found as written; using %s (%s%s)", name, matches[0], why,
                           f"; other candidates: {[str(m) for m in matches[1:]]}" if len(matches) > 1 else "")
            return matches[0]
    recorded = _find_by_metadata(name, dirs)
    if recorded is not None:
        logger.warning("ControlNet %r not found by name; using %s (its metadata records that name or hash)",
                       name, recorded)
        return recorded
    where = ", ".join(str(f) for f in dirs) or "no ControlNet folder (set ZEROCONV_CONTROLNET_DIR outside ComfyUI)"
    raise FileNotFoundError(f"ControlNet file {name!r} was not found in {where}; put the file there or pick another")


def _find_by_metadata(name: str, dirs: list[Path]) -> Path | None:
    """A renamed native file: its metadata records the name it was saved as and its content hash."""
    from safetensors import safe_open

    wanted = Path(name.replace("\\", "/")).name
    stem = Path(wanted).stem.lower()
    for folder in dirs:
        for path in sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []:
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception:  # unreadable files are reported when loaded, not while searching
                continue
            digest = meta.get("zeroconv_content_hash", "")
            if meta.get("zeroconv_saved_as") == wanted or (len(stem) >= 8 and digest.startswith(stem)):
                return path
    return None


def host_image_to_hint(image: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) to a hint (B, 3, H, W): the one place node tensors change layout.

    Grey is repeated and RGBA composited over black (library rules, which also refuse NaN and other channel
    counts). RGB values pass through unclamped, as core's apply passes them: the inpaint ControlNet's hint marks
    masked pixels with -1.
    """
    hint = image_to_hint(image)
    if image.shape[-1] == 3:
        return (image[None] if image.ndim == 3 else image).movedim(-1, 1).float()
    return hint
