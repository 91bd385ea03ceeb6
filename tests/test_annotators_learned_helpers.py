"""No tests here: helpers the learned-annotator tests import (weight files in a real layout, manifest sizes)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from zeroconv.annotators.weights import load_manifest


def file_layout(factory: Callable[[], nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32,
                rename: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    """Random tensors under the net's keys (renamed to the file's), shaped as the net wants, seeded."""
    with torch.device("meta"):
        net = factory()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in net.state_dict().items():
        if value.dtype.is_floating_point:
            out[rename(key)] = (torch.randn(value.shape, generator=gen) * 0.02).to(dtype)
        else:
            out[rename(key)] = torch.zeros(value.shape, dtype=value.dtype)
    return out


def write_pth(path: Path, state_dict: Mapping[str, torch.Tensor], wrapper: str | None = None,
              prefix: str = "") -> Path:
    """torch.save a state dict the way a training script would: optional {'state_dict': ...} and key prefix."""
    data: dict = {prefix + k: v for k, v in state_dict.items()}
    torch.save({wrapper: data} if wrapper else data, path)
    return path


def parameter_bytes(factory: Callable[[], nn.Module], bytes_per_value: int = 4, buffers: bool = True) -> int:
    """Bytes the net's state dict takes at a given precision (what a .pth file mostly holds)."""
    with torch.device("meta"):
        net = factory()
    return sum(t.numel() * (bytes_per_value if t.dtype.is_floating_point else 8)
               for t in net.state_dict().values())


def manifest_size(filename: str) -> int:
    """The file's size in bytes as the weights manifest records it (from the hub's LFS pointer)."""
    size = load_manifest()[filename].size
    assert size is not None, f"{filename} has no recorded size"
    return size


def assert_same_tensors(net: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        rename: Callable[[str], str] = lambda k: k) -> None:
    """Every tensor of the loaded net equals the file's (in fp32)."""
    for key, value in net.state_dict().items():
        assert torch.equal(value.float(), state_dict[rename(key)].float()), key
