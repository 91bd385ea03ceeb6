"""diffusers-layout ControlNets: folders (config.json + weights) and single files, both ways (formats §2.3)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from . import keymaps
from .config import ControlNetConfig

Rules = list[tuple[str, str]]


def _count(state: Mapping[str, Any], template: str, **fixed: Any) -> int:
    n = 0
    while any(k.startswith(template.format(n=n, **fixed)) for k in state):
        n += 1
    return n


def _res_rules(ldm: str, diffusers: str) -> Rules:
    return [(ldm + a, diffusers + b) for a, b in keymaps.DIFFUSERS_RES_SUBKEYS]


def expand_rules(levels: int, res_blocks: int, attention: list[bool], mid_attention: bool) -> Rules:
    """The full 1:1 (LDM prefix, diffusers prefix) list for one layout."""
    rules: Rules = list(keymaps.DIFFUSERS_FIXED)
    ldm_hint, diff_hint = keymaps.DIFFUSERS_HINT_BLOCK
    rules += [(ldm_hint.format(ldm=2 * k + 2), diff_hint.format(k=k)) for k in range(6)]
    i = 1
    for b in range(levels):
        for j in range(res_blocks):
            rules += _res_rules(*(t.format(i=i, b=b, j=j) for t in keymaps.DIFFUSERS_DOWN_RES))
            if attention[b]:
                rules.append(tuple(t.format(i=i, b=b, j=j) for t in keymaps.DIFFUSERS_DOWN_ATTN))
            i += 1
        if b != levels - 1:
            rules.append(tuple(t.format(i=i, b=b) for t in keymaps.DIFFUSERS_DOWNSAMPLE))
            i += 1
    for ldm, diffusers in keymaps.DIFFUSERS_MID:
        rules += _res_rules(ldm, diffusers)
    if mid_attention:
        rules.append(keymaps.DIFFUSERS_MID_ATTN)
    rules += [tuple(t.format(n=n) for t in keymaps.DIFFUSERS_ZERO_CONV) for n in range(i)]
    return rules


def apply_rules(state: Mapping[str, torch.Tensor], rules: Rules) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename keys by the longest matching prefix rule; return (converted, unmatched source keys)."""
    ordered = sorted(rules, key=lambda r: len(r[0]), reverse=True)
    converted, unmatched = {}, []
    for key, tensor in state.items():
        for src, dst in ordered:
            if key.startswith(src):
                converted[dst + key[len(src):]] = tensor
                break
        else:
            unmatched.append(key)
    return converted, unmatched


def layout_from_diffusers_keys(state: Mapping[str, Any]) -> tuple[int, int, list[bool], bool]:
    levels = _count(state, "down_blocks.{n}.resnets.0.")
    res_blocks = _count(state, "down_blocks.0.resnets.{n}.")
    attention = [any(k.startswith(f"down_blocks.{b}.attentions.0.") for k in state) for b in range(levels)]
    return levels, res_blocks, attention, any(k.startswith("mid_block.attentions.0.") for k in state)


def layout_from_ldm_config(cfg: ControlNetConfig) -> tuple[int, int, list[bool], bool]:
    return (len(cfg.channel_mult), cfg.num_res_blocks, [d is not None for d in cfg.transformer_depth],
            cfg.transformer_depth_middle is not None)


def diffusers_to_ldm(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    converted, unmatched = apply_rules(state, [(d, l) for l, d in expand_rules(*layout_from_diffusers_keys(state))])
    if unmatched:
        raise KeyError(f"{path}: {len(unmatched)} diffusers keys have no LDM counterpart, e.g. {unmatched[:8]}")
    return converted


def heads_from_config(config: Mapping[str, Any], block_out_channels: list[int]) -> dict[str, int]:
    """diffusers' attention_head_dim is historically the head COUNT: an int (same for all) or one per level."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if isinstance(heads, int):
        return {"num_heads": heads, "num_head_channels": -1}
    widths = {c // h for c, h in zip(block_out_channels, heads)}
    if len(widths) != 1:
        raise ValueError(f"per-level head counts {heads} give different head widths; not an LDM-expressible config")
    return {"num_heads": -1, "num_head_channels": widths.pop()}


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore the file from the model's repository") from None


def weight_file_in(folder: Path) -> Path:
    for name in keymaps.DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no diffusers weights (looked for {', '.join(keymaps.DIFFUSERS_WEIGHT_NAMES)}); "
                            "download diffusion_pytorch_model.safetensors into it")


def diffusers_config(cfg: ControlNetConfig) -> dict[str, Any]:
    """config.json for diffusers' ControlNetModel describing this architecture."""
    widths = list(cfg.channel_widths)
    heads: Any = cfg.num_heads if cfg.num_heads != -1 else [w // cfg.num_head_channels for w in widths]
    out = {
        "_class_name": "ControlNetModel", "in_channels": cfg.in_channels, "conditioning_channels": cfg.hint_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if d is not None else "DownBlock2D" for d in cfg.transformer_depth],
        "transformer_layers_per_block": _layers_per_block(cfg),
        "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": heads, "use_linear_projection": cfg.use_linear_in_transformer,
        "conditioning_embedding_out_channels": list(cfg.hint_block_channels),
        "global_pool_conditions": cfg.global_average_pooling, "norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "controlnet_conditioning_channel_order": "rgb",
    }
    if cfg.adm_in_channels is not None:
        time_dim = 256 if cfg.adm_in_channels == 2816 else int(cfg.extra.get("addition_time_embed_dim", 4))
        out.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=cfg.adm_in_channels,
                   addition_time_embed_dim=time_dim)
    return out


def _layers_per_block(cfg: ControlNetConfig) -> list[int]:
    """diffusers gives the middle block the last level's depth, so the two must agree (or the last be empty)."""
    layers = [d or 0 for d in cfg.transformer_depth]
    middle = cfg.transformer_depth_middle or 0
    if cfg.transformer_depth[-1] is None:
        layers[-1] = middle
    elif layers[-1] != middle:
        raise ValueError(f"diffusers cannot express last-level depth {layers[-1]} with middle depth {middle}")
    return layers


def ldm_to_diffusers(state: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    converted, unmatched = apply_rules(state, expand_rules(*layout_from_ldm_config(cfg)))
    if unmatched:
        raise KeyError(f"{len(unmatched)} LDM keys have no diffusers counterpart, e.g. {unmatched[:8]}")
    return converted
