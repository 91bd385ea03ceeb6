"""Reading and writing ControlNet checkpoints (formats: lllyasviel/ControlNet cldm/cldm.py, diffusers models/controlnets/, ComfyUI comfy/controlnet.py).

Read: original v1.0 files (`control_model.` prefix, with or without the whole SD model, Lightning nesting),
pruned community files, v1.1 bare LDM files (with an optional `.yaml` beside), diffusers folders and single
files, diff ControlNets and Control-LoRA (relative to a base U-Net), shuffle-type models, and our native files.
xinsir's Union / ControlNet++ files (diffusers-keyed, folder or lone file) load into union.UnionControlNet;
T2I-Adapters are read by t2i_adapter.load_t2i_adapter (load_control takes either kind). Flux and SD3/SD3.5
ControlNets are detected here and loaded by dit_checkpoint.py. Other kinds (LLLite, XS, ...) are recognised and
refused with a clear error.

How a load runs: open the file lazily (safetensors_io), detect the format from marker keys (keymaps.FORMAT_MARKERS),
rename keys to the LDM layout with one generic `apply_rules`, decide the architecture (native metadata, else the
shapes, plus sidecar configs), check every key and shape, and only then read the tensors one at a time into the
dtype and device asked for. Write: native safetensors (bare LDM keys + metadata) and diffusers folders, atomically.
"""
from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

import torch
from torch import nn

from . import keymaps as km
from .atomic import atomic_save_safetensors, atomic_write_text
from .config import FAMILY_BY_CONTEXT_DIM, ControlNetConfig
from .diffusers_format import config_changes, diffusers_config, is_bgr, read_config_json, union_diffusers_config
from .metadata import FORMAT_VERSION, PREFIX, ControlNetMetadata, content_hash, control_type_from_name
from .network import ControlNet
from .t2i_adapter import AdapterConfig, AdapterKind, T2IAdapter
from .union import UnionConfig, UnionControlNet, is_union_config
from .safetensors_io import WeightFile, check_finite, constant, open_weights, read_state_dict
from .skeleton import skeleton

if TYPE_CHECKING:
    from .dit_checkpoint import LoadedDiTControlNet

logger = logging.getLogger(__name__)

V = TypeVar("V")
Rules = Sequence[tuple[str, str]]


class CheckpointFormat(str, Enum):
    """Checkpoint layouts; DIFF / CONTROL_LORA need the base U-Net, UNSUPPORTED ones are recognised only."""

    LDM_FULL = "ldm_full"  # A: v1.0 file with the whole SD model inside (`control_model.` + `model.diffusion_model.`)
    LDM_PREFIXED = "ldm_prefixed"  # B: pruned v1.0 file, `control_model.` keys only
    LDM = "ldm"  # D: v1.1 / ComfyUI repack / our native files: bare LDM keys
    DIFFUSERS = "diffusers"  # E: diffusers folder or single file
    DIFF = "diff"  # C: kohya difference ControlNet (needs the base U-Net)
    CONTROL_LORA = "control_lora"  # F: Stability Control-LoRA (needs the base U-Net)
    UNION = "union"
    CONTROLNET_XS = "controlnet_xs"
    T2I_ADAPTER = "t2i_adapter"
    T2I_STYLE = "t2i_style"
    STABLE_CASCADE = "stable_cascade"
    LLLITE = "lllite"
    FLUX_XLABS = "flux_xlabs"  # transformer ControlNets: loaded by dit_checkpoint.py
    FLUX_MISTOLINE = "flux_mistoline"
    FLUX_INSTANTX = "flux_instantx"
    SD3_DIFFUSERS = "sd3_diffusers"
    SD35 = "sd35"
    DIT = "dit"
    IP_ADAPTER = "ip_adapter"
    SD_MODEL = "sd_model"


NEEDS_BASE = frozenset({CheckpointFormat.DIFF, CheckpointFormat.CONTROL_LORA})
# What each recognised-but-refused kind is, and what to do instead.
UNSUPPORTED: dict[CheckpointFormat, tuple[str, str]] = {
    CheckpointFormat.CONTROLNET_XS: ("a ControlNet-XS model (control and base exchange features both ways)",
                                     "use diffusers' ControlNetXSAdapter"),
    CheckpointFormat.T2I_STYLE: ("a T2I style adapter, which turns a CLIP-vision image embedding into extra "
                                 "prompt tokens rather than steering the U-Net's features",
                                 "use ComfyUI's core StyleModelLoader and Apply Style Model nodes"),
    CheckpointFormat.STABLE_CASCADE: ("a Stable Cascade ControlNet, made for Stable Cascade's stage C, not an SD "
                                      "U-Net", "load it with ComfyUI's core ControlNet loader and a Stable Cascade "
                                      "model"),
    CheckpointFormat.LLLITE: ("a ControlNet-LLLite (kohya) model", "use a ControlNet-LLLite node pack"),
    CheckpointFormat.DIT: ("a ControlNet for a transformer (DiT) model such as Hunyuan-DiT",
                           "load it with ComfyUI's core ControlNet loader"),
    CheckpointFormat.IP_ADAPTER: ("an IP-Adapter, not a ControlNet", "use an IP-Adapter node pack"),
    CheckpointFormat.SD_MODEL: ("a Stable Diffusion model without a ControlNet inside",
                                "put it in models/checkpoints and give a ControlNet file here"),
}
LOADABLE = frozenset(CheckpointFormat) - frozenset(UNSUPPORTED)
TRANSFORMER_FORMATS = frozenset({CheckpointFormat.FLUX_XLABS, CheckpointFormat.FLUX_MISTOLINE,
                                 CheckpointFormat.FLUX_INSTANTX, CheckpointFormat.SD3_DIFFUSERS, CheckpointFormat.SD35})


