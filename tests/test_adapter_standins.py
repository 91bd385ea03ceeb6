"""Stand-ins for the host objects our nodes and adapter use (ComfyUI comfy/controlnet.py, comfy/samplers.py), and a mini sampler.

No tests here; test_adapter.py and test_nodes.py import these. Written from the reference's description of
ComfyUI's behaviour (no ComfyUI code): discrete EPS model sampling, a core-like ControlNet with control_merge
semantics, core Apply ControlNet's attach rule, and a sampler loop that calls pre_run / get_control / cleanup
and feeds the control dict to the stub U-Net, batching cond and uncond when they share one control.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster on a loaded machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DiscreteEps:
    """Model sampling of an SD1.x eps model: scaled-linear betas, sigma <-> nearest discrete timestep."""

    def __init__(self) -> None:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()  # (1000,) increasing

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        nearest = (self.sigmas.log()[None, :] - sigma.reshape(-1, 1).log()).abs().argmin(dim=1)
        return nearest.reshape(sigma.shape).to(sigma.device)

    def sigma(self, timestep: float) -> float:
        low = int(timestep)
        high = min(low + 1, 999)
        w = timestep - low
        return float(((1 - w) * self.sigmas[low].log() + w * self.sigmas[high].log()).exp())

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * 999.0)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1.0).sqrt()

    def schedule(self, steps: int) -> torch.Tensor:
        """'normal'-like sigmas: timesteps evenly from 999 to 0, then a final 0."""
        ts = torch.linspace(999, 0, steps)
        return torch.tensor([self.sigma(float(t)) for t in ts] + [0.0])


def host_model(unet: Any) -> SimpleNamespace:
    """What pre_run receives: the BaseModel, with model_sampling, the U-Net and the latent format."""
    return SimpleNamespace(model_sampling=DiscreteEps(), diffusion_model=unet,
                           latent_format=SimpleNamespace(latent_channels=unet.config.in_channels))


def _crop_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Core's hint fit: centre crop to the target aspect, then nearest-exact."""
    h, w = image.shape[-2:]
    if w * height > h * width:
        keep = round(h * width / height)
        image = image[..., (w - keep) // 2:(w - keep) // 2 + keep]
    elif w * height < h * width:
        keep = round(w * height / width)
        image = image[..., (h - keep) // 2:(h - keep) // 2 + keep, :]
    return F.interpolate(image, size=(height, width), mode="nearest-exact")


class CoreLikeControlNet:
    """A ControlBase as core's ControlNet behaves (ComfyUI comfy/controlnet.py ControlBase, ControlNet.get_control), over a network with our forward."""

    def __init__(self, network: Any, log: list | None = None):
        self.network, self.log = network, log if log is not None else []
        self.cond_hint_original, self.cond_hint, self.strength = None, None, 1.0
        self.timestep_percent_range, self.timestep_range = (0.0, 1.0), None
        self.previous_controlnet, self.model_sampling_current, self.vae = None, None, None

    def copy(self) -> "CoreLikeControlNet":
        new = CoreLikeControlNet(self.network, self.log)
        new.cond_hint_original, new.strength = self.cond_hint_original, self.strength
        new.timestep_percent_range = self.timestep_percent_range
        return new

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=()):
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, timestep_percent_range
        return self

    def set_previous_controlnet(self, controlnet: Any) -> "CoreLikeControlNet":
        self.previous_controlnet = controlnet
        return self

    def pre_run(self, model: Any, percent_to_sigma: Any) -> None:
        self.timestep_range = tuple(percent_to_sigma(p) for p in self.timestep_percent_range)
        self.model_sampling_current = model.model_sampling
        self.log.append("pre_run")
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_sigma)

    def get_control(self, x, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return previous
        if self.cond_hint is None or self.cond_hint.shape[-2:] != (x.shape[-2] * 8, x.shape[-1] * 8):
            self.cond_hint = _crop_resize(self.cond_hint_original, x.shape[-2] * 8, x.shape[-1] * 8)
        hint = self.cond_hint
        if hint.shape[0] not in (1, x.shape[0]):
            per_chunk = x.shape[0] // batched_number
            hint = hint[:per_chunk].repeat(batched_number, 1, 1, 1)
        ms = self.model_sampling_current
        self.log.append(("forward", x.shape[0]))
        out = self.network(ms.calculate_input(t, x), hint, ms.timestep(t),
                           cond.get("crossattn_controlnet", cond["c_crossattn"]), cond.get("y"))
        return self.control_merge({"input": [], "middle": [out.mid], "output": list(out.down)}, previous)

    def control_merge(self, control: dict, previous: dict | None) -> dict:
        """Strength in place, then the previous control's lists added element-wise."""
        out = {"input": [], "middle": [], "output": []}
        for key, values in control.items():
            for value in values:
                value *= self.strength
                out[key].append(value)
        if previous is not None:
            for key in out:
                for i, prev in enumerate(previous[key]):
                    if i >= len(out[key]):
                        out[key].append(prev)
                    elif prev is not None:
                        out[key][i] = prev if out[key][i] is None else prev + out[key][i]
        return out

    def get_models(self) -> list:
        previous = self.previous_controlnet.get_models() if self.previous_controlnet is not None else []
        return previous + [("core patcher", id(self.network))]

    def inference_memory_requirements(self, dtype: torch.dtype) -> int:
        previous = self.previous_controlnet
        return previous.inference_memory_requirements(dtype) if previous is not None else 0

    def cleanup(self) -> None:
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.cond_hint, self.timestep_range, self.model_sampling_current = None, None, None
        self.log.append("cleanup")


def core_apply(positive: list, negative: list, control_net: Any, image: torch.Tensor, strength: float,
               start_percent: float = 0.0, end_percent: float = 1.0, vae: Any = None) -> tuple[list, list]:
    """Core Apply ControlNet (ControlNetApplyAdvanced) as ComfyUI nodes.py implements it."""
    if strength == 0:
        return positive, negative
    hint = image.movedim(-1, 1)
    made: dict[int, Any] = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for tensor, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if id(previous) not in made:
                made[id(previous)] = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent),
                                                                      vae=vae, extra_concat=[])
                made[id(previous)].set_previous_controlnet(previous)
            options["control"], options["control_apply_to_uncond"] = made[id(previous)], False
            entries.append([tensor, options])
        out.append(entries)
    return out[0], out[1]


