"""Where ZeroConv meets ComfyUI: the only code that imports ComfyUI (`comfy`, `folder_paths`, `comfy_execution`,
its `nodes` and `execution` modules), always lazily, inside functions, so the pack imports and runs without it.

  * `control.py`: the CONTROL_NET object ComfyUI's sampler calls (`pre_run`, `get_control`, `cleanup`); inside
    ComfyUI a real `comfy.controlnet.ControlBase`. Gating, scaling and composition are library calls
    (`controlnet_model/residuals.py`).
  * `dit.py`: Flux.1 and SD3 hosts: the sampled model's family, the family check, the VAE encode of latent hints,
    the patch embedding an SD3.5 ControlNet borrows.
  * `folders.py`: every folder look-up (ComfyUI's `folder_paths`, `ZEROCONV_CONTROLNET_DIR`, the pack's models/).
  * `models.py`: ComfyUI's model manager (patchers, device, dtype) for annotator models and the demo world's base.
  * `comfyui.py`: ComfyUI's own executor, for `zeroconv run` when a ComfyUI is present.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

COMFYUI_PATH_ENV = "COMFYUI_PATH"


def comfy_available() -> bool:
    """True when ComfyUI's modules can be imported (inside ComfyUI, or after `enter_comfyui`)."""
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None


def comfyui_root() -> Path | None:
    """A ComfyUI checkout to run in: the one this pack is installed in (custom_nodes/<pack>), else COMFYUI_PATH."""
    installed = Path(__file__).resolve().parents[4]  # ComfyUI/custom_nodes/<pack>/nodes/host
    for root in (installed, Path(os.environ[COMFYUI_PATH_ENV]) if os.environ.get(COMFYUI_PATH_ENV) else None):
        if root is not None and (root / "comfy" / "controlnet.py").is_file() and (root / "execution.py").is_file():
            return root
    return None
