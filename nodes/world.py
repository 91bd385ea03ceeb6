"""The demo world's base as a graph node: MODEL, CLIP and VAE from a ZeroConv world-base file, in ComfyUI and in
`zeroconv run` alike (ComfyUI's own checkpoint loader cannot read it: the world is not a Stable Diffusion)."""
from __future__ import annotations

from pathlib import Path

from ..demo.world_base import load_world_base
from .common import CATEGORY
from .host import folders
from .host.folders import PACKAGE_MODELS
from .host.models import base_objects

BASE_PATTERN = "*base*.safetensors"


def world_base_names() -> list[str]:
    """World bases shipped with the pack, then ComfyUI's checkpoints whose names say they are world bases."""
    names = [p.name for p in sorted(PACKAGE_MODELS.glob(BASE_PATTERN))]
    checkpoints = [d for d in folders.model_folders("checkpoints") if d.is_dir()]
    names += [p.name for d in checkpoints for p in sorted(d.glob(f"world{BASE_PATTERN}"))]
    return list(dict.fromkeys(names))


def resolve_world_base(name: str) -> Path:
    """A listed name (package models/ first, then ComfyUI's checkpoints) or a path."""
    for folder in (PACKAGE_MODELS, *folders.model_folders("checkpoints")):
        if (folder / name).is_file():
            return folder / name
    if Path(name).expanduser().is_file():
        return Path(name).expanduser()
    raise FileNotFoundError(f"world base {name!r} not found in {PACKAGE_MODELS} or the checkpoints folder; the pack "
                            "ships models/world_base.safetensors (reinstall it), or train one with "
                            "`python -m zeroconv.demo.train_world_base`")


class ZeroConvLoadWorldBase:
    """Load the demo world's base model (a tiny text-to-image diffusion model trained by ZeroConv).

    Args:
        base_name: a world-base file: the one shipped in the pack's models/ folder, one in models/checkpoints
            named world*base*.safetensors, or a path.
    """

    DESCRIPTION = ("Loads ZeroConv's demo-world base (tiny U-Net, word-level text encoder, exact pixel-unshuffle "
                   "VAE). Use it with world_controlnet.safetensors and captions like 'red circle with blue "
                   "background'.")
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"base_name": (world_base_names() or ["world_base.safetensors"],
                                           {"tooltip": "the world base file"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, base_name: str) -> bool | str:
        try:
            resolve_world_base(base_name)
        except FileNotFoundError as exc:
            return str(exc)
        return True

    def load(self, base_name: str) -> tuple:
        return base_objects(load_world_base(resolve_world_base(base_name)))


NODE_CLASS_MAPPINGS = {"ZeroConvLoadWorldBase": ZeroConvLoadWorldBase}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvLoadWorldBase": "Load Demo World Base (ZeroConv)"}
