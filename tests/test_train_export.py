"""What training ships: the native file (our loader, diffusers after export, equal residuals), init-controlnet,
and the ComfyUI training node run outside ComfyUI."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zeroconv.controlnet_model.checkpoint import load_controlnet, read_metadata
from zeroconv.training.config import TrainConfig
from zeroconv.training.loop import train

from .conftest import tiny_training_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_training_files(tmp_path_factory.mktemp("export"), seed=4, count=4, size=64)


def test_trained_file_loads_here_and_in_diffusers_with_equal_residuals(files: dict[str, Path], tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = TrainConfig(base=str(files["base"]), data=str(files["data"]), resolution=32, batch_size=2, lr=1e-3,
                      max_steps=2, validate_every=0, num_workers=0, output_dir=str(tmp_path), sample_steps=2,
                      num_validation_conditions=1, control_type="canny", annotator="canny", resume="never")
    result = train(cfg)
    ours = load_controlnet(result.checkpoint).model.eval()
    meta = read_metadata(result.checkpoint)
    assert (meta.control_type, meta.annotator, meta.resolution) == ("canny", "canny", 32)
    theirs = diffusers.ControlNetModel.from_pretrained(str(result.diffusers)).eval()
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 4, 4, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    t, context = torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        mine = ours(x, hint, t, context)
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert any(r.abs().max() > 0 for r in mine.down)  # two steps moved the zero convs off zero
    assert len(down) == len(mine.down)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(mine.down, down))
    assert torch.allclose(mine.mid, mid, atol=1e-5)


def test_init_controlnet_command_writes_a_fresh_copy(files: dict[str, Path], tmp_path: Path) -> None:
    from zeroconv.cli import main

    out = tmp_path / "init.safetensors"
    assert main(["init-controlnet", "--base", str(files["base"]), "--out", str(out), "--control-type", "depth"]) == 0
    state, base = load_file(str(out)), load_file(str(files["base"]))
    assert not state["middle_block_out.0.weight"].any() and not state["zero_convs.0.0.weight"].any()
    assert torch.equal(state["input_blocks.1.0.in_layers.2.weight"],
                       base["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"])
    assert read_metadata(out).control_type == "depth"


def test_training_node_runs_under_inference_mode_outside_comfyui(files: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroconv.nodes.train import NODE_CLASS_MAPPINGS

    monkeypatch.setenv("ZEROCONV_TRAIN_OUTPUT", str(tmp_path / "runs"))
    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path / "controlnet"))
    node = NODE_CLASS_MAPPINGS["ZeroConvTrainControlNet"]()
    assert "base_checkpoint" in node.INPUT_TYPES()["required"]
    with torch.inference_mode():  # as ComfyUI executes nodes
        path, curve = node.train(str(files["base"]), str(files["data"]), "none", "scribble", 2, 1e-3, 2, 1, 64,
                                 "no", False, "node_run", 0)
    assert Path(path) == tmp_path / "controlnet" / "node_run.safetensors" and Path(curve).is_file()
    assert load_controlnet(path).metadata.control_type == "scribble"
