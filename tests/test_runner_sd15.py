"""Real Stable Diffusion 1.5 through the same runner: slow and skipped by default (needs real weights).

Set ZEROCONV_SD15_CHECKPOINT to a local v1-5 single file (or an hf://OWNER/REPO/FILE spec, which downloads it)
and run `python -m pytest -m slow tests/test_runner_sd15.py`.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from zeroconv.workflow_runner import run_prompt
from zeroconv.workflow_runner.files import HostPaths

CHECKPOINT = os.environ.get("ZEROCONV_SD15_CHECKPOINT")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHECKPOINT, reason="needs real SD1.5 weights: set ZEROCONV_SD15_CHECKPOINT")]


def _prompt(checkpoint: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red apple on a table", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 6, "cfg": 7.0,
                                                   "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sd15"}},
    }


def test_sd15_checkpoint_by_path_renders_an_image(tmp_path) -> None:
    result = run_prompt(_prompt(CHECKPOINT), HostPaths(output_dir=tmp_path))
    pixels = np.asarray(Image.open(result.saved[0]), dtype=np.float32)
    assert pixels.shape == (256, 256, 3) and pixels.std() > 5.0
