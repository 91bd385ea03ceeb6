"""The demo world's locked base: a word-level text encoder, the LDM-layout U-Net at a tiny size, and an exact
pixel-unshuffle "VAE", stored together in one safetensors file (metadata zeroconv_kind = "world-base").

The autoencoder is training-free: an image (3, H, W) becomes (3*64, H/8, W/8) by pixel_unshuffle(8) (Shi et al.
2016), so the ControlNet's 8x hint-to-latent ratio holds and decoding is exact. The schedule is DDPM's linear one
(Ho et al. 2020): in pixel space the LDM schedule leaves the image's mean colour readable at t = 999.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..controlnet_model.atomic import atomic_save_safetensors
from ..controlnet_model.config import ControlNetConfig, PredictionType, preset
from ..controlnet_model.unet import UNetModel
from .base import TextConditioning
from .schedule import NoiseSchedule
from .world import CAPTION_WORDS, PALETTE, SHAPES

logger = logging.getLogger(__name__)

KIND = "world-base"  # safetensors metadata zeroconv_kind, read by base.detect_base_kind
FAMILY = "ZeroConv world"
PATCH = 8  # pixel_unshuffle factor: the latent is 1/8 of the image side, as in Stable Diffusion
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def world_vocabulary() -> tuple[str, ...]:
    """Special tokens, then every word the world's captions use (palette, shapes, template words)."""
    return SPECIALS + tuple(dict.fromkeys([*PALETTE, *SHAPES, *CAPTION_WORDS]))


@dataclass(frozen=True)
class TextEncoderConfig:
    """Size of the world's text encoder (a pre-LN Transformer encoder, Vaswani et al. 2017; CLIP-like output)."""

    vocab: tuple[str, ...]  # token strings; index = token id
    max_tokens: int = 8  # context length T, <bos> and <eos> included
    width: int = 64  # hidden size = the U-Net's context_dim
    layers: int = 2  # Transformer encoder layers
    heads: int = 4  # attention heads

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "vocab": list(self.vocab)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TextEncoderConfig":
        data = json.loads(text)
        return cls(**{**data, "vocab": tuple(data["vocab"])})


