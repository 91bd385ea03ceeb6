"""ComfyUI's model manager (`comfy.model_management`, `comfy.model_patcher`), for everything the nodes load.

  * `HostModels`: annotator models, loaded once per (loader, device, dtype), so annotators that share a loader share
    the model, and, inside ComfyUI, handed to its model manager (ModelPatcher + load_models_gpu) so they are
    offloaded and freed with everything else; outside ComfyUI a plain cache on the best torch device.
  * `controlnet_patcher`, `host_dtype`: our ControlNets under ComfyUI's memory manager and its dtype flags.
  * `base_objects`: a base loaded by the library (the demo world's) as ComfyUI's MODEL, CLIP and VAE.
  * `executing_model_names`, `progress_bar`: what the running prompt says about the sampled model; the node's bar.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ...annotators.common import AnnotatorSpec
from ...annotators.registry import get
from ...annotators.weights import host_weight_dirs
from . import comfy_available
from .folders import annotator_dirs

logger = logging.getLogger(__name__)
MODEL_NAME_INPUTS = ("ckpt_name", "unet_name", "model_name")  # loader widgets that name the sampled model's file


@dataclass
class _Held:
    model: Any  # what the spec's loader returned
    patcher: Any = None  # comfy.model_patcher.ModelPatcher when ComfyUI manages it


class HostModels:
    """Model cache for the annotator nodes; call it as registry.annotate's `model_cache` hook."""

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype = dtype  # annotator nets run in fp32: they are small, and several overflow in fp16
        self._held: dict[tuple[Callable[[str], Any], str, str], _Held] = {}

    def device(self) -> str:
        """ComfyUI's torch device when running inside it; else CUDA when present, else the CPU (logged)."""
        if comfy_available():
            import comfy.model_management as mm

            return str(mm.get_torch_device())
        if torch.cuda.is_available():
            return "cuda"
        logger.info("annotators run on the CPU: no CUDA device is available")
        return "cpu"

    def __call__(self, spec: AnnotatorSpec, device: str) -> Any:
        key = (spec.loader, device, self.dtype)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = self._load(spec, device)
        if held.patcher is not None:
            import comfy.model_management as mm

            mm.load_models_gpu([held.patcher])
            return held.patcher.model
        return held.model

    def _load(self, spec: AnnotatorSpec, device: str) -> _Held:
        with host_weight_dirs(annotator_dirs()):
            if not comfy_available():
                logger.info("annotator %s: loading its model on %s", spec.name, device)
                return _Held(spec.loader(device))
            import comfy.model_management as mm
            from comfy.model_patcher import ModelPatcher

            offload = mm.unet_offload_device()
            model = spec.loader(str(offload))
        if not isinstance(model, torch.nn.Module):
            logger.info("annotator %s: its model is not an nn.Module, so ComfyUI does not manage it", spec.name)
            return _Held(model)
        logger.info("annotator %s: model managed by ComfyUI, runs on %s, offloaded to %s", spec.name, device, offload)
        if str(device) == "cpu" and torch.cuda.is_available():
            logger.warning("annotator %s runs on the CPU although CUDA is available (ComfyUI's device choice)",
                           spec.name)
        return _Held(model, ModelPatcher(model, load_device=torch.device(device), offload_device=offload))

    def free(self, name: str | None = None) -> int:
        """Forget held models (all, or the one annotator `name` uses, with any annotator sharing it) so ComfyUI and
        torch can release them; returns how many."""
        loader = None if name is None else get(name).loader
        keys = [k for k in self._held if name is None or k[0] is loader]
        for key in keys:
            del self._held[key]
        if keys and comfy_available():
            import comfy.model_management as mm

            mm.cleanup_models()
            mm.soft_empty_cache()
        return len(keys)


# ---- our ControlNets under ComfyUI's memory manager ------------------------------------------------------
class HostedControlNet(nn.Module):
    """Our ControlNet as ComfyUI's memory manager sees it: the patcher tags this wrapper, not the cached model."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet


def controlnet_patcher(controlnet: nn.Module) -> Any:
    """A ModelPatcher so ComfyUI loads and offloads the ControlNet with the sampled model; None outside ComfyUI."""
    if not comfy_available():
        return None
    import comfy.model_management as mm
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(HostedControlNet(controlnet), load_device=mm.get_torch_device(),
                        offload_device=mm.unet_offload_device())


def host_dtype(supported: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
               ) -> torch.dtype | None:
    """The dtype ComfyUI would run a ControlNet in on its device (its --fp16/--bf16 flags honoured), preferring the
    model family's dtypes in its order (comfy/supported_models.py supported_inference_dtypes); None outside."""
    if not comfy_available():
        return None
    import comfy.model_management as mm

    dtype = mm.unet_dtype(model_params=-1, supported_dtypes=list(supported))
    return mm.unet_manual_cast(dtype, mm.get_torch_device()) or dtype


def host_load_controlnet(path: str, model: Any) -> Any:
    """ComfyUI's own loader (comfy/controlnet.py load_controlnet) for a file the library does not read; None when
    ComfyUI is absent or cannot read it either."""
    if not comfy_available():
        return None
    import comfy.controlnet

    try:
        return comfy.controlnet.load_controlnet(path, model=model)
    except Exception as exc:  # its own error says less than ours, which the caller raises
        logger.info("ComfyUI's loader could not read %s either: %s", path, exc)
        return None


