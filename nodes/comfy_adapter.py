"""The host adapter: the only module that touches ComfyUI (always lazily, inside functions).

Residuals reach ComfyUI's U-Net through its own seam (comfyui-host.md §5): a control object rides in each
conditioning dict, the sampler calls `pre_run` once, `get_models` to load weights, `get_control` on every model
call and `cleanup` at the end, and the U-Net adds the returned `{'output': [...], 'middle': [...]}` lists.

`ZeroConvControl` speaks that protocol for one or several parts, summed in one pass (composition):
  * a part with our ControlNet is run by the library (`residuals.run_control`): hint fitted and encoded once per
    run, no forward outside its step range or at strength 0, only conditional rows for cond-only modes;
  * a part with a ControlNet from another loader (a ComfyUI `ControlBase`) runs through its own `get_control`,
    and our mode, mask and schedule scale what it returns (`residuals.scale_output`).
When ComfyUI is importable the object is also a `comfy.controlnet.ControlBase`, so core nodes accept it and it
chains with core controls through `previous_controlnet`. Without ComfyUI the same class works host-free.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..controlnet_model.accelerate import Acceleration, AcceleratedControlNet, accelerate
from ..controlnet_model.checkpoint import NEEDS_BASE, detect_format, load_controlnet, load_controlnet_cached
from ..controlnet_model.config import FAMILY_BY_CONTEXT_DIM, ControlNetConfig, check_compatible
from ..controlnet_model.hint import HintFit, fit_hint
from ..controlnet_model.network import ControlNet, ControlNetOutput
from ..controlnet_model.residuals import (MODE_RULES, ControlMode, ControlSettings, ControlUnit, as_residuals,
                                          run_control, scale_output)

logger = logging.getLogger(__name__)

LATENT_SCALE = 8  # image pixels per latent cell for SD VAEs (ComfyUI's compression_ratio)
MODEL_NAME_INPUTS = ("ckpt_name", "unet_name", "model_name")  # loader widgets that name the sampled model's file


class _Shared:
    """What every copy of one loaded ControlNet shares: its ComfyUI patcher and its accelerated forwards."""

    def __init__(self) -> None:
        self.patcher: Any = None
        self.accelerated: dict[Acceleration, AcceleratedControlNet] = {}


class HostedControlNet(nn.Module):
    """Our ControlNet as ComfyUI's memory manager sees it: the patcher tags this wrapper, not the cached model."""

    def __init__(self, controlnet: ControlNet):
        super().__init__()
        self.controlnet = controlnet


@dataclass(frozen=True)
class ControlPart:
    """One ControlNet of a control: ours (`controlnet`) or another loader's (`host`), with its image and settings."""

    controlnet: ControlNet | None = None
    host: Any = None  # a ComfyUI ControlBase (or anything with its protocol), run through its own get_control
    image: torch.Tensor | None = field(default=None, compare=False)  # (B, C, H, W) in [0, 1]
    settings: ControlSettings = ControlSettings()
    fit: HintFit = HintFit.CROP_AND_RESIZE
    name: str = "the ControlNet"  # file name, for messages
    composed: bool = False  # made by the compose node: keeps its own image, fit, range, mode and mask
    acceleration: Acceleration = Acceleration.NONE
    vae: Any = field(default=None, compare=False)  # passed on to host controls that encode hints with a VAE
    shared: _Shared = field(default_factory=_Shared, compare=False, repr=False)

    def applied(self, image: torch.Tensor | None, settings: ControlSettings, fit: HintFit, vae: Any = None,
                acceleration: Acceleration = Acceleration.NONE) -> "ControlPart":
        """This part under an apply node. A composed part keeps its own image and settings: the apply node's
        strength multiplies its strength and the apply node's step range narrows its range."""
        acceleration = Acceleration(acceleration)
        if not self.composed:
            return replace(self, image=image, settings=settings, fit=HintFit(fit), vae=vae,
                           acceleration=acceleration if acceleration is not Acceleration.NONE else self.acceleration)
        if settings.mode is not ControlMode.BALANCED or settings.mask is not None or settings.schedule is not None:
            raise ValueError("this CONTROL_NET is a composition: set control_mode, mask and schedule on each "
                             "ZeroConv ControlNet Unit, and leave the apply node at balanced with no mask or schedule")
        own = self.settings
        start, end = max(own.start_percent, settings.start_percent), min(own.end_percent, settings.end_percent)
        if start > end:
            logger.warning("%s acts from %.3f to %.3f but the apply node only from %.3f to %.3f: it never acts",
                           self.name, own.start_percent, own.end_percent, settings.start_percent, settings.end_percent)
            narrowed = replace(own, strength=0.0)
        else:
            narrowed = replace(own, strength=own.strength * settings.strength, start_percent=start, end_percent=end)
        return replace(self, settings=narrowed, vae=vae if vae is not None else self.vae,
                       acceleration=acceleration if acceleration is not Acceleration.NONE else self.acceleration)

    def as_unit(self) -> "ControlPart":
        """This part as a unit of a composition (the compose node)."""
        return replace(self, composed=True)


