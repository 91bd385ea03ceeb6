"""Loading Flux and SD3 ControlNets (XLabs, Mistoline, InstantX / Shakker, SD3 diffusers) strictly.

The file is opened lazily; keys are renamed (and diffusers' separate q / k / v fused) by the tables in keymaps.py;
the architecture is read from the tensor shapes (plus a diffusers folder's config.json where one is beside); every
name and shape is checked against the model before any tensor is read; then tensors are read one at a time.
float8-stored weights are cast up (to bfloat16 unless a dtype is asked for).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import keymaps as km
from .checkpoint import (CheckpointFormat, _count, _file_dtype, _strip_wrappers, apply_rules,
                         check_names_and_shapes, detect_format)
from .diffusers_format import read_config_json
from .dit_control import DIT_FORMATS, DiTFormatSpec, spec_of
from .flux_controlnet import FluxControlNet, FluxControlNetConfig, HintInput
from .safetensors_io import WeightFile, open_weights
from .sd3_controlnet import SD35ControlNet, SD3ControlNet, SD3ControlNetConfig
from .skeleton import skeleton

FLOAT8 = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
Loader = Callable[[], torch.Tensor]
HINT_BY_FORMAT = {"flux_xlabs": HintInput.PIXELS, "flux_mistoline": HintInput.PIXELS_MISTOLINE,
                  "flux_instantx": HintInput.LATENT}


@dataclass
class LoadedDiTControlNet:
    """A loaded transformer ControlNet: the module, its config, its format (and that format's table entry)."""

    model: FluxControlNet | SD3ControlNet | SD35ControlNet
    config: FluxControlNetConfig | SD3ControlNetConfig
    format: CheckpointFormat
    path: Path

    @property
    def spec(self) -> DiTFormatSpec:
        return spec_of(self.format.value)

    @property
    def family(self) -> str:
        return self.spec.family


def load_dit_controlnet(path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LoadedDiTControlNet:
    """Load a Flux or SD3 ControlNet file (or diffusers folder) strictly.

    Args:
        path: a .safetensors / .pth file or a diffusers folder (config.json beside the weights is read for the
            rotary axes and head width when present).
        dtype: dtype of the weights (default: the file's; float8 files become bfloat16).
        device: where the weights are placed.
    """
    weights = open_weights(path)
    names = _strip_wrappers(weights.keys())
    fmt = CheckpointFormat(detect_format(names))
    if fmt.value not in DIT_FORMATS:
        raise ValueError(f"{weights.path} is a {fmt.value} checkpoint, not a Flux or SD3 ControlNet; load it with "
                         "checkpoint.load_controlnet")
    plan = _plan(fmt.value, weights, names)
    shapes = {k: meta for k, (meta, _) in plan.items()}
    sidecar = _sidecar(weights.path)
    if fmt.value.startswith("flux"):
        config: Any = infer_flux_config(shapes, fmt.value, sidecar, weights.path)
        build: Callable[[], nn.Module] = functools.partial(FluxControlNet, config)
    elif fmt is CheckpointFormat.SD35:
        config = infer_sd35_config(shapes, weights, names, weights.path)
        build = functools.partial(SD35ControlNet, config)
    else:
        config = infer_sd3_config(shapes, sidecar, weights.path)
        build = functools.partial(SD3ControlNet, config)
    model = skeleton(build)
    check_names_and_shapes(shapes, model.state_dict(), str(weights.path), f"{fmt.value} ({type(config).__name__})")
    stored = _file_dtype(weights)  # float8 storage is cast up to bfloat16
    dtype = dtype or (torch.bfloat16 if stored in FLOAT8 else stored)
    tensors = {k: load().to(device=device, dtype=dtype) for k, (_, load) in plan.items()}  # one at a time
    model.load_state_dict(tensors, strict=True, assign=True)
    return LoadedDiTControlNet(model.eval(), config, fmt, Path(path))


# ---- plans: our key -> (stored shape on meta, how to read it) ------------------------------------------
def _plan(fmt: str, weights: WeightFile, names: dict[str, str]) -> dict[str, tuple[torch.Tensor, Loader]]:
    if fmt in km.DIT_NATIVE_RULES:
        converted, unmatched = apply_rules(names, km.DIT_NATIVE_RULES[fmt])
        return {k: (weights.shapes[v], functools.partial(weights.load, v)) for k, v in converted.items()}
    rules_table, fused, other, counts = km.DIT_LAYOUTS[fmt]
    names = {k: v for k, v in names.items() if not k.startswith(other)}
    ranges = {"": [{}], "double": [], "single": []}
    ranges.update({index: [{"i": i} for i in range(_count(names, key))] for index, key in counts.items()})
    plan: dict[str, tuple[torch.Tensor, Loader]] = {}
    used: set[str] = set()
    for target, sources, index in fused:
        for values in ranges[index]:
            for p in ("weight", "bias"):
                keys = [names.get(s.format(p=p, **values)) for s in sources]
                if all(k is None for k in keys):
                    continue
                if any(k is None for k in keys):
                    missing = [s.format(p=p, **values) for s, k in zip(sources, keys) if k is None]
                    raise KeyError(f"{weights.path}: {missing} missing (the others of {target.format(p=p, **values)} "
                                   "are there); the file is incomplete: fetch it again")
                metas = [weights.shapes[k] for k in keys]
                plan[target.format(p=p, **values)] = (torch.cat(metas), functools.partial(_cat, weights, keys))
                used.update(s.format(p=p, **values) for s in sources)
    rules = [(src.format(**v), dst.format(**v)) for src, dst, index in rules_table for v in ranges[index]]
    converted, unmatched = apply_rules({k: v for k, v in names.items() if k not in used}, rules)
    if unmatched:
        raise KeyError(f"{weights.path}: {len(unmatched)} keys have no place in the {fmt} layout, e.g. "
                       f"{sorted(unmatched)[:10]}; the file mixes layouts or is not a {fmt} ControlNet")
    plan.update({k: (weights.shapes[v], functools.partial(weights.load, v)) for k, v in converted.items()})
    return plan


def _cat(weights: WeightFile, keys: list[str]) -> torch.Tensor:
    return torch.cat([weights.load(k) for k in keys])


def _sidecar(file: Path) -> dict[str, Any]:
    """config.json of a diffusers folder, when the weights are its diffusion_pytorch_model file."""
    if not file.name.startswith("diffusion_pytorch_model"):
        return {}
    return read_config_json(file.parent / km.DIFFUSERS_CONFIG_NAME)


# ---- architecture from the shapes --------------------------------------------------------------------------
def _need(shapes: Mapping[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    if key not in shapes:
        raise KeyError(f"{file}: {key} missing; cannot infer the architecture (the file is incomplete)")
    return shapes[key]


def default_axes(head_dim: int, file: Path) -> tuple[int, int, int]:
    """Flux's rotary split (16, 56, 56) of a 128-wide head, kept in proportion for other widths."""
    if head_dim % 32:
        raise ValueError(f"{file}: heads of width {head_dim} have no standard Flux rotary split; put a diffusers "
                         "config.json with axes_dims_rope beside the weights")
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def infer_flux_config(shapes: Mapping[str, torch.Tensor], fmt: str, sidecar: Mapping[str, Any],
                      file: Path) -> FluxControlNetConfig:
    """Depth, widths and heads of a Flux ControlNet from its tensors (ours, after renaming)."""
    img_in = _need(shapes, "img_in.weight", file)
    hidden = img_in.shape[0]
    depth, single = _count(shapes, "double_blocks.{n}.img_mod.lin.weight"), _count(shapes, "single_blocks.{n}.linear1.weight")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = _need(shapes, norm, file).shape[0]
    if "attention_head_dim" in sidecar:
        head_dim = int(sidecar["attention_head_dim"])
    mlp_key = "double_blocks.0.img_mlp.0.weight" if depth else None
    mlp_ratio = shapes[mlp_key].shape[0] / hidden if mlp_key else (_need(
        shapes, "single_blocks.0.linear2.weight", file).shape[1] - hidden) / hidden
    axes = tuple(sidecar.get("axes_dims_rope") or default_axes(head_dim, file))
    mode = shapes.get("controlnet_mode_embedder.weight")
    return FluxControlNetConfig(
        depth=depth, depth_single=single, hidden_size=hidden, num_heads=hidden // head_dim, in_channels=img_in.shape[1],
        context_dim=_need(shapes, "txt_in.weight", file).shape[1],
        vec_in_dim=_need(shapes, "vector_in.in_layer.weight", file).shape[1],
        guidance_embed="guidance_in.in_layer.weight" in shapes, axes_dim=axes, mlp_ratio=mlp_ratio,
        hint=HINT_BY_FORMAT[fmt], hint_channels=_need(shapes, "pos_embed_input.weight", file).shape[1],
        num_union_modes=0 if mode is None else mode.shape[0])


def infer_sd3_config(shapes: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any], file: Path) -> SD3ControlNetConfig:
    """Blocks, widths and heads of an SD3 diffusers ControlNet (heads of width 64 unless config.json says)."""
    proj = _need(shapes, "img_in.proj.weight", file)
    hidden = proj.shape[0]
    head_dim = int(sidecar.get("attention_head_dim", 64))
    return SD3ControlNetConfig(
        num_blocks=_count(shapes, "double_blocks.{n}.img_mod.lin.weight"), hidden_size=hidden,
        num_heads=hidden // head_dim, in_channels=proj.shape[1], patch_size=proj.shape[-1],
        hint_channels=_need(shapes, "pos_embed_input.proj.weight", file).shape[1],
        context_dim=_need(shapes, "txt_in.weight", file).shape[1],
        pooled_dim=_need(shapes, "vector_in.in_layer.weight", file).shape[1],
        pos_embed_max_size=math.isqrt(_need(shapes, "pos_embed", file).shape[1]),
        qk_norm="double_blocks.0.img_attn.norm.query_norm.scale" in shapes)


def infer_sd35_config(shapes: Mapping[str, torch.Tensor], weights: WeightFile, names: Mapping[str, str],
                      file: Path) -> SD3ControlNetConfig:
    """An SD3.5 Stability ControlNet: width from its pooled embedder, heads of width 64 (ComfyUI
    load_controlnet_sd35), the control_type scalar when stored."""
    y_emb = _need(shapes, "vector_in.in_layer.weight", file)
    hidden = y_emb.shape[0]
    double_y = y_emb.shape[0] == y_emb.shape[1]
    key = names.get(km.DIT_SD35_CONTROL_TYPE)
    control_type = -1 if key is None else round(float(weights.load(key).float().item()))
    return SD3ControlNetConfig(
        num_blocks=_count(shapes, "blocks.{n}.mod.lin.weight"), hidden_size=hidden, num_heads=hidden // 64,
        hint_channels=_need(shapes, "pos_embed_input.proj.weight", file).shape[1],
        pooled_dim=2048, context_dim=0, qk_norm="blocks.0.attn.norm.query_norm.scale" in shapes,
        image_only=True, double_y_emb=double_y, control_type=control_type)
