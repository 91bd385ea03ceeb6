"""Shared node helpers: resolving ControlNet file names, and the tensor-layout conversion for hints."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..controlnet_model.hint import image_to_hint
from .comfy_adapter import controlnet_folder_paths

logger = logging.getLogger(__name__)

CATEGORY = "ZeroConv"
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin")


def list_controlnets() -> list[str]:
    """File names (relative to each ControlNet folder, '/'-separated) for the loader's combo."""
    names = set()
    for folder in controlnet_folder_paths():
        root = Path(folder)
        if root.is_dir():
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    return sorted(names)


def _normalise(name: str) -> str:
    return Path(name.replace("\\", "/")).stem.lower().replace("-", "_").replace(" ", "_")


def resolve_controlnet(name: str) -> Path:
    """The file a workflow names; if not found as written, the one with the same normalised name (logged)."""
    folders = [Path(f) for f in controlnet_folder_paths()]
    for folder in folders:
        candidate = folder / name.replace("\\", "/")
        if candidate.is_file():
            return candidate
    wanted = _normalise(name)
    matches = [folder / n for folder in folders for n in list_controlnets() if _normalise(n) == wanted
               and (folder / n).is_file()]
    if matches:
        logger.warning("ControlNet %r not found as written; using %s (same name after normalising)", name, matches[0])
        return matches[0]
    recorded = _find_by_metadata(name, folders)
    if recorded is not None:
        logger.warning("ControlNet %r not found by name; using %s (its metadata names it)", name, recorded)
        return recorded
    where = ", ".join(str(f) for f in folders) or "no ControlNet folder (set ZEROCONV_CONTROLNET_DIR outside ComfyUI)"
    raise FileNotFoundError(f"ControlNet file {name!r} was not found in {where}; put the file there or pick another")


def _find_by_metadata(name: str, folders: list[Path]) -> Path | None:
    """A renamed native file: its metadata records the name it was saved as and its content hash."""
    from safetensors import safe_open

    wanted = Path(name.replace("\\", "/")).name
    stem = Path(wanted).stem.lower()
    for folder in folders:
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
    """IMAGE (B, H, W, C) in [0, 1] to a hint (B, 3, H, W): the one place node tensors change layout."""
    return image_to_hint(image)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
