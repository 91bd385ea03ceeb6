"""Fitting a control image to the generation size: the hint must be exactly 8x the latent."""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class HintFit(str, Enum):
    CROP_AND_RESIZE = "crop_and_resize"  # centre-crop to the target aspect, then resize (ComfyUI core's choice)
    RESIZE = "resize"  # stretch to the target size
    RESIZE_AND_FILL = "resize_and_fill"  # fit inside the target, pad the rest with black (no control there)


def fit_hint(image: torch.Tensor, height: int, width: int, fit: HintFit = HintFit.CROP_AND_RESIZE,
             mode: str = "bilinear") -> torch.Tensor:
    """Resize a (B, C, H, W) image in [0, 1] to (B, C, height, width) by the chosen fit."""
    if image.ndim != 4:
        raise ValueError(f"control image must be (B, C, H, W), got shape {tuple(image.shape)}")
    fit = HintFit(fit)
    _, _, h, w = image.shape
    if (h, w) == (height, width):
        return image
    kwargs = {"mode": mode, "align_corners": False} if mode in ("bilinear", "bicubic") else {"mode": mode}
    if fit is HintFit.RESIZE:
        return F.interpolate(image, size=(height, width), **kwargs)
    scale = max(height / h, width / w) if fit is HintFit.CROP_AND_RESIZE else min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(image, size=(new_h, new_w), **kwargs)
    if fit is HintFit.CROP_AND_RESIZE:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return resized[:, :, top:top + height, left:left + width]
    out = image.new_zeros((image.shape[0], image.shape[1], height, width))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[:, :, top:top + new_h, left:left + new_w] = resized
    return out


def image_to_hint(image: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """A host IMAGE (B, H, W, C) in [0, 1] to a hint (B, channels, H, W): grey is repeated, alpha dropped."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"control image must be (B, H, W, C), got shape {tuple(image.shape)}")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(*image.shape[:-1], 3)
    elif c == 4:
        rgb, alpha = image[..., :3], image[..., 3:]
        image = rgb * alpha  # composite over black: transparent areas carry no control
    elif c != 3:
        raise ValueError(f"control image has {c} channels; give a grey, RGB or RGBA image")
    hint = image.movedim(-1, 1).float()
    if channels == 1:
        hint = hint.mean(dim=1, keepdim=True)
    elif channels != 3:
        raise ValueError(f"this ControlNet wants {channels}-channel hints; only 1 or 3 come from images")
    if not torch.isfinite(hint).all():
        raise ValueError("the control image contains NaN or infinite values; check the node that made it")
    return hint.clamp(0.0, 1.0).contiguous()  # the movedim view is channels-last; the hint encoder's convs want NCHW


LATENT_SCALE = 8  # image pixels per latent cell for SD VAEs (ComfyUI's ControlBase.compression_ratio)


def centre_crop(image: torch.Tensor, aspect: float) -> torch.Tensor:
    """(..., H, W) cut symmetrically to width/height = aspect (comfy/utils.py common_upscale, crop="center")."""
    h, w = image.shape[-2:]
    ratio = aspect / (w / h)
    if ratio < 1:
        left = round((w - w * ratio) / 2)
        return image[..., :, left:w - left]
    if ratio > 1:
        top = round((h - h / ratio) / 2)
        return image[..., top:h - top, :]
    return image


def fit_to_latent(image: torch.Tensor, latent_h: int, latent_w: int, fit: HintFit) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8h, 8w). crop_and_resize is ComfyUI core's fit (centre crop to the target aspect,
    then nearest-exact, comfy/controlnet.py ControlNet.get_control), so balanced mode gives core's result."""
    height, width = latent_h * LATENT_SCALE, latent_w * LATENT_SCALE
    fit = HintFit(fit)
    if fit is HintFit.CROP_AND_RESIZE:
        image, fit = centre_crop(image, width / height), HintFit.RESIZE
    return fit_hint(image, height, width, fit, mode="nearest-exact")


def hint_channels(hint: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """A (B, C, H, W) hint with the channel count a control model wants (RGB averaged to grey for 1)."""
    if hint.shape[1] == channels:
        return hint
    if channels == 1:
        return hint.mean(dim=1, keepdim=True)
    raise ValueError(f"{name} wants {channels}-channel hints but the control image has {hint.shape[1]} channels")
