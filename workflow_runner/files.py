"""Where the runner finds models and images and writes results, offline (in ComfyUI: its folder_paths).

A run's folders are a HostPaths held in a context variable for the duration of the run (the runner sets it),
so node classes, which ComfyUI builds with no arguments, can still list and resolve files.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ..nodes.host.folders import PACKAGE_MODELS, weight_files

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Subfolders of a models dir, by kind, as ComfyUI lays out models/ (the dir itself is searched last).
MODEL_SUBFOLDERS: dict[str, tuple[str, ...]] = {"checkpoints": ("checkpoints", ""), "controlnet": ("controlnet", "")}
HF_SCHEME = "hf://"
ANNOTATION = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")


@dataclass(frozen=True)
class HostPaths:
    """The folders and device of one run."""

    models_dirs: tuple[Path, ...] = ()  # searched before the package's models/ folder
    input_dir: Path = Path("input")
    output_dir: Path = Path("output")
    controlnet_dir: Path | None = None  # None: <models dir>/controlnet or the models dir holding the file
    base_dir: Path = field(default_factory=Path.cwd)  # relative file paths in a workflow resolve here too
    device: str = "cpu"

    @property
    def temp_dir(self) -> Path:
        return self.output_dir / "temp"

    def search_dirs(self, kind: str) -> list[Path]:
        """Existing folders to search for a model kind ('checkpoints', 'controlnet'), in order."""
        roots = [Path(d) for d in self.models_dirs] + [PACKAGE_MODELS]
        if kind == "controlnet" and self.controlnet_dir is not None:
            roots = [Path(self.controlnet_dir)] + roots
        dirs = [root / sub if sub else root for root in roots for sub in MODEL_SUBFOLDERS[kind]]
        unique = list(dict.fromkeys(d.resolve() for d in dirs))
        return [d for d in unique if d.is_dir()]


_CURRENT: contextvars.ContextVar[HostPaths] = contextvars.ContextVar("zeroconv_host_paths", default=HostPaths())


def current() -> HostPaths:
    """The folders of the run in progress (defaults outside a run)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(paths: HostPaths) -> Iterator[HostPaths]:
    """Make `paths` the current folders for the duration of a `with` block."""
    token = _CURRENT.set(paths)
    try:
        yield paths
    finally:
        _CURRENT.reset(token)


def list_models(kind: str, paths: HostPaths | None = None) -> list[str]:
    """Model files of a kind, as names relative to their folder (a ComfyUI combo list)."""
    return sorted({n for folder in (paths or current()).search_dirs(kind) for n in weight_files(folder)})


def _download_hf(spec: str) -> Path:
    """hf://owner/repo/path/in/repo -> a local file from huggingface_hub's cache (downloading if needed)."""
    parts = spec[len(HF_SCHEME):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{spec!r} is not hf://OWNER/REPO/FILE, e.g. "
                         "hf://stable-diffusion-v1-5/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors")
    from huggingface_hub import hf_hub_download

    logger.info("fetching %s from the Hugging Face Hub (cached after the first time)", spec)
    return Path(hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2]))


def resolve_model(kind: str, name: str, paths: HostPaths | None = None) -> Path:
    """A model name from a workflow -> a file: a name in the models folders, a path, or hf://OWNER/REPO/FILE."""
    paths = paths or current()
    if name.startswith(HF_SCHEME):
        return _download_hf(name)
    for folder in paths.search_dirs(kind):
        if (folder / name).is_file():
            return folder / name
    candidate = Path(name).expanduser()
    for path in ([candidate] if candidate.is_absolute() else [paths.base_dir / candidate, Path.cwd() / candidate]):
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in paths.search_dirs(kind)) or "no existing folder"
    raise FileNotFoundError(f"{kind} file {name!r} not found (searched {searched}); put it in a folder given with "
                            f"--models-dir, give its path, or give hf://OWNER/REPO/FILE")


def resolve_image(name: str, paths: HostPaths | None = None) -> Path:
    """An image name from LoadImage -> a file in the input folder ('name [output]' picks another folder) or a path."""
    paths = paths or current()
    folders = {"input": paths.input_dir, "output": paths.output_dir, "temp": paths.temp_dir}
    match = ANNOTATION.match(name)
    folder, name = (folders[match["kind"]], match["name"]) if match else (paths.input_dir, name)
    candidate = Path(name).expanduser()
    options = [candidate] if candidate.is_absolute() else [folder / candidate, paths.base_dir / candidate]
    for path in options:
        if path.is_file():
            return path
    raise FileNotFoundError(f"image {name!r} not found in {folder}; put it there, pass --input-dir DIR, "
                            "or give its path")


def list_images(paths: HostPaths | None = None) -> list[str]:
    """Image files in the input folder (LoadImage's combo list)."""
    folder = (paths or current()).input_dir
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE (B, H, W, 3) and MASK (B, H, W) = 1 - alpha, as LoadImage: frames of another size are skipped."""
    images, masks, size = [], [], None
    with Image.open(path) as img:
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            rgb = frame.convert("RGB")
            size = size or rgb.size
            if rgb.size != size:
                continue
            images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                masks.append((1.0 - torch.from_numpy(alpha))[None])
            else:
                masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))  # ComfyUI's "no alpha" mask
    return torch.cat(images), torch.cat(masks)


def save_path(prefix: str, folder: Path, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file stem, next counter, subfolder) for `prefix`, as folder_paths.get_save_image_path."""
    prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
    subfolder, stem = os.path.split(os.path.normpath(prefix))
    root = folder.resolve()
    full = (root / subfolder).resolve()
    if os.path.commonpath((root, full)) != str(root):
        raise ValueError(f"filename_prefix {prefix!r} points outside the output folder {root}; use a plain name")
    full.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d+)_", re.IGNORECASE)
    counters = [int(m.group(1)) for p in full.iterdir() if (m := pattern.match(p.name))]
    return full, stem, max(counters, default=0) + 1, subfolder


def save_png(image: torch.Tensor, path: Path, metadata: dict[str, object] | None = None,
             compress_level: int = 4) -> None:
    """An IMAGE row (H, W, C) in 0..1 as PNG, with JSON text chunks (ComfyUI's 'prompt' and 'workflow')."""
    array = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
    info = None
    if metadata:
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, json.dumps(value))
    Image.fromarray(array).save(path, pnginfo=info, compress_level=compress_level)
