"""A mini host: the MODEL, CLIP and VAE objects ComfyUI passes between nodes, built over a LockedBase.

Names and conventions follow ComfyUI (comfy/model_sampling.py, model_base.py, model_patcher.py, sd.py;
see shared/reference/comfyui-host.md §3 and §6) so that our nodes see the same attributes in both hosts:
MODEL is a ModelPatcher-like object whose `.model` has `.diffusion_model`, `.model_sampling`,
`.latent_format` and `.model_config.unet_config`; LATENT tensors are unscaled; IMAGE is BHWC in 0..1 on CPU.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..controlnet_model.config import PredictionType
from ..training.base import LockedBase

logger = logging.getLogger(__name__)

INTERMEDIATE_DEVICE = torch.device("cpu")  # where IMAGE, LATENT and CONDITIONING tensors live between nodes
# Attributes a LockedBase may carry to say how its encode_images() scales latents (SD1.x: 0.18215), first wins.
LATENT_SCALE_ATTRIBUTES = ("latent_scale_factor", "latent_scale")


def _sigma_view(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """A sigma batch shaped to broadcast over (B, C, H, W); a single sigma becomes a scalar (ComfyUI reshape_sigma)."""
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


def _denoised_eps(sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return x - out * sigma


def _denoised_v(sigma: torch.Tensor, out: torch.Tensor, x: torch.Tensor, sigma_data: float) -> torch.Tensor:
    var = sigma**2 + sigma_data**2
    return x * sigma_data**2 / var - out * sigma * sigma_data / var**0.5


# x0 from the U-Net output, by what the U-Net predicts (comfy/model_sampling.py EPS, V_PREDICTION).
DENOISED_BY_PREDICTION: dict[PredictionType, Callable[..., torch.Tensor]] = {
    PredictionType.EPSILON: _denoised_eps,
    PredictionType.V_PREDICTION: _denoised_v,
}


class ModelSamplingDiscrete(nn.Module):
    """Discrete DDPM sigmas over a base's alphas_cumprod, as ComfyUI's ModelSamplingDiscrete + EPS / V_PREDICTION."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: PredictionType = PredictionType.EPSILON):
        super().__init__()
        if PredictionType(prediction_type) not in DENOISED_BY_PREDICTION:
            raise ValueError(f"no sampling rule for prediction type {prediction_type!r}")
        self.prediction_type = PredictionType(prediction_type)
        ac = alphas_cumprod.double()
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.sigma_data = 1.0
        self.num_timesteps = int(sigmas.shape[0])

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep (0..T-1) to each sigma, in log space."""
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep, interpolated in log space."""
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sampling progress -> sigma: 0 -> 999999999.9 (before the first step), 1 -> 0.0 (after the last)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The U-Net input for a noisy latent: x / sqrt(sigma^2 + sigma_data^2)."""
        return noise / (_sigma_view(sigma, noise.ndim) ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        """x0 from the U-Net output."""
        rule = DENOISED_BY_PREDICTION[self.prediction_type]
        return rule(_sigma_view(sigma, model_output.ndim), model_output, model_input, self.sigma_data)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The starting point: latent + noise * sigma (noise * sqrt(1 + sigma^2) from pure noise)."""
        sigma = _sigma_view(sigma, noise.ndim)
        scaled = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return scaled + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent


@dataclass(frozen=True)
class LatentFormat:
    """How the sampler scales VAE latents (comfy/latent_formats.py): process_in before, process_out after."""

    scale_factor: float = 1.0
    latent_channels: int = 4
    shift_factor: float = 0.0

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


@dataclass(frozen=True)
class ModelConfig:
    """The parts of comfy.supported_models' config our nodes read."""

    unet_config: dict[str, Any]
    family: str
    latent_format: LatentFormat


