"""Reading and writing ControlNet checkpoints (controlnet-formats.md §2).

This build loads the LDM layouts (v1.0 `control_model.`-prefixed files with or without the whole SD model,
Lightning `state_dict` nesting, pruned community files, v1.1 bare-key files), diffusers folders and single files,
and our own native files; it recognises the other kinds (diff, Control-LoRA, Union, T2I-Adapter) with a clear
error.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import diffusers_format
from .config import FAMILY_BY_CONTEXT_DIM, ControlNetConfig
from .from_unet import unet_twin, unet_twin_inverse
from .keymaps import FORMAT_MARKERS, LDM_CONTROL_PREFIX, WRAPPER_PREFIXES
from .network import ControlNet


class CheckpointFormat(str, Enum):
    LDM_PREFIXED = "ldm_prefixed"
    LDM = "ldm"
    DIFFUSERS = "diffusers"
    DIFF = "diff"
    CONTROL_LORA = "control_lora"
    UNION = "union"
    T2I_ADAPTER = "t2i_adapter"


LOADABLE = {CheckpointFormat.LDM_PREFIXED, CheckpointFormat.LDM, CheckpointFormat.DIFFUSERS, CheckpointFormat.DIFF,
            CheckpointFormat.CONTROL_LORA}
NEEDS_BASE = {CheckpointFormat.DIFF, CheckpointFormat.CONTROL_LORA}
UNSUPPORTED_ADVICE = {
    CheckpointFormat.UNION: "Union/ControlNet++ models are not supported yet; use ComfyUI's loader with SetUnionControlNetType",
    CheckpointFormat.T2I_ADAPTER: "T2I-Adapters are not ControlNets and are not supported yet; use ComfyUI's loader",
}


@dataclass(frozen=True)
class ControlNetMetadata:
    """What a native file says about itself (stored as safetensors string metadata)."""

    family: str = ""
    control_type: str = ""  # e.g. "canny", "depth", "openpose"
    annotator: str = ""  # annotator that makes this model's condition
    resolution: int = 0  # training resolution in pixels
    provenance: str = ""  # who or what made the file
    content_hash: str = ""  # sha256 of the tensors, order-independent of the file layout
    extra: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        out = {f"zeroconv_{k}": str(v) for k, v in self.__dict__.items() if k != "extra" and v not in ("", 0)}
        out.update({f"zeroconv_x_{k}": v for k, v in self.extra.items()})
        return out

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> "ControlNetMetadata":
        known = {k: meta[f"zeroconv_{k}"] for k in ("family", "control_type", "annotator", "provenance",
                                                     "content_hash") if f"zeroconv_{k}" in meta}
        extra = {k[len("zeroconv_x_"):]: v for k, v in meta.items() if k.startswith("zeroconv_x_")}
        return cls(resolution=int(meta.get("zeroconv_resolution", 0) or 0), extra=extra, **known)


@dataclass
class LoadedControlNet:
    model: ControlNet
    config: ControlNetConfig
    format: CheckpointFormat
    metadata: ControlNetMetadata
    path: Path


# ---- reading -------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a file; pickles only through torch.load(weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        path = diffusers_format.weight_file_in(path)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet file {path} does not exist; put it in ComfyUI's models/controlnet folder")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); the download or copy failed, fetch the file again")
    if path.suffix in (".safetensors", ".sft"):
        return _read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} needs arbitrary code to load and was refused ({str(exc).splitlines()[0]}); "
                         "only load pickles you trust, converted to .safetensors") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable checkpoint ({exc}); it may be truncated: fetch it again") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors; it is not a ControlNet checkpoint")
    return loaded, {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file ({exc}); it may be truncated or corrupt: "
                         "fetch it again") from None


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_format(keys: Any) -> CheckpointFormat:
    """The format whose marker keys are all present (table in keymaps.FORMAT_MARKERS)."""
    present = set(keys)
    for name, markers in FORMAT_MARKERS:
        if all(m in present for m in markers):
            return CheckpointFormat(name)
    looked = "; ".join(f"{name}: {', '.join(m)}" for name, m in FORMAT_MARKERS)
    raise ValueError(f"unknown checkpoint layout: none of the marker keys were found (looked for {looked})")


def _count(state: Mapping[str, Any], template: str) -> int:
    n = 0
    while template.format(n) in state:
        n += 1
    return n


def infer_config(state: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """Architecture from LDM key names and shapes (controlnet-formats.md §2.2)."""
    mc, in_ch = state["input_blocks.0.0.weight"].shape[:2]
    n_in = _count(state, "zero_convs.{}.0.weight")  # one zero conv per input block
    downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in state]
    levels = len(downs) + 1
    res = (n_in - 1 - len(downs)) // levels
    mult, depth, context_dim, linear = [], [], None, False
    for level in range(levels):
        first = 1 + level * (res + 1)
        mult.append(state[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] // mc)
        depth.append(_attention_depth(state, f"input_blocks.{first}.1."))
    middle = _attention_depth(state, "middle_block.1.")
    for key, t in state.items():
        if key.endswith("attn2.to_k.weight"):
            context_dim = t.shape[1]
        if key.endswith("proj_in.weight"):
            linear = t.ndim == 2
    adm = state["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in state else None
    if context_dim is None:  # no cross-attention at all (SDXL "small"): the ADM embedding tells the family
        context_dim, linear = (2048, True) if adm else (768, False)
    sd1_heads = not linear and context_dim == 768
    hint = [state[f"input_hint_block.{i}.weight"].shape[0] for i in (0, 4, 8, 12)]
    return ControlNetConfig(
        family=FAMILY_BY_CONTEXT_DIM.get(context_dim, f"custom (context {context_dim})"), model_channels=mc,
        channel_mult=tuple(mult), num_res_blocks=res, transformer_depth=tuple(depth), transformer_depth_middle=middle,
        context_dim=context_dim, num_heads=8 if sd1_heads else -1, num_head_channels=-1 if sd1_heads else min(64, mc),
        use_linear_in_transformer=linear, adm_in_channels=adm, in_channels=in_ch,
        hint_channels=state["input_hint_block.0.weight"].shape[1], hint_block_channels=tuple(hint))


def _attention_depth(state: Mapping[str, Any], prefix: str) -> int | None:
    if f"{prefix}proj_in.weight" not in state:
        return None
    return _count(state, prefix + "transformer_blocks.{}.norm1.weight")


def load_controlnet(path: str | Path, *, base_unet: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LoadedControlNet:
    """Load a ControlNet file strictly into our ControlNet, in the dtype and on the device asked for.

    Args:
        path: a weight file, or a diffusers folder.
        base_unet: the LDM-layout U-Net (module or state dict) that diff and Control-LoRA files are relative to.
        dtype: dtype of the loaded weights (default: the file's).
        device: where the model is placed.
    """
    path = Path(path)
    state, meta = read_state_dict(path)
    state = _strip_wrappers(state)
    fmt = detect_format(state)
    if fmt not in LOADABLE:
        raise ValueError(f"{path} is a {fmt.value} checkpoint: {UNSUPPORTED_ADVICE[fmt]}")
    if fmt in NEEDS_BASE:
        if base_unet is None:
            raise ValueError(f"{path} is a {fmt.value} ControlNet stored relative to its base model; give the base "
                             "model (in ComfyUI connect a MODEL to the loader's model input)")
        base = base_unet.state_dict() if isinstance(base_unet, nn.Module) else base_unet
        state = merge_with_base(state, base, fmt, path)
    elif fmt is CheckpointFormat.LDM_PREFIXED:
        state = {k[len(LDM_CONTROL_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_CONTROL_PREFIX)}
    if fmt is CheckpointFormat.DIFFUSERS:
        state = diffusers_format.diffusers_to_ldm(state, path)
    config = ControlNetConfig.from_json(meta["zeroconv_config"]) if "zeroconv_config" in meta else infer_config(state)
    if fmt is CheckpointFormat.DIFFUSERS:
        config = _apply_diffusers_config(config, path)
    config = config.replace(global_average_pooling=config.global_average_pooling or _is_shuffle(path))
    with torch.device("meta"):
        model = ControlNet(config)
    _load_strict(model, state, path, dtype)
    return LoadedControlNet(model.to(device).eval(), config, fmt, ControlNetMetadata.from_strings(meta), path)


def merge_with_base(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], fmt: CheckpointFormat,
                    path: Path) -> dict[str, torch.Tensor]:
    """Absolute ControlNet weights from a diff (delta + base) or Control-LoRA (base + up @ down) file (§2.4-2.5)."""
    if fmt is CheckpointFormat.DIFF:
        state = {k[len(LDM_CONTROL_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_CONTROL_PREFIX)}
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "lora_controlnet" or (fmt is CheckpointFormat.CONTROL_LORA and key.endswith((".up", ".down"))):
            continue
        twin = unet_twin(key)
        add_base = fmt is CheckpointFormat.DIFF and twin in base
        merged[key] = tensor.float() + base[twin].float() if add_base else tensor
    for key in [k[:-3] for k in state if k.endswith(".up")]:
        weight, twin = key + ".weight", unet_twin(key + ".weight")
        if twin not in base:
            raise KeyError(f"{path}: Control-LoRA factor {key} has no base weight {twin}; is this the right base model?")
        up, down = state[key + ".up"].float(), state[key + ".down"].float()
        merged[weight] = base[twin].float() + (up.flatten(1) @ down.flatten(1)).reshape(base[twin].shape)
    from_base = {name: v for k, v in base.items() if (name := unet_twin_inverse(k)) is not None}
    with torch.device("meta"):
        template = ControlNet(infer_config({**from_base, **merged}))
    for key in template.state_dict():  # what the file omits comes from the base (unchanged weights, norms)
        if key not in merged and unet_twin(key) in base:
            merged[key] = base[unet_twin(key)]
    return merged


def _apply_diffusers_config(config: ControlNetConfig, path: Path) -> ControlNetConfig:
    """Heads and pooling are not in the weights: read them from the config.json beside the file."""
    raw = diffusers_format.read_config_json(path.parent if path.is_file() else path)
    if not raw:
        return config
    heads = diffusers_format.heads_from_config(raw, list(config.channel_widths))
    return config.replace(global_average_pooling=bool(raw.get("global_pool_conditions", False)), **heads)


def export_diffusers(model: ControlNet, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers' from_pretrained loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
    converted = diffusers_format.ldm_to_diffusers(state, model.config)
    _atomic_safetensors(converted, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    config_text = json.dumps(diffusers_format.diffusers_config(model.config), indent=2)
    _atomic_write_bytes(folder / "config.json", config_text.encode())
    return folder


def _is_shuffle(path: Path) -> bool:
    """Shuffle models need global average pooling; it is not in the weights, so read the yaml or the name."""
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.exists() and "global_average_pooling: true" in yaml_path.read_text().lower():
        return True
    return path.stem.endswith(("_shuffle", "_shuffle_fp16"))


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    expected = model.state_dict()
    unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unexpected or missing:
        raise KeyError(f"{path} does not match the inferred architecture: unexpected keys {unexpected[:10]} "
                       f"({len(unexpected)} in all), missing keys {missing[:10]} ({len(missing)} in all)")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key} contains NaN or infinite values; the file is damaged")
    target = dtype or next(iter(state.values())).dtype
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)


# ---- writing -------------------------------------------------------------------------------------------
def content_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted key names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_controlnet(model: ControlNet, path: str | Path, metadata: ControlNetMetadata | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write our native format: bare LDM keys (what ComfyUI and A1111 load) plus descriptive metadata; atomic."""
    path = Path(path)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = metadata or ControlNetMetadata()
    strings = {**meta.to_strings(), "zeroconv_family": meta.family or model.config.family,
               "zeroconv_saved_as": path.name,
               "zeroconv_config": model.config.to_json(), "zeroconv_content_hash": content_hash(state),
               "zeroconv_format": "ldm"}
    _atomic_safetensors(state, path, strings)
    return path


def _atomic(path: Path, write: Any) -> None:
    """write(tmp_path) into a temp file beside `path`, fsync, then rename over it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    import safetensors.torch

    _atomic(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=metadata))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def read_metadata(path: str | Path) -> ControlNetMetadata:
    """The metadata of a native file without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return ControlNetMetadata.from_strings(f.metadata() or {})



@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime: float, size: int, dtype: torch.dtype | None) -> LoadedControlNet:
    return load_controlnet(path, dtype=dtype)


def load_controlnet_cached(path: str | Path, dtype: torch.dtype | None = None) -> LoadedControlNet:
    """load_controlnet, reused while the file is unchanged (same path, mtime and size)."""
    stat = Path(path).stat()
    return _cached(str(Path(path).resolve()), stat.st_mtime, stat.st_size, dtype)
