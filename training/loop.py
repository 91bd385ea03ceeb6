"""Train a ControlNet against a locked base (Zhang et al. 2023 §3.3-3.4), one process or many (torchrun).

Reads top to bottom like nanoGPT's train.py: build, freeze, optimizer, resume, loop, checkpoint. The step order
follows diffusers' train_controlnet.py: latents, noise and timesteps, add_noise, ControlNet on the hint, frozen
U-Net with the residuals, target by prediction type, MSE in fp32, backward, clip, step, zero_grad.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..controlnet_model.config import PredictionType, check_compatible
from ..controlnet_model.network import ControlNet, ControlNetOutput
from ..controlnet_model.unet import UNetModel
from ..controlnet_model.skeleton import skeleton
from . import distributed as dist_util
from .base import LockedBase, load_base
from .encode import encode_captions, encode_latents, latents_from_moments
from .config import SEED_STRIDE, MixedPrecision, Parallelism, TrainConfig, TrainMode
from .data import BatchPlan, ControlDataset, LatentCache, StepSampler, collate, read_rows
from .schedule import NoiseSchedule
from ..controlnet_model.atomic import atomic_save_safetensors, atomic_torch_save, atomic_write_text, remove_stale_temps
from .state import CheckpointFolder, load_checkpoint_weights, load_state, partner, rng_state, set_rng_state
from .validation import ValidationSet, build_validation_set, fidelity_setup, measure_fidelity, plot_curves, sample, \
    save_grid, to_uint8

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path  # the final native ControlNet (.safetensors; ZeroConv, ComfyUI core, A1111/Forge)
    diffusers: Path | None  # the diffusers export folder, or None when export_diffusers is off
    loss_history: list[float]  # mean loss of every optimiser step over all processes, step 1 first
    fidelity_history: list[tuple[int, float]]  # (step, condition fidelity) of each validation that measured it


@dataclass
class History:
    """What a run has done so far; saved in every checkpoint."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    fidelity: list[tuple[int, float]] = field(default_factory=list)


class ControlledUNet(nn.Module):
    """The trainable ControlNet and the locked U-Net as one module, so DDP wraps a single forward."""

    def __init__(self, controlnet: ControlNet, unet: UNetModel):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None, middle_only: bool = False) -> torch.Tensor:
        residuals = self.controlnet(noisy, hint, t, context, y)
        if middle_only:  # small-scale mode: decoder links cut, kept in the graph with zero weight (paper §3.4)
            residuals = ControlNetOutput(tuple(r * 0.0 for r in residuals.down), residuals.mid)
        return self.unet(noisy, t, context, y, control=residuals)


@dataclass(frozen=True)
class StepDraws:
    """Every random draw of one optimiser step, for the whole global batch (sliced per process and micro-step)."""

    timesteps: torch.Tensor  # (G,) long
    drop: torch.Tensor  # (G,) bool: caption replaced by ""
    noise: torch.Tensor  # (G, C, h, w) diffusion noise
    posterior: torch.Tensor  # (G, C, h, w) VAE posterior sample noise


def draw_step(seed: int, step: int, global_batch: int, latent_shape: tuple[int, int, int], num_timesteps: int,
              caption_dropout: float) -> StepDraws:
    """The draws of `step` from a generator seeded by (seed, step): independent of process count and resumes."""
    gen = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
    t = torch.randint(0, num_timesteps, (global_batch,), generator=gen)
    drop = torch.rand(global_batch, generator=gen) < caption_dropout
    noise = torch.randn((global_batch, *latent_shape), generator=gen)
    return StepDraws(t, drop, noise, torch.randn((global_batch, *latent_shape), generator=gen))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then constant (cldm: constant; diffusers: constant after warm-up)."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    return cfg.lr