@dataclass
class LoadedControlNet:
    """A loaded ControlNet with what is known about it."""

    model: ControlNet
    config: ControlNetConfig
    format: CheckpointFormat
    metadata: ControlNetMetadata
    path: Path


class Source(NamedTuple):
    """Where one ControlNet tensor comes from: its stored shape/dtype (meta tensor) and how to read it."""

    meta: torch.Tensor
    load: Callable[[], torch.Tensor]


Plan = dict[str, Source]


# ---- key tables -------------------------------------------------------------------------------------------
def apply_rules(state: Mapping[str, V], rules: Rules) -> tuple[dict[str, V], list[str]]:
    """Rename keys by the longest matching source prefix; return (converted, unmatched source keys); one rule table per format, no per-key code."""
    ordered = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
    converted: dict[str, V] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for source, target in ordered:
            if key.startswith(source):
                new = target + key[len(source):]
                if new in converted:
                    raise KeyError(f"two keys map to {new!r} (the second is {key!r}); the file holds a layout twice")
                converted[new] = value
                break
        else:
            unmatched.append(key)
    return converted, unmatched


def invert(rules: Rules) -> list[tuple[str, str]]:
    """The inverse conversion of 1:1 rules."""
    return [(target, source) for source, target in rules]


class Layout(NamedTuple):
    """What the LDM <-> diffusers index ranges depend on."""

    levels: int
    res_blocks: int
    attention: tuple[bool, ...]  # per level
    mid_attention: bool


def layout_of(cfg: ControlNetConfig) -> Layout:
    return Layout(len(cfg.channel_mult), cfg.num_res_blocks, tuple(d is not None for d in cfg.transformer_depth),
                  cfg.transformer_depth_middle is not None)


def diffusers_layout(keys: Iterable[str]) -> Layout:
    """The layout of a diffusers-named state dict, from which keys exist (keymaps.DIFFUSERS_*_KEY)."""
    present = set(keys)
    levels = _count(present, km.DIFFUSERS_LEVEL_KEY)
    attention = tuple(km.DIFFUSERS_ATTN_KEY.format(b=b) in present for b in range(levels))
    return Layout(levels, _count(present, km.DIFFUSERS_RES_KEY), attention, km.DIFFUSERS_MID_ATTN_KEY in present)


def _count(present: set[str] | Mapping[str, Any], template: str) -> int:
    n = 0
    while template.format(n=n) in present:
        n += 1
    return n


def ldm_diffusers_rules(layout: Layout) -> list[tuple[str, str]]:
    """keymaps.LDM_DIFFUSERS_RULES expanded over the layout's index ranges: (LDM prefix, diffusers prefix)."""
    res = [{"ldm_res": a, "diffusers_res": b} for a, b in km.RES_SUBKEYS]
    down_res, down_attn, downsample = [], [], []
    i = 1  # input block 0 is conv_in
    for b in range(layout.levels):
        for j in range(layout.res_blocks):
            down_res += [{"i": i, "b": b, "j": j, **r} for r in res]
            if layout.attention[b]:
                down_attn.append({"i": i, "b": b, "j": j})
            i += 1
        if b != layout.levels - 1:
            downsample.append({"i": i, "b": b})
            i += 1
    ranges: dict[str, list[dict[str, Any]]] = {
        "": [{}], "res": res, "down_res": down_res, "down_attn": down_attn, "downsample": downsample,
        "hint_blocks": [{"h": 2 * k + 2, "k": k} for k in range(km.HINT_BLOCK_COUNT)],
        "mid_attn": [{}] if layout.mid_attention else [], "zero_convs": [{"n": n} for n in range(i)],
    }
    return [(ldm.format(**v), dif.format(**v)) for ldm, dif, name in km.LDM_DIFFUSERS_RULES for v in ranges[name]]


# ---- detection and architecture ---------------------------------------------------------------------------
def detect_format(keys_or_state: Iterable[str] | Mapping[str, Any]) -> CheckpointFormat:
    """The first format whose marker keys are all present (table keymaps.FORMAT_MARKERS)."""
    present = set(keys_or_state)
    for name, markers in km.FORMAT_MARKERS:
        if all(marker in present for marker in markers):
            return CheckpointFormat(name)
    looked = "; ".join(f"{name}: {' + '.join(markers)}" for name, markers in km.FORMAT_MARKERS)
    raise ValueError(f"unknown checkpoint layout: no format's marker keys are all present (looked for {looked})")


