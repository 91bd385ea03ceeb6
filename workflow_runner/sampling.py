"""KSampler as ComfyUI runs it: sigma schedules, k-diffusion samplers, batched CFG and the ControlNet protocol.

Follows comfy/samplers.py, comfy/sample.py and comfy/k_diffusion/sampling.py (reference §5.5): noise from
torch.manual_seed(seed) on the CPU; positive and negative rows that share a control object run in one U-Net
call (negative rows first, cond_or_uncond [1, 0]); every model call asks each control object for its residuals
with get_control(x_unscaled, sigmas, cond, batched_number, transformer_options); pre_run before sampling and
cleanup after it, always. Not supported (raise): conditioning areas and masks, latent noise masks.
"""
from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .host import INTERMEDIATE_DEVICE, BaseModel, ModelPatcher, ModelSamplingDiscrete, clone_options, resize_channels

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma batch) -> x0
StepCallback = Callable[[int, int], None]  # (steps done, total)


# ---- sigma schedules (comfy/samplers.py SCHEDULER_HANDLERS) -------------------------------------------
def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def normal_scheduler(ms: ModelSamplingDiscrete, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from the largest to the smallest sigma."""
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps, append_zero = steps + 1, False
        timesteps = torch.linspace(float(start), float(end), steps)
    sigmas = [float(ms.sigma(t)) for t in timesteps]
    return torch.FloatTensor(sigmas + [0.0] if append_zero else sigmas)


def simple_scheduler(ms: ModelSamplingDiscrete, steps: int) -> torch.Tensor:
    """Every (T/steps)-th sigma of the table, from the top."""
    stride = len(ms.sigmas) / steps
    return torch.FloatTensor([float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0])


def ddim_uniform_scheduler(ms: ModelSamplingDiscrete, steps: int) -> torch.Tensor:
    """DDIM's 'uniform' spacing over the sigma table."""
    x, sigs = 1, [0.0]
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=0.00001):
        steps, sigs = steps + 1, []
    stride = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += stride
    return torch.FloatTensor(sigs[::-1])


