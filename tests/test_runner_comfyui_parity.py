"""In a real ComfyUI: `zeroconv run` executes on ComfyUI's own executor, with our validation messages, and the
offline runner's core nodes keep ComfyUI's input layouts (so UI files map the same way in both).

Skips unless COMFYUI_PATH names a ComfyUI checkout (COMFYUI_PYTHON: an interpreter with its requirements).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from .comfyui_host import REPO, REQUIRES_COMFYUI, run_cli_in_comfyui, run_in_comfyui

pytestmark = REQUIRES_COMFYUI
WORKFLOW = REPO / "workflows" / "demo_world.json"


def test_zeroconv_run_executes_on_comfyui_and_names_bad_inputs(tmp_path: Path) -> None:
    common = [str(WORKFLOW), "--host", "comfyui", "--input-dir", str(WORKFLOW.parent / "inputs"),
              "--output-dir", str(tmp_path)]
    done = run_cli_in_comfyui(["run", *common, "--set", "KSampler.steps=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    saved = [Path(line) for line in done.stdout.splitlines() if line.endswith(".png")]
    assert len(saved) == 1 and saved[0].parent == tmp_path
    with Image.open(saved[0]) as png:
        assert png.size == (64, 64) and "KSampler" in png.text["prompt"]  # ComfyUI's SaveImage embeds the prompt
    bad = run_cli_in_comfyui(["run", *common, "--set", "KSampler.steps=0"])
    assert bad.returncode == 2 and "node 8 (KSampler)" in bad.stderr and "smaller than min" in bad.stderr, bad.stderr


LAYOUT = textwrap.dedent("""
    import json
    import nodes
    from zeroconv_pack.workflow_runner.offline import CORE_NODE_CLASS_MAPPINGS
    from zeroconv_pack.workflow_runner.graph import declared_inputs, is_combo, spec_options, spec_type

    KEYS = ("default", "min", "max", "step", "round", "control_after_generate", "image_upload", "forceInput",
            "multiline", "dynamicPrompts")

    def layout(cls):
        inputs = [(name, required, "COMBO" if is_combo(spec) else spec_type(spec),
                   {k: spec_options(spec)[k] for k in KEYS if k in spec_options(spec)})
                  for name, spec, required in declared_inputs(cls)]
        return [inputs, list(cls.RETURN_TYPES), bool(getattr(cls, "OUTPUT_NODE", False)),
                cls.INPUT_TYPES().get("hidden")]

    def combos(cls):
        return {name: list(spec[0]) for name, spec, _ in declared_inputs(cls) if name in ("sampler_name", "scheduler")}

    report = {}
    for node_id, ours in CORE_NODE_CLASS_MAPPINGS.items():
        theirs = nodes.NODE_CLASS_MAPPINGS[node_id]
        report[node_id] = {"same": layout(ours) == layout(theirs),
                           "subset": all(set(v) <= set(combos(theirs)[k]) for k, v in combos(ours).items())}
    print(json.dumps(report))
""")


def test_offline_core_nodes_have_comfyui_layouts() -> None:
    report = run_in_comfyui(LAYOUT, timeout=300)
    assert report and all(r == {"same": True, "subset": True} for r in report.values()), report
