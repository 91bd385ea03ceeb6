"""Our implementations of the ComfyUI core nodes our workflows use, with ComfyUI's ids, inputs and widget order.

Input specs are data (ComfyUI 0.3.64, nodes.py; reference §7): the same names, order, defaults and ranges, so
widgets_values saved by ComfyUI map onto them and a workflow saved here loads there. The bodies are ours:
checkpoints load through training.base.load_base, images go through files.py, sampling through sampling.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import string
from typing import Any

import torch

from ..training.base import load_base
from . import files
from .host import CLIP, VAE, ModelPatcher, host_objects
from .sampling import SAMPLERS, SCHEDULERS, common_ksampler

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 16384
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})
STEPS = ("INT", {"default": 20, "min": 1, "max": 10000})
CFG = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
SIZE = ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8})
BATCH = ("INT", {"default": 1, "min": 1, "max": 4096})
IMAGE_SIZE = ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1})


def _sampler_inputs() -> dict[str, tuple]:
    return {"sampler_name": (list(SAMPLERS),), "scheduler": (list(SCHEDULERS),)}


def _progress(node: str) -> Any:
    def report(done: int, total: int) -> None:
        logger.info("%s: step %d/%d", node, done, total)
    return report


class CheckpointLoaderSimple:
    """Load Checkpoint: a base model file -> MODEL, CLIP, VAE (through training.base.load_base)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ckpt_name": (files.list_models("checkpoints"),
                                           {"tooltip": "The name of the checkpoint (model) to load."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"

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

    def load_checkpoint(self, ckpt_name: str) -> tuple[ModelPatcher, CLIP, VAE]:
        path = files.resolve_model("checkpoints", ckpt_name)
        device = files.current().device
        logger.info("loading %s on %s", path, device)
        return host_objects(load_base(path, device=device), device)


class CLIPTextEncode:
    """CLIP Text Encode (Prompt): text -> CONDITIONING [[context, {"pooled_output": ...}]]."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    def encode(self, clip: CLIP | None, text: str) -> tuple[list]:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


class EmptyLatentImage:
    """Empty Latent Image: zeros (B, 4, H/8, W/8); the sampler adapts the channels to the model."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"width": SIZE, "height": SIZE, "batch_size": BATCH}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent"

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict]:
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class KSampler:
    """KSampler: denoise a LATENT with a MODEL under positive/negative CONDITIONING (and their controls)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), "seed": SEED, "steps": STEPS, "cfg": CFG, **_sampler_inputs(),
                             "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model: ModelPatcher, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> tuple[dict]:
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=denoise, callback=_progress("KSampler"))


class KSamplerAdvanced:
    """KSampler (Advanced): a step window, optional noise, optional leftover noise."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), "add_noise": (["enable", "disable"],), "noise_seed": SEED,
                             "steps": STEPS, "cfg": CFG, **_sampler_inputs(), "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                             "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
                             "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                             "return_with_leftover_noise": (["disable", "enable"],)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model: ModelPatcher, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, positive: list, negative: list, latent_image: dict, start_at_step: int,
               end_at_step: int, return_with_leftover_noise: str, denoise: float = 1.0) -> tuple[dict]:
        return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise, disable_noise=add_noise == "disable",
                               start_step=start_at_step, last_step=end_at_step,
                               force_full_denoise=return_with_leftover_noise != "enable",
                               callback=_progress("KSamplerAdvanced"))


class VAEEncode:
    """VAE Encode: IMAGE -> unscaled LATENT."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae: VAE, pixels: torch.Tensor) -> tuple[dict]:
        return ({"samples": vae.encode(pixels[:, :, :, :3])},)


class VAEDecode:
    """VAE Decode: LATENT -> IMAGE (B, H, W, 3) in 0..1."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "latent"

    def decode(self, vae: VAE, samples: dict) -> tuple[torch.Tensor]:
        return (vae.decode(samples["samples"]),)


class LoadImage:
    """Load Image: a file in the input folder -> IMAGE and MASK (1 - alpha; 64x64 zeros without alpha)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": (files.list_images(), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return files.load_image(files.resolve_image(image))

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        return hashlib.sha256(files.resolve_image(image).read_bytes()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        try:
            files.resolve_image(image)
        except FileNotFoundError as exc:
            return f"Invalid image file: {image} ({exc})"
        return True


class SaveImage:
    """Save Image: PNGs named <prefix>_00001_.png in the output folder, with the prompt and workflow embedded."""

    folder_kind, file_type, prefix_append, compress_level = "output", "output", "", 4

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    def _folder(self) -> Any:
        paths = files.current()
        return paths.output_dir if self.folder_kind == "output" else paths.temp_dir

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: dict | None = None,
                    extra_pnginfo: dict | None = None) -> dict:
        folder, stem, counter, subfolder = files.save_path(filename_prefix + self.prefix_append, self._folder(),
                                                           images[0].shape[1], images[0].shape[0])
        metadata = {**({"prompt": prompt} if prompt is not None else {}), **(extra_pnginfo or {})}
        results = []
        for batch_number, image in enumerate(images):
            name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            files.save_png(image, folder / name, metadata, self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.file_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Preview Image: like SaveImage, into the temp folder under a random prefix."""

    folder_kind, file_type, compress_level = "temp", "temp", 1

    def __init__(self) -> None:
        self.prefix_append = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}


