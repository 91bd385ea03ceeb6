"""The `zeroconv run WORKFLOW.json` subcommand."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import files
from .runner import HOSTS


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `run` to the zeroconv command."""
    parser = subparsers.add_parser(
        "run", help="run a ComfyUI workflow file headless (UI or API format)",
        description="Run a ComfyUI workflow (saved or exported as API) headless. Where a ComfyUI is present (the one "
                    "this pack is installed in, or COMFYUI_PATH) it runs on ComfyUI's own executor and nodes; "
                    "otherwise on ZeroConv's nodes, the core nodes the shipped workflows use and the library's DDIM "
                    "sampler. Prints the files it writes.")
    parser.add_argument("workflow", type=Path, help="workflow JSON (UI format or API format)")
    parser.add_argument("--models-dir", type=Path, action="append", default=[],
                        help="folder with model files (checkpoints/ and controlnet/ subfolders or the files "
                             "themselves); repeatable; the package's models/ is searched last")
    parser.add_argument("--controlnet-dir", type=Path, help="folder with ControlNet files (default: the models dirs)")
    parser.add_argument("--input-dir", type=Path,
                        help="folder LoadImage reads (default: inputs/ next to the workflow, else ./input)")
    parser.add_argument("--output-dir", type=Path, default=Path("output"), help="folder SaveImage writes (./output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input, e.g. --set 3.seed=7 or --set KSampler.steps=4; repeatable")
    parser.add_argument("--device", default="cpu", help="torch device to sample on (cpu, cuda, cuda:1, mps)")
    parser.add_argument("--host", choices=HOSTS, default="auto",
                        help="auto: ComfyUI's executor when a ComfyUI is found, else offline; comfyui; zeroconv "
                             "(offline)")
    parser.set_defaults(func=run_command)


def host_paths(args: argparse.Namespace) -> files.HostPaths:
    """The run's folders from the command line."""
    workflow_dir = args.workflow.resolve().parent
    input_dir = args.input_dir
    if input_dir is None:
        input_dir = workflow_dir / "inputs" if (workflow_dir / "inputs").is_dir() else Path("input")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r} is not a torch device; use cpu, cuda or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch sees no CUDA device; use --device cpu")
    return files.HostPaths(models_dirs=tuple(args.models_dir), input_dir=input_dir, output_dir=args.output_dir,
                           controlnet_dir=args.controlnet_dir, base_dir=workflow_dir, device=str(device))


def run_command(args: argparse.Namespace) -> int:
    """Run the workflow and print each file written."""
    from .runner import run_workflow

    result = run_workflow(args.workflow, host_paths(args), overrides=args.overrides, host=args.host)
    for path in result.saved:
        print(path)
    if not result.saved:
        print("the workflow ran; its output nodes wrote no files")
    return 0
