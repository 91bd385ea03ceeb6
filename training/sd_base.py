"""Stable Diffusion 1.x / 2.x / XL single-file checkpoints as a locked base: U-Net, VAE, text encoders, schedule.

Key layouts (the original LDM/SGM single files): U-Net `model.diffusion_model.*`, VAE `first_stage_model.*`,
text `cond_stage_model.*` (SD1.x/2.x) or `conditioner.embedders.{0,1}.*` (SDXL). The U-Net and VAE architectures
are read from the weights' shapes; the prediction type from a `.yaml` beside the file (SD2.x 768-v:
parameterization "v"), else the user's `prediction_type`.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..controlnet_model.blocks import timestep_embedding
from ..controlnet_model.checkpoint import infer_ldm_config
from ..controlnet_model.config import ControlNetConfig, PredictionType
from ..controlnet_model.safetensors_io import SAFETENSORS_SUFFIXES
from ..controlnet_model.skeleton import skeleton
from ..controlnet_model.unet import UNetModel
from .base import TextConditioning
from .schedule import NoiseSchedule
from .text_encoders import TEXT_ENCODERS, FrozenTextEncoder, build_text_encoder
from .vae import AutoencoderKL, fix_attention_shapes, vae_config_from_state

logger = logging.getLogger(__name__)

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# Family -> marker keys that must all be present (first match wins; SDXL before SD2.x before SD1.x).
SD_FAMILY_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SDXL", ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
              "conditioner.embedders.1.model.ln_final.weight")),
    ("SD2.x", ("cond_stage_model.model.ln_final.weight",)),
    ("SD1.x", ("cond_stage_model.transformer.text_model.final_layer_norm.weight",)),
)
# Old SD1.x files saved with transformers < 4.x lack the `text_model.` level.
LEGACY_SD1_TEXT = ("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")
LATENT_SCALE = {"SD1.x": 0.18215, "SD2.x": 0.18215, "SDXL": 0.13025}  # LDM/SGM scale_factor
NATIVE_SIZE = {"SD1.x": 512, "SD2.x": 512, "SDXL": 1024}  # SD2.x 768-v: 768


class SDBase(nn.Module):
    """A frozen SD model implementing training.base.LockedBase."""

    def __init__(self, family: str, unet: UNetModel, vae: AutoencoderKL, text: list[FrozenTextEncoder],
                 schedule: NoiseSchedule, image_size: int, latent_scale: float):
        super().__init__()
        self.family, self.unet, self.vae, self.text = family, unet, vae, nn.ModuleList(text)
        self.schedule, self.image_size, self.latent_scale = schedule, image_size, latent_scale
        self.takes_size_conditioning = unet.config.adm_in_channels is not None

    def encode_text(self, captions: list[str], size_cond: torch.Tensor | None = None) -> TextConditioning:
        """Context (B, T, D) from every encoder concatenated on D; SDXL adds y = pooled + Fourier(size_cond)."""
        outputs = [enc(captions) for enc in self.text]
        context = torch.cat([c for c, _ in outputs], dim=-1)
        adm = self.unet.config.adm_in_channels
        if adm is None:
            return TextConditioning(context)
        pooled = next(p for _, p in outputs if p is not None)
        if size_cond is None:  # (orig h, orig w, crop top, crop left, target h, target w)
            size_cond = torch.tensor([[self.image_size, self.image_size, 0, 0, self.image_size, self.image_size]])
        size_cond = size_cond.to(pooled.device).expand(len(captions), 6)
        dim = (adm - pooled.shape[-1]) // 6  # 256 for SDXL
        fourier = timestep_embedding(size_cond.flatten(), dim).reshape(len(captions), 6 * dim)
        return TextConditioning(context, torch.cat([pooled, fourier.to(pooled.dtype)], dim=-1))

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> VAE posterior (mean, logvar) (B, 2C, H/8, W/8), unscaled."""
        return self.vae.encode_moments(pixels)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled posterior means (B, C, H/8, W/8)."""
        return self.encode_moments(pixels).chunk(2, dim=1)[0] * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.latent_scale)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "SDBase":  # type: ignore[override]
        return super().to(device=device, dtype=dtype)


# ---- reading files ---------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors, or of a .ckpt/.pt through torch.load(weights_only=True)."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc}); download it again") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} needs arbitrary code to load and was refused ({str(exc).splitlines()[0]}); "
                         "convert it to .safetensors") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable checkpoint ({exc}); it may be truncated") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, {}


def detect_sd_family(keys: Any) -> str:
    present = set(keys)
    for family, markers in SD_FAMILY_MARKERS:
        if all(m in present for m in markers):
            return family
    looked = "; ".join(f"{f}: {', '.join(m)}" for f, m in SD_FAMILY_MARKERS)
    raise ValueError(f"not an SD1.x, SD2.x or SDXL single-file checkpoint with text encoders (looked for {looked}); "
                     "use a full checkpoint, not a U-Net-only or diffusers-folder file")


def _sub(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def infer_unet_config(state: Mapping[str, torch.Tensor], family: str) -> ControlNetConfig:
    """LDM U-Net architecture from key names and shapes (prefix stripped; checkpoint.infer_ldm_config), with the
    family named by the checkpoint's keys and heads by the family's rule."""
    sd1 = family == "SD1.x"
    return infer_ldm_config(state).replace(family=family, num_heads=8 if sd1 else -1,
                                           num_head_channels=-1 if sd1 else 64,
                                           out_channels=state["out.2.weight"].shape[0])


def read_parameterization(path: Path) -> PredictionType | None:
    """v-prediction from the LDM config beside the file (`model.params.parameterization: v`), if there is one."""
    for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if candidate.is_file():
            import yaml

            try:
                params = (yaml.safe_load(candidate.read_text()) or {}).get("model", {}).get("params", {}) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{candidate} is not valid YAML ({exc}); fix or remove it") from None
            return PredictionType.V_PREDICTION if params.get("parameterization") == "v" else PredictionType.EPSILON
    return None


def _strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{path}: the {what} weights do not match the inferred architecture: missing {missing[:6]} "
                       f"({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: {what} weight {key} is {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)


def load_sd_base(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDBase:
    """A frozen SD1.x/SD2.x/SDXL base from one checkpoint file (non-EMA U-Net weights, as tool_add_control)."""
    path = Path(path)
    state, meta = read_checkpoint(path)
    if LEGACY_SD1_TEXT[0] + "final_layer_norm.weight" in state:
        state = {(LEGACY_SD1_TEXT[1] + k[len(LEGACY_SD1_TEXT[0]):] if k.startswith(LEGACY_SD1_TEXT[0]) else k): v
                 for k, v in state.items()}
    family = detect_sd_family(state)
    unet_state, vae_state = _sub(state, UNET_PREFIX), fix_attention_shapes(_sub(state, VAE_PREFIX))
    if not unet_state or not vae_state:
        raise KeyError(f"{path} lacks the {'U-Net' if not unet_state else 'VAE'} ({UNET_PREFIX if not unet_state else VAE_PREFIX}*); "
                       "use a full single-file checkpoint")
    extra = json.loads(meta.get("zeroconv_base", "{}"))  # tiny test files record what shapes cannot tell
    unet_cfg = ControlNetConfig.from_dict(extra["unet"]) if "unet" in extra else infer_unet_config(unet_state, family)
    unet, vae = skeleton(lambda: UNetModel(unet_cfg)), skeleton(lambda: AutoencoderKL(vae_config_from_state(vae_state)))
    _strict(unet, unet_state, "U-Net", path)
    _strict(vae, vae_state, "VAE", path)
    heads = extra.get("text_heads", [None] * len(TEXT_ENCODERS[family]))
    text = [build_text_encoder(spec, _sub(state, spec.prefix), h) for spec, h in zip(TEXT_ENCODERS[family], heads)]
    prediction = read_parameterization(path) or PredictionType.EPSILON
    schedule = NoiseSchedule.scaled_linear(prediction_type=prediction)
    size = 768 if family == "SD2.x" and prediction is PredictionType.V_PREDICTION else NATIVE_SIZE[family]
    base = SDBase(family, unet, vae, text, schedule, int(extra.get("image_size", size)),
                  float(extra.get("latent_scale", LATENT_SCALE[family])))
    logger.info("base %s: %s, %s prediction", path.name, family, prediction.value)
    return base.to(device, dtype).requires_grad_(False).eval()
