"""Annotator models kept for the nodes: loaded once per (loader, device, dtype), so annotators that share a loader
share the model, and, inside ComfyUI, handed to its model manager (ModelPatcher + load_models_gpu) so they are
offloaded and freed with everything else.

This is the only annotator code that touches ComfyUI (`comfy.model_management`, `comfy.model_patcher`,
`folder_paths`), always lazily; outside ComfyUI it is a plain cache on the best torch device.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..annotators.common import AnnotatorSpec
from ..annotators.registry import get
from ..annotators.weights import host_weight_dirs

logger = logging.getLogger(__name__)

ANNOTATOR_FOLDER = "annotators"  # ComfyUI models/<this>


def comfy_available() -> bool:
    """True inside a ComfyUI process (its model manager can be imported)."""
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy.model_management") is not None


def comfy_annotator_dirs() -> tuple[Path, ...]:
    """ComfyUI's folders for annotator weights: models/annotators (and any registered under that name)."""
    if importlib.util.find_spec("folder_paths") is None:
        return ()
    import folder_paths

    registered = folder_paths.folder_names_and_paths.get(ANNOTATOR_FOLDER, ((),))[0]
    dirs = [Path(p) for p in registered] + [Path(folder_paths.models_dir) / ANNOTATOR_FOLDER]
    return tuple(dict.fromkeys(dirs))


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
        import torch

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
        with host_weight_dirs(comfy_annotator_dirs()):
            if not comfy_available():
                logger.info("annotator %s: loading its model on %s", spec.name, device)
                return _Held(spec.loader(device))
            import comfy.model_management as mm
            import torch
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

    def held(self) -> list[tuple[str, str, str]]:
        """(loader name, device, dtype) of every model held now."""
        return [(loader.__name__, device, dtype) for loader, device, dtype in self._held]
