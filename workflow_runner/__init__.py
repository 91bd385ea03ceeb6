"""`zeroconv run`: execute ComfyUI workflow files headless with our nodes and the core nodes our workflows use.

Read in this order: graph.py (workflow formats, validation, execution), core_nodes.py (the core node ids),
host.py (MODEL / CLIP / VAE over a LockedBase), sampling.py (KSampler and the ControlNet protocol),
files.py (folders, like folder_paths), runner.py (one call from file to PNGs), cli.py (the subcommand).
"""
from .runner import RunResult, default_registry, run_prompt, run_workflow

__all__ = ["RunResult", "default_registry", "run_prompt", "run_workflow"]