def diffusion_loss(model: nn.Module, base: LockedBase, schedule: NoiseSchedule, batch: dict[str, Any],
                   draws: StepDraws, part: slice, middle_only: bool, autocast: Callable[[], ContextManager],
                   device: torch.device) -> torch.Tensor:
    """MSE between the controlled U-Net's output and the schedule's target, in fp32 (diffusers step order)."""
    with torch.no_grad(), autocast():
        eps_post = draws.posterior[part].to(device)
        if "moments" in batch:
            latents = latents_from_moments(base, batch["moments"].to(device), eps_post)
        else:
            latents = encode_latents(base, batch["pixels"].to(device), eps_post)
        latents = latents.float()
        noise, t = draws.noise[part].to(device), draws.timesteps[part].to(device)
        noisy = schedule.add_noise(latents, noise, t)
        captions = ["" if d else c for c, d in zip(batch["caption"], draws.drop[part].tolist())]
        text = encode_captions(base, captions, batch["size_cond"].to(device))
    with autocast():
        prediction = model(noisy, t, batch["hint"].to(device), text.context, text.y, middle_only)
    return F.mse_loss(prediction.float(), schedule.target(latents, noise, t).float())


def check_trainable(controlnet: ControlNet, unet: UNetModel, optimizer: torch.optim.Optimizer,
                    unlocked: list[nn.Parameter]) -> None:
    """Trainable weights are fp32; the optimiser holds the ControlNet's (and unlocked base) parameters only."""
    allowed = {id(p) for p in controlnet.parameters()} | {id(p) for p in unlocked}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if any(id(p) not in allowed for p in held):
        raise ValueError("the optimiser holds parameters that are not the ControlNet's; give it controlnet.parameters()")
    if any(p.requires_grad and id(p) not in allowed for p in unet.parameters()):
        raise ValueError("the base U-Net must be locked: call unet.requires_grad_(False) before training")
    if any(p.dtype != torch.float32 for p in held):
        raise ValueError("trainable weights must be fp32 (mixed precision is autocast, not half weights); "
                         "load the ControlNet in float32")


# ---- before the first step: every path ------------------------------------------------------------------
OUTPUT_FOLDERS = ("checkpoints", "samples", "diffusers", "latent_cache")  # what a run writes under output_dir


def check_paths(cfg: TrainConfig) -> None:
    """Every file a run reads exists and every folder it writes can be made, before anything is loaded.

    Errors name the config field; nothing is written except the (empty) output folders.
    """
    def need_file(name: str, value: str, what: str) -> None:
        if not value:
            raise ValueError(f"training config {name} is empty; set it to {what}")
        if not Path(value).exists():
            raise FileNotFoundError(f"training config {name} = {value!r} does not exist; set it to {what}")

    need_file("base", cfg.base, "the locked base model file (SD1.x/SD2.x/SDXL single file or a world base)")
    if cfg.controlnet_init:
        need_file("controlnet_init", cfg.controlnet_init, "a ControlNet file, or '' for a fresh copy of the base")
    need_file("data", cfg.data, "a data folder (image/, condition/, captions) or a .jsonl file")
    for path in cfg.validation_conditions:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training config validation_conditions: {path} is not a file; fix the list")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_file():
        raise FileNotFoundError(f"training config resume = {cfg.resume!r} does not exist; give a state-step*.pt "
                                "file, 'auto' or 'never'")
    out = Path(cfg.output_dir)
    used = {"checkpoints": True, "samples": True, "diffusers": cfg.export_diffusers, "latent_cache": cfg.cache_latents}
    for folder in (out, *(out / name for name in OUTPUT_FOLDERS)):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"training config output_dir: {folder} is an existing file, not a folder; "
                             "move it or set output_dir to another folder")
        if folder != out and not used[folder.name]:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"training config output_dir = {cfg.output_dir!r}: cannot make {folder} "
                             f"({exc.strerror}); set output_dir to a folder you can write") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"training config output_dir: {folder} is not writable by this user; "
                             "set output_dir to a folder you can write")
    for name in (f"{cfg.output_name}.safetensors", "history.json", "loss.png"):
        if (out / name).is_dir():
            raise ValueError(f"training config output_name/output_dir: {out / name} is a folder, where the run "
                             "writes a file; move it or change output_name")


