"""SD3 / SD3.5 ControlNets: diffusers-trained MMDiT ControlNets (InstantX SD3) and Stability's SD3.5 ones.

SD3 (diffusers models/controlnets/controlnet_sd3.py; ComfyUI comfy/cldm/mmdit.py): N joint blocks copied from the
base, the VAE latent of the control image added to the image tokens by a patch embedding, one zero Linear per
block. SD3.5 (ComfyUI comfy/cldm/dit_embedder.py): image-only blocks, and the image patch embedding is the
host's own (`x_embedder`), which the caller hands in; the file carries a scalar `control_type` (0 blur, 1 canny,
2 depth) that decides how the control image is prepared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .dit_blocks import ImageBlock, JointBlock, MLPEmbedder, PatchEmbed, crop_positions, time_embedding
from .flux_controlnet import DiTBlockOutputs


@dataclass(frozen=True)
class SD3ControlNetConfig:
    """Shape of an SD3 ControlNet, inferred from its tensors (dit_checkpoint.py)."""

    num_blocks: int  # joint (SD3) or image-only (SD3.5) blocks in the ControlNet
    hidden_size: int = 1536  # 64 x depth of the base (SD3 medium 24 -> 1536, SD3.5 large 38 -> 2432)
    num_heads: int = 24
    in_channels: int = 16  # latent channels
    patch_size: int = 2
    hint_channels: int = 16  # latent channels of the hint (17: inpaint, with the mask)
    context_dim: int = 4096  # joint attention width (T5 / CLIP concatenation); 0 for SD3.5 (no text stream)
    pooled_dim: int = 2048  # CLIP-L + CLIP-G pooled
    pos_embed_max_size: int = 0  # side of the stored position table (0: SD3.5, positions from the host)
    qk_norm: bool = False  # per-head RMSNorm of q and k (SD3.5)
    image_only: bool = False  # SD3.5 Stability: ImageBlocks, host patch embedding, no text stream
    double_y_emb: bool = False  # SD3.5 8B: two pooled embedders
    control_type: int = -1  # SD3.5 Stability: 0 blur, 1 canny, 2 depth (-1: not stored)
    family: str = "sd3"

    @property
    def depth(self) -> int:
        """Depth of the base model this ControlNet steers: hidden = 64 x depth (ComfyUI model_detection)."""
        return self.hidden_size // 64

    @property
    def latent_hint(self) -> bool:
        return True

    @property
    def inpaint(self) -> bool:
        return self.hint_channels == 17

    def replace(self, **changes) -> "SD3ControlNetConfig":
        return dataclasses.replace(self, **changes)


class SD3ControlNet(nn.Module):
    """MMDiT ControlNet (SD3 diffusers format; ComfyUI comfy/cldm/mmdit.py ControlNet)."""

    def __init__(self, config: SD3ControlNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_max_size ** 2, dim), requires_grad=False)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, dim)
        self.txt_in = nn.Linear(cfg.context_dim, dim)
        self.double_blocks = nn.ModuleList(JointBlock(dim, cfg.num_heads, qk_norm=cfg.qk_norm)
                                           for _ in range(cfg.num_blocks))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cfg.num_blocks))
        self.pos_embed_input = PatchEmbed(cfg.hint_channels, dim, cfg.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_in.in_layer.weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, **_: object) -> DiTBlockOutputs:
        """Residuals per joint block for latents x (B, 16, h, w) at `timesteps` (B,) in 0..1000 (sigma x 1000).

        hint: the base VAE's latent of the control image (B, 16 or 17, h, w), scaled without the shift
        (ComfyUI sets shift_factor 0 for these files); context (B, T, 4096). The pooled vector is zeroed as
        ComfyUI does for this format, so `y` is not used.
        """
        cfg, dtype = self.config, self.dtype
        b, _, h, w = x.shape
        p = cfg.patch_size
        img = self.img_in(x.to(dtype)) + crop_positions(self.pos_embed, (h + 1) // p, (w + 1) // p).to(dtype)
        img = img + self.pos_embed_input(hint.to(dtype))
        vec = time_embedding(self.time_in, timesteps, dtype)
        vec = vec + self.vector_in(torch.zeros(b, cfg.pooled_dim, device=x.device, dtype=dtype))
        txt = self.txt_in(context.to(dtype))
        main = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, vec, None)
            main.append(out(img))
        return DiTBlockOutputs(tuple(main))
