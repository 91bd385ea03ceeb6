"""Learned semantic segmentation painted with the ControlNet seg palettes: SegFormer-B2 on ADE20K (Xie et al. NeurIPS
2021; hub `nvidia/segformer-b2-finetuned-ade-512-512`) and Mask2Former Swin-T on COCO panoptic (Cheng et al. CVPR 2022;
`facebook/mask2former-swin-tiny-coco-panoptic`), both run by the `transformers` library.

transformers is used because it is maintained, already a dependency of the ComfyUI ecosystem, and loads these hub
checkpoints as the community publishes them (hf.py); it is imported only when a model is loaded. Preprocessing is
ours, in torch: short side at the model's scale (SegFormer 512, the ADE20K training and test scale; Mask2Former 384,
its hub image processor's size), aspect kept, sides multiples of 32, ImageNet mean/std. Each pixel gets its most
likely class (Mask2Former: class probabilities of the queries weighted by their mask probabilities, the semantic
inference of the paper), painted at opacity 1 with the ADE20K 150-colour palette or the COCO panoptic 133 category
colours (palettes.json; the ADE20K / COCO palettes of ControlNet-v1-1-nightly annotator/uniformer and oneformer). Maps go back to the output size with nearest (spec.resample).
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common import AnnotatorSpec
from .base import device_of, dtype_of, single, to_tensor
from .hf import IMAGENET_MEAN, IMAGENET_STD, HubModel, load_pretrained, normalize, resize_batch, short_side_multiple

logger = logging.getLogger(__name__)

ADE20K = HubModel("nvidia/segformer-b2-finetuned-ade-512-512", "SegformerForSemanticSegmentation")
COCO = HubModel("facebook/mask2former-swin-tiny-coco-panoptic", "Mask2FormerForUniversalSegmentation")
PALETTES_PATH = Path(__file__).resolve().parent / "palettes.json"
ADE20K_PALETTE, COCO_PALETTE = "ade20k", "coco_panoptic"  # keys of palettes.json
SEGFORMER_SHORT_SIDE = 512
MASK2FORMER_SHORT_SIDE = 384
SIZE_MULTIPLE = 32  # both nets downsample by 32
NAME_AGREEMENT = 0.5  # below this share of matching class names the model's label order is suspect


@functools.cache
def _palettes() -> dict[str, Any]:
    return json.loads(PALETTES_PATH.read_text(encoding="utf-8"))


def palette(name: str) -> np.ndarray:
    """(K, 3) uint8 RGB colour of class k, for "ade20k" (150) or "coco_panoptic" (133)."""
    if name not in _palettes():
        raise KeyError(f"no palette {name!r} in {PALETTES_PATH.name}; choose one of {sorted(_palettes())}")
    return np.array([c["color"] for c in _palettes()[name]["classes"]], dtype=np.uint8)


def class_names(name: str) -> tuple[str, ...]:
    """Class k's name in a palette's dataset."""
    return tuple(c["name"] for c in _palettes()[name]["classes"])


def paint(labels: torch.Tensor | np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(N, H, W) class ids -> (N, H, W, 3) uint8, each pixel its class colour at opacity 1."""
    labels = torch.as_tensor(labels)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(colors)):
        raise ValueError(f"class ids must lie in 0..{len(colors) - 1} for this palette, got "
                         f"{int(labels.min())}..{int(labels.max())}; the model has more classes than the palette")
    table = torch.from_numpy(colors).to(labels.device)
    return table[labels.long()].cpu().numpy()


def _prepare(images: np.ndarray, model: nn.Module, short_side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, H, W, 3) uint8 -> the net's normalised input at its scale, and the picture's (H, W)."""
    x = to_tensor(images, device_of(model))  # (N, 3, H, W) 0..255
    height, width = x.shape[-2:]
    x = resize_batch(x, short_side_multiple(height, width, short_side, SIZE_MULTIPLE), mode="bilinear") / 255.0
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD).to(dtype_of(model)), (height, width)


def _to_picture(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) class ids at the net's input size -> (N, H, W) at the picture's, nearest (ids never blend)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


@torch.no_grad()
def segformer_labels(images: np.ndarray, model: nn.Module) -> torch.Tensor:
    """(N, H, W) class ids: SegFormer logits (1/4 scale) resized bilinearly to the net's input, argmax, then to the
    picture (scores at the input size, not the picture's, keep memory bounded at large detect resolutions)."""
    x, size = _prepare(images, model, SEGFORMER_SHORT_SIDE)
    logits = model(pixel_values=x).logits.float()  # (N, K, h/4, w/4)
    labels = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)
    return _to_picture(labels, size)


