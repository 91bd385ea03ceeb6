"""Where ControlNet residuals enter a U-Net, and how strength, step range, mask and mode scale them.

This is the one module that knows it (Zhang et al. 2023, Eq. 4 and §3.4-3.5):
  * skip residual i is added to the skip tensor of input block i before the decoder concatenates it;
  * the middle residual is added to the output of the middle block;
  * a T2I-Adapter's feature for input block i is added to the hidden state right after that block, so it flows
    on through the encoder and into the skip (ComfyUI openaimodel.py: apply_control(h, control, 'input') after
    each input block, before hs.append(h)); an SDXL adapter's last feature goes after the middle block;
  * several ControlNets and adapters are composed by adding their (scaled) residuals.
`ldm_unet_forward` walks an LDM-layout U-Net with that rule; `compute_residuals` runs the ControlNets and
adapters and scales their outputs; `residuals_injected` gives a U-Net whose forward has no seam for residuals
one, for the duration of a `with` block.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import timestep_embedding
from .config import ControlNetConfig, check_compatible
from .hint import HintFit, centre_crop, fit_hint, fit_to_latent, hint_channels
from .network import ControlNet, ControlNetOutput
from .schedule import StrengthSchedule
from .t2i_adapter import AdapterKind, AdapterOutput, T2IAdapter, adapter_hint_size, place_features, placement
from .union import UnionCondition, UnionConfig, UnionControlNet, union_type_index


@dataclass(frozen=True)
class Residuals:
    """Everything a set of controls adds to one U-Net pass: ControlNet residuals and adapter features."""

    control: ControlNetOutput | None = None
    adapter: AdapterOutput | None = None

    def __add__(self, other: "Residuals") -> "Residuals":
        def plus(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else a + b
        return Residuals(plus(self.control, other.control), plus(self.adapter, other.adapter))


AnyResiduals = ControlNetOutput | AdapterOutput | Residuals


def _split(residuals: AnyResiduals | None) -> tuple[ControlNetOutput | None, AdapterOutput | None]:
    if residuals is None:
        return None, None
    if isinstance(residuals, Residuals):
        return residuals.control, residuals.adapter
    if isinstance(residuals, AdapterOutput):
        return None, residuals
    if isinstance(residuals, ControlNetOutput):
        return residuals, None
    raise TypeError(f"residuals must be a ControlNetOutput, AdapterOutput or Residuals, got {type(residuals).__name__}")

logger = logging.getLogger(__name__)


# ---- walking the U-Net ---------------------------------------------------------------------------------
def as_residuals(control: Any) -> ControlNetOutput | None:
    """Accept our ControlNetOutput or a host-style dict {'output': [per input block], 'middle': [one]}."""
    if control is None or isinstance(control, ControlNetOutput):
        return control
    if isinstance(control, dict):
        skips, middle = list(control.get("output") or []), list(control.get("middle") or [])
        if not skips and not middle:
            return None
        if len(middle) != 1:
            raise ValueError(f"control dict needs exactly one 'middle' residual, got {len(middle)}")
        return ControlNetOutput(tuple(skips), middle[0])
    raise TypeError(f"control must be a ControlNetOutput or a dict of residual lists, got {type(control).__name__}")


def from_host_dict(control: Any) -> Residuals | None:
    """A host-style control dict with an 'input' list too (ComfyUI pops each list from its end, so the last
    entry of 'input' belongs to input block 0); a lone 'middle' (an SDXL adapter's) goes to the adapter part."""
    if not isinstance(control, dict) or not control.get("input"):
        out = as_residuals(control)
        return None if out is None else Residuals(out)
    adapter_in = tuple(reversed(control["input"]))
    middle = list(control.get("middle") or [])
    if control.get("output"):
        return Residuals(as_residuals(control), AdapterOutput(adapter_in))
    if len(middle) > 1:
        raise ValueError(f"control dict needs at most one 'middle' residual, got {len(middle)}")
    return Residuals(None, AdapterOutput(adapter_in, middle[0] if middle else None))


def _add(target: torch.Tensor, residual: torch.Tensor | None, where: str) -> torch.Tensor:
    if residual is None:
        return target
    if residual.shape[1:] != target.shape[1:] or residual.shape[0] not in (1, target.shape[0]):
        raise ValueError(f"ControlNet residual for {where} has shape {tuple(residual.shape)} but the U-Net's "
                         f"tensor there is {tuple(target.shape)}: the ControlNet was made for another model family "
                         "or the control image does not match the latent size")
    return target + residual.to(target.dtype)


def ldm_unet_forward(unet: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                     y: torch.Tensor | None = None, residuals: AnyResiduals | None = None) -> torch.Tensor:
    """Forward of an LDM-layout U-Net (input_blocks, middle_block, output_blocks, out) with residuals added:
    ControlNet residuals on the skips and the middle, adapter features after input blocks and the middle."""
    control, adapter = _split(residuals)
    family = getattr(getattr(unet, "config", None), "family", "this model")
    if control is not None and len(control.down) != len(unet.input_blocks):
        raise ValueError(f"the ControlNet gives {len(control.down)} skip residuals but {family} has "
                         f"{len(unet.input_blocks)} skip connections: the ControlNet belongs to another model family")
    if adapter is not None and len(adapter.input) != len(unet.input_blocks):
        raise ValueError(f"the adapter features are placed on {len(adapter.input)} input blocks but {family} has "
                         f"{len(unet.input_blocks)}: place them for this U-Net (AdapterUnit.unet_config)")
    dtype = unet.input_blocks[0][0].weight.dtype
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(dtype))
    if hasattr(unet, "label_emb"):
        if y is None:
            raise ValueError("this U-Net has a label embedding (SDXL ADM) and needs y")
        emb = emb + unet.label_emb(y.to(dtype))
    h, context = x.to(dtype), None if context is None else context.to(dtype)
    skips = []
    for i, block in enumerate(unet.input_blocks):
        h = block(h, emb, context)
        if adapter is not None:
            h = _add(h, adapter.input[i], f"input block {i} (adapter feature)")
        skips.append(h)
    h = unet.middle_block(h, emb, context)
    if control is not None:
        h = _add(h, control.mid, "the middle block")
    if adapter is not None:
        h = _add(h, adapter.mid, "the middle block (adapter feature)")
    for block in unet.output_blocks:
        skip = skips.pop()
        if control is not None:
            skip = _add(skip, control.down[len(skips)], f"skip connection {len(skips)}")
        h = block(torch.cat([h, skip], dim=1), emb, context)
    return unet.out(h).to(x.dtype)


