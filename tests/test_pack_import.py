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


HOST_MODULES = {"comfy", "folder_paths", "comfy_execution", "comfy_api", "comfy_extras", "nodes", "execution",
                "server"}  # ComfyUI's top-level modules (inside the pack, our own modules are imported relatively)
HOST_PACKAGE = ("nodes", "host")  # the only code that may import them
LIBRARY = {"controlnet_model", "training", "annotators", "demo"}


def _imports() -> list[tuple[tuple[str, ...], str, str]]:
    """(importing module's parts, 'absolute' or 'relative', imported module's top-level name) for every import
    statement of the pack, lazy ones inside functions included."""
    import ast

    found = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", "bench", "docs", "workflows") or rel.name == "install.py":
            continue
        parts = rel.with_suffix("").parts
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(parts, "absolute", alias.name.split(".")[0]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((parts, "absolute", node.module.split(".")[0]))
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - (node.level - 1)]
                target = base + tuple((node.module or "").split(".")) if node.module else base
                if not target:  # `from .. import X` at the pack's root: X is a subpackage or a root name
                    target = (node.names[0].name,)
                found.append((parts, "relative", target[0]))
    return found


def test_only_the_host_package_imports_comfyui() -> None:
    offenders = sorted({"/".join(parts) + f" imports {name}" for parts, kind, name in _imports()
                        if kind == "absolute" and name in HOST_MODULES and parts[:2] != HOST_PACKAGE})
    assert offenders == []


def test_the_library_never_imports_nodes_or_the_runner_and_nodes_never_import_the_runner() -> None:
    offenders = sorted({f"{'/'.join(parts)} imports {name}" for parts, kind, name in _imports() if kind == "relative"
                        and ((parts[0] in LIBRARY and name in ("nodes", "workflow_runner", "cli"))
                             or (parts[0] == "nodes" and name in ("workflow_runner", "cli")))})
    assert offenders == []


def test_no_import_cycles_between_subpackages() -> None:
    edges: dict[str, set[str]] = {}
    for parts, kind, name in _imports():
        if kind == "relative" and len(parts) > 1 and name != parts[0] and (REPO / name).is_dir():
            edges.setdefault(parts[0], set()).add(name)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a, targets in edges.items() for b in targets if reaches(b, a, {b}))
    assert cycles == [], edges


def test_node_classes_follow_the_v1_contract() -> None:
    from zeroconv import NODE_CLASS_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert isinstance(spec, dict) and "required" in spec, node_id
        assert isinstance(cls.RETURN_TYPES, tuple), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert cls.CATEGORY.startswith("ZeroConv"), node_id
