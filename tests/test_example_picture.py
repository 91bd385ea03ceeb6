"""The example picture every annotator workflow loads is shipped, is ours (drawn by workflows/make_example_picture.py)
and is where the runner looks (workflows/inputs/, next to the workflows)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def test_every_annotator_workflow_finds_its_picture_in_the_pack() -> None:
    for path in sorted(WORKFLOWS.glob("annotator_*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                assert (WORKFLOWS / "inputs" / node["widgets_values"][0]).is_file(), path.name


def test_the_shipped_example_is_what_the_generator_draws() -> None:
    import cv2

    spec = importlib.util.spec_from_file_location("make_example_picture", WORKFLOWS / "make_example_picture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = cv2.cvtColor(cv2.imread(str(WORKFLOWS / "inputs" / "example.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(shipped, module.scene())
    hole = cv2.cvtColor(cv2.imread(str(WORKFLOWS / "inputs" / "inpaint.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    assert np.array_equal(hole, module.with_hole(module.scene())) and (hole[..., 3] == 0).any()
