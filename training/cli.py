"""`zeroconv train CONFIG` and `zeroconv init-controlnet`: the training module's subcommands."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `init-controlnet` to the top-level `zeroconv` parser."""
    train = subparsers.add_parser("train", help="train a ControlNet against a locked base (TOML or YAML config)",
                                  description="Train a ControlNet. Run under torchrun for several GPUs or machines.")
    train.add_argument("config", nargs="?", help="training config (.toml, .yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (TOML value syntax; repeatable), e.g. --set lr=2e-5")
    train.add_argument("--write-default-config", metavar="PATH",
                       help="write a commented TOML with every field and its default, then exit")
    train.set_defaults(func=run_train)

    init = subparsers.add_parser("init-controlnet", help="a fresh ControlNet copied from a base model's encoder",
                                 description="Copy the base U-Net's encoder into a new ControlNet with zero convs "
                                             "(Zhang et al. 2023 §3.2; tool_add_control.py) and write it.")
    init.add_argument("--base", required=True, help="SD1.x/SD2.x/SDXL single file or ZeroConv world base")
    init.add_argument("--out", required=True, help="output .safetensors (native ZeroConv/ComfyUI/A1111 format)")
    init.add_argument("--control-type", default="", help="what it will control (stored in the file), e.g. canny")
    init.add_argument("--hint-channels", type=int, default=None, help="condition channels (default 3)")
    init.set_defaults(func=run_init)


def run_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, write_default_config

    if args.write_default_config:
        path = write_default_config(args.write_default_config)
        logger.info("wrote %s", path)
        return 0
    if not args.config:
        raise ValueError("give a config file (zeroconv train CONFIG) or --write-default-config PATH")
    cfg = TrainConfig.from_file(args.config, args.overrides)
    from .loop import train

    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns; one reports
        logger.info("ControlNet: %s%s", result.checkpoint, f"; diffusers: {result.diffusers}" if result.diffusers else "")
    return 0


def init_controlnet(base_path: str | Path, out: str | Path, control_type: str = "",
                    hint_channels: int | None = None) -> Path:
    """Write a fresh ControlNet for the base (copied encoder, zero-initialised zero convs and hint output)."""
    from ..controlnet_model.checkpoint import ControlNetMetadata, save_controlnet
    from ..controlnet_model.from_unet import init_from_unet
    from .base import load_base

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"write the ControlNet as .safetensors, got {out}")
    base = load_base(base_path)
    controlnet, fresh = init_from_unet(base.unet, hint_channels=hint_channels)
    metadata = ControlNetMetadata(family=base.family, control_type=control_type,
                                  provenance=f"zeroconv init-controlnet from {Path(base_path).name}")
    save_controlnet(controlnet.float(), out, metadata=metadata)
    logger.info("wrote %s (%d tensors copied from the base, %d fresh)", out,
                len(controlnet.state_dict()) - len(fresh), len(fresh))
    return out


def run_init(args: argparse.Namespace) -> int:
    init_controlnet(args.base, args.out, args.control_type, args.hint_channels)
    return 0
