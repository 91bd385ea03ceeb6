"""Run a workflow file headless: load, convert, override, validate, execute, and report the files written."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import files
from .core_nodes import CORE_NODE_CLASS_MAPPINGS
from .graph import ExecutionResult, Prompt, apply_overrides, execute_prompt, load_workflow, validate_prompt

logger = logging.getLogger(__name__)


def default_registry() -> dict[str, type]:
    """Core node ids, then our pack's nodes; like ComfyUI, a pack id never replaces a core id."""
    from .. import NODE_CLASS_MAPPINGS as PACK_NODES

    registry = dict(CORE_NODE_CLASS_MAPPINGS)
    for node_id, cls in PACK_NODES.items():
        if node_id in registry:
            logger.warning("pack node %s clashes with a core node id and is ignored", node_id)
            continue
        registry[node_id] = cls
    return registry


@dataclass
class RunResult:
    """A finished run: the prompt that ran, what each output node reported, and the files it wrote."""

    prompt: Prompt
    execution: ExecutionResult
    saved: list[Path]

    @property
    def ui(self) -> dict[str, dict]:
        return self.execution.ui


def _written_files(ui: dict[str, dict], paths: files.HostPaths) -> list[Path]:
    folders = {"output": paths.output_dir, "temp": paths.temp_dir, "input": paths.input_dir}
    return [folders[item["type"]] / item.get("subfolder", "") / item["filename"]
            for node_ui in ui.values() for items in node_ui.values() for item in items
            if isinstance(item, dict) and item.get("type") in folders and "filename" in item]


def run_prompt(prompt: Prompt, paths: files.HostPaths, registry: Mapping[str, type] | None = None,
               workflow: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunResult:
    """Validate and execute an API prompt with the given folders; the UI workflow, if any, is embedded in PNGs."""
    registry = dict(registry or default_registry())
    prompt = apply_overrides(prompt, list(overrides))
    with files.using(paths), files.controlnet_environment(paths):
        outputs = validate_prompt(prompt, registry)
        extra_pnginfo = {"workflow": workflow} if workflow is not None else None
        execution = execute_prompt(prompt, registry, outputs, extra_pnginfo)
    return RunResult(prompt, execution, _written_files(execution.ui, paths))


def run_workflow(path: str | Path, paths: files.HostPaths | None = None,
                 registry: Mapping[str, type] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunResult:
    """Run a UI- or API-format workflow file; relative paths inside it also resolve next to the file."""
    path = Path(path)
    registry = dict(registry or default_registry())
    paths = paths or files.HostPaths(base_dir=path.resolve().parent)
    with files.using(paths), files.controlnet_environment(paths):
        prompt, workflow = load_workflow(path, registry)
    logger.debug("API prompt: %s", json.dumps(prompt, default=str))
    return run_prompt(prompt, paths, registry, workflow, overrides)


__all__ = ["RunResult", "default_registry", "run_prompt", "run_workflow"]
