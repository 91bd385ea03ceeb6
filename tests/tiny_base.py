"""Tiny random SD1.x / SD2.x / SDXL single files in the real key layouts, for tests and CPU smoke runs
(examples/train_tiny_cpu.toml).

Same prefixes and key names as the released checkpoints (U-Net `model.diffusion_model.`, VAE `first_stage_model.`,
text encoders in the Hugging Face or open_clip layout); widths are tiny, so a training step takes milliseconds.
What shapes cannot tell (attention heads of widths below 64) is recorded in the `zeroconv_base` metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from zeroconv.controlnet_model.atomic import atomic_save_safetensors
from zeroconv.controlnet_model.config import preset
from zeroconv.controlnet_model.unet import UNetModel
from zeroconv.training.text_encoders import (HF_FUSED_QKV, HF_TO_OPEN_CLIP, PARAMS, TEXT_ENCODERS, FrozenTextEncoder,
                                             count_layers)
from zeroconv.training.vae import AutoencoderKL, VAEConfig

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4, embed_dim=4)
# family -> (U-Net preset, [(text width, layers, heads, projection dim or None) per encoder])
TINY_FAMILIES: dict[str, tuple[str, list[tuple[int, int, int, int | None]]]] = {
    "SD1.x": ("tiny", [(32, 2, 2, None)]),
    "SD2.x": ("tiny-sd2", [(48, 3, 2, None)]),
    "SDXL": ("tiny-sdxl", [(32, 2, 2, None), (32, 3, 2, 16)]),
}
TINY_IMAGE_SIZE = 64


def _randomize(module: nn.Module, generator: torch.Generator, std: float) -> None:
    """Every parameter random (zero-initialised output convs included), so outputs and gradients are non-trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def open_clip_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of training.text_encoders.hf_to_open_clip (for writing files in the Hugging Face layout)."""
    layers = count_layers(state, "transformer.resblocks.{i}.ln_1.weight")
    out = {}
    for i in range(layers):
        for p in PARAMS:
            for key, part in zip(HF_FUSED_QKV[0], state[HF_FUSED_QKV[1].format(i=i, p=p)].chunk(3)):
                out[key.format(i=i, p=p)] = part.clone()
    for src, dst in HF_TO_OPEN_CLIP:
        for i in range(layers) if "{i}" in src else [0]:
            for p in PARAMS if "{p}" in src else [""]:
                out[src.format(i=i, p=p)] = state[dst.format(i=i, p=p)]
    return out


def tiny_sd_state(family: str = "SD1.x", seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A tiny checkpoint's tensors and metadata, keyed exactly as the family's released single files."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    gen = torch.Generator().manual_seed(seed)
    preset_name, text_shapes = TINY_FAMILIES[family]
    unet = UNetModel(preset(preset_name, family=family))
    _randomize(unet, gen, 0.05)
    vae = AutoencoderKL(TINY_VAE)
    _randomize(vae, gen, 0.05)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    for spec, (width, layers, heads, proj) in zip(TEXT_ENCODERS[family], text_shapes):
        encoder = FrozenTextEncoder(spec, width, layers, heads, 77, 49408, 4.0, proj)
        _randomize(encoder, gen, 0.05)
        tower = {k: v for k, v in encoder.tower.state_dict().items()}
        if spec.hf_layout:
            tower = open_clip_to_hf(tower)
            tower["embeddings.position_ids"] = torch.arange(77)[None]
        else:
            tower["logit_scale"] = torch.tensor(4.6052)
            if proj is None:  # SD2.x files carry the projection of the CLIP model though it is unused
                tower["text_projection"] = torch.randn(width, width, generator=gen) * 0.05
        state.update({spec.prefix + k: v for k, v in tower.items()})
    state["alphas_cumprod"] = torch.linspace(0.999, 0.01, 1000)  # LDM buffers the loader ignores
    extra = {"unet": unet.config.to_dict(), "text_heads": [s[2] for s in text_shapes], "image_size": TINY_IMAGE_SIZE}
    return {k: v.contiguous() for k, v in state.items()}, {"zeroconv_base": json.dumps(extra)}


def write_tiny_sd_checkpoint(path: str | Path, family: str = "SD1.x", seed: int = 0,
                             prediction_type: str = "epsilon") -> Path:
    """Write a tiny `.safetensors` base (and an LDM `.yaml` with parameterization "v" for v_prediction)."""
    path = Path(path)
    state, meta = tiny_sd_state(family, seed)
    atomic_save_safetensors(state, path, meta)
    if prediction_type == "v_prediction":
        path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    return path


# Colour names and RGB values of the Fill50K-style toy data (lllyasviel/ControlNet docs/train.md).
TOY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 210), "yellow": (235, 210, 40),
    "cyan": (40, 200, 210), "magenta": (200, 40, 190), "white": (245, 245, 245), "black": (15, 15, 15),
}


def write_tiny_fill50k(folder: str | Path, count: int = 16, size: int = 64, seed: int = 0) -> Path:
    """A Fill50K-layout folder (source/, target/, prompt.json JSON Lines): circle outlines -> filled discs."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(TOY_COLOURS)
    lines = []
    for i in range(count):
        inside, outside = rng.choice(len(names), size=2, replace=False)
        cx, cy = rng.integers(size // 4, 3 * size // 4, size=2)
        r = int(rng.integers(size // 8, size // 3))
        box = [int(cx) - r, int(cy) - r, int(cx) + r, int(cy) + r]
        source = Image.new("RGB", (size, size), "black")
        ImageDraw.Draw(source).ellipse(box, outline="white", width=1)
        target = Image.new("RGB", (size, size), TOY_COLOURS[names[outside]])
        ImageDraw.Draw(target).ellipse(box, fill=TOY_COLOURS[names[inside]])
        source.save(folder / "source" / f"{i}.png")
        target.save(folder / "target" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                 "prompt": f"{names[inside]} circle with {names[outside]} background"}))
    (folder / "prompt.json").write_text("\n".join(lines) + "\n")
    return folder
