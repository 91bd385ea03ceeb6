"""One ControlNet training step against a locked base (Zhang et al. 2023 §3.3; step order of diffusers'
train_controlnet.py): latents, noise and timesteps, add_noise, ControlNet on the hint, frozen U-Net with the
residuals, target by prediction type, MSE in fp32."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..controlnet_model.network import ControlNet
from ..controlnet_model.unet import UNetModel
from .schedule import NoiseSchedule


@dataclass(frozen=True)
class Batch:
    latents: torch.Tensor  # (B, C, h, w) scaled latents of the target images
    hint: torch.Tensor  # (B, 3, 8h, 8w) condition in [0, 1]
    context: torch.Tensor  # (B, T, D) text context (empty-caption context where the caption was dropped)
    y: torch.Tensor | None = None  # (B, adm) for SDXL-shaped bases


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with the given probability (paper §3.3 uses 50 %)."""
    draws = torch.rand(len(captions), generator=generator)
    return ["" if d < probability else c for c, d in zip(captions, draws.tolist())]


def diffusion_loss(unet: UNetModel, controlnet: ControlNet, schedule: NoiseSchedule, batch: Batch,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the controlled U-Net's prediction and the schedule's target, in fp32."""
    latents = batch.latents
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, schedule.num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = schedule.add_noise(latents, noise, t)
    residuals = controlnet(noisy, batch.hint, t, batch.context, batch.y)
    prediction = unet(noisy, t, batch.context, batch.y, control=residuals)
    return F.mse_loss(prediction.float(), schedule.target(latents, noise, t).float())


def check_trainable(controlnet: ControlNet, unet: UNetModel, optimizer: torch.optim.Optimizer) -> None:
    """The base is locked and the optimiser holds fp32 ControlNet parameters only (paper Eq. 6-8, diffusers)."""
    if any(p.requires_grad for p in unet.parameters()):
        raise ValueError("the base U-Net must be locked: call unet.requires_grad_(False) before training")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if held - {id(p) for p in controlnet.parameters()}:
        raise ValueError("the optimiser holds parameters that are not the ControlNet's; give it controlnet.parameters()")
    if any(p.dtype != torch.float32 for p in controlnet.parameters()):
        raise ValueError("trainable ControlNet weights must be fp32; use autocast for mixed precision instead")


def train_step(unet: UNetModel, controlnet: ControlNet, schedule: NoiseSchedule, optimizer: torch.optim.Optimizer,
               batch: Batch, generator: torch.Generator | None = None, max_grad_norm: float = 1.0) -> float:
    """Forward, backward, clip, step, zero_grad(set_to_none=True); returns the loss."""
    loss = diffusion_loss(unet, controlnet, schedule, batch, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(controlnet.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
