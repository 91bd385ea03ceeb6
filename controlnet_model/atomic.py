"""Atomic file writes: a temp file in the same folder, fsync, then os.replace (never a half-written file).

Model files and training outputs go through atomic_write. Its temp files are named `.<name>.<random>.tmp`, so that
one killed mid-write can be found and removed later (remove_stale_temps); the finished file gets an ordinary
file's permissions (0666 less the umask, e.g. 0644), readable by another user or a container with another uid.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch


TEMP_SUFFIX = ".tmp"
# Temp names of interrupted writes: ours (`.<name>.<random>.tmp`), and the `.tmp` + 6 characters that
# safetensors' own save_file left beside its target before files were written here.
STALE_TEMP = re.compile(r"^\..+\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path`.

    `write` must write into the file it is given (not write elsewhere and rename over it, which would undo
    the permissions set here).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets an ordinary file's permissions
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened for this on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
                            ) -> Path:
    """A .safetensors file through atomic_write (written by our own writer, see write_safetensors)."""
    from .safetensors_io import write_safetensors

    return atomic_write(path, lambda tmp: write_safetensors(tmp, state, metadata))


def atomic_torch_save(obj: object, path: Path) -> Path:
    """torch.save through atomic_write."""
    return atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files that writes cut short by a killed process left in `folder` (not recursive).

    Call it only where no other process is writing (at the start of a run, before the first write).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if STALE_TEMP.match(p.name) and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
