"""Learned depth: MiDaS DPT-Hybrid (Ranftl et al. ICCV 2021; hub `Intel/dpt-hybrid-midas`, which
comfyui_controlnet_aux 1.1.5 uses) and Depth Anything V2 Small (Yang et al. 2024;
`depth-anything/Depth-Anything-V2-Small-hf`, Apache-2.0), both run by the `transformers` library.

transformers is used because it is maintained, already a dependency of the ComfyUI ecosystem, and loads these hub
checkpoints as the community publishes them (hf.py); it is imported only when a model is loaded. Preprocessing is
ours, in torch, on the model's device: DPT-Hybrid takes exactly its config's 384x384 (transformers' hybrid embeddings
do not interpolate position embeddings) with mean = std = 0.5; Depth Anything takes the short side at 518, aspect
kept, sides multiples of 14, ImageNet mean/std. Both predict relative inverse depth (larger = nearer); the map is
resized back bilinearly and min-max normalised per image to 0..255, so near is bright (lllyasviel/ControlNet
annotator/midas).
ControlNet v1.0's normal map is made from MiDaS's raw (unnormalised) prediction (normal_midas_batch).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common import AnnotatorSpec, ParamSpec
from ..normal import normal_from_values
from .base import device_of, dtype_of, single, to_tensor, to_uint8_maps
from .hf import IMAGENET_MEAN, IMAGENET_STD, HubModel, load_pretrained, normalize, resize_batch, short_side_multiple

MIDAS = HubModel("Intel/dpt-hybrid-midas", "DPTForDepthEstimation")
DEPTH_ANYTHING = HubModel("depth-anything/Depth-Anything-V2-Small-hf", "DepthAnythingForDepthEstimation")
MIDAS_MEAN = MIDAS_STD = (0.5, 0.5, 0.5)  # the DPT image processor's: RGB 0..1 -> -1..1

SizeFn = Callable[[Any, int, int], tuple[int, int]]  # (model config, height, width) -> the net's input (h, w)


def midas_input_size(config: Any, height: int, width: int) -> tuple[int, int]:
    """DPT-Hybrid's input: its config's image_size square (384), whatever the picture's aspect."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def depth_anything_input_size(config: Any, height: int, width: int) -> tuple[int, int]:
    """Depth Anything's input: short side at the backbone's image_size (518), sides multiples of the patch (14)."""
    return short_side_multiple(height, width, config.backbone_config.image_size, config.patch_size)


def normalise_depth(depth: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) relative inverse depth -> 0..1 min-max per image, so the nearest point is 1 (a flat map is 0)."""
    flat = depth.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1, 1) - low
    return (depth - low) / torch.where(span > 0, span, torch.ones_like(span))


@torch.no_grad()
def raw_depth(images: np.ndarray, model: nn.Module, size_fn: SizeFn, mean: tuple[float, ...],
              std: tuple[float, ...]) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 1, H, W) float32 relative inverse depth as the net predicts it, at image size."""
    x = to_tensor(images, device_of(model))  # (N, 3, H, W) 0..255
    height, width = x.shape[-2:]
    x = resize_batch(x, size_fn(model.config, height, width)) / 255.0
    depth = model(pixel_values=normalize(x, mean, std).to(dtype_of(model))).predicted_depth  # (N, h, w)
    return F.interpolate(depth[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)


def predict_depth(images: np.ndarray, model: nn.Module, size_fn: SizeFn, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W, 3) uint8 grey depth, near = bright, through a transformers depth model."""
    return to_uint8_maps(normalise_depth(raw_depth(images, model, size_fn, mean, std)))


def depth_midas_batch(images: np.ndarray, *, device: str | torch.device, model: nn.Module) -> np.ndarray:
    """MiDaS DPT-Hybrid depth, near = bright (see the module docstring)."""
    return predict_depth(images, model, midas_input_size, MIDAS_MEAN, MIDAS_STD)


def normal_midas_batch(images: np.ndarray, *, device: str | torch.device, model: nn.Module,
                       background_threshold: float = 0.4) -> np.ndarray:
    """v1.0's "normal from MiDaS": Sobel of MiDaS's raw inverse depth (not the 0..255 map), z = 2 pi, flat background.

    Raw values keep v1.0's tilt: the same surface gives the same normal whatever the picture's depth range.
    """
    depth = raw_depth(images, model, midas_input_size, MIDAS_MEAN, MIDAS_STD)[:, 0].cpu().numpy()
    return np.stack([normal_from_values(d, background_threshold) for d in depth])


def depth_anything_batch(images: np.ndarray, *, device: str | torch.device, model: nn.Module) -> np.ndarray:
    """Depth Anything V2 depth, near = bright (see the module docstring)."""
    return predict_depth(images, model, depth_anything_input_size, IMAGENET_MEAN, IMAGENET_STD)


def load_depth_midas(device: str | torch.device = "cpu") -> nn.Module:
    """DPTForDepthEstimation with Intel/dpt-hybrid-midas (config.json + model.safetensors via the manifest)."""
    return load_pretrained(MIDAS, device)


def load_depth_anything(device: str | torch.device = "cpu") -> nn.Module:
    """DepthAnythingForDepthEstimation with Depth-Anything-V2-Small-hf (via the manifest)."""
    return load_pretrained(DEPTH_ANYTHING, device)


SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("depth_midas", "ZeroConvDepthMiDaS", "Depth, MiDaS DPT-Hybrid (ZeroConv)", single(depth_midas_batch),
                  weights=MIDAS.files, control_types=("depth",), category="learned", loader=load_depth_midas,
                  batch_fn=depth_midas_batch,
                  description="MiDaS DPT-Hybrid relative depth (Intel/dpt-hybrid-midas, transformers), near = bright"),
    AnnotatorSpec("normal_midas", "ZeroConvNormalMiDaS", "Normal, from MiDaS (ZeroConv)", single(normal_midas_batch),
                  (ParamSpec("background_threshold", "float", 0.4, 0.0, 1.0, 0.01,
                             tooltip="depth below this share of the range is drawn flat (v1.0 default 0.4)"),),
                  weights=MIDAS.files, control_types=("normal",), category="learned", loader=load_depth_midas,
                  batch_fn=normal_midas_batch,
                  description="v1.0 normal map: Sobel of MiDaS DPT-Hybrid's raw depth (R towards you, G up, B left)"),
    AnnotatorSpec("depth_anything_v2", "ZeroConvDepthAnythingV2", "Depth, Depth Anything V2 Small (ZeroConv)",
                  single(depth_anything_batch), weights=DEPTH_ANYTHING.files, control_types=("depth",),
                  category="learned", loader=load_depth_anything, batch_fn=depth_anything_batch,
                  description="Depth Anything V2 Small relative depth (transformers, Apache-2.0), near = bright"),
)
