"""The host adapter: the only module that touches ComfyUI.

Residuals reach ComfyUI's U-Net through its own seam (comfyui-host.md §5): a control object rides in each
conditioning dict, the sampler calls `pre_run` once, `get_control` on every model call and `cleanup` at the
end, and the U-Net adds the returned `{'output': [...], 'middle': [...]}` lists. `ZeroConvControl` speaks that
protocol and turns each call into one call of the library (`residuals.compute_residuals`). When ComfyUI is
importable the object is also a `comfy.controlnet.ControlBase`, so core nodes and chains accept it.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..controlnet_model.accelerate import Acceleration, accelerate
from ..controlnet_model.config import ControlNetConfig, check_compatible
from ..controlnet_model.hint import HintFit, fit_hint
from ..controlnet_model.network import ControlNet
from ..controlnet_model.residuals import ControlSettings, ControlUnit, compute_residuals

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlPart:
    """One ControlNet with its image (B, C, H, W in [0, 1]), settings and how the image is fitted."""

    controlnet: ControlNet
    image: torch.Tensor | None = None
    settings: ControlSettings = ControlSettings()
    fit: HintFit = HintFit.CROP_AND_RESIZE
    name: str = "the ControlNet"  # file name, for error messages
    composed: bool = False  # made by the compose node: keeps its own image, range, mask and mode
    acceleration: Acceleration = Acceleration.NONE  # compile / CUDA graphs for the forward (CUDA only)

    def applied(self, image: torch.Tensor, settings: ControlSettings, fit: HintFit) -> "ControlPart":
        """This part under an apply node: a composed part keeps its own settings and only scales its strength."""
        if self.composed:
            return replace(self, settings=replace(self.settings, strength=self.settings.strength * settings.strength))
        return replace(self, image=image, settings=settings, fit=fit)

    def with_acceleration(self, mode: Acceleration | str) -> "ControlPart":
        return replace(self, acceleration=Acceleration(mode))


def comfy_available() -> bool:
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy.controlnet") is not None


class ZeroConvControl:
    """A ControlBase-compatible control: one or several ControlNets added in a single pass."""

    def __init__(self, parts: tuple[ControlPart, ...] = ()):
        # ControlBase's public state, so host code that reads it finds what it expects.
        self.cond_hint_original, self.cond_hint, self.strength = None, None, 1.0
        self.timestep_percent_range, self.timestep_range = (0.0, 1.0), None
        self.latent_format, self.vae, self.global_average_pooling = None, None, False
        self.compression_ratio, self.upscale_algorithm = 8, "nearest-exact"
        self.extra_args, self.previous_controlnet, self.extra_conds = {}, None, []
        self.concat_mask, self.extra_concat_orig, self.extra_concat, self.extra_hooks = False, [], None, None
        self.preprocess_image = lambda a: a
        self.parts = tuple(parts)
        self._model_sampling: Any = None
        self._units: dict[tuple, tuple[ControlUnit, ...]] = {}  # per latent shape, for this sampling run
        self._patchers: list[Any] = []
        self._accelerated: dict[tuple[int, Acceleration], Any] = {}  # graphs live as long as this object

    # ---- the ControlBase protocol ------------------------------------------------------------------------
    def copy(self) -> "ZeroConvControl":
        new = make_control(self.parts)
        new.strength, new.timestep_percent_range = self.strength, self.timestep_percent_range
        new.cond_hint_original, new._patchers = self.cond_hint_original, self._patchers
        new._accelerated = self._accelerated
        return new

    def set_cond_hint(self, cond_hint: torch.Tensor, strength: float = 1.0,
                      timestep_percent_range: tuple[float, float] = (0.0, 1.0), vae: Any = None,
                      extra_concat: list | None = None) -> "ZeroConvControl":
        """What core apply nodes call: one image, strength and range for every part of this control."""
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, timestep_percent_range
        start, end = timestep_percent_range
        self.parts = tuple(p.applied(cond_hint, replace(p.settings, strength=strength, start_percent=start,
                                                        end_percent=end), p.fit) for p in self.parts)
        return self

    def set_previous_controlnet(self, controlnet: Any) -> "ZeroConvControl":
        self.previous_controlnet = controlnet
        return self

    def pre_run(self, model: Any, percent_to_timestep_function: Callable[[float], float]) -> None:
        """Once per sampling run: check the families before any step, keep the model's sigma mapping."""
        self._model_sampling = model.model_sampling
        unet_config = sampled_unet_config(model)
        if unet_config is not None:
            for part in self.parts:
                check_compatible(part.controlnet.config, unet_config, part.name, f"the sampled model ({unet_config.family})")
        self.timestep_range = (percent_to_timestep_function(self.timestep_percent_range[0]),
                               percent_to_timestep_function(self.timestep_percent_range[1]))
        self._units = {}
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict) -> dict | None:
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        ms = self._model_sampling
        timesteps = ms.timestep(t)
        percent = float(1.0 - timesteps[0].item() / 999.0)  # inverse of percent_to_sigma for discrete sampling
        units = self._units_for(x_noisy, batched_number)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        cond_rows = _cond_rows(transformer_options.get("cond_or_uncond"), x_noisy.shape[0])
        with torch.no_grad():
            out = compute_residuals(units, ms.calculate_input(t, x_noisy), timesteps, context, cond.get("y"),
                                    percent, cond_rows)
        ours = None if out is None else {"input": [], "middle": [out.mid.to(x_noisy.dtype)],
                                         "output": [r.to(x_noisy.dtype) for r in out.down]}
        return merge_controls(ours, previous)

    def get_models(self) -> list:
        previous = self.previous_controlnet.get_models() if self.previous_controlnet is not None else []
        return self._host_patchers() + previous

    def inference_memory_requirements(self, dtype: torch.dtype) -> int:
        previous = self.previous_controlnet
        return previous.inference_memory_requirements(dtype) if previous is not None else 0

    def get_extra_hooks(self) -> list:
        previous = self.previous_controlnet
        return previous.get_extra_hooks() if previous is not None and hasattr(previous, "get_extra_hooks") else []

    def cleanup(self) -> None:
        self._units, self._model_sampling, self.timestep_range = {}, None, None
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()

    # ---- helpers ----------------------------------------------------------------------------------------
    def _units_for(self, x: torch.Tensor, batched_number: int) -> tuple[ControlUnit, ...]:
        """Fitted hints and their encodings, made once per latent shape in a run (static shapes per run)."""
        key = (tuple(x.shape), batched_number, x.device)
        if key not in self._units:
            units = []
            for part in self.parts:
                if part.image is None:
                    raise ValueError(f"{part.name} has no control image; connect an image to the apply node")
                hint = fit_hint(part.image.to(x.device, torch.float32), x.shape[-2] * 8, x.shape[-1] * 8, part.fit)
                hint = _broadcast(hint, x.shape[0], batched_number).to(part.controlnet.dtype)
                with torch.no_grad():
                    encoded = part.controlnet.encode_hint(hint.to(next(part.controlnet.parameters()).device))
                units.append(ControlUnit(self._net(part), hint, part.settings, encoded))
            self._units[key] = tuple(units)
        return self._units[key]

    def _net(self, part: ControlPart) -> Any:
        key = (id(part.controlnet), part.acceleration)
        if key not in self._accelerated:
            self._accelerated[key] = accelerate(part.controlnet, part.acceleration)
        return self._accelerated[key]

    def _host_patchers(self) -> list:
        """Hand the ControlNets to ComfyUI's memory manager (load, offload, dtype) when running inside it."""
        if not comfy_available():
            return []
        if not self._patchers:
            import comfy.model_management as mm
            from comfy.model_patcher import ModelPatcher

            self._patchers = [ModelPatcher(p.controlnet, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device()) for p in self.parts]
        return list(self._patchers)


