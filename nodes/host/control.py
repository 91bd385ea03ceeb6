"""The CONTROL_NET object: residuals reach ComfyUI's U-Net through ComfyUI's own seam (comfy/controlnet.py,
comfy/samplers.py): a control object rides in each conditioning dict, the sampler calls `pre_run` once, `get_models`
to load weights, `get_control` on every model call and `cleanup` at the end, and the U-Net adds the returned
`{'input', 'middle', 'output'}` lists (comfy/ldm/modules/diffusionmodules/openaimodel.py apply_control).

`ZeroConvControl` speaks that protocol for one or several parts, summed in one pass (composition). It is thin:
  * a part with our control model runs through the library's kind table (`residuals.control_kind`): `prepare` once
    per latent shape of a run, `residuals` at every call; gating, strength, mode and mask are library rules;
  * a part with a ControlNet from another loader (a ComfyUI `ControlBase`) runs through its own `get_control`, and
    our mode, mask and schedule scale what it returns (`residuals.scale_output`).
The step range has one representation, sampling progress (`residuals.progress_at`, computed once per call from the
sigma and the host's own `percent_to_sigma`). Inside ComfyUI the object is a real `comfy.controlnet.ControlBase`
(its `__init__` runs), so core nodes accept it and it chains with core controls through `previous_controlnet`;
outside, it stands on `HostFreeControlBase`, the few fields and chain methods the pack and `zeroconv run` use.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ...controlnet_model.accelerate import Acceleration, AcceleratedControlNet, accelerate
from ...controlnet_model.checkpoint import NEEDS_BASE, detect_format, load_control_cached, load_controlnet
from ...controlnet_model.config import FAMILY_BY_CONTEXT_DIM, ControlNetConfig
from ...controlnet_model.dit_control import dit_format_of
from ...controlnet_model.hint import HintFit, fit_to_latent
from ...controlnet_model.network import ControlNet
from ...controlnet_model.residuals import (MODE_RULES, ControlMode, ControlSettings, HostStep,
                                           as_host_dict, as_residuals, broadcast_batch, cond_rows, control_kind,
                                           merge_controls, progress_at, scale_output)
from ...controlnet_model.t2i_adapter import T2IAdapter
from ...controlnet_model.union import AUTO, UnionControlNet, union_type_index
from . import comfy_available
from .dit import (FAMILY_DTYPES, borrow_host_weights, check_apply, check_part, file_family, transformer_family,
                  vae_encoder)
from .models import controlnet_patcher, executing_model_names, host_dtype, host_load_controlnet

logger = logging.getLogger(__name__)


class _Shared:
    """What every copy of one loaded ControlNet shares: its ComfyUI patcher and its accelerated forwards."""

    def __init__(self) -> None:
        self.patcher: Any = None
        self.accelerated: dict[Acceleration, AcceleratedControlNet] = {}


@dataclass(frozen=True)
class ControlPart:
    """One ControlNet of a control: ours (`controlnet`) or another loader's (`host`), with its image and settings."""

    controlnet: ControlNet | T2IAdapter | None = None  # our control model (plain or Union ControlNet, adapter)
    host: Any = None  # a ComfyUI ControlBase (or anything with its protocol), run through its own get_control
    image: torch.Tensor | None = field(default=None, compare=False)  # (B, C, H, W) in [0, 1]
    settings: ControlSettings = ControlSettings()
    fit: HintFit = HintFit.CROP_AND_RESIZE
    name: str = "the ControlNet"  # file name, for messages
    composed: bool = False  # made by the compose node: keeps its own image, fit, range, mode and mask
    acceleration: Acceleration = Acceleration.NONE
    vae: Any = field(default=None, compare=False)  # passed on to host controls that encode hints with a VAE
    shared: _Shared = field(default_factory=_Shared, compare=False, repr=False)
    union_type: str | int | None = None  # a union ControlNet's type / Flux mode; None: auto (or SetUnionControlNetType's)

    def applied(self, image: torch.Tensor | None, settings: ControlSettings, fit: HintFit, vae: Any = None,
                acceleration: Acceleration = Acceleration.NONE, union_type: str | int | None = AUTO) -> "ControlPart":
        """This part under an apply node. A composed part keeps its own image, settings and type: the apply node's
        strength multiplies its strength and the apply node's step range narrows its range."""
        acceleration = Acceleration(acceleration)
        union_type = None if union_type in (None, AUTO) else union_type
        if not self.composed:
            self.check_union_type(union_type)
            return replace(self, image=image, settings=settings, fit=HintFit(fit), vae=vae, union_type=union_type,
                           acceleration=acceleration if acceleration is not Acceleration.NONE else self.acceleration)
        if union_type is not None:
            raise ValueError("this CONTROL_NET is a composition: set union_type on each ZeroConv ControlNet Unit, "
                             "and leave the apply node's union_type at auto")
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

    def check_union_type(self, union_type: str | int | None, where: str = "union_type") -> None:
        """A control type this part can take (None: auto, always); the error names the type, the file and its types."""
        if union_type is None or union_type == AUTO:
            return
        if dit_format_of(self.controlnet) is not None:
            return  # a transformer ControlNet's modes: checked by check_apply with the file's own names
        if isinstance(self.controlnet, UnionControlNet):
            union_type_index(union_type, self.controlnet.num_control_types, self.name)
        elif isinstance(self.controlnet, T2IAdapter):
            raise ValueError(f"{where} is {union_type!r} but {self.name} is a T2I-Adapter, which has no control "
                             "types: set union_type to auto")
        elif self.controlnet is not None:
            raise ValueError(f"{where} is {union_type!r} but {self.name} is a plain ControlNet, not a Union "
                             "ControlNet: set union_type to auto")
        else:
            raise ValueError(f"{where} is {union_type!r} but {self.name} was loaded by another loader: choose its "
                             "type with that pack's node (e.g. core's SetUnionControlNetType) and leave union_type "
                             "at auto")

    def as_unit(self) -> "ControlPart":
        """This part as a unit of a composition (the compose node)."""
        return replace(self, composed=True)