def progress_bar(total: int) -> Any:
    """ComfyUI's progress bar for the running node, or None outside ComfyUI."""
    if not comfy_available():
        return None
    import comfy.utils

    return comfy.utils.ProgressBar(total)


# ---- what the running prompt says about the sampled model ------------------------------------------------
def executing_model_names() -> tuple[str, ...]:
    """Inside ComfyUI, during sampling: the file names behind the executing sampler's `model` input (walks the
    running prompt from the sampler up its `model` links to a loader widget); empty elsewhere."""
    if not comfy_available() or importlib.util.find_spec("comfy_execution") is None:
        return ()
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    if context is None:
        return ()
    prompt = get_progress_state().dynprompt
    names, todo, seen = set(), [context.node_id], set()
    while todo and len(seen) < 32:
        current = todo.pop()
        node = prompt.get_node(current) if current not in seen and prompt.has_node(current) else None
        seen.add(current)
        inputs = (node or {}).get("inputs", {})
        names.update(v for k, v in inputs.items() if k in MODEL_NAME_INPUTS and isinstance(v, str))
        link = inputs.get("model")
        if isinstance(link, list) and len(link) == 2:
            todo.append(str(link[0]))
    return tuple(sorted(names))


# ---- a library base as MODEL, CLIP and VAE ----------------------------------------------------------------
def latent_scale(base: Any) -> float:
    """The factor between a base's VAE latents and the latents its U-Net samples (1.0 when it declares none)."""
    for name in ("latent_scale", "latent_scale_factor"):
        if getattr(base, name, None) is not None:
            return float(getattr(base, name))
    return 1.0


class BaseCLIP:
    """CLIP over a library base's text encoder (comfy/sd.py CLIP's tokenize / encode_from_tokens_scheduled)."""

    def __init__(self, base: Any):
        self.base = base

    def tokenize(self, text: str) -> str:
        return text  # the base's text encoder tokenizes

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        """CONDITIONING [[context (1, T, D), {"pooled_output": y}]], pooled omitted when the base has none."""
        encoded = self.base.encode_text([tokens])
        pooled = {} if encoded.y is None else {"pooled_output": encoded.y.float().cpu()}
        return [[encoded.context.float().cpu(), pooled]]


class BaseVAE:
    """VAE over a library base: IMAGE (B, H, W, C) in 0..1 <-> unscaled LATENT, as comfy/sd.py VAE."""

    def __init__(self, base: Any, device: torch.device | str | None = None):
        self.base, self.scale = base, latent_scale(base)
        self.device = torch.device(device) if device is not None else next(base.unet.parameters()).device

    def spacial_compression_encode(self) -> int:
        return 8

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
        x = pixels[:, :h, :w, :3].movedim(-1, 1).to(self.device, torch.float32) * 2.0 - 1.0
        return (self.base.encode_images(x).float() / self.scale).cpu()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        images = self.base.decode_latents(samples.to(self.device, torch.float32) * self.scale).float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()


def base_objects(base: Any) -> tuple[Any, BaseCLIP, BaseVAE]:
    """MODEL, CLIP and VAE for a base loaded by the library (the demo world's, or a single-file SD checkpoint).

    Inside ComfyUI the MODEL is ComfyUI's own ModelPatcher around a `comfy.model_base.BaseModel` whose diffusion
    model is our U-Net, with the base's own noise schedule, so core samplers, ControlNet nodes and the memory manager
    treat it like any checkpoint. Outside ComfyUI the MODEL is the base itself, which `zeroconv run` samples with
    the library's sampler.
    """
    if not comfy_available():
        return base, BaseCLIP(base), BaseVAE(base)
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.supported_models_base
    from comfy.model_patcher import ModelPatcher

    cfg = base.unet.config
    unet_config = {"model_channels": cfg.model_channels, "channel_mult": list(cfg.channel_mult),
                   "num_res_blocks": [cfg.num_res_blocks] * len(cfg.channel_mult), "context_dim": cfg.context_dim,
                   "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
                   "transformer_depth": [d or 0 for d in cfg.transformer_depth for _ in range(cfg.num_res_blocks)],
                   "adm_in_channels": cfg.adm_in_channels}
    latent = type("ZeroConvLatentFormat", (comfy.latent_formats.LatentFormat,),
                  {"latent_channels": cfg.in_channels, "scale_factor": latent_scale(base)})
    model_config = type("ZeroConvBaseConfig", (comfy.supported_models_base.BASE,),
                        {"unet_config": unet_config, "latent_format": latent})(unet_config)
    model_type = {"epsilon": comfy.model_base.ModelType.EPS,
                  "v_prediction": comfy.model_base.ModelType.V_PREDICTION}[base.schedule.prediction_type.value]
    model = comfy.model_base.BaseModel(model_config, model_type, unet_model=lambda **_: base.unet)
    alphas_cumprod = base.schedule.alphas_cumprod.double()
    betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    model.model_sampling._register_schedule(given_betas=betas)  # the base's own schedule, whatever its name
    patcher = ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    return patcher, BaseCLIP(base), BaseVAE(base, "cpu")  # ComfyUI moves the U-Net, not the base's VAE
