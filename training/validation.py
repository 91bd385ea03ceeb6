"""Validation during training: DDIM samples with CFG on fixed conditions, their condition fidelity, PNG grids
and the loss/fidelity curve (paper §4: DDIM 20 steps, CFG 9, the default prompt; Fig. 21 sudden convergence)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from ..controlnet_model.network import ControlNet
from .base import LockedBase, TextConditioning
from .encode import encode_captions
from .fidelity import MEASURING_ANNOTATOR, FidelityMetric, metric_for, score
from .schedule import ddim_sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSet:
    hints: torch.Tensor  # (N, 3, R, R) in [0, 1]
    prompts: tuple[str, ...]
    size_cond: torch.Tensor  # (N, 6) SDXL size conditioning

    def pairs(self) -> list[tuple[int, str]]:
        """(condition index, prompt) of every sample, grouped by condition."""
        return [(i, p) for i in range(self.hints.shape[0]) for p in self.prompts]


def build_validation_set(conditions: tuple[str, ...], prompts: tuple[str, ...], dataset: Any, count: int,
                         resolution: int) -> ValidationSet:
    """The configured condition images, else the conditions of the first `count` data rows (centre crop)."""
    from .config import Crop
    from .data import load_rgb, resize_and_crop

    if conditions:
        hints = []
        for path in conditions:
            if not Path(path).is_file():
                raise FileNotFoundError(f"validation condition {path} does not exist; fix validation_conditions")
            image = load_rgb(Path(path), "validation_conditions", "condition")
            crop, _ = resize_and_crop(image, resolution, Crop.CENTER, None)
            hints.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0)
        hint = torch.stack(hints)
    else:
        items = [dataset[(i, i)] for i in range(min(count, len(dataset)))]
        hint = torch.stack([it["hint"] for it in items])
    size = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return ValidationSet(hint, tuple(prompts) or ("",), size.expand(hint.shape[0], 6).clone())


@torch.no_grad()
def guided_sample(base: LockedBase, controlnet: ControlNet | None, hints: torch.Tensor | None,
                  cond: TextConditioning, uncond: TextConditioning, cfg_scale: float, steps: int, seed: int, size: int,
                  autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """DDIM with classifier-free guidance, the ControlNet (if any) on both halves; decoded (N, 3, size, size) in
    [-1, 1]. The noise is drawn on the CPU from `seed`, then moved to the device of the text conditioning."""
    context = torch.cat([cond.context, uncond.context])
    y = None if cond.y is None else torch.cat([cond.y, uncond.y])
    hint2 = None if controlnet is None else torch.cat([hints, hints])

    def model_fn(x: torch.Tensor, t: torch.Tensor, _: float) -> torch.Tensor:
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        with autocast():
            residuals = None if controlnet is None else controlnet(x2, hint2, t2, context, y)
            out = base.unet(x2, t2, context, y, control=residuals).float()
        c, u = out.chunk(2)
        return u + cfg_scale * (c - u)

    gen = torch.Generator().manual_seed(seed)
    shape = (cond.context.shape[0], base.unet.config.in_channels, size // 8, size // 8)
    latents = ddim_sample(model_fn, base.schedule, torch.randn(shape, generator=gen).to(context.device), steps=steps)
    with autocast():
        return base.decode_latents(latents)


@torch.no_grad()
def sample(base: LockedBase, controlnet: ControlNet, vset: ValidationSet, cfg_scale: float, steps: int, seed: int,
           device: torch.device, autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """The validation samples (guided_sample on every condition and prompt); (N, 3, R, R) in [0, 1]."""
    pairs = vset.pairs()
    hint = vset.hints[[i for i, _ in pairs]].to(device)
    size = vset.size_cond[[i for i, _ in pairs]].to(device)
    with autocast():
        cond = encode_captions(base, [p for _, p in pairs], size)
        uncond = encode_captions(base, [""] * len(pairs), size)
    pixels = guided_sample(base, controlnet, hint, cond, uncond, cfg_scale, steps, seed, hint.shape[-1], autocast)
    return ((pixels.float() + 1) / 2).clamp(0, 1).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def measure_fidelity(samples: np.ndarray, hints: np.ndarray, annotator: str, metric: FidelityMetric) -> float | None:
    """Mean metric between each sample's annotation and its input condition; None when it cannot be measured."""
    if metric is FidelityMetric.NONE or not annotator:
        return None
    from ..annotators import registry

    name = MEASURING_ANNOTATOR.get(annotator, annotator)
    if name not in registry.ANNOTATORS:
        logger.info("no %r annotator to measure condition fidelity with; the fidelity curve is left out", name)
        return None
    scores = [score(metric, registry.annotate(name, s, detect_resolution=0), h) for s, h in zip(samples, hints)]
    return float(np.mean([s for s in scores if s is not None]))