def infer_ldm_config(state: Mapping[str, torch.Tensor], n_in: int | None = None) -> ControlNetConfig:
    """The encoder architecture an LDM U-Net and its ControlNet share, from key names and shapes (prefix stripped;
    meta tensors suffice): widths, levels, res blocks, attention depths, context, ADM, input channels.

    n_in: the number of input blocks (a ControlNet counts its zero convs); counted from `input_blocks` if None.
    Heads: SD1.x (768 context, conv projections) has 8 heads, SD2.x and SDXL 64-wide heads
    (ldm/modules/attention.py SpatialTransformer in each family's model yaml).
    """
    mc, in_ch = state["input_blocks.0.0.weight"].shape[:2]
    if n_in is None:
        n_in = 1
        while any(f"input_blocks.{n_in}.0.{s}" in state for s in ("op.weight", "in_layers.0.weight")):
            n_in += 1
    downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in state]
    levels = len(downs) + 1
    res = (n_in - 1 - len(downs)) // levels
    mult, depth = [], []
    for level in range(levels):
        first = 1 + level * (res + 1)
        mult.append(state[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] // mc)
        depth.append(_attention_depth(state, f"input_blocks.{first}.1."))
    context = [t.shape[1] for k, t in state.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [t.ndim for k, t in state.items() if k.endswith("proj_in.weight")]
    adm = state["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in state else None
    context_dim = context[0] if context else (2048 if adm else 768)  # no cross-attention (SDXL small): by ADM
    linear = proj_in[0] == 2 if proj_in else bool(adm)
    sd1_heads = not linear and context_dim == 768
    return ControlNetConfig(
        family=FAMILY_BY_CONTEXT_DIM.get(context_dim, f"custom (context {context_dim})"), model_channels=mc,
        channel_mult=tuple(mult), num_res_blocks=res, transformer_depth=tuple(depth),
        transformer_depth_middle=_attention_depth(state, "middle_block.1."), context_dim=context_dim,
        num_heads=8 if sd1_heads else -1, num_head_channels=-1 if sd1_heads else min(64, mc),
        use_linear_in_transformer=linear, adm_in_channels=adm, in_channels=in_ch)


def infer_config(state: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """A ControlNet's architecture from LDM key names and shapes: the shared encoder, plus its hint encoder."""
    missing = [k for k in ("input_blocks.0.0.weight", "input_hint_block.0.weight", "zero_convs.0.0.weight")
               if k not in state]
    if missing:
        raise KeyError(f"cannot infer the architecture: {missing} missing (not a complete LDM ControlNet)")
    config = infer_ldm_config(state, _count(state, "zero_convs.{n}.0.weight"))  # one zero conv per input block
    return config.replace(hint_channels=state["input_hint_block.0.weight"].shape[1],
                          hint_block_channels=tuple(state[f"input_hint_block.{i}.weight"].shape[0]
                                                    for i in (0, 4, 8, 12)))


def _attention_depth(state: Mapping[str, Any], prefix: str) -> int | None:
    if f"{prefix}proj_in.weight" not in state:
        return None
    return _count(state, prefix + "transformer_blocks.{n}.norm1.weight")


# ---- loading ----------------------------------------------------------------------------------------------
def load_controlnet(path: str | Path, *, base_unet: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    ) -> LoadedControlNet | LoadedDiTControlNet:
    """Load any supported ControlNet file strictly into our ControlNet (a Flux / SD3 one: dit_checkpoint.py).

    Args:
        path: a weight file (.safetensors, .pth, .ckpt, .bin) or a diffusers folder.
        base_unet: the LDM-layout U-Net (module or state dict) that diff and Control-LoRA files are relative to;
            ignored for self-contained files.
        dtype: dtype of the loaded weights (default: the file's).
        device: where the weights are placed; each tensor goes there straight from the file.
    """
    path = Path(path)
    weights, names, fmt = _open_detected(path)
    if fmt in TRANSFORMER_FORMATS:
        from .dit_checkpoint import load_dit_controlnet  # it builds on this module

        return load_dit_controlnet(path, dtype=dtype, device=device)
    if fmt is CheckpointFormat.T2I_ADAPTER:
        raise ValueError(f"{weights.path} is a T2I-Adapter, not a ControlNet: load it with "
                         "t2i_adapter.load_t2i_adapter (or checkpoint.load_control, which takes either kind)")
    base = _base_weights(base_unet, fmt, weights.path)
    sidecar = _sidecar(fmt, weights.path)
    plan = _plan(fmt, weights, names, base, sidecar)
    config = _resolve_config(weights, plan, base, base_unet, sidecar, path)
    if base is not None:
        plan = _fill_from_base(plan, config, base)
    model = _build(config, plan, weights.path, dtype or _file_dtype(weights), torch.device(device), base is None)
    if isinstance(model, UnionControlNet):
        model.source = path.name
    logger.info("loaded %s (%s, %s)", path.name, fmt.value, config.family)
    return LoadedControlNet(model, config, fmt, _describe(weights, config, fmt, path), path)


def _open_detected(path: Path) -> tuple[WeightFile, dict[str, str], CheckpointFormat]:
    """The file opened lazily, its key names without wrapper prefixes, and its format; refused kinds raise."""
    weights = open_weights(path)
    names = _strip_wrappers(weights.keys())
    fmt = _detect(names, weights.path)
    if fmt in UNSUPPORTED:
        kind, advice = UNSUPPORTED[fmt]
        raise ValueError(f"{weights.path} is {kind} ({fmt.value}), which is not supported yet: {advice}")
    return weights, names, fmt


def _detect(names: Mapping[str, str], file: Path) -> CheckpointFormat:
    try:
        return detect_format(names)
    except ValueError as exc:
        raise ValueError(f"{file} is not a ControlNet layout we know ({exc}). Check that it is a ControlNet; "
                         "for other model kinds use their own loader") from None


def _strip_wrappers(keys: Iterable[str]) -> dict[str, str]:
    """Key without torch.compile / DataParallel wrapper prefixes -> key in the file."""
    names = {k: k for k in keys}
    for prefix in km.WRAPPER_PREFIXES:
        stripped, unmatched = apply_rules(names, [(prefix, "")])
        if names and not unmatched:
            names = stripped
    return names


def _base_weights(base_unet: nn.Module | Mapping[str, torch.Tensor] | None, fmt: CheckpointFormat,
                  file: Path) -> dict[str, torch.Tensor] | None:
    """The base U-Net's weights under their ControlNet twin names, for relative formats (§2.4-2.5)."""
    if fmt not in NEEDS_BASE:
        if base_unet is not None:
            logger.debug("%s is self-contained; the base U-Net given is not used", file.name)
        return None
    kind = "diff ControlNet" if fmt is CheckpointFormat.DIFF else "Control-LoRA"
    if base_unet is None:
        raise ValueError(f"{file} is a {kind}, stored relative to the model it was made for; give that base model "
                         "(load_controlnet(..., base_unet=unet); in ComfyUI connect the MODEL to the loader's "
                         "model input)")
    state = base_unet.state_dict() if isinstance(base_unet, nn.Module) else base_unet
    rules = [(prefix + unet, control) for prefix in km.BASE_UNET_PREFIXES
             for control, unet in km.INIT_FROM_UNET_PREFIXES]
    twins, _ = apply_rules(state, rules)  # decoder and non-U-Net keys have no twin and are not needed
    if not twins:
        raise ValueError(f"the base model given for {file} has no LDM U-Net weights (time_embed, input_blocks, "
                         "middle_block); give the U-Net of the model the file was made for")
    return {k: v.detach() for k, v in twins.items()}


class Sidecar(NamedTuple):
    """Configuration found beside the weights (not in them)."""

    diffusers: dict[str, Any]  # config.json of a diffusers folder
    cldm: dict[str, Any]  # control_stage_config params of a v1.1 .yaml


def _sidecar(fmt: CheckpointFormat, file: Path) -> Sidecar:
    """diffusers config.json beside `diffusion_pytorch_model*`, or the cldm .yaml beside an LDM file."""
    if fmt is CheckpointFormat.DIFFUSERS or fmt is CheckpointFormat.UNION:
        named = file.name.startswith("diffusion_pytorch_model")
        return Sidecar(read_config_json(file.parent / km.DIFFUSERS_CONFIG_NAME) if named else {}, {})
    yaml_path = file.with_suffix(".yaml")
    if not yaml_path.is_file():
        return Sidecar({}, {})
    import yaml

    try:
        params: Any = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        for key in km.YAML_CONTROL_PARAMS:
            params = params[key]
        if not isinstance(params, dict):
            raise TypeError(f"control_stage_config.params is a {type(params).__name__}")
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ValueError(f"{yaml_path} is not a cldm config ({type(exc).__name__}: {exc}); fix or remove it "
                         "(it must have model.params.control_stage_config.params)") from None
    return Sidecar({}, params)


# ---- plans: which tensor each ControlNet key gets, before anything is read ---------------------------------
def _plan(fmt: CheckpointFormat, weights: WeightFile, names: dict[str, str], base: dict[str, torch.Tensor] | None,
          sidecar: Sidecar) -> Plan:
    if fmt is CheckpointFormat.UNION:
        return _plan_union(weights, names)
    if fmt is CheckpointFormat.DIFFUSERS:
        plan = _renamed(weights, names, invert(ldm_diffusers_rules(diffusers_layout(names))))
        return _apply_fixes(plan, km.BGR_HINT_FIXES) if is_bgr(sidecar.diffusers) else plan
    plan = _renamed(weights, names, *km.LDM_LAYOUTS[fmt.value])
    if fmt is CheckpointFormat.DIFF:
        return _plan_diff(plan, base or {}, weights.path)
    if fmt is CheckpointFormat.CONTROL_LORA:
        return _plan_control_lora(plan, base or {}, weights.path)
    return plan


def _plan_union(weights: WeightFile, names: dict[str, str]) -> Plan:
    """Union: the ControlNet part diffusers-keyed (as released) or bare LDM (our native save); the Union modules
    keep their names (keymaps.UNION_EXTRA_RULES)."""
    body: Rules = (invert(ldm_diffusers_rules(diffusers_layout(names))) if km.DIFFUSERS_MARKER in names
                   else list(km.LDM_BARE_RULES))
    extras = set(apply_rules(names, km.UNION_EXTRA_RULES)[0])
    plan = _renamed(weights, {k: v for k, v in names.items() if k not in extras}, body)
    plan.update(_renamed(weights, {k: v for k, v in names.items() if k in extras}, km.UNION_EXTRA_RULES))
    return plan


def _union_config(config: ControlNetConfig, plan: Plan, sidecar: Sidecar) -> ControlNetConfig:
    """The Union modules' sizes from the tensors (task_embedding rows = types); heads from config.json or 8."""
    try:
        types = plan["task_embedding"].meta.shape[0]
        type_dim = plan["control_add_embedding.linear_1.weight"].meta.shape[1] // types
    except KeyError as exc:
        raise KeyError(f"Union file lacks {exc}; it is incomplete: fetch it again") from None
    heads = sidecar.diffusers.get("num_trans_head", UnionConfig.heads)
    if config.adm_in_channels is not None and "addition_time_embed_dim" not in config.extra:
        # diffusers' Union uses one width for both sinusoids: the type one is in the tensors, the size one is not
        config = config.replace(extra={**config.extra, "addition_time_embed_dim": type_dim})
    return UnionConfig(num_control_types=types, type_embed_dim=type_dim, heads=int(heads),
                       layers=_count(plan, "transformer_layes.{n}.ln_1.weight")).attach(config)


def _renamed(weights: WeightFile, names: dict[str, str], rules: Rules, other_prefixes: tuple[str, ...] = (),
             other_keys: tuple[str, ...] = ()) -> Plan:
    """Rename by `rules`, leaving out the file's other contents; a key left unplaced is an error."""
    kept = {k: v for k, v in names.items() if not (k.startswith(other_prefixes) or k in other_keys)}
    converted, unmatched = apply_rules(kept, rules)
    if unmatched:
        raise KeyError(f"{weights.path}: {len(unmatched)} keys have no place in the detected layout, e.g. "
                       f"{sorted(unmatched)[:10]}; the file mixes layouts or is not a plain ControlNet")
    return {target: _from_file(weights, key) for target, key in converted.items()}


def _from_file(weights: WeightFile, key: str) -> Source:
    return Source(weights.shapes[key], functools.partial(weights.load, key))


FIXES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flip_input_channels": lambda t: t.flip(1),  # BGR hint -> RGB: the first conv reads its inputs reversed
}


def _apply_fixes(plan: Plan, fixes: Sequence[tuple[str, str]]) -> Plan:
    fixed = dict(plan)
    for key, name in fixes:
        fixed[key] = Source(plan[key].meta, functools.partial(_fixed, plan[key].load, FIXES[name]))
    return fixed


def _fixed(load: Callable[[], torch.Tensor], fix: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return fix(load())


def _plan_diff(stored: Plan, base: dict[str, torch.Tensor], file: Path) -> Plan:
    """Diff ControlNet: weight = stored delta + base twin, for keys whose module the U-Net has (§2.4)."""
    plan: Plan = {}
    for key, src in stored.items():
        if not key.startswith(tuple(control for control, _ in km.INIT_FROM_UNET_PREFIXES)):
            plan[key] = src  # condition encoder and zero convs are stored whole
            continue
        if key not in base:
            raise KeyError(f"{file} holds a delta for {key} but the base model has no such weight; give the "
                           "base model the diff was made for")
        if src.meta.shape != base[key].shape:
            raise ValueError(f"{file}: {key} is {tuple(src.meta.shape)} in the file but {tuple(base[key].shape)} in "
                             "the base model; the file was made for another model family: give the base model it "
                             "was made for")
        plan[key] = Source(src.meta, functools.partial(_add_base, src.load, base[key]))
    return plan


def _plan_control_lora(stored: Plan, base: dict[str, torch.Tensor], file: Path) -> Plan:
    """Control-LoRA: weight = base + up @ down for factored weights; the rest stored whole (§2.5)."""
    ups = {k[: -len(km.CONTROL_LORA_UP)] for k in stored if k.endswith(km.CONTROL_LORA_UP)}
    downs = {k[: -len(km.CONTROL_LORA_DOWN)] for k in stored if k.endswith(km.CONTROL_LORA_DOWN)}
    if ups != downs:
        raise KeyError(f"{file}: Control-LoRA factors without their pair: {sorted(ups ^ downs)[:10]}; the file is "
                       "incomplete: fetch it again")
    plan = {k: v for k, v in stored.items() if not k.endswith((km.CONTROL_LORA_UP, km.CONTROL_LORA_DOWN))}
    for module in sorted(ups):
        key = module + ".weight"
        if key in plan:
            whole = plan[key]
        elif key in base:
            whole = _held(base[key])
        else:
            raise KeyError(f"{file}: Control-LoRA factors {module}.up/.down have no base weight {key}; give the "
                           "base model the Control-LoRA was made for")
        up, down = stored[module + km.CONTROL_LORA_UP], stored[module + km.CONTROL_LORA_DOWN]
        rank, shape = down.meta.shape[0], whole.meta.shape
        if up.meta.shape[0] != shape[0] or up.meta[0].numel() != rank or down.meta[0].numel() != whole.meta[0].numel():
            raise ValueError(f"{file}: Control-LoRA factors of {module} ({tuple(up.meta.shape)} @ "
                             f"{tuple(down.meta.shape)}) cannot make its weight {tuple(shape)}; give the base model "
                             "the Control-LoRA was made for")
        plan[key] = Source(whole.meta, functools.partial(_add_low_rank, whole.load, up.load, down.load))
    return plan


def _fill_from_base(plan: Plan, config: ControlNetConfig, base: dict[str, torch.Tensor]) -> Plan:
    """Keys a relative file omits (unchanged from the base: deltas ~0, norms) are the base's (§2.4-2.5)."""
    filled = dict(plan)
    for key in expected_state(config):
        if key not in filled and key in base:
            filled[key] = _held(base[key])
    return filled


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, device="meta")


def _held(tensor: torch.Tensor) -> Source:
    """A tensor already in memory (the base U-Net's) as a plan entry."""
    return Source(_meta(tensor), constant(tensor))


def _add_base(load: Callable[[], torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Delta + base in fp32, on the base's device."""
    return load().to(device=base.device, dtype=torch.float32) + base.float()


def _add_low_rank(load_whole: Callable[[], torch.Tensor], load_up: Callable[[], torch.Tensor],
                  load_down: Callable[[], torch.Tensor]) -> torch.Tensor:
    """whole + up @ down in fp32: (out, rank) @ (rank, in * kh * kw), reshaped to the weight."""
    whole = load_whole().float()
    up, down = (load().to(device=whole.device, dtype=torch.float32).flatten(1) for load in (load_up, load_down))
    return whole + (up @ down).reshape(whole.shape)


# ---- architecture and building ------------------------------------------------------------------------------
def _resolve_config(weights: WeightFile, plan: Plan, base: dict[str, torch.Tensor] | None,
                    base_unet: Any, sidecar: Sidecar, path: Path) -> ControlNetConfig:
    """Native metadata first; else the shapes, with what sidecars and the base model add."""
    stored = weights.metadata.get(PREFIX + "config")
    if stored:
        try:
            return ControlNetConfig.from_json(stored)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{weights.path}: its zeroconv_config metadata is invalid ({exc}); re-save the "
                             "file with save_controlnet") from None
    shapes = {k: _meta(v) for k, v in (base or {}).items()}
    shapes.update({k: s.meta for k, s in plan.items()})
    try:
        config = infer_config(shapes)
    except (KeyError, IndexError) as exc:
        raise KeyError(f"{weights.path}: {exc}; the file lacks part of a ControlNet") from None
    if "task_embedding" in plan:
        config = _union_config(config, plan, sidecar)
    config = config.replace(**config_changes(sidecar.diffusers, config, weights.path))
    config = config.replace(**_heads_from(sidecar.cldm or (_base_heads(base_unet) if base is not None else {})))
    if km.YAML_POOLING_FIELD in sidecar.cldm:
        config = config.replace(global_average_pooling=bool(sidecar.cldm[km.YAML_POOLING_FIELD]))
    if Path(path).stem.lower().endswith(km.SHUFFLE_NAME_SUFFIXES):
        config = config.replace(global_average_pooling=True)
    return config


def _base_heads(base_unet: Any) -> dict[str, Any]:
    """Head layout of the base model: our UNetModel's config, or an LDM U-Net's num_heads/num_head_channels."""
    cfg = getattr(base_unet, "config", None)
    if isinstance(cfg, ControlNetConfig):
        return {"num_heads": cfg.num_heads, "num_head_channels": cfg.num_head_channels}
    return {k: getattr(base_unet, k) for k in km.YAML_HEAD_FIELDS if isinstance(getattr(base_unet, k, None), int)}


def _heads_from(params: Mapping[str, Any]) -> dict[str, int]:
    """num_heads / num_head_channels from an LDM-style parameter set; a fixed head width wins (cldm)."""
    width, count = params.get("num_head_channels", -1), params.get("num_heads", -1)
    if isinstance(width, int) and width > 0:
        return {"num_heads": -1, "num_head_channels": width}
    if isinstance(count, int) and count > 0:
        return {"num_heads": count, "num_head_channels": -1}
    return {}


def _file_dtype(weights: WeightFile) -> torch.dtype:
    """The floating dtype holding most of the file's elements."""
    counts: Counter[torch.dtype] = Counter()
    for meta in weights.shapes.values():
        if meta.is_floating_point():
            counts[meta.dtype] += meta.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def network_class(config: ControlNetConfig) -> type[ControlNet]:
    """UnionControlNet for a config carrying a Union description, else the plain ControlNet."""
    return UnionControlNet if is_union_config(config) else ControlNet


def expected_state(config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """The state dict a ControlNet of this config has, on the meta device (names, shapes, dtypes only)."""
    union = config.extra.get("union") if is_union_config(config) else None
    return _expected_state(config, None if union is None else tuple(sorted(union.items())))


@functools.lru_cache(maxsize=16)
def _expected_state(config: ControlNetConfig, union: tuple | None) -> dict[str, torch.Tensor]:
    # `union` is in the key because ControlNetConfig's hash and == leave `extra` out
    return dict(skeleton(lambda: network_class(config)(config)).state_dict())


def check_fits(shapes: Mapping[str, torch.Tensor], config: ControlNetConfig, what: str) -> dict[str, torch.Tensor]:
    """Strict check of names and shapes against the architecture: KeyError / ValueError naming what is off."""
    expected = expected_state(config)
    check_names_and_shapes(shapes, expected, what, config.family)
    return expected


def check_names_and_shapes(shapes: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
                           architecture: str) -> None:
    """Every expected key present with its shape, nothing else (KeyError / ValueError naming what is off)."""
    unexpected, missing = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
    if unexpected or missing:
        raise KeyError(f"{what} does not match the {architecture} architecture: {len(unexpected)} unexpected keys "
                       f"{unexpected[:10]}, {len(missing)} missing keys {missing[:10]}; it is incomplete or not a "
                       "model of this kind")
    wrong = [f"{k} {tuple(shapes[k].shape)} != {tuple(t.shape)}" for k, t in expected.items()
             if shapes[k].shape != t.shape]
    if wrong:
        raise ValueError(f"{what}: {len(wrong)} tensors have the wrong shape for {architecture}, e.g. {wrong[:5]}")


def _build(config: ControlNetConfig, plan: Plan, file: Path, dtype: torch.dtype, device: torch.device,
           self_contained: bool = True) -> ControlNet:
    """Check every key and shape, then read the tensors one at a time into `dtype` on `device` (strict); refuse
    NaN/inf weights (a file without a base model is checked once per dtype, then remembered)."""
    model = skeleton(lambda: network_class(config)(config))
    expected = model.state_dict()
    check_names_and_shapes({k: s.meta for k, s in plan.items()}, expected, str(file), config.family)
    tensors = {key: plan[key].load().to(device=device, dtype=dtype) for key in expected}  # one at a time
    check_finite(tensors, file, dtype, self_contained)  # after the cast, on the device: fp32 -> fp16 overflow too
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _describe(weights: WeightFile, config: ControlNetConfig, fmt: CheckpointFormat, path: Path) -> ControlNetMetadata:
    """The file's own metadata, completed from the config and the file name for third-party files."""
    stored = ControlNetMetadata.from_strings(weights.metadata)
    return stored.replace(family=stored.family or config.family,
                          control_type=stored.control_type or control_type_from_name(path),
                          config=config.to_json(), global_average_pooling=config.global_average_pooling,
                          provenance=stored.provenance or f"{fmt.value} checkpoint {path.name}")


# ---- writing ----------------------------------------------------------------------------------------------
def save_controlnet(model_or_state: ControlNet | Mapping[str, torch.Tensor], path: str | Path,
                    metadata: ControlNetMetadata | None = None, *, config: ControlNetConfig | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write our native format atomically: bare LDM keys (what ComfyUI core and A1111/Forge load) + metadata.

    A state dict needs its config: `config=`, metadata.config, or else it is inferred from the shapes.
    """
    path = Path(path)
    meta = metadata or ControlNetMetadata()
    state, config = _state_and_config(model_or_state, config, meta)
    config = config.replace(global_average_pooling=config.global_average_pooling or meta.global_average_pooling)
    state = {k: _detached(v, dtype) for k, v in state.items()}
    check_fits(state, config, f"the state dict to write to {path}")
    meta = meta.replace(family=meta.family or config.family, config=config.to_json(), content_hash=content_hash(state),
                        global_average_pooling=config.global_average_pooling, saved_as=path.name,
                        provenance=meta.provenance or "zeroconv save_controlnet")
    strings = {**meta.to_strings(), "format": "pt", PREFIX + "format": "ldm", PREFIX + "format_version": FORMAT_VERSION}
    if is_union_config(config):
        strings[PREFIX + "network"] = "union"  # bare LDM keys + the Union modules under their own names
    return atomic_save_safetensors(state, path, strings)


def _state_and_config(model_or_state: ControlNet | Mapping[str, torch.Tensor], config: ControlNetConfig | None,
                      meta: ControlNetMetadata) -> tuple[Mapping[str, torch.Tensor], ControlNetConfig]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict(), config or model_or_state.config
    if config is None:
        config = ControlNetConfig.from_json(meta.config) if meta.config else infer_config(model_or_state)
    return model_or_state, config


def _detached(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()


def export_diffusers(model: ControlNet, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers' from_pretrained loads (a Union
    as ControlNetUnionModel: the layout of the released files, which ComfyUI core's loader also reads)."""
    folder = Path(folder)
    state = {k: _detached(v, dtype) for k, v in model.state_dict().items()}
    rules = ldm_diffusers_rules(layout_of(model.config))
    config = diffusers_config(model.config)  # raises before anything is written
    if isinstance(model, UnionControlNet):  # ControlNetUnionModel: the Union modules keep their names
        rules += list(km.UNION_EXTRA_RULES)
        config = union_diffusers_config(config, model.union, model.config)
    converted, unmatched = apply_rules(state, rules)
    if unmatched:
        raise KeyError(f"{len(unmatched)} keys have no diffusers name, e.g. {unmatched[:8]}")
    config_text = json.dumps(config, indent=2)
    atomic_save_safetensors(converted, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    atomic_write_text(folder / km.DIFFUSERS_CONFIG_NAME, config_text)
    return folder


def read_metadata(path: str | Path) -> ControlNetMetadata:
    """What a file's safetensors metadata says (empty for pickles and third-party files); reads no tensors."""
    return ControlNetMetadata.from_strings(open_weights(path).metadata)


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime: float, size: int, dtype: torch.dtype | None) -> "LoadedControlNet | LoadedAdapter":
    return load_control(path, dtype=dtype)


def load_control_cached(path: str | Path, dtype: torch.dtype | None = None) -> "LoadedControlNet | LoadedAdapter":
    """load_control (a ControlNet, plain or Union, or a T2I-Adapter), reused while the file is unchanged (same
    path, mtime and size)."""
    stat = Path(path).stat()
    return _cached(str(Path(path).resolve()), stat.st_mtime, stat.st_size, dtype)


# ---- T2I-Adapters -----------------------------------------------------------------------------------------
@dataclass
class LoadedAdapter:
    """A loaded T2I-Adapter with what is known about it."""

    model: T2IAdapter
    config: AdapterConfig
    format: CheckpointFormat
    layout: str  # "original" (TencentARC) or "diffusers"
    path: Path


def load_t2i_adapter(path: str | Path, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> LoadedAdapter:
    """Load a T2I-Adapter strictly: TencentARC's layout (.pth read weights-only, or .safetensors) or diffusers'
    (folder with config.json, or a lone file), full SD1.x, light (colour) and SDXL adapters."""
    path = Path(path)
    weights, names, fmt = _open_detected(path)
    if fmt is not CheckpointFormat.T2I_ADAPTER:
        raise ValueError(f"{weights.path} is a ControlNet ({fmt.value}), not a T2I-Adapter: load it with "
                         "load_controlnet (or load_control, which takes either kind)")
    diffusers = any(k.startswith(km.T2I_DIFFUSERS_PREFIX) for k in names)
    raw = read_config_json(weights.path.parent / km.DIFFUSERS_CONFIG_NAME) if (
        diffusers and weights.path.name.startswith("diffusion_pytorch_model")) else {}
    renamed = _t2i_original_names(names, weights.path) if diffusers else names
    plan = _renamed(weights, renamed, km.T2I_ORIGINAL_RULES)
    config = _t2i_config({k: s.meta for k, s in plan.items()}, raw, weights.path)
    model = skeleton(lambda: T2IAdapter(config))
    expected = model.state_dict()
    check_names_and_shapes({k: s.meta for k, s in plan.items()}, expected, str(weights.path),
                           f"{config.kind.value} T2I-Adapter")
    target_dtype = dtype or _file_dtype(weights)
    tensors = {k: plan[k].load().to(device=device, dtype=target_dtype) for k in expected}
    model.load_state_dict(tensors, strict=True, assign=True)
    logger.info("loaded %s (T2I-Adapter %s)", path.name, config.kind.value)
    return LoadedAdapter(model.eval(), config, fmt, "diffusers" if diffusers else "original", path)


def t2i_diffusers_rules(names: Iterable[str]) -> list[tuple[str, str]]:
    """keymaps.T2I_DIFFUSERS_*_RULES expanded over the levels and blocks a diffusers-named adapter has."""
    present = set(names)
    light = "adapter." + km.T2I_LIGHT_MARKER in present
    levels, per = _count(present, km.T2I_DIFFUSERS_LEVEL_KEY), _count(present, km.T2I_DIFFUSERS_RES_KEY)
    ranges: dict[str, list[dict[str, int]]] = {
        "": [{}], "levels": [{"i": i, "n": i * per} for i in range(levels)],
        "blocks": [{"i": i, "j": j, "n": i * per + j} for i in range(levels) for j in range(per)],
    }
    table = km.T2I_DIFFUSERS_LIGHT_RULES if light else km.T2I_DIFFUSERS_FULL_RULES
    return [(src.format(**v), dst.format(**v)) for src, dst, name in table for v in ranges[name]]


def _t2i_original_names(names: dict[str, str], file: Path) -> dict[str, str]:
    converted, unmatched = apply_rules(names, t2i_diffusers_rules(names))
    if unmatched:
        raise KeyError(f"{file}: {len(unmatched)} keys have no place in diffusers' T2I-Adapter layout, e.g. "
                       f"{sorted(unmatched)[:10]}; the file mixes layouts")
    return converted


def _t2i_config(shapes: Mapping[str, torch.Tensor], raw: Mapping[str, Any], file: Path) -> AdapterConfig:
    """Architecture from TencentARC-named shapes; config.json (diffusers) names the kind where it exists."""
    if km.T2I_LIGHT_MARKER in shapes:
        levels = _count(shapes, km.T2I_LIGHT_LEVEL_KEY)
        cin = shapes["body.0.in_conv.weight"].shape[1]
        return AdapterConfig(AdapterKind.LIGHT, in_channels=cin // 64, num_res_blocks=_count(shapes, km.T2I_LIGHT_RES_KEY),
                             channels=tuple(shapes[f"body.{i}.out_conv.weight"].shape[0] for i in range(levels)))
    if "conv_in.weight" not in shapes:
        raise KeyError(f"{file}: a full T2I-Adapter needs conv_in.weight; the file is incomplete")
    cin = shapes["conv_in.weight"].shape[1]
    kind = AdapterKind(raw["adapter_type"]) if raw.get("adapter_type") else (
        AdapterKind.FULL_XL if cin in km.T2I_XL_CONV_IN_WIDTHS else AdapterKind.FULL)
    per = int(raw.get("num_res_blocks") or km.T2I_FULL_RES_BLOCKS)
    blocks = _count(shapes, km.T2I_FULL_BLOCK_KEY)
    if blocks == 0 or blocks % per:
        raise ValueError(f"{file}: {blocks} adapter blocks do not split into levels of {per}; give the adapter's "
                         "config.json beside it (num_res_blocks)")
    unshuffle = 16 if kind is AdapterKind.FULL_XL else 8
    return AdapterConfig(kind, in_channels=cin // unshuffle ** 2, num_res_blocks=per,
                         channels=tuple(shapes[f"body.{i * per}.block1.weight"].shape[0] for i in range(blocks // per)),
                         kernel_size=shapes["body.0.block2.weight"].shape[2],
                         conv_downsample=any(k.endswith(km.T2I_DOWN_CONV_SUFFIX) for k in shapes))


def load_control(path: str | Path, **kwargs: Any) -> LoadedControlNet | LoadedAdapter:
    """A ControlNet (plain or Union) or a T2I-Adapter, whichever the file is (kwargs as load_controlnet)."""
    if _open_detected(Path(path))[2] is CheckpointFormat.T2I_ADAPTER:
        return load_t2i_adapter(path, dtype=kwargs.get("dtype"), device=kwargs.get("device", "cpu"))
    return load_controlnet(path, **kwargs)