def _broadcast(hint: torch.Tensor, batch: int, batched_number: int) -> torch.Tensor:
    """A batch-1 hint broadcasts; a batch of hints is repeated per chunk (cond, uncond), as ComfyUI does."""
    if hint.shape[0] in (1, batch):
        return hint
    per_chunk = batch // batched_number
    if per_chunk % hint.shape[0] and hint.shape[0] != per_chunk:
        raise ValueError(f"the control image batch ({hint.shape[0]}) does not divide the latent batch ({per_chunk}); "
                         "give one control image or one per latent")
    reps = max(1, per_chunk // hint.shape[0])
    return hint[:per_chunk].repeat(reps, 1, 1, 1).repeat(batched_number, 1, 1, 1)


def _cond_rows(cond_or_uncond: list[int] | None, batch: int) -> torch.Tensor | None:
    """(B,) True for rows of positive conds (cond_or_uncond 0), one chunk per entry."""
    if not cond_or_uncond:
        return None
    per_chunk = batch // len(cond_or_uncond)
    return torch.tensor([c == 0 for c in cond_or_uncond]).repeat_interleave(per_chunk)


def merge_controls(ours: dict | None, previous: dict | None) -> dict | None:
    """Element-wise sum of two control dicts (ComfyUI's control_merge without the in-place edits)."""
    if ours is None or previous is None:
        return ours if previous is None else previous
    merged = {}
    for key in ("input", "middle", "output"):
        a, b = ours.get(key, []), previous.get(key, [])
        n = max(len(a), len(b))
        a, b = a + [None] * (n - len(a)), b + [None] * (n - len(b))
        merged[key] = [y if x is None else x if y is None else x + y for x, y in zip(a, b)]
    return merged


def sampled_unet_config(model: Any) -> ControlNetConfig | None:
    """The sampled U-Net's config: ours carries one; ComfyUI's is read from model_config.unet_config."""
    own = getattr(getattr(model, "diffusion_model", None), "config", None)
    if isinstance(own, ControlNetConfig):
        return own
    unet_config = getattr(getattr(model, "model_config", None), "unet_config", None)
    if not isinstance(unet_config, dict) or "model_channels" not in unet_config:
        return None
    context = unet_config.get("context_dim") or 768
    from ..controlnet_model.config import FAMILY_BY_CONTEXT_DIM

    depth = unet_config.get("transformer_depth") or []
    levels = len(unet_config["channel_mult"])
    res = unet_config.get("num_res_blocks", 2)
    res = res[0] if isinstance(res, (list, tuple)) else res
    per_level = [depth[i * res] if len(depth) > i * res and depth[i * res] else None for i in range(levels)]
    return ControlNetConfig(
        family=FAMILY_BY_CONTEXT_DIM.get(context, f"a model with context {context}"),
        model_channels=unet_config["model_channels"], channel_mult=tuple(unet_config["channel_mult"]),
        num_res_blocks=res, transformer_depth=tuple(per_level), context_dim=context,
        num_heads=8, in_channels=unet_config.get("in_channels", 4),
        adm_in_channels=unet_config.get("adm_in_channels"))


@functools.lru_cache(maxsize=1)
def _control_class() -> type:
    if not comfy_available():
        return ZeroConvControl
    from comfy.controlnet import ControlBase

    return type("ZeroConvComfyControl", (ZeroConvControl, ControlBase), {})


def make_control(parts: tuple[ControlPart, ...]) -> ZeroConvControl:
    """A control object; inside ComfyUI it is also a comfy.controlnet.ControlBase."""
    return _control_class()(parts)


def controlnet_folder_paths() -> list[str]:
    """ComfyUI's `controlnet` model folders, or ZEROCONV_CONTROLNET_DIR outside ComfyUI."""
    import os

    if importlib.util.find_spec("folder_paths") is not None:
        import folder_paths

        return folder_paths.get_folder_paths("controlnet")
    folder = os.environ.get("ZEROCONV_CONTROLNET_DIR")
    return [folder] if folder else []