def karras_scheduler(ms: ModelSamplingDiscrete, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 rho-spaced sigmas (k_diffusion get_sigmas_karras)."""
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential_scheduler(ms: ModelSamplingDiscrete, steps: int) -> torch.Tensor:
    """Log-linear sigmas (k_diffusion get_sigmas_exponential)."""
    return _append_zero(torch.linspace(math.log(float(ms.sigma_max)), math.log(float(ms.sigma_min)), steps).exp())


SCHEDULERS: dict[str, Callable[[ModelSamplingDiscrete, int], torch.Tensor]] = {
    "simple": simple_scheduler,
    "sgm_uniform": lambda ms, steps: normal_scheduler(ms, steps, sgm=True),
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "normal": normal_scheduler,
}


def calculate_sigmas(ms: ModelSamplingDiscrete, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigma schedule KSampler uses: denoise < 1 keeps the last `steps` of a longer schedule."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {list(SCHEDULERS)}")
    if denoise is None or denoise > 0.9999:
        return SCHEDULERS[scheduler](ms, steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return SCHEDULERS[scheduler](ms, int(steps / denoise))[-(steps + 1):]


def trim_sigmas(sigmas: torch.Tensor, start_step: int | None, last_step: int | None,
                force_full_denoise: bool) -> torch.Tensor | None:
    """KSamplerAdvanced's step window; None when start_step is past the end (the input is returned as is)."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


# ---- samplers (comfy/k_diffusion/sampling.py) ---------------------------------------------------------
def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def _report(callback: StepCallback | None, i: int, total: int) -> None:
    if callback is not None:
        callback(i + 1, total)


def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None = None,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Alg. 2 with no churn)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, len(sigmas) - 1)
    return x


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """(sigma_down, sigma_up) for an ancestral step (k_diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None = None,
                           callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler down to sigma_down, then fresh noise up to sigma_next; noise from a generator seeded with `seed`."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            noise = torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i]) + noise * s_noise * sigma_up
        _report(callback, i, len(sigmas) - 1)
    return x


def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None = None,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in log-sigma time."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised
        else:
            r = (t - sigmas[i - 1].log().neg()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        _report(callback, i, len(sigmas) - 1)
    return x


# ComfyUI's "ddim" is the euler sampler (samplers.py sampler_object); without a noise mask they are identical.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_euler,
}


# ---- conditioning (comfy/samplers.py process_conds, calc_cond_batch) ----------------------------------
UNSUPPORTED_COND_KEYS = ("area", "mask", "hooks", "gligen", "default")


def convert_cond(conditioning: list) -> list[dict]:
    """CONDITIONING [[tensor, dict], ...] -> sampler cond dicts with cross_attn and a uuid (sampler_helpers)."""
    out = []
    for tensor, options in conditioning:
        cond = dict(options)
        for key in UNSUPPORTED_COND_KEYS:
            if key in cond:
                raise ValueError(f"conditioning with {key!r} is not supported by zeroconv run; "
                                 "run this workflow in ComfyUI, or remove the node that sets it")
        if tensor is not None:
            cond["cross_attn"] = tensor
        cond["uuid"] = uuid.uuid4()
        out.append(cond)
    return out


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut or tile a tensor along dim 0 to batch_size rows (comfy.utils.repeat_to_batch_size)."""
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = math.ceil(batch_size / tensor.shape[0])
        return tensor.repeat([reps] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


def process_conds(model: BaseModel, noise: torch.Tensor, conds: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Step ranges to sigmas, model conds on the device, control pre_run, and controls shared with uncond."""
    ms = model.model_sampling
    device = noise.device
    for key in conds:
        processed = []
        for cond in conds[key]:
            cond = dict(cond)
            if "start_percent" in cond:
                cond["timestep_start"] = ms.percent_to_sigma(cond["start_percent"])
            if "end_percent" in cond:
                cond["timestep_end"] = ms.percent_to_sigma(cond["end_percent"])
            model_conds = model.extra_conds(**{k: v for k, v in cond.items() if k in ("cross_attn", "pooled_output")})
            cond["model_conds"] = {k: v.to(device) for k, v in model_conds.items()}
            processed.append(cond)
        conds[key] = processed
    for key in conds:
        for cond in conds[key]:
            if cond.get("control") is not None:
                cond["control"].pre_run(model, lambda percent: ms.percent_to_sigma(percent))
    _share_controls_with_uncond(conds)
    return conds


def _share_controls_with_uncond(conds: dict[str, list[dict]]) -> None:
    """Old ControlNetApply: controls marked control_apply_to_uncond go onto negatives that have none."""
    cond_cnets = [c["control"] for c in conds.get("positive", [])
                  if c.get("control_apply_to_uncond", False) and c.get("control") is not None]
    for key, uncond in conds.items():
        if key == "positive" or not cond_cnets or not uncond or any(c.get("control") is not None for c in uncond):
            continue
        others = [(c, t) for t, c in enumerate(uncond)]
        for x, cnet in enumerate(cond_cnets):
            o, t = others[x % len(others)]
            n = dict(o)
            n["control"] = cnet
            if o.get("control") is not None:
                uncond.append(n)
            else:
                uncond[t] = n


@dataclass
class _Run:
    """One cond entry prepared for a model call."""

    input_x: torch.Tensor
    mult: float
    conditioning: dict[str, torch.Tensor]
    control: Any
    uuid: uuid.UUID


def _prepare_run(cond: dict, x_in: torch.Tensor, sigma: torch.Tensor) -> _Run | None:
    if "timestep_start" in cond and sigma[0] > cond["timestep_start"]:
        return None
    if "timestep_end" in cond and sigma[0] < cond["timestep_end"]:
        return None
    conditioning = {k: repeat_to_batch_size(v, x_in.shape[0]) for k, v in cond["model_conds"].items()}
    return _Run(x_in, float(cond.get("strength", 1.0)), conditioning, cond.get("control"), cond["uuid"])


def _crossattn_concatable(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= 4


def _can_concat(a: _Run, b: _Run) -> bool:
    """Same latent shape, the very same control object, and conds of compatible shapes (can_concat_cond)."""
    if a.input_x.shape != b.input_x.shape or a.control is not b.control or a.conditioning.keys() != b.conditioning.keys():
        return False
    return all(_crossattn_concatable(a.conditioning[k], b.conditioning[k]) if k == "c_crossattn"
               else a.conditioning[k].shape == b.conditioning[k].shape for k in a.conditioning)


def _cond_cat(conds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate model conds along the batch; text contexts of different lengths are tiled to their lcm."""
    out = {}
    for key in conds[0]:
        tensors = [c[key] for c in conds]
        if key == "c_crossattn":
            length = math.lcm(*(t.shape[1] for t in tensors))
            tensors = [t.repeat(1, length // t.shape[1], 1) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def calc_cond_batch(model: BaseModel, conds: list[list[dict] | None], x_in: torch.Tensor, sigma: torch.Tensor,
                    model_options: dict) -> list[torch.Tensor]:
    """x0 predicted under each cond list; compatible entries of all lists share one U-Net call."""
    out = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.full_like(x_in, 1e-37) for _ in conds]
    to_run = [(run, i) for i, cond_list in enumerate(conds) for c in (cond_list or [])
              if (run := _prepare_run(c, x_in, sigma)) is not None]
    while to_run:
        first = to_run[0][0]
        indices = [j for j, (run, _) in enumerate(to_run) if _can_concat(run, first)][::-1]
        picked = [to_run.pop(j) for j in indices]
        runs, cond_or_uncond = [p[0] for p in picked], [p[1] for p in picked]
        input_x = torch.cat([r.input_x for r in runs])
        c: dict[str, Any] = _cond_cat([r.conditioning for r in runs])
        timestep = torch.cat([sigma] * len(runs))
        transformer_options = clone_options(model_options.get("transformer_options", {}))
        transformer_options.update(cond_or_uncond=cond_or_uncond[:], uuids=[r.uuid for r in runs], sigmas=sigma)
        c["transformer_options"] = transformer_options
        if first.control is not None:
            c["control"] = first.control.get_control(input_x, timestep, c, len(runs), transformer_options)
        if "model_function_wrapper" in model_options:
            params = {"input": input_x, "timestep": timestep, "c": c, "cond_or_uncond": cond_or_uncond}
            output = model_options["model_function_wrapper"](model.apply_model, params)
        else:
            output = model.apply_model(input_x, timestep, **c)
        for chunk, run, i in zip(output.chunk(len(runs)), runs, cond_or_uncond):
            out[i] += chunk * run.mult
            counts[i] += run.mult
    return [o / n for o, n in zip(out, counts)]


def sampling_function(model: BaseModel, x: torch.Tensor, sigma: torch.Tensor, uncond: list[dict], cond: list[dict],
                      cond_scale: float, model_options: dict) -> torch.Tensor:
    """Classifier-free guidance on x0: uncond + (cond - uncond) * scale; uncond is skipped at scale 1."""
    skip_uncond = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip_uncond else uncond
    cond_pred, uncond_pred = calc_cond_batch(model, [cond, uncond_], x, sigma, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": sigma,
                "input": x, "sigma": sigma, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        result = x - model_options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond_, "cond_scale": cond_scale, "model": model,
                     "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": sigma,
                     "model_options": model_options, "input": x})
    return result


# ---- the sampling run ---------------------------------------------------------------------------------
def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """Gaussian noise from torch.manual_seed(seed) on the CPU; batch_index picks rows of a longer draw."""
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    unique, inverse = np.unique(batch_index, return_inverse=True)
    noises = []
    for i in range(int(unique[-1]) + 1):
        noise = torch.randn([1] + list(latent.size())[1:], dtype=latent.dtype, layout=latent.layout,
                            generator=generator, device="cpu")
        if i in unique:
            noises.append(noise)
    return torch.cat([noises[i] for i in inverse], dim=0)


def control_objects(*conditionings: list[dict]) -> list[Any]:
    """The distinct control objects (chain heads) found in cond dicts, in first-seen order."""
    found: list[Any] = []
    for conds in conditionings:
        for cond in conds:
            control = cond.get("control")
            if control is not None and not any(control is f for f in found):
                found.append(control)
    return found


def _load_control_models(controls: list[Any], device: torch.device) -> None:
    """Move each control's weights to the sampling device (what load_models_gpu does in ComfyUI)."""
    for control in controls:
        for model in getattr(control, "get_models", lambda: [])():
            module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
            if isinstance(module, nn.Module):
                module.to(device)


def sample(model: ModelPatcher, noise: torch.Tensor, positive: list, negative: list, cfg: float, sampler_name: str,
           sigmas: torch.Tensor, latent_image: torch.Tensor, seed: int | None = None,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Denoise latent_image (unscaled) along sigmas; returns the unscaled result on the CPU."""
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {list(SAMPLERS)}")
    if sigmas.shape[-1] == 0:
        return latent_image
    base, device = model.model, model.load_device
    conds = {"positive": convert_cond(positive), "negative": convert_cond(negative)}
    controls = control_objects(conds["positive"], conds["negative"])
    try:
        _load_control_models(controls, device)
        noise = noise.to(device=device, dtype=torch.float32)
        latent = latent_image.to(device=device, dtype=torch.float32)
        sigmas = sigmas.to(device)
        if torch.count_nonzero(latent) > 0:  # an empty latent is not shifted, as in ComfyUI
            latent = base.process_latent_in(latent)
        conds = process_conds(base, noise, conds)
        model_options = clone_options(model.model_options)
        model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas

        def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return sampling_function(base, x, sigma, conds["negative"], conds["positive"], cfg, model_options)

        ms = base.model_sampling
        sigma_max, sigma0 = float(ms.sigma_max), float(sigmas[0])
        max_denoise = math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max
        x = ms.noise_scaling(sigmas[0], noise, latent, max_denoise)
        samples = SAMPLERS[sampler_name](denoiser, x, sigmas, seed=seed, callback=callback)
        samples = ms.inverse_noise_scaling(sigmas[-1], samples)
        return base.process_latent_out(samples.to(torch.float32)).to(INTERMEDIATE_DEVICE)
    finally:
        for control in controls:
            control.cleanup()


def common_ksampler(model: ModelPatcher, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: list, negative: list, latent: dict, denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False,
                    callback: StepCallback | None = None) -> tuple[dict]:
    """nodes.common_ksampler: noise, sigmas, sample; returns a copy of the LATENT dict with new samples."""
    if "noise_mask" in latent:
        raise ValueError("latents with a noise_mask (inpainting) are not supported by zeroconv run; use ComfyUI")
    latent_image = resize_channels(latent["samples"], model.model.latent_format.latent_channels)
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = calculate_sigmas(model.model.model_sampling, scheduler, steps, denoise)
    sigmas = trim_sigmas(sigmas, start_step, last_step, force_full_denoise)
    out = dict(latent)
    if sigmas is None:
        out["samples"] = latent_image
        return (out,)
    out["samples"] = sample(model, noise, positive, negative, cfg, sampler_name, sigmas, latent_image, seed, callback)
    return (out,)
