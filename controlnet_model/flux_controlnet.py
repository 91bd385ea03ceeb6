"""Flux.1 ControlNets: XLabs and Mistoline (pixel hint) and InstantX / Shakker (VAE-latent hint, union modes).

A trainable copy of the first Flux blocks (Zhang et al. 2023, §3.2 carried to a DiT), the hint added to the image
tokens by a zero-initialised projection, and one zero-initialised Linear per block giving a token-space residual.
Layout and forward follow ComfyUI comfy/ldm/flux/controlnet.py (ControlNetFlux) and diffusers
models/controlnets/controlnet_flux.py; how the residuals reach the host's blocks is dit_control.py's table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .dit_blocks import JointBlock, MLPEmbedder, SingleBlock, image_ids, patchify, rope, time_embedding


class HintInput(str, Enum):
    """What the ControlNet reads as its condition."""

    PIXELS = "pixels"  # the control image in [0, 1], 8x the latent size (XLabs)
    PIXELS_MISTOLINE = "pixels_mistoline"  # same, through Mistoline's deeper condition encoder
    LATENT = "latent"  # the control image encoded by the base's VAE (InstantX / Shakker, SD3)


@dataclass(frozen=True)
class FluxControlNetConfig:
    """Shape of a Flux ControlNet, inferred from its tensors (dit_checkpoint.py)."""

    depth: int  # double-stream blocks copied from the base
    depth_single: int  # single-stream blocks copied from the base (0 for XLabs, Union-Pro 2.0)
    hidden_size: int = 3072
    num_heads: int = 24
    in_channels: int = 64  # patchified latent channels (16 x 2 x 2)
    context_dim: int = 4096  # T5 width
    vec_in_dim: int = 768  # CLIP pooled width
    guidance_embed: bool = False  # Flux dev: a distilled-guidance embedding
    axes_dim: tuple[int, ...] = (16, 56, 56)  # rotary dims per position axis (sum = head width)
    theta: int = 10000
    mlp_ratio: float = 4.0
    hint: HintInput = HintInput.LATENT
    hint_channels: int = 64  # patchified channels of the hint (16 x 4; 17 x 4 with an inpaint mask)
    num_union_modes: int = 0  # InstantX Union: a learned token per control mode
    family: str = "flux"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint", HintInput(self.hint))
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head width {self.hidden_size // self.num_heads}")

    @property
    def latent_hint(self) -> bool:
        return self.hint is HintInput.LATENT

    @property
    def inpaint(self) -> bool:
        """17 latent channels: the hint latent with the inpaint mask concatenated (ComfyUI concat_mask)."""
        return self.latent_hint and self.hint_channels == 17 * 4

    def replace(self, **changes) -> "FluxControlNetConfig":
        return dataclasses.replace(self, **changes)


def _conv_stack(widths: list[tuple[int, int, int, int]]) -> nn.Sequential:
    """Convs (in, out, kernel, stride) with a SiLU between each: the hint encoders at even Sequential indices."""
    layers: list[nn.Module] = []
    for i, (cin, cout, k, s) in enumerate(widths):
        if i:
            layers.append(nn.SiLU())
        layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=k // 2))
    return nn.Sequential(*layers)


# (in, out, kernel, stride) of the pixel encoders: 3 stride-2 convs take the image to the latent size, 16 channels.
XLABS_ENCODER = [(3, 16, 3, 1), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1),
                 (16, 16, 3, 2), (16, 16, 3, 1)]
MISTOLINE_ENCODER = [(3, 16, 3, 1), (16, 16, 1, 1), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2),
                     (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 1, 1), (16, 16, 3, 1)]


class MistolineEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _conv_stack(MISTOLINE_ENCODER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class LinearSiLU(nn.Module):
    """Mistoline's output layer: Linear then SiLU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.linear(x))


