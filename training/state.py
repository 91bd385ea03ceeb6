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

from ..controlnet_model.atomic import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

POINTER = "latest.json"


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))




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

    def latest(self) -> CheckpointPaths | None:
        pointer = self.folder / POINTER
        if not pointer.is_file():
            return None
        try:
            step = int(json.loads(pointer.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{pointer} is damaged ({exc}); delete it and set resume to a state-step*.pt file") from None
        paths = self.paths(step)
        if not (paths.weights.is_file() and paths.state.is_file()):
            raise FileNotFoundError(f"{pointer} names step {step} but its files are missing; set resume to another "
                                    "state-step*.pt file or 'never'")
        return paths

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

    def remove_stale_temps(self) -> list[Path]:
        """Temp files of writes cut short by a killed process (never a named checkpoint)."""
        stale = sorted(self.folder.glob(".*.tmp")) if self.folder.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


def load_state(path: Path) -> dict[str, Any]:
    """A training-state file: plain containers and tensors only, so it loads with weights_only=True."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"training state {path} is unreadable ({exc}); resume from an older state-step*.pt") from None
