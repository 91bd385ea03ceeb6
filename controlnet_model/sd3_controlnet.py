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
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .dit_blocks import (ImageBlock, JointBlock, MLPEmbedder, PatchEmbed, crop_positions, pad_to_patches,
                         sincos_positions, time_embedding)
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


# How the control image (B, 3, H, W) in [0, 1] is prepared before the VAE, by the file's control_type
# (ComfyUI comfy/controlnet.py load_controlnet_sd35).
SD35_CONTROL_TYPES: dict[int, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    -1: ("unknown", lambda a: a),
    0: ("blur", lambda a: a),
    1: ("canny", lambda a: a * 255 * 0.5 + 0.5),
    2: ("depth", lambda a: 1.0 - a),
}


class SD35ControlNet(nn.Module):
    """Stability's SD3.5 ControlNet: image-only blocks on the host's patch embedding (ComfyUI dit_embedder.py).

    The host's `x_embedder` (8B variant: also its `y_embedder`) is not part of this network: `borrow_from_host`
    takes those weights before the first step, as ComfyUI's ControlNetSD35.pre_run copies them.
    """

    def __init__(self, config: SD3ControlNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.host: dict[str, torch.Tensor] = {}  # borrowed host weights (not parameters, not saved)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(dim if cfg.double_y_emb else cfg.pooled_dim, dim)
        self.blocks = nn.ModuleList(ImageBlock(dim, cfg.num_heads, qk_norm=cfg.qk_norm) for _ in range(cfg.num_blocks))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cfg.num_blocks))
        self.pos_embed_input = PatchEmbed(cfg.hint_channels, dim, cfg.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_in.in_layer.weight.dtype

    def host_keys(self) -> list[str]:
        """The host weights this ControlNet borrows, by their ComfyUI MMDiT names."""
        keys = ["x_embedder.proj.weight", "x_embedder.proj.bias"]
        if self.config.double_y_emb:
            keys += [f"y_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
        return keys

    def borrow_from_host(self, host: Mapping[str, torch.Tensor]) -> None:
        """Take the host's patch embedding (and 8B pooled embedder) from its diffusion-model state dict."""
        missing = [k for k in self.host_keys() if k not in host]
        if missing:
            raise KeyError(f"the SD3.5 ControlNet borrows the base model's patch embedding, but the weights given "
                           f"lack {missing}; give the SD3.5 model's diffusion-model state dict")
        width = host["x_embedder.proj.weight"].shape[0]
        if width != self.config.hidden_size:
            raise ValueError(f"the base model is {width} wide but this SD3.5 ControlNet is {self.config.hidden_size} "
                             "wide: it was made for another SD3.5 size (Large: 2432)")
        self.host = {k: host[k].detach() for k in self.host_keys()}

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, **_: object) -> DiTBlockOutputs:
        """Residuals per block for latents x (B, 16, h, w) at `timesteps` (B,) in 0..1000; hint: the VAE latent of
        the prepared control image (SD35_CONTROL_TYPES), SD3-scaled; y (B, 2048) pooled text. No text stream."""
        if not self.host:
            raise ValueError("this SD3.5 ControlNet uses the base model's patch embedding: call "
                             "borrow_from_host(base_state_dict) before the first step")
        if y is None:
            raise ValueError("the SD3.5 ControlNet needs the pooled text vector y (B, 2048)")
        cfg, dtype = self.config, self.dtype
        host = {k: v.to(device=x.device, dtype=dtype) for k, v in self.host.items()}
        p = cfg.patch_size
        img = F.conv2d(pad_to_patches(x.to(dtype), p), host["x_embedder.proj.weight"], host["x_embedder.proj.bias"], stride=p)
        img = img.flatten(2).transpose(1, 2)
        if not cfg.double_y_emb:
            img = img + sincos_positions(cfg.hidden_size, (x.shape[-2] + 1) // p, (x.shape[-1] + 1) // p).to(img)
        pooled = y.to(dtype)
        if cfg.double_y_emb:
            pooled = F.linear(F.silu(F.linear(pooled, host["y_embedder.mlp.0.weight"], host["y_embedder.mlp.0.bias"])),
                              host["y_embedder.mlp.2.weight"], host["y_embedder.mlp.2.bias"])
        vec = time_embedding(self.time_in, timesteps, dtype) + self.vector_in(pooled)
        img = img + self.pos_embed_input(hint.to(dtype))
        main = []
        for block, out in zip(self.blocks, self.controlnet_blocks):
            h = block(img, vec)
            if not cfg.double_y_emb:  # the 8B variant feeds every block the same tokens (dit_embedder.py)
                img = h
            main.append(out(h))
        return DiTBlockOutputs(tuple(main))
