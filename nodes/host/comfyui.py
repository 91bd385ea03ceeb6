"""ComfyUI's own executor, in this process, for `zeroconv run` where a ComfyUI is present: its node classes
(core, comfy_extras, and this pack), its folders, validation (execution.py validate_prompt) and execution
(execution.py PromptExecutor), as ComfyUI's server runs a queued prompt, without the server."""
from __future__ import annotations

import asyncio
import copy
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class _Server:
    """The few attributes PromptExecutor reads of ComfyUI's PromptServer (server.py); messages are logged."""

    client_id, last_node_id, last_prompt_id = None, None, None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node"):
            logger.info("running node %s", data["node"])


def enter(root: Path, device: str = "cpu") -> None:
    """Make the ComfyUI at `root` importable here, on the CPU unless a CUDA device is asked (before anything
    imports comfy.model_management, which reads the flag; comfy/cli_args.py)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = not device.startswith("cuda")
    if device.startswith("cuda:"):
        args.cuda_device = int(device.split(":", 1)[1])


def node_classes() -> dict[str, type]:
    """ComfyUI's node classes (core and comfy_extras) and this pack's (a core id is never replaced)."""
    import nodes

    from .. import NODE_CLASS_MAPPINGS as PACK_NODES

    if not getattr(node_classes, "_loaded", False):
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        if failed:
            logger.info("ComfyUI extras that did not import here: %s", ", ".join(failed))
        for node_id, cls in PACK_NODES.items():
            nodes.NODE_CLASS_MAPPINGS.setdefault(node_id, cls)
        node_classes._loaded = True
    return nodes.NODE_CLASS_MAPPINGS


def use_folders(models_dirs: list[Path], controlnet_dir: Path | None, input_dir: Path, output_dir: Path) -> None:
    """Point ComfyUI's folder_paths at a run's folders: models dirs (or their checkpoints/, controlnet/ subfolders)
    searched first, and the input and output folders."""
    import folder_paths

    for kind in ("checkpoints", "controlnet"):
        dirs = [d / kind if (d / kind).is_dir() else d for d in models_dirs]
        dirs = ([controlnet_dir] if kind == "controlnet" and controlnet_dir is not None else []) + dirs
        for folder in reversed(dirs):
            folder_paths.add_model_folder_path(kind, str(Path(folder).resolve()), is_default=True)
    folder_paths.set_input_directory(str(Path(input_dir).resolve()))
    output_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(Path(output_dir).resolve()))
    folder_paths.set_temp_directory(str((Path(output_dir) / "temp").resolve()))


def folders() -> dict[str, Path]:
    """Where ComfyUI wrote files, by the 'type' of its ui entries."""
    import folder_paths

    return {"output": Path(folder_paths.get_output_directory()), "temp": Path(folder_paths.get_temp_directory()),
            "input": Path(folder_paths.get_input_directory())}


def run_prompt(prompt: dict, extra_pnginfo: dict | None) -> tuple[dict[str, dict], dict | None, str | None]:
    """Validate and execute an API prompt: (ui outputs by node, node_errors or None, error message or None)."""
    import execution

    prompt_id = str(uuid.uuid4())
    prompt = copy.deepcopy(prompt)  # validation and execution edit the prompt
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok:
        return {}, node_errors or {}, (error or {}).get("message", "the prompt failed validation")
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
    executor.execute(prompt, prompt_id, extra_data={"extra_pnginfo": extra_pnginfo or {}}, execute_outputs=outputs)
    if not executor.success:
        failed = next((d for e, d in executor.status_messages if e == "execution_error"), {})
        return {}, None, (f"node {failed.get('node_id')} ({failed.get('node_type')}) failed: "
                          f"{failed.get('exception_type')}: {failed.get('exception_message')}")
    return executor.history_result["outputs"], None, None
