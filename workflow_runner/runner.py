"""Run a workflow file headless: load, convert, override, validate, execute, and report the files written.

Where a ComfyUI is present (the one the pack is installed in, or COMFYUI_PATH) the prompt runs on ComfyUI's own
executor and node classes (nodes/host/comfyui.py); otherwise on `graph.py`'s executor with the pack's nodes and
the few core node ids of `offline.py`. Both get the same UI-format conversion, `--set` overrides, file look-ups
and validation messages.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..nodes.host import comfyui_root, folders
from . import files
from .graph import ExecutionResult, Prompt, PromptValidationError, apply_overrides, check_structure, \
    execute_prompt, load_workflow, validate_prompt
from .offline import CORE_NODE_CLASS_MAPPINGS

logger = logging.getLogger(__name__)
HOSTS = ("auto", "comfyui", "zeroconv")


def default_registry() -> dict[str, type]:
    """Without ComfyUI: the core node ids the shipped workflows use, then the pack's nodes."""
    from ..nodes import NODE_CLASS_MAPPINGS as PACK_NODES

    return {**PACK_NODES, **CORE_NODE_CLASS_MAPPINGS}


@dataclass
class RunResult:
    """A finished run: the prompt that ran, what each output node reported, and the files it wrote."""

    prompt: Prompt
    execution: ExecutionResult
    saved: list[Path] = field(default_factory=list)


def _written_files(ui: dict[str, dict], where: dict[str, Path]) -> list[Path]:
    return [where[item["type"]] / item.get("subfolder", "") / item["filename"]
            for node_ui in ui.values() for items in node_ui.values() for item in items
            if isinstance(item, dict) and item.get("type") in where and "filename" in item]


def _comfyui(host: str, registry: Mapping[str, type] | None, device: str) -> Any:
    """nodes.host.comfyui entered for this run, or None to run offline (a given registry always runs offline)."""
    if host not in HOSTS:
        raise ValueError(f"host {host!r}: choose one of {HOSTS}")
    root = comfyui_root() if host != "zeroconv" and registry is None else None
    if host == "comfyui" and registry is None and root is None:
        raise ValueError("no ComfyUI found: install the pack in ComfyUI/custom_nodes or set COMFYUI_PATH")
    if root is None:
        return None
    from ..nodes.host import comfyui

    comfyui.enter(root, device)
    return comfyui


def run_prompt(prompt: Prompt, paths: files.HostPaths, registry: Mapping[str, type] | None = None,
               workflow: dict | None = None, overrides: list[str] | tuple[str, ...] = (),
               host: str = "zeroconv") -> RunResult:
    """Validate and execute an API prompt with the given folders; the UI workflow, if any, is embedded in PNGs."""
    prompt = apply_overrides(prompt, list(overrides))
    check_structure(prompt)
    extra_pnginfo = {"workflow": workflow} if workflow is not None else None
    comfyui = _comfyui(host, registry, paths.device)
    if comfyui is not None:
        comfyui.use_folders(list(paths.models_dirs), paths.controlnet_dir, paths.input_dir, paths.output_dir)
        ui, node_errors, error = comfyui.run_prompt(prompt, extra_pnginfo)
        if node_errors is not None:
            raise PromptValidationError(error, node_errors)
        if error is not None:
            raise RuntimeError(error)
        return RunResult(prompt, ExecutionResult(ui, {}), _written_files(ui, comfyui.folders()))
    registry = dict(registry or default_registry())
    with files.using(paths), folders.extra_folders(controlnet=paths.search_dirs("controlnet"),
                                                   checkpoints=paths.search_dirs("checkpoints")):
        outputs = validate_prompt(prompt, registry)
        execution = execute_prompt(prompt, registry, outputs, extra_pnginfo)
    where = {"output": paths.output_dir, "temp": paths.temp_dir, "input": paths.input_dir}
    return RunResult(prompt, execution, _written_files(execution.ui, where))


def run_workflow(path: str | Path, paths: files.HostPaths | None = None, registry: Mapping[str, type] | None = None,
                 overrides: list[str] | tuple[str, ...] = (), host: str = "zeroconv") -> RunResult:
    """Run a UI- or API-format workflow file; relative paths inside it also resolve next to the file.

    host: 'zeroconv' (offline, the default here), 'comfyui' (ComfyUI's executor), or 'auto' (ComfyUI when found).
    """
    path = Path(path)
    paths = paths or files.HostPaths(base_dir=path.resolve().parent)
    comfyui = _comfyui(host, registry, paths.device)
    with files.using(paths), folders.extra_folders(controlnet=paths.search_dirs("controlnet")):
        prompt, workflow = load_workflow(path, comfyui.node_classes() if comfyui else registry or default_registry())
    logger.debug("API prompt: %s", json.dumps(prompt, default=str))
    return run_prompt(prompt, paths, registry, workflow, overrides, host="comfyui" if comfyui else "zeroconv")