class WorldTokenizer:
    """Lower-case words to ids: <bos> words <eos> <pad>...; unknown words become <unk> (logged)."""

    def __init__(self, vocab: tuple[str, ...], max_tokens: int):
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.max_tokens = max_tokens
        self.known_words = [w for w in vocab if w not in SPECIALS]

    def __call__(self, captions: list[str]) -> torch.Tensor:  # (B, T) long
        rows = []
        for caption in captions:
            words = re.findall(r"[a-z]+", caption.lower())
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                logger.warning("the world does not know the words %s; it knows %s", unknown, self.known_words)
            ids = [self.ids["<bos>"], *(self.ids.get(w, self.ids["<unk>"]) for w in words), self.ids["<eos>"]]
            if len(ids) > self.max_tokens:
                logger.warning("caption %r is longer than %d tokens; cut", caption, self.max_tokens)
                ids = ids[:self.max_tokens]
            rows.append(ids + [self.ids["<pad>"]] * (self.max_tokens - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class WorldTextEncoder(nn.Module):
    """Token + position embeddings, pre-LN Transformer layers, final LayerNorm -> (B, T, width) context."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(len(cfg.vocab), cfg.width)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_tokens, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, width)
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        return self.final_layer_norm(self.layers(h))


def linear_schedule(beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000) -> NoiseSchedule:
    """DDPM's linear betas (Ho et al. 2020), epsilon prediction."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0))


class WorldBase:
    """The world's LockedBase: encode_text, encode_images / decode_latents (pixel (un)shuffle), U-Net, schedule."""

    family = FAMILY

    def __init__(self, unet: UNetModel, text_encoder: WorldTextEncoder, schedule: NoiseSchedule, image_size: int,
                 latent_scale_factor: float, metadata: dict[str, str] | None = None):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = WorldTokenizer(text_encoder.config.vocab, text_encoder.config.max_tokens)
        self.schedule = schedule
        self.image_size = image_size
        self.latent_scale_factor = latent_scale_factor  # read by the workflow runner's VAE (host.py)
        self.metadata = dict(metadata or {})

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_text(self, captions: list[str]) -> TextConditioning:
        ids = self.tokenizer(list(captions)).to(next(self.text_encoder.parameters()).device)
        return TextConditioning(self.text_encoder(ids).to(self.device, self.dtype))  # (B, T, context_dim)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 192, H/8, W/8) scaled latents."""
        if pixels.shape[-1] % PATCH or pixels.shape[-2] % PATCH:
            raise ValueError(f"image sides must be multiples of {PATCH}, got {tuple(pixels.shape[-2:])}; resize it")
        return F.pixel_unshuffle(pixels, PATCH) * self.latent_scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 192, h, w) -> (B, 3, 8h, 8w) in [-1, 1]."""
        return F.pixel_shuffle(latents / self.latent_scale_factor, PATCH).clamp(-1, 1)

    def modules(self) -> dict[str, nn.Module]:
        """The weight-holding parts, by file-key prefix."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "WorldBase":
        for module in self.modules().values():
            module.to(device, dtype)
        return self

    def lock(self) -> "WorldBase":
        """Freeze every weight and switch to eval mode (the ControlNet trains against a locked base)."""
        for module in self.modules().values():
            module.requires_grad_(False).eval()
        return self


def build_world_base(unet_config: ControlNetConfig | None = None, text_config: TextEncoderConfig | None = None,
                     image_size: int = 64, latent_scale_factor: float = 1.0, seed: int = 0) -> WorldBase:
    """A freshly initialised world base (the starting point of train_world_base)."""
    unet_config = unet_config or preset("world")
    if unet_config.in_channels != 3 * PATCH * PATCH:
        raise ValueError(f"the world's U-Net needs in_channels {3 * PATCH * PATCH} (pixel_unshuffle of RGB by "
                         f"{PATCH}), got {unet_config.in_channels}")
    text_config = text_config or TextEncoderConfig(world_vocabulary(), width=unet_config.context_dim)
    if text_config.width != unet_config.context_dim:
        raise ValueError(f"text encoder width {text_config.width} must equal the U-Net context_dim "
                         f"{unet_config.context_dim}")
    torch.manual_seed(seed)
    return WorldBase(UNetModel(unet_config), WorldTextEncoder(text_config), linear_schedule(), image_size,
                     latent_scale_factor)


def save_world_base(base: WorldBase, path: str | Path, provenance: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write the base as one safetensors file (weights in `dtype`, everything needed to rebuild it as metadata)."""
    state = {f"{prefix}.{k}": v.detach().to("cpu", dtype).contiguous()
             for prefix, module in base.modules().items() for k, v in module.state_dict().items()}
    meta = {"zeroconv_kind": KIND, "zeroconv_family": FAMILY, "zeroconv_config": base.unet.config.to_json(),
            "zeroconv_text_config": base.text_encoder.config.to_json(),
            "zeroconv_alphas_cumprod": json.dumps(base.schedule.alphas_cumprod.tolist()),
            "zeroconv_prediction_type": base.schedule.prediction_type.value,
            "zeroconv_image_size": str(base.image_size), "zeroconv_latent_scale": repr(base.latent_scale_factor),
            "zeroconv_provenance": json.dumps(provenance or {}, sort_keys=True)}
    return atomic_save_safetensors(state, Path(path), meta)  # never a half-written model file


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"world base {path} does not exist; the package ships models/world_base.safetensors, "
                                "or make one with `python -m zeroconv.training.train_world_base`")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); reinstall or rebuild it") from None


def load_world_base(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> WorldBase:
    """Read a world base written by save_world_base, locked (no gradients, eval mode)."""
    state, meta = _read(Path(path))
    if meta.get("zeroconv_kind") != KIND:
        raise ValueError(f"{path} is not a ZeroConv world base (metadata zeroconv_kind is "
                         f"{meta.get('zeroconv_kind')!r}); make one with `python -m zeroconv.training.train_world_base`")
    unet = UNetModel(ControlNetConfig.from_json(meta["zeroconv_config"]))
    text_encoder = WorldTextEncoder(TextEncoderConfig.from_json(meta["zeroconv_text_config"]))
    for prefix, module in (("unet", unet), ("text_encoder", text_encoder)):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        module.load_state_dict(part, strict=True)
    schedule = NoiseSchedule(torch.tensor(json.loads(meta["zeroconv_alphas_cumprod"]), dtype=torch.float64),
                             PredictionType(meta.get("zeroconv_prediction_type", "epsilon")))
    base = WorldBase(unet, text_encoder, schedule, int(meta["zeroconv_image_size"]),
                     float(meta["zeroconv_latent_scale"]), meta)
    return base.to(device, dtype).lock()