@dataclass
class _Run:
    """State of one sampling run (pre_run to cleanup)."""

    model_sampling: Any
    sigma_ranges: list[tuple[float, float]]  # per part: ComfyUI's gate, sigma(start) >= sigma >= sigma(end)
    hosts: dict[int, Any]  # part index -> the host control prepared for this run
    units: dict[tuple, ControlUnit] = field(default_factory=dict)  # fitted, broadcast, encoded hints


def comfy_available() -> bool:
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy.controlnet") is not None


class ZeroConvControl:
    """A ControlBase-compatible control: one or several ControlNets added in a single pass."""

    def __init__(self, parts: tuple[ControlPart, ...] = ()):
        super().__init__()  # ControlBase.__init__ inside ComfyUI: its public state, as core code expects it
        for name, value in _CONTROLBASE_STATE.items():
            if not hasattr(self, name):
                setattr(self, name, value() if callable(value) else value)
        self.parts = tuple(parts)
        self.model_names: tuple[str, ...] = ()  # the sampled model's file(s), when the host tells us
        self._run: _Run | None = None

    # ---- what apply and compose nodes call --------------------------------------------------------------
    def applied(self, image: torch.Tensor | None, settings: ControlSettings, fit: HintFit | str = HintFit.CROP_AND_RESIZE,
                vae: Any = None, acceleration: Acceleration | str = Acceleration.NONE) -> "ZeroConvControl":
        """A new control with this image and these settings (composed parts keep their own)."""
        new = make_control(tuple(p.applied(image, settings, HintFit(fit), vae, Acceleration(acceleration))
                                 for p in self.parts))
        new.cond_hint_original, new.strength = image, settings.strength
        new.timestep_percent_range = (settings.start_percent, settings.end_percent)
        return new

    # ---- the ControlBase protocol ------------------------------------------------------------------------
    def copy(self) -> "ZeroConvControl":
        new = make_control(self.parts)
        new.strength, new.timestep_percent_range = self.strength, self.timestep_percent_range
        new.cond_hint_original, new.vae, new.model_names = self.cond_hint_original, self.vae, self.model_names
        return new

    def set_cond_hint(self, cond_hint: torch.Tensor, strength: float = 1.0,
                      timestep_percent_range: tuple[float, float] = (0.0, 1.0), vae: Any = None,
                      extra_concat: list | None = None) -> "ZeroConvControl":
        """What core apply nodes call: one image (B, C, H, W), strength and range for every part."""
        start, end = timestep_percent_range
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, (start, end)
        self.vae = vae
        settings = ControlSettings(strength=strength, start_percent=start, end_percent=end)
        self.parts = tuple(p.applied(cond_hint, settings, p.fit, vae) for p in self.parts)
        return self

    def set_previous_controlnet(self, controlnet: Any) -> "ZeroConvControl":
        self.previous_controlnet = controlnet
        return self

    def pre_run(self, model: Any, percent_to_timestep_function: Callable[[float], float]) -> None:
        """Once per sampling run, before any step: family check, step ranges as sigmas, host controls readied."""
        unet_config = sampled_unet_config(model)
        if unet_config is not None:
            names = self.model_names or executing_model_names()
            model_name = "the sampled model" + (f" {', '.join(names)}" if names else "")
            for part in self.parts:
                if part.controlnet is not None:
                    check_compatible(part.controlnet.config, unet_config, f"ControlNet {part.name}", model_name)
        to_sigma = percent_to_timestep_function
        ranges = [(to_sigma(p.settings.start_percent), to_sigma(p.settings.end_percent)) for p in self.parts]
        hosts = {}
        for index, part in enumerate(self.parts):
            if part.host is not None:
                if part.image is None:
                    raise ValueError(f"{part.name} has no control image; connect an image to the apply node")
                s = part.settings
                hosts[index] = part.host.copy().set_cond_hint(part.image, s.strength, (s.start_percent, s.end_percent),
                                                              vae=part.vae)
                hosts[index].pre_run(model, to_sigma)
        self._run = _Run(model.model_sampling, ranges, hosts)
        self.timestep_range = (to_sigma(self.timestep_percent_range[0]), to_sigma(self.timestep_percent_range[1]))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict) -> dict | None:
        """x_noisy (B, C, h, w) unscaled, t (B,) sigmas -> {'input', 'middle', 'output'} lists, or None."""
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        run = self._run
        if run is None:
            raise RuntimeError("get_control was called before pre_run; the sampler must call pre_run(model, "
                               "percent_to_sigma) once before sampling")
        sigma, ms = float(t[0]), run.model_sampling
        percent = min(1.0, max(0.0, 1.0 - float(ms.timestep(t[:1])[0]) / 999.0))  # inverse of percent_to_sigma
        cond_rows = _cond_rows(transformer_options.get("cond_or_uncond"), x_noisy.shape[0])
        step = _Step(x_noisy, t, cond, batched_number, transformer_options, cond_rows, ms)
        ours = None
        for index, part in enumerate(self.parts):
            first, last = run.sigma_ranges[index]
            if sigma > first or sigma < last:
                continue  # outside its step range: no forward at all
            s = part.settings
            if s.strength == 0.0:
                continue
            part_percent = min(max(percent, s.start_percent), s.end_percent)  # in range by sigma, so by percent
            if part.host is not None:
                out = self._host_residuals(index, part, step, part_percent)
            else:
                out = self._own_residuals(index, part, step, part_percent)
            ours = merge_controls(ours, out)
        return merge_controls(ours, previous)

    def get_models(self) -> list:
        """Our ControlNets for ComfyUI's memory manager (load, offload, dtype), and those of host parts."""
        models = [m for p in self.parts if p.host is not None for m in p.host.get_models()]
        models += [patcher for p in self.parts if p.controlnet is not None and (patcher := _host_patcher(p))]
        previous = self.previous_controlnet.get_models() if self.previous_controlnet is not None else []
        return models + previous

    def inference_memory_requirements(self, dtype: torch.dtype) -> int:
        total = sum(p.host.inference_memory_requirements(dtype) for p in self.parts if p.host is not None)
        previous = self.previous_controlnet
        return total + (previous.inference_memory_requirements(dtype) if previous is not None else 0)

    def get_extra_hooks(self) -> list:
        previous = self.previous_controlnet
        return previous.get_extra_hooks() if previous is not None and hasattr(previous, "get_extra_hooks") else []

    def cleanup(self) -> None:
        """After sampling: drop the run's hints and encodings, host copies and captured CUDA graphs."""
        if self._run is not None:
            for host in self._run.hosts.values():
                host.cleanup()
        for part in self.parts:
            for wrapped in part.shared.accelerated.values():
                wrapped.release()  # weights may move before the next run; graphs hold their addresses
        self._run, self.timestep_range, self.cond_hint = None, None, None
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()

    # ---- our ControlNets ---------------------------------------------------------------------------------
    def _own_residuals(self, index: int, part: ControlPart, step: "_Step", percent: float) -> dict | None:
        unit = self._unit(index, part, step)
        device = unit.encoded_hint.device
        y = step.cond.get("y")
        rows = None if step.cond_rows is None else step.cond_rows.to(device)
        with torch.no_grad():
            out = run_control(unit, step.scaled_x().to(device), step.timesteps().to(device),
                              step.context().to(device), None if y is None else y.to(device), percent, rows)
        return None if out is None else as_host_dict(out, step.x)

    def _unit(self, index: int, part: ControlPart, step: "_Step") -> ControlUnit:
        """The part's hint fitted to the latent, broadcast to the batch and encoded: once per shape in a run."""
        x = step.x
        key = (index, tuple(x.shape), step.batched_number, x.device)
        if key not in self._run.units:
            if part.image is None:
                raise ValueError(f"{part.name} has no control image; connect an image to the apply node")
            net = part.controlnet
            device = next(net.parameters()).device
            hint = fit_to_latent(part.image.to(device, torch.float32), x.shape[-2], x.shape[-1], part.fit)
            hint = _hint_channels(hint, net.config.hint_channels, part.name)
            hint = broadcast_batch(hint, x.shape[0], step.batched_number, f"{part.name}'s control image")
            settings = part.settings
            if settings.mask is not None:
                mask = broadcast_batch(settings.mask.to(device), x.shape[0], step.batched_number, f"{part.name}'s mask")
                settings = replace(settings, mask=mask)
            with torch.no_grad():
                encoded = net.encode_hint(hint.to(net.dtype))
            self._run.units[key] = ControlUnit(_accelerated(part), hint, settings, encoded)
        return self._run.units[key]

    # ---- ControlNets from other loaders ------------------------------------------------------------------
    def _host_residuals(self, index: int, part: ControlPart, step: "_Step", percent: float) -> dict | None:
        """A host control's own residuals, then our mode, mask and schedule; cond-only modes run only cond chunks."""
        host, settings = self._run.hosts[index], part.settings
        key = ("fit", index, tuple(step.x.shape[-2:]))
        if part.fit is not HintFit.CROP_AND_RESIZE and key not in self._run.units:
            # the host resizes by crop and resize; a hint already at the latent's size passes through unchanged
            host.cond_hint_original = fit_to_latent(part.image, step.x.shape[-2], step.x.shape[-1], part.fit)
            host.cond_hint = None
            self._run.units[key] = host.cond_hint_original
        keep = None
        if MODE_RULES[settings.mode].cond_only and step.transformer_options.get("cond_or_uncond"):
            keep = [c == 0 for c in step.transformer_options["cond_or_uncond"]]
            if not any(keep):
                return None
            keep = None if all(keep) else keep
        x, t, cond, batched, options, rows = _select_chunks(step, keep)
        control = host.get_control(x, t, cond, batched, options)
        if control is None or (settings.mode is ControlMode.BALANCED and settings.mask is None
                               and settings.schedule is None):
            return control
        if control.get("input"):
            raise ValueError(f"{part.name} is an adapter that changes the U-Net's input blocks; control modes, "
                             "masks and schedules apply to ControlNets only: use balanced with no mask or schedule")
        mask = settings.mask
        if mask is not None:
            mask = broadcast_batch(mask.to(x.device), step.x.shape[0], step.batched_number, f"{part.name}'s mask")
            mask = mask if rows is None or mask.shape[0] == 1 else mask[rows]
        multiplier = settings.schedule(percent) if settings.schedule is not None else 1.0  # strength: applied
        out = scale_output(as_residuals(control), settings.mode, multiplier, mask)
        if rows is not None:
            where = rows.nonzero()[:, 0]
            out = out.map(lambda _, r: r.new_zeros((step.x.shape[0], *r.shape[1:])).index_copy(0, where, r))
        return as_host_dict(out, step.x)