def remove_interrupted_writes(cfg: TrainConfig) -> None:
    """Delete temp files that writes cut short by a killed run left in output_dir and its folders."""
    out = Path(cfg.output_dir)
    for folder in (out, *(out / name for name in OUTPUT_FOLDERS)):
        for stale in remove_stale_temps(folder):
            logger.info("removed %s left by an interrupted write", stale)


# ---- build -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    cfg: TrainConfig
    env: dist_util.DistEnv
    base: LockedBase
    schedule: NoiseSchedule
    controlnet: ControlNet
    model: nn.Module  # ControlledUNet, DDP-wrapped under torchrun
    dataset: ControlDataset
    plan: BatchPlan
    autocast: Callable[[], ContextManager]
    unlocked: list[nn.Parameter] = field(default_factory=list)


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """Autocast dtype of mixed precision (also the storage dtype of the frozen base on GPUs)."""
    return {MixedPrecision.NO: torch.float32, MixedPrecision.FP16: torch.float16,
            MixedPrecision.BF16: torch.bfloat16}[cfg.mixed_precision]


def base_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Storage dtype of the frozen base: half on GPUs (diffusers), fp32 on CPU, where GroupNorm refuses
    half weights with fp32 inputs (autocast still computes matmuls and convs in half)."""
    return torch.float32 if device.type == "cpu" else weight_dtype(cfg)


def resolve_schedule(base: LockedBase, prediction_type: str) -> NoiseSchedule:
    """The base's schedule, with the prediction type overridden unless 'auto' (SD2.x 768-v is v_prediction)."""
    if prediction_type == "auto":
        return base.schedule
    return NoiseSchedule(base.schedule.alphas_cumprod, PredictionType(prediction_type))


def initial_controlnet(cfg: TrainConfig, base: LockedBase) -> ControlNet:
    """A fresh copy of the base's encoder (init_from_unet, zero convs at zero), or the file in controlnet_init."""
    if cfg.controlnet_init:
        from ..controlnet_model.checkpoint import load_controlnet

        loaded = load_controlnet(cfg.controlnet_init, dtype=torch.float32)
        check_compatible(loaded.config, base.unet.config, f"controlnet_init {cfg.controlnet_init}", "the base")
        return loaded.model.float()
    from ..controlnet_model.from_unet import init_from_unet

    controlnet, fresh = init_from_unet(base.unet)
    logger.info("fresh ControlNet from the base: %d tensors copied, %d new (hint encoder, zero convs)",
                len(controlnet.state_dict()) - len(fresh), len(fresh))
    return controlnet.float()


def build(cfg: TrainConfig, env: dist_util.DistEnv) -> Run:
    """Base (fp32 to copy from, then cast for storage), ControlNet, data, validation and the wrapped pair."""
    if cfg.mixed_precision is MixedPrecision.FP16 and cfg.parallelism is Parallelism.FSDP and env.distributed:
        raise ValueError("fp16 with FSDP is not supported here; use mixed_precision = 'bf16'")
    rows = read_rows(cfg.data, need_condition=not cfg.annotator)  # before the (slow) base load: bad data fails now
    torch.manual_seed(cfg.seed)
    base = load_base(cfg.base, device=env.device, dtype=torch.float32)
    controlnet = initial_controlnet(cfg, base).to(env.device).train()
    controlnet.gradient_checkpointing = cfg.gradient_checkpointing
    base.to(env.device, base_dtype(cfg, env.device))
    if cfg.mode is TrainMode.LARGE_SCALE:
        base.unet.float()  # weights unlocked later must be fp32 like every trainable weight
    base.unet.requires_grad_(False).eval()
    dataset = ControlDataset(rows, cfg.resolution, cfg.crop, cfg.annotator)
    model = dist_util.wrap(ControlledUNet(controlnet, base.unet), controlnet, env, cfg.parallelism)
    enabled = cfg.mixed_precision is not MixedPrecision.NO

    def autocast() -> ContextManager:
        return torch.autocast(env.device.type, dtype=weight_dtype(cfg), enabled=enabled)

    plan = BatchPlan(cfg.batch_size, cfg.grad_accum, env.world_size)
    return Run(cfg, env, base, resolve_schedule(base, cfg.prediction_type), controlnet, model, dataset, plan,
               autocast)


