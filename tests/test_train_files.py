"""What a training run reads and writes: every path and number checked before the first step, damaged checkpoints
named on resume, written files with ordinary permissions and no temp file left by a kill, the curve refreshed at
each validation, and plain log lines when the log is not a terminal."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zeroconv.controlnet_model.atomic import (STALE_TEMP, atomic_save_safetensors, atomic_torch_save,
                                              atomic_write_text, remove_stale_temps)
from zeroconv.controlnet_model.checkpoint import load_controlnet
from zeroconv.training import loop
from zeroconv.training.config import TrainConfig, default_config_text
from zeroconv.training.state import CheckpointFolder

from .conftest import tiny_training_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_training_files(tmp_path_factory.mktemp("tiny"), seed=0, count=6, size=32)


def _cfg(files: dict[str, Path], out: Path, **changes) -> TrainConfig:
    values = dict(base=str(files["base"]), data=str(files["data"]), resolution=32, batch_size=2, lr=1e-3,
                  max_steps=4, save_every=2, validate_every=0, num_workers=0, output_dir=str(out), sample_steps=2,
                  num_validation_conditions=1, export_diffusers=False, log_every=0, seed=3)
    return TrainConfig(**{**values, **changes})


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if STALE_TEMP.match(p.name))


# ---- config and paths, before anything is loaded ------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("lr", math.nan), ("lr", math.inf), ("unlock_lr", 0.0), ("weight_decay", -1.0), ("adam_eps", 0.0),
    ("adam_betas", (0.9, 1.0)), ("adam_betas", (math.nan, 0.9)), ("max_grad_norm", -1.0), ("cfg_scale", math.nan),
    ("caption_dropout", math.nan), ("ema_decay", math.nan), ("seed", -1), ("output_name", "a/b"),
    ("num_validation_conditions", 0), ("output_dir", "")])
def test_every_numeric_field_out_of_range_or_nan_is_refused_naming_it(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Path errors must come before the base is loaded (or anything else is built)."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded the base before checking the paths")

    monkeypatch.setattr(loop, "load_base", refuse)


def test_an_output_dir_that_is_a_file_is_refused_before_the_first_step(files, tmp_path: Path, no_loading) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(ValueError, match="output_dir.*existing file"):
        loop.train(_cfg(files, out))
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "checkpoints").write_text("")
    with pytest.raises(ValueError, match="output_dir.*checkpoints is an existing file"):
        loop.train(_cfg(files, tmp_path / "out2"))


@pytest.mark.parametrize("field", ["base", "data", "controlnet_init", "validation_conditions", "resume"])
def test_a_missing_input_path_is_refused_naming_its_field(files, tmp_path: Path, no_loading, field: str) -> None:
    missing = str(tmp_path / "nowhere.safetensors")
    value = (missing,) if field == "validation_conditions" else missing
    with pytest.raises(FileNotFoundError, match=field):
        loop.train(_cfg(files, tmp_path / "out", **{field: value}))


# ---- written files -------------------------------------------------------------------------------------------
def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        written = [atomic_save_safetensors({"w": torch.ones(3)}, tmp_path / "a.safetensors", {"k": "v"}),
                   atomic_torch_save({"x": 1}, tmp_path / "b.pt"), atomic_write_text(tmp_path / "c.json", "{}")]
        os.umask(0o027)
        written.append(atomic_save_safetensors({"w": torch.ones(3)}, tmp_path / "d.safetensors"))
    finally:
        os.umask(old)
    modes = [oct(p.stat().st_mode & 0o777) for p in written]
    assert modes == ["0o644", "0o644", "0o644", "0o640"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt", "c.json", "d.safetensors"]


def test_stale_temps_of_ours_and_of_safetensors_are_removed_and_nothing_else(tmp_path: Path) -> None:
    names = [".controlnet-step0000004.safetensors.k2j3_x9a.tmp", ".tmpAb3dE9", "controlnet.safetensors",
             ".hidden", "notes.tmp", ".tmpshort"]
    for name in names:
        (tmp_path / name).write_text("")
    removed = sorted(p.name for p in remove_stale_temps(tmp_path))
    assert removed == [".controlnet-step0000004.safetensors.k2j3_x9a.tmp", ".tmpAb3dE9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", ".tmpshort", "controlnet.safetensors",
                                                          "notes.tmp"]


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import zeroconv.controlnet_model.safetensors_io as io
    real, calls = io.write_safetensors, []

    def dying(path, tensors, metadata=None):  # the second checkpoint's weights: half written, then SIGKILL
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\\0" * 4096)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, tensors, metadata)

    io.write_safetensors = dying
    from zeroconv.training.config import TrainConfig
    from zeroconv.training.loop import train
    train(TrainConfig.from_file(sys.argv[1]))
""")


def test_sigkill_during_a_save_leaves_no_temp_after_resume(files, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(files, out, max_steps=6)
    config = tmp_path / "train.toml"
    config.write_text(default_config_text(cfg))
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(config)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert len(_temps(out / "checkpoints")) == 1  # the killed write's temp, which the resume must clear
    (out / ".tmpAb3dE9").write_bytes(b"\0" * 64)  # what safetensors' own save_file used to leave beside outputs
    assert CheckpointFolder(out).latest().step == 2
    resumed = loop.train(cfg)
    assert _temps(out) == []
    assert len(resumed.loss_history) == 6
    assert load_controlnet(resumed.checkpoint).model is not None


# ---- resume from damaged files -------------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["weights", "state"])
def test_a_truncated_checkpoint_is_named_and_deleting_it_resumes_from_the_previous(files, tmp_path: Path,
                                                                                   damaged: str) -> None:
    out = tmp_path / "run"
    loop.train(_cfg(files, out))
    folder = CheckpointFolder(out)
    newest = folder.latest()
    assert newest.step == 4
    path = newest.weights if damaged == "weights" else newest.state
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path.name} is damaged.*Delete it and .*previous checkpoint"):
        loop.train(_cfg(files, out, max_steps=6))
    newest.weights.unlink()
    newest.state.unlink()
    assert folder.latest().step == 2  # latest.json still names step 4: the newest complete pair is used
    assert len(loop.train(_cfg(files, out, max_steps=6)).loss_history) == 6


# ---- curve and log ---------------------------------------------------------------------------------------------
def test_history_is_refreshed_at_each_validation_and_log_lines_stay_plain(files, tmp_path: Path,
                                                                          capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    seen = {}

    def progress(step: int, total: int, info: dict) -> None:
        if (out / "history.json").is_file():
            seen[step] = json.loads((out / "history.json").read_text())["step"]

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    logging.getLogger("zeroconv").addHandler(handler)
    logging.getLogger("zeroconv").setLevel(logging.INFO)
    try:
        loop.train(_cfg(files, out, save_every=0, validate_every=2, log_every=1), progress)
    finally:
        logging.getLogger("zeroconv").removeHandler(handler)
    assert seen == {2: 2, 3: 2, 4: 4}  # no checkpoint before the end: the validation at step 2 wrote it
    err = capfd.readouterr().err
    assert "\r" not in err and "step/s" not in err and "training:" not in err
    steps = [line for line in err.splitlines() if line.startswith("LOG step ")]
    assert [line.split()[2] for line in steps] == ["1/4", "2/4", "3/4", "4/4"]