@dataclass
class _Run:
    """State of one sampling run (pre_run to cleanup)."""

    model_sampling: Any
    percent_to_sigma: Callable[[float], float]
    hosts: dict[int, Any]  # part index -> the host control prepared for this run
    groups: tuple[tuple[int, ...], ...] = ()  # part indices run in one forward (types of one Union file)
    types: dict[int, Any] = field(default_factory=dict)  # part index -> its Union control type (None: auto)
    unet_config: ControlNetConfig | None = None  # the sampled U-Net's (where adapter features go)
    units: dict[tuple, Any] = field(default_factory=dict)  # prepared units (fitted, broadcast, encoded hints)
    progress: dict[float, tuple[float, float]] = field(default_factory=dict)  # sigma -> sampling progress


class HostFreeControlBase:
    """Outside ComfyUI: the part of comfy.controlnet.ControlBase the pack and `zeroconv run` use (the chain)."""

    def __init__(self) -> None:
        self.cond_hint_original, self.cond_hint, self.vae = None, None, None
        self.strength, self.timestep_percent_range, self.timestep_range = 1.0, (0.0, 1.0), None
        self.previous_controlnet = None
        self.extra_args: dict = {}

    def set_extra_arg(self, argument: str, value: Any = None) -> None:
        self.extra_args[argument] = value

    def set_previous_controlnet(self, controlnet: Any) -> Any:
        self.previous_controlnet = controlnet
        return self

    def pre_run(self, model: Any, percent_to_timestep_function: Callable[[float], float]) -> None:
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def cleanup(self) -> None:
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.cond_hint, self.timestep_range = None, None

    def get_models(self) -> list:
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def inference_memory_requirements(self, dtype: torch.dtype) -> int:
        previous = self.previous_controlnet
        return previous.inference_memory_requirements(dtype) if previous is not None else 0