def fill_latent_cache(run: Run) -> None:
    """Encode every row's centre crop once (rows split across processes), then read moments from disk."""
    cfg, base = run.cfg, run.base
    kind = "moments" if hasattr(base, "encode_moments") else "latents"
    key = f"{Path(cfg.base).stem}-{cfg.resolution}-{kind}"
    cache = LatentCache(Path(cfg.output_dir) / "latent_cache", key)
    todo = [i for i in range(len(run.dataset)) if i % run.env.world_size == run.env.rank and not cache.has(i)]
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        pixels = torch.stack([run.dataset[(i, 0)]["pixels"] for i in chunk]).to(run.env.device)
        with torch.no_grad(), run.autocast():
            encoded = base.encode_moments(pixels) if kind == "moments" else base.encode_images(pixels)
        for i, tensor in zip(chunk, encoded):
            cache.put(i, tensor)
    dist_util.barrier(run.env)
    run.dataset.latent_cache = cache
    logger.info("latent cache ready: %s (%d rows encoded here)", cache.folder, len(todo))


def make_optimizer(cfg: TrainConfig, controlnet: ControlNet) -> torch.optim.Optimizer:
    """AdamW over the ControlNet's parameters only (cldm configure_optimizers)."""
    return torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def unlock_base(run: Run, optimizer: torch.optim.Optimizer) -> None:
    """Large-scale mode: train the base U-Net's decoder too, at unlock_lr (paper §3.4; cldm sd_locked=False)."""
    unet = run.base.unet
    params = [*unet.output_blocks.parameters(), *unet.out.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer.add_param_group({"params": params, "lr": run.cfg.unlock_lr})
    run.unlocked = params
    pair = run.model.module if hasattr(run.model, "module") else run.model
    run.model = dist_util.wrap(pair, run.controlnet, run.env, run.cfg.parallelism)  # DDP fixes its params at wrap
    logger.info("large-scale mode: base decoder unlocked (%d tensors) at lr %g", len(params), run.cfg.unlock_lr)


def unlocked_state(run: Run) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in run.base.unet.named_parameters()}
    return {f"model.diffusion_model.{names[id(p)]}": p.detach().cpu().clone() for p in run.unlocked}


# ---- EMA -------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[nn.Parameter], decay: float) -> None:
    for e, p in zip(ema, params):
        e.lerp_(p.detach(), 1.0 - decay)


@contextlib.contextmanager
def swapped_weights(params: list[nn.Parameter], values: list[torch.Tensor] | None):
    """Temporarily put `values` (e.g. the EMA) into `params`; restored afterwards."""
    if values is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


# ---- checkpoint and resume -------------------------------------------------------------------------------
def _metadata(cfg: TrainConfig, step: int, family: str) -> Any:
    from ..controlnet_model.checkpoint import ControlNetMetadata

    return ControlNetMetadata(family=family, control_type=cfg.control_type, annotator=cfg.annotator,
                              resolution=cfg.resolution, provenance=f"zeroconv train, step {step}",
                              extra={"train_step": str(step), "train_config": cfg.to_json()})


