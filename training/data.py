"""Training data: (image, condition, caption) rows from a folder or a JSONL file, cropped to the resolution.

Layouts read: the Fill50K layout (lllyasviel/ControlNet docs/train.md, tutorial_dataset.py) (`prompt.json`, JSON Lines with source/target/prompt),
any JSONL of {"image", "condition", "caption"} rows with paths relative to the file, and a folder with `image/`,
`condition/` and `<stem>.txt` captions. Conditions may instead be made on the fly by an annotator (random-threshold
Canny, the paper's scribble synthesis, ...). Which rows a process reads at a step is a pure function of
(seed, step), so one process and N processes see the same global batch, and a resumed run the same data.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import Crop

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Keys a JSONL row may use for each field (ours first, then Fill50K's, then the diffusers dataset's).
ROW_KEYS = {"image": ("image", "target", "file_name"), "condition": ("condition", "source", "conditioning_image"),
            "caption": ("caption", "prompt", "text")}
JSONL_NAMES = ("prompt.json", "metadata.jsonl", "train.jsonl", "data.jsonl")
FOLDER_NAMES = {"image": ("image", "images", "target"), "condition": ("condition", "conditions", "source")}


@dataclass(frozen=True)
class Row:
    image: Path
    condition: Path | None  # None: made by the annotator
    caption: str
    where: str  # "prompt.json line 12" or the image path, for error messages


# ---- reading the row list --------------------------------------------------------------------------------
def read_rows(data: str | Path, need_condition: bool = True) -> list[Row]:
    """Every row of a data folder or JSONL, with every named file checked to exist (the bad row is named)."""
    path = Path(data)
    if not str(data):
        raise ValueError("no training data given; set `data` to a folder or a .jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist; set `data` to a folder or a .jsonl file")
    if path.is_dir():
        listed = next((path / n for n in JSONL_NAMES if (path / n).is_file()), None)
        rows = _read_jsonl(listed) if listed else _read_folder(path)
    else:
        rows = _read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no training rows; add images (and conditions) or JSONL lines")
    for row in rows:
        if not row.image.is_file():
            raise FileNotFoundError(f"{row.where}: image {row.image} does not exist; fix the path or remove the row")
        if row.condition is None and need_condition:
            raise ValueError(f"{row.where}: no condition image and no annotator; set `annotator` or add the condition")
        if row.condition is not None and not row.condition.is_file():
            raise FileNotFoundError(f"{row.where}: condition {row.condition} does not exist; fix the path or remove the row")
    return rows


def _pick(record: dict[str, Any], field: str) -> Any:
    return next((record[k] for k in ROW_KEYS[field] if k in record), None)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict) or _pick(record, "image") is None:
                raise ValueError(f"{where} has no image; rows need \"image\" (or Fill50K's \"target\")")
            condition = _pick(record, "condition")
            rows.append(Row(path.parent / str(_pick(record, "image")),
                            None if condition in (None, "") else path.parent / str(condition),
                            str(_pick(record, "caption") or ""), where))
    return rows


def _read_folder(path: Path) -> list[Row]:
    image_dir = next((path / n for n in FOLDER_NAMES["image"] if (path / n).is_dir()), None)
    if image_dir is None:
        raise FileNotFoundError(f"{path} has no image/ folder and no JSONL ({', '.join(JSONL_NAMES)}); "
                                "put target images in image/ and conditions in condition/")
    cond_dir = next((path / n for n in FOLDER_NAMES["condition"] if (path / n).is_dir()), None)
    rows = []
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        condition = None
        if cond_dir is not None:
            matches = [cond_dir / (image.stem + s) for s in (image.suffix, *IMAGE_SUFFIXES)]
            condition = next((m for m in matches if m.is_file()), cond_dir / image.name)
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        rows.append(Row(image, condition, caption, str(image)))
    return rows


# ---- images and conditions ---------------------------------------------------------------------------------
def load_rgb(path: Path, where: str, kind: str) -> np.ndarray:
    """(H, W, 3) uint8, or a ValueError naming the row."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read {kind} {path} ({exc}); replace the file or remove the row") from None


def _resize_short(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (area when shrinking, bicubic when growing)."""
    import cv2

    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) == (h, w):
        return image
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def resize_and_crop(image: np.ndarray, size: int, crop: Crop, rng: np.random.Generator | None
                    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Shorter side to `size`, then a square crop; returns the crop and (orig h, orig w, top, left)."""
    h, w = image.shape[:2]
    resized = _resize_short(image, size)
    nh, nw = resized.shape[:2]
    if crop is Crop.RANDOM and rng is not None:
        top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    else:
        top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top:top + size, left:left + size], (h, w, top, left)


# Canny thresholds drawn per sample when training (the canny model was trained with random thresholds, paper §4).
CANNY_LOW_RANGE = (50, 150)  # low threshold, inclusive
CANNY_HIGH_FACTOR = (1.5, 3.0)  # high = low x U(factor), capped at 255