class ZeroConvControl:
    """A control: one or several parts added in a single pass. Mixed into ControlBase (or HostFreeControlBase)."""

    def __init__(self, parts: tuple[ControlPart, ...] = ()):
        super().__init__()  # ControlBase.__init__ inside ComfyUI: its state, as core code expects it
        self.parts = tuple(parts)
        self.model_names: tuple[str, ...] = ()  # the sampled model's file(s), when the host tells us
        self._run: _Run | None = None

    # ---- what apply and compose nodes call --------------------------------------------------------------
    def applied(self, image: torch.Tensor | None, settings: ControlSettings, fit: HintFit | str = HintFit.CROP_AND_RESIZE,
                vae: Any = None, acceleration: Acceleration | str = Acceleration.NONE,
                union_type: str | int | None = AUTO) -> "ZeroConvControl":
        """A new control with this image, these settings and control type (composed parts keep their own); a
        transformer ControlNet without the VAE it needs or with a union mode its file lacks is refused here."""
        new = make_control(tuple(p.applied(image, settings, HintFit(fit), vae, Acceleration(acceleration), union_type)
                                 for p in self.parts))
        for part in new.parts:
            if part.controlnet is not None:
                check_apply(part.controlnet, part.vae, part.union_type, part.name, part.settings.mode)
        new.extra_args = dict(self.extra_args)  # core's SetUnionControlNetType type, for parts left at auto
        new.cond_hint_original, new.strength = image, settings.strength
        new.timestep_percent_range = (settings.start_percent, settings.end_percent)
        return new

    # ---- the ControlBase protocol ------------------------------------------------------------------------
    def copy(self) -> "ZeroConvControl":
        new = make_control(self.parts)
        new.strength, new.timestep_percent_range = self.strength, self.timestep_percent_range
        new.cond_hint_original, new.vae, new.model_names = self.cond_hint_original, self.vae, self.model_names
        new.extra_args = dict(self.extra_args)  # as ControlBase.copy_to: SetUnionControlNetType sets it on a copy
        return new

    def set_cond_hint(self, cond_hint: torch.Tensor, strength: float = 1.0,
                      timestep_percent_range: tuple[float, float] = (0.0, 1.0), vae: Any = None,
                      extra_concat: list | None = None) -> "ZeroConvControl":
        """What core apply nodes call: one image (B, C, H, W), strength and range for every part."""
        start, end = timestep_percent_range
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, (start, end)
        self.vae = vae
        settings = ControlSettings(strength=strength, start_percent=start, end_percent=end)
        self.parts = tuple(p.applied(cond_hint, settings, p.fit, vae, union_type=AUTO if p.composed else p.union_type)
                           for p in self.parts)
        return self

    def pre_run(self, model: Any, percent_to_timestep_function: Callable[[float], float]) -> None:
        """Once per sampling run, before any step: family check, host controls readied, the chain's pre_run."""
        family = transformer_family(model)
        unet_config = None if family is not None else sampled_unet_config(model)
        if family is not None or unet_config is not None:
            names = self.model_names or executing_model_names()
            model_name = "the sampled model" + (f" {', '.join(names)}" if names else "")
            for part in self.parts:
                if part.controlnet is not None:
                    check_part(part.controlnet, family, unet_config, part.name, model_name)
        for part in self.parts:
            if part.controlnet is not None:
                borrow_host_weights(part.controlnet, model)  # SD3.5 ControlNets use the host's patch embedding
        types = self._union_types()
        hosts = {}
        for index, part in enumerate(self.parts):
            if part.host is not None:
                if part.image is None:
                    raise ValueError(f"{part.name} has no control image; connect an image to the apply node")
                s = part.settings
                hosts[index] = part.host.copy().set_cond_hint(part.image, s.strength, (s.start_percent, s.end_percent),
                                                              vae=part.vae)
                hosts[index].pre_run(model, percent_to_timestep_function)
        self._run = _Run(model.model_sampling, percent_to_timestep_function, hosts, union_groups(self.parts, types),
                         types, unet_config)
        super().pre_run(model, percent_to_timestep_function)  # ControlBase: timestep_range, then the chain

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
        sigma = float(t[0])
        if sigma not in run.progress:
            run.progress[sigma] = progress_at(sigma, run.percent_to_sigma)
        progress = run.progress[sigma]
        active = [group for group in run.groups if any(
            (percent := self.parts[i].settings.percent_in(progress)) is not None
            and self.parts[i].settings.strength_at(percent) for i in group)]
        if not active:  # outside every part's step range, or at strength 0: no forward at all
            return previous
        ms = run.model_sampling
        step = HostStep(ms.calculate_input(t, x_noisy), ms.timestep(t), cond.get("crossattn_controlnet",
                        cond["c_crossattn"]), cond.get("y"), progress, batched_number,
                        cond_rows(transformer_options.get("cond_or_uncond"), x_noisy.shape[0]), x_noisy,
                        cond.get("guidance"))
        ours = None
        for group in active:
            part = self.parts[group[0]]
            if part.host is not None:
                out = self._host_residuals(group[0], part, x_noisy, t, cond, transformer_options, step)
            else:
                out = control_kind(part.controlnet).residuals(self._unit(group, step), step)
            ours = merge_controls(ours, out)
        return merge_controls(ours, previous)

    def get_models(self) -> list:
        """Our ControlNets for ComfyUI's memory manager (load, offload, dtype), and those of host parts."""
        models = [m for p in self.parts if p.host is not None for m in p.host.get_models()]
        for part in self.parts:
            if part.controlnet is not None and part.shared.patcher is None:
                part.shared.patcher = controlnet_patcher(part.controlnet)
            if part.controlnet is not None and part.shared.patcher is not None:
                models.append(part.shared.patcher)
        return models + super().get_models()

    def inference_memory_requirements(self, dtype: torch.dtype) -> int:
        total = sum(p.host.inference_memory_requirements(dtype) for p in self.parts if p.host is not None)
        return total + super().inference_memory_requirements(dtype)

    def cleanup(self) -> None:
        """After sampling: drop the run's hints and encodings, host copies and captured CUDA graphs."""
        if self._run is not None:
            for host in self._run.hosts.values():
                host.cleanup()
        for part in self.parts:
            for wrapped in part.shared.accelerated.values():
                wrapped.release()  # weights may move before the next run; graphs hold their addresses
        self._run = None
        super().cleanup()

    # ---- our control models ------------------------------------------------------------------------------
    def _union_types(self) -> dict[int, Any]:
        """Each part's control type: its own (union_type input), else core's SetUnionControlNetType
        (`extra_args["control_type"]`, a list of indices as comfy/cldm/cldm.py takes it; [] is auto). Checked
        against the file here, before the first step."""
        core = self.extra_args.get("control_type")
        if core is not None and len(core) > 1:
            raise ValueError(f"control_type {list(core)} names several types; ZeroConv runs several types of one "
                             "Union file as composed ZeroConv ControlNet Units, one type each")
        types = {}
        for index, part in enumerate(self.parts):
            own = part.union_type
            if own is None and core and isinstance(part.controlnet, UnionControlNet):
                own = int(core[0])
                part.check_union_type(own, "the type set by SetUnionControlNetType")
            types[index] = own
        return types

    def _unit(self, group: tuple[int, ...], step: HostStep) -> Any:
        """The prepared unit of a part (or of Union parts run together): once per latent shape in a run (the hint
        is the same at every step; an adapter's features are cached in it after the first step)."""
        key = (group, tuple(step.like.shape), step.batched_number, step.like.device)
        if key not in self._run.units:
            parts = [self.parts[i] for i in group]
            for part in parts:
                if part.image is None:
                    raise ValueError(f"{part.name} has no control image; connect an image to the apply node")
            first, types = parts[0], self._run.types
            if len(group) == 1:
                conditions = () if types[group[0]] is None else ((types[group[0]], first.image, 1.0),)
                settings = first.settings
            else:  # diffusers' multi-condition forward: each unit's strength is its condition's scale
                conditions = tuple((types[i], p.image, p.settings.strength) for i, p in zip(group, parts))
                settings = replace(first.settings, strength=1.0)
            kind = control_kind(first.controlnet)
            host_inputs = {"conditions": conditions, "unet_config": self._run.unet_config,
                           "vae_encode": vae_encoder(first.vae), "union_type": types[group[0]]}
            self._run.units[key] = kind.prepare(
                _accelerated(first), first.image, settings, first.fit, step.like, step.batched_number, first.name,
                **{k: host_inputs[k] for k in kind.host_inputs})
        return self._run.units[key]

    # ---- ControlNets from other loaders ------------------------------------------------------------------
    def _host_residuals(self, index: int, part: ControlPart, x: torch.Tensor, t: torch.Tensor, cond: dict,
                        options: dict, step: HostStep) -> dict | None:
        """A host control's own residuals, then our mode, mask and schedule; cond-only modes run only cond chunks."""
        host, settings = self._run.hosts[index], part.settings
        key = ("fit", index, tuple(x.shape[-2:]))
        if part.fit is not HintFit.CROP_AND_RESIZE and key not in self._run.units:
            # the host resizes by crop and resize; a hint already at the latent's size passes through unchanged
            host.cond_hint_original = fit_to_latent(part.image, x.shape[-2], x.shape[-1], part.fit)
            host.cond_hint = None
            self._run.units[key] = host.cond_hint_original
        rows = None
        if MODE_RULES[settings.mode].cond_only and options.get("cond_or_uncond"):
            keep = [c == 0 for c in options["cond_or_uncond"]]
            if not any(keep):
                return None
            if not all(keep):
                x, t, cond, batched_number, options, rows = _select_chunks(x, t, cond, options, keep)
        control = host.get_control(x, t, cond, step.batched_number if rows is None else sum(keep), options)
        if control is None or (settings.mode is ControlMode.BALANCED and settings.mask is None
                               and settings.schedule is None):
            return control
        if control.get("input"):
            raise ValueError(f"{part.name} is an adapter that changes the U-Net's input blocks; control modes, "
                             "masks and schedules apply to ControlNets only: use balanced with no mask or schedule")
        mask = settings.mask
        if mask is not None:
            mask = broadcast_batch(mask.to(x.device), step.like.shape[0], step.batched_number, f"{part.name}'s mask")
            mask = mask if rows is None or mask.shape[0] == 1 else mask[rows]
        percent = settings.percent_in(step.progress)
        multiplier = settings.schedule(percent) if settings.schedule is not None else 1.0  # strength: applied
        out = scale_output(as_residuals(control), settings.mode, multiplier, mask)
        if rows is not None:
            where = rows.nonzero()[:, 0]
            out = out.map(lambda _, r: r.new_zeros((step.like.shape[0], *r.shape[1:])).index_copy(0, where, r))
        return as_host_dict(out, step.like)


