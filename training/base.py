"""The locked base model a ControlNet trains against, and how one is loaded from a file.

Every base (Stable Diffusion single files, the demo world's tiny model) offers the same interface, so the
training loop, validation and the demo never branch on which base they hold.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..controlnet_model.unet import UNetModel
from .schedule import NoiseSchedule


@dataclass(frozen=True)
class TextConditioning:
    context: torch.Tensor  # (B, T, D) cross-attention context
    y: torch.Tensor | None = None  # (B, adm) SDXL-style ADM vector, None for SD1.x/2.x


class LockedBase(Protocol):
    """A frozen text-to-image latent diffusion model."""

    family: str  # e.g. "SD1.x", "SDXL", "ZeroConv world"
    unet: UNetModel  # LDM layout; unet.config is its ControlNetConfig
    schedule: NoiseSchedule
    image_size: int  # native resolution in pixels (square side)

    def encode_text(self, captions: list[str]) -> TextConditioning: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8)."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) in [-1, 1]."""
        ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LockedBase": ...


# Loaders by kind, as (module relative to this package, function), imported only when a file of that kind is
# loaded; detect_base_kind picks the kind. The demo world's base lives with the demo (demo/world_base.py).
BASE_LOADERS: dict[str, tuple[str, str]] = {
    "stable-diffusion": (".sd_base", "load_sd_base"),
    "world": ("..demo.world_base", "load_world_base"),
}


def detect_base_kind(path: Path) -> str:
    """'world' for ZeroConv demo-world files (safetensors metadata zeroconv_kind), else 'stable-diffusion'."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("zeroconv_kind") == "world-base":
                    return "world"
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file ({exc}); re-download or re-export it") from exc
    return "stable-diffusion"


def load_base(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LockedBase:
    """Load a locked base model from a file, frozen (requires_grad False, eval mode)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"base model {path} does not exist; give the path of an SD checkpoint or a world base")
    module_name, fn_name = BASE_LOADERS[detect_base_kind(path)]
    loader = getattr(importlib.import_module(module_name, __package__), fn_name)
    base = loader(path, device=device, dtype=dtype)
    base.unet.requires_grad_(False).eval()
    return base
