"""Soft edges from the re-trained Apache-2 HED of ControlNet v1.1 (`ControlNetHED.pth`; Xie & Tu 2015 design).

Key layout of the file (lllyasviel/ControlNet-v1-1-nightly annotator/hed): `norm` (1, 3, 1, 1), then per block b
in 1..5 `block{b}.convs.{i}.weight|bias` (3x3) and `block{b}.projection.weight|bias` (1x1 to one channel).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common import AnnotatorSpec, ParamSpec
from ..scribble import nms, strokes
from .base import build, device_of, single, to_tensor, to_uint8_maps

WEIGHTS = "ControlNetHED.pth"
# (output channels, 3x3 convs) per block; max-pool 2x2 before every block but the first (§5.2).
BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
SAFE_STEPS = 2  # annotator/util.py safe_step: floor(x * (step + 1)) / step
SCRIBBLE_NMS_THRESHOLD, SCRIBBLE_NMS_SIGMA = 127, 3.0  # v1.1 fake scribble from HED


class HEDBlock(nn.Module):
    """3x3 conv + ReLU layers and a 1x1 side projection of the last one (HED side output)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                                     for i in range(layers)))
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """Five VGG-like blocks with side outputs; RGB 0..255 input minus a learned per-channel offset."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        channels = [3] + [c for c, _ in BLOCKS]
        for b, (out_channels, layers) in enumerate(BLOCKS, start=1):
            self.add_module(f"block{b}", HEDBlock(channels[b - 1], out_channels, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) RGB 0..255 -> five (N, 1, h_b, w_b) side logits."""
        h, sides = x - self.norm, []
        for b in range(1, len(BLOCKS) + 1):
            if b > 1:
                h = F.max_pool2d(h, 2, 2)
            h, side = getattr(self, f"block{b}")(h)
            sides.append(side)
        return sides


def soft_edges(model: ControlNetHED, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB 0..255 -> (N, 1, H, W) in 0..1: sigmoid of the mean of the bilinearly upsampled sides."""
    size = images.shape[-2:]
    sides = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in model(images)]
    return torch.sigmoid(torch.stack(sides).mean(dim=0))


def safe_step(x: torch.Tensor, steps: int = SAFE_STEPS) -> torch.Tensor:
    """Quantise 0..1 to a few levels, so the map carries no hidden image detail (v1.1 'safe' HED)."""
    return torch.floor(x * (steps + 1)) / steps


@torch.no_grad()
def hed_batch(images: np.ndarray, *, device: str | torch.device, model: ControlNetHED,
              safe: bool = False) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W, 3) uint8 soft edges, white on black."""
    edges = soft_edges(model, to_tensor(images, device_of(model)))
    return to_uint8_maps(safe_step(edges) if safe else edges)


def scribble_strokes(soft: np.ndarray) -> np.ndarray:
    """HED soft edges (HWC uint8) at output size to scribble strokes: NMS (127, sigma 3), then sigma-3 strokes
    thresholded at 4 (v1.1 fake scribble; the reference resizes the soft map first and does this at output size,
    so the strokes are as wide whatever the detect resolution)."""
    return np.repeat(strokes(nms(soft[..., 0], SCRIBBLE_NMS_THRESHOLD, SCRIBBLE_NMS_SIGMA))[..., None], 3, axis=2)


def load_hed(device: str | torch.device = "cpu") -> ControlNetHED:
    """ControlNetHED with the ControlNetHED.pth weights."""
    return build(ControlNetHED, WEIGHTS, device)


_SAFE = ParamSpec("safe", "bool", False, tooltip="quantise the edges to a few levels (v1.1 'safe' HED)")
SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("hed", "ZeroConvHEDSoftEdge", "Soft Edges, HED (ZeroConv)", single(hed_batch), (_SAFE,),
                  weights=(WEIGHTS,), control_types=("softedge", "hed"), category="learned", loader=load_hed,
                  batch_fn=hed_batch, description="ControlNet v1.1's re-trained HED: soft white edges on black"),
    AnnotatorSpec("scribble_hed", "ZeroConvScribbleHED", "Scribble from HED (ZeroConv)", single(hed_batch),
                  (_SAFE,), weights=(WEIGHTS,), control_types=("scribble",), category="learned", loader=load_hed,
                  batch_fn=hed_batch, finish=scribble_strokes,
                  description="HED edges thinned by NMS and thickened to strokes (v1.1 fake scribble)"),
)
