"""Stand-ins for the runner tests: a tiny LockedBase and a control object that behaves like ComfyUI's ControlNet.

No tests here; the runner tests import these.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from zeroconv.controlnet_model import ControlNet, init_from_unet
from zeroconv.training.base import TextConditioning
from zeroconv.training.schedule import NoiseSchedule

from .conftest import make_unet, randomize

TOKENS = 4  # toy text context length


class ToyBase:
    """A LockedBase in miniature: the tiny U-Net, a hashed text encoder, and an 8x average-pool 'VAE'."""

    family = "toy SD1.x-shaped"
    image_size = 64

    def __init__(self, seed: int = 0, latent_scale_factor: float = 0.5):
        self.unet = make_unet("tiny", seed).requires_grad_(False)
        self.schedule = NoiseSchedule.scaled_linear()
        self.latent_scale_factor = latent_scale_factor

    def encode_text(self, captions: list[str]) -> TextConditioning:
        dim = self.unet.config.context_dim
        rows = [torch.randn(TOKENS, dim, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                for c in captions]
        return TextConditioning(torch.stack(rows).to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(pixels, 8)  # (B, 3, H/8, W/8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * self.latent_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = latents[:, :3] / self.latent_scale_factor
        return F.interpolate(rgb, scale_factor=8, mode="nearest").clamp(-1, 1)

    def to(self, device: Any, dtype: torch.dtype | None = None) -> "ToyBase":
        self.unet.to(device, dtype)
        return self


def toy_controlnet(base: ToyBase, seed: int = 7) -> ControlNet:
    """A ControlNet copied from the toy U-Net with non-zero zero convs, so it changes the result."""
    controlnet, _ = init_from_unet(base.unet)
    for module in (*controlnet.zero_convs, controlnet.middle_block_out, controlnet.input_hint_block[-1]):
        randomize(module, seed=seed, std=0.2)
    return controlnet.eval().requires_grad_(False)


class ToyControl:
    """The ControlBase protocol as comfy.controlnet.ControlNet implements it (ComfyUI comfy/controlnet.py ControlBase, ControlNet.get_control), recording calls."""

    def __init__(self, control_model: ControlNet, fail: bool = False):
        self.control_model = control_model
        self.cond_hint_original: torch.Tensor | None = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.timestep_range: tuple[float, float] | None = None
        self.previous_controlnet: ToyControl | None = None
        self.model_sampling_current: Any = None
        self.fail = fail
        self.calls: list[dict] = []
        self.pre_runs = 0
        self.cleanups = 0

    def set_cond_hint(self, cond_hint: torch.Tensor, strength: float = 1.0,
                      timestep_percent_range: tuple[float, float] = (0.0, 1.0), vae: Any = None,
                      extra_concat: list | None = None) -> "ToyControl":
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, timestep_percent_range
        return self

    def set_previous_controlnet(self, control: "ToyControl | None") -> "ToyControl":
        self.previous_controlnet = control
        return self

    def copy(self) -> "ToyControl":
        new = ToyControl(self.control_model, self.fail)
        new.cond_hint_original, new.strength = self.cond_hint_original, self.strength
        new.timestep_percent_range = self.timestep_percent_range
        return new

    def pre_run(self, model: Any, percent_to_timestep_function: Callable[[float], float]) -> None:
        self.pre_runs += 1
        start, end = self.timestep_percent_range
        self.timestep_range = (percent_to_timestep_function(start), percent_to_timestep_function(end))
        self.model_sampling_current = model.model_sampling
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def get_models(self) -> list:
        return [self.control_model] + (self.previous_controlnet.get_models() if self.previous_controlnet else [])

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict) -> dict | None:
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.fail:
            raise RuntimeError("control failed on purpose")
        if t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]:
            return prev
        self.calls.append({"batch": x_noisy.shape[0], "sigma": float(t[0]), "batched_number": batched_number,
                           "cond_or_uncond": list(transformer_options["cond_or_uncond"]),
                           "options": dict(transformer_options), "cond_keys": sorted(cond)})
        ms = self.model_sampling_current
        hint = F.interpolate(self.cond_hint_original, size=(x_noisy.shape[2] * 8, x_noisy.shape[3] * 8),
                             mode="nearest-exact").to(x_noisy)
        out = self.control_model(ms.calculate_input(t, x_noisy), hint, ms.timestep(t).float(), cond["c_crossattn"])
        control = {"input": [], "middle": [out.mid * self.strength], "output": [r * self.strength for r in out.down]}
        if prev is not None:
            control["middle"] = [a + b for a, b in zip(control["middle"], prev["middle"])]
            control["output"] = [a + b for a, b in zip(control["output"], prev["output"])]
        return control

    def cleanup(self) -> None:
        self.cleanups += 1
        self.timestep_range = None
        self.model_sampling_current = None
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()


def apply_control(positive: list, negative: list, control: ToyControl, image: torch.Tensor, strength: float = 1.0,
                  start_percent: float = 0.0, end_percent: float = 1.0) -> tuple[list, list]:
    """ControlNetApplyAdvanced: one copied control per previous control, shared by positive and negative."""
    hint, made, out = image.movedim(-1, 1), {}, []
    for conditioning in (positive, negative):
        entries = []
        for tensor, options in conditioning:
            options = dict(options)
            prev = options.get("control")
            if prev not in made:
                made[prev] = control.copy().set_cond_hint(hint, strength, (start_percent, end_percent))
                made[prev].set_previous_controlnet(prev)
            options["control"], options["control_apply_to_uncond"] = made[prev], False
            entries.append([tensor, options])
        out.append(entries)
    return out[0], out[1]


class ToyControlLoader:
    """A test loader node giving a fixed ToyControl as CONTROL_NET (like ControlNetLoader's output)."""

    control: ToyControl | None = None  # set by the test

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = "tests"

    def load(self) -> tuple[ToyControl]:
        return (self.control,)