@dataclass(frozen=True)
class DiTBlockOutputs:
    """One residual per ControlNet block, in token space (B, image tokens, hidden): main (double / joint) and single."""

    main: tuple[torch.Tensor, ...]
    single: tuple[torch.Tensor, ...] = ()


class FluxControlNet(nn.Module):
    """Flux ControlNet (XLabs, Mistoline, InstantX / Shakker; ComfyUI comfy/ldm/flux/controlnet.py)."""

    def __init__(self, config: FluxControlNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_dim, dim)
        self.double_blocks = nn.ModuleList(JointBlock(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(dim, cfg.num_heads, cfg.mlp_ratio)
                                           for _ in range(cfg.depth_single))
        out = (lambda: LinearSiLU(dim)) if cfg.hint is HintInput.PIXELS_MISTOLINE else (lambda: nn.Linear(dim, dim))
        self.controlnet_blocks = nn.ModuleList(out() for _ in range(cfg.depth))
        self.controlnet_single_blocks = nn.ModuleList(out() for _ in range(cfg.depth_single))
        self.controlnet_mode_embedder = nn.Embedding(cfg.num_union_modes, dim) if cfg.num_union_modes else None
        self.pos_embed_input = nn.Linear(cfg.hint_channels, dim)
        if cfg.hint is HintInput.PIXELS:
            self.input_hint_block = _conv_stack(XLABS_ENCODER)
        elif cfg.hint is HintInput.PIXELS_MISTOLINE:
            self.input_cond_block = MistolineEncoder()

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def hint_tokens(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) hint -> (B, L, hint_channels): pixels through the encoder, latents as they are, patchified."""
        if self.config.hint is HintInput.PIXELS:
            hint = self.input_hint_block(hint * 2.0 - 1.0)
        elif self.config.hint is HintInput.PIXELS_MISTOLINE:
            hint = self.input_cond_block(hint * 2.0 - 1.0)
        return patchify(hint)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                mode: int | None = None) -> DiTBlockOutputs:
        """Residuals of every block for noisy latents x (B, 16, h, w) at sigma `timesteps` (B,).

        hint: pixels (B, 3, 8h, 8w) in [0, 1] (XLabs, Mistoline), or the base VAE's latent of the control image,
        scaled as the base's latents are (B, 16 or 17, h, w); context (B, T, 4096); y (B, 768) pooled CLIP;
        guidance (B,) for Flux dev; mode: the union mode index (None: no mode token, as ComfyUI's "auto").
        """
        cfg, dtype = self.config, self.dtype
        b, _, h, w = x.shape
        img = self.img_in(patchify(x.to(dtype))) + self.pos_embed_input(self.hint_tokens(hint.to(dtype)))
        vec = time_embedding(self.time_in, timesteps, dtype, factor=1000.0)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux ControlNet was made for Flux dev and needs the guidance value "
                                 "(FluxGuidance); give guidance=")
            vec = vec + time_embedding(self.guidance_in, guidance, dtype, factor=1000.0)
        y = torch.zeros(b, cfg.vec_in_dim, device=x.device, dtype=dtype) if y is None else y[:, :cfg.vec_in_dim]
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(context.to(dtype))
        if self.controlnet_mode_embedder is not None and mode is not None:
            token = self.controlnet_mode_embedder(torch.tensor([mode], device=x.device))  # prepended text token
            txt = torch.cat([token[None].expand(b, -1, -1).to(dtype), txt], dim=1)
        ids = torch.cat([torch.zeros(b, txt.shape[1], 3, device=x.device),
                         image_ids(b, (h + 1) // 2, (w + 1) // 2, x.device)], dim=1)
        pe = rope(ids, cfg.axes_dim, cfg.theta)
        main = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, vec, pe)
            main.append(out(img))
        single = []
        joined = torch.cat([txt, img], dim=1)
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks):
            joined = block(joined, vec, pe)
            single.append(out(joined[:, txt.shape[1]:]))
        return DiTBlockOutputs(tuple(main), tuple(single))