def latent_format_of(base: LockedBase) -> LatentFormat:
    """The latent format of a base: its latent scale (1.0 if it declares none) and U-Net input channels."""
    scale = next((getattr(base, a) for a in LATENT_SCALE_ATTRIBUTES if getattr(base, a, None) is not None), None)
    if scale is None:
        logger.debug("%s declares none of %s; LATENT holds its encode_images() latents as they are",
                     base.family, LATENT_SCALE_ATTRIBUTES)
        scale = 1.0
    return LatentFormat(scale_factor=float(scale), latent_channels=base.unet.config.in_channels)


class BaseModel:
    """comfy.model_base.BaseModel over a LockedBase: apply_model takes unscaled x and sigmas, returns x0."""

    def __init__(self, base: LockedBase):
        self.base = base
        self.diffusion_model = base.unet
        self.latent_format = latent_format_of(base)
        self.model_config = ModelConfig(base.unet.config.to_dict(), base.family, self.latent_format)
        self.model_sampling = ModelSamplingDiscrete(base.schedule.alphas_cumprod, base.schedule.prediction_type)
        self.model_type = self.model_sampling.prediction_type

    def get_dtype(self) -> torch.dtype:
        return next(self.diffusion_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_model.parameters()).device

    def to(self, device: torch.device | str) -> "BaseModel":
        self.diffusion_model.to(device)
        self.model_sampling.to(device)
        return self

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_out(latent)

    def extra_conds(self, cross_attn: torch.Tensor, pooled_output: torch.Tensor | None = None, **_: Any) -> dict:
        """The U-Net's conditioning inputs from a cond dict: c_crossattn, and y when the U-Net has an ADM input."""
        conds = {"c_crossattn": cross_attn}
        if getattr(self.diffusion_model.config, "adm_in_channels", None):
            if pooled_output is None:
                raise ValueError(f"{self.base.family} needs the ADM vector y; encode the prompt with this "
                                 "checkpoint's CLIP (CLIPTextEncode) so the conditioning carries it")
            conds["y"] = pooled_output
        return conds

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: torch.Tensor | None = None,
                    control: Any = None, transformer_options: dict | None = None, y: torch.Tensor | None = None,
                    **_: Any) -> torch.Tensor:
        """x (B, C, h, w) unscaled noisy latent, t (B,) sigmas -> denoised x0, fp32."""
        sigma = t
        dtype = self.get_dtype()
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        timestep = self.model_sampling.timestep(sigma).float()
        context = None if c_crossattn is None else c_crossattn.to(dtype)
        out = self.diffusion_model(xc, timestep, context=context, y=None if y is None else y.to(dtype),
                                   control=control, transformer_options=transformer_options or {}).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)


def clone_options(options: dict) -> dict:
    """Copy nested dicts and lists, sharing the leaves (comfy.model_patcher.create_model_options_clone)."""
    if isinstance(options, dict):
        return {k: clone_options(v) for k, v in options.items()}
    if isinstance(options, list):
        return [clone_options(v) for v in options]
    return options


class ModelPatcher:
    """The MODEL type: the shared BaseModel plus per-node model_options (comfy.model_patcher.ModelPatcher)."""

    def __init__(self, model: BaseModel, load_device: torch.device, offload_device: torch.device = INTERMEDIATE_DEVICE):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.attachments: dict[str, Any] = {}

    def clone(self) -> "ModelPatcher":
        """A new patcher over the same weights; options copied so patches do not leak back."""
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.model_options = clone_options(self.model_options)
        n.attachments = dict(self.attachments)
        return n

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def get_model_object(self, name: str) -> Any:
        """An attribute of the BaseModel by dotted path, e.g. 'model_sampling' or 'diffusion_model'."""
        obj: Any = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def model_dtype(self) -> torch.dtype:
        return self.model.get_dtype()

    def set_model_unet_function_wrapper(self, fn: Callable) -> None:
        self.model_options["model_function_wrapper"] = fn

    def set_model_sampler_cfg_function(self, fn: Callable, disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn: Callable, disable_cfg1_optimization: bool = False) -> None:
        self.model_options.setdefault("sampler_post_cfg_function", []).append(fn)
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_attachments(self, key: str, obj: Any) -> None:
        self.attachments[key] = obj

    def get_attachment(self, key: str) -> Any:
        return self.attachments.get(key)


