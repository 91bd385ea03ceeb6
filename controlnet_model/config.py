"""Architecture of the U-Net encoder that a ControlNet copies, as data (configs of cldm_v15/v21 and SDXL)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class PredictionType(str, Enum):
    """What the base U-Net predicts; the ControlNet is agnostic, its training target is not."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


@dataclass(frozen=True)
class ControlNetConfig:
    """LDM U-Net encoder layout shared by the locked U-Net and its trainable copy (Zhang et al. 2023, §3.2)."""

    family: str  # human name of the model family, used in error messages ("SD1.x", "SDXL", ...)
    model_channels: int = 320  # channels of the first level; time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per level
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (decoder has one more)
    # transformer blocks per level; None = no attention at that level, 0 = attention wrapper with no blocks
    transformer_depth: tuple[int | None, ...] = (1, 1, 1, None)
    transformer_depth_middle: int | None = 1  # transformer blocks in the middle block (None: no attention)
    context_dim: int = 768  # width of the cross-attention context (text encoder hidden size)
    num_heads: int = 8  # fixed head count (SD1.x); -1 when num_head_channels is used
    num_head_channels: int = -1  # fixed head width (SD2.x/SDXL: 64); -1 when num_heads is used
    use_linear_in_transformer: bool = False  # proj_in/proj_out are Linear (SD2.x/SDXL) or 1x1 conv (SD1.x)
    adm_in_channels: int | None = None  # width of the SDXL "y" vector fed to label_emb; None: no label_emb
    in_channels: int = 4  # latent channels fed to the U-Net and the ControlNet
    out_channels: int = 4  # U-Net output channels (unused by the ControlNet)
    hint_channels: int = 3  # channels of the condition image
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)  # condition encoder widths (cldm.py)
    global_average_pooling: bool = False  # shuffle-type models: residuals are averaged over H, W
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # free-form provenance

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if levels < 1:
            raise ValueError(f"channel_mult must name at least one level, got {self.channel_mult!r}")
        if len(self.transformer_depth) != levels:
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries but channel_mult has {levels} levels"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.model_channels % 32 or any((self.model_channels * m) % 32 for m in self.channel_mult):
            raise ValueError(f"every level's channels must be a multiple of 32 (GroupNorm32), got {self.channel_widths}")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels (the other to -1)")
        if len(self.hint_block_channels) != 4:
            raise ValueError(f"hint_block_channels needs 4 widths, got {self.hint_block_channels!r}")

    # ---- derived layout -------------------------------------------------------------------------------
    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def channel_widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def num_input_blocks(self) -> int:
        """conv_in + (ResBlocks per level) + one Downsample between levels."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + (levels - 1)

    @property
    def num_outputs(self) -> int:
        """Residuals a ControlNet produces: one per input block (skip connection) plus the middle."""
        return self.num_input_blocks + 1

    def skip_layout(self) -> list[tuple[int, int]]:
        """(channels, downsampling factor) of each skip connection, in input-block order."""
        layout = [(self.model_channels, 1)]
        for level, width in enumerate(self.channel_widths):
            for _ in range(self.num_res_blocks):
                layout.append((width, 2**level))
            if level != len(self.channel_mult) - 1:
                layout.append((width, 2 ** (level + 1)))
        return layout

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head width) for an attention layer of `channels` width."""
        if self.num_heads != -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def signature(self) -> tuple:
        """What must agree between a ControlNet and the U-Net it steers."""
        return (self.in_channels, self.model_channels, self.channel_mult, self.num_res_blocks,
                self.context_dim, self.adm_in_channels)

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ControlNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ControlNetConfig fields {unknown}; known fields are {sorted(known)}")
        values = dict(data)
        for name in ("channel_mult", "transformer_depth", "hint_block_channels"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "ControlNetConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ControlNetConfig":
        return dataclasses.replace(self, **changes)


# Named variants. Full-size ones follow cldm_v15.yaml, cldm_v21.yaml and the SDXL ControlNets
# (diffusers-trained full / mid / small); tiny ones keep each family's shape at test size.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(family="SD1.x"),
    "sd21": dict(family="SD2.x", num_heads=-1, num_head_channels=64, context_dim=1024,
                 use_linear_in_transformer=True),
    "sdxl": dict(family="SDXL", channel_mult=(1, 2, 4), transformer_depth=(None, 2, 10),
                 transformer_depth_middle=10, num_heads=-1, num_head_channels=64, context_dim=2048,
                 use_linear_in_transformer=True, adm_in_channels=2816),
    "sdxl-mid": dict(family="SDXL", channel_mult=(1, 2, 4), transformer_depth=(None, 0, 1),
                     transformer_depth_middle=1, num_heads=-1, num_head_channels=64, context_dim=2048,
                     use_linear_in_transformer=True, adm_in_channels=2816),
    "sdxl-small": dict(family="SDXL", channel_mult=(1, 2, 4), transformer_depth=(None, None, None),
                       transformer_depth_middle=0, num_heads=-1, num_head_channels=64, context_dim=2048,
                       use_linear_in_transformer=True, adm_in_channels=2816),
    "tiny": dict(family="tiny SD1.x-shaped", model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=32, num_heads=2,
                 hint_block_channels=(16, 16, 32, 32)),
    "tiny-sd2": dict(family="tiny SD2.x-shaped", model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=48, num_heads=-1,
                     num_head_channels=16, use_linear_in_transformer=True, hint_block_channels=(16, 16, 32, 32)),
    "tiny-sdxl": dict(family="tiny SDXL-shaped", model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                      transformer_depth=(None, 1, 2), transformer_depth_middle=2, context_dim=64, num_heads=-1,
                      num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=40,
                      hint_block_channels=(16, 16, 32, 32)),
    # the demo world's base (demo/world_base.py): 64 px images as 8x8 pixel-unshuffled 192-channel latents
    "world": dict(family="ZeroConv world", model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                  transformer_depth=(None, 1), transformer_depth_middle=1, context_dim=64, num_heads=4,
                  in_channels=48, out_channels=48, hint_block_channels=(16, 32, 64, 128)),
}


