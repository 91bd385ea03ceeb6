"""UI-format workflows become the API prompt ComfyUI's frontend would queue."""
from __future__ import annotations

import json

import pytest

from zeroconv.workflow_runner.offline import CORE_NODE_CLASS_MAPPINGS
from zeroconv.workflow_runner.graph import apply_overrides, is_ui_format, load_workflow, ui_to_api

REGISTRY = CORE_NODE_CLASS_MAPPINGS


def _node(node_id, node_type, widgets=(), inputs=(), mode=0, title=None, outputs=()):
    node = {"id": node_id, "type": node_type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
            "mode": mode, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
            "properties": {"Node name for S&R": node_type}, "widgets_values": list(widgets)}
    if title:
        node["title"] = title
    return node


def _workflow(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max([l[0] for l in links] or [0]),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _basic():
    nodes = [
        _node(4, "CheckpointLoaderSimple", ["model.safetensors"], outputs=("MODEL", "CLIP", "VAE")),
        _node(6, "CLIPTextEncode", ["a cat"], [("clip", "CLIP", 3)], outputs=("CONDITIONING",)),
        _node(7, "CLIPTextEncode", [""], [("clip", "CLIP", 5)], outputs=("CONDITIONING",)),
        _node(5, "EmptyLatentImage", [64, 48, 2], outputs=("LATENT",)),
        _node(3, "KSampler", [123, "randomize", 4, 6.5, "euler", "karras", 0.75],
              [("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
               ("latent_image", "LATENT", 2)], outputs=("LATENT",)),
        _node(8, "VAEDecode", [], [("samples", "LATENT", 7), ("vae", "VAE", 8)], outputs=("IMAGE",)),
        _node(9, "SaveImage", ["demo"], [("images", "IMAGE", 9)]),
        _node(10, "Note", ["this is a note"]),
        _node(11, "LoadImage", ["outline.png", "image"], outputs=("IMAGE", "MASK")),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [3, 4, 1, 6, 0, "CLIP"], [5, 4, 1, 7, 0, "CLIP"], [2, 5, 0, 3, 3, "LATENT"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"],
             [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]
    return _workflow(nodes, links)


def test_widgets_map_positionally_and_skip_frontend_only_values() -> None:
    prompt = ui_to_api(_basic(), REGISTRY)
    assert prompt["3"]["inputs"] == {"seed": 123, "steps": 4, "cfg": 6.5, "sampler_name": "euler",
                                     "scheduler": "karras", "denoise": 0.75, "model": ["4", 0],
                                     "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert prompt["5"]["inputs"] == {"width": 64, "height": 48, "batch_size": 2}
    assert prompt["11"]["inputs"] == {"image": "outline.png"}  # the upload button's "image" is dropped
    assert prompt["6"]["inputs"] == {"text": "a cat", "clip": ["4", 1]}
    assert prompt["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    assert "10" not in prompt and prompt["9"]["class_type"] == "SaveImage"
    assert prompt["3"]["_meta"]["title"] == "KSampler"


def test_seed_without_control_value_and_missing_trailing_widgets() -> None:
    workflow = _basic()
    workflow["nodes"][4]["widgets_values"] = [7, 4, 6.5, "euler", "karras"]  # no control value, no denoise
    inputs = ui_to_api(workflow, REGISTRY)["3"]["inputs"]
    assert (inputs["seed"], inputs["steps"], inputs["scheduler"], inputs["denoise"]) == (7, 4, "karras", 1.0)


def test_linked_widget_reroute_primitive_muted_and_bypassed_nodes() -> None:
    workflow = _basic()
    nodes, links = workflow["nodes"], workflow["links"]
    nodes.append(_node(20, "PrimitiveNode", [99, "fixed"], outputs=("INT",)))
    nodes[4]["inputs"].append({"name": "seed", "type": "INT", "link": 20, "widget": {"name": "seed"}})
    links.append([20, 20, 0, 3, 4, "INT"])
    nodes.append(_node(21, "Reroute", [], [("", "*", 21)], outputs=("*",)))
    links.append([21, 4, 2, 21, 0, "VAE"])
    nodes[5]["inputs"][1]["link"] = 22
    links.append([22, 21, 0, 8, 1, "VAE"])
    nodes.append(_node(22, "VAEDecode", [], [("samples", "LATENT", 23), ("vae", "VAE", 24)], mode=4))
    links += [[23, 3, 0, 22, 0, "LATENT"], [24, 4, 2, 22, 1, "VAE"], [25, 22, 0, 9, 0, "IMAGE"]]
    nodes.append(_node(23, "EmptyLatentImage", [8, 8, 1], mode=2))
    prompt = ui_to_api(workflow, REGISTRY)
    assert prompt["3"]["inputs"]["seed"] == 99
    assert prompt["8"]["inputs"]["vae"] == ["4", 2]
    assert "22" not in prompt and "23" not in prompt and "21" not in prompt and "20" not in prompt
    nodes[6]["inputs"][0]["link"] = 25  # SaveImage now fed through the bypassed decode: it passes nothing typed IMAGE
    assert "images" not in ui_to_api(workflow, REGISTRY)["9"]["inputs"]


def test_link_objects_of_schema_1_and_dict_widgets() -> None:
    workflow = _basic()
    workflow["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), l))
                         for l in workflow["links"]]
    workflow["nodes"][3]["widgets_values"] = {"width": 32, "height": 32, "batch_size": 1}
    prompt = ui_to_api(workflow, REGISTRY)
    assert prompt["3"]["inputs"]["model"] == ["4", 0] and prompt["5"]["inputs"]["width"] == 32


def test_unknown_node_type_and_subgraphs_are_named() -> None:
    workflow = _basic()
    workflow["nodes"].append(_node(30, "SomeoneElsesNode", [1]))
    with pytest.raises(ValueError, match="node 30: node type 'SomeoneElsesNode' does not exist"):
        ui_to_api(workflow, REGISTRY)
    with pytest.raises(ValueError, match="subgraphs"):
        ui_to_api({**_basic(), "definitions": {"subgraphs": [{"id": "x"}]}}, REGISTRY)


def test_load_workflow_reads_both_formats(tmp_path) -> None:
    ui_path, api_path = tmp_path / "ui.json", tmp_path / "api.json"
    ui_path.write_text(json.dumps(_basic()))
    prompt, workflow = load_workflow(ui_path, REGISTRY)
    assert is_ui_format(workflow) and prompt["3"]["class_type"] == "KSampler"
    api_path.write_text(json.dumps({"prompt": prompt}))
    again, none = load_workflow(api_path, REGISTRY)
    assert again == prompt and none is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="neither a UI workflow"):
        load_workflow(tmp_path / "bad.json", REGISTRY)
    with pytest.raises(FileNotFoundError):
        load_workflow(tmp_path / "missing.json", REGISTRY)


def test_overrides_by_id_title_or_class_type() -> None:
    prompt = ui_to_api(_basic(), REGISTRY)
    out = apply_overrides(prompt, ["3.seed=5", "KSampler.steps=2", "9.filename_prefix=run/one", "6.text=a dog"])
    assert out["3"]["inputs"]["seed"] == 5 and out["3"]["inputs"]["steps"] == 2
    assert out["9"]["inputs"]["filename_prefix"] == "run/one" and out["6"]["inputs"]["text"] == "a dog"
    assert prompt["3"]["inputs"]["seed"] == 123  # the original is untouched
    with pytest.raises(ValueError, match="matches nodes"):
        apply_overrides(prompt, ["CLIPTextEncode.text=x"])
    with pytest.raises(ValueError, match="NODE.INPUT=VALUE"):
        apply_overrides(prompt, ["seed=5"])