class EmptyImage:
    """EmptyImage: a solid colour IMAGE (colour as 0xRRGGBB)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": BATCH,
                             "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    def generate(self, width: int, height: int, batch_size: int = 1, color: int = 0) -> tuple[torch.Tensor]:
        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        return (torch.tensor(rgb, dtype=torch.float32).expand(batch_size, height, width, 3).clone(),)


# Core ControlNet node ids served by our pack's nodes (only those know our files).
PACK_LOADER_ID = "ZeroConvLoadControlNet"
PERCENT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})


def _pack_node(node_id: str) -> type:
    from .. import NODE_CLASS_MAPPINGS as PACK_NODES

    if node_id not in PACK_NODES:
        raise ValueError(f"the pack node {node_id} is not registered, so this core ControlNet node cannot run here; "
                         f"use {node_id} in the workflow or run it in ComfyUI")
    return PACK_NODES[node_id]


def _widget_defaults(cls: type) -> dict[str, Any]:
    """Default values of a node class's widget inputs."""
    types = cls.INPUT_TYPES()
    return {name: spec[1]["default"] for section in ("required", "optional")
            for name, spec in types.get(section, {}).items() if len(spec) > 1 and "default" in spec[1]}


class ControlNetLoader:
    """Load ControlNet Model: served by our loader node, reading the file from the run's ControlNet folder."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"control_net_name": (files.list_models("controlnet"),)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load_controlnet"
    CATEGORY = "loaders"

    def load_controlnet(self, control_net_name: str) -> tuple[Any]:
        path = files.resolve_model("controlnet", control_net_name)
        loader = _pack_node(PACK_LOADER_ID)
        names = [n for n, spec in loader.INPUT_TYPES()["required"].items() if isinstance(spec[0], (list, tuple))]
        if not names:
            raise ValueError(f"{PACK_LOADER_ID} has no file-name input to pass {control_net_name!r} to")
        kwargs = {**_widget_defaults(loader), names[0]: path.name}
        with files.controlnet_environment(dataclasses.replace(files.current(), controlnet_dir=path.parent)):
            control = getattr(loader(), loader.FUNCTION)(**kwargs)
        return (control["result"][0] if isinstance(control, dict) else control[0],)


class ControlNetApplyAdvanced:
    """Apply ControlNet: one copy of the control per previous control, shared by positive and negative."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "control_net": ("CONTROL_NET",), "image": ("IMAGE",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                             "start_percent": PERCENT,
                             "end_percent": ("FLOAT", {**PERCENT[1], "default": 1.0})},
                "optional": {"vae": ("VAE",)}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"

    def apply_controlnet(self, positive: list, negative: list, control_net: Any, image: torch.Tensor,
                         strength: float, start_percent: float, end_percent: float, vae: VAE | None = None,
                         extra_concat: list | None = None) -> tuple[list, list]:
        if strength == 0:
            return (positive, negative)
        hint, made, out = image.movedim(-1, 1), {}, []
        for conditioning in (positive, negative):
            entries = []
            for tensor, options in conditioning:
                options = dict(options)
                previous = options.get("control")
                if previous not in made:
                    made[previous] = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent),
                                                                      vae=vae, extra_concat=extra_concat or [])
                    made[previous].set_previous_controlnet(previous)
                options["control"], options["control_apply_to_uncond"] = made[previous], False
                entries.append([tensor, options])
            out.append(entries)
        return (out[0], out[1])


CORE_NODE_CLASS_MAPPINGS: dict[str, type] = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "CLIPTextEncode": CLIPTextEncode,
    "EmptyLatentImage": EmptyLatentImage,
    "KSampler": KSampler,
    "KSamplerAdvanced": KSamplerAdvanced,
    "VAEEncode": VAEEncode,
    "VAEDecode": VAEDecode,
    "LoadImage": LoadImage,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "EmptyImage": EmptyImage,
    "ControlNetLoader": ControlNetLoader,
    "ControlNetApplyAdvanced": ControlNetApplyAdvanced,
}
CORE_NODE_DISPLAY_NAMES: dict[str, str] = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "EmptyLatentImage": "Empty Latent Image",
    "KSampler": "KSampler",
    "KSamplerAdvanced": "KSampler (Advanced)",
    "VAEEncode": "VAE Encode",
    "VAEDecode": "VAE Decode",
    "LoadImage": "Load Image",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "EmptyImage": "EmptyImage",
    "ControlNetLoader": "Load ControlNet Model",
    "ControlNetApplyAdvanced": "Apply ControlNet",
}
