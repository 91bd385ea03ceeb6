"""Union ControlNet (xinsir's ControlNet++ for SDXL): one ControlNet for several control types.

Beside the plain ControlNet (network.py, whose trainable copy, zero convs and hint encoder it reuses) it has:
  * a control type encoder: the multi-hot type vector, each entry embedded sinusoidally, an MLP, added to the
    time embedding (`control_add_embedding`);
  * per-condition tokens: the mean over H, W of the encoded hint plus the type's `task_embedding` row;
  * a small pre-LN transformer over the tokens (`transformer_layes`) and a projection (`spatial_ch_projs`)
    whose output is a per-channel bias for that condition's features;
  * the sum of the condition features, added after conv_in like a plain ControlNet's hint.
Reference: diffusers `models/controlnets/controlnet_union.py` (ControlNetUnionModel.forward) and ComfyUI
`comfy/cldm/cldm.py` (`union_controlnet_merge`, `ControlNet.forward`).

Attention quirk, reproduced as the reference computes it: the reference runs `nn.MultiheadAttention` (default
`batch_first=False`) on a (batch, tokens, channels) tensor, so attention runs across the BATCH axis, separately
for each token position; tokens never see each other. The reference's extra last token (the mean of conv_in(x))
therefore changes no output that is used and is left out here. When every batch row has the same hint (one
control image, cond and uncond rows) each token's attention is exactly out_proj(V(LN(token))), which is what
ComfyUI core computes over its single token, so the single-type path equals core's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .blocks import timestep_embedding, zero_module
from .config import ControlNetConfig
from .network import ControlNet, ControlNetOutput

# Control types of the released files, by ComfyUI's names and indices (comfy/cldm/control_types.py; xinsir's
# README "Control Mode"). The 6-type v1.0 file has 0-5; ProMax adds tile and repaint.
UNION_TYPES: tuple[tuple[str, int], ...] = (
    ("openpose", 0),
    ("depth", 1),
    ("hed/pidi/scribble/ted", 2),
    ("canny/lineart/anime_lineart/mlsd", 3),
    ("normal", 4),
    ("segment", 5),
    ("tile", 6),
    ("repaint", 7),
)
AUTO = "auto"  # no type: ComfyUI core's plain hint path with the zero type vector embedded
# Each sub-name of a combined entry ("canny", "mlsd", ...) names the same index.
_INDEX_BY_NAME: dict[str, int] = {
    **{name: index for name, index in UNION_TYPES},
    **{part: index for name, index in UNION_TYPES for part in name.split("/")},
}
UNION_CONFIG_KEY = "union"  # ControlNetConfig.extra[UNION_CONFIG_KEY] holds the UnionConfig fields


def type_name(index: int) -> str:
    return next((name for name, i in UNION_TYPES if i == index), f"type {index}")


@dataclass(frozen=True)
class UnionConfig:
    """What a Union file adds to a ControlNet config; every field but `heads` is read from the tensors."""

    num_control_types: int = 6  # rows of task_embedding: 6 (v1.0) or 8 (ProMax)
    type_embed_dim: int = 256  # sinusoid width per type entry (control_add_embedding.linear_1 in / types)
    layers: int = 1  # blocks in transformer_layes
    heads: int = 8  # attention heads (not in the weights; the released files and diffusers use 8)

    def __post_init__(self) -> None:
        for name in ("num_control_types", "type_embed_dim", "layers", "heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UnionConfig.{name} must be >= 1, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, cfg: ControlNetConfig) -> "UnionConfig":
        raw = cfg.extra.get(UNION_CONFIG_KEY)
        if not isinstance(raw, dict):
            raise ValueError(f"config of {cfg.family} has no extra[{UNION_CONFIG_KEY!r}]: it is not a Union config")
        return cls(**raw)

    def attach(self, cfg: ControlNetConfig) -> ControlNetConfig:
        """`cfg` with this Union description in its extra (kept by to_json, read back by UnionConfig.of)."""
        return cfg.replace(extra={**cfg.extra, UNION_CONFIG_KEY: dict(vars(self))})


def is_union_config(cfg: ControlNetConfig) -> bool:
    return isinstance(cfg.extra.get(UNION_CONFIG_KEY), dict)


def union_type_index(control_type: str | int | None, num_types: int, source: str = "this Union ControlNet") -> int | None:
    """A type name (ComfyUI's, or one of its parts such as "canny") or index -> index; None / "auto" -> None.

    Raises ValueError naming the type, the file and how many types it has when the file lacks it.
    """
    if control_type is None or control_type == AUTO:
        return None
    if isinstance(control_type, str):
        key = control_type.strip().lower()
        if key not in _INDEX_BY_NAME:
            names = ", ".join([AUTO, *(name for name, _ in UNION_TYPES)])
            raise ValueError(f"unknown Union control type {control_type!r}; choose one of {names}")
        index = _INDEX_BY_NAME[key]
    else:
        index = int(control_type)
    if not 0 <= index < num_types:
        have = ", ".join(f"{i} {type_name(i)}" for i in range(num_types))
        hint = " (tile and repaint need the 8-type ProMax file)" if num_types < len(UNION_TYPES) else ""
        raise ValueError(f"Union control type {type_name(index)} ({index}) is not in {source}, which has "
                         f"{num_types} types ({have}){hint}")
    return index


@dataclass(frozen=True)
class UnionCondition:
    """One (type, hint, scale) of a Union forward."""

    control_type: int | None  # index into the file's types; None: core's "auto" (plain hint path)
    hint: torch.Tensor | None = None  # (1 or B, hint_channels, 8h, 8w) in [0, 1]
    scale: float = 1.0  # diffusers' conditioning_scale for this condition
    encoded: torch.Tensor | None = None  # encode_hint(hint) (B, model_channels, h, w), cached across steps


ConditionLike = UnionCondition | tuple[Any, ...]


def as_condition(item: ConditionLike) -> UnionCondition:
    """A UnionCondition, or a (type, hint, scale) tuple whose hint is the image or its encode_hint() (told apart
    by size in the forward: the image is 8x the latent)."""
    if isinstance(item, UnionCondition):
        return item
    if not isinstance(item, tuple) or len(item) not in (2, 3):
        raise ValueError(f"a Union condition is a UnionCondition or (type, hint, scale), got {item!r}")
    control_type, tensor = item[0], item[1]
    scale = float(item[2]) if len(item) == 3 else 1.0
    return UnionCondition(control_type, hint=tensor, scale=scale)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TokenMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, dim * 4)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(dim * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class TokenBlock(nn.Module):
    """Pre-LN attention + QuickGELU MLP over the condition tokens (CLIP-style ResidualAttentionBlock)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)  # batch_first=False on (B, tokens, C): see module docstring
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim)
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_1(x)
        x = x + self.attn(q, q, q, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ControlTypeEmbedding(nn.Module):
    """Multi-hot type vector -> one sinusoid per entry (cos first, shift 0) -> Linear-SiLU-Linear."""

    def __init__(self, num_types: int, embed_dim: int, out_dim: int):
        super().__init__()
        self.num_types, self.embed_dim = num_types, embed_dim
        self.linear_1 = nn.Linear(embed_dim * num_types, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, types: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        hot = torch.zeros(self.num_types, device=device)
        if types:
            hot[list(types)] = 1.0  # a zero entry still embeds to cos(0) = 1: "no type" is not zero
        sinusoid = timestep_embedding(hot, self.embed_dim).reshape(1, -1).to(dtype)
        return self.linear_2(self.act(self.linear_1(sinusoid)))  # (1, time_embed_dim), broadcast over the batch


class UnionControlNet(ControlNet):
    """A ControlNet with xinsir's control type encoder, condition tokens and condition fusion."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg)
        union = UnionConfig.of(cfg)
        dim = cfg.model_channels
        self.union = union
        self.source = "this Union ControlNet"  # the loader sets the file name, for error messages
        self.task_embedding = nn.Parameter(torch.zeros(union.num_control_types, dim))
        self.transformer_layes = nn.ModuleList(TokenBlock(dim, union.heads) for _ in range(union.layers))
        self.spatial_ch_projs = zero_module(nn.Linear(dim, dim))
        self.control_add_embedding = ControlTypeEmbedding(union.num_control_types, union.type_embed_dim,
                                                          cfg.time_embed_dim)

    @property
    def num_control_types(self) -> int:
        return self.union.num_control_types

    def type_index(self, control_type: str | int | None) -> int | None:
        return union_type_index(control_type, self.num_control_types, self.source)

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None,
                guided_hint: torch.Tensor | None = None, *,
                conditions: Iterable[ConditionLike] | None = None) -> ControlNetOutput:
        """Residuals for several (type, hint, scale) in ONE forward, as diffusers' multi-condition forward.

        Called like a plain ControlNet (hint / guided_hint, no conditions) it runs core's "auto": the plain hint
        path with the zero type vector embedded. With conditions:
          * one condition: its type's token and features; its scale multiplies every residual (core's and
            diffusers' single-type path; a None type is "auto" with that scale);
          * k > 1 conditions: the multi-hot vector of their types; each scale multiplies that condition's
            token, features and bias inside the network and the residuals are not scaled (diffusers).
        """
        if timesteps is None or context is None:
            raise ValueError("give timesteps and context")
        self.check_context(context)
        conds = [as_condition(c) for c in conditions] if conditions is not None else []
        if not conds:
            conds = [UnionCondition(None, hint=hint, encoded=guided_hint)]
        if len(conds) > 1 and any(c.control_type is None for c in conds):
            raise ValueError("auto (no type) is one condition on its own; give every condition of a multi-type "
                             "Union forward its type")
        types = [self.type_index(c.control_type) for c in conds]
        emb = self.embed_time(timesteps, y, self.dtype)
        active = [t for t in types if t is not None]
        emb = emb + self.control_add_embedding(active, emb.dtype, emb.device)
        features = [self._encoded(c, x) for c in conds]
        if types[0] is None:
            fused = features[0]  # core's auto: the hint as a plain ControlNet's
        else:
            fused = self._fuse(features, types, [c.scale for c in conds])
        out = self.run_copy(x, fused, emb, context)
        if len(conds) == 1 and conds[0].scale != 1.0:
            scale = conds[0].scale
            out = out.map(lambda _, r: r * scale)
        return out

    def _encoded(self, cond: UnionCondition, x: torch.Tensor) -> torch.Tensor:
        if cond.encoded is not None:
            if cond.encoded.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"encoded hint is {tuple(cond.encoded.shape[-2:])}, latent is {tuple(x.shape[-2:])}")
            return cond.encoded.to(self.dtype)
        if cond.hint is None:
            name = AUTO if cond.control_type is None else type_name(cond.control_type)
            raise ValueError(f"Union condition {name} has neither a hint image nor its encode_hint()")
        if cond.hint.shape[-2:] == x.shape[-2:] and cond.hint.shape[1] == self.config.model_channels:
            return cond.hint.to(self.dtype)  # an encoded hint given in the hint slot
        if cond.hint.shape[-2:] != (x.shape[-2] * 8, x.shape[-1] * 8):
            raise ValueError(f"hint is {tuple(cond.hint.shape[-2:])} but must be 8x the latent {tuple(x.shape[-2:])}; "
                             "resize the control image to the generation size")
        return self.encode_hint(cond.hint)

    def _fuse(self, features: list[torch.Tensor], types: list[int | None], scales: list[float]) -> torch.Tensor:
        """Sum over conditions of (features + spatial_ch_projs(token)), with diffusers' per-condition scales."""
        multi = len(features) > 1
        rows = max(f.shape[0] for f in features)
        feats = [f.expand(rows, *f.shape[1:]) if f.shape[0] != rows else f for f in features]
        tokens = []
        for f, t, s in zip(feats, types, scales):
            tok = f.mean(dim=(2, 3)) + self.task_embedding[t].to(f.dtype)  # (B, C)
            tokens.append(tok * s if multi else tok)
        x = torch.stack(tokens, dim=1)  # (B, k, C)
        for layer in self.transformer_layes:
            x = layer(x)
        fused = None
        for i, (f, s) in enumerate(zip(feats, scales)):
            bias = self.spatial_ch_projs(x[:, i])[..., None, None]
            term = (f * s + bias * s) if multi else (f + bias)
            fused = term if fused is None else fused + term
        return fused
