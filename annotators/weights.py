"""Annotator weights: one manifest (file, source repository, size, sha256), found locally or fetched on first use.

Where a file is looked for, in order: the host's folders (ComfyUI's models/annotators, handed in by the nodes with
`host_weight_dirs`), the folder in ZEROCONV_ANNOTATOR_DIR, the Hugging Face hub cache. Otherwise it is downloaded
with huggingface_hub (progress bar), into the host folder, else ZEROCONV_ANNOTATOR_DIR, else the hub cache, unless
offline (argument, ZEROCONV_OFFLINE=1 or HF_HUB_OFFLINE=1): then one FileNotFoundError says what to put where.

A row's name (the key annotators ask for, and where the file goes in a folder) is the file's base name, unless the
row gives "name": hub repositories in the transformers layout all hold a `config.json` and a `model.safetensors`, so
their rows are named `<repo_id>/<file>` and are looked for (and downloaded) in that sub-folder of a weights folder.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

logger = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).resolve().parent / "weights_manifest.json"
DIR_ENV = "ZEROCONV_ANNOTATOR_DIR"
OFFLINE_ENVS = ("ZEROCONV_OFFLINE", "HF_HUB_OFFLINE")
_CHUNK = 1 << 20

# Folders the host (ComfyUI) keeps annotator weights in; set by nodes/host/models.py around model loading.
_HOST_DIRS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("zeroconv_host_weight_dirs", default=())
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) already hashed in this process


@dataclass(frozen=True)
class WeightEntry:
    """One manifest row (annotators/weights_manifest.json)."""

    file: str  # path inside the repository, also the name users put in their folder
    repo_id: str  # Hugging Face repository it comes from
    revision: str  # branch, tag or commit
    size: int | None  # bytes
    sha256: str | None  # None where no hash was recorded: verification then only warns
    license: str
    used_by: tuple[str, ...]  # annotator names
    local_name: str | None = None  # the row's "name" when given: a relative path ending in `file`

    @property
    def name(self) -> str:
        """The key annotators use and the path under a weights folder: "name" if given, else the file's base name."""
        return self.local_name or Path(self.file).name


def load_manifest(path: Path | str | None = None) -> dict[str, WeightEntry]:
    """File name -> entry, from the JSON manifest (a list of objects with the WeightEntry fields)."""
    path = Path(path) if path else MANIFEST_PATH
    rows = json.loads(path.read_text(encoding="utf-8"))
    entries: dict[str, WeightEntry] = {}
    for row in rows:
        missing = {"file", "repo_id", "revision", "size", "sha256", "license", "used_by"} - set(row)
        if missing:
            raise ValueError(f"{path}: entry {row.get('file', row)!r} lacks {sorted(missing)}; add them")
        local_name = row.get("name")
        if local_name is not None and not (local_name == row["file"] or local_name.endswith("/" + row["file"])):
            raise ValueError(f"{path}: entry {row['file']!r} has name {local_name!r}, which must end with "
                             f"'/{row['file']}' (the folder it goes in, then the file)")
        entry = WeightEntry(row["file"], row["repo_id"], row["revision"], row["size"], row["sha256"],
                            row["license"], tuple(row["used_by"]), local_name)
        if entry.name in entries:
            raise ValueError(f"{path}: two entries are named {entry.name!r} ({entries[entry.name].repo_id} and "
                             f"{entry.repo_id}); give one a \"name\" such as '<repo_id>/{entry.file}'")
        entries[entry.name] = entry
    return entries


def is_offline(offline: bool | None = None) -> bool:
    """The explicit flag wins; otherwise ZEROCONV_OFFLINE=1 or HF_HUB_OFFLINE=1 mean no download attempts."""
    if offline is not None:
        return offline
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS)


@contextlib.contextmanager
def host_weight_dirs(dirs: tuple[Path, ...]) -> Iterator[None]:
    """Within the block, look in (and download to) the host's annotator folders first (ComfyUI models/annotators)."""
    token = _HOST_DIRS.set(tuple(Path(d) for d in dirs))
    try:
        yield
    finally:
        _HOST_DIRS.reset(token)


def local_dirs(directory: Path | str | None = None) -> list[Path]:
    """Folders searched before the hub cache: an explicit one, the host's, then ZEROCONV_ANNOTATOR_DIR."""
    dirs = [Path(directory)] if directory else []
    dirs += list(_HOST_DIRS.get())
    if os.environ.get(DIR_ENV):
        dirs.append(Path(os.environ[DIR_ENV]).expanduser())
    return dirs


def _entry(filename: str, manifest: Mapping[str, WeightEntry] | None) -> WeightEntry:
    manifest = load_manifest() if manifest is None else manifest
    name = filename if filename in manifest else Path(filename).name
    if name not in manifest:
        raise KeyError(f"{filename!r} is not in the annotator weights manifest ({MANIFEST_PATH.name}); "
                       f"known files: {sorted(manifest)}")
    return manifest[name]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source(entry: WeightEntry) -> str:
    """Where a manifest file comes from, as a user can open it: the file, its repository URL and revision."""
    return f"{entry.file} of https://huggingface.co/{entry.repo_id} (revision {entry.revision})"


def refetch(entry: WeightEntry) -> str:
    """What to do about a damaged file."""
    return f"delete it and re-fetch with `zeroconv fetch-weights {entry.name}`"