def export_controlnet(run: Run, weights: dict[str, torch.Tensor]) -> ControlNet:
    """A CPU ControlNet holding full weights, for writing files (works for sharded models too); a Union stays a
    Union (its class from the config, not from the possibly wrapped training module)."""
    from ..controlnet_model.checkpoint import network_class

    model = skeleton(lambda: network_class(run.controlnet.config)(run.controlnet.config))
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def save_checkpoint(run: Run, optimizer: torch.optim.Optimizer, history: History, ema: list[torch.Tensor] | None,
                    scaler: torch.amp.GradScaler) -> None:
    """Native weights + training state, atomically, then the pointer (every process joins; rank 0 writes)."""
    from ..controlnet_model.checkpoint import save_controlnet

    cfg, env = run.cfg, run.env
    weights = dist_util.full_model_state(run.controlnet)
    optim_state = dist_util.full_optimizer_state(run.controlnet, optimizer)
    params = list(run.controlnet.parameters())
    ema_full = None
    if ema is not None:
        with swapped_weights(params, ema):
            ema_full = dist_util.full_model_state(run.controlnet)
    rngs = dist_util.all_gather_object(env, rng_state())
    if env.is_main:
        folder = CheckpointFolder(cfg.output_dir)
        paths = folder.paths(history.step)
        save_controlnet(export_controlnet(run, weights), paths.weights,
                        metadata=_metadata(cfg, history.step, run.controlnet.config.family))
        atomic_torch_save({"step": history.step, "config": cfg.to_dict(), "optimizer": optim_state,
                           "ema": ema_full, "scaler": scaler.state_dict(), "rng": rngs,
                           "losses": history.losses, "fidelity": history.fidelity,
                           "unlocked_base": unlocked_state(run) if run.unlocked else None}, paths.state)
        folder.commit(paths, cfg.keep_checkpoints)
        logger.info("checkpoint at step %d: %s", history.step, paths.weights)
    dist_util.barrier(env)


def write_history(cfg: TrainConfig, history: History) -> None:
    out = Path(cfg.output_dir)
    atomic_write_text(out / "history.json", json.dumps({"step": history.step, "losses": history.losses,
                                                        "fidelity": history.fidelity}))
    plot_curves(history.losses, history.fidelity, out / "loss.png")


