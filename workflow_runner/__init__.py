"""`zeroconv run`: execute ComfyUI workflow files headless.

Read in this order: runner.py (one call from file to PNGs; ComfyUI's executor when a ComfyUI is present),
graph.py (workflow formats, overrides, validation, the offline executor), offline.py (the core node ids shipped
workflows use, on the library's sampler), files.py (offline folders), cli.py (the subcommand).
"""
from .runner import RunResult, default_registry, run_prompt, run_workflow

__all__ = ["RunResult", "default_registry", "run_prompt", "run_workflow"]
