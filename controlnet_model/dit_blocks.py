"""Transformer pieces shared by the Flux and SD3 ControlNets, written once (host-independent, torch only).

Names follow the Black Forest Labs Flux layout that ComfyUI's comfy/ldm/flux/layers.py also uses (`img_mod.lin`,
`img_attn.qkv`, `img_attn.norm.query_norm.scale`, `linear1`, ...), so XLabs files load by name; the diffusers
layouts (diffusers transformer_flux.py, transformer_sd3.py) are renamed and fused by the key tables in keymaps.py.
A Flux double-stream block and an SD3 (MMDiT) joint block are the same module: two streams with their own
weights, adaLN-Zero modulation (Peebles & Xie 2023, §3.2) and one attention over the joined tokens; Flux adds
rotary positions and QK RMSNorm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import timestep_embedding


# ---- positions and attention -----------------------------------------------------------------------------
def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotary embedding of (B, L, n_axes) positions as 2x2 rotations: (B, 1, L, head_dim/2, 2, 2) (Su et al. 2021)."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angle = ids[..., axis].double()[..., None] * omega  # (B, L, dim/2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        parts.append(torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)))
    return torch.cat(parts, dim=-3).float()[:, None]


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the head dimension of (B, H, L, D) by pe."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))  # (B, H, L, D/2, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, L, D) heads, rotary positions first; returns (B, L, H*D)."""
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (Zhang & Sennrich 2019), eps 1e-6 as in Flux and SD3.5."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class SelfAttention(nn.Module):
    """Fused q/k/v projection, optional per-head QK norm, output projection (the Flux / MMDiT attention)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def heads_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, C) -> q, k, v as (B, H, L, D), QK-normed."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        if self.norm is not None:
            q, k = self.norm.query_norm(q), self.norm.key_norm(k)
        return q, k, v


class Modulation(nn.Module):
    """adaLN-Zero: shift, scale, gate (x `sets`) from the conditioning vector (Peebles & Xie 2023, §3.2)."""

    def __init__(self, dim: int, sets: int) -> None:
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.lin(F.silu(vec))[:, None].chunk(3 * self.sets, dim=-1))


def mlp(dim: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, int(dim * ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(dim * ratio), dim))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def stream_pre(mod: Modulation, attn: SelfAttention, x: torch.Tensor, vec: torch.Tensor):
    """One stream before the joint attention: its modulation and its q, k, v."""
    m = mod(vec)
    return m, attn.heads_of(_modulate(x, m[0], m[1]))


def stream_post(attn: SelfAttention, mlp_: nn.Module, x: torch.Tensor, out: torch.Tensor, m: list[torch.Tensor]):
    """One stream after the joint attention: gated attention output, then the gated MLP."""
    x = x + m[2] * attn.proj(out)
    return x + m[5] * mlp_(_modulate(x, m[3], m[4]))


class JointBlock(nn.Module):
    """Flux double-stream block = MMDiT joint block: text and image streams attend together, text first."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(dim, 2), Modulation(dim, 2)
        self.img_attn, self.txt_attn = SelfAttention(dim, heads, qk_norm), SelfAttention(dim, heads, qk_norm)
        self.img_mlp, self.txt_mlp = mlp(dim, mlp_ratio), mlp(dim, mlp_ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor | None):
        img_m, (iq, ik, iv) = stream_pre(self.img_mod, self.img_attn, img, vec)
        txt_m, (tq, tk, tv) = stream_pre(self.txt_mod, self.txt_attn, txt, vec)
        out = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        n = txt.shape[1]
        return (stream_post(self.img_attn, self.img_mlp, img, out[:, n:], img_m),
                stream_post(self.txt_attn, self.txt_mlp, txt, out[:, :n], txt_m))


class ImageBlock(nn.Module):
    """An image-only DiT block with adaLN-Zero (the SD3.5 ControlNet's; ComfyUI mmdit.py DismantledBlock)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.mod, self.attn, self.mlp = Modulation(dim, 2), SelfAttention(dim, heads, qk_norm), mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        m, (q, k, v) = stream_pre(self.mod, self.attn, x, vec)
        return stream_post(self.attn, self.mlp, x, attention(q, k, v), m)


class SingleBlock(nn.Module):
    """Flux single-stream block: attention and MLP in parallel from one fused projection (Dehghani et al. 2023)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads, self.dim, self.hidden = heads, dim, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.hidden)
        self.linear2 = nn.Linear(dim + self.hidden, dim)
        self.norm = QKNorm(dim // heads)
        self.modulation = Modulation(dim, 1)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, hidden = self.linear1(_modulate(x, shift, scale)).split([3 * self.dim, self.hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat([out, F.gelu(hidden, approximate="tanh")], dim=-1))


# ---- embedders -------------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    """Linear - SiLU - Linear (Flux time_in / vector_in / guidance_in; SD3 t_embedder / y_embedder)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def time_embedding(embedder: MLPEmbedder, t: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> torch.Tensor:
    """256-wide sinusoidal embedding of t * factor through the embedder (Flux passes sigma with factor 1000)."""
    return embedder(timestep_embedding(t.float() * factor, 256).to(dtype))


def pad_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Circular padding to whole p x p patches at the bottom / right (ComfyUI common_dit pad_to_patch_size)."""
    pad_h, pad_w = (-x.shape[-2]) % patch, (-x.shape[-1]) % patch
    return F.pad(x, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x


def patchify(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), padded to whole patches."""
    x = pad_to_patches(x, patch)
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def image_ids(batch: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, h*w, 3) Flux position ids: (0, row, column) per token."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


class PatchEmbed(nn.Module):
    """p x p patches to tokens by a strided conv (SD3 x_embedder / pos_embed_input; diffusers embeddings.py)."""

    def __init__(self, in_channels: int, dim: int, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pad_to_patches(x, self.patch)).flatten(2).transpose(1, 2)


def crop_positions(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The centre h x w of a square (1, M*M, C) position table (SD3 cropped_pos_embed): (1, h*w, C)."""
    side = math.isqrt(table.shape[1])
    if h > side or w > side:
        raise ValueError(f"the latent is {h}x{w} patches but this SD3 ControlNet's positions cover {side}x{side}; "
                         "use a smaller image")
    top, left = (side - h) // 2, (side - w) // 2
    return table.reshape(1, side, side, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)


def sincos_positions(dim: int, h: int, w: int, center: float = 7.5, magnitude: float = 7.5) -> torch.Tensor:
    """2-D sin-cos positions on an h x w grid spanning center +- magnitude along the shorter side: (1, h*w, dim)
    (ComfyUI mmdit.py get_2d_sincos_pos_embed_torch, the SD3.5 ControlNet's positions)."""
    small = min(h, w)
    span_h, span_w = h / small * magnitude, w / small * magnitude
    gh, gw = torch.meshgrid(torch.linspace(center - span_h, center + span_h, h),
                            torch.linspace(center - span_w, center + span_w, w), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4.0))

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(gw), axis(gh)], dim=1)[None]
