"""`zeroconv run` without ComfyUI: the few core node ids the shipped workflows use, on the library's own sampler.

Input specs keep ComfyUI's names, widget order, defaults and ranges (ComfyUI nodes.py), so widgets_values saved by
ComfyUI map onto them. MODEL is a library base (`training.base.load_base`); KSampler runs the library's
deterministic DDIM (`training.schedule.ddim_sample`) with classifier-free guidance and asks each control object
for its residuals through ComfyUI's protocol (pre_run, get_control, cleanup; comfy/samplers.py). Fidelity to
ComfyUI's other samplers is the job of running in ComfyUI (`zeroconv run` does when one is present).
"""
from __future__ import annotations

import logging
import random
import string
from types import SimpleNamespace
from typing import Any

import torch

from ..nodes.host.models import base_objects, latent_scale
from ..training.base import load_base
from ..training.schedule import NoiseSchedule, ddim_sample
from . import files

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 16384
SIZE = ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8})
SAMPLERS, SCHEDULERS = ["ddim", "euler"], ["ddim_uniform", "normal"]  # those shipped workflows name


class DiscreteSampling:
    """The sigma view of a base's DDPM schedule that control objects call (comfy/model_sampling.py
    ModelSamplingDiscrete with EPS input scaling): sigma_t = sqrt((1 - alphabar_t) / alphabar_t)."""

    def __init__(self, schedule: NoiseSchedule):
        ac = schedule.alphas_cumprod.double()
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep to each sigma, in log space."""
        dists = sigma.float().log().cpu()[None] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, t: float) -> float:
        low, high = int(t), min(int(t) + 1, len(self.log_sigmas) - 1)
        w = t - low
        return float(((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp())

    def percent_to_sigma(self, percent: float) -> float:
        """0 -> above every sigma, 1 -> 0, else sigma at timestep (1 - percent) * (T - 1), as ComfyUI."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * (len(self.log_sigmas) - 1))

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma.view(-1, *([1] * (x.ndim - 1))) ** 2 + 1.0) ** 0.5


def _controls(*conditionings: list) -> list:
    seen: dict[int, Any] = {}
    for conditioning in conditionings:
        for _, options in conditioning:
            if options.get("control") is not None:
                seen.setdefault(id(options["control"]), options["control"])
    return list(seen.values())


def sample(base: Any, seed: int, steps: int, cfg: float, positive: list, negative: list,
           latent: torch.Tensor) -> torch.Tensor:
    """Unscaled latents from noise: DDIM with CFG; cond and uncond share one U-Net call when they share a control."""
    schedule, device = base.schedule, next(base.unet.parameters()).device
    # what pre_run receives: the model_sampling, and the U-Net as diffusion_model (for family checks)
    model = SimpleNamespace(diffusion_model=base.unet, model_sampling=DiscreteSampling(base.schedule))
    ms, ac = model.model_sampling, schedule.alphas_cumprod.to(device)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    chunks = [(positive[0], 0)] if cfg == 1.0 else [(negative[0], 1), (positive[0], 0)]  # ComfyUI's order
    controls = _controls(positive, negative)
    for control in controls:
        control.pre_run(model, ms.percent_to_sigma)

    def unet(x_t: torch.Tensor, t: torch.Tensor, group: list) -> torch.Tensor:
        n = x_t.shape[0]
        a = ac[t[0]]
        context = torch.cat([c[0][0].to(device).expand(n, -1, -1) for c in group])
        y = [c[0][1].get("pooled_output") for c in group]
        y = None if y[0] is None else torch.cat([v.to(device).expand(n, -1) for v in y])
        control = group[0][0][1].get("control")
        residuals = None
        if control is not None:
            sigma = ((1 - a) / a).sqrt().expand(n * len(group)).float()
            cond = {"c_crossattn": context, **({"y": y} if y is not None else {})}
            options = {"cond_or_uncond": [c[1] for c in group]}
            residuals = control.get_control((x_t / a.sqrt()).repeat(len(group), 1, 1, 1), sigma, cond, len(group),
                                            options)
        out = base.unet(x_t.repeat(len(group), 1, 1, 1), t.repeat(len(group)), context=context, y=y,
                        control=residuals)
        return out.float().chunk(len(group))

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, _percent: float) -> torch.Tensor:
        same = len(chunks) == 2 and chunks[0][0][1].get("control") is chunks[1][0][1].get("control") and \
            chunks[0][0][0].shape == chunks[1][0][0].shape
        outs = list(unet(x_t, t, chunks)) if same or len(chunks) == 1 else [unet(x_t, t, [c])[0] for c in chunks]
        return outs[0] if len(outs) == 1 else outs[0] + cfg * (outs[1] - outs[0])

    try:
        with torch.no_grad():
            x_t = ddim_sample(model_fn, schedule, noise, steps,
                              callback=lambda done, total: logger.info("KSampler: step %d/%d", done, total))
            x0 = x_t / latent_scale(base)  # LATENT holds unscaled latents (comfy/latent_formats.py process_out)
    finally:
        for control in controls:
            control.cleanup()
    return x0.cpu()


