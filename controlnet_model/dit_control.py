"""How a transformer ControlNet's block outputs reach its host's blocks, as data, and one step of control.

Each format's outputs go to the host's double / joint blocks ("input": Flux adds `img[:, :n] += r` after double
block i) or to its single / joint blocks ("output": Flux adds to the image part after single block i, MMDiT adds
`x += r` after joint block i), after being spread over the host's depth by a named rule. The table below gives,
per format, what ComfyUI comfy/ldm/flux/controlnet.py, comfy/cldm/mmdit.py and comfy/cldm/dit_embedder.py do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from .config import FAMILY_NAMES
from .flux_controlnet import DiTBlockOutputs
from .residuals import ControlMode, ControlSettings, mask_to_tokens, scale_tokens

if TYPE_CHECKING:
    from .hint import HintFit

Residuals = tuple[torch.Tensor | None, ...]


# ---- spreading block outputs over the host's blocks (rules by name) --------------------------------------
def _tile(blocks: Sequence, n: int) -> list:
    """b0, b1, b0, b1, ... cut to n (XLabs, Mistoline)."""
    return (list(blocks) * math.ceil(n / len(blocks)))[:n]


def _repeat(blocks: Sequence, n: int) -> list:
    """Each block ceil(n / len) times in a row, cut to n (InstantX; SD3.5, whose extra entries the host ignores)."""
    return [b for b in blocks for _ in range(math.ceil(n / len(blocks)))][:n]


def _repeat_floor_short(blocks: Sequence, n: int) -> list:
    """Each block n // len times in a row, the last one once less (ComfyUI cldm/mmdit.py): the last host block(s)
    get nothing."""
    out = [b for b in blocks for _ in range(n // len(blocks))]
    return out[:-1]


SPREAD_RULES: dict[str, Callable[[Sequence, int], list]] = {
    "tile": _tile, "repeat": _repeat, "repeat_floor_short": _repeat_floor_short,
}


@dataclass(frozen=True)
class Placement:
    """Where one group of ControlNet outputs goes: the host control key, the spread rule, the host's block count
    (None: the ControlNet's own base depth, `config.depth`)."""

    key: str  # "input" or "output"
    rule: str  # a SPREAD_RULES name
    host_blocks: int | None


@dataclass(frozen=True)
class DiTFormatSpec:
    """What differs between the transformer ControlNet formats, as data."""

    family: str  # "flux" or "sd3"
    main: Placement  # double / joint blocks
    single: Placement | None  # single-stream blocks (Flux only)
    hint_latent: tuple[float, float] | None  # (scale, shift) of the VAE latent hint; None: pixels, no VAE


FLUX_LATENT = (0.3611, 0.1159)  # ComfyUI latent_formats.Flux
SD3_LATENT_NO_SHIFT = (1.5305, 0.0)  # ComfyUI latent_formats.SD3 with shift_factor 0 (load_controlnet_mmdit)
SD3_LATENT = (1.5305, 0.0609)  # ComfyUI latent_formats.SD3 (load_controlnet_sd35)
FLUX_DOUBLE, FLUX_SINGLE = 19, 38  # ComfyUI ControlNetFlux main_model_double / main_model_single

# Keys are CheckpointFormat values (checkpoint.py).
DIT_FORMATS: dict[str, DiTFormatSpec] = {
    "flux_xlabs": DiTFormatSpec("flux", Placement("input", "tile", FLUX_DOUBLE),
                                Placement("output", "tile", FLUX_SINGLE), None),
    "flux_mistoline": DiTFormatSpec("flux", Placement("input", "tile", FLUX_DOUBLE),
                                    Placement("output", "tile", FLUX_SINGLE), None),
    "flux_instantx": DiTFormatSpec("flux", Placement("input", "repeat", FLUX_DOUBLE),
                                   Placement("output", "repeat", FLUX_SINGLE), FLUX_LATENT),
    "sd3_diffusers": DiTFormatSpec("sd3", Placement("output", "repeat_floor_short", None), None, SD3_LATENT_NO_SHIFT),
    "sd35": DiTFormatSpec("sd3", Placement("output", "repeat", None), None, SD3_LATENT),
}


@dataclass(frozen=True)
class TokenResiduals:
    """Residuals per host block in token space (B, image tokens, hidden); None where a block gets nothing.

    `input` goes to the host's double / joint blocks keyed "input", `output` to those keyed "output" (ComfyUI's
    control dict; see the module docstring for where each is added)."""

    input: Residuals = ()
    output: Residuals = ()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TokenResiduals":
        """fn applied once per distinct tensor (repeated blocks share one tensor and stay shared)."""
        done: dict[int, torch.Tensor] = {}

        def one(r: torch.Tensor | None) -> torch.Tensor | None:
            if r is None:
                return None
            if id(r) not in done:
                done[id(r)] = fn(r)
            return done[id(r)]

        return TokenResiduals(tuple(one(r) for r in self.input), tuple(one(r) for r in self.output))

    def __add__(self, other: "TokenResiduals") -> "TokenResiduals":
        """Composition by addition, per host block (paper §3; ComfyUI ControlBase.control_merge)."""
        def merge(a: Residuals, b: Residuals) -> Residuals:
            out = []
            for i in range(max(len(a), len(b))):
                x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
                out.append(y if x is None else x if y is None else x + y)
            return tuple(out)

        return TokenResiduals(merge(self.input, other.input), merge(self.output, other.output))


def spec_of(fmt: str) -> DiTFormatSpec:
    if fmt not in DIT_FORMATS:
        raise ValueError(f"{fmt!r} is not a transformer ControlNet format; known: {sorted(DIT_FORMATS)}")
    return DIT_FORMATS[fmt]


def host_lists(fmt: str, n_main: int, n_single: int = 0, depth: int | None = None,
               host_double: int | None = None, host_single: int | None = None) -> dict[str, list[int]]:
    """Which ControlNet block feeds each host block: {'input': [...], 'output': [...]} of block indices; single
    blocks are numbered after the main ones. host_double / host_single override the table's host depths."""
    spec = spec_of(fmt)
    out: dict[str, list[int]] = {"input": [], "output": []}
    for placement, indices, override in ((spec.main, list(range(n_main)), host_double),
                                         (spec.single, list(range(n_main, n_main + n_single)), host_single)):
        if placement is None or not indices:
            continue
        n = override or placement.host_blocks or depth
        if n is None:
            raise ValueError(f"{fmt}: the host depth is needed to place the residuals; give depth=")
        out[placement.key] = SPREAD_RULES[placement.rule](indices, n)
    return out


def to_host(fmt: str, outputs: DiTBlockOutputs, depth: int | None = None, host_double: int | None = None,
            host_single: int | None = None) -> TokenResiduals:
    """The ControlNet's block outputs spread over the host's blocks by the format's table entry."""
    blocks = list(outputs.main) + list(outputs.single)
    lists = host_lists(fmt, len(outputs.main), len(outputs.single), depth, host_double, host_single)
    return TokenResiduals(tuple(blocks[i] for i in lists["input"]), tuple(blocks[i] for i in lists["output"]))


# ---- checks a host calls before the first step (the family check is config.check_family) ------------------
def needs_vae(fmt: str) -> bool:
    """True when the hint is the base VAE's latent of the control image (InstantX, SD3), not pixels."""
    return spec_of(fmt).hint_latent is not None


def check_hint(fmt: str, hint: torch.Tensor | None, latent_channels: int, file: str = "the ControlNet") -> None:
    """A latent-hint format given no VAE-encoded hint (or pixels) -> one clear error."""
    if not needs_vae(fmt):
        if hint is None or hint.ndim != 4 or hint.shape[1] != 3:
            raise ValueError(f"{file} ({fmt}) needs the control image as pixels (B, 3, H, W); got "
                             f"{None if hint is None else tuple(hint.shape)}")
        return
    if hint is not None and hint.ndim == 4 and hint.shape[1] == latent_channels - 1:
        raise ValueError(f"{file} ({fmt}) is an inpaint ControlNet: its hint is the VAE latent plus the keep mask "
                         f"({latent_channels} channels), got {hint.shape[1]}; give a mask (latent_hint(..., keep, "
                         f"channels={latent_channels}))")
    if hint is None or hint.ndim != 4 or hint.shape[1] != latent_channels:
        got = "no hint" if hint is None else f"a hint of shape {tuple(hint.shape)}"
        raise ValueError(f"{file} ({fmt}) needs a VAE input: its hint is the base model's VAE latent of the control "
                         f"image ({latent_channels} channels), but it got {got}; connect the model's VAE to the apply "
                         "node")


def latent_hint(fmt: str, latent: torch.Tensor, keep: torch.Tensor | None = None,
                channels: int | None = None) -> torch.Tensor:
    """The VAE latent (B, 16, h, w) of the control image scaled as the format expects; for 17-channel (inpaint)
    files `channels=17` appends the keep mask (B, H, W), 1 where the image stays (1 - the inpaint mask; all ones
    when None), resized nearest-exact (ComfyUI concat_mask, ControlNetInpaintingAliMamaApply). Encode the image
    with the inpaint region blanked (image x keep) before."""
    scale, shift = spec_of(fmt).hint_latent or (None, None)
    if scale is None:
        raise ValueError(f"{fmt} takes the control image as pixels, not a VAE latent")
    hint = (latent - shift) * scale
    if channels == latent.shape[1] + 1:
        m = torch.ones_like(hint[:, :1]) if keep is None else torch.nn.functional.interpolate(
            keep.reshape(-1, 1, *keep.shape[-2:]).to(hint), size=hint.shape[-2:], mode="nearest-exact")
        hint = torch.cat([hint, m.expand(hint.shape[0], -1, -1, -1)], dim=1)
    return hint


# ---- Flux union modes (data; not the SDXL union names) ---------------------------------------------------
FLUX_UNION_MODES: tuple[str, ...] = ("canny", "tile", "depth", "blur", "pose", "gray", "low quality")


def flux_union_mode(mode: str | int | None, num_modes: int, file: str = "the ControlNet") -> int | None:
    """Index of a Flux union mode by name or number (None: no mode token); out of range -> a clear error."""
    if mode is None or mode == "auto":
        return None
    if num_modes == 0:
        raise ValueError(f"{file} has no union modes (it is a single-mode Flux ControlNet, e.g. Union-Pro 2.0); "
                         f"leave the mode unset instead of {mode!r}")
    index = FLUX_UNION_MODES.index(mode) if mode in FLUX_UNION_MODES else mode
    if not isinstance(index, int) or not 0 <= index < num_modes:
        names = ", ".join(f"{i} {n}" for i, n in enumerate(FLUX_UNION_MODES[:num_modes]))
        raise ValueError(f"union mode {mode!r} is not one of the {num_modes} modes {file} has ({names})")
    return index


# ---- one control at one step, and several ------------------------------------------------------------------
@dataclass(frozen=True)
class DiTControlUnit:
    """A transformer ControlNet with its prepared hint and settings, ready to run at each sampling step."""

    controlnet: nn.Module  # FluxControlNet or SD3ControlNet
    format: str  # a DIT_FORMATS key (CheckpointFormat value)
    hint: torch.Tensor  # pixels (1 or B, 3, 8h, 8w) in [0, 1], or latent_hint(...) (1 or B, C, h, w)
    mode: int | None = None  # Flux union mode index (flux_union_mode), None: no mode token
    settings: ControlSettings = ControlSettings()
    host_double: int | None = None  # host depths, when not the table's (ComfyUI's) defaults
    host_single: int | None = None


def run_dit_control(unit: DiTControlUnit, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                    y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                    percent: float = 0.0) -> TokenResiduals | None:
    """Residuals per host block of one ControlNet at one step, strength / schedule / step range / token mask
    applied; None when it has no effect at this step (its forward is skipped).

    timesteps: what the host's transformer gets (Flux: sigma; SD3: sigma x 1000; ComfyUI model_sampling.timestep).
    """
    settings, cfg = unit.settings, unit.controlnet.config
    if settings.mode is not ControlMode.BALANCED:
        raise ValueError(f"control mode {settings.mode.value!r} applies to U-Net ControlNets; use 'balanced' with "
                         f"a {FAMILY_NAMES[spec_of(unit.format).family]} ControlNet")
    strength = settings.strength_at(percent)
    if strength == 0.0:
        return None
    channels = cfg.hint_channels // 4 if unit.format.startswith("flux") else cfg.hint_channels
    check_hint(unit.format, unit.hint, channels)
    out = unit.controlnet(x, unit.hint, timesteps, context, y, guidance=guidance, mode=unit.mode)
    depth = getattr(cfg, "depth", None) if spec_of(unit.format).family == "sd3" else None
    residuals = to_host(unit.format, out, depth, unit.host_double, unit.host_single)
    mask = None if settings.mask is None else mask_to_tokens(settings.mask, tuple(x.shape[-2:]))
    return scale_tokens(residuals, strength, mask)


# ---- under a host sampler (the ControlKind entries of these model classes) ---------------------------------
def dit_format_of(controlnet: nn.Module) -> str | None:
    """The DIT_FORMATS key of a loaded transformer ControlNet module (None for any other module)."""
    from .flux_controlnet import FluxControlNet, HintInput
    from .sd3_controlnet import SD35ControlNet, SD3ControlNet

    if isinstance(controlnet, FluxControlNet):
        return {HintInput.PIXELS: "flux_xlabs", HintInput.PIXELS_MISTOLINE: "flux_mistoline"}.get(
            controlnet.config.hint, "flux_instantx")
    if isinstance(controlnet, SD35ControlNet):
        return "sd35"
    if isinstance(controlnet, SD3ControlNet):
        return "sd3_diffusers"
    return None


def union_mode_of(controlnet: nn.Module, union_type: str | int | None, file: str = "the ControlNet") -> int | None:
    """A union_type input checked against a transformer ControlNet: a Flux union file's mode index (Flux's own
    names, FLUX_UNION_MODES), None for "auto"; any other value on a file without modes -> a clear error."""
    fmt = dit_format_of(controlnet)
    if fmt is None:
        raise ValueError(f"{file} is not a Flux or SD3 ControlNet")
    if spec_of(fmt).family == "flux":
        try:
            return flux_union_mode(union_type, controlnet.config.num_union_modes, file)
        except ValueError as exc:
            names = ", ".join(("auto",) + FLUX_UNION_MODES[:controlnet.config.num_union_modes])
            raise ValueError(f"union_type: {exc}; valid for this file: {names}") from None
    if union_type not in (None, "auto"):
        raise ValueError(f"union_type: {file} is an {FAMILY_NAMES['sd3']} ControlNet with no union modes; "
                         f"leave union_type at 'auto' instead of {union_type!r}")
    return None


def prepare_dit(controlnet: nn.Module, image: torch.Tensor, settings: ControlSettings, fit: "HintFit",
                latent: torch.Tensor, batched_number: int, name: str,
                vae_encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                union_type: str | int | None = "auto") -> DiTControlUnit:
    """A transformer ControlNet's unit for one latent shape (ComfyUI ControlNet.get_control's hint path): the image
    fitted to 8x the latent; for latent formats prepared by the file's control type (SD3.5), encoded once with the
    base's VAE (`vae_encode`: pixels (B, 3, H, W) in [0, 1] -> raw latent), scaled as the format expects and, for
    17-channel (inpaint) files, given an all-ones keep mask; then broadcast to the batch, as is the mask."""
    from .hint import fit_to_latent
    from .residuals import broadcast_batch, broadcast_mask
    from .sd3_controlnet import SD35_CONTROL_TYPES

    fmt, cfg = dit_format_of(controlnet), controlnet.config
    device = next(controlnet.parameters()).device
    mode = union_mode_of(controlnet, union_type, name)
    hint = fit_to_latent(image.float(), latent.shape[-2], latent.shape[-1], fit)
    if needs_vae(fmt):
        if vae_encode is None:
            raise ValueError(f"{name} ({fmt}) encodes its control image with the base model's VAE: connect the "
                             "model's VAE to the vae input of the apply node (or of the ControlNet Unit)")
        if fmt == "sd35":
            hint = SD35_CONTROL_TYPES[cfg.control_type][1](hint)
        channels = cfg.hint_channels // 4 if fmt.startswith("flux") else cfg.hint_channels
        with torch.no_grad():
            raw = vae_encode(hint).float()
        hint = latent_hint(fmt, raw.to(latent.device), channels=channels)
    hint = broadcast_batch(hint.to(device), latent.shape[0], batched_number, f"{name}'s control image")
    return DiTControlUnit(controlnet, fmt, hint, mode, broadcast_mask(settings, device, latent, batched_number, name))


def dit_residuals(unit: DiTControlUnit, step: Any) -> dict | None:
    """A transformer ControlNet's residuals at one host model call (a residuals.HostStep), as the host's control
    dict: "input" for double / joint blocks, "output" for single / joint blocks (see the table above)."""
    device = unit.hint.device

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    with torch.no_grad():
        out = run_dit_control(unit, to(step.x), to(step.timesteps), to(step.context), to(step.y), to(step.guidance),
                              unit.settings.percent_in(step.progress))
    if out is None:
        return None
    moved = out.map(lambda r: r.to(step.like.device))
    return {"input": list(moved.input), "middle": [], "output": list(moved.output)}


def _register_kinds() -> None:
    from .flux_controlnet import FluxControlNet
    from .residuals import CONTROL_KINDS, ControlKind
    from .sd3_controlnet import SD35ControlNet, SD3ControlNet

    kind = ControlKind(prepare_dit, dit_residuals, host_inputs=("vae_encode", "union_type"))
    for cls in (FluxControlNet, SD3ControlNet, SD35ControlNet):
        CONTROL_KINDS.setdefault(cls, kind)


_register_kinds()