def _select_chunks(x: torch.Tensor, t: torch.Tensor, cond: dict, options: dict, keep: list[bool]) -> tuple:
    """The model call restricted to some cond/uncond chunks (every tensor batched like x is sliced)."""
    rows = torch.tensor(keep, device=x.device).repeat_interleave(x.shape[0] // len(keep))
    n = x.shape[0]

    def cut(value: Any) -> Any:
        return value[rows] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n else value

    options = {**options, "cond_or_uncond": [c for c, k in zip(options["cond_or_uncond"], keep) if k]}
    cond = {k: cut(v) for k, v in cond.items()}
    if "transformer_options" in cond:
        cond["transformer_options"] = options
    return x[rows], t[rows], cond, sum(keep), options, rows


def union_groups(parts: tuple[ControlPart, ...], types: dict[int, Any]) -> tuple[tuple[int, ...], ...]:
    """Part indices in the order they run; typed parts of the SAME Union model with the same step range, mode,
    mask, schedule, fit and acceleration (and distinct types) form one group, run in one forward with per-type
    strengths (diffusers' ControlNetUnionModel multi-condition forward). Everything else runs on its own."""
    groups: list[list[int]] = []
    for index, part in enumerate(parts):
        for group in groups:
            head = parts[group[0]]
            if (isinstance(part.controlnet, UnionControlNet) and part.controlnet is head.controlnet
                    and types[index] is not None and types[group[0]] is not None
                    and _same_application(part, head)
                    and all(_type_key(part, types[index]) != _type_key(parts[i], types[i]) for i in group)):
                group.append(index)
                break
        else:
            groups.append([index])
    return tuple(tuple(g) for g in groups)


def _type_key(part: ControlPart, control_type: Any) -> int:
    return union_type_index(control_type, part.controlnet.num_control_types, part.name)


def _same_application(a: ControlPart, b: ControlPart) -> bool:
    sa, sb = a.settings, b.settings
    return (sa.start_percent, sa.end_percent, sa.mode, sa.schedule, a.fit, a.acceleration) == \
        (sb.start_percent, sb.end_percent, sb.mode, sb.schedule, b.fit, b.acceleration) \
        and sa.mask is sb.mask and sa.strength > 0 and sb.strength > 0


def _accelerated(part: ControlPart) -> ControlNet | AcceleratedControlNet:
    if part.acceleration is Acceleration.NONE:
        return part.controlnet
    if not isinstance(part.controlnet, ControlNet):
        logger.info("%s: accelerate %s applies to U-Net ControlNets; this one runs eager", part.name,
                    part.acceleration.value)
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
            raise ValueError(f"the sampled model ({type(model_config).__name__}) is not an SD1.x, SD2.x or SDXL U-Net "
                             "nor a Flux.1 or SD3 transformer; ZeroConv ControlNets steer only those: use a ControlNet "
                             "made for this model")
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


# ---- making controls -------------------------------------------------------------------------------------
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
    if comfy_available():
        from comfy.controlnet import ControlBase
    else:
        ControlBase = HostFreeControlBase
    return type("ZeroConvControlObject", (ZeroConvControl, ControlBase), {"__module__": __name__})


def load_control(path: Path, model: Any = None) -> tuple[ZeroConvControl, Any]:
    """A file as a control: ours when the library reads the format (ControlNets, Union ControlNets, T2I-Adapters),
    else (inside ComfyUI) ComfyUI's loader's.

    model: the MODEL that diff and Control-LoRA files are relative to (a patcher with .model.diffusion_model).
    """
    family = file_family(path)
    dtype = host_dtype(FAMILY_DTYPES[family]) if family else host_dtype()
    try:
        if model is None:  # a plain or Union ControlNet, or a T2I-Adapter
            loaded = load_control_cached(path, dtype=dtype)
        else:  # relative to this base model: not cached across models
            loaded = load_controlnet(path, base_unet=model.model.diffusion_model, dtype=dtype)
    except ValueError:
        host = None if _needs_base(path) else host_load_controlnet(str(path), model)
        if host is None:
            raise
        logger.warning("%s is in a format ZeroConv does not read; loaded by ComfyUI's loader (apply options still work)",
                       path.name)
        return make_control((ControlPart(host=host, name=path.name),)), None
    return make_control((ControlPart(loaded.model, name=path.name),)), getattr(loaded, "metadata", None)


def _needs_base(path: Path) -> bool:
    """A diff / Control-LoRA file: never handed to ComfyUI's loader without its base (it would load silently wrong)."""
    from ...controlnet_model.safetensors_io import open_weights

    try:
        return detect_format(open_weights(path).keys()) in NEEDS_BASE
    except ValueError:
        return False  # a layout the library does not know: ComfyUI may
