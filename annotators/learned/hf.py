"""Hub checkpoints in the transformers layout (`config.json` + `model.safetensors`), run through `transformers`.

Why transformers for these nets (DPT, Depth Anything, SegFormer, Mask2Former): it is maintained, it is already a
dependency of the ComfyUI ecosystem (comfyui_controlnet_aux loads Intel/dpt-hybrid-midas through it), and it loads
the hub checkpoints the community uses as published, so none of these networks is re-implemented (or re-keyed) here.
The files themselves come through the weights manifest (`weights.resolve_weight`): ComfyUI's models/annotators,
ZEROCONV_ANNOTATOR_DIR, the hub cache, the offline flag and the download all behave as for every other annotator.
transformers is imported only when a model is loaded, so importing the pack stays fast.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import reading, resolve_weight

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # RGB 0..1


@dataclass(frozen=True)
class HubModel:
    """One hub repository in the transformers layout and the transformers class that runs it."""

    repo_id: str
    model_class: str  # a transformers class name, e.g. "DPTForDepthEstimation"

    @property
    def config_name(self) -> str:
        """Its config's manifest name (`<repo_id>/config.json`)."""
        return f"{self.repo_id}/{CONFIG_FILE}"

    @property
    def weights_name(self) -> str:
        """Its weights' manifest name (`<repo_id>/model.safetensors`)."""
        return f"{self.repo_id}/{WEIGHTS_FILE}"

    @property
    def files(self) -> tuple[str, str]:
        """Manifest names of both files, for AnnotatorSpec.weights."""
        return self.config_name, self.weights_name


def load_pretrained(model: HubModel, device: str | torch.device = "cpu", *, offline: bool | None = None,
                    directory: Path | str | None = None) -> nn.Module:
    """The hub model, its two files found or fetched through the manifest, loaded strictly, fp32, eval, on `device`.

    Args:
        model: the repository and the transformers class to build.
        device: where the net goes.
        offline: no download attempts (None: ZEROCONV_OFFLINE / HF_HUB_OFFLINE decide).
        directory: a folder searched first, holding `<repo_id>/config.json` and `<repo_id>/model.safetensors`.
    """
    config_path = resolve_weight(model.config_name, offline=offline, directory=directory)
    weights_path = resolve_weight(model.weights_name, offline=offline, directory=directory)
    return load_files(model.model_class, config_path, weights_path, device)


def load_files(model_class: str, config_path: Path | str, weights_path: Path | str,
               device: str | torch.device = "cpu") -> nn.Module:
    """A transformers model from a config file and a `model.safetensors` (the two may sit in different folders).

    Strict: a missing, unexpected or mis-shaped tensor raises KeyError naming it (transformers would only warn and
    initialise the missing ones at random).
    """
    try:
        import transformers  # lazy: only a model load pays for it
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the {model_class} annotator model runs on the transformers library, which is not "
                                  f"installed here (ComfyUI installs it); run: pip install transformers") from exc

    config_path, weights_path = Path(config_path), Path(weights_path)
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ImportError(f"transformers {transformers.__version__} has no {model_class}; upgrade it: "
                          f"pip install -U transformers")
    if weights_path.name != WEIGHTS_FILE:
        raise ValueError(f"{weights_path} must be named {WEIGHTS_FILE} (transformers reads it by that name from its "
                         f"folder); rename it")
    with reading(config_path, "annotator model config"):
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != cls.config_class.model_type:
        raise ValueError(f"{config_path} describes a {model_type!r} model, not {model_class} "
                         f"({cls.config_class.model_type!r}); it belongs to another repository: put the right "
                         f"config.json next to the weights")
    config = cls.config_class.from_json_file(str(config_path))
    # no dtype argument (its name changed across transformers versions): the files are fp32, and .float() below
    with reading(weights_path):
        net, info = cls.from_pretrained(str(weights_path.parent), config=config, output_loading_info=True,
                                        local_files_only=True, use_safetensors=True)
    problems = {kind: sorted(map(str, keys)) for kind, keys in info.items() if keys}
    if problems:
        summary = "; ".join(f"{kind} {keys[:8]} ({len(keys)})" for kind, keys in problems.items())
        raise KeyError(f"{weights_path} does not fit {model_class} as {config_path.name} describes it: {summary}; "
                       f"the files are from another model or truncated: delete them and download them again")
    logger.info("loaded %s (%s) into %s", weights_path, config_path.name, model_class)
    return net.float().eval().requires_grad_(False).to(device)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, 3, H, W) RGB 0..1 -> (x - mean) / std per channel."""
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def resize_batch(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """(N, C, H, W) 0..255 to `size` (antialiased when shrinking, as the hub image processors' PIL resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] * size[1] < x.shape[-2] * x.shape[-1]
    out = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrink)
    return out.clamp(0.0, 255.0)


def short_side_multiple(height: int, width: int, short_side: int, multiple: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to `short_side`, aspect kept, both rounded to multiples of `multiple`."""
    scale = short_side / min(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))
