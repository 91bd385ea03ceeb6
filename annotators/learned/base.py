"""What every learned annotator shares: reading a weight file strictly, building a net on a device, batch tensors."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..weights import reading, resolve_weight
from ...controlnet_model.skeleton import skeleton

logger = logging.getLogger(__name__)

# Containers some .pth files wrap their tensors in (PyTorch Lightning, our own trainers, DataParallel saves).
WRAPPER_KEYS = ("state_dict", "model", "net")
WRAPPER_PREFIXES = ("module.",)  # nn.DataParallel
OPTIONAL_SUFFIXES = ("num_batches_tracked",)  # BatchNorm counters older PyTorch did not save; unused at inference


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.safetensors file, unwrapped from {'state_dict': ...} and 'module.' prefixes."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            raise KeyError(f"{path.name} holds no tensors at its top level nor under {WRAPPER_KEYS}; "
                           f"its keys are {sorted(data)[:10]}: is it an annotator weight file?")
        data = data[inner]
    if not isinstance(data, Mapping):
        raise KeyError(f"{path.name} does not hold a state dict (got {type(data).__name__}); download it again")
    return {strip_prefixes(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(key: str) -> str:
    """A key without the wrapper prefixes training code adds (nn.DataParallel's 'module.')."""
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                assign: bool = False) -> nn.Module:
    """load_state_dict(strict=True), but a mismatch names the keys and shapes and what to do about it.

    With `assign` the file's tensors become the parameters (for a net built on the meta device).
    """
    own = module.state_dict()
    state_dict = {**{k: torch.zeros((), dtype=torch.long) for k in own if k.endswith(OPTIONAL_SUFFIXES)},
                  **state_dict}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs net {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        raise KeyError(f"{source} does not fit {type(module).__name__}: missing {missing[:8]} "
                       f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), shapes {wrong[:4]}; "
                       f"the file is another network or truncated: delete it and download it again")
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)
    return module


def build(factory: Callable[[], nn.Module], filename: str, device: str | torch.device,
          offline: bool | None = None) -> nn.Module:
    """The net from `factory`, its weights from the manifest file `filename`, in eval mode, fp32, on `device`."""
    return load_file(factory, resolve_weight(filename, offline=offline), device)


def load_file(factory: Callable[[], nn.Module], path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """The net from `factory` with the weights in `path` (strict), in eval mode, fp32, on `device`."""
    path = Path(path)
    net = skeleton(factory)  # no random init of weights about to be replaced
    with reading(path):
        state_dict = read_state_dict(path)
    net = load_strict(net, state_dict, path.name, assign=True)
    logger.info("loaded %s into %s", path, type(net).__name__)
    return net.float().eval().requires_grad_(False).to(device)


def device_of(module: nn.Module) -> torch.device:
    """Where a net's weights are (the host may have moved it since it was loaded)."""
    return next(module.parameters()).device


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of a net's weights (the host may have cast it)."""
    return next(module.parameters()).dtype


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 0..255 on `device`."""
    if batch.ndim != 4 or batch.dtype != np.uint8:
        raise ValueError(f"expected an (N, H, W, C) uint8 batch, got {batch.dtype} {batch.shape}")
    return torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float()


def to_uint8_maps(maps: torch.Tensor) -> np.ndarray:
    """(N, 1 or 3, H, W) float 0..1 -> (N, H, W, 3) uint8 (grey repeated to 3 channels)."""
    maps = (maps.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()
    if maps.shape[1] == 1:
        maps = maps.expand(-1, 3, -1, -1)
    return maps.permute(0, 2, 3, 1).contiguous().numpy()


def single(batch_fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """fn for one HWC image from a batch function (AnnotatorSpec.fn next to batch_fn)."""
    def fn(image: np.ndarray, *, model: nn.Module, **params: object) -> np.ndarray:
        return batch_fn(image[None], device=device_of(model), model=model, **params)[0]

    fn.__name__ = getattr(batch_fn, "__name__", "fn").replace("_batch", "")
    fn.__doc__ = f"One image through {fn.__name__} (see its batch function)."
    return fn


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Every parameter redrawn from N(0, std) (seeded): non-trivial outputs for tests without real weights."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