@contextlib.contextmanager
def residuals_injected(unet: nn.Module, residuals: AnyResiduals | None) -> Iterator[nn.Module]:
    """For a U-Net whose forward takes no residuals: route its forward through ldm_unet_forward, then restore."""
    had_own = "forward" in vars(unet)
    original = vars(unet).get("forward")

    def forward(x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        return ldm_unet_forward(unet, x, timesteps, context, y, residuals)

    unet.forward = forward
    try:
        yield unet
    finally:
        if had_own:
            unet.forward = original
        else:
            del unet.forward


# ---- control modes (data) ------------------------------------------------------------------------------
class ControlMode(str, Enum):
    BALANCED = "balanced"
    PROMPT_MORE_IMPORTANT = "prompt_more_important"
    CONTROLNET_MORE_IMPORTANT = "controlnet_more_important"
    CFG_RESOLUTION_WEIGHTING = "cfg_resolution_weighting"


class OutputScaling(str, Enum):
    CONSTANT = "constant"  # every residual x strength
    SOFT = "soft"  # residual i of N+1 x base^(N - i): deeper blocks weigh more (A1111 soft injection, guess mode)
    RESOLUTION = "resolution"  # residual x (latent height / residual height): the paper's CFG-RW, w_i = 64 / h_i


@dataclass(frozen=True)
class ModeRule:
    scaling: OutputScaling
    cond_only: bool  # the unconditional rows of a CFG batch get no control


MODE_RULES: dict[ControlMode, ModeRule] = {
    ControlMode.BALANCED: ModeRule(OutputScaling.CONSTANT, cond_only=False),
    ControlMode.PROMPT_MORE_IMPORTANT: ModeRule(OutputScaling.SOFT, cond_only=False),
    ControlMode.CONTROLNET_MORE_IMPORTANT: ModeRule(OutputScaling.SOFT, cond_only=True),
    ControlMode.CFG_RESOLUTION_WEIGHTING: ModeRule(OutputScaling.RESOLUTION, cond_only=True),
}
# 0.825 as in the original guess mode and A1111; recomputed for the number of outputs (SDXL: 0.825^9 .. 1.0).
SOFT_INJECTION_BASE = 0.825


def output_scales(mode: ControlMode, heights: Sequence[int]) -> list[float]:
    """Per-residual multipliers for a mode; `heights` are the residual heights, skips first, middle last."""
    scaling = MODE_RULES[ControlMode(mode)].scaling
    n = len(heights)
    if scaling is OutputScaling.CONSTANT:
        return [1.0] * n
    if scaling is OutputScaling.SOFT:
        return [SOFT_INJECTION_BASE ** (n - 1 - i) for i in range(n)]
    return [heights[0] / h for h in heights]


# ---- one control, and several --------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlSettings:
    """How one ControlNet is applied: the apply node's inputs."""

    strength: float = 1.0
    start_percent: float = 0.0  # fraction of sampling (0 = first, noisiest step) where the control starts
    end_percent: float = 1.0
    mode: ControlMode = ControlMode.BALANCED
    mask: torch.Tensor | None = field(default=None, compare=False)  # (1 or B, H, W) in 0..1, any resolution
    schedule: StrengthSchedule | None = None  # strength multiplier over sampling progress

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got start {self.start_percent} "
                             f"and end {self.end_percent}; swap them if they are in the wrong order")
        object.__setattr__(self, "mode", ControlMode(self.mode))
        if self.mask is not None:
            mask = self.mask[None] if self.mask.ndim == 2 else self.mask
            if mask.ndim == 4 and mask.shape[1] == 1:
                mask = mask[:, 0]
            if mask.ndim != 3:
                raise ValueError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(self.mask.shape)}")
            object.__setattr__(self, "mask", mask)

    def percent_in(self, progress: tuple[float, float]) -> float | None:
        """A step's progress interval (progress_at) as this control sees it: clamped into its range, or None when
        the step is outside it (the gate: start <= high and low <= end, ComfyUI's sigma gate with ties)."""
        low, high = progress
        if high < self.start_percent or low > self.end_percent:
            return None
        return min(max(low, self.start_percent), self.end_percent)

    def strength_at(self, percent: float) -> float:
        """Effective strength at a point of sampling; 0 outside the step range."""
        if not self.start_percent <= percent <= self.end_percent:
            return 0.0
        return self.strength * (self.schedule(percent) if self.schedule is not None else 1.0)


