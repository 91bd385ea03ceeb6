"""Stable Diffusion single files through the runner: tiny random ones in the real key layouts (fast), and real
SD1.5 (slow, skipped by default: set ZEROCONV_SD15_CHECKPOINT to a local v1-5 single file, or an
hf://OWNER/REPO/FILE spec, which downloads it, and run `python -m pytest -m slow tests/test_runner_sd15.py`).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from zeroconv.workflow_runner import run_prompt
from zeroconv.workflow_runner.files import HostPaths

CHECKPOINT = os.environ.get("ZEROCONV_SD15_CHECKPOINT")

needs_weights = pytest.mark.skipif(not CHECKPOINT, reason="needs real SD1.5 weights: set ZEROCONV_SD15_CHECKPOINT")


def _prompt(checkpoint: str, size: int = 256, steps: int = 6) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red apple on a table", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": steps, "cfg": 7.0,
                                                   "sampler_name": "ddim", "scheduler": "ddim_uniform",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sd15"}},
    }


@pytest.mark.parametrize("family, scale", [("SD1.x", 0.18215), pytest.param("SDXL", 0.13025, marks=pytest.mark.slow)])
def test_tiny_sd_single_file_loads_through_load_base_and_samples(tmp_path, family, scale) -> None:
    from .tiny_base import write_tiny_sd_checkpoint

    path = write_tiny_sd_checkpoint(tmp_path / f"tiny_{family}.safetensors", family)
    result = run_prompt(_prompt(str(path), size=64, steps=2), HostPaths(output_dir=tmp_path / "out"))
    model, clip, vae = result.execution.outputs["1"]
    from zeroconv.nodes.host.models import latent_scale

    assert model.family == family and latent_scale(model) == scale  # offline, MODEL is the library's base
    assert ("pooled_output" in result.execution.outputs["2"][0][0][1]) == (family == "SDXL")  # SDXL's ADM vector
    assert result.execution.outputs["5"][0]["samples"].shape == (1, 4, 8, 8)
    assert Image.open(result.saved[0]).size == (64, 64)


@pytest.mark.slow
@needs_weights
def test_sd15_checkpoint_by_path_renders_an_image(tmp_path) -> None:
    result = run_prompt(_prompt(CHECKPOINT), HostPaths(output_dir=tmp_path))
    pixels = np.asarray(Image.open(result.saved[0]), dtype=np.float32)
    assert pixels.shape == (256, 256, 3) and pixels.std() > 5.0
