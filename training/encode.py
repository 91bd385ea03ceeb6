"""Optional parts of the LockedBase protocol, used when a base offers them: SDXL size conditioning and VAE
posterior moments (so the training loop draws the posterior sample with its own seeded noise)."""
from __future__ import annotations

import torch

from .base import LockedBase, TextConditioning


def encode_captions(base: LockedBase, captions: list[str], size_cond: torch.Tensor | None = None) -> TextConditioning:
    """base.encode_text, passing the SDXL size conditioning (B, 6) to bases that take it (`takes_size_conditioning`)."""
    if getattr(base, "takes_size_conditioning", False) and size_cond is not None:
        return base.encode_text(captions, size_cond=size_cond)
    return base.encode_text(captions)


def latents_from_moments(base: LockedBase, moments: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """Scaled latents from VAE posterior moments (B, 2C, h, w): mean + std * eps (LDM DiagonalGaussian), or the mean."""
    mean, logvar = moments.float().chunk(2, dim=1)
    z = mean if eps is None else mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean)
    return z * float(getattr(base, "latent_scale", 1.0))


def encode_latents(base: LockedBase, pixels: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled training latents: a posterior sample drawn with `eps` when the base exposes `encode_moments`
    (SD VAEs), else whatever base.encode_images gives (deterministic encoders such as the demo world's)."""
    moments_fn = getattr(base, "encode_moments", None)
    if moments_fn is None:
        return base.encode_images(pixels)
    return latents_from_moments(base, moments_fn(pixels), eps)