_CONTROLBASE_STATE: dict[str, Any] = {
    # ControlBase's public state (comfyui-host.md §5.2), for the host-free class
    "cond_hint_original": None, "cond_hint": None, "strength": 1.0, "timestep_percent_range": (0.0, 1.0),
    "timestep_range": None, "latent_format": None, "vae": None, "global_average_pooling": False,
    "compression_ratio": LATENT_SCALE, "upscale_algorithm": "nearest-exact", "extra_args": dict,
    "previous_controlnet": None, "extra_conds": list, "concat_mask": False, "extra_concat_orig": list,
    "extra_concat": None, "extra_hooks": None, "preprocess_image": lambda: (lambda a: a),
}


@dataclass
class _Step:
    """One model call: the host's inputs and what is derived from them once."""

    x: torch.Tensor  # (B, C, h, w) unscaled noisy latent, cond and uncond chunks batched
    t: torch.Tensor  # (B,) sigmas
    cond: dict
    batched_number: int
    transformer_options: dict
    cond_rows: torch.Tensor | None  # (B,) True on conditional rows
    model_sampling: Any
    _cache: dict = field(default_factory=dict)

    def scaled_x(self) -> torch.Tensor:
        if "x" not in self._cache:
            self._cache["x"] = self.model_sampling.calculate_input(self.t, self.x)
        return self._cache["x"]

    def timesteps(self) -> torch.Tensor:
        if "t" not in self._cache:
            self._cache["t"] = self.model_sampling.timestep(self.t)
        return self._cache["t"]

    def context(self) -> torch.Tensor:
        return self.cond.get("crossattn_controlnet", self.cond["c_crossattn"])


