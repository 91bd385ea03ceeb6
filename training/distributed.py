"""One process or many (torchrun): process group, device, DDP/FSDP wrapping, and full state dicts.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; without them the run is one process and the
same config trains the same model (the data and noise of a step do not depend on the process count).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .config import Parallelism

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is there, else cpu; 'cuda' under torchrun -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available; set device = 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str) -> DistEnv:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if world > 1:
        logger.info("process %d of %d on %s", rank, world, dev)
    return DistEnv(rank, world, local_rank, dev, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(module: nn.Module, controlnet: nn.Module, env: DistEnv, parallelism: Parallelism) -> nn.Module:
    """DDP around the trainable pair, or FSDP2 shards of the ControlNet's blocks; the module itself on one process."""
    if not env.distributed:
        return module
    if parallelism is Parallelism.FSDP:
        from torch.distributed.fsdp import fully_shard

        for block in (*controlnet.input_blocks, controlnet.middle_block):
            fully_shard(block)
        fully_shard(controlnet)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    # Zero convs of disconnected links (small-scale mode) still get zero gradients, so no unused parameters.
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, controlnet: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-steps before the last of an accumulation (DDP no_sync, FSDP2 flag)."""
    if not skip:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    if hasattr(controlnet, "set_requires_gradient_sync"):
        controlnet.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            controlnet.set_requires_gradient_sync(True)
        return
    yield


def is_sharded(controlnet: nn.Module) -> bool:
    return hasattr(controlnet, "set_requires_gradient_sync")


def full_model_state(controlnet: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 weights on CPU (a collective under FSDP: every process must call it)."""
    if is_sharded(controlnet):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(controlnet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in controlnet.state_dict().items()}


def full_optimizer_state(controlnet: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if is_sharded(controlnet):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(controlnet, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_states(controlnet: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                     optim_state: dict[str, Any] | None) -> None:
    """Put full (unsharded) weights and optimiser state back, sharding them under FSDP."""
    if is_sharded(controlnet):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(controlnet, weights, options=options)
        if optim_state is not None:
            set_optimizer_state_dict(controlnet, optimizer, optim_state, options=options)
        return
    controlnet.load_state_dict(weights, strict=True)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
