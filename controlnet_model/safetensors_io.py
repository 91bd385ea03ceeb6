"""Reading weight files lazily and safely (the safetensors file format: an 8-byte header length, a JSON header, raw tensors).

safetensors files are opened with safe_open: names, shapes and dtypes come from the header, and each tensor is
read only when asked for. Pickles (.pth/.ckpt/.bin) go through torch.load(weights_only=True), memory-mapped when
the file allows it; a pickle that needs arbitrary code is refused, never run. diffusers shard indexes
(`*.index.json`) join their shards into one view.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# safetensors header dtype names (safetensors format spec).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# Weight files of a diffusers folder, in order of preference; `.index.json` files name shards.
DIFFUSERS_WEIGHT_NAMES: tuple[str, ...] = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.bin.index.json",
)
# Pickles that nest the weights under one key (Lightning .ckpt, the kohya diff .pth writer, some T2I-Adapter .pth
# files: ComfyUI load_t2i_adapter unwraps "adapter").
NESTED_STATE_KEYS: tuple[str, ...] = ("state_dict", "adapter")
REFETCH = "it may be truncated or corrupt: download or copy it again"
# Pickle opcodes that import or call objects (pickletools names); weights-only pickles need none of them.
CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"})


@dataclass
class WeightFile:
    """The tensors of one checkpoint (a file, or a diffusers folder's shards), read one at a time."""

    path: Path  # the file (or the index) the tensors come from
    metadata: dict[str, str]  # safetensors string metadata ({} for pickles)
    shapes: dict[str, torch.Tensor]  # key -> tensor on the meta device: the stored shape and dtype, no data
    readers: dict[str, Callable[[], torch.Tensor]] = field(repr=False)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def load(self, key: str) -> torch.Tensor:
        """The stored tensor (memory-mapped where the format allows; callers cast or copy it)."""
        return self.readers[key]()


def find_weights(path: Path) -> Path:
    """The weight file a path names: the file itself, or the diffusers weights inside a folder."""
    if not path.exists():
        raise FileNotFoundError(f"ControlNet file {path} does not exist; put it in ComfyUI's models/controlnet "
                                "folder (or give the right path)")
    if not path.is_dir():
        return path
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    looked = ", ".join(DIFFUSERS_WEIGHT_NAMES)
    raise FileNotFoundError(f"{path} is a folder without diffusers weights (looked for {looked}); "
                            "download diffusion_pytorch_model.safetensors and config.json into it, or give a file")


def open_weights(path: str | Path) -> WeightFile:
    """Open a checkpoint file or diffusers folder without reading its tensors."""
    file = find_weights(Path(path))
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty (0 bytes); the download or copy failed: fetch the file again")
    if file.name.endswith(".index.json"):
        return _open_shards(file)
    if file.suffix in SAFETENSORS_SUFFIXES or (file.suffix not in PICKLE_SUFFIXES and _looks_like_safetensors(file)):
        return _open_safetensors(file)
    return _open_pickle(file)


def _looks_like_safetensors(file: Path) -> bool:
    """An 8-byte little-endian header length followed by a JSON object (safetensors format spec)."""
    with open(file, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _open_safetensors(file: Path) -> WeightFile:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="pt")
        shapes = {}
        for key in handle.keys():
            piece = handle.get_slice(key)
            dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise ValueError(f"{file}: tensor {key} has dtype {piece.get_dtype()}, which torch cannot hold here")
            shapes[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ValueError(not_weights(file) or f"{file} is damaged: it is not a valid safetensors file ({exc}); "
                         f"{REFETCH}") from None
    readers = {key: functools.partial(handle.get_tensor, key) for key in shapes}
    return WeightFile(file, metadata, shapes, readers)


def not_weights(file: Path) -> str | None:
    """The error for a file that holds text, not weights (a Git LFS pointer, an HTML error page), else None."""
    with open(file, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    if text.startswith("version https://git-lfs"):
        return (f"{file} is a Git LFS pointer (a small text file), not the weights: fetch the real file "
                "(`git lfs pull` in its repository, or download it again from the model page)")
    return (f"{file} is not a weight file but text (it starts with {first!r}): the download is corrupt (an error "
            "page or the wrong file saved under this name); download the weights again")


def _open_pickle(file: Path) -> WeightFile:
    loaded = _torch_load(file)
    for key in NESTED_STATE_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise ValueError(f"{file} holds a {type(loaded).__name__}, not a dict of tensors; it is not a ControlNet "
                         "checkpoint")
    odd = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise ValueError(f"{file} mixes tensors with other objects (e.g. {odd[:5]}); it is not a flat weight file: "
                         "give the ControlNet's state dict saved with torch.save or safetensors")
    shapes = {k: torch.empty_like(v, device="meta") for k, v in loaded.items()}
    readers = {k: constant(v) for k, v in loaded.items()}
    return WeightFile(file, {}, shapes, readers)


def constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A reader for a tensor already in memory (or memory-mapped)."""
    return functools.partial(_identity, tensor)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _torch_load(file: Path) -> Any:
    """torch.load(weights_only=True), memory-mapped for zip-format files; clear errors for refused/bad pickles."""
    text = not_weights(file)
    if text:
        raise ValueError(text)
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as exc:  # re-raised below as one clear error naming the file
        text = str(exc)
        if "GLOBAL" in text or _wants_code(file):
            raise ValueError(f"{file} was refused: loading it would run code it names (a pickle that is not only "
                             "weights), and that code is never run. If you trust its source, convert it to "
                             ".safetensors with the tool that made it") from None
        detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), text.split("\n")[0])
        raise ValueError(f"{file} is damaged: it is not a readable checkpoint ({type(exc).__name__}: "
                         f"{detail[:200]}); {REFETCH}") from None


def _wants_code(file: Path) -> bool:
    """Whether the file's first pickle imports or calls objects: its opcodes are listed, never executed."""
    import pickletools

    try:
        with open(file, "rb") as f:
            if f.read(1) != b"\x80":  # torch.save writes protocol 2+, which opens with PROTO: garbage is no pickle
                return False
            f.seek(0)
            return any(op.name in CODE_OPCODES for op, _, _ in pickletools.genops(f))
    except Exception:  # not a pickle that parses: garbage, or a zip archive, so nothing that wants code
        return False


def _open_shards(index: Path) -> WeightFile:
    """A diffusers shard index: {"weight_map": {key: shard file}} beside its shards."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is not a shard index ({exc}); download it again with its shards") from None
    shards = {name: open_weights(index.parent / name) for name in sorted(set(weight_map.values()))}
    shapes, readers, metadata = {}, {}, {}
    for key, name in weight_map.items():
        shard = shards[name]
        if key not in shard.shapes:
            raise KeyError(f"{index} places {key} in {name}, which lacks it; download the shards again")
        shapes[key], readers[key] = shard.shapes[key], shard.readers[key]
    for shard in shards.values():
        metadata.update(shard.metadata)
    return WeightFile(index, metadata, shapes, readers)


def check_finite(tensors: Mapping[str, torch.Tensor], file: Path, dtype: torch.dtype, cacheable: bool) -> None:
    """refuse_non_finite, skipped for a file already found finite in this dtype: once per file, not per load.

    Files are remembered by (real path, size, mtime_ns, dtype) in this process and in
    $ZEROCONV_CACHE_DIR/finite-weights.json (default ~/.cache/zeroconv), so a ComfyUI restart does not check the
    same unchanged file again. Not cacheable: weights combined with a base model (diff, Control-LoRA), whose
    result also depends on that model, and shard indexes (their shards change without the index).
    """
    key = _finite_key(file, dtype) if cacheable and file.is_file() and not file.name.endswith(".index.json") else None
    if key is not None and key in _known_finite():
        return
    refuse_non_finite(tensors, file)
    if key is not None:
        _remember_finite(key)


FINITE_CACHE_ENTRIES = 512  # newest kept; a line each
_FINITE: set[str] = set()


def _finite_key(file: Path, dtype: torch.dtype) -> str:
    stat = file.stat()
    return f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{str(dtype).removeprefix('torch.')}"


def _finite_cache() -> Path:
    import os

    folder = os.environ.get("ZEROCONV_CACHE_DIR") or Path.home() / ".cache" / "zeroconv"
    return Path(folder) / "finite-weights.json"


def _known_finite() -> set[str]:
    if not _FINITE:
        try:
            _FINITE.update(json.loads(_finite_cache().read_text()))
        except (OSError, ValueError, TypeError):  # none yet, unreadable or damaged: check again, that is all
            pass
    return _FINITE


def _remember_finite(key: str) -> None:
    from .atomic import atomic_write_text

    known = [k for k in _known_finite() if k != key][-(FINITE_CACHE_ENTRIES - 1):] + [key]
    _FINITE.add(key)
    try:
        path = _finite_cache()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=0))
    except OSError as exc:  # a read-only home: the check simply runs on every load
        logger.debug("could not record %s as checked: %s", key, exc)


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], file: Path | str) -> None:
    """ValueError naming the file and its first tensor holding NaN or inf (such weights sample black images).

    Cheap enough to run on every load (issue 16 measures it; bench/bench_load.py): one plain `sum` per floating
    tensor, on the device and in the dtype the weights are loaded to, and one host sync for the whole file. A sum
    is finite unless some element is NaN/inf or the sum overflows; only then are that file's tensors checked
    element by element, so a large but finite fp16 tensor is never refused.
    """
    floats = [(key, t) for key, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return
    sums = torch.stack([t.sum().float().reshape(()).to(floats[0][1].device) for _, t in floats])
    if bool(torch.isfinite(sums).all()):
        return
    for key, t in floats:
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{file} holds NaN or infinite weights (tensor {key}: {bad} of {t.numel()} values; "
                             f"checked in {str(t.dtype).removeprefix('torch.')}): such a ControlNet makes black "
                             "images. The file is damaged or comes from a training run that diverged; download it "
                             "again or use an earlier checkpoint")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a file as stored (memory-mapped where the format allows) and its string metadata."""
    weights = open_weights(path)
    return {k: weights.load(k) for k in weights.keys()}, weights.metadata


# ---- writing -----------------------------------------------------------------------------------------------
SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> None:
    """Write `tensors` to `path` in the safetensors format, streamed one tensor at a time into that very file.

    safetensors.torch.save_file writes its own temp file beside the target and renames it over: a kill leaves
    that temp behind, and the rename replaces the file's permissions with 0600. Writing here keeps the file the
    caller made (atomic_write's temp, with ordinary permissions). Layout (safetensors format spec): an 8-byte
    little-endian header length, a JSON header padded with spaces to 8 bytes, then the tensors' bytes in
    header order, largest element size first so that every tensor starts aligned.
    """
    import struct
    import sys

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: safetensors metadata must map text to text, got {metadata!r}")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"{path}: {key!r} is not a named dense tensor; only those can be written")
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"{path}: tensor {key} has dtype {tensor.dtype}, which safetensors cannot hold")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            flat = tensors[key].detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                data = flat.view(torch.uint8).numpy()
                f.write(data.byteswap() if sys.byteorder == "big" and flat.element_size() > 1 else data)
