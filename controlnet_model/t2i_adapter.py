"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability"), host-free.

An adapter turns the control image into one feature map per U-Net level, once (it does not depend on the
noisy latent, the timestep or the prompt); the U-Net adds them to its hidden state after chosen input blocks
(ComfyUI `comfy/ldm/modules/diffusionmodules/openaimodel.py` apply_control(h, control, 'input')), and the SDXL
adapter's last one after the middle block.

Kinds (ComfyUI `comfy/t2i_adapter/adapter.py`, diffusers `models/adapter.py`):
  * FULL: SD1.x adapters: PixelUnshuffle(8), conv_in, per level `num_res_blocks` residual blocks, the first of each
    deeper level average-pooled (or a strided conv, `down_opt.op`) and widened by `in_conv`;
  * FULL_XL: SDXL adapters: PixelUnshuffle(16), the same blocks, pooled only before the third level;
  * LIGHT: the colour (light) adapter: per level pool, 1x1 in_conv to a quarter width, 3x3 residual blocks, 1x1 out_conv.
Our module names are TencentARC's original ones (`conv_in`, `body.N.block1`, ...), so their files load with a
prefix strip; diffusers' layout is converted by the tables in keymaps.py.

Placement (`place_features`): feature k goes after the last input block of the U-Net, after the one feature k-1
went to, whose width and downsampling equal the feature's; a feature no input block takes goes after the middle
block. For SD1.5 that is input blocks 2, 5, 8, 11; for SDXL 3, 5, 8 and the middle: exactly the lists ComfyUI's
Adapter.forward builds (tests/test_t2i_adapter.py checks both).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ControlNetConfig, preset


class AdapterKind(str, Enum):
    FULL = "full_adapter"  # diffusers' adapter_type names
    FULL_XL = "full_adapter_xl"
    LIGHT = "light_adapter"


UNSHUFFLE: dict[AdapterKind, int] = {AdapterKind.FULL: 8, AdapterKind.FULL_XL: 16, AdapterKind.LIGHT: 8}
# The U-Net each kind was made for, used to place the features when no U-Net config is given.
FAMILY_PRESET: dict[AdapterKind, str] = {AdapterKind.FULL: "sd15", AdapterKind.FULL_XL: "sdxl", AdapterKind.LIGHT: "sd15"}


@dataclass(frozen=True)
class AdapterConfig:
    """Architecture of a T2I-Adapter, read from its tensors."""

    kind: AdapterKind
    in_channels: int = 3  # image channels (1: the adapter takes the grey mean, as ComfyUI does)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # feature width per level
    num_res_blocks: int = 2  # residual blocks per level (light: 4)
    kernel_size: int = 1  # full adapters: kernel of in_conv and block2 (TencentARC `ksize`; released files: 1)
    conv_downsample: bool = False  # full adapters: a strided 3x3 conv (`down_opt.op`) instead of average pooling

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", AdapterKind(self.kind))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.in_channels < 1 or self.num_res_blocks < 1 or not self.channels:
            raise ValueError(f"invalid adapter config {self}")

    @property
    def unshuffle(self) -> int:
        return UNSHUFFLE[self.kind]

    def downsampled(self, level: int) -> bool:
        """Whether level `level` starts by halving the resolution (XL: only the third level)."""
        if self.kind is AdapterKind.FULL_XL:
            return level == 2
        return level > 0

    def latent_factors(self) -> list[int]:
        """Downsampling of each level's feature relative to the latent (which is 1/8 of the image)."""
        factor, out = self.unshuffle // 8, []
        for level in range(len(self.channels)):
            factor *= 2 if self.downsampled(level) else 1
            out.append(factor)
        return out


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool; an odd side is zero-padded on both ends first (TencentARC Downsample, as ComfyUI runs it).

    diffusers' AvgPool2d(ceil_mode=True) agrees on even sizes only.
    """
    return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x) if hasattr(self, "op") else _pool(x)


class FullBlock(nn.Module):
    """[downsample] [in_conv to the new width] then h + block2(relu(block1(h))) (TencentARC ResnetBlock, sk=True)."""

    def __init__(self, cin: int, cout: int, down: bool, ksize: int, use_conv: bool):
        super().__init__()
        if down:
            self.down_opt = Downsample(cin, use_conv)
        if cin != cout:
            self.in_conv = nn.Conv2d(cin, cout, ksize, padding=ksize // 2)
        self.block1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(cout, cout, ksize, padding=ksize // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "down_opt"):
            x = self.down_opt(x)
        if hasattr(self, "in_conv"):
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class LightResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class LightLevel(nn.Module):
    """[pool] 1x1 in_conv to width/4, residual blocks, 1x1 out_conv (TencentARC `extractor`)."""

    def __init__(self, cin: int, cout: int, blocks: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, cout // 4, 1)
        self.body = nn.Sequential(*(LightResBlock(cout // 4) for _ in range(blocks)))
        self.out_conv = nn.Conv2d(cout // 4, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_conv(self.body(self.in_conv(_pool(x) if self.down else x)))


class T2IAdapter(nn.Module):
    """Control image (B, C, H, W) in [0, 1] -> one feature map per level."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.config = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        cin = cfg.in_channels * cfg.unshuffle ** 2
        if cfg.kind is AdapterKind.LIGHT:
            widths = (cin, *cfg.channels)
            self.body = nn.ModuleList(LightLevel(widths[i], widths[i + 1], cfg.num_res_blocks, down=i > 0)
                                      for i in range(len(cfg.channels)))
            return
        self.conv_in = nn.Conv2d(cin, cfg.channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, width in enumerate(cfg.channels):
            prev = cfg.channels[max(level - 1, 0)]
            for j in range(cfg.num_res_blocks):
                first = j == 0
                blocks.append(FullBlock(prev if first else width, width, first and cfg.downsampled(level),
                                        cfg.kernel_size, cfg.conv_downsample))
        self.body = nn.ModuleList(blocks)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prepare_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, 3 or 1, H, W) -> the adapter's channels: a 1-channel adapter takes the grey mean (ComfyUI)."""
        c = self.config.in_channels
        if hint.ndim != 4:
            raise ValueError(f"adapter hint must be (B, C, H, W), got shape {tuple(hint.shape)}")
        if c == 1 and hint.shape[1] > 1:
            hint = hint.mean(dim=1, keepdim=True)
        if hint.shape[1] != c:
            raise ValueError(f"this T2I-Adapter takes {c}-channel images, got {hint.shape[1]} channels")
        u = self.config.unshuffle
        if hint.shape[2] % u or hint.shape[3] % u:
            raise ValueError(f"adapter hint is {tuple(hint.shape[-2:])}; both sides must be multiples of {u} "
                             "(adapter_hint_size gives the size for a latent)")
        return hint.to(self.dtype)

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(self.prepare_hint(hint))
        features = []
        if self.config.kind is AdapterKind.LIGHT:
            for level in self.body:
                x = level(x)
                features.append(x)
            return features
        x = self.conv_in(x)
        per = self.config.num_res_blocks
        for i, block in enumerate(self.body):
            x = block(x)
            if i % per == per - 1:
                features.append(x)
        return features