def random_canny_thresholds(rng: np.random.Generator) -> tuple[int, int]:
    low = int(rng.integers(CANNY_LOW_RANGE[0], CANNY_LOW_RANGE[1] + 1))
    return low, min(255, int(low * rng.uniform(*CANNY_HIGH_FACTOR)))


def make_condition(annotator: str, image: np.ndarray, seed: int) -> np.ndarray:
    """The condition an annotator makes from a training image (at its size); Canny gets random thresholds."""
    from ..annotators import registry

    if annotator not in registry.ANNOTATORS:
        raise ValueError(f"unknown annotator {annotator!r}; choose one of {sorted(registry.ANNOTATORS)} or give "
                         "conditions in the data and leave `annotator` empty")
    params: dict[str, Any] = {}
    if annotator == "canny":
        params["low_threshold"], params["high_threshold"] = random_canny_thresholds(np.random.default_rng(seed))
    return registry.annotate(annotator, image, detect_resolution=None, seed=seed, **params)


class ControlDataset(torch.utils.data.Dataset):
    """Rows to tensors: pixels (3, R, R) in [-1, 1], hint (3, R, R) in [0, 1], caption, SDXL size conditioning."""

    def __init__(self, rows: list[Row], resolution: int, crop: Crop = Crop.CENTER, annotator: str = "",
                 latent_cache: "LatentCache | None" = None):
        self.rows, self.resolution, self.crop, self.annotator = rows, resolution, Crop(crop), annotator
        self.latent_cache = latent_cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, aug_seed = key if isinstance(key, tuple) else (key, 0)
        row = self.rows[index]
        rng = np.random.default_rng(aug_seed)
        image = load_rgb(row.image, row.where, "image")
        cropped, (h, w, top, left) = resize_and_crop(image, self.resolution, self.crop, rng)
        if row.condition is not None:
            import cv2

            condition = load_rgb(row.condition, row.where, "condition")
            if condition.shape[:2] != image.shape[:2]:
                condition = cv2.resize(condition, (w, h), interpolation=cv2.INTER_NEAREST)
            cond_crop = _resize_short(condition, self.resolution)[top:top + self.resolution, left:left + self.resolution]
        else:
            cond_crop = make_condition(self.annotator, cropped, aug_seed)
        item = {"hint": torch.from_numpy(np.array(cond_crop)).permute(2, 0, 1).float() / 255.0,
                "caption": row.caption, "index": index,
                "size_cond": torch.tensor([h, w, top, left, self.resolution, self.resolution], dtype=torch.float32)}
        if self.latent_cache is not None:
            item["moments"] = self.latent_cache.get(index)
        else:
            item["pixels"] = torch.from_numpy(np.array(cropped)).permute(2, 0, 1).float() / 127.5 - 1.0
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; captions and indices stay lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ---- which rows each process reads at each step ----------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """Global positions of one optimiser step: p = (micro * world + rank) * batch + j (see module docstring)."""

    batch_size: int  # per process per micro-step
    grad_accum: int
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def local_slice(self, micro: int, rank: int) -> slice:
        start = (micro * self.world_size + rank) * self.batch_size
        return slice(start, start + self.batch_size)


class StepSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches as (row index, augmentation seed) lists, from `start_step` on.

    The stream of rows is one random permutation per epoch (seeded by seed and epoch), read continuously across
    epoch ends; the row at global position q = step * global_batch + p is the same whatever the process count.
    """

    def __init__(self, num_rows: int, plan: BatchPlan, rank: int, seed: int, start_step: int, max_steps: int):
        self.num_rows, self.plan, self.rank, self.seed = num_rows, plan, rank, seed
        self.start_step, self.max_steps = start_step, max_steps

    def _row(self, q: int, perms: dict[int, list[int]]) -> tuple[int, int]:
        epoch = q // self.num_rows
        if epoch not in perms:
            perms.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(self.num_rows, generator=gen).tolist()
        return perms[epoch][q % self.num_rows], (self.seed * 7_919 + q) % 2**31

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perms: dict[int, list[int]] = {}
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.plan.grad_accum):
                part = self.plan.local_slice(micro, self.rank)
                yield [self._row(step * self.plan.global_batch + p, perms) for p in range(part.start, part.stop)]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.plan.grad_accum


# ---- cached latents ------------------------------------------------------------------------------------------
class LatentCache:
    """VAE posterior moments per row, one file each under `folder`, written once (atomically) and reused."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder) / key
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:08d}.pt"

    def has(self, index: int) -> bool:
        return self.path(index).is_file()

    def put(self, index: int, moments: torch.Tensor) -> None:
        from ..controlnet_model.atomic import atomic_torch_save

        atomic_torch_save(moments.detach().to(torch.float16).cpu().clone(), self.path(index))

    def get(self, index: int) -> torch.Tensor:
        path = self.path(index)
        try:
            return torch.load(path, map_location="cpu", weights_only=True).float()
        except (OSError, RuntimeError, EOFError) as exc:
            raise ValueError(f"cached latent {path} is unreadable ({exc}); delete {self.folder} to rebuild it") from None
