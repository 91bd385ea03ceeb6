"""No tests here: running a script inside a real ComfyUI, with our pack imported by path as ComfyUI loads custom nodes.

COMFYUI_PATH names a ComfyUI checkout and COMFYUI_PYTHON an interpreter with its requirements (default: this one).
Tests that use this module skip, saying so, when COMFYUI_PATH is unset.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[1]

SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout to run in ComfyUI"
REQUIRES_COMFYUI = [pytest.mark.comfyui, pytest.mark.skipif(not COMFYUI_PATH, reason=SKIP_REASON)]


def prelude() -> str:
    """ComfyUI on the CPU (one torch thread), then our pack imported by path as the module `zeroconv_pack` (`pack`)."""
    return "\n".join([
        "import importlib.util, sys",
        f"sys.path.insert(0, {COMFYUI_PATH!r})",
        "from comfy.cli_args import args",
        "args.cpu = True",
        "import torch",
        "torch.set_num_threads(1)",
        f"spec = importlib.util.spec_from_file_location('zeroconv_pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])",
        "pack = importlib.util.module_from_spec(spec); sys.modules['zeroconv_pack'] = pack; "
        "spec.loader.exec_module(pack)",
        "",
    ])


# Script text for bodies: `randomize(module, std, seed)` re-draws every parameter (zero layers too), in place.
RANDOMIZE = """
def randomize(module, std, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
"""


def run_in_comfyui(body: str, timeout: int = 600) -> dict[str, Any]:
    """Run prelude() + `body` in ComfyUI's folder; the body prints one JSON object last, which is returned."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", prelude() + body], cwd=COMFYUI_PATH, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkout_on_path() -> str:
    """A folder holding a `zeroconv` link to this checkout, for ComfyUI's Python (which has no zeroconv installed)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="zeroconv_path_"))
    (folder / "zeroconv").symlink_to(REPO, target_is_directory=True)
    return str(folder)


def run_cli_in_comfyui(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`zeroconv ARGS` in ComfyUI's Python and folder, with this checkout importable as `zeroconv`."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    code = (f"import sys; sys.path.insert(0, {checkout_on_path()!r}); import torch; torch.set_num_threads(1); "
            f"from zeroconv.cli import main; sys.exit(main({args!r}))")
    return subprocess.run([python, "-c", code], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=timeout)
