"""The pack imports the way ComfyUI imports it: by path, under a mangled name, with no side effects."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_by_path_like_comfyui_without_side_effects() -> None:
    # A fresh interpreter, so modules other tests imported do not hide a missing import.
    script = textwrap.dedent(f"""
        import importlib.util, os, sys, json
        env_before = dict(os.environ); path_before = list(sys.path)
        name = {str(REPO)!r}.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, {str(REPO / "__init__.py")!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        print(json.dumps({{
            "ids": sorted(module.NODE_CLASS_MAPPINGS),
            "display": sorted(module.NODE_DISPLAY_NAME_MAPPINGS),
            "comfy": sorted(m for m in sys.modules if m == "comfy" or m.startswith("comfy.") or m == "folder_paths"),
            "env_changed": env_before != dict(os.environ),
            "path_changed": path_before != list(sys.path),
        }}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ids"], "the pack registers nodes"
    assert all(node_id.startswith("ZeroConv") for node_id in report["ids"])
    assert set(report["display"]) <= set(report["ids"])
    assert report["comfy"] == [], "importing the pack must not import ComfyUI"
    assert not report["env_changed"] and not report["path_changed"]


def test_library_packages_never_import_the_host() -> None:
    offenders = []
    for folder in ("controlnet_model", "training", "annotators", "demo"):
        for path in (REPO / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                if stripped.startswith(("import comfy", "from comfy", "import folder_paths", "from folder_paths")):
                    offenders.append(f"{path.relative_to(REPO)}: {stripped}")
    assert offenders == []


def test_node_classes_follow_the_v1_contract() -> None:
    from zeroconv import NODE_CLASS_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert isinstance(spec, dict) and "required" in spec, node_id
        assert isinstance(cls.RETURN_TYPES, tuple), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert cls.CATEGORY.startswith("ZeroConv"), node_id
