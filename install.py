"""Install ZeroConv's requirements with the running Python. Idempotent; offline when everything is present.

ComfyUI-Manager runs this file (working directory = the pack) after `pip install -r requirements.txt`;
there it only checks the requirements, because ComfyUI already brings torch and torchvision.

    python install.py            # requirements only (what ComfyUI-Manager does)
    python install.py --dev      # + torch/torchvision if absent, the package (editable), test/train/annotator extras

This script never imports the pack itself.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# torch / torchvision pairs that import together, by machine. PyPI's x86_64 torchvision is built against
# the CUDA torch of the same release, so the pair must come from the same release line.
TORCH_PAIRS: dict[str, tuple[str, str]] = {
    "x86_64": ("torch==2.14.1", "torchvision==0.29.1"),
    "aarch64": ("torch==2.9.1", "torchvision==0.24.1"),
}
# torchvision release that belongs to a torch release (major.minor), for a torch that is already there.
TORCHVISION_FOR_TORCH: dict[str, str] = {
    "2.14": "0.29", "2.13": "0.28", "2.12": "0.27", "2.11": "0.26", "2.10": "0.25", "2.9": "0.24", "2.8": "0.23",
}
DEV_EXTRAS = "test,train,annotators-gpu,annotators-learned"


def _requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
    return names


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def _imports(module: str) -> bool:
    """Whether `module` imports in a fresh interpreter (a broken torchvision fails only at import)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_requirements() -> None:
    missing = [n for n in _requirement_names(HERE / "requirements.txt") if not _installed(n)]
    if missing:
        _pip("-r", str(HERE / "requirements.txt"))
    else:
        print("requirements already satisfied", flush=True)


def ensure_torch() -> None:
    """Install a matching torch/torchvision pair when torch is absent; add torchvision to a present torch."""
    machine = platform.machine().lower()
    if not _installed("torch"):
        pair = TORCH_PAIRS.get(machine)
        if pair is None:
            raise SystemExit(f"no known torch/torchvision pair for {machine}; install torch and torchvision yourself")
        _pip(*pair)
        return
    if _installed("torchvision") and _imports("torchvision"):
        return
    torch_version = importlib.metadata.version("torch")
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    vision = TORCHVISION_FOR_TORCH.get(minor)
    if vision is None:
        raise SystemExit(f"torch {torch_version} has no known torchvision here; install a matching torchvision")
    _pip(f"torchvision=={vision}.*")
    if not _imports("torchvision"):
        raise SystemExit(f"torchvision {vision} does not import beside torch {torch_version} (a CPU-only torch "
                         f"with PyPI's CUDA torchvision?); install the pair {TORCH_PAIRS.get(machine)} instead")


def _package_is_this_checkout() -> bool:
    """Whether `import zeroconv` resolves to this folder (an editable install of another clone would not)."""
    spec = importlib.util.find_spec("zeroconv")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == HERE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", action="store_true",
                        help=f"also torch, the editable package and the extras {DEV_EXTRAS}")
    args = parser.parse_args(argv)
    if args.dev:
        ensure_torch()
    ensure_requirements()
    if args.dev:
        extras = ("pytest", "diffusers", "open_clip_torch", "kornia", "transformers", "scipy")
        extras_ok = all(_installed(n) for n in extras)
        if not (extras_ok and _package_is_this_checkout()):
            _pip("-e", f"{HERE}[{DEV_EXTRAS}]")
        else:
            print("package and extras already installed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
