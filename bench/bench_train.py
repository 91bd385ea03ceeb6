"""Training-step throughput and peak memory: ControlNet against a locked SD1.5 U-Net vs fine-tuning the whole U-Net.

SD1.5 shapes at 512x512 (latents 64x64), batch 8, random weights, one process, in one run. Both steps follow the
loop's order (noise and timesteps, add_noise, [ControlNet on the hint], U-Net, epsilon target, MSE in fp32, backward,
clip, AdamW step, zero_grad) on latents and text contexts given as tensors (no VAE or text encoder in the timing).
Trainable weights fp32, autocast in --precision, frozen weights stored in that dtype.
Writes bench/results/train-<machine>.md. Needs CUDA; on CPU it says so and writes nothing (--smoke checks the code
path with the tiny preset on CPU instead).

Reference (issue text, H100, diffusers' models): ControlNet step 168 ms (47.6 samples/s) at 15.7 GiB peak;
full fine-tune 168 ms at 20.8 GiB.
"""
from __future__ import annotations

import argparse
import gc
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from zeroconv.controlnet_model.config import ControlNetConfig, preset
from zeroconv.controlnet_model.from_unet import init_from_unet
from zeroconv.controlnet_model.unet import UNetModel
from zeroconv.training.loop import ControlledUNet
from zeroconv.training.schedule import NoiseSchedule

logger = logging.getLogger("bench_train")
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_step(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: ControlNetConfig, batch: int,
              size: int, device: torch.device, dtype: torch.dtype, with_hint: bool) -> Callable[[], torch.Tensor]:
    """One optimiser step on fixed random inputs (the inputs are made once, outside the timing)."""
    schedule = NoiseSchedule.scaled_linear()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(batch, cfg.in_channels, size // 8, size // 8, generator=gen).to(device)
    context = torch.randn(batch, 77, cfg.context_dim, generator=gen).to(device, dtype)
    hint = torch.rand(batch, 3, size, size, generator=gen).to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

    def step() -> torch.Tensor:
        noise = torch.randn_like(latents)
        t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
        noisy = schedule.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32):
            pred = model(noisy, t, hint, context, None) if with_hint else model(noisy, t, context)
        loss = F.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds per step, peak GiB allocated) over `iters` steps after `warmup`."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def controlnet_case(cfg: ControlNetConfig, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """Locked U-Net (stored in dtype, no gradients) + fp32 ControlNet copied from it."""
    unet = UNetModel(cfg)
    controlnet, _ = init_from_unet(unet)
    controlnet = controlnet.float().to(device).train()
    controlnet.gradient_checkpointing = checkpointing
    unet = unet.to(device, dtype).requires_grad_(False).eval()
    return ControlledUNet(controlnet, unet), list(controlnet.parameters())


def diffusers_controlnet_case(cfg: ControlNetConfig, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """diffusers' ControlNet training step (examples/controlnet/train_controlnet.py): UNet2DConditionModel locked in
    dtype, ControlNetModel.from_unet trainable in fp32, residuals passed to the U-Net. SD1.5 shapes only."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    attention = [bool(depth) for depth in cfg.transformer_depth]
    unet = UNet2DConditionModel(sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                                                       for a in attention),
                                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                                                     for a in reversed(attention)),
                                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                                attention_head_dim=cfg.num_heads)
    controlnet = ControlNetModel.from_unet(unet).float().to(device).train()
    if checkpointing:
        controlnet.enable_gradient_checkpointing()
    unet = unet.to(device, dtype).requires_grad_(False).eval()

    def forward(noisy: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, context: torch.Tensor, _y) -> torch.Tensor:
        down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        return unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]

    return forward, list(controlnet.parameters())


def full_finetune_case(cfg: ControlNetConfig, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """The whole U-Net trainable in fp32 (what the ControlNet step is compared with)."""
    unet = UNetModel(cfg).float().to(device).train()

    def forward(noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(noisy, t, context)

    return forward, list(unet.parameters())


def run_case(name: str, build, cfg: ControlNetConfig, args: argparse.Namespace, device: torch.device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, params = build(cfg, device, DTYPES[args.precision], args.gradient_checkpointing)
    step = make_step(model, params, cfg, args.batch, args.size, device, DTYPES[args.precision],
                     with_hint="ControlNet" in name)
    seconds, peak = measure(step, device, args.warmup, args.iters)
    trainable = sum(p.numel() for p in params)
    del model, params, step
    return {"case": name, "ms": seconds * 1e3, "samples_s": args.batch / seconds, "peak_gib": peak,
            "trainable_m": trainable / 1e6}


def write_results(rows: list[dict], args: argparse.Namespace, device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    machine = args.machine or name.lower().replace("nvidia", "").strip().replace(" ", "-")
    path = (args.out or RESULTS) / f"train-{machine}.md"
    lines = [f"# Training step, SD1.5 shapes {args.size}x{args.size}, batch {args.batch} ({name})", "",
             f"torch {torch.__version__}, precision {args.precision} autocast, gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}, {args.iters} timed steps after {args.warmup} warm-up; "
             "random weights; latents and text contexts given (no VAE/text encoder in the step).", "",
             "| step | ms/step | samples/s | peak GiB | trainable params (M) |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['ms']:.1f} | {r['samples_s']:.1f} | {r['peak_gib']:.2f} | {r['trainable_m']:.1f} |"
              for r in rows]
    ours = next((r for r in rows if r["case"] == "ControlNet"), None)
    theirs = next((r for r in rows if r["case"] == "diffusers ControlNet"), None)
    if ours and theirs:
        lines += ["", f"ZeroConv / diffusers: {ours['samples_s'] / theirs['samples_s']:.2f}x samples/s at "
                  f"{ours['peak_gib'] / theirs['peak_gib']:.2f}x peak memory (target >= 1.3x at <= 1.0x)."]
    lines += ["", "Reference from the issue (H100, diffusers' models): ControlNet 168 ms (47.6 samples/s), 15.7 GiB; "
              "full fine-tune 168 ms, 20.8 GiB.", f"Command: `python {' '.join(sys.argv)}`", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the ControlNet blocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--machine", default="", help="name in the results file (default: the GPU name)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    parser.add_argument("--no-diffusers", action="store_true", help="leave out diffusers' ControlNet step")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, 2 steps, writes nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        args.batch, args.size, args.precision, args.warmup, args.iters = 2, 64, "fp32", 1, 2
        cfg, device = preset("tiny"), torch.device("cpu")
    elif not torch.cuda.is_available():
        logger.error("bench_train needs a CUDA GPU (SD1.5 at 512x512, batch 8); nothing written. "
                     "Use --smoke to check the code path on CPU.")
        return 1
    else:
        cfg, device = preset("sd15"), torch.device("cuda")
    torch.manual_seed(0)
    rows = [run_case("ControlNet", controlnet_case, cfg, args, device)]
    if not args.no_diffusers:
        rows.append(run_case("diffusers ControlNet", diffusers_controlnet_case, cfg, args, device))
    rows.append(run_case("full U-Net fine-tune", full_finetune_case, cfg, args, device))
    for r in rows:
        logger.info("%-22s %8.1f ms/step %7.1f samples/s  peak %.2f GiB  trainable %.1f M", r["case"], r["ms"],
                    r["samples_s"], r["peak_gib"], r["trainable_m"])
    if not args.smoke:
        logger.info("wrote %s", write_results(rows, args, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
