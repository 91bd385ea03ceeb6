"""Resumable checkpoints: ControlNet weights (native file) + training state, written atomically.

A save writes `checkpoints/controlnet-step<N>.safetensors` (loads anywhere a ControlNet loads) and
`checkpoints/state-step<N>.pt` (optimiser, EMA, gradient scaler, RNG states, step, config, histories), each
to a temp file that is fsynced and renamed; then `checkpoints/latest.json` is replaced to name the pair. A
process killed at any moment leaves the previous pair and pointer intact (nanoGPT's checkpoint dict, made
crash-safe).
"""
from __future__ import annotations

import json
import logging
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..controlnet_model.atomic import atomic_write_text

logger = logging.getLogger(__name__)

POINTER = "latest.json"


# ---- RNG states ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the checkpoint folder ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointPaths:
    weights: Path
    state: Path
    step: int


class CheckpointFolder:
    """`output_dir/checkpoints`: numbered pairs and the pointer to the newest complete one."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir) / "checkpoints"

    def paths(self, step: int) -> CheckpointPaths:
        return CheckpointPaths(self.folder / f"controlnet-step{step:07d}.safetensors",
                               self.folder / f"state-step{step:07d}.pt", step)

    def complete_steps(self) -> list[int]:
        """Steps whose weights and state files are both on disk, oldest first."""
        if not self.folder.is_dir():
            return []
        steps = []
        for p in self.folder.glob("state-step*.pt"):
            try:
                step = int(p.stem[len("state-step"):])
            except ValueError:
                continue
            if self.paths(step).weights.is_file():
                steps.append(step)
        return sorted(steps)

    def latest(self) -> CheckpointPaths | None:
        """The pair latest.json names; if it is missing or names deleted files, the newest complete pair.

        Each file of a pair is written atomically before the pointer, so any pair on disk is complete; deleting
        a damaged newest pair therefore resumes from the one before it.
        """
        pointer = self.folder / POINTER
        steps = self.complete_steps()
        if pointer.is_file():
            try:
                step = int(json.loads(pointer.read_text())["step"])
            except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
                logger.warning("%s is damaged (%s); resuming from the newest checkpoint on disk", pointer, exc)
            else:
                if step in steps:
                    return self.paths(step)
                logger.warning("%s names step %d, whose files are gone; resuming from the newest checkpoint on "
                               "disk", pointer, step)
        return self.paths(steps[-1]) if steps else None

    def commit(self, paths: CheckpointPaths, keep: int) -> None:
        """Point at a fully written pair, then delete pairs beyond the newest `keep`."""
        atomic_write_text(self.folder / POINTER, json.dumps({"step": paths.step, "weights": paths.weights.name,
                                                             "state": paths.state.name}))
        steps = sorted(int(p.stem[len("state-step"):]) for p in self.folder.glob("state-step*.pt"))
        for old in steps[:-keep] if keep > 0 else []:
            if old == paths.step:
                continue
            for p in (self.paths(old).weights, self.paths(old).state):
                p.unlink(missing_ok=True)


def partner(path: Path) -> Path:
    """The other file of a checkpoint pair: state-step<N>.pt <-> controlnet-step<N>.safetensors."""
    path = Path(path)
    if path.name.startswith("state-"):
        return path.with_name(path.name.replace("state-", "controlnet-", 1)).with_suffix(".safetensors")
    return path.with_name(path.name.replace("controlnet-", "state-", 1)).with_suffix(".pt")


def _damaged(what: str, path: Path, exc: BaseException) -> ValueError:
    """One message for a checkpoint file that cannot be read: which file, and how to resume anyway."""
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return ValueError(f"{what} {path} is damaged ({type(exc).__name__}: {detail}): the write was cut short or the "
                      f"disk is faulty. Delete it and {partner(path).name} to resume from the previous checkpoint, "
                      "or set resume = 'never' to start again")


def load_state(path: Path) -> dict[str, Any]:
    """A training-state file: plain containers and tensors only, so it loads with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise _damaged("training state", Path(path), exc) from None
    missing = [k for k in ("step", "config", "optimizer", "scaler", "rng", "losses", "fidelity")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"training state {path} lacks {', '.join(missing)}; it is not a zeroconv train state "
                         "file: give a state-step*.pt from checkpoints/, or set resume = 'never'")
    return state


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ControlNet weights (a .safetensors written by save_checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint weights {path} are missing; they belong beside the state file. "
                                "Set resume to another state-step*.pt, or 'never'")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged("checkpoint weights", Path(path), exc) from None
