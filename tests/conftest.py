"""Shared fixtures: tiny, seeded LDM-layout U-Nets and ControlNets on CPU (milliseconds per forward)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zeroconv.controlnet_model import ControlNet, ControlNetConfig, UNetModel, init_from_unet, preset

TINY_PRESETS = ("tiny", "tiny-sd2", "tiny-sdxl")


def randomize(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Re-initialise every parameter (zero-initialised layers included) so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def make_unet(name: str = "tiny", seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return randomize(UNetModel(preset(name)), seed).eval()


def make_inputs(cfg: ControlNetConfig, batch: int = 2, size: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Latent, timesteps, context, ADM vector and hint for a config, seeded."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, cfg.in_channels, size, size, generator=gen),
        "timesteps": torch.randint(0, 1000, (batch,), generator=gen),
        "context": torch.randn(batch, 7, cfg.context_dim, generator=gen),
        "y": torch.randn(batch, cfg.adm_in_channels, generator=gen) if cfg.adm_in_channels else None,
        "hint": torch.rand(batch, cfg.hint_channels, size * 8, size * 8, generator=gen),
    }
    return inputs


@pytest.fixture
def tiny_unet() -> UNetModel:
    return make_unet("tiny")


@pytest.fixture
def tiny_controlnet(tiny_unet: UNetModel) -> ControlNet:
    """A ControlNet copied from the tiny U-Net with its zero convs made non-zero, so residuals are non-trivial."""
    controlnet, _ = init_from_unet(tiny_unet)
    for module in (*controlnet.zero_convs, controlnet.middle_block_out, controlnet.input_hint_block[-1]):
        randomize(module, seed=7, std=0.1)
    return controlnet.eval()


@pytest.fixture
def tiny_inputs(tiny_unet: UNetModel) -> dict[str, torch.Tensor]:
    return make_inputs(tiny_unet.config)


@pytest.fixture
def one_torch_thread():
    """Tiny ops on one torch thread (thread hand-off costs more than it gains on a busy CPU); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_training_files(root, seed: int = 0, count: int = 6, size: int = 32) -> dict:
    """A tiny random SD1.x-layout base file and toy Fill50K data under `root` (training tests)."""
    from .tiny_base import write_tiny_fill50k, write_tiny_sd_checkpoint

    return {"base": write_tiny_sd_checkpoint(root / "base.safetensors", "SD1.x", seed=seed),
            "data": write_tiny_fill50k(root / "fill", count=count, size=size, seed=seed)}


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory) -> None:
    """Loads remember checked files under $ZEROCONV_CACHE_DIR: the tests' own, not the user's ~/.cache."""
    import os

    os.environ["ZEROCONV_CACHE_DIR"] = str(tmp_path_factory.mktemp("zeroconv-cache"))
