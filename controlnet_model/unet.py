"""The LDM-layout U-Net: the locked base that ControlNets steer, built from a ControlNetConfig.

How its forward pass walks the blocks, and where residuals enter, lives in residuals.py: the one place
that knows it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import normalization, zero_module
from .config import ControlNetConfig
from .layout import build_input_blocks, build_label_emb, build_middle_block, build_output_blocks, build_time_embed
from .residuals import from_host_dict, ldm_unet_forward


class UNetModel(nn.Module):
    """LDM U-Net (openaimodel.UNetModel names and forward signature), used as the locked base."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        self.model_channels = cfg.model_channels
        self.time_embed = build_time_embed(cfg)
        label_emb = build_label_emb(cfg)
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_blocks = build_input_blocks(cfg)
        self.middle_block = build_middle_block(cfg)
        self.output_blocks = build_output_blocks(cfg)
        self.out = nn.Sequential(normalization(cfg.model_channels), nn.SiLU(),
                                 zero_module(nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1)))

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (hosts such as ComfyUI's BaseModel read it to cast inputs)."""
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Any = None, transformer_options: dict | None = None,
                **kwargs: Any) -> torch.Tensor:
        """x (B, C, h, w), timesteps (B,) in 0..999, context (B, T, D), y (B, adm); control: residuals (ours, or a
        host dict with 'output' / 'middle' / 'input' lists)."""
        residuals = control if control is None or not isinstance(control, dict) else from_host_dict(control)
        return ldm_unet_forward(self, x, timesteps, context, y, residuals)