@dataclass(frozen=True)
class ControlUnit:
    """A ControlNet with its condition image and settings, ready to run at each sampling step."""

    controlnet: ControlNet
    hint: torch.Tensor  # (1 or B, C, 8h, 8w) in [0, 1]; unused when `conditions` are given
    settings: ControlSettings = ControlSettings()
    encoded_hint: torch.Tensor | None = None  # controlnet.encode_hint(hint), cached across the steps of a run
    # Union ControlNets only: the (type, hint, scale) run together in one forward; () runs core's "auto" on `hint`
    conditions: tuple[UnionCondition, ...] = ()

    def __post_init__(self) -> None:
        if self.conditions and not isinstance(getattr(self.controlnet, "inner", self.controlnet), UnionControlNet):
            raise ValueError("control types (conditions) apply to a Union ControlNet only; this is a plain "
                             "ControlNet: drop the types")
        object.__setattr__(self, "conditions", tuple(self.conditions))


def _rows(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or rows is None or t.shape[0] == 1:
        return t
    return t[rows]


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask[:, None].float(), size=size, mode="bilinear", align_corners=False)  # (B, 1, h, w)


def scale_output(out: ControlNetOutput | AdapterOutput, mode: ControlMode, strength: float,
                 mask: torch.Tensor | None = None, global_average_pooling: bool = False) -> Any:
    """Apply strength, the mode's per-output scales, global pooling (shuffle) and the spatial mask.

    For adapter features the mode's scales run over the features in order (input blocks, then the middle)."""
    scales = output_scales(mode, [r.shape[-2] for r in out.all])

    def scale(i: int, r: torch.Tensor) -> torch.Tensor:
        if global_average_pooling:
            r = r.mean(dim=(2, 3), keepdim=True).expand_as(r)
        factor = strength * scales[i]
        r = r if factor == 1.0 else r * factor  # balanced at strength 1: the residual as is, no pass over it
        if mask is not None:
            r = r * _resize_mask(mask, r.shape[-2:]).to(r)
        return r

    return out.map(scale)


