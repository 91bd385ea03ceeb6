"""Every folder ZeroConv reads or writes: ComfyUI's `folder_paths` inside ComfyUI; outside it the folder in
ZEROCONV_CONTROLNET_DIR, folders a `zeroconv run` adds for its duration, and the pack's own models/ folder."""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from pathlib import Path
from typing import Iterator

from ...demo import MODELS_DIR as PACKAGE_MODELS  # the demo world's shipped files

CONTROLNET_DIR_ENV = "ZEROCONV_CONTROLNET_DIR"  # the ControlNet folder outside ComfyUI
TRAIN_OUTPUT_ENV = "ZEROCONV_TRAIN_OUTPUT"  # the training node's output folder outside ComfyUI
# folder_paths.supported_pt_extensions (ComfyUI folder_paths.py), the weight files we list and load.
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
ANNOTATOR_FOLDER = "annotators"  # ComfyUI models/<this>

_EXTRA: contextvars.ContextVar[dict[str, tuple[Path, ...]]] = contextvars.ContextVar("zeroconv_folders", default={})


def _folder_paths():
    if importlib.util.find_spec("folder_paths") is None:
        return None
    import folder_paths

    return folder_paths


@contextlib.contextmanager
def extra_folders(**kinds: list[Path]) -> Iterator[None]:
    """Folders of model kinds ('controlnet', 'checkpoints') searched first for the duration of a `with` block
    (how `zeroconv run` hands its --models-dir folders to the nodes)."""
    token = _EXTRA.set({**_EXTRA.get(), **{k: tuple(Path(p) for p in v) for k, v in kinds.items()}})
    try:
        yield
    finally:
        _EXTRA.reset(token)


def model_folders(kind: str) -> list[Path]:
    """Folders of a model kind, in search order: a run's extra folders, then ComfyUI's (or, for ControlNets outside
    ComfyUI, ZEROCONV_CONTROLNET_DIR)."""
    folders = list(_EXTRA.get().get(kind, ()))
    fp = _folder_paths()
    if fp is not None:
        folders += [Path(p) for p in fp.get_folder_paths(kind)] if kind in fp.folder_names_and_paths else []
    elif kind == "controlnet" and os.environ.get(CONTROLNET_DIR_ENV):
        folders.append(Path(os.environ[CONTROLNET_DIR_ENV]))
    return list(dict.fromkeys(folders))


def weight_files(folder: Path) -> list[str]:
    """Weight files under a folder, as '/'-separated names relative to it."""
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES)


def model_names(kind: str) -> list[str]:
    """Names of the weight files of a kind in its folders (a combo list)."""
    return list(dict.fromkeys(n for folder in model_folders(kind) for n in weight_files(folder)))


def find_model(kind: str, name: str) -> Path | None:
    """The file a listed name stands for, or None."""
    for folder in model_folders(kind):
        if (folder / name.replace("\\", "/")).is_file():
            return folder / name.replace("\\", "/")
    return None


def annotator_dirs() -> tuple[Path, ...]:
    """ComfyUI's folders for annotator weights: models/annotators (and any registered under that name)."""
    fp = _folder_paths()
    if fp is None:
        return ()
    registered = fp.folder_names_and_paths.get(ANNOTATOR_FOLDER, ((),))[0]
    return tuple(dict.fromkeys([Path(p) for p in registered] + [Path(fp.models_dir) / ANNOTATOR_FOLDER]))


def training_output_root() -> Path:
    """Where the training node writes its runs: ComfyUI's output folder, else ZEROCONV_TRAIN_OUTPUT."""
    fp = _folder_paths()
    if fp is not None:
        return Path(fp.get_output_directory()) / "zeroconv_training"
    return Path(os.environ.get(TRAIN_OUTPUT_ENV, "output/zeroconv_training"))
