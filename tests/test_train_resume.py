"""Resume after SIGKILL continues the same loss curve; saves are atomic (no partial file under a real name)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zeroconv.training.config import TrainConfig, default_config_text
from zeroconv.training.loop import train
from zeroconv.training.state import CheckpointFolder, atomic_write_text
from .tiny_base import write_tiny_fill50k, write_tiny_sd_checkpoint

MAX_STEPS = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, out: Path) -> TrainConfig:
    base = write_tiny_sd_checkpoint(tmp_path / "base.safetensors", "SD1.x", seed=2)
    data = write_tiny_fill50k(tmp_path / "fill", count=6, size=32, seed=2)
    return TrainConfig(base=str(base), data=str(data), resolution=32, batch_size=2, lr=1e-3, max_steps=MAX_STEPS,
                       save_every=2, keep_checkpoints=2, validate_every=0, num_workers=0, output_dir=str(out),
                       sample_steps=2, num_validation_conditions=1, export_diffusers=False, log_every=0, seed=5)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_resume_after_sigkill_continues_the_same_loss_curve(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cfg = _config(tmp_path, out)
    config_file = tmp_path / "train.toml"
    config_file.write_text(default_config_text(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "zeroconv", "train", str(config_file)], env=_subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    folder = CheckpointFolder(out)
    saved = folder.latest()
    assert saved is not None and 4 <= saved.step < MAX_STEPS
    for weights in folder.folder.glob("controlnet-step*.safetensors"):  # every named file is complete
        assert load_file(str(weights))
    resumed = train(cfg)  # resume = "auto": latest checkpoint in output_dir
    assert not list(folder.folder.glob(".*.tmp"))
    unbroken = train(cfg.replace(output_dir=str(tmp_path / "unbroken")))
    diff = max(abs(a - b) for a, b in zip(resumed.loss_history, unbroken.loss_history))
    assert len(resumed.loss_history) == MAX_STEPS and diff < 1e-6  # measured 0.0 (bit-identical)
    a, b = load_file(str(resumed.checkpoint)), load_file(str(unbroken.checkpoint))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "latest.json"
    atomic_write_text(target, "old")

    def crash(src: str, dst: str) -> None:
        raise OSError("killed mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["latest.json"]