class CheckpointLoaderSimple:
    """Load Checkpoint: a base model file -> MODEL, CLIP, VAE (through training.base.load_base)."""

    RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL", "CLIP", "VAE"), "load_checkpoint", "loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ckpt_name": (files.list_models("checkpoints"),)}}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name: str) -> bool | str:
        """Accept a name in the models folders, a path, or hf://OWNER/REPO/FILE (downloaded when run)."""
        if ckpt_name.startswith(files.HF_SCHEME):
            return True
        try:
            files.resolve_model("checkpoints", ckpt_name)
        except FileNotFoundError as exc:
            return str(exc)
        return True

    def load_checkpoint(self, ckpt_name: str) -> tuple:
        device = files.current().device
        return base_objects(load_base(files.resolve_model("checkpoints", ckpt_name), device=device))


class CLIPTextEncode:
    RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING",), "encode", "conditioning"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}}

    def encode(self, clip: Any, text: str) -> tuple:
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


class EmptyLatentImage:
    RETURN_TYPES, FUNCTION, CATEGORY = ("LATENT",), "generate", "latent"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"width": SIZE, "height": SIZE, "batch_size": ("INT", {"default": 1, "min": 1,
                                                                                   "max": 4096})}}

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple:
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class KSampler:
    """KSampler: offline, always the library's deterministic DDIM (sampler_name and scheduler are ComfyUI's)."""

    RETURN_TYPES, FUNCTION, CATEGORY = ("LATENT",), "sample", "sampling"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLERS,), "scheduler": (SCHEDULERS,), "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def sample(self, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> tuple:
        if denoise != 1.0:
            raise ValueError(f"denoise {denoise}: without ComfyUI, zeroconv run samples from pure noise only (denoise "
                             "1.0); set COMFYUI_PATH to a ComfyUI checkout to run this workflow with ComfyUI's samplers")
        if (sampler_name, scheduler) != ("ddim", "ddim_uniform"):
            logger.warning("without ComfyUI, KSampler runs the library's DDIM (%s/%s asked); set COMFYUI_PATH to "
                           "sample with ComfyUI's own", sampler_name, scheduler)
        latent = latent_image["samples"]
        channels = model.unet.config.in_channels
        if latent.shape[1] != channels and not latent.any():  # comfy/sample.py fix_empty_latent_channels
            latent = latent.new_zeros((latent.shape[0], channels, *latent.shape[2:]))
        return ({"samples": sample(model, seed, steps, cfg, positive, negative, latent)},)


class VAEDecode:
    RETURN_TYPES, FUNCTION, CATEGORY = ("IMAGE",), "decode", "latent"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, vae: Any, samples: dict) -> tuple:
        return (vae.decode(samples["samples"]),)


class LoadImage:
    """Load Image: a file in the input folder -> IMAGE and MASK (1 - alpha; 64x64 zeros without alpha)."""

    RETURN_TYPES, FUNCTION, CATEGORY = ("IMAGE", "MASK"), "load_image", "image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": (files.list_images(), {"image_upload": True})}}

    def load_image(self, image: str) -> tuple:
        return files.load_image(files.resolve_image(image))

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        try:
            files.resolve_image(image)
        except FileNotFoundError as exc:
            return f"Invalid image file: {image} ({exc})"
        return True


class SaveImage:
    """Save Image: PNGs named <prefix>_00001_.png in the output folder, with the prompt and workflow embedded."""

    RETURN_TYPES, FUNCTION, CATEGORY, OUTPUT_NODE = (), "save_images", "image", True
    folder_kind, prefix_append, compress_level = "output", "", 4

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: dict | None = None,
                    extra_pnginfo: dict | None = None) -> dict:
        paths = files.current()
        root = paths.output_dir if self.folder_kind == "output" else paths.temp_dir
        folder, stem, counter, subfolder = files.save_path(filename_prefix + self.prefix_append, root,
                                                           images[0].shape[1], images[0].shape[0])
        metadata = {**({"prompt": prompt} if prompt is not None else {}), **(extra_pnginfo or {})}
        results = []
        for batch_number, image in enumerate(images):
            name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter + batch_number:05}_.png"
            files.save_png(image, folder / name, metadata, self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.folder_kind})
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Preview Image: like SaveImage, into the temp folder under a random prefix."""

    folder_kind, compress_level = "temp", 1

    def __init__(self) -> None:
        self.prefix_append = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}


CORE_NODE_CLASS_MAPPINGS: dict[str, type] = {cls.__name__: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, LoadImage, SaveImage, PreviewImage)}
