"""Reading weight files lazily and safely (controlnet-formats.md §2.1 loader notes).

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
from typing import Any, Callable

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
        raise ValueError(f"{file} is not a valid safetensors file ({exc}); {REFETCH}") from None
    readers = {key: functools.partial(handle.get_tensor, key) for key in shapes}
    return WeightFile(file, metadata, shapes, readers)


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
        raise ValueError(f"{file} is not a readable checkpoint ({type(exc).__name__}: {detail[:200]}); "
                         f"{REFETCH}") from None


def _wants_code(file: Path) -> bool:
    """Whether the file's first pickle imports or calls objects: its opcodes are listed, never executed."""
    import pickletools

    try:
        with open(file, "rb") as f:
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
