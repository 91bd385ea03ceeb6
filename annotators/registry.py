"""The annotator table and the one call that runs any of them on an image or a batch (lllyasviel/ControlNet
annotator/util.py resize_image conventions).

Classical (weight-free) specs come from classical.py; learned ones register themselves from `annotators.learned`,
which is imported at the end of this module when it exists.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Callable

import numpy as np

from .classical import SPECS
from .common import (AnnotatorSpec, DetectFit, check_image, check_sizes, hwc3, resize, resize_to_detect,
                     short_side_size)

logger = logging.getLogger(__name__)

ANNOTATORS: dict[str, AnnotatorSpec] = {}
ModelCache = Callable[[AnnotatorSpec, str], Any]  # (spec, device) -> the loaded model


def register(spec: AnnotatorSpec) -> AnnotatorSpec:
    """Add an annotator; its name and node id must be new (node ids are public API)."""
    clash = next((s for s in ANNOTATORS.values() if s.name == spec.name or s.node_id == spec.node_id), None)
    if clash is not None and clash != spec:
        raise ValueError(f"annotator {spec.name} ({spec.node_id}) clashes with registered {clash.name} "
                         f"({clash.node_id}); pick another name and node id")
    ANNOTATORS[spec.name] = spec
    return spec


def get(name: str) -> AnnotatorSpec:
    """The spec registered under `name`."""
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; choose one of {sorted(ANNOTATORS)}")
    return ANNOTATORS[name]


def suggest_annotator(control_type: str) -> str | None:
    """The annotator that makes a ControlNet type's condition: the one named like it, else the first that feeds it."""
    feeding = [s.name for s in ANNOTATORS.values() if control_type in s.control_types]
    return control_type if control_type in feeding else (feeding[0] if feeding else None)


class LocalModels:
    """In-process model cache for the library path, keyed by (loader, device): each model is loaded once, and
    annotators that share a loader (depth and normal from MiDaS, HED soft edges and HED scribble) share the model."""

    def __init__(self) -> None:
        self._models: dict[tuple[Callable[[str], Any], str], Any] = {}

    def __call__(self, spec: AnnotatorSpec, device: str) -> Any:
        key = (spec.loader, device)
        if key not in self._models:
            logger.info("loading the %s annotator model on %s", spec.name, device)
            self._models[key] = spec.loader(device)
        return self._models[key]

    def free(self, name: str | None = None) -> None:
        """Drop cached models (all, or the one annotator `name` uses, with any annotator sharing it)."""
        loader = None if name is None else get(name).loader
        for key in [k for k in self._models if name is None or k[0] is loader]:
            del self._models[key]


LOCAL_MODELS = LocalModels()


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(spec: AnnotatorSpec, device: str | None) -> tuple[str, bool]:
    """(device, use batch_fn): where the annotator runs; a requested GPU that cannot be used is logged, not hidden."""
    wants_gpu = device is not None and device != "cpu"
    if spec.loader is None:
        missing = [m for m in spec.batch_requires if importlib.util.find_spec(m) is None]
        if wants_gpu and (spec.batch_fn is None or missing):
            why = f"{', '.join(missing)} is not installed" if missing else "it has no GPU version"
            logger.warning("%s runs on the CPU instead of %s: %s", spec.name, device, why)
        if not wants_gpu or spec.batch_fn is None or missing:
            return "cpu", False
    if device is None:
        device = "cuda" if _cuda_available() else "cpu"
        logger.debug("%s runs on %s", spec.name, device)
    elif device.startswith("cuda") and not _cuda_available():
        logger.warning("%s: device %s was asked for but CUDA is not available; it runs on the CPU", spec.name, device)
        if spec.loader is None:
            return "cpu", False
        device = "cpu"
    return device, spec.batch_fn is not None


