"""Builders of the LDM U-Net's parts, shared by the locked U-Net (unet.py) and its trainable copy (network.py)."""
from __future__ import annotations

from torch import nn

from .blocks import (Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, Upsample)
from .config import ControlNetConfig


def build_time_embed(cfg: ControlNetConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.model_channels, cfg.time_embed_dim), nn.SiLU(),
                         nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))


def build_label_emb(cfg: ControlNetConfig) -> nn.Sequential | None:
    """SDXL's ADM embedding of the pooled text + size/crop vector (`label_emb.0.0`, `label_emb.0.2`)."""
    if cfg.adm_in_channels is None:
        return None
    return nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, cfg.time_embed_dim), nn.SiLU(),
                                       nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)))


def _attention(cfg: ControlNetConfig, channels: int, depth: int | None) -> list[nn.Module]:
    if depth is None:
        return []
    heads, dim_head = cfg.heads_for(channels)
    return [SpatialTransformer(channels, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)]


def build_input_blocks(cfg: ControlNetConfig) -> nn.ModuleList:
    """conv_in, then per level: ResBlock (+attention) x num_res_blocks, then a Downsample between levels."""
    blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))]
    ch = cfg.model_channels
    for level, (width, depth) in enumerate(zip(cfg.channel_widths, cfg.transformer_depth)):
        for _ in range(cfg.num_res_blocks):
            blocks.append(TimestepEmbedSequential(ResBlock(ch, cfg.time_embed_dim, width), *_attention(cfg, width, depth)))
            ch = width
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
    return nn.ModuleList(blocks)


def build_middle_block(cfg: ControlNetConfig) -> TimestepEmbedSequential:
    ch = cfg.channel_widths[-1]
    return TimestepEmbedSequential(ResBlock(ch, cfg.time_embed_dim),
                                   *_attention(cfg, ch, cfg.transformer_depth_middle),
                                   ResBlock(ch, cfg.time_embed_dim))


def build_output_blocks(cfg: ControlNetConfig) -> nn.ModuleList:
    """Decoder: per level (deepest first) num_res_blocks + 1 ResBlocks on [h, skip], Upsample between levels."""
    skips = [c for c, _ in cfg.skip_layout()]
    blocks = []
    ch = cfg.channel_widths[-1]
    for level in reversed(range(len(cfg.channel_mult))):
        width, depth = cfg.channel_widths[level], cfg.transformer_depth[level]
        for i in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [ResBlock(ch + skips.pop(), cfg.time_embed_dim, width)]
            ch = width
            layers += _attention(cfg, width, depth)
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepEmbedSequential(*layers))
    return nn.ModuleList(blocks)
