"""The Stable Diffusion VAE (KL-f8 AutoencoderKL) in the LDM layout, so `first_stage_model.*` loads by prefix strip
(Rombach et al. 2022; module names of ldm/modules/diffusionmodules/model.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..controlnet_model.blocks import Upsample  # LDM's, the U-Net's too: nearest 2x, then a 3x3 conv `conv`


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # per-level multipliers; len - 1 downsamplings (8x for 4 levels)
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder: one more)
    z_channels: int = 4  # latent channels
    embed_dim: int = 4  # channels after quant_conv (equal to z_channels in SD)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as LDM


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            cout = cfg.ch * mult
            stage.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks))
            stage.attn = nn.ModuleList()
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(cout)
            self.down.append(stage)
            cin = cout
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        stages = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            cout = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1))
            stage.attn = nn.ModuleList()
            if level != 0:
                stage.upsample = Upsample(cout)
            stages.insert(0, stage)
            cin = cout
        self.up = nn.ModuleList(stages)  # up[i] is level i; run from the deepest level
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: encode to posterior moments (mean, logvar), decode latents to pixels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2 * embed_dim, H/8, W/8): mean and log-variance, unscaled."""
        return self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> (B, 3, H, W), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))


# Attention projections are 1x1 convs in LDM files and Linear weights in some converted files.
ATTN_CONV_SUFFIXES = (".attn_1.q.weight", ".attn_1.k.weight", ".attn_1.v.weight", ".attn_1.proj_out.weight")


def vae_config_from_state(state: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Architecture from the `encoder.*`/`decoder.*` key names and shapes (prefix already stripped)."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in state:
        levels += 1
    res = 0
    while f"encoder.down.0.block.{res}.conv1.weight" in state:
        res += 1
    if levels == 0 or res == 0:
        raise KeyError("the VAE weights lack encoder.down.0.block.0.conv1.weight; is this an SD (KL-f8) checkpoint?")
    mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=res, z_channels=state["decoder.conv_in.weight"].shape[1],
                     embed_dim=state["post_quant_conv.weight"].shape[1])


def fix_attention_shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear-shaped (C, C) attention weights to the 1x1-conv shape (C, C, 1, 1)."""
    return {k: (v[:, :, None, None] if k.endswith(ATTN_CONV_SUFFIXES) and v.ndim == 2 else v) for k, v in state.items()}
