"""The offline demo: outlines of the demo world, generated with and without the shipped ControlNet, measured.

Condition fidelity is the IoU between the generated shape (pixels nearer the caption's shape colour than its
background colour) and the outline's filled area; colour accuracy is the share of samples whose shape and
background mean colours are nearest, in the palette, to the caption's two colours.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..controlnet_model.network import ControlNet
from . import MODELS_DIR
from ..training.base import LockedBase, load_base
from ..training.fidelity import iou
from ..training.validation import guided_sample, to_uint8
from .world import ShapeSpec, colours_match, random_specs, render_outline, segment_shape, shape_mask

logger = logging.getLogger(__name__)

BASE_FILE = MODELS_DIR / "world_base.safetensors"
CONTROLNET_FILE = MODELS_DIR / "world_controlnet.safetensors"
DEFAULT_SEED = 2024  # demo outlines; the shipped models were trained on seeds 0 and 1
CELL = 128  # grid cell side in pixels (the 64 px samples are shown 2x, nearest neighbour)


@dataclass(frozen=True)
class SampleScores:
    caption: str
    iou_with: float
    iou_without: float
    colours_with: bool
    colours_without: bool


@dataclass(frozen=True)
class DemoResult:
    """What `zeroconv demo` measured and wrote."""

    grid: Path  # the PNG: condition | without ControlNet | with ControlNet, one row per outline
    samples: list[SampleScores] = field(default_factory=list)
    cfg_scale: float = 0.0
    steps: int = 0
    wall_s: float = 0.0

    def mean(self, score: str) -> float:
        """The mean of one SampleScores field over the samples."""
        return float(np.mean([getattr(s, score) for s in self.samples]))

    iou_with = property(lambda self: self.mean("iou_with"))
    iou_without = property(lambda self: self.mean("iou_without"))
    colour_accuracy_with = property(lambda self: self.mean("colours_with"))
    colour_accuracy_without = property(lambda self: self.mean("colours_without"))


def validation_settings(controlnet_path: Path) -> tuple[float, int]:
    """CFG scale and DDIM steps of the ControlNet's training validation (its file's train_config), else 9 / 20."""
    from ..controlnet_model.checkpoint import read_metadata

    config = json.loads(read_metadata(controlnet_path).extra.get("train_config", "{}") or "{}")
    return float(config.get("cfg_scale", 9.0)), int(config.get("sample_steps", 20))


@torch.no_grad()
def generate(base: LockedBase, captions: list[str], hints: torch.Tensor | None, controlnet: ControlNet | None,
             cfg_scale: float, steps: int, seed: int) -> np.ndarray:
    """DDIM with classifier-free guidance, the ControlNet (if any) on both halves; (B, H, W, 3) uint8."""
    cond, uncond = base.encode_text(captions), base.encode_text([""] * len(captions))
    pixels = guided_sample(base, controlnet, hints, cond, uncond, cfg_scale, steps, seed, base.image_size)
    return to_uint8(((pixels.float() + 1) / 2).clamp(0, 1))


def score(specs: list[ShapeSpec], without: np.ndarray, with_control: np.ndarray) -> list[SampleScores]:
    """IoU with the outline's filled area and colour match, per sample, for both generations."""
    out = []
    for spec, a, b in zip(specs, without, with_control):
        mask = shape_mask(spec, a.shape[0])
        seg_a, seg_b = segment_shape(a, spec), segment_shape(b, spec)
        out.append(SampleScores(spec.caption, iou(seg_b, mask), iou(seg_a, mask), colours_match(b, seg_b, spec),
                                colours_match(a, seg_a, spec)))
    return out


def write_grid(outlines: np.ndarray, without: np.ndarray, with_control: np.ndarray, captions: list[str],
               path: Path) -> Path:
    """Rows of condition | without | with, each row headed by its caption."""
    from PIL import Image, ImageDraw

    head, band, gap = 18, 14, 4
    rows, pitch = len(captions), CELL + gap
    canvas = Image.new("RGB", (3 * pitch - gap, head + rows * (band + CELL)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(("condition", "without ControlNet", "with ControlNet")):
        draw.text((col * pitch + 4, 3), title, fill="black")
    for r in range(rows):
        top = head + r * (band + CELL)
        draw.text((4, top + 1), captions[r], fill=(60, 60, 60))
        for col, images in enumerate((outlines, without, with_control)):
            cell = Image.fromarray(images[r]).resize((CELL, CELL), Image.Resampling.NEAREST)
            canvas.paste(cell, (col * pitch, top + band))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run_demo(out: str | Path = "zeroconv_demo.png", seed: int = DEFAULT_SEED, count: int = 6,
             base_path: str | Path = BASE_FILE, controlnet_path: str | Path = CONTROLNET_FILE,
             cfg_scale: float | None = None, steps: int | None = None, threads: int | None = None) -> DemoResult:
    """Draw `count` outlines from `seed`, generate without and with the ControlNet, measure, write the grid."""
    from ..controlnet_model.checkpoint import load_controlnet

    start = time.time()
    if threads:
        torch.set_num_threads(threads)
    base_path, controlnet_path = Path(base_path), Path(controlnet_path)
    for path, what in ((base_path, "world base"), (controlnet_path, "world ControlNet")):
        if not path.is_file():
            raise FileNotFoundError(f"the {what} {path} is missing; reinstall zeroconv or rebuild it with the "
                                    f"commands in models/README.md")
    default_cfg, default_steps = validation_settings(controlnet_path)
    cfg_scale = default_cfg if cfg_scale is None else cfg_scale
    steps = default_steps if steps is None else steps
    base = load_base(base_path)
    controlnet = load_controlnet(controlnet_path, dtype=torch.float32).model.eval().requires_grad_(False)
    specs = random_specs(count, seed)
    captions = [s.caption for s in specs]
    outlines = np.stack([render_outline(s, base.image_size) for s in specs])  # (B, H, W, 3) uint8
    hints = torch.from_numpy(outlines).permute(0, 3, 1, 2).float() / 255.0
    without = generate(base, captions, None, None, cfg_scale, steps, seed)
    with_control = generate(base, captions, hints, controlnet, cfg_scale, steps, seed)
    grid = write_grid(outlines, without, with_control, captions, Path(out))
    result = DemoResult(grid, score(specs, without, with_control), cfg_scale, steps, round(time.time() - start, 2))
    logger.info("demo: IoU %.3f with, %.3f without; colours %.2f / %.2f; %.1f s", result.iou_with,
                result.iou_without, result.colour_accuracy_with, result.colour_accuracy_without, result.wall_s)
    return result
