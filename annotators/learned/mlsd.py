"""Straight line segments from M-LSD (Gu et al., "Towards Light-weight and Real-time Line Segment Detection",
AAAI 2022), the large MobileNetV2 model ControlNet's mlsd models were trained with (`mlsd_large_512_fp32.pth`).

The net predicts, at half the input resolution, a segment-centre heatmap (channel 0 of its 9 outputs) and each
centre's displacement to the segment's two ends (channels 1-4: dx0, dy0, dx1, dy1 in output pixels). Segments are
the heatmap's 3x3 local maxima, best 200 first, with a score above `value_threshold` and a length above
`distance_threshold`; they are drawn as 1-px white lines on black at the input size.

Key layout (lllyasviel/ControlNet-v1-1-nightly annotator/mlsd/models/mbv2_mlsd_large.py):
`backbone.features.{0..13}` (MobileNetV2 cut after its 96-channel stage: `features.0.{0,1}` stem conv + BN, then
inverted residuals `features.i.conv.{j}`: pointwise-expand and depthwise conv+BN pairs at `.{j}.0` / `.{j}.1`,
projection conv and BN last), decoder `block15`..`block22` (`conv1.{0,1}`, `conv2.{0,1}`: conv with bias + BN),
head `block23` (`conv1`, `conv2` as above, `conv3` 1x1).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common import AnnotatorSpec, ParamSpec
from .base import build, device_of, single, to_tensor

WEIGHTS = "mlsd_large_512_fp32.pth"
# MobileNetV2 inverted-residual stages kept by M-LSD: (expansion t, channels c, repeats n, first stride s).
STAGES: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                                 (6, 96, 3, 1))
STEM_CHANNELS = 32
TAPS = (1, 3, 6, 10, 13)  # feature indices handed to the decoder: strides 2, 4, 8, 16, 16
MULTIPLE = 16  # the backbone's total stride: input sides are resized up to multiples of it
TOP_K = 200  # heatmap maxima considered (reference decoder)
PEAK_WINDOW = 3  # local-maximum window of the heatmap
OUTPUT_STRIDE = 2  # the maps are at half the input resolution


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias), BatchNorm, ReLU6; stride 2 pads right and bottom only, as TensorFlow Lite's 'SAME' does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU6())
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.stride == 2 else x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (unless t = 1), 3x3 depthwise, 1x1 linear projection; residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [ConvBNReLU6(in_channels, hidden, kernel_size=1)]
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class Backbone(nn.Module):
    """MobileNetV2 up to its 96-channel stage, on RGB plus a constant fourth channel; returns the TAPS features."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(4, STEM_CHANNELS, stride=2)]
        channels = STEM_CHANNELS
        for expansion, out_channels, repeats, stride in STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion))
                channels = out_channels
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class Merge(nn.Module):
    """Decoder step A: 1x1 conv+BN+ReLU of the skip and of the deeper map (upsampled x2 unless same size), concat."""

    def __init__(self, skip_channels: int, deep_channels: int, upscale: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(deep_channels, 64, 1)
        self.conv2 = _conv_bn_relu(skip_channels, 64, 1)
        self.upscale = upscale

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        deep = self.conv1(deep)
        if self.upscale:
            deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((self.conv2(skip), deep), dim=1)


class Refine(nn.Module):
    """Decoder step B: residual 3x3 conv+BN+ReLU, then 3x3 conv+BN+ReLU to 64 channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, in_channels, 3)
        self.conv2 = _conv_bn_relu(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class Head(nn.Module):
    """Dilated (5) 3x3 conv+BN+ReLU, 3x3 conv+BN+ReLU, 1x1 conv to 16 maps."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, in_channels, 3, dilation=5)
        self.conv2 = _conv_bn_relu(in_channels, in_channels, 3)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """M-LSD large: (N, 4, H, W) in -1..1, H and W multiples of 16 -> (N, 9, H/2, W/2) centre + displacement maps."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.block15, self.block16 = Merge(64, 96, upscale=False), Refine(128, 64)
        self.block17, self.block18 = Merge(32, 64), Refine(128, 64)
        self.block19, self.block20 = Merge(24, 64), Refine(128, 64)
        self.block21, self.block22 = Merge(16, 64), Refine(128, 64)
        self.block23 = Head(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]  # the released head's last 9 of 16 maps are the line maps


def model_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB 0..255 -> (N, 4, H, W): a constant 1 appended as a fourth channel, all scaled x/127.5 - 1."""
    ones = torch.ones_like(images[:, :1])
    return torch.cat([images, ones], dim=1) / 127.5 - 1.0


def decode_segments(maps: torch.Tensor, value_threshold: float, distance_threshold: float) -> list[np.ndarray]:
    """(N, 9, h, w) net output -> per image an (S, 4) array of x0, y0, x1, y1 in output-map pixels.

    Centres are 3x3 maxima of sigmoid(channel 0), the best TOP_K considered; a segment is kept when its centre
    scores above `value_threshold` and its ends lie more than `distance_threshold` output pixels apart.
    """
    n, _, h, w = maps.shape
    heat = torch.sigmoid(maps[:, 0])
    peaks = heat * (F.max_pool2d(heat, PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2) == heat)
    scores, index = peaks.reshape(n, -1).topk(min(TOP_K, h * w), dim=1)
    ys, xs = index // w, index % w
    out = []
    for b in range(n):
        y, x = ys[b], xs[b]
        offsets = maps[b, 1:5, y, x].T  # (K, 4): dx0, dy0, dx1, dy1
        ends = offsets + torch.stack([x, y, x, y], dim=1).to(offsets.dtype)
        length = (offsets[:, :2] - offsets[:, 2:]).norm(dim=1)
        keep = (scores[b] > value_threshold) & (length > distance_threshold)
        out.append(ends[keep].float().cpu().numpy())
    return out


def draw_segments(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """(S, 4) x0, y0, x1, y1 in image pixels -> (H, W, 3) uint8, 1-px white lines on black."""
    import cv2

    canvas = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in segments:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return np.repeat(canvas[..., None], 3, axis=2)


@torch.no_grad()
def mlsd_batch(images: np.ndarray, *, device: str | torch.device, model: MLSDLarge, value_threshold: float = 0.1,
               distance_threshold: float = 0.1) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W, 3) uint8 segments; the net runs at sides rounded up to multiples of 16."""
    n, h, w, _ = images.shape
    size = (-(-h // MULTIPLE) * MULTIPLE, -(-w // MULTIPLE) * MULTIPLE)  # rounded up
    x = to_tensor(images, device_of(model))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="area")
    maps = model(model_input(x))
    scale = np.array([w / size[1], h / size[0]] * 2, np.float32) * OUTPUT_STRIDE
    return np.stack([draw_segments(s * scale, h, w)
                     for s in decode_segments(maps.float(), value_threshold, distance_threshold)])


def load_mlsd(device: str | torch.device = "cpu") -> MLSDLarge:
    """MLSDLarge with the mlsd_large_512_fp32.pth weights."""
    return build(MLSDLarge, WEIGHTS, device)


SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("mlsd", "ZeroConvMLSD", "Straight Lines, M-LSD (ZeroConv)", single(mlsd_batch),
                  (ParamSpec("value_threshold", "float", 0.1, 0.01, 2.0, 0.01,
                             tooltip="segment-centre confidence a line needs; higher keeps fewer lines"),
                   ParamSpec("distance_threshold", "float", 0.1, 0.0, 20.0, 0.01,
                             tooltip="shortest segment kept, in pixels of the half-resolution map")),
                  weights=(WEIGHTS,), control_types=("mlsd",), category="learned", loader=load_mlsd,
                  batch_fn=mlsd_batch, resample="edges",
                  description="M-LSD large: straight segments as 1-px white lines on black (ControlNet mlsd)"),
)
