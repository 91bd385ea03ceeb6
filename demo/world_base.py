"""The demo world's locked base: a word-level text encoder, the LDM-layout U-Net at a tiny size, and a linear
patch autoencoder, stored together in one safetensors file (metadata zeroconv_kind = "world-base").

The autoencoder is fitted, not trained: each 8x8 RGB patch (pixel_unshuffle(8), Shi et al. 2016: 192 values) is
projected on the first 48 principal components of the world's patches, each divided by its standard deviation,
so the latent is (48, H/8, W/8), the ControlNet's 8x hint-to-latent ratio holds, and decoding is the inverse.
Measured on 200 held-out pictures: 99.6 % of the patch variance kept, mean IoU 0.986 (min 0.948) between the
decoded shape and the true one. 48, not 192, channels: a 64-channel U-Net cannot carry 192 independent values per
cell (an epsilon model on the raw unshuffled patches stalled at MSE 0.68 = about 1 - 64/192, and sampled noise).
The schedule is DDPM's linear one (Ho et al. 2020): in pixel space the LDM schedule leaves the image's mean colour
readable at t = 999.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..controlnet_model.atomic import atomic_save_safetensors
from ..controlnet_model.config import ControlNetConfig, PredictionType, preset
from ..controlnet_model.unet import UNetModel
from ..training.base import TextConditioning
from ..training.schedule import NoiseSchedule
from .world import CAPTION_WORDS, PALETTE, SHAPES

logger = logging.getLogger(__name__)

KIND = "world-base"  # safetensors metadata zeroconv_kind, read by base.detect_base_kind
FAMILY = "ZeroConv world"
PATCH = 8  # pixel_unshuffle factor: the latent is 1/8 of the image side, as in Stable Diffusion
LATENT_CHANNELS = 48  # principal components kept per 8x8 RGB patch (of 192)
FIT_IMAGES = 512  # world pictures the default autoencoder is fitted on
FP32_PARTS = ("autoencoder",)  # parts kept in fp32 in memory and on disk whatever the weights' dtype
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


def linear_schedule(beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000,
                    prediction_type: PredictionType = PredictionType.V_PREDICTION) -> NoiseSchedule:
    """DDPM's linear betas (Ho et al. 2020) with v-prediction (Salimans & Ho 2022).

    v, not epsilon: with this schedule sqrt(a) is 0.006 at t = 999, so an epsilon model's x0 estimate there,
    (x_t - sqrt(1 - a) eps) / sqrt(a), multiplies its error by ~150; v is -x0 at high t and the noise only at low t,
    where its error is scaled down by sqrt(1 - a).
    """
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0), prediction_type)


class PatchAutoencoder(nn.Module):
    """Linear autoencoder on 8x8 RGB patches: the top principal components of the world's patches, each scaled to
    unit variance (buffers only).

    Whitened, not merely projected: the first component (the patch's mean brightness) varies ~50x more than the
    48th (edge detail), so with one global scale a U-Net error of the same size in every channel is mostly texture
    in the picture. Per component, an error is decoded in proportion to how much that component varies.
    """

    def __init__(self, basis: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis.float().contiguous())  # (K, 3 * PATCH * PATCH), orthonormal rows
        self.register_buffer("mean", mean.float().contiguous())  # (3 * PATCH * PATCH,)
        self.register_buffer("scale", scale.float().contiguous())  # (K,) std of each component's coefficient

    @classmethod
    def fit(cls, pixels: torch.Tensor, channels: int = LATENT_CHANNELS) -> "PatchAutoencoder":
        """PCA of the 8x8 patches of (N, 3, H, W) pictures in [-1, 1], keeping `channels` whitened components."""
        patches = F.pixel_unshuffle(pixels.double(), PATCH).permute(0, 2, 3, 1).reshape(-1, 3 * PATCH * PATCH)
        mean = patches.mean(dim=0)
        centred = patches - mean
        values, vectors = torch.linalg.eigh(centred.T @ centred)  # by ascending eigenvalue
        top = values.flip(-1)[:channels].clamp_min(1e-12)
        return cls(vectors.flip(-1)[:, :channels].T, mean, (top / len(patches)).sqrt())

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, H/8, W/8) whitened coefficients."""
        patches = F.pixel_unshuffle(pixels.to(self.basis.dtype), PATCH).movedim(1, -1)
        return (((patches - self.mean) @ self.basis.T) / self.scale).movedim(-1, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) whitened coefficients -> (B, 3, 8h, 8w)."""
        patches = (latents.to(self.basis.dtype).movedim(1, -1) * self.scale) @ self.basis + self.mean
        return F.pixel_shuffle(patches.movedim(-1, 1), PATCH)


class WorldBase:
    """The world's LockedBase: encode_text, encode_images / decode_latents (pixel (un)shuffle), U-Net, schedule."""

    family = FAMILY

    def __init__(self, unet: UNetModel, text_encoder: WorldTextEncoder, autoencoder: PatchAutoencoder,
                 schedule: NoiseSchedule, image_size: int, latent_scale_factor: float,
                 metadata: dict[str, str] | None = None):
        self.unet = unet
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
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
        """(B, 3, H, W) in [-1, 1] -> (B, K, H/8, W/8) scaled latents."""
        if pixels.shape[-1] % PATCH or pixels.shape[-2] % PATCH:
            raise ValueError(f"image sides must be multiples of {PATCH}, got {tuple(pixels.shape[-2:])}; resize it")
        return (self.autoencoder.encode(pixels) * self.latent_scale_factor).to(pixels.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, K, h, w) -> (B, 3, 8h, 8w) in [-1, 1]."""
        return self.autoencoder.decode(latents / self.latent_scale_factor).to(latents.dtype).clamp(-1, 1)

    def modules(self) -> dict[str, nn.Module]:
        """The weight-holding parts, by file-key prefix."""
        return {"unet": self.unet, "text_encoder": self.text_encoder, "autoencoder": self.autoencoder}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "WorldBase":
        for name, module in self.modules().items():
            module.to(device, None if name in FP32_PARTS else dtype)
        return self

    def lock(self) -> "WorldBase":
        """Freeze every weight and switch to eval mode (the ControlNet trains against a locked base)."""
        for module in self.modules().values():
            module.requires_grad_(False).eval()
        return self


def build_world_base(unet_config: ControlNetConfig | None = None, text_config: TextEncoderConfig | None = None,
                     image_size: int = 64, latent_scale_factor: float | None = None, seed: int = 0,
                     autoencoder: PatchAutoencoder | None = None, fit_pixels: torch.Tensor | None = None) -> WorldBase:
    """A freshly initialised world base (the starting point of train_world_base).

    Without an autoencoder one is fitted on `fit_pixels` ((N, 3, H, W) in [-1, 1]), by default FIT_IMAGES pictures
    drawn from `seed`; without a latent scale it is 1 / std of their latents (SD's 0.18215 plays this role).
    """
    from .world import random_specs, render_target

    unet_config = unet_config or preset("world")
    if autoencoder is None or latent_scale_factor is None:
        if fit_pixels is None:
            pictures = np.stack([render_target(s, image_size) for s in random_specs(FIT_IMAGES, seed)])
            fit_pixels = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        autoencoder = autoencoder or PatchAutoencoder.fit(fit_pixels, unet_config.in_channels)
        latent_scale_factor = latent_scale_factor or float(1.0 / autoencoder.encode(fit_pixels).std())
    if unet_config.in_channels != autoencoder.channels:
        raise ValueError(f"the world's U-Net takes {unet_config.in_channels} latent channels but the autoencoder "
                         f"makes {autoencoder.channels}; fit the autoencoder with as many components")
    text_config = text_config or TextEncoderConfig(world_vocabulary(), width=unet_config.context_dim)
    if text_config.width != unet_config.context_dim:
        raise ValueError(f"text encoder width {text_config.width} must equal the U-Net context_dim "
                         f"{unet_config.context_dim}")
    torch.manual_seed(seed)
    return WorldBase(UNetModel(unet_config), WorldTextEncoder(text_config), autoencoder, linear_schedule(),
                     image_size, latent_scale_factor)


def save_world_base(base: WorldBase, path: str | Path, provenance: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write the base as one safetensors file (weights in `dtype`, everything needed to rebuild it as metadata)."""
    state = {f"{prefix}.{k}": v.detach().to("cpu", torch.float32 if prefix in FP32_PARTS else dtype).contiguous()
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
                                "or make one with `python -m zeroconv.demo.train_world_base`")
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
                         f"{meta.get('zeroconv_kind')!r}); make one with `python -m zeroconv.demo.train_world_base`")
    unet = UNetModel(ControlNetConfig.from_json(meta["zeroconv_config"]))
    text_encoder = WorldTextEncoder(TextEncoderConfig.from_json(meta["zeroconv_text_config"]))
    if "autoencoder.basis" not in state:
        raise ValueError(f"{path} is a world base from before the patch autoencoder; rebuild it with "
                         "`python -m zeroconv.demo.train_world_base`")
    # world bases from before whitening stored no scale: their coefficients are used as they are
    state.setdefault("autoencoder.scale", torch.ones(state["autoencoder.basis"].shape[0]))
    autoencoder = PatchAutoencoder(state["autoencoder.basis"], state["autoencoder.mean"], state["autoencoder.scale"])
    for prefix, module in (("unet", unet), ("text_encoder", text_encoder), ("autoencoder", autoencoder)):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        module.load_state_dict(part, strict=True)
    schedule = NoiseSchedule(torch.tensor(json.loads(meta["zeroconv_alphas_cumprod"]), dtype=torch.float64),
                             PredictionType(meta.get("zeroconv_prediction_type", "epsilon")))
    base = WorldBase(unet, text_encoder, autoencoder, schedule, int(meta["zeroconv_image_size"]),
                     float(meta["zeroconv_latent_scale"]), meta)
    return base.to(device, dtype).lock()