def _output_hw(height: int, width: int, output_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if output_size is None:
        return height, width
    if isinstance(output_size, int):
        return short_side_size(height, width, output_size)
    return int(output_size[0]), int(output_size[1])


def _check_params(spec: AnnotatorSpec, params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - {p.name for p in spec.params}
    if unknown:
        raise ValueError(f"annotator {spec.name} has no parameter(s) {sorted(unknown)}; "
                         f"its parameters are {[p.name for p in spec.params]}")
    return {**spec.defaults(), **params}


def _run(spec: AnnotatorSpec, batch: np.ndarray, seeds: list[int], device: str, use_batch: bool,
         model: Any, params: dict[str, Any]) -> list[Any]:
    """The annotator on a batch at detect resolution: one batched call on a torch device, else image by image."""
    extra: dict[str, Any] = {} if model is None else {"model": model}
    if use_batch:
        if spec.seeded:
            extra["seeds"] = seeds
        return list(spec.batch_fn(batch, device=device, **extra, **params))
    return [spec.fn(im, **({"seed": s} if spec.seeded else {}), **extra, **params) for im, s in zip(batch, seeds)]


def _finish(spec: AnnotatorSpec, result: Any, fit: DetectFit, out_hw: tuple[int, int]) -> tuple[np.ndarray, Any]:
    control, people = result if spec.keypoints else (result, None)
    if not isinstance(control, np.ndarray) or control.dtype != np.uint8 or control.ndim not in (2, 3):
        raise ValueError(f"annotator {spec.name} must return an HWC uint8 map, got "
                         f"{getattr(control, 'dtype', type(control))} {getattr(control, 'shape', '')}")
    control = hwc3(fit.restore(hwc3(control), out_hw, spec.resample))
    if spec.finish is not None:
        control = hwc3(spec.finish(control))
    if people is not None:
        from .pose import map_people

        people = map_people(people, fit.restore_points)
    return control, people


def annotate_with_keypoints(name: str, image: np.ndarray, *, detect_resolution: int | None = 512,
                            output_size: int | tuple[int, int] | None = None, seed: int | None = None,
                            device: str | None = None, model_cache: ModelCache | None = None,
                            **params: Any) -> tuple[np.ndarray, list[Any] | None]:
    """`annotate`, also returning per image the people found (0..1 coordinates) for keypoint annotators, else None."""
    spec = get(name)
    params = _check_params(spec, params)
    check_image(image)
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"annotate takes an HWC image or an (N, H, W, C) batch, got shape {image.shape}")
    single = image.ndim != 4
    images = image[None] if single else image
    count, height, width = images.shape[:3]
    out_hw = _output_hw(height, width, output_size)
    check_sizes(height, width, count, None if spec.at_output_size else detect_resolution, out_hw)
    batch = np.stack([hwc3(im) for im in images])
    if spec.at_output_size:
        batch = np.stack([resize(im, *out_hw) for im in batch])
        detect_resolution = None
    fitted = [resize_to_detect(im, detect_resolution) for im in batch]
    work = np.stack([f[0] for f in fitted])
    device, use_batch = resolve_device(spec, device)
    model = (model_cache or LOCAL_MODELS)(spec, device) if spec.loader is not None else None
    base = 0 if seed is None else int(seed)
    results = _run(spec, work, [base + i for i in range(len(work))], device, use_batch, model, params)
    finished = [_finish(spec, r, f[1], out_hw) for r, f in zip(results, fitted)]
    maps = np.stack([m for m, _ in finished])
    people = [p for _, p in finished] if spec.keypoints else None
    if single:
        return maps[0], (people[0] if people is not None else None)
    return maps, people


def annotate(name: str, image: np.ndarray, *, detect_resolution: int | None = 512,
             output_size: int | tuple[int, int] | None = None, seed: int | None = None, device: str | None = None,
             model_cache: ModelCache | None = None, **params: Any) -> np.ndarray:
    """Control map(s) for an HWC uint8 image or an (N, H, W, C) uint8 batch, at output size (default: input size).

    The picture's short side is scaled to `detect_resolution` (None: as is) and edge-padded to multiples of 64; the
    map is cropped and resized back (§5.1). Image i of a batch uses seed `seed + i` (seed None means 0).
    """
    return annotate_with_keypoints(name, image, detect_resolution=detect_resolution, output_size=output_size,
                                   seed=seed, device=device, model_cache=model_cache, **params)[0]


def _register_learned() -> None:
    """Import annotators.learned (it registers its specs); only its absence is tolerated, never its errors."""
    try:
        importlib.import_module(".learned", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.learned":
            raise
        logger.debug("no learned annotators in this build (%s)", exc)


for _spec in SPECS:
    register(_spec)
_register_learned()