def mask_to_tokens(mask: torch.Tensor, latent_hw: tuple[int, int], patch: int = 2) -> torch.Tensor:
    """A (B, H, W) mask as a token mask (B, h*w, 1) over a transformer's 2x2-patch image tokens, row-major."""
    grid = (-(-latent_hw[0] // patch), -(-latent_hw[1] // patch))
    return _resize_mask(mask, grid).flatten(2).transpose(1, 2)


def scale_tokens(out: Any, strength: float, token_mask: torch.Tensor | None = None) -> Any:
    """Strength and token mask on token-space residuals (B, L, C) of a transformer ControlNet (anything with
    `.map(fn)`, e.g. dit_control.TokenResiduals): residual x strength x mask of its token."""
    def scale(r: torch.Tensor) -> torch.Tensor:
        r = r * strength
        return r if token_mask is None else r * token_mask[:, : r.shape[1]].to(r)

    return out.map(scale)


def _active(settings: ControlSettings, x: torch.Tensor, percent: float, cond_rows: torch.Tensor | None,
            cond_side_only: bool = False) -> tuple[float, torch.Tensor | None] | None:
    """(strength, rows to run or None for all) at this step, or None when the control has no effect."""
    strength = settings.strength_at(percent)
    if strength == 0.0:
        return None
    if settings.mask is not None and settings.mask.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"the mask has a batch of {settings.mask.shape[0]} but the latent batch is {x.shape[0]}; "
                         "give one mask or one per latent")
    rows = cond_rows if (MODE_RULES[settings.mode].cond_only or cond_side_only) else None
    if rows is not None and rows.all():
        rows = None
    if rows is not None and not rows.any():
        return None
    return strength, rows


def run_control(unit: ControlUnit, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None, percent: float, cond_rows: torch.Tensor | None = None) -> ControlNetOutput | None:
    """Residuals of one ControlNet at one step, or None when it has no effect (its forward is skipped).

    cond_rows: (B,) bool, True for the conditional rows of a CFG batch; None means every row is conditional.
    """
    settings, cfg = unit.settings, unit.controlnet.config
    active = _active(settings, x, percent, cond_rows, cfg.global_average_pooling)
    if active is None:
        return None
    strength, rows = active
    if unit.conditions:
        conditions = [replace(c, hint=_rows(c.hint, rows), encoded=_rows(c.encoded, rows)) for c in unit.conditions]
        out = unit.controlnet(_rows(x, rows), None, _rows(timesteps, rows), _rows(context, rows), _rows(y, rows),
                              conditions=conditions)
    else:
        out = unit.controlnet(_rows(x, rows), _rows(unit.hint, rows), _rows(timesteps, rows), _rows(context, rows),
                              _rows(y, rows), guided_hint=_rows(unit.encoded_hint, rows))
    out = scale_output(out, settings.mode, strength, _rows(settings.mask, rows), cfg.global_average_pooling)
    if rows is None:
        return out

    def scatter(_: int, r: torch.Tensor) -> torch.Tensor:
        full = r.new_zeros((x.shape[0], *r.shape[1:]))
        full[rows] = r
        return full

    return out.map(scatter)


def compute_residuals(units: Sequence["ControlUnit | AdapterUnit"], x: torch.Tensor, timesteps: torch.Tensor,
                      context: torch.Tensor, y: torch.Tensor | None = None, percent: float = 0.0,
                      cond_rows: torch.Tensor | None = None,
                      unet_config: ControlNetConfig | None = None) -> Residuals | None:
    """Sum of the residuals of several ControlNets and adapters at one step, for one U-Net pass (paper §3:
    composition by addition; ComfyUI control_merge adds the adapters' 'input' lists the same way)."""
    total: Residuals | None = None
    for unit in units:
        if isinstance(unit, AdapterUnit):
            adapter = run_adapter(unit, x, percent, cond_rows)
            part = None if adapter is None else Residuals(adapter=adapter)
        else:
            if unet_config is not None:
                check_compatible(unit.controlnet.config, unet_config)
            control = run_control(unit, x, timesteps, context, y, percent, cond_rows)
            part = None if control is None else Residuals(control=control)
        if part is not None:
            total = part if total is None else total + part
    return total


# ---- one model call of a host sampler ------------------------------------------------------------------
def progress_at(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 40) -> tuple[float, float]:
    """Sampling progress (0 = first step, 1 = last) of a sigma: the inverse of the host's `percent_to_sigma`, as
    the interval (low, high) of progress whose sigma is `sigma` (zero-width but for float ties).

    The step range has one representation, progress: it is what users set (start/end percent) and what strength
    schedules are keyed by. The host's sampler speaks sigma, and ComfyUI gates its own ControlNets with
    `percent_to_sigma(start) >= sigma >= percent_to_sigma(end)` (comfy/controlnet.py ControlNet.get_control).
    Inverting that same (decreasing) function by bisection, ties included (ComfyUI's `normal` schedule lands
    exactly on percent_to_sigma(0.2) in 6 steps), gives a progress that gates exactly as core does
    (`ControlSettings.percent_in`), for any model sampling (discrete, EDM, flow; comfy/model_sampling.py), with no
    step count or timestep table hard-coded here. Once per step; 40 halvings are below float precision.
    """
    def first(passes: Callable[[float], bool]) -> float:  # smallest progress where passes() holds
        low, high = 0.0, 1.0
        for _ in range(iterations):
            middle = (low + high) / 2
            low, high = (low, middle) if passes(middle) else (middle, high)
        return high

    return first(lambda p: percent_to_sigma(p) <= sigma), first(lambda p: percent_to_sigma(p) < sigma)


def broadcast_batch(tensor: torch.Tensor, batch: int, batched_number: int, what: str) -> torch.Tensor:
    """A per-latent tensor (images, masks) to a batch of `batched_number` chunks (cond, uncond), as ComfyUI
    does (comfy/utils.py broadcast_image_to): one is broadcast; otherwise cut or repeated to a chunk and tiled.
    A count that is not one per latent is fixed that way, and logged."""
    if tensor.shape[0] == 1:
        return tensor
    per_chunk = batch // batched_number
    if tensor.shape[0] != per_chunk:
        logger.warning("%s has a batch of %d but there are %d latents: %s", what, tensor.shape[0], per_chunk,
                       "the extra ones are not used" if tensor.shape[0] > per_chunk else "it is repeated")
    reps = -(-per_chunk // tensor.shape[0])
    chunk = tensor.repeat(reps, *([1] * (tensor.ndim - 1)))[:per_chunk]
    return chunk.repeat(batched_number, *([1] * (tensor.ndim - 1)))


def cond_rows(cond_or_uncond: Sequence[int] | None, batch: int) -> torch.Tensor | None:
    """(B,) True on rows of positive conds (ComfyUI's cond_or_uncond 0), one chunk per entry; None if unknown."""
    if not cond_or_uncond:
        return None
    return torch.tensor([c == 0 for c in cond_or_uncond]).repeat_interleave(batch // len(cond_or_uncond))


def as_host_dict(out: ControlNetOutput | None, like: torch.Tensor) -> dict | None:
    """Our typed output as ComfyUI's control dict; fresh lists, since the U-Net pops them
    (comfy/ldm/modules/diffusionmodules/openaimodel.py apply_control)."""
    if out is None:
        return None
    return {"input": [], "middle": [out.mid.to(like.device)], "output": [r.to(like.device) for r in out.down]}


def merge_controls(ours: dict | None, previous: dict | None) -> dict | None:
    """Element-wise sum of two host control dicts (ComfyUI's ControlBase.control_merge, without in-place edits)."""
    if ours is None or previous is None:
        return ours if previous is None else previous
    merged = {}
    for key in ("input", "middle", "output"):
        a, b = list(ours.get(key) or []), list(previous.get(key) or [])
        n = max(len(a), len(b))
        if key == "input":  # popped from the end: the last entry is input block 0, so align the ends
            a, b = [None] * (n - len(a)) + a, [None] * (n - len(b)) + b
        else:
            a, b = a + [None] * (n - len(a)), b + [None] * (n - len(b))
        merged[key] = [y if x is None else x if y is None else x + y for x, y in zip(a, b)]
    return merged


@dataclass(frozen=True)
class HostStep:
    """One model call of a host sampler, as a control model needs it (U-Net inputs, already scaled)."""

    x: torch.Tensor  # (B, C, h, w) U-Net input (the host's calculate_input of the noisy latent)
    timesteps: torch.Tensor  # (B,) U-Net timesteps
    context: torch.Tensor  # (B, T, D) cross-attention context
    y: torch.Tensor | None  # (B, adm) SDXL ADM vector, or None
    progress: tuple[float, float]  # sampling progress of this step (progress_at)
    batched_number: int  # chunks in the batch (cond, uncond)
    rows: torch.Tensor | None  # (B,) True on conditional rows; None when every row is conditional
    like: torch.Tensor  # the host's noisy latent: device of the returned residuals
    guidance: torch.Tensor | None = None  # (B,) distilled guidance of Flux dev (the cond's "guidance"), or None


# A Union condition as a host gives it: (type name or index or None for "auto", image (B, C, H, W), scale).
HostCondition = tuple[Any, torch.Tensor, float]


def _no_types(name: str, what: str, conditions: Sequence[HostCondition]) -> None:
    if conditions:
        raise ValueError(f"{name} is {what}, which has no control types: set union_type to auto (and do not use "
                         "SetUnionControlNetType on it)")


@dataclass(frozen=True)
class ControlKind:
    """How one family of control models runs under a host sampler: `prepare` once per latent shape of a run
    (fit, broadcast, encode the hint; it takes the host inputs named in `host_inputs`), `residuals` at every model
    call (a host control dict or None), `check` once per run against the sampled U-Net's config (None for
    transformer ControlNets, whose family the host checks)."""

    # (model, image, settings, fit, latent, batched_number, name, **{name: host input for name in host_inputs})
    prepare: Callable[..., Any]
    residuals: Callable[[Any, HostStep], dict | None]
    check: Callable[[Any, ControlNetConfig, str, str], None] | None = None  # (model, unet config, name, model name)
    # the host inputs `prepare` takes by keyword: "conditions" (a Union's (type, image, scale)), "unet_config" (the
    # sampled U-Net's), "vae_encode" (pixels -> latent with the base's VAE), "union_type" (a Flux union mode)
    host_inputs: tuple[str, ...] = ("conditions", "unet_config")


def _fitted_hint(controlnet: Any, image: torch.Tensor, fit: HintFit, latent: torch.Tensor, batched_number: int,
                 name: str) -> torch.Tensor:
    device = next(controlnet.parameters()).device
    hint = fit_to_latent(image.to(device, torch.float32), latent.shape[-2], latent.shape[-1], fit)
    hint = hint_channels(hint, controlnet.config.hint_channels, name)
    return broadcast_batch(hint, latent.shape[0], batched_number, f"{name}'s control image")


def broadcast_mask(settings: ControlSettings, device: torch.device, latent: torch.Tensor, batched_number: int,
                   name: str) -> ControlSettings:
    """The settings with their mask (if any) on `device`, broadcast to the batch as the hint is (broadcast_batch)."""
    if settings.mask is None:
        return settings
    mask = broadcast_batch(settings.mask.to(device), latent.shape[0], batched_number, f"{name}'s mask")
    return replace(settings, mask=mask)


def prepare_controlnet(controlnet: Any, image: torch.Tensor, settings: ControlSettings, fit: HintFit,
                       latent: torch.Tensor, batched_number: int, name: str,
                       conditions: Sequence[HostCondition] = (), unet_config: ControlNetConfig | None = None) -> ControlUnit:
    """A ControlNet's unit for one latent shape: hint fitted to 8x the latent, its channels, broadcast to the
    batch, encoded once (the hint block is the same at every step)."""
    _no_types(name, "a plain ControlNet", conditions)
    hint = _fitted_hint(controlnet, image, fit, latent, batched_number, name)
    settings = broadcast_mask(settings, hint.device, latent, batched_number, name)
    with torch.no_grad():
        encoded = controlnet.encode_hint(hint.to(controlnet.dtype))
    return ControlUnit(controlnet, hint, settings, encoded)


def prepare_union(controlnet: Any, image: torch.Tensor | None, settings: ControlSettings, fit: HintFit,
                  latent: torch.Tensor, batched_number: int, name: str,
                  conditions: Sequence[HostCondition] = (), unet_config: ControlNetConfig | None = None) -> ControlUnit:
    """A Union ControlNet's unit: no conditions (or one of type None) is core's "auto" on `image`; one or more
    typed conditions run together in one forward (each image fitted and encoded once). The type is checked
    against the file here, so a missing type fails before the first step's forward."""
    typed = [c for c in conditions if c[0] is not None and c[0] != "auto"]
    if len(typed) != len(conditions) and len(conditions) > 1:
        raise ValueError(f"{name}: auto (no type) is one condition on its own; give every composed unit its type")
    if not typed:
        source = image if not conditions else conditions[0][1]
        unit = prepare_controlnet(controlnet, source, settings, fit, latent, batched_number, name)
        return unit
    count = UnionConfig.of(controlnet.config).num_control_types
    conds = []
    for control_type, cond_image, scale in typed:
        index = union_type_index(control_type, count, name)
        hint = _fitted_hint(controlnet, cond_image, fit, latent, batched_number, name)
        with torch.no_grad():
            encoded = controlnet.encode_hint(hint.to(controlnet.dtype))
        conds.append(UnionCondition(index, None, float(scale), encoded))
    settings = broadcast_mask(settings, conds[0].encoded.device, latent, batched_number, name)
    return ControlUnit(controlnet, None, settings, conds[0].encoded, tuple(conds))


def controlnet_residuals(unit: ControlUnit, step: HostStep) -> dict | None:
    """A ControlNet's residuals at one model call, keyed as ComfyUI's U-Net consumes them ('output', 'middle')."""
    device = unit.encoded_hint.device
    y = None if step.y is None else step.y.to(device)
    rows = None if step.rows is None else step.rows.to(device)
    with torch.no_grad():
        out = run_control(unit, step.x.to(device), step.timesteps.to(device), step.context.to(device), y,
                          unit.settings.percent_in(step.progress), rows)
    return as_host_dict(out, step.like)


def check_controlnet(controlnet: Any, unet_config: ControlNetConfig, name: str, model_name: str) -> None:
    check_compatible(controlnet.config, unet_config, f"ControlNet {name}", model_name)


# ComfyUI's SDXL adapter gives one more 'input' entry than SDXL has input blocks, a None for a block that does
# not exist (comfy/t2i_adapter/adapter.py Adapter.forward, features[1:]); ours pad to the same length, so core's
# control_merge (index-aligned) adds them to the right blocks.
HOST_INPUT_PADDING: dict[AdapterKind, int] = {AdapterKind.FULL_XL: 1}


def as_adapter_host_dict(out: AdapterOutput | None, kind: AdapterKind, like: torch.Tensor) -> dict | None:
    """Adapter features as ComfyUI's control dict: 'input' reversed (the U-Net pops it after each input block),
    padded as core's; 'middle' holds an SDXL adapter's last feature (empty for SD1.x)."""
    if out is None:
        return None
    move = lambda r: None if r is None else r.to(like.device)  # noqa: E731
    inputs = [None] * HOST_INPUT_PADDING.get(kind, 0) + [move(r) for r in reversed(out.input)]
    return {"input": inputs, "middle": [] if out.mid is None else [move(out.mid)], "output": []}


def prepare_adapter(adapter: T2IAdapter, image: torch.Tensor, settings: ControlSettings, fit: HintFit,
                    latent: torch.Tensor, batched_number: int, name: str,
                    conditions: Sequence[HostCondition] = (),
                    unet_config: ControlNetConfig | None = None) -> AdapterUnit:
    """A T2I-Adapter's unit for one latent shape; its features are computed at the first step and cached
    (AdapterCache), so the adapter runs once per latent size in a run."""
    _no_types(name, "a T2I-Adapter", conditions)
    if HintFit(fit) is not HintFit.CROP_AND_RESIZE:
        image = fit_to_latent(image.float(), latent.shape[-2], latent.shape[-1], HintFit(fit))
    hint = broadcast_batch(image.float(), latent.shape[0], batched_number, f"{name}'s control image")
    device = next(adapter.parameters()).device
    return AdapterUnit(adapter, hint, broadcast_mask(settings, device, latent, batched_number, name), unet_config)


def adapter_residuals(unit: AdapterUnit, step: HostStep) -> dict | None:
    """A T2I-Adapter's (cached) features at one model call, scaled, as ComfyUI's 'input' / 'middle' lists."""
    rows = None if step.rows is None else step.rows.to(step.like.device)
    out = run_adapter(unit, step.like, unit.settings.percent_in(step.progress), rows)
    return as_adapter_host_dict(out, unit.adapter.config.kind, step.like)


def check_adapter(adapter: T2IAdapter, unet_config: ControlNetConfig, name: str, model_name: str) -> None:
    try:
        placement(adapter.config, unet_config)
    except ValueError as exc:
        raise ValueError(f"T2I-Adapter {name} does not fit {model_name}: {exc}") from None


# Control model families by class (the nearest registered base class wins): a new family adds one entry.
CONTROL_KINDS: dict[type, ControlKind] = {
    ControlNet: ControlKind(prepare_controlnet, controlnet_residuals, check_controlnet),
    UnionControlNet: ControlKind(prepare_union, controlnet_residuals, check_controlnet),
    T2IAdapter: ControlKind(prepare_adapter, adapter_residuals, check_adapter),
}


def control_kind(model: Any) -> ControlKind:
    """The ControlKind of a control model (its class or nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls in CONTROL_KINDS:
            return CONTROL_KINDS[cls]
    raise TypeError(f"{type(model).__name__} is not a control model ZeroConv can run; known: "
                    f"{', '.join(c.__name__ for c in CONTROL_KINDS)}")


# ---- T2I-Adapters: run once per latent size ----------------------------------------------------------------
class AdapterCache:
    """The placed features of one adapter unit for the last few latent sizes.

    An adapter depends only on its control image, resized to the latent's size: not on the noisy latent, the
    timestep or the prompt. So it runs once per latent size (and dtype/device) and every step reuses the result;
    a step then costs only the additions. ComfyUI's T2IAdapter.get_control keeps `control_input` the same way,
    dropping it when the latent size changes. Two sizes are kept (e.g. a hires-fix pass and the base pass).
    """

    SIZE = 2

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, AdapterOutput] = OrderedDict()
        self.runs = 0  # how many times the adapter ran (tests and benchmarks read it)

    def get(self, key: tuple, make: Any) -> AdapterOutput:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = make()
        self.runs += 1
        self.entries[key] = value
        while len(self.entries) > self.SIZE:
            self.entries.popitem(last=False)
        return value


@dataclass(frozen=True)
class AdapterUnit:
    """A T2I-Adapter with its control image and settings (strength, step range, mask, mode, schedule)."""

    adapter: T2IAdapter
    hint: torch.Tensor  # (1 or B, C, H, W) in [0, 1], any size: fitted to adapter_hint_size (crop and resize)
    settings: ControlSettings = ControlSettings()
    unet_config: ControlNetConfig | None = None  # where the features go; None: the adapter's family (SD1.5 / SDXL)
    cache: AdapterCache = field(default_factory=AdapterCache, compare=False, repr=False)


def adapter_features(unit: AdapterUnit, latent_hw: tuple[int, int], dtype: torch.dtype,
                     device: torch.device) -> AdapterOutput:
    """The unit's unscaled features placed on the U-Net for a latent size: computed once, then cached."""
    latent_hw = (int(latent_hw[0]), int(latent_hw[1]))

    def make() -> AdapterOutput:
        size = adapter_hint_size(unit.adapter, latent_hw)
        # ComfyUI's fit (T2IAdapter.get_control, comfy/utils.py common_upscale "center"): crop to the aspect, resize
        hint = fit_hint(centre_crop(unit.hint, size[1] / size[0]), *size, HintFit.RESIZE, mode="nearest-exact")
        weight = next(unit.adapter.parameters())
        with torch.no_grad():
            features = unit.adapter(hint.to(weight.device))
        placed = place_features(features, unit.adapter.config, unit.unet_config)
        return placed.map(lambda _, f: f.to(device=device, dtype=dtype))

    return unit.cache.get((latent_hw, dtype, device), make)


def run_adapter(unit: AdapterUnit, x: torch.Tensor, percent: float,
                cond_rows: torch.Tensor | None = None) -> AdapterOutput | None:
    """The adapter's features at one step, scaled as run_control scales residuals, or None when without effect."""
    settings = unit.settings
    active = _active(settings, x, percent, cond_rows)
    if active is None:
        return None
    strength, rows = active
    out = scale_output(adapter_features(unit, tuple(x.shape[-2:]), x.dtype, x.device), settings.mode, strength,
                       settings.mask)
    if rows is None:
        return out
    keep = rows.to(device=x.device, dtype=x.dtype)[:, None, None, None]
    return out.map(lambda _, f: f * keep)
