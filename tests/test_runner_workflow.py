"""A UI-format workflow runs end to end on a tiny base: files in, PNG out, ControlNet applied, CLI and errors."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from zeroconv.cli import main
from zeroconv.controlnet_model.checkpoint import save_controlnet
from zeroconv.workflow_runner import offline, run_prompt, run_workflow
from zeroconv.workflow_runner.files import HostPaths
from zeroconv.workflow_runner.graph import NodeExecutionError, PromptValidationError

from .test_runner_support import ToyBase, toy_controlnet


def _node(node_id, node_type, widgets, inputs=()):
    return {"id": node_id, "type": node_type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
            "mode": 0, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs], "outputs": [],
            "properties": {"Node name for S&R": node_type}, "widgets_values": widgets}


def _workflow(with_control: bool) -> dict:
    sampler_inputs = [("model", "MODEL", 1), ("positive", "CONDITIONING", 4 if not with_control else 20),
                      ("negative", "CONDITIONING", 5 if not with_control else 21), ("latent_image", "LATENT", 6)]
    nodes = [_node(1, "CheckpointLoaderSimple", ["toy.safetensors"]),
             _node(2, "CLIPTextEncode", ["a white square"], [("clip", "CLIP", 2)]),
             _node(3, "CLIPTextEncode", [""], [("clip", "CLIP", 3)]),
             _node(7, "EmptyLatentImage", [64, 64, 1]),
             _node(8, "KSampler", [42, "fixed", 3, 6.0, "euler", "normal", 1.0], sampler_inputs),
             _node(9, "VAEDecode", [], [("samples", "LATENT", 7), ("vae", "VAE", 8)]),
             _node(10, "SaveImage", ["toy"], [("images", "IMAGE", 9)])]
    links = [[1, 1, 0, 8, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
             [4, 2, 0, 8, 1, "CONDITIONING"], [5, 3, 0, 8, 2, "CONDITIONING"], [6, 7, 0, 8, 3, "LATENT"],
             [7, 8, 0, 9, 0, "LATENT"], [8, 1, 2, 9, 1, "VAE"], [9, 9, 0, 10, 0, "IMAGE"]]
    if with_control:
        nodes += [_node(11, "LoadImage", ["outline.png", "image"]),
                  _node(12, "ZeroConvApplyControlNet", [1.0, 0.0, 1.0, "balanced", "crop_and_resize", "none"],
                        [("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 5),
                         ("control_net", "CONTROL_NET", 11), ("image", "IMAGE", 10)]),
                  _node(13, "ZeroConvLoadControlNet", ["toy_cn.safetensors"])]
        links += [[10, 11, 0, 12, 3, "IMAGE"], [11, 13, 0, 12, 2, "CONTROL_NET"], [20, 12, 0, 8, 1, "CONDITIONING"],
                  [21, 12, 1, 8, 2, "CONDITIONING"]]
        links = [l for l in links if not (l[3] == 8 and l[0] in (4, 5))]
        links += [[4, 2, 0, 12, 0, "CONDITIONING"], [5, 3, 0, 12, 1, "CONDITIONING"]]
    return {"last_node_id": 13, "last_link_id": 21, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Folders with a dummy checkpoint and an outline image; the checkpoint loads as a ToyBase."""
    base = ToyBase()
    monkeypatch.setattr(offline, "load_base", lambda path, device="cpu": base.to(device))
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    save_controlnet(toy_controlnet(base), tmp_path / "models" / "controlnet" / "toy_cn.safetensors")
    (tmp_path / "models" / "checkpoints" / "toy.safetensors").write_bytes(b"not read")
    (tmp_path / "input").mkdir()
    outline = np.zeros((64, 64, 3), dtype=np.uint8)
    outline[16:48, 16:48] = 255
    Image.fromarray(outline).save(tmp_path / "input" / "outline.png")
    paths = HostPaths(models_dirs=(tmp_path / "models",), input_dir=tmp_path / "input",
                      output_dir=tmp_path / "out", base_dir=tmp_path)
    return base, paths, tmp_path


def _write(tmp_path, workflow, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(workflow))
    return path


def test_ui_workflow_runs_and_saves_png_with_prompt_and_workflow(world) -> None:
    base, paths, tmp_path = world
    path = _write(tmp_path, _workflow(with_control=False))
    result = run_workflow(path, paths)
    assert [p.name for p in result.saved] == ["toy_00001_.png"]
    with Image.open(result.saved[0]) as png:
        assert png.size == (64, 64)
        assert json.loads(png.text["prompt"])["8"]["class_type"] == "KSampler"
        assert json.loads(png.text["workflow"])["last_node_id"] == 13
    again = run_workflow(path, paths)
    assert again.saved[0].name == "toy_00002_.png"
    assert np.array_equal(np.array(Image.open(result.saved[0])), np.array(Image.open(again.saved[0])))
    other = run_workflow(path, paths, overrides=["8.seed=43"])
    assert not np.array_equal(np.array(Image.open(result.saved[0])), np.array(Image.open(other.saved[0])))


def test_apply_node_shares_one_control_and_changes_the_picture(world, monkeypatch) -> None:
    import os

    base, paths, tmp_path = world
    monkeypatch.delenv("ZEROCONV_CONTROLNET_DIR", raising=False)
    path = _write(tmp_path, _workflow(with_control=True))
    controlled = run_workflow(path, paths)
    positive, negative = controlled.execution.outputs["12"]
    head = positive[0][1]["control"]
    assert head is negative[0][1]["control"] and positive[0][1]["control_apply_to_uncond"] is False
    assert head.timestep_percent_range == (0.0, 1.0) and controlled.saved
    assert "ZEROCONV_CONTROLNET_DIR" not in os.environ  # the run's folders reach the loader without a side channel
    off = run_workflow(path, paths, overrides=["12.strength=0.0"])
    assert off.execution.outputs["12"][0][0][1].get("control") is None  # strength 0 returns the inputs
    plain = run_workflow(_write(tmp_path, _workflow(with_control=False), "plain.json"), paths)
    latent = controlled.execution.outputs["8"][0]["samples"]
    assert not torch.allclose(latent, off.execution.outputs["8"][0]["samples"])
    assert torch.allclose(off.execution.outputs["8"][0]["samples"], plain.execution.outputs["8"][0]["samples"])


