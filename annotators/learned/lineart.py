"""Line drawings: the informative-drawings generator (Chan et al. CVPR 2022; `sk_model.pth`, `sk_model2.pth`) and
the Anime2Sketch U-Net (Xiang et al. 2021; `netG.pth`), both returning white lines on black for ControlNet.

Key layouts (lllyasviel/ControlNet-v1-1-nightly annotator/lineart and lineart_anime): the generator's Sequentials
`model0` (reflect-pad, 7x7 conv: `model0.1`), `model1` (stride-2 convs `model1.0`, `model1.3`), `model2.{i}.conv_block`
(`.1`, `.5`), `model3` (transposed convs `model3.0`, `model3.3`), `model4.1`; the U-Net nests `model.model.1.model.3...`
(down conv at `.1`, up conv at `.5` inside; outermost `model.model.0` / `.3`; innermost `.1` / `.3`). InstanceNorm
without affine parameters, so no norm keys. `netG.pth` may carry nn.DataParallel's `module.` prefix.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common import AnnotatorSpec
from .base import build, device_of, single, to_tensor, to_uint8_maps

SKETCH_WEIGHTS, COARSE_WEIGHTS, ANIME_WEIGHTS = "sk_model.pth", "sk_model2.pth", "netG.pth"
SKETCH_RESIDUAL_BLOCKS = 3  # the released files (the paper's default is 9)
SKETCH_WIDTHS = (64, 128, 256)  # 7x7 stem, then two stride-2 downs
ANIME_DOWNS, ANIME_NGF = 8, 64  # U-Net depth and first width; widths double to 8 x ngf
ANIME_MULTIPLE = 256  # input sides are resized up to multiples of this (2 ** 8)


class ResidualBlock(nn.Module):
    """Reflect-pad 3x3 conv, InstanceNorm, ReLU, reflect-pad 3x3 conv, InstanceNorm, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class SketchGenerator(nn.Module):
    """Informative-drawings generator: RGB 0..1 in, one channel 0..1 out (1 = paper, 0 = line)."""

    def __init__(self, residual_blocks: int = SKETCH_RESIDUAL_BLOCKS) -> None:
        super().__init__()
        c0, c1, c2 = SKETCH_WIDTHS
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, c0, 7), nn.InstanceNorm2d(c0), nn.ReLU())
        self.model1 = nn.Sequential(*_norm_relu(nn.Conv2d(c0, c1, 3, 2, 1), c1), *_norm_relu(nn.Conv2d(c1, c2, 3, 2, 1), c2))
        self.model2 = nn.Sequential(*(ResidualBlock(c2) for _ in range(residual_blocks)))
        self.model3 = nn.Sequential(*_norm_relu(nn.ConvTranspose2d(c2, c1, 3, 2, 1, output_padding=1), c1),
                                    *_norm_relu(nn.ConvTranspose2d(c1, c0, 3, 2, 1, output_padding=1), c0))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c0, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB 0..1 -> (N, 1, H, W) 0..1, H and W multiples of 4."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def _norm_relu(conv: nn.Module, channels: int) -> tuple[nn.Module, ...]:
    return conv, nn.InstanceNorm2d(channels), nn.ReLU()


class UnetLevel(nn.Module):
    """One U-Net level (pix2pix UnetSkipConnectionBlock): down conv, the inner levels, up conv; skip by concat."""

    def __init__(self, outer: int, inner: int, inside: "UnetLevel | None", in_channels: int | None = None) -> None:
        super().__init__()
        self.outermost = in_channels is not None
        down = nn.Conv2d(in_channels or outer, inner, 4, 2, 1)
        if self.outermost:
            layers = [down, inside, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif inside is None:  # innermost
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, 2, 1),
                      nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), inside, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], dim=1)


