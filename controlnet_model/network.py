"""The ControlNet: condition encoder, trainable copy of the U-Net encoder, zero convolutions (Zhang et al. 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import TimestepEmbedSequential, timestep_embedding, zero_module
from .config import FAMILY_BY_CONTEXT_DIM, ControlNetConfig, describe
from .layout import build_input_blocks, build_label_emb, build_middle_block, build_time_embed


@dataclass(frozen=True)
class ControlNetOutput:
    """Residuals for the U-Net: one per skip connection (input-block order) and one for the middle block."""

    down: tuple[torch.Tensor, ...]  # each (B, C_i, h_i, w_i)
    mid: torch.Tensor  # (B, C_mid, h_mid, w_mid)

    @property
    def all(self) -> tuple[torch.Tensor, ...]:
        """Every residual, skips first and the middle last (index N is the middle)."""
        return (*self.down, self.mid)

    def map(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> "ControlNetOutput":
        """A new output with fn(index, tensor) applied to each residual (index N is the middle)."""
        mapped = [fn(i, r) for i, r in enumerate(self.all)]
        return ControlNetOutput(tuple(mapped[:-1]), mapped[-1])

    def __add__(self, other: "ControlNetOutput") -> "ControlNetOutput":
        """Composition of several ControlNets is the sum of their residuals (paper §3, Fig. 7)."""
        if len(self.down) != len(other.down):
            raise ValueError(f"cannot add ControlNet outputs with {len(self.down)} and {len(other.down)} skip residuals")
        return ControlNetOutput(tuple(a + b for a, b in zip(self.down, other.down)), self.mid + other.mid)


def build_hint_block(cfg: ControlNetConfig) -> TimestepEmbedSequential:
    """Condition encoder: 8 3x3 convs with SiLU, three stride-2, the last zero (cldm.py `input_hint_block`)."""
    c0, c1, c2, c3 = cfg.hint_block_channels
    plan = [(cfg.hint_channels, c0, 1), (c0, c0, 1), (c0, c1, 2), (c1, c1, 1), (c1, c2, 2), (c2, c2, 1), (c2, c3, 2)]
    layers: list[nn.Module] = []
    for cin, cout, stride in plan:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(zero_module(nn.Conv2d(c3, cfg.model_channels, 3, padding=1)))
    return TimestepEmbedSequential(*layers)


def zero_conv(channels: int) -> TimestepEmbedSequential:
    """1x1 conv with weight and bias zero (Zhang et al. 2023, §3.1)."""
    return TimestepEmbedSequential(zero_module(nn.Conv2d(channels, channels, 1)))


class ControlNet(nn.Module):
    """Trainable copy of the encoder and middle block, joined to the locked U-Net by zero convolutions."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.time_embed = build_time_embed(cfg)
        label_emb = build_label_emb(cfg)
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_hint_block = build_hint_block(cfg)
        self.input_blocks = build_input_blocks(cfg)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c, _ in cfg.skip_layout())
        self.middle_block = build_middle_block(cfg)
        self.middle_block_out = zero_conv(cfg.channel_widths[-1])

    def embed_time(self, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError(f"this {self.config.family} ControlNet needs the ADM vector y "
                                 f"(B, {self.config.adm_in_channels}); pass the same y the U-Net gets")
            emb = emb + self.label_emb(y.to(dtype))
        return emb

    @property
    def dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, hint_channels, 8h, 8w) in [0, 1] -> (B, model_channels, h, w); independent of t, so cacheable."""
        if hint.ndim != 4 or hint.shape[1] != self.config.hint_channels:
            raise ValueError(f"hint must be (B, {self.config.hint_channels}, H, W), got {tuple(hint.shape)}")
        # NCHW whatever the caller's layout (a host IMAGE moved to channels-first is a channels-last view)
        return self.input_hint_block(hint.to(dtype=self.dtype, memory_format=torch.contiguous_format), None, None)

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, guided_hint: torch.Tensor | None = None) -> ControlNetOutput:
        """x (B, C, h, w) noisy latent; hint (B, 3, 8h, 8w) in [0, 1] or its cached encode_hint(); timesteps (B,)
        0..999; context (B, T, D); y (B, adm) for SDXL-shaped models."""
        self.check_context(context)
        if guided_hint is None:
            if hint is None:
                raise ValueError("give the hint image or its encode_hint()")
            if hint.shape[-2:] != (x.shape[-2] * 8, x.shape[-1] * 8):
                raise ValueError(f"hint is {tuple(hint.shape[-2:])} but must be 8x the latent {tuple(x.shape[-2:])}; "
                                 "resize the control image to the generation size")
            guided_hint = self.encode_hint(hint)  # (B, model_channels, h, w)
        elif guided_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"encoded hint is {tuple(guided_hint.shape[-2:])}, latent is {tuple(x.shape[-2:])}")
        emb = self.embed_time(timesteps, y, self.dtype)
        return self.run_copy(x, guided_hint, emb, context)

    def check_context(self, context: torch.Tensor) -> None:
        cfg = self.config
        if context.shape[-1] != cfg.context_dim:
            other = FAMILY_BY_CONTEXT_DIM.get(context.shape[-1], f"a model with context width {context.shape[-1]}")
            raise ValueError(f"this ControlNet is {describe(cfg)} but the text context comes from {other}; "
                             f"use a ControlNet made for that model")

    def run_copy(self, x: torch.Tensor, guided_hint: torch.Tensor, emb: torch.Tensor,
                 context: torch.Tensor) -> ControlNetOutput:
        """The trainable copy and its zero convs, with `guided_hint` added after conv_in."""
        h = x.to(self.dtype)
        context = context.to(self.dtype)
        outs = []
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if i == 0:  # the condition enters after conv_in (cldm.py)
                h = h + guided_hint
            outs.append(zc(h, emb, context))
        h = self._run(self.middle_block, h, emb, context)
        return ControlNetOutput(tuple(outs), self.middle_block_out(h, emb, context))

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)