def fidelity_setup(annotator: str, control_type: str, metric_name: str) -> tuple[str, FidelityMetric]:
    """Which annotator measures the samples and by which metric ('auto' picks by annotator or control type)."""
    measured_by = annotator or control_type
    metric = metric_for(measured_by) if metric_name == "auto" else FidelityMetric(metric_name)
    return measured_by, metric


def save_grid(hints: torch.Tensor, samples: torch.Tensor, columns: int, path: Path) -> Path:
    """One row per condition: the condition, then one sample per prompt; written as PNG."""
    from PIL import Image

    from ..controlnet_model.atomic import atomic_write

    n, _, h, w = hints.shape
    canvas = np.zeros((n * h, (columns + 1) * w, 3), np.uint8)
    cond, samp = to_uint8(hints), to_uint8(samples)
    for i in range(n):
        canvas[i * h:(i + 1) * h, :w] = cond[i]
        for j in range(columns):
            canvas[i * h:(i + 1) * h, (j + 1) * w:(j + 2) * w] = samp[i * columns + j]
    atomic_write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))
    return path


def plot_curves(losses: list[float], fidelity: list[tuple[int, float]], path: Path, width: int = 800) -> Path:
    """Loss per step (raw and smoothed) and, below it, condition fidelity per validation, drawn with PIL."""
    from PIL import Image, ImageDraw

    from ..controlnet_model.atomic import atomic_write

    panels = [("loss", list(enumerate(losses, start=1)), _smooth(losses))]
    if fidelity:
        panels.append(("condition fidelity", fidelity, None))
    panel_h = 260
    image = Image.new("RGB", (width, panel_h * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, points, smooth) in enumerate(panels):
        _panel(draw, (0, k * panel_h, width, (k + 1) * panel_h), title, points, smooth)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def _panel(draw: Any, box: tuple[int, int, int, int], title: str, points: list[tuple[int, float]],
           smooth: list[float] | None) -> None:
    x0, y0, x1, y1 = box[0] + 60, box[1] + 25, box[2] - 20, box[3] - 30
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, box[1] + 6), title, fill="black")
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    lo, hi = min(ys), max(ys)
    if smooth is None:  # fidelity scores live in [0, 1] (correlations in [-1, 1]): a fixed axis shows the jump
        lo, hi = min(0.0, lo), max(1.0, hi)
    hi = hi if hi > lo else lo + 1e-6
    sx, ex = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - sx) / (ex - sx) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

    draw.text((4, y0), f"{hi:.4g}", fill="black")
    draw.text((4, y1 - 10), f"{lo:.4g}", fill="black")
    draw.text((x0, y1 + 6), f"step {sx}", fill="black")
    draw.text((x1 - 70, y1 + 6), f"step {ex}", fill="black")
    raw = [at(x, y) for x, y in points]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230) if smooth else (200, 40, 40), width=1 if smooth else 2)
    for p in raw if not smooth else []:
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(200, 40, 40))
    if smooth and len(smooth) > 1:
        draw.line([at(x, y) for x, y in zip(xs, smooth)], fill=(20, 60, 160), width=2)