def conditioning(seed: int = 0, batch: int = 1, tokens: int = 7, width: int = 32) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    return ([[torch.randn(batch, tokens, width, generator=gen), {}]],
            [[torch.randn(batch, tokens, width, generator=gen), {}]])


def image(seed: int = 3, size: tuple[int, int] = (64, 64), channels: int = 3, batch: int = 1) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1]."""
    return torch.rand(batch, *size, channels, generator=torch.Generator().manual_seed(seed))


def _control_call(control: Any, x: torch.Tensor, sigma: float, context: torch.Tensor, kinds: list[int]) -> Any:
    if control is None:
        return None
    t = torch.full((x.shape[0],), sigma)
    return control.get_control(x, t, {"c_crossattn": context}, len(kinds), {"cond_or_uncond": kinds})


@torch.no_grad()
def sample(unet: Any, positive: list, negative: list, steps: int = 4, cfg: float = 4.0, seed: int = 0,
           latent: tuple[int, int] = (8, 8), batch: int = 1, model: Any = None) -> torch.Tensor:
    """Euler with CFG, ComfyUI's control protocol: pre_run once, get_control per model call, cleanup always."""
    model = model or host_model(unet)
    ms = model.model_sampling
    cond_control, uncond_control = positive[0][1].get("control"), negative[0][1].get("control")
    controls = [c for i, c in enumerate((cond_control, uncond_control)) if c is not None
                and not (i == 1 and c is cond_control)]
    for control in controls:
        control.pre_run(model, ms.percent_to_sigma)
    sigmas = ms.schedule(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, *latent, generator=gen) * sigmas[0]
    pos_ctx, neg_ctx = positive[0][0].expand(batch, -1, -1), negative[0][0].expand(batch, -1, -1)
    try:
        for i in range(steps):
            s = float(sigmas[i])
            if cond_control is uncond_control:  # one call for cond and uncond, as ComfyUI batches them
                xin, ctx = torch.cat([x, x]), torch.cat([pos_ctx, neg_ctx])
                eps = _unet(unet, ms, xin, s, ctx, _control_call(cond_control, xin, s, ctx, [0, 1]))
                eps_cond, eps_uncond = eps.chunk(2)
            else:
                eps_cond = _unet(unet, ms, x, s, pos_ctx, _control_call(cond_control, x, s, pos_ctx, [0]))
                eps_uncond = _unet(unet, ms, x, s, neg_ctx, _control_call(uncond_control, x, s, neg_ctx, [1]))
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
            x = x + eps * (float(sigmas[i + 1]) - s)  # Euler on the probability-flow ODE (d = eps)
    finally:
        for control in controls:
            control.cleanup()
    return x


def _unet(unet: Any, ms: DiscreteEps, x: torch.Tensor, sigma: float, context: torch.Tensor, control: Any):
    t = torch.full((x.shape[0],), sigma)
    return unet(ms.calculate_input(t, x), ms.timestep(t).float(), context, control=control)
