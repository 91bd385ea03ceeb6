"""Training node: a small ControlNet run inside ComfyUI, written where the loader finds it."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .common import CATEGORY
from .host import folders
from .host.models import progress_bar

logger = logging.getLogger(__name__)

MIXED_PRECISION = ["no", "bf16", "fp16"]


def _resolve_checkpoint(name: str) -> str:
    """A checkpoint name from the combo to its path (a path outside ComfyUI)."""
    path = folders.find_model("checkpoints", name)
    if path is not None:
        return str(path)
    if Path(name).is_file():
        return name
    raise FileNotFoundError(f"base checkpoint {name!r} was not found in ComfyUI's checkpoints folder")


def _annotator_names() -> list[str]:
    from ..annotators.registry import ANNOTATORS

    return ["none", *sorted(ANNOTATORS)]


def publish(final: Path, name: str) -> Path:
    """Copy the trained file into the first ControlNet folder (atomic rename) so the loader lists it."""
    targets = folders.model_folders("controlnet")
    if not targets:
        return final
    target = targets[0] / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(final, tmp)
    os.replace(tmp, target)
    return target


class ZeroConvTrainControlNet:
    """Train a small ControlNet on a data folder against a checkpoint, then save it to the ControlNet folder."""

    DESCRIPTION = ("Trains a ControlNet (paper recipe: AdamW 1e-5, 50% empty prompts, locked base) on a folder of "
                   "image/condition/caption rows or a Fill50K-style prompt.json. For long runs use `zeroconv train`.")
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("controlnet_path", "loss_curve_path")
    FUNCTION = "train"
    CATEGORY = f"{CATEGORY}/training"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "base_checkpoint": (folders.model_names("checkpoints"), {"tooltip": "SD1.x/SD2.x/SDXL checkpoint the ControlNet steers"}),
            "data": ("STRING", {"default": "", "tooltip": "folder (image/, condition/, captions) or .jsonl file"}),
            "annotator": (_annotator_names(), {"tooltip": "make conditions from the images; none = given"}),
            "control_type": ("STRING", {"default": "", "tooltip": "stored in the file, e.g. canny"}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000}),
            "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 256}),
            "grad_accum": ("INT", {"default": 1, "min": 1, "max": 256}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}),
            "mixed_precision": (MIXED_PRECISION, {"default": "bf16"}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True}),
            "output_name": ("STRING", {"default": "my_controlnet"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    def train(self, base_checkpoint: str, data: str, annotator: str, control_type: str, steps: int,
              learning_rate: float, batch_size: int, grad_accum: int, resolution: int, mixed_precision: str,
              gradient_checkpointing: bool, output_name: str, seed: int) -> tuple[str, str]:
        import torch

        from ..training.config import TrainConfig
        from ..training.loop import train

        cfg = TrainConfig(base=_resolve_checkpoint(base_checkpoint), data=data,
                          annotator="" if annotator == "none" else annotator, control_type=control_type,
                          max_steps=steps, lr=learning_rate, batch_size=batch_size, grad_accum=grad_accum,
                          resolution=resolution, mixed_precision=mixed_precision, seed=seed, num_workers=0,
                          gradient_checkpointing=gradient_checkpointing, output_name=output_name,
                          output_dir=str(folders.training_output_root() / output_name), save_every=max(100, steps // 10),
                          validate_every=max(100, steps // 10))
        bar = progress_bar(steps)
        progress = (lambda step, total, info: bar.update_absolute(step, total)) if bar is not None else None
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference_mode
            result = train(cfg, progress=progress)
        return str(publish(result.checkpoint, output_name)), str(Path(cfg.output_dir) / "loss.png")


NODE_CLASS_MAPPINGS = {"ZeroConvTrainControlNet": ZeroConvTrainControlNet}
NODE_DISPLAY_NAME_MAPPINGS = {"ZeroConvTrainControlNet": "Train ControlNet (ZeroConv)"}