def entry_for_path(path: Path | str, manifest: Mapping[str, WeightEntry] | None = None) -> WeightEntry | None:
    """The manifest row a file on disk is, by where it sits: `<folder>/<name>`, or the hub cache's
    `models--<owner>--<repo>/snapshots/<commit>/<file>`; None when it is no manifest file."""
    path = Path(path)
    manifest = load_manifest() if manifest is None else manifest
    for entry in manifest.values():
        if path.as_posix().endswith("/" + entry.name) or path.as_posix() == entry.name:
            return entry
        if path.name == entry.file and f"models--{entry.repo_id.replace('/', '--')}" in path.parts:
            return entry
    return manifest.get(path.name)


@contextlib.contextmanager
def reading(path: Path | str, what: str = "annotator weight file") -> Iterator[None]:
    """Within the block a weight file is parsed; a failure (a truncated or corrupt .safetensors or .pth, which the
    readers report as a bare header or zip error) becomes one ValueError naming the file, its source and what to
    do. KeyError (a readable file of another layout, already named) and missing modules pass through."""
    try:
        yield
    except (KeyError, ImportError):
        raise
    except Exception as exc:
        entry = entry_for_path(path)
        where = f"; it comes from {source(entry)}: {refetch(entry)}" if entry else ": delete it and fetch it again"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {path} cannot be read ({reason}): it is truncated or corrupt{where}") from exc


def verify(path: Path, entry: WeightEntry) -> Path:
    """Check size and sha256 against the manifest; a mismatch raises, a missing hash is logged as such."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return path
    if entry.size is not None and stat.st_size != entry.size:
        raise ValueError(f"{path} has {stat.st_size} bytes but the manifest records {entry.size} for {entry.name} "
                         f"({source(entry)}): it is partial or another file; {refetch(entry)}")
    if entry.sha256 is None:
        logger.warning("%s: no recorded hash in the manifest, so its content is not verified", entry.name)
    else:
        actual = sha256_of(path)
        if actual != entry.sha256.lower():
            raise ValueError(f"{path} has sha256 {actual} but the manifest records {entry.sha256} for {entry.name} "
                             f"({source(entry)}); the file is corrupt or a different version: {refetch(entry)}")
    _VERIFIED.add(key)
    return path


def _find_local(entry: WeightEntry, directory: Path | str | None) -> Path | None:
    # a named row is only looked for under its name: a bare config.json could be any repository's
    for folder in local_dirs(directory):
        for candidate in ((folder / entry.name,) if entry.local_name else (folder / entry.file, folder / entry.name)):
            if candidate.is_file():
                return candidate
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(entry.repo_id, entry.file, revision=entry.revision)
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def _where_to_put(entry: WeightEntry, directory: Path | str | None) -> str:
    dirs = local_dirs(directory)
    if dirs:
        return f"put it at {dirs[0] / entry.name}" if entry.local_name else f"put it in {dirs[0]}"
    return (f"put it in a folder as {entry.name} and set {DIR_ENV} to that folder (or run inside ComfyUI, which "
            f"uses models/annotators), or fetch it while online with: zeroconv fetch-weights {entry.name}")


def _download(entry: WeightEntry, directory: Path | str | None, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    dirs = local_dirs(directory)
    target = dirs[0] if dirs else None
    if target is not None and entry.local_name:  # <folder>/<repo_id>/<file>, the name it is looked for under
        target = target / entry.name[:-len(entry.file)]
    logger.info("downloading %s from %s (%s bytes) to %s", entry.file, entry.repo_id, entry.size or "?",
                target or "the Hugging Face hub cache")
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        path = hf_hub_download(entry.repo_id, entry.file, revision=entry.revision,
                               local_dir=str(target) if target else None)
    except Exception as exc:  # the hub client's own message only says to check the connection
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"annotator weight {entry.name} could not be downloaded: {source(entry)} failed ({type(exc).__name__}: "
            f"{reason}). Download it by hand from that page and {_where_to_put(entry, directory)}; or retry "
            f"when the hub is reachable with `zeroconv fetch-weights {entry.name}`") from exc
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return Path(path)


def resolve_weight(filename: str, *, offline: bool | None = None, progress: bool = True,
                   directory: Path | str | None = None, manifest: Mapping[str, WeightEntry] | None = None) -> Path:
    """Path of a manifest weight file, found locally or downloaded (unless offline), its hash checked."""
    entry = _entry(filename, manifest)
    found = _find_local(entry, directory)
    if found is None:
        if is_offline(offline):
            raise FileNotFoundError(
                f"annotator weight {entry.name} is not on this machine and downloads are off (offline); it comes from "
                f"https://huggingface.co/{entry.repo_id} (file {entry.file}, revision {entry.revision}): "
                f"{_where_to_put(entry, directory)}")
        found = _download(entry, directory, progress)
    return verify(found, entry)


def fetch_weights(names: list[str] | None = None, offline: bool | None = None, *, directory: Path | str | None = None,
                  progress: bool = True, manifest: Mapping[str, WeightEntry] | None = None) -> list[Path]:
    """Make sure the named manifest files (all when None) are present and verified; returns their paths.

    `offline` None follows ZEROCONV_OFFLINE / HF_HUB_OFFLINE (is_offline)."""
    manifest = load_manifest() if manifest is None else manifest
    wanted = list(manifest) if names is None else [_entry(n, manifest).name for n in names]
    return [resolve_weight(n, offline=offline, progress=progress, directory=directory, manifest=manifest)
            for n in wanted]
