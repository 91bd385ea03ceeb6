"""What a benchmark's numbers depend on, written beside them: CPU, cores, RAM, versions, load averages."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, cores, RAM, torch and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    for name in ("safetensors", "diffusers", "accelerate"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; " + ", ".join(versions)


def comfyui_version() -> str:
    """ComfyUI's version file, and COMFYUI_COMMIT when given (an extracted checkout has no .git to ask)."""
    path = Path(os.environ.get("COMFYUI_PATH", "")) / "comfyui_version.py"
    version = path.read_text().split('"')[1] if path.is_file() else "unknown version"
    commit = os.environ.get("COMFYUI_COMMIT")
    return f"{version} (commit {commit})" if commit else version


def comfyui_note() -> str:
    """'; ComfyUI <version>' for a table's machine line, or that ComfyUI was not run."""
    return f"; ComfyUI {comfyui_version()}" if os.environ.get("COMFYUI_PATH") else "; ComfyUI not run (no COMFYUI_PATH)"


# Child processes' memory probe (MiB from /proc/self/status: VmRSS now, VmHWM the high-water mark).
STATUS = r"""
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
"""


def load_average() -> str:
    """1/5/15-minute load averages: a shared machine's numbers mean little without them."""
    try:
        return "/".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def write_table(folder: Path, stem: str, lines: list[str]) -> Path:
    """Write a result table as `<folder>/<stem>-<host>.md`, print it, return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{platform.node() or 'machine'}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