def test_controlnet_dir_reaches_the_pack_loader(world) -> None:
    base, paths, tmp_path = world
    (tmp_path / "cn").mkdir()
    (tmp_path / "models" / "controlnet" / "toy_cn.safetensors").rename(tmp_path / "cn" / "lines.safetensors")
    workflow = _workflow(with_control=True)
    workflow["nodes"][-1]["widgets_values"] = ["lines.safetensors"]
    result = run_workflow(_write(tmp_path, workflow), replace(paths, controlnet_dir=tmp_path / "cn"))
    assert result.saved and result.execution.outputs["12"][0][0][1]["control"].parts[0].name == "lines.safetensors"


def test_bad_inputs_object_and_links_to_missing_nodes_are_named(world) -> None:
    base, paths, tmp_path = world
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": [64, 64, 1]}}
    with pytest.raises(ValueError, match=r"node 1 \(EmptyLatentImage\): 'inputs' must be an object"):
        run_prompt(prompt, paths)
    prompt = {"1": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}}}
    with pytest.raises(ValueError, match=r"node 1 \(VAEDecode\): input 'samples' links to node 9"):
        run_prompt(prompt, paths)
    workflow = _workflow(with_control=False)
    workflow["links"] = [link for link in workflow["links"] if link[0] != 7]  # KSampler -> VAEDecode is gone
    with pytest.raises(ValueError, match=r"node 9 \(VAEDecode\): input 'samples' is connected to a missing node"):
        run_workflow(_write(tmp_path, workflow), paths)
    workflow = _workflow(with_control=False)
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] != 7]  # EmptyLatentImage deleted, link kept
    with pytest.raises(ValueError, match=r"node 8 \(KSampler\): input 'latent_image' is connected to a missing"):
        run_workflow(_write(tmp_path, workflow), paths)


def test_cli_subcommand_prints_written_files(world, capsys) -> None:
    base, paths, tmp_path = world
    path = _write(tmp_path, _workflow(with_control=False))
    assert main(["run", str(path), "--models-dir", str(tmp_path / "models"), "--input-dir", str(tmp_path / "input"),
                 "--output-dir", str(tmp_path / "cli"), "--set", "KSampler.steps=2", "--set",
                 "10.filename_prefix=sub/shot"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [str(tmp_path / "cli" / "sub" / "shot_00001_.png")]
    assert main(["run", str(path), "--models-dir", str(tmp_path / "models"), "--set", "8.steps=0"]) == 2
    assert "node 8 (KSampler): Value 0 smaller than min of 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", str(path), "--device", "cuda:7"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_errors_name_the_node_and_the_fix(world) -> None:
    base, paths, tmp_path = world
    workflow = _workflow(with_control=True)
    workflow["nodes"][7]["widgets_values"] = ["missing.png", "image"]
    with pytest.raises(PromptValidationError, match=r"node 11 \(LoadImage\).*missing.png"):
        run_workflow(_write(tmp_path, workflow), paths)
    workflow = _workflow(with_control=False)
    workflow["nodes"][0]["widgets_values"] = ["absent.safetensors"]
    with pytest.raises(PromptValidationError, match=r"node 1 \(CheckpointLoaderSimple\).*--models-dir"):
        run_workflow(_write(tmp_path, workflow), paths)
    workflow["nodes"][0]["widgets_values"] = ["toy.safetensors"]
    workflow["nodes"][6]["widgets_values"] = ["../escape"]
    with pytest.raises(NodeExecutionError, match=r"node 10 \(SaveImage\).*outside the output folder"):
        run_workflow(_write(tmp_path, workflow), paths)


def test_checkpoint_by_path_and_hf_spec(world, monkeypatch) -> None:
    base, paths, tmp_path = world
    from zeroconv.workflow_runner import files

    path = str(tmp_path / "models" / "checkpoints" / "toy.safetensors")
    assert offline.CheckpointLoaderSimple.VALIDATE_INPUTS(path) is True
    fetched = []
    monkeypatch.setattr("huggingface_hub.hf_hub_download",
                        lambda repo_id, filename: fetched.append((repo_id, filename)) or path)
    assert files.resolve_model("checkpoints", "hf://owner/repo/sub/model.safetensors", paths) == files.Path(path)
    assert fetched == [("owner/repo", "sub/model.safetensors")]
    with pytest.raises(ValueError, match="hf://OWNER/REPO/FILE"):
        files.resolve_model("checkpoints", "hf://owner/model.safetensors", paths)


def test_comfyui_is_found_by_comfyui_path_and_asking_for_it_without_one_is_an_error(world, monkeypatch) -> None:
    from zeroconv.nodes.host import comfyui_root

    base, paths, tmp_path = world
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert comfyui_root() is None
    with pytest.raises(ValueError, match="no ComfyUI found"):
        run_workflow(_write(tmp_path, _workflow(with_control=False)), paths, host="comfyui")
    (tmp_path / "ComfyUI" / "comfy").mkdir(parents=True)
    (tmp_path / "ComfyUI" / "comfy" / "controlnet.py").write_text("")
    (tmp_path / "ComfyUI" / "execution.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    assert comfyui_root() == tmp_path / "ComfyUI"
