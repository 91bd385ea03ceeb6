"""Every shipped workflow is a well-formed ComfyUI UI workflow (schema 0.4) whose nodes all exist and convert."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from zeroconv.workflow_runner import default_registry
from zeroconv.nodes.host.folders import WEIGHT_SUFFIXES as MODEL_EXTENSIONS
from zeroconv.workflow_runner.files import IMAGE_EXTENSIONS
from zeroconv.workflow_runner.graph import (FRONTEND_ONLY_TYPES, combo_options, declared_inputs, frontend_extras,
                                            is_combo, is_widget, spec_options, ui_to_api)

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
# Required keys and their JSON types (ComfyUI_frontend src/schemas/comfyWorkflowSchema.ts, zComfyWorkflow 0.4).
WORKFLOW_KEYS = {"last_node_id": int, "last_link_id": int, "nodes": list, "links": list, "version": (int, float)}
FILE_SUFFIXES = MODEL_EXTENSIONS + IMAGE_EXTENSIONS
NODE_KEYS = {"id": int, "type": str, "pos": list, "size": list, "flags": dict, "order": int, "mode": int,
             "properties": dict}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _missing_keys(item: dict, table: dict) -> list[str]:
    return [k for k, kind in table.items() if not isinstance(item.get(k), kind)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_ui_schema_and_links_agree(path: Path) -> None:
    workflow = _load(path)
    assert _missing_keys(workflow, WORKFLOW_KEYS) == [] and workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert all(_missing_keys(n, NODE_KEYS) == [] for n in nodes.values())
    assert workflow["last_node_id"] >= max(nodes) and len(nodes) == len(workflow["nodes"])
    assert workflow["last_link_id"] >= max((link[0] for link in workflow["links"]), default=0)
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        output, socket = nodes[origin]["outputs"][slot], nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and socket["link"] == link_id, link_id
        assert output["type"] == socket["type"] == kind, link_id
    linked = {s["link"] for n in nodes.values() for s in n.get("inputs", []) if s.get("link") is not None}
    assert linked == {link[0] for link in workflow["links"]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_exist_with_their_widget_layouts(path: Path) -> None:
    registry = default_registry()
    for node in _load(path)["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        cls = registry[node["type"]]
        specs = {name: spec for name, spec, _ in declared_inputs(cls)}
        widgets = [(name, spec) for name, spec in specs.items() if is_widget(spec)]
        expected = len(widgets) + sum(1 for name, spec in widgets if frontend_extras(name, spec))
        assert len(node["widgets_values"]) == expected, (node["id"], node["type"])
        for socket in node.get("inputs", []):
            assert socket["name"] in specs, (node["id"], socket["name"])
        assert [o["type"] for o in node.get("outputs", [])] == list(cls.RETURN_TYPES), node["id"]
    assert ui_to_api(_load(path), registry)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_widget_values_are_in_range(path: Path) -> None:
    registry = default_registry()
    for node_id, node in ui_to_api(_load(path), registry).items():
        specs = {name: spec for name, spec, _ in declared_inputs(registry[node["class_type"]])}
        for name, value in node["inputs"].items():
            spec = specs[name]
            if isinstance(value, list) or not is_widget(spec):
                continue
            options = combo_options(spec) if is_combo(spec) else []
            if options and not any(str(o).endswith(FILE_SUFFIXES) for o in options):  # file pickers vary by machine
                assert value in options, (node_id, name, value)
            low, high = spec_options(spec).get("min"), spec_options(spec).get("max")
            assert (low is None or value >= low) and (high is None or value <= high), (node_id, name, value)