@dataclass(frozen=True)
class Tokens:
    """What CLIP.tokenize returns here: the prompt itself (the base's text encoder tokenizes)."""

    text: str


@dataclass
class CLIP:
    """The CLIP type over LockedBase.encode_text (comfy.sd.CLIP's tokenize / encode_from_tokens)."""

    base: LockedBase
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def clone(self) -> "CLIP":
        return copy.copy(self)

    def tokenize(self, text: str) -> Tokens:
        return Tokens(text)

    def encode_from_tokens(self, tokens: Tokens, return_pooled: bool = False,
                           return_dict: bool = False) -> Any:
        """Cross-attention context (1, T, D); with return_pooled also the pooled / ADM vector (or None)."""
        encoded = self.base.encode_text([tokens.text])
        cond = encoded.context.to(INTERMEDIATE_DEVICE, torch.float32)
        pooled = None if encoded.y is None else encoded.y.to(INTERMEDIATE_DEVICE, torch.float32)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: Tokens) -> list:
        """CONDITIONING: [[cond (1, T, D), {"pooled_output": pooled}]], pooled omitted when the base has none."""
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {} if pooled is None else {"pooled_output": pooled}]]


@dataclass
class VAE:
    """The VAE type over LockedBase.encode_images / decode_latents: IMAGE BHWC 0..1 <-> unscaled LATENT."""

    base: LockedBase
    latent_format: LatentFormat
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    downscale_ratio: int = 8

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def spacial_compression_decode(self) -> int:
        return self.downscale_ratio

    @property
    def latent_channels(self) -> int:
        return self.latent_format.latent_channels

    def _crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Centre-crop H and W down to multiples of the compression (comfy.sd.VAE.vae_encode_crop_pixels)."""
        r = self.downscale_ratio
        h, w = (pixels.shape[1] // r) * r, (pixels.shape[2] // r) * r
        if (h, w) == tuple(pixels.shape[1:3]):
            return pixels
        top, left = (pixels.shape[1] % r) // 2, (pixels.shape[2] % r) // 2
        return pixels[:, top:top + h, left:left + w, :]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE (B, H, W, C) 0..1 -> unscaled latent (B, C_lat, H/8, W/8) on the CPU."""
        if pixels.ndim != 4:
            raise ValueError(f"VAE.encode needs an IMAGE (B, H, W, C), got shape {tuple(pixels.shape)}")
        pixels = self._crop(pixels[..., :3])
        x = pixels.movedim(-1, 1).to(self.device, torch.float32) * 2.0 - 1.0
        latents = self.base.encode_images(x)
        return (latents.float() / self.latent_format.scale_factor).to(INTERMEDIATE_DEVICE)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, C, h, w) -> IMAGE (B, 8h, 8w, 3) in 0..1 on the CPU."""
        latents = samples.to(self.device, torch.float32) * self.latent_format.scale_factor
        images = self.base.decode_latents(latents).float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).to(INTERMEDIATE_DEVICE)


def host_objects(base: LockedBase, device: torch.device | str = "cpu") -> tuple[ModelPatcher, CLIP, VAE]:
    """MODEL, CLIP and VAE for a loaded base, as CheckpointLoaderSimple returns them."""
    device = torch.device(device)
    model = BaseModel(base).to(device)
    return ModelPatcher(model, load_device=device), CLIP(base, device), VAE(base, model.latent_format, device)


def resize_channels(latent: torch.Tensor, channels: int) -> torch.Tensor:
    """An all-zero latent with another channel count (comfy.sample.fix_empty_latent_channels)."""
    if latent.shape[1] == channels or torch.count_nonzero(latent) > 0:
        return latent
    return torch.zeros((latent.shape[0], channels, *latent.shape[2:]), dtype=latent.dtype, device=latent.device)