# ---- what the U-Net gets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterOutput:
    """Adapter features placed on a U-Net: `input[i]` is added to h after input block i (None: nothing), `mid`
    after the middle block. ComfyUI's control dict is {"input": list(reversed(input)), "middle": [mid]}."""

    input: tuple[torch.Tensor | None, ...]
    mid: torch.Tensor | None = None

    @property
    def all(self) -> tuple[torch.Tensor, ...]:
        """The features in order (input blocks first, then the middle), Nones left out."""
        return tuple(t for t in (*self.input, self.mid) if t is not None)

    def map(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> "AdapterOutput":
        """fn(k, feature) on each feature, k counting features as in `all`."""
        k = 0
        mapped: list[torch.Tensor | None] = []
        for t in (*self.input, self.mid):
            if t is None:
                mapped.append(None)
            else:
                mapped.append(fn(k, t))
                k += 1
        return AdapterOutput(tuple(mapped[:-1]), mapped[-1])

    def __add__(self, other: "AdapterOutput") -> "AdapterOutput":
        """Several adapters compose by adding their features (ComfyUI control_merge)."""
        if len(self.input) != len(other.input):
            raise ValueError(f"cannot add adapter outputs placed on {len(self.input)} and {len(other.input)} blocks")
        def plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return b if a is None else a if b is None else a + b
        return AdapterOutput(tuple(plus(a, b) for a, b in zip(self.input, other.input)), plus(self.mid, other.mid))


def placement(cfg: AdapterConfig, unet: ControlNetConfig | None = None) -> list[int | None]:
    """Input block index for each feature (None: after the middle block); see the module docstring."""
    unet = unet or preset(FAMILY_PRESET[cfg.kind])
    layout = unet.skip_layout()
    mid = (unet.channel_widths[-1], 2 ** (len(unet.channel_mult) - 1))
    out: list[int | None] = []
    start = 0
    for width, factor in zip(cfg.channels, cfg.latent_factors()):
        blocks = [i for i in range(start, len(layout)) if layout[i] == (width, factor)]
        if blocks:
            out.append(blocks[-1])
            start = blocks[-1] + 1
        elif (width, factor) == mid and None not in out:
            out.append(None)
            start = len(layout)
        else:
            raise ValueError(f"this {cfg.kind.value} T2I-Adapter gives a {width}-channel feature at 1/{factor} of "
                             f"the latent, which no input block of {unet.family} has: the adapter was made for "
                             "another model family")
    return out


def place_features(features: list[torch.Tensor], cfg: AdapterConfig,
                   unet: ControlNetConfig | None = None) -> AdapterOutput:
    unet = unet or preset(FAMILY_PRESET[cfg.kind])
    slots: list[torch.Tensor | None] = [None] * unet.num_input_blocks
    mid = None
    for feature, index in zip(features, placement(cfg, unet)):
        if index is None:
            mid = feature
        else:
            slots[index] = feature
    return AdapterOutput(tuple(slots), mid)


def adapter_hint_size(adapter: T2IAdapter, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Image size the adapter wants for a latent: 8x the latent, rounded up to the unshuffle factor (ComfyUI
    T2IAdapter.scale_image_to)."""
    u = adapter.config.unshuffle
    return tuple(-(-8 * s // u) * u for s in latent_hw)  # type: ignore[return-value]