@torch.no_grad()
def mask2former_labels(images: np.ndarray, model: nn.Module) -> torch.Tensor:
    """(N, H, W) class ids: per pixel argmax over classes of sum_q p(class | q) * sigmoid(mask_q), "no object"
    dropped (Mask2Former semantic inference), masks resized bilinearly to the net's input, ids then to the picture."""
    x, size = _prepare(images, model, MASK2FORMER_SHORT_SIDE)
    out = model(pixel_values=x)
    classes = out.class_queries_logits.float().softmax(dim=-1)[..., :-1]  # (N, Q, K)
    labels = []
    for probs, masks in zip(classes, out.masks_queries_logits.float()):  # one image at a time: (K, h, w) is large
        masks = F.interpolate(masks[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0].sigmoid()
        labels.append(torch.einsum("qk,qhw->khw", probs, masks).argmax(dim=0))
    return _to_picture(torch.stack(labels), size)


def seg_ade20k_batch(images: np.ndarray, *, device: str | torch.device, model: nn.Module) -> np.ndarray:
    """ADE20K classes (SegFormer-B2) painted with the 150-colour ADE20K palette."""
    return paint(segformer_labels(images, model), palette(ADE20K_PALETTE))


def seg_coco_batch(images: np.ndarray, *, device: str | torch.device, model: nn.Module) -> np.ndarray:
    """COCO panoptic classes (Mask2Former Swin-T) painted with the 133 COCO panoptic category colours."""
    return paint(mask2former_labels(images, model), palette(COCO_PALETTE))


def check_labels(model: nn.Module, palette_name: str) -> nn.Module:
    """The model must have one class per palette colour; a different label order is logged (colours would lie)."""
    names = class_names(palette_name)
    if model.config.num_labels != len(names):
        raise ValueError(f"{type(model).__name__} predicts {model.config.num_labels} classes but the "
                         f"{palette_name} palette has {len(names)}; this is not the {palette_name} checkpoint")
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    agree = sum(id2label.get(i, "").strip().lower() == n.strip().lower() for i, n in enumerate(names))
    if agree < NAME_AGREEMENT * len(names):
        logger.warning("%s: only %d of %d class names match the %s palette's order; colours may not mean the "
                       "usual classes", type(model).__name__, agree, len(names), palette_name)
    return model


def load_seg_ade20k(device: str | torch.device = "cpu") -> nn.Module:
    """SegformerForSemanticSegmentation with nvidia/segformer-b2-finetuned-ade-512-512 (via the manifest)."""
    return check_labels(load_pretrained(ADE20K, device), ADE20K_PALETTE)


def load_seg_coco(device: str | torch.device = "cpu") -> nn.Module:
    """Mask2FormerForUniversalSegmentation with facebook/mask2former-swin-tiny-coco-panoptic (via the manifest)."""
    return check_labels(load_pretrained(COCO, device), COCO_PALETTE)


SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("seg_ade20k", "ZeroConvSegADE20K", "Segmentation, ADE20K SegFormer-B2 (ZeroConv)",
                  single(seg_ade20k_batch), weights=ADE20K.files, control_types=("seg",), category="learned",
                  loader=load_seg_ade20k, batch_fn=seg_ade20k_batch, resample="nearest",
                  description="ADE20K semantic classes (SegFormer-B2, transformers) in the ADE20K palette"),
    AnnotatorSpec("seg_coco", "ZeroConvSegCOCO", "Segmentation, COCO Mask2Former Swin-T (ZeroConv)",
                  single(seg_coco_batch), weights=COCO.files, control_types=("seg",), category="learned",
                  loader=load_seg_coco, batch_fn=seg_coco_batch, resample="nearest",
                  description="COCO panoptic classes (Mask2Former Swin-T, transformers) in the COCO panoptic colours"),
)