class AnimeSketchUnet(nn.Module):
    """Anime2Sketch generator: 8-level U-Net, widths 64..512, RGB in [-1, 1] -> one channel in [-1, 1]."""

    def __init__(self, downs: int = ANIME_DOWNS, ngf: int = ANIME_NGF) -> None:
        super().__init__()
        level = UnetLevel(ngf * 8, ngf * 8, None)
        for _ in range(downs - 5):
            level = UnetLevel(ngf * 8, ngf * 8, level)
        for mult in (4, 2, 1):
            level = UnetLevel(ngf * mult, ngf * mult * 2, level)
        self.model = UnetLevel(1, ngf, level, in_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], sides multiples of 256 -> (N, 1, H, W) in [-1, 1] (1 = paper)."""
        return self.model(x)


@torch.no_grad()
def lineart_batch(images: np.ndarray, *, device: str | torch.device, model: SketchGenerator) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> white lines on black: 1 - generator(RGB / 255) (aux returns it inverted too)."""
    x = to_tensor(images, device_of(model)) / 255.0
    height, width = x.shape[-2:]
    x = F.pad(x, (0, -width % 4, 0, -height % 4), mode="replicate")  # two stride-2 downs, two ups
    return to_uint8_maps(1.0 - model(x)[..., :height, :width])


@torch.no_grad()
def lineart_anime_batch(images: np.ndarray, *, device: str | torch.device, model: AnimeSketchUnet) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> white lines on black: resized up to multiples of 256 (cubic) and back.

    The resized picture is clipped and rounded to 0..255, as the reference's cv2.resize of the uint8 picture is
    (aux lineart_anime): cubic overshoots at sharp edges (about -30..283) that the net never saw."""
    x = to_tensor(images, device_of(model))
    height, width = x.shape[-2:]
    size = (-(-height // ANIME_MULTIPLE) * ANIME_MULTIPLE, -(-width // ANIME_MULTIPLE) * ANIME_MULTIPLE)
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp_(0.0, 255.0).round_()
    paper = model(x / 127.5 - 1.0) * 0.5 + 0.5
    if size != (height, width):
        paper = F.interpolate(paper, size=(height, width), mode="bicubic", align_corners=False)
    return to_uint8_maps(1.0 - paper)


def load_lineart(device: str | torch.device = "cpu") -> SketchGenerator:
    """The realistic line generator (sk_model.pth)."""
    return build(SketchGenerator, SKETCH_WEIGHTS, device)


def load_lineart_coarse(device: str | torch.device = "cpu") -> SketchGenerator:
    """The coarse line generator (sk_model2.pth)."""
    return build(SketchGenerator, COARSE_WEIGHTS, device)


def load_lineart_anime(device: str | torch.device = "cpu") -> AnimeSketchUnet:
    """The Anime2Sketch U-Net (netG.pth)."""
    return build(AnimeSketchUnet, ANIME_WEIGHTS, device)


SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("lineart", "ZeroConvLineart", "Lineart, Realistic (ZeroConv)", single(lineart_batch),
                  weights=(SKETCH_WEIGHTS,), control_types=("lineart",), category="learned", loader=load_lineart,
                  batch_fn=lineart_batch, description="informative-drawings lines (sk_model), white on black"),
    AnnotatorSpec("lineart_coarse", "ZeroConvLineartCoarse", "Lineart, Coarse (ZeroConv)", single(lineart_batch),
                  weights=(COARSE_WEIGHTS,), control_types=("lineart",), category="learned",
                  loader=load_lineart_coarse, batch_fn=lineart_batch,
                  description="informative-drawings coarse lines (sk_model2), white on black"),
    AnnotatorSpec("lineart_anime", "ZeroConvLineartAnime", "Lineart, Anime (ZeroConv)", single(lineart_anime_batch),
                  weights=(ANIME_WEIGHTS,), control_types=("lineart_anime", "lineart"), category="learned",
                  loader=load_lineart_anime, batch_fn=lineart_anime_batch,
                  description="Anime2Sketch lines (netG), white on black"),
)