def preset(name: str, **overrides: Any) -> ControlNetConfig:
    """A named config from PRESETS, optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ControlNetConfig(**{**PRESETS[name], **overrides})


# Families by text-context width, for naming a model whose config we only partly know.
FAMILY_BY_CONTEXT_DIM: dict[int, str] = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def describe(cfg: ControlNetConfig) -> str:
    """A family with the facts that tell families apart, for error messages."""
    adm = f", ADM {cfg.adm_in_channels}" if cfg.adm_in_channels else ""
    return (f"{cfg.family} (context {cfg.context_dim}, channels {list(cfg.channel_widths)}, "
            f"{cfg.num_outputs} outputs{adm})")


def check_compatible(control: ControlNetConfig, unet: ControlNetConfig, control_name: str = "the ControlNet",
                     unet_name: str = "the model") -> None:
    """Refuse a ControlNet made for another model family, naming both (never a raw shape error later)."""
    if control.signature() == unet.signature():
        return
    raise ValueError(f"{control_name} is {describe(control)} but {unet_name} is {describe(unet)}; "
                     f"load a ControlNet made for {unet.family}")


# Transformer ControlNet families (dit_control.DIT_FORMATS) by their display names.
FAMILY_NAMES: dict[str, str] = {"flux": "Flux.1", "sd3": "SD3 / SD3.5"}


def check_family(control_family: str, host_family: str, control_name: str = "the ControlNet",
                 host_name: str = "the model") -> None:
    """Refuse a ControlNet of another family before the first step (a Flux ControlNet on SDXL, an SD one on Flux,
    Flux on SD3), naming both. Families: "flux", "sd3", or a U-Net family ("SD1.x", "SD2.x", "SDXL")."""
    if control_family.lower() == host_family.lower():
        return
    control, host = FAMILY_NAMES.get(control_family, control_family), FAMILY_NAMES.get(host_family, host_family)
    raise ValueError(f"{control_name} is a {control} ControlNet but {host_name} is {host}; load a ControlNet made "
                     f"for {host}, or use a {control} model")
