"""The base model's noise schedule and the DDIM sampler (Ho et al. 2020; Song et al. 2021; LDM 'linear' betas)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..controlnet_model.config import PredictionType


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule over `num_timesteps` steps and what the U-Net predicts."""

    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: PredictionType = PredictionType.EPSILON

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000,
                      prediction_type: PredictionType = PredictionType.EPSILON) -> "NoiseSchedule":
        """betas = linspace(sqrt(start), sqrt(end))^2: Stable Diffusion's schedule (LDM 'linear')."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0), PredictionType(prediction_type))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t].to(torch.float32)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0), computed in fp32."""
        sa, s1a = self._coefs(t, x0)
        return (sa * x0.float() + s1a * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net is trained to predict: the noise, or the velocity v = sqrt(a) e - sqrt(1-a) x0."""
        if self.prediction_type is PredictionType.EPSILON:
            return noise
        if self.prediction_type is PredictionType.V_PREDICTION:
            sa, s1a = self._coefs(t, x0)
            return sa * noise - s1a * x0
        raise ValueError(f"unknown prediction type {self.prediction_type!r}")

    def predict_x0_eps(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model output at step t."""
        sa, s1a = self._coefs(t, x_t)
        if self.prediction_type is PredictionType.EPSILON:
            eps = model_out
            return (x_t - s1a * eps) / sa, eps
        if self.prediction_type is PredictionType.V_PREDICTION:
            x0 = sa * x_t - s1a * model_out
            return x0, sa * model_out + s1a * x_t
        raise ValueError(f"unknown prediction type {self.prediction_type!r}")


# model_fn(x_t, t_batch, percent) -> model output for x_t; percent is sampling progress in [0, 1].
ModelFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, schedule: NoiseSchedule, noise: torch.Tensor, steps: int = 20,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from pure noise to x0 in `steps` evenly spaced timesteps ('leading' spacing)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = schedule.num_timesteps // steps
    timesteps = list(range(0, schedule.num_timesteps, stride))[:steps][::-1]
    x = noise
    for i, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = schedule.predict_x0_eps(model_fn(x, t_batch, i / max(1, steps - 1)), x, t_batch)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_prev = schedule.alphas_cumprod[prev].item() if prev >= 0 else 1.0
        a_t = schedule.alphas_cumprod[t].item()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(0.0, 1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i + 1, steps)
    return x
