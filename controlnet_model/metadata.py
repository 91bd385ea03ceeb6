"""What a ControlNet file says about itself, stored as safetensors string metadata (`zeroconv_*` keys)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .safetensors_io import open_weights

PREFIX = "zeroconv_"
EXTRA_PREFIX = "zeroconv_x_"
FORMAT_VERSION = "1"  # of the native layout: bare LDM keys + these metadata keys

# Control types by a token of the file name (official v1.0/v1.1/SDXL names), most specific first, so the loader
# can describe third-party files (and the nodes suggest the annotator) when no metadata says it.
CONTROL_TYPE_BY_NAME_TOKEN: tuple[tuple[str, str], ...] = (
    ("lineart_anime", "lineart_anime"), ("lineart", "lineart"), ("softedge", "softedge"), ("canny", "canny"),
    ("depth", "depth"), ("openpose", "openpose"), ("pose", "openpose"), ("normalbae", "normal"),
    ("normal", "normal"), ("scribble", "scribble"), ("sketch", "scribble"), ("mlsd", "mlsd"), ("hed", "hed"),
    ("seg", "seg"), ("shuffle", "shuffle"), ("tile", "tile"), ("inpaint", "inpaint"), ("ip2p", "ip2p"),
    ("recolor", "recolor"), ("color", "color"), ("blur", "tile"),
)


@dataclass(frozen=True)
class ControlNetMetadata:
    """Description of a ControlNet: what it steers, with which condition, and where it came from."""

    family: str = ""  # base model family, e.g. "SD1.x", "SD2.x", "SDXL" (config.PRESETS names)
    control_type: str = ""  # e.g. "canny", "depth", "openpose"
    annotator: str = ""  # annotator that makes this model's condition, e.g. "canny"
    resolution: int = 0  # training resolution in pixels (0: unknown)
    config: str = ""  # ControlNetConfig as JSON (config.ControlNetConfig.to_json)
    provenance: str = ""  # who or what made the file, and from which source
    content_hash: str = ""  # sha256 of the tensors (checkpoint.content_hash), independent of the file layout
    global_average_pooling: bool = False  # shuffle-type: residuals pooled over H, W; conditional side only
    saved_as: str = ""  # file name at saving time, so a renamed file can be found again
    extra: dict[str, str] = field(default_factory=dict)  # free-form, stored as zeroconv_x_<key>

    def to_strings(self) -> dict[str, str]:
        """safetensors metadata (str -> str); empty fields are left out."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value in ("", 0, False):
                continue
            out[PREFIX + f.name] = json.dumps(value) if isinstance(value, bool) else str(value)
        out.update({EXTRA_PREFIX + k: str(v) for k, v in self.extra.items()})
        return out

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> "ControlNetMetadata":
        """Inverse of to_strings; keys of other tools are ignored, malformed numbers raise ValueError."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = PREFIX + f.name
            if f.name == "extra" or key not in meta:
                continue
            raw = meta[key]
            if f.name == "resolution":
                values[f.name] = _int_field(key, raw)
            elif f.name == "global_average_pooling":
                values[f.name] = raw.strip().lower() in ("true", "1", "yes")
            else:
                values[f.name] = raw
        extra = {k[len(EXTRA_PREFIX):]: v for k, v in meta.items() if k.startswith(EXTRA_PREFIX)}
        return cls(extra=extra, **values)

    def replace(self, **changes: Any) -> "ControlNetMetadata":
        return dataclasses.replace(self, **changes)


def _int_field(key: str, raw: str) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        raise ValueError(f"metadata {key}={raw!r} is not an integer; re-save the file with save_controlnet") from None


def control_type_from_name(path: str | Path) -> str:
    """Control type named by an official-style file name (control_v11p_sd15_canny -> canny), or ""."""
    stem = Path(path).stem.lower().replace("-", "_")
    tokens = set(stem.split("_"))
    for token, control_type in CONTROL_TYPE_BY_NAME_TOKEN:
        if token in tokens or ("_" in token and token in stem):
            return control_type
    return ""


def content_hash(source: Mapping[str, torch.Tensor] | nn.Module | str | Path) -> str:
    """sha256 over sorted key names, dtypes, shapes and bytes: the same for a state dict, a model and its file."""
    if isinstance(source, (str, Path)):
        weights = open_weights(source)
        items: Iterable[tuple[str, torch.Tensor]] = ((k, weights.load(k)) for k in sorted(weights.keys()))
    else:
        state = source.state_dict() if isinstance(source, nn.Module) else source
        items = ((k, state[k]) for k in sorted(state))
    digest = hashlib.sha256()
    for key, tensor in items:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
