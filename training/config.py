"""Every knob of a training run, as one frozen dataclass read from TOML or YAML (nanoGPT GPTConfig style).

Defaults follow the paper (Zhang et al. 2023 §3.3-3.4, §4) and the released code (cldm, tutorial_train.py):
AdamW at 1e-5, 50 % empty captions, DDIM 20 steps with CFG 9 and the paper's default prompt for validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class MixedPrecision(str, Enum):
    NO = "no"  # everything fp32
    FP16 = "fp16"  # fp16 autocast with a gradient scaler; frozen base stored in fp16
    BF16 = "bf16"  # bf16 autocast; frozen base stored in bf16


class TrainMode(str, Enum):
    STANDARD = "standard"  # every residual connected from step 0 (paper default)
    SMALL_SCALE = "small_scale"  # middle block only, decoder links reconnected later (paper §3.4)
    LARGE_SCALE = "large_scale"  # locked base unlocked after `unlock_base_after` steps (paper §3.4)


class Crop(str, Enum):
    CENTER = "center"  # shorter side resized to the resolution, centre square kept (diffusers)
    RANDOM = "random"  # shorter side resized to the resolution, a random square kept


class Parallelism(str, Enum):
    DDP = "ddp"  # DistributedDataParallel: every process holds the whole ControlNet
    FSDP = "fsdp"  # fully sharded ControlNet weights, gradients and optimiser state (for SDXL)


# Names other trainers use for our fields (diffusers train_controlnet.py flags), for the unknown-key error.
ALIASES = {"learning_rate": "lr", "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "max_train_steps": "max_steps", "proportion_empty_prompts": "caption_dropout",
           "checkpointing_steps": "save_every", "validation_steps": "validate_every",
           "pretrained_model_name_or_path": "base", "controlnet_model_name_or_path": "controlnet_init",
           "train_data_dir": "data", "guidance_scale": "cfg_scale", "validation_prompt": "validation_prompts",
           "validation_image": "validation_conditions", "use_ema": "ema_decay"}

SEED_STRIDE = 1_000_003  # the step's generator is seeded seed * SEED_STRIDE + step (loop.draw_step)
PAPER_DEFAULT_PROMPT = "a professional, detailed, high-quality image"  # Zhang et al. 2023 §4.1


@dataclass(frozen=True)
class TrainConfig:
    """One ControlNet training run: locked base, data, optimiser, schedule of saves and validations."""

    base: str = ""  # locked base model file: SD1.x/SD2.x/SDXL single file, or a ZeroConv world base
    controlnet_init: str = ""  # ControlNet file to start from; "" = fresh copy of the base's encoder
    data: str = ""  # training data: a folder (image/, condition/, captions) or a .jsonl of rows
    control_type: str = ""  # what the ControlNet controls ("canny", "scribble", "depth", ...); stored in the file
    annotator: str = ""  # annotator that makes conditions from the images on the fly; "" = conditions given
    prediction_type: str = "auto"  # "auto" (from the base), "epsilon" or "v_prediction" (SD2.x 768-v)
    resolution: int = 512  # training resolution in pixels (square, multiple of 8)
    crop: Crop = Crop.CENTER  # "center" or "random" crop after resizing the shorter side
    batch_size: int = 4  # samples per process per micro-step (global batch = this x grad_accum x processes)
    grad_accum: int = 1  # micro-steps accumulated before each optimiser step
    lr: float = 1e-5  # AdamW learning rate (paper, cldm tutorial)
    lr_warmup_steps: int = 0  # linear warm-up steps, then constant
    weight_decay: float = 1e-2  # AdamW weight decay (torch and diffusers default)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # gradient clipping norm (diffusers); 0 = no clipping
    max_steps: int = 1000  # optimiser steps of the whole run
    caption_dropout: float = 0.5  # share of captions replaced by "" (paper §3.3)
    mixed_precision: MixedPrecision = MixedPrecision.NO  # "no", "fp16" or "bf16"; trainable weights stay fp32
    gradient_checkpointing: bool = False  # recompute ControlNet activations in backward to save memory
    ema_decay: float = 0.0  # EMA of the ControlNet weights (e.g. 0.9999); 0 = off
    mode: TrainMode = TrainMode.STANDARD  # "standard", "small_scale" or "large_scale" (paper §3.4)
    reconnect_after: int = 0  # small_scale: steps with the middle block only before the decoder links return
    unlock_base_after: int = 0  # large_scale: step at which the base U-Net decoder is unlocked
    unlock_lr: float = 2e-6  # large_scale: learning rate of the unlocked base weights (cldm docs)
    save_every: int = 500  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk (older ones are deleted)
    validate_every: int = 500  # steps between validation grids; 0 = only at the end
    validation_prompts: tuple[str, ...] = (PAPER_DEFAULT_PROMPT,)  # prompts of the validation grid
    validation_conditions: tuple[str, ...] = ()  # condition images for validation; () = first data rows
    num_validation_conditions: int = 4  # rows taken from the data when validation_conditions is empty
    cfg_scale: float = 9.0  # classifier-free guidance scale of validation samples (paper §4)
    sample_steps: int = 20  # DDIM steps of validation samples (paper §4)
    fidelity_metric: str = "auto"  # "auto" (by annotator), "edge_f1", "iou", "depth_corr" or "none"
    seed: int = 0  # seeds data order, noise, timesteps, caption dropout and validation noise
    output_dir: str = "output/controlnet"  # folder of checkpoints, samples, curves and the final files
    output_name: str = "controlnet"  # file name of the final ControlNet (without .safetensors)
    export_diffusers: bool = True  # also write a diffusers folder (config.json + weights) at the end
    resume: str = "auto"  # "auto" (latest checkpoint in output_dir if any), "never", or a state file path
    num_workers: int = 2  # data-loading worker processes per training process
    cache_latents: bool = False  # encode every image once before training (needs crop = "center")
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda", "cuda:1", ...
    parallelism: Parallelism = Parallelism.DDP  # "ddp" or "fsdp" when started under torchrun
    log_every: int = 10  # steps between log lines

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, _field_types()[f.name], getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        """Every field in range, each error naming the field (paths are checked at the start of a run)."""
        for name, kind in _field_types().items():
            values = getattr(self, name) if typing.get_origin(kind) is tuple else (getattr(self, name),)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"training config {name} must be a finite number, got {getattr(self, name)!r}")
        bounds = {">= 1": ("resolution", "batch_size", "grad_accum", "max_steps", "sample_steps", "keep_checkpoints"),
                  "> 0": ("lr", "unlock_lr", "adam_eps"),
                  ">= 0": ("weight_decay", "max_grad_norm", "cfg_scale", "seed", "num_validation_conditions",
                           "save_every", "validate_every", "reconnect_after", "unlock_base_after", "lr_warmup_steps",
                           "num_workers", "log_every")}
        for rule, names in bounds.items():
            for name in names:
                value = getattr(self, name)
                if value <= 0 if rule == "> 0" else value < int(rule[-1]):
                    raise ValueError(f"{name} must be {rule}, got {value}")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must both be in [0, 1), got {list(self.adam_betas)}")
        if self.seed * SEED_STRIDE + self.max_steps >= 2**63:
            raise ValueError(f"seed must be below {(2**63 - self.max_steps) // SEED_STRIDE}, got {self.seed}")
        if not self.validation_conditions and self.num_validation_conditions < 1:
            raise ValueError("num_validation_conditions must be >= 1 when validation_conditions is empty, got 0")
        if not self.output_name or Path(self.output_name).name != self.output_name or self.output_name in (".", ".."):
            raise ValueError(f"output_name must be a plain file name (no folder), got {self.output_name!r}; "
                             "put the folder in output_dir")
        if not self.output_dir:
            raise ValueError("output_dir must name a folder, got ''")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (latents are 1/8 size), got {self.resolution}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a share in [0, 1], got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.prediction_type not in ("auto", "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'auto', 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.fidelity_metric not in ("auto", "edge_f1", "iou", "depth_corr", "none"):
            raise ValueError(f"fidelity_metric must be auto, edge_f1, iou, depth_corr or none, got {self.fidelity_metric!r}")
        if self.cache_latents and self.crop is Crop.RANDOM:
            raise ValueError("cache_latents needs crop = 'center' (a cached latent cannot be re-cropped)")
        if self.mode is TrainMode.LARGE_SCALE and self.parallelism is Parallelism.FSDP:
            raise ValueError("large_scale mode unlocks base weights, which FSDP here does not shard; use parallelism = 'ddp'")

    # ---- reading and writing ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config from plain values, refusing unknown keys with the closest known name."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
                raise ValueError(f"unknown training config key {key!r}{hint}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """Read a TOML (.toml) or YAML (.yaml/.yml) config, then apply `key=value` overrides."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist; write one with "
                                    "`zeroconv train --write-default-config PATH`")
        data = _read_mapping(path)
        data.update(parse_overrides(overrides))
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (enums as strings, tuples as lists), as TOML/YAML/JSON hold them."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _read_mapping(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML ({exc}); fix the line named") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML ({exc}); fix the line named") from None
    else:
        raise ValueError(f"training config {path} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings (CLI --set) to a dict; values are parsed as TOML values, else kept as text."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = text
    return out


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Check and convert one field's value (YAML reads 1e-5 as text; TOML has no tuples)."""
    origin = typing.get_origin(kind)
    try:
        if isinstance(kind, type) and issubclass(kind, Enum):
            return kind(value.value if isinstance(value, Enum) else value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, Path)):
                raise TypeError
            return str(value)
        if origin is tuple:
            items = [value] if isinstance(value, str) else list(value)
            args = typing.get_args(kind)
            item_kind = args[0]
            if len(args) == 2 and args[1] is not Ellipsis and len(items) != 2:
                raise TypeError
            return tuple(_coerce(name, item_kind, v) for v in items)
    except (TypeError, ValueError):
        choices = f" (one of {[m.value for m in kind]})" if isinstance(kind, type) and issubclass(kind, Enum) else ""
        raise ValueError(f"training config {name} = {value!r} is not a valid {getattr(kind, '__name__', kind)}{choices}") from None
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def field_comments() -> dict[str, str]:
    """The one-line comment after each field in this file's TrainConfig source (the config's documentation)."""
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s{4}(\w+): [^#\n]+#\s*(.+)$", re.M)
    return {m.group(1): m.group(2).strip() for m in pattern.finditer(source)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def default_config_text(cfg: TrainConfig | None = None) -> str:
    """A TOML config with every field, each preceded by its comment."""
    cfg = cfg or TrainConfig()
    comments = field_comments()
    lines = ["# ZeroConv ControlNet training config. Run: zeroconv train THIS_FILE [--set key=value ...]",
             "# Every field has a default; delete the ones you do not change.", ""]
    for name, value in cfg.to_dict().items():
        lines.append(f"# {comments.get(name, name)}")
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_default_config(path: str | Path, cfg: TrainConfig | None = None) -> Path:
    """Write a commented TOML with every field (defaults, or `cfg`'s values)."""
    path = Path(path)
    if path.suffix != ".toml":
        raise ValueError(f"the default config is TOML; name the file *.toml, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(default_config_text(cfg))
    return path