def resume(run: Run, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor] | None,
           scaler: torch.amp.GradScaler) -> History:
    """Load the latest (or named) checkpoint: weights, optimiser, EMA, scaler, RNG, step and histories."""
    cfg = run.cfg
    if cfg.resume == "never":
        return History()
    folder = CheckpointFolder(cfg.output_dir)
    if cfg.resume == "auto":
        paths = folder.latest()
        if paths is None:
            return History()
        state_path, weights_path = paths.state, paths.weights
    else:
        state_path = Path(cfg.resume)
        if not state_path.is_file():
            raise FileNotFoundError(f"resume file {state_path} does not exist; give a state-step*.pt or 'auto'")
        weights_path = partner(state_path)
    state = load_state(state_path)
    weights = load_checkpoint_weights(weights_path)
    _warn_config_changes(state["config"], cfg)
    if cfg.mode is TrainMode.LARGE_SCALE and state["step"] >= cfg.unlock_base_after:
        unlock_base(run, optimizer)
        with torch.no_grad():
            named = dict(run.base.unet.named_parameters())
            for key, tensor in (state["unlocked_base"] or {}).items():
                named[key[len("model.diffusion_model."):]].copy_(tensor)
    dist_util.load_full_states(run.controlnet, optimizer, weights, state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema[:] = _sharded_like(run, state["ema"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][min(run.env.rank, len(state["rng"]) - 1)])
    logger.info("resumed from %s at step %d", state_path, state["step"])
    return History(state["step"], list(state["losses"]), [tuple(f) for f in state["fidelity"]])


def _sharded_like(run: Run, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """EMA tensors shaped like this process's parameters (sharded under FSDP)."""
    params = list(run.controlnet.parameters())
    with swapped_weights(params, [p.detach() for p in params]):  # the live weights come back afterwards
        dist_util.load_full_states(run.controlnet, torch.optim.SGD(params, lr=0.0), full, None)
        return [p.detach().clone() for p in params]


def _warn_config_changes(saved: dict[str, Any], cfg: TrainConfig) -> None:
    changed = {k: (v, cfg.to_dict().get(k)) for k, v in saved.items() if cfg.to_dict().get(k) != v}
    changed.pop("resume", None)
    if changed:
        logger.warning("resuming with a changed config: %s", ", ".join(f"{k}: {a!r} -> {b!r}"
                                                                       for k, (a, b) in changed.items()))


# ---- validation ------------------------------------------------------------------------------------------
def validate(run: Run, vset: ValidationSet, step: int, ema: list[torch.Tensor] | None) -> float | None:
    """Samples on the validation conditions (with the EMA weights if kept); grid PNG and fidelity on rank 0."""
    cfg = run.cfg
    run.controlnet.eval()
    with swapped_weights(list(run.controlnet.parameters()), ema):
        samples = sample(run.base, run.controlnet, vset, cfg.cfg_scale, cfg.sample_steps, cfg.seed, run.env.device,
                         run.autocast)
    run.controlnet.train()
    measured_by, metric = fidelity_setup(cfg.annotator, cfg.control_type, cfg.fidelity_metric)
    hints = vset.hints[[i for i, _ in vset.pairs()]]
    fid = measure_fidelity(to_uint8(samples), to_uint8(hints), measured_by, metric)
    if run.env.is_main:
        path = save_grid(vset.hints, samples, len(vset.prompts), Path(cfg.output_dir) / "samples" / f"step{step:07d}.png")
        logger.info("validation at step %d: %s%s", step, path, "" if fid is None else f", {metric.value} {fid:.3f}")
    return fid


# ---- the run ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Train a ControlNet as `cfg` says; progress(step, max_steps, info) is called after every step."""
    env = dist_util.setup(cfg.device)
    try:
        return _train(cfg, env, progress)
    finally:
        dist_util.teardown(env)


def _train(cfg: TrainConfig, env: dist_util.DistEnv, progress: ProgressFn | None) -> TrainResult:
    from tqdm.auto import tqdm

    # check every path first (nothing slow is loaded before a bad path is named); clear interrupted writes
    check_paths(cfg)
    if env.is_main:
        remove_interrupted_writes(cfg)
    dist_util.barrier(env)
    # build: locked base, ControlNet copied from it, data (and cached latents), validation set
    run = build(cfg, env)
    if cfg.cache_latents:
        fill_latent_cache(run)
    vset = build_validation_set(cfg.validation_conditions, cfg.validation_prompts, run.dataset,
                                cfg.num_validation_conditions, cfg.resolution)
    # freeze and optimizer: the base takes no gradients and has no optimiser state
    optimizer = make_optimizer(cfg, run.controlnet)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.mixed_precision is MixedPrecision.FP16)
    ema = [p.detach().clone() for p in run.controlnet.parameters()] if cfg.ema_decay else None
    # resume: weights, optimiser, EMA, scaler, RNG, step, histories
    history = resume(run, optimizer, ema, scaler)
    check_trainable(run.controlnet, run.base.unet, optimizer, run.unlocked)
    loader = torch.utils.data.DataLoader(
        run.dataset, batch_sampler=StepSampler(len(run.dataset), run.plan, env.rank, cfg.seed, history.step,
                                               cfg.max_steps),
        num_workers=cfg.num_workers, collate_fn=collate, pin_memory=env.device.type == "cuda")
    batches = iter(loader)
    latent_shape = (run.base.unet.config.in_channels, cfg.resolution // 8, cfg.resolution // 8)
    # a bar only on a terminal: in a log file (stderr not a TTY) its redraws would run into the log lines,
    # and the log lines (log_every) are the progress there
    bar = tqdm(total=cfg.max_steps, initial=history.step, disable=not (env.is_main and _is_terminal()),
               desc="training", unit="step")
    # loop (log lines go above the bar on a terminal)
    with _above(bar):
        while history.step < cfg.max_steps:
            step = history.step
            if cfg.mode is TrainMode.LARGE_SCALE and step == cfg.unlock_base_after and not run.unlocked:
                unlock_base(run, optimizer)
                check_trainable(run.controlnet, run.base.unet, optimizer, run.unlocked)
            optimizer.param_groups[0]["lr"] = lr_at(cfg, step)
            draws = draw_step(cfg.seed, step, run.plan.global_batch, latent_shape, run.schedule.num_timesteps,
                              cfg.caption_dropout)
            middle_only = cfg.mode is TrainMode.SMALL_SCALE and step < cfg.reconnect_after
            local = torch.zeros((), device=env.device)
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                with dist_util.no_grad_sync(run.model, run.controlnet, skip=micro < cfg.grad_accum - 1):
                    loss = diffusion_loss(run.model, run.base, run.schedule, batch, draws,
                                          run.plan.local_slice(micro, env.rank), middle_only, run.autocast, env.device)
                    scaler.scale(loss / cfg.grad_accum).backward()
                local += loss.detach() / cfg.grad_accum
            grad_norm = optimizer_step(run, optimizer, scaler)
            if ema is not None:
                ema_update(ema, list(run.controlnet.parameters()), cfg.ema_decay)
            history.step += 1
            history.losses.append(global_mean(env, local))
            info = {"loss": history.losses[-1], "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
            last = history.step == cfg.max_steps
            validated = last or bool(cfg.validate_every and history.step % cfg.validate_every == 0)
            if validated:
                fid = validate(run, vset, history.step, ema)
                if fid is not None:
                    history.fidelity.append((history.step, fid))
                    info["fidelity"] = fid
            saved = last or bool(cfg.save_every and history.step % cfg.save_every == 0)
            if saved:
                save_checkpoint(run, optimizer, history, ema, scaler)
            if env.is_main and (validated or saved):
                write_history(cfg, history)  # the loss/fidelity curve, refreshed at every validation and checkpoint
            if env.is_main and cfg.log_every and history.step % cfg.log_every == 0:
                logger.info("step %d/%d loss %.4f lr %.2e", history.step, cfg.max_steps, info["loss"], info["lr"])
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.4f}")
            if progress is not None:
                progress(history.step, cfg.max_steps, info)
    bar.close()
    # checkpoint: the final native file (EMA weights when kept) and the diffusers export
    return finish(run, history, ema)


def _is_terminal() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


def _above(bar: Any) -> ContextManager:
    """Log lines printed above a live progress bar (tqdm's logging redirect), never into its line."""
    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def optimizer_step(run: Run, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> float:
    """Unscale, clip to max_grad_norm, step, zero_grad(set_to_none=True); returns the gradient norm."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm if run.cfg.max_grad_norm else math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(norm)


def global_mean(env: dist_util.DistEnv, value: torch.Tensor) -> float:
    """The mean over processes (every process gets the same number, so histories agree)."""
    if env.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= env.world_size
    return float(value)


def finish(run: Run, history: History, ema: list[torch.Tensor] | None) -> TrainResult:
    """Write `<output_name>.safetensors` (native) and `diffusers/` (config.json + weights); rank 0 writes."""
    from ..controlnet_model.checkpoint import export_diffusers, save_controlnet

    cfg = run.cfg
    with swapped_weights(list(run.controlnet.parameters()), ema):
        weights = dist_util.full_model_state(run.controlnet)
    out = Path(cfg.output_dir)
    final = out / f"{cfg.output_name}.safetensors"
    folder = out / "diffusers" if cfg.export_diffusers else None
    if run.env.is_main:
        model = export_controlnet(run, weights)
        save_controlnet(model, final, metadata=_metadata(cfg, history.step, model.config.family))
        if folder is not None:
            export_diffusers(model, folder)
        if run.unlocked:
            atomic_save_safetensors(unlocked_state(run), out / f"{cfg.output_name}-unlocked-base.safetensors")
        write_history(cfg, history)
        logger.info("wrote %s%s", final, f" and {folder}" if folder else "")
    dist_util.barrier(run.env)
    return TrainResult(final, folder, list(history.losses), list(history.fidelity))