def _select_chunks(step: _Step, keep: list[bool] | None) -> tuple:
    """The model call restricted to some cond/uncond chunks (every tensor batched like x is sliced)."""
    if keep is None:
        return step.x, step.t, step.cond, step.batched_number, step.transformer_options, None
    rows = torch.tensor(keep, device=step.x.device).repeat_interleave(step.x.shape[0] // len(keep))
    n = step.x.shape[0]

    def cut(value: Any) -> Any:
        return value[rows] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n else value

    options = {**step.transformer_options,
               "cond_or_uncond": [c for c, k in zip(step.transformer_options["cond_or_uncond"], keep) if k]}
    cond = {k: cut(v) for k, v in step.cond.items()}
    if "transformer_options" in cond:
        cond["transformer_options"] = options
    return step.x[rows], step.t[rows], cond, sum(keep), options, rows


# ---- helpers -------------------------------------------------------------------------------------------
def as_host_dict(out: ControlNetOutput, like: torch.Tensor) -> dict:
    """Our typed output as ComfyUI's control dict; fresh lists, since the U-Net pops them."""
    return {"input": [], "middle": [out.mid.to(like.device)], "output": [r.to(like.device) for r in out.down]}


def fit_to_latent(image: torch.Tensor, latent_h: int, latent_w: int, fit: HintFit) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8h, 8w). crop_and_resize is ComfyUI core's fit (centre crop to the target aspect,
    then nearest-exact), so balanced mode gives core's result; every fit uses the host's nearest-exact."""
    height, width = latent_h * LATENT_SCALE, latent_w * LATENT_SCALE
    fit = HintFit(fit)
    if fit is HintFit.CROP_AND_RESIZE:
        image, fit = _centre_crop(image, width / height), HintFit.RESIZE
    return fit_hint(image, height, width, fit, mode="nearest-exact")


def _centre_crop(image: torch.Tensor, aspect: float) -> torch.Tensor:
    h, w = image.shape[-2:]
    ratio = aspect / (w / h)
    if ratio < 1:
        left = round((w - w * ratio) / 2)
        return image[..., :, left:w - left]
    if ratio > 1:
        top = round((h - h / ratio) / 2)
        return image[..., top:h - top, :]
    return image


def _hint_channels(hint: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    if hint.shape[1] == channels:
        return hint
    if channels == 1:
        return hint.mean(dim=1, keepdim=True)
    raise ValueError(f"{name} wants {channels}-channel hints but the control image has {hint.shape[1]} channels")


def broadcast_batch(tensor: torch.Tensor, batch: int, batched_number: int, what: str) -> torch.Tensor:
    """A per-latent tensor (images, masks) to a batch of `batched_number` chunks (cond, uncond), as ComfyUI
    does: one is broadcast; otherwise cut or repeated to a chunk and tiled. A count that is not one per latent
    is fixed that way, and logged."""
    if tensor.shape[0] == 1:
        return tensor
    per_chunk = batch // batched_number
    if tensor.shape[0] != per_chunk:
        logger.warning("%s has a batch of %d but there are %d latents: %s", what, tensor.shape[0], per_chunk,
                       "the extra ones are not used" if tensor.shape[0] > per_chunk else "it is repeated")
    reps = -(-per_chunk // tensor.shape[0])
    chunk = tensor.repeat(reps, *([1] * (tensor.ndim - 1)))[:per_chunk]
    return chunk.repeat(batched_number, *([1] * (tensor.ndim - 1)))


def _cond_rows(cond_or_uncond: list[int] | None, batch: int) -> torch.Tensor | None:
    """(B,) True on rows of positive conds (cond_or_uncond 0), one chunk per entry."""
    if not cond_or_uncond:
        return None
    return torch.tensor([c == 0 for c in cond_or_uncond]).repeat_interleave(batch // len(cond_or_uncond))


def merge_controls(ours: dict | None, previous: dict | None) -> dict | None:
    """Element-wise sum of two control dicts (ComfyUI's control_merge, without in-place edits)."""
    if ours is None or previous is None:
        return ours if previous is None else previous
    merged = {}
    for key in ("input", "middle", "output"):
        a, b = list(ours.get(key) or []), list(previous.get(key) or [])
        n = max(len(a), len(b))
        a, b = a + [None] * (n - len(a)), b + [None] * (n - len(b))
        merged[key] = [y if x is None else x if y is None else x + y for x, y in zip(a, b)]
    return merged


def _accelerated(part: ControlPart) -> ControlNet | AcceleratedControlNet:
    if part.acceleration is Acceleration.NONE:
        return part.controlnet
    if part.acceleration not in part.shared.accelerated:
        part.shared.accelerated[part.acceleration] = accelerate(part.controlnet, part.acceleration)
    return part.shared.accelerated[part.acceleration]


def sampled_unet_config(model: Any) -> ControlNetConfig | None:
    """What a ControlNet must match in the sampled model: ours carries a config, ComfyUI's a unet_config dict.

    The latent channels stand in for the U-Net's input channels (an inpainting U-Net takes 9, its ControlNets 4).
    None when the model says nothing (test stand-ins).
    """
    own = getattr(getattr(model, "diffusion_model", None), "config", None)
    if isinstance(own, ControlNetConfig):
        config = own
    else:
        model_config = getattr(model, "model_config", None)
        unet_config = getattr(model_config, "unet_config", None)
        if not isinstance(unet_config, dict):
            return None
        if "model_channels" not in unet_config or "channel_mult" not in unet_config:
            raise ValueError(f"the sampled model ({type(model_config).__name__}) is not an SD1.x, SD2.x or SDXL U-Net; "
                             "ZeroConv ControlNets steer only those: use a ControlNet made for this model")
        config = _config_from_comfy(unet_config)
    channels = getattr(getattr(model, "latent_format", None), "latent_channels", None)
    return config.replace(in_channels=channels) if isinstance(channels, int) else config


def _config_from_comfy(unet_config: dict) -> ControlNetConfig:
    context = unet_config.get("context_dim") or 768
    levels = len(unet_config["channel_mult"])
    res = unet_config.get("num_res_blocks", 2)
    res = res[0] if isinstance(res, (list, tuple)) else res
    depth = list(unet_config.get("transformer_depth") or [])
    per_level = tuple(depth[i * res] or None if len(depth) > i * res else None for i in range(levels))
    return ControlNetConfig(
        family=FAMILY_BY_CONTEXT_DIM.get(context, f"a model with context {context}"),
        model_channels=unet_config["model_channels"], channel_mult=tuple(unet_config["channel_mult"]),
        num_res_blocks=res, transformer_depth=per_level, context_dim=context,
        in_channels=unet_config.get("in_channels", 4), adm_in_channels=unet_config.get("adm_in_channels"))


def executing_model_names() -> tuple[str, ...]:
    """Inside ComfyUI, during sampling: the file names behind the executing sampler's `model` input.

    Walks the running prompt from the sampler up its `model` links to a loader widget (ckpt_name, unet_name);
    empty outside ComfyUI or when the graph says nothing.
    """
    if not comfy_available() or importlib.util.find_spec("comfy_execution") is None:
        return ()
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    if context is None:
        return ()
    prompt = get_progress_state().dynprompt
    return tuple(sorted(model_file_names(lambda node_id: _node_or_none(prompt, node_id), context.node_id)))


def _node_or_none(prompt: Any, node_id: str) -> dict | None:
    return prompt.get_node(node_id) if prompt.has_node(node_id) else None


def model_file_names(get_node: Callable[[str], dict | None], node_id: str, limit: int = 32) -> set[str]:
    """File names found by following `model` links upstream from a node of an API-format prompt."""
    names, todo, seen = set(), [node_id], set()
    while todo and len(seen) < limit:
        current = todo.pop()
        node = get_node(current) if current not in seen else None
        seen.add(current)
        if not node:
            continue
        inputs = node.get("inputs", {})
        names.update(v for k, v in inputs.items() if k in MODEL_NAME_INPUTS and isinstance(v, str))
        link = inputs.get("model")
        if isinstance(link, list) and len(link) == 2:
            todo.append(str(link[0]))
    return names


# ---- loading, folders and ComfyUI's memory manager -----------------------------------------------------
def make_control(parts: tuple[ControlPart, ...]) -> ZeroConvControl:
    """A control object; inside ComfyUI it is also a comfy.controlnet.ControlBase."""
    return _control_class()(parts)


def as_control(control_net: Any, name: str | None = None) -> ZeroConvControl:
    """Ours as it is; a ControlNet from another loader (e.g. ComfyUI's) wrapped as a host part."""
    if isinstance(control_net, ZeroConvControl):
        return control_net
    if not all(hasattr(control_net, m) for m in ("copy", "set_cond_hint", "pre_run", "get_control", "cleanup")):
        raise ValueError(f"{type(control_net).__name__} is not a CONTROL_NET (no ControlBase protocol); connect the "
                         "output of a ControlNet loader")
    return make_control((ControlPart(host=control_net, name=name or f"the {type(control_net).__name__}"),))


@functools.lru_cache(maxsize=1)
def _control_class() -> type:
    if not comfy_available():
        return ZeroConvControl
    from comfy.controlnet import ControlBase

    return type("ZeroConvComfyControl", (ZeroConvControl, ControlBase), {"__module__": __name__})


def load_control(path: Path, model: Any = None) -> tuple[ZeroConvControl, Any]:
    """A file as a control: ours when the library reads the format, else (inside ComfyUI) ComfyUI's loader's.

    model: the MODEL that diff and Control-LoRA files are relative to (a patcher with .model.diffusion_model).
    """
    dtype = host_dtype()
    try:
        if model is None:
            loaded = load_controlnet_cached(path, dtype=dtype)
        else:  # relative to this base model: not cached across models
            loaded = load_controlnet(path, base_unet=model.model.diffusion_model, dtype=dtype)
    except ValueError:
        host = _host_load(path, model)
        if host is None:
            raise
        logger.warning("%s is in a format ZeroConv does not read; loaded by ComfyUI's loader (apply options still work)",
                       path.name)
        return make_control((ControlPart(host=host, name=path.name),)), None
    return make_control((ControlPart(loaded.model, name=path.name),)), loaded.metadata


def _host_load(path: Path, model: Any) -> Any:
    """ComfyUI's own loader for a file the library refused; never for a diff / Control-LoRA file without its base
    model (ComfyUI would load it without the base, silently wrong). None when ComfyUI cannot read it either."""
    if not comfy_available():
        return None
    from ..controlnet_model.safetensors_io import open_weights

    try:
        if detect_format(open_weights(path).keys()) in NEEDS_BASE:
            return None
    except ValueError:
        pass  # a layout the library does not know: ComfyUI may
    import comfy.controlnet

    try:
        return comfy.controlnet.load_controlnet(str(path), model=model)
    except Exception as exc:  # its own error says less than ours, which the caller raises
        logger.info("ComfyUI's loader could not read %s either: %s", path.name, exc)
        return None


def host_dtype() -> torch.dtype | None:
    """The dtype ComfyUI would run a ControlNet in on its device (its --fp16/--bf16 flags honoured); None outside."""
    if not comfy_available():
        return None
    import comfy.model_management as mm

    dtype = mm.unet_dtype(model_params=-1, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    return mm.unet_manual_cast(dtype, mm.get_torch_device()) or dtype


def _host_patcher(part: ControlPart) -> Any:
    """The part's ControlNet for ComfyUI's memory manager, made once per loaded ControlNet; None outside ComfyUI."""
    if not comfy_available():
        return None
    if part.shared.patcher is None:
        import comfy.model_management as mm
        from comfy.model_patcher import ModelPatcher

        part.shared.patcher = ModelPatcher(HostedControlNet(part.controlnet), load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())
    return part.shared.patcher


def host_controlnet_names() -> list[str] | None:
    """ComfyUI's own list for its `controlnet` folders (what core loaders offer); None outside ComfyUI."""
    if importlib.util.find_spec("folder_paths") is None:
        return None
    import folder_paths

    return folder_paths.get_filename_list("controlnet")


def host_model_folders(kind: str) -> list[str] | None:
    """ComfyUI's model folders of a kind ('controlnet', 'checkpoints', ...); None outside ComfyUI."""
    if importlib.util.find_spec("folder_paths") is None:
        return None
    import folder_paths

    return folder_paths.get_folder_paths(kind)


def controlnet_folder_paths() -> list[str]:
    """ComfyUI's `controlnet` model folders; outside ComfyUI the folder in ZEROCONV_CONTROLNET_DIR, if set."""
    folders = host_model_folders("controlnet")
    if folders is not None:
        return folders
    folder = os.environ.get("ZEROCONV_CONTROLNET_DIR")
    return [folder] if folder else []


def host_base_objects(base: Any) -> tuple[Any, Any, Any]:
    """MODEL, CLIP and VAE for a base loaded by the training module (the demo world's): inside ComfyUI the MODEL is
    ComfyUI's own ModelPatcher around a `comfy.model_base.BaseModel` whose diffusion model is our U-Net, so core
    samplers, ControlNet nodes and the memory manager treat it like any checkpoint; outside, the runner's objects.

    CLIP and VAE are the runner's (they only call the base's text encoder and pixel (un)shuffle); core
    CLIPTextEncode, VAEEncode and VAEDecode use nothing else of them.
    """
    from ..workflow_runner import host

    if not comfy_available():
        from ..workflow_runner import files

        return host.host_objects(base, files.current().device)
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.supported_models_base
    from comfy.model_patcher import ModelPatcher

    cfg = base.unet.config
    unet_config = {"model_channels": cfg.model_channels, "channel_mult": list(cfg.channel_mult),
                   "num_res_blocks": [cfg.num_res_blocks] * len(cfg.channel_mult), "context_dim": cfg.context_dim,
                   "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
                   "transformer_depth": [d or 0 for d in cfg.transformer_depth for _ in range(cfg.num_res_blocks)],
                   "adm_in_channels": cfg.adm_in_channels}
    latent = type("ZeroConvLatentFormat", (comfy.latent_formats.LatentFormat,),
                  {"latent_channels": cfg.in_channels, "scale_factor": float(base.latent_scale_factor)})
    model_config = type("ZeroConvBaseConfig", (comfy.supported_models_base.BASE,),
                        {"unet_config": unet_config, "latent_format": latent})(unet_config)
    model_type = {"epsilon": comfy.model_base.ModelType.EPS,
                  "v_prediction": comfy.model_base.ModelType.V_PREDICTION}[base.schedule.prediction_type.value]
    model = comfy.model_base.BaseModel(model_config, model_type, unet_model=lambda **_: base.unet)
    alphas_cumprod = base.schedule.alphas_cumprod.double()
    betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    model.model_sampling._register_schedule(given_betas=betas)  # the base's own schedule, whatever its name
    device = mm.get_torch_device()
    patcher = ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    vae = host.VAE(base, model.latent_format, torch.device("cpu"))
    return patcher, host.CLIP(base, torch.device("cpu")), vae
