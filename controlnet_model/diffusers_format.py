"""diffusers' ControlNetModel config.json <-> ControlNetConfig (diffusers models/controlnets/controlnet.py ControlNetModel.__init__ arguments).

Key renames live in keymaps.LDM_DIFFUSERS_RULES and are applied by checkpoint.py; this module only translates
the parts of the architecture that are not in the weights (head counts, pooling, the SDXL size embedding) and
writes the config.json that diffusers' from_pretrained reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .config import FAMILY_BY_CONTEXT_DIM, ControlNetConfig

SDXL_ADDITION_TIME_EMBED_DIM = 256  # SDXL: each of the 6 size/crop numbers is a 256-wide sinusoid (2816 = 1280 + 6*256)


def read_config_json(path: Path) -> dict[str, Any]:
    """The config.json at `path` ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it from the model's repository") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a diffusers config object; restore it")
    return raw


def heads_from_config(raw: Mapping[str, Any], widths: list[int], source: Path) -> dict[str, int]:
    """diffusers' attention_head_dim is historically the head COUNT: one int for all levels or one per level."""
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim") or 8
    if isinstance(heads, int):
        return {"num_heads": heads, "num_head_channels": -1}
    if len(heads) != len(widths):
        raise ValueError(f"{source}: attention_head_dim {heads} has {len(heads)} entries for {len(widths)} levels; "
                         "the config does not belong to these weights")
    head_widths = {c // h for c, h in zip(widths, heads)}
    if len(head_widths) != 1:
        raise ValueError(f"{source}: head counts {heads} give different head widths per level, which the LDM "
                         "layout cannot express")
    return {"num_heads": -1, "num_head_channels": head_widths.pop()}


def config_changes(raw: Mapping[str, Any], cfg: ControlNetConfig, source: Path) -> dict[str, Any]:
    """ControlNetConfig fields that config.json decides (the weights decide every shape)."""
    if not raw:
        return {}
    changes: dict[str, Any] = dict(heads_from_config(raw, list(cfg.channel_widths), source))
    context_dim = raw.get("cross_attention_dim")
    if isinstance(context_dim, int) and context_dim != cfg.context_dim:  # only unknowable without attention layers
        changes.update(context_dim=context_dim, family=FAMILY_BY_CONTEXT_DIM.get(context_dim, cfg.family))
    changes["global_average_pooling"] = bool(raw.get("global_pool_conditions", False))
    if raw.get("addition_time_embed_dim"):
        changes["extra"] = {**cfg.extra, "addition_time_embed_dim": int(raw["addition_time_embed_dim"])}
    return changes


def is_bgr(raw: Mapping[str, Any]) -> bool:
    """Old diffusers configs may say the hint is BGR; the loader then flips the first hint conv's inputs."""
    return str(raw.get("controlnet_conditioning_channel_order", "rgb")).lower() == "bgr"


def diffusers_config(cfg: ControlNetConfig) -> dict[str, Any]:
    """config.json for diffusers' ControlNetModel describing this architecture."""
    widths = list(cfg.channel_widths)
    heads: Any = cfg.num_heads if cfg.num_heads != -1 else [w // cfg.num_head_channels for w in widths]
    out = {
        "_class_name": "ControlNetModel", "in_channels": cfg.in_channels, "conditioning_channels": cfg.hint_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if d is not None else "DownBlock2D" for d in cfg.transformer_depth],
        "transformer_layers_per_block": _layers_per_block(cfg),
        "mid_block_type": "UNetMidBlock2D" if cfg.transformer_depth_middle is None else "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": heads, "use_linear_projection": cfg.use_linear_in_transformer,
        "conditioning_embedding_out_channels": list(cfg.hint_block_channels),
        "global_pool_conditions": cfg.global_average_pooling, "norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "controlnet_conditioning_channel_order": "rgb",
    }
    if cfg.adm_in_channels is not None:
        out.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=cfg.adm_in_channels,
                   addition_time_embed_dim=_addition_time_embed_dim(cfg))
    return out


def _addition_time_embed_dim(cfg: ControlNetConfig) -> int:
    """Width of each size/crop sinusoid in the ADM vector (pooled text + 6 of them)."""
    if "addition_time_embed_dim" in cfg.extra:
        return int(cfg.extra["addition_time_embed_dim"])
    if cfg.adm_in_channels == 2816:
        return SDXL_ADDITION_TIME_EMBED_DIM
    raise ValueError(f"ADM width {cfg.adm_in_channels} is not SDXL's 2816; say how it splits with "
                     "config.extra['addition_time_embed_dim'] (ADM = pooled text + 6 x that)")


def _layers_per_block(cfg: ControlNetConfig) -> list[int]:
    """diffusers gives the middle block the last level's depth, so the two must agree (or the last be empty)."""
    layers = [d or 0 for d in cfg.transformer_depth]
    middle = cfg.transformer_depth_middle or 0
    if cfg.transformer_depth[-1] is None:
        layers[-1] = middle
    elif layers[-1] != middle:
        raise ValueError(f"diffusers cannot express last-level depth {layers[-1]} with middle depth {middle}")
    return layers


def union_diffusers_config(base: dict[str, Any], union: Any, cfg: ControlNetConfig) -> dict[str, Any]:
    """config.json of diffusers' ControlNetUnionModel: `base` (diffusers_config) plus the Union fields.

    diffusers sizes the control type sinusoid by addition_time_embed_dim, the same field as SDXL's size/crop
    sinusoid (models/controlnets/controlnet_union.py), so the two must agree (256 in the released files).
    """
    if base.get("addition_time_embed_dim", union.type_embed_dim) != union.type_embed_dim:
        raise ValueError(f"diffusers' ControlNetUnionModel uses one width for the size/crop and control type "
                         f"sinusoids, but this Union has {base['addition_time_embed_dim']} and {union.type_embed_dim}")
    return {**base, "_class_name": "ControlNetUnionModel", "num_control_type": union.num_control_types,
            "num_trans_channel": cfg.model_channels, "num_trans_head": union.heads, "num_trans_layer": union.layers,
            "num_proj_channel": cfg.model_channels, "addition_time_embed_dim": union.type_embed_dim}
