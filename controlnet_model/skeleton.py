"""Modules built as skeletons for a load: on the meta device, without running their random initialisation.

Building on the meta device allocates nothing, but each layer's reset_parameters still calls torch.nn.init's
initialisers, which on meta tensors run through torch's decompositions: for a full-size SD1.5 ControlNet that is
about half of the build (bench/bench_load.py measures the whole load). A load replaces every one of those
weights, so `skeleton` skips the initialisers for meta tensors while it builds, as transformers'
`no_init_weights` (transformers/modeling_utils.py) does for its models. Tensors on a real device, e.g. a module
another thread builds meanwhile, are initialised as usual.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
_LOCK = threading.RLock()  # re-entrant: a factory may build a skeleton of a part


def skeleton(factory: Callable[[], M]) -> M:
    """factory() on the meta device, its initialisers skipped: names, shapes and dtypes only, to be loaded with
    `load_state_dict(..., assign=True)`."""
    with _LOCK:
        saved = {name: getattr(nn.init, name) for name in INITIALISERS if hasattr(nn.init, name)}
        for name, initialiser in saved.items():
            setattr(nn.init, name, _skipped_on_meta(initialiser))
        try:
            with torch.device("meta"):
                return factory()
        finally:
            for name, initialiser in saved.items():
                setattr(nn.init, name, initialiser)


def _skipped_on_meta(initialiser: Callable) -> Callable:
    @functools.wraps(initialiser)
    def maybe(tensor: torch.Tensor, *args, **kwargs):
        return tensor if tensor.is_meta else initialiser(tensor, *args, **kwargs)
    return maybe
