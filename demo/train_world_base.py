"""Train the demo world's base (text encoder + U-Net) from scratch: the DDPM loss (Ho et al. 2020) on the
schedule's target (v-prediction, Salimans & Ho 2022, for the world base) with 10 % empty captions for
classifier-free guidance (Ho & Salimans 2022) and an EMA of the weights.

    python -m zeroconv.demo.train_world_base --out output/world_base.safetensors --seed 0
    python -m zeroconv.demo.train_world_base --init output/world_base.safetensors --out ... --seed 1  # go on
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..training.loop import ema_update
from .world import random_specs, render_target
from .world_base import WorldBase, build_world_base, load_world_base, save_world_base

logger = logging.getLogger(__name__)
FIT_POOL = 4000  # pictures of the pool the patch autoencoder is fitted on (256,000 patches)


@dataclass(frozen=True)
class BaseTrainConfig:
    """One from-scratch run of the world base."""

    out: str = "models/world_base.safetensors"  # where the trained base is written
    seed: int = 0  # seeds the data, the initial weights, noise, timesteps and caption dropout
    init: str = ""  # a world base file to continue from (its weights, autoencoder and schedule); "" = from scratch
    steps: int = 6000  # optimiser steps
    batch_size: int = 32  # samples per step
    lr: float = 5e-4  # AdamW peak learning rate
    warmup: int = 200  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = 0.0  # AdamW weight decay
    ema_decay: float = 0.999  # EMA of the weights; the EMA is what gets saved
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    image_size: int = 64  # pixels; the latent is image_size / 8
    pool: int = 20000  # pictures drawn once and reused (with horizontal flips)
    threads: int = 2  # torch CPU threads
    log_every: int = 100  # steps between log lines


def lr_at(cfg: BaseTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_pool(cfg: BaseTrainConfig) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, S, S) uint8 targets and their captions, drawn from the seed."""
    specs = random_specs(cfg.pool, cfg.seed)
    images = np.stack([render_target(s, cfg.image_size) for s in specs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [s.caption for s in specs]


def base_loss(base: WorldBase, pixels: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """MSE between the U-Net's output and the schedule's target (noise or v), in fp32."""
    latents = base.encode_images(pixels)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, base.schedule.num_timesteps, (latents.shape[0],), generator=gen)
    noisy = base.schedule.add_noise(latents, noise, t)
    prediction = base.unet(noisy, t, base.encode_text(captions).context)
    return F.mse_loss(prediction.float(), base.schedule.target(latents, noise, t).float())


def train(cfg: BaseTrainConfig) -> dict[str, float]:
    """Build, draw the data, optimise, save the EMA weights; returns final numbers for models/README.md."""
    torch.set_num_threads(cfg.threads)
    images, captions = make_pool(cfg)
    if cfg.init:
        base = load_world_base(cfg.init)  # fp32, locked: unlock it to train on (the autoencoder holds buffers only)
        for module in base.modules().values():
            module.requires_grad_(True).train()
    else:
        base = build_world_base(image_size=cfg.image_size, seed=cfg.seed,
                                fit_pixels=images[:FIT_POOL].float() / 127.5 - 1.0)
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in base.modules().items()}
    params = [p for m in base.modules().values() for p in m.parameters()]
    ema_params = [p for m in ema.values() for p in m.parameters()]  # in the order of params
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, losses = time.time(), []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(captions), (cfg.batch_size,), generator=gen)
        pixels = images[idx].float() / 127.5 - 1.0  # (B, 3, S, S)
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = base_loss(base, pixels, batch_captions, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema_params, params, cfg.ema_decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            logger.info("step %d/%d  loss %.4f  lr %.2e  %.0f s", step + 1, cfg.steps,
                        float(np.mean(losses[-cfg.log_every:])), lr_at(cfg, step), time.time() - start)
    wall = time.time() - start
    final = WorldBase(ema["unet"], ema["text_encoder"], base.autoencoder, base.schedule, base.image_size,
                      base.latent_scale_factor)
    result = {"final_loss": float(np.mean(losses[-500:])), "wall_s": round(wall, 1)}
    command = f"python -m zeroconv.demo.train_world_base --out {cfg.out} --seed {cfg.seed} --steps {cfg.steps}"
    provenance = {"command": command + (f" --init {cfg.init}" if cfg.init else ""), "config": asdict(cfg), **result,
                  "machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
                             f"{cfg.threads} torch threads, torch {torch.__version__}"}
    save_world_base(final, cfg.out, provenance)
    logger.info("wrote %s: final loss %.4f (mean of the last 500 steps), %.0f s", cfg.out, result["final_loss"], wall)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zeroconv.demo.train_world_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BaseTrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(BaseTrainConfig(**{k: getattr(args, k) for k in asdict(defaults)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
