"""Load time and peak RAM of a full-size SD1.5 ControlNet (random weights, fp16 safetensors), ours vs others.

Writes one native file (bare LDM keys, fp16, 723 MB) and its diffusers export (fp16), then loads them, each
loader in a fresh subprocess, `--repeats` times: ZeroConv (fp16, and fp32 from the same fp16 file), diffusers'
ControlNetModel.from_pretrained and .from_single_file (the native file, with the exported config.json, offline),
and ComfyUI's comfy.controlnet.load_controlnet when COMFYUI_PATH names a checkout. Every loader reads every weight
once after loading (lazily mapped weights count as loaded). Writes bench/results/load-<machine>.md.

    python bench/bench_load.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("bench_load")

# The child processes' memory probe (MiB from /proc/self/status: VmRSS now, VmHWM the high-water mark).
STATUS = r"""
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
"""
CHILD = r"""
import json, os, sys, time
kind, path, config = sys.argv[1], sys.argv[2], sys.argv[3]
import torch
if kind.startswith("comfyui"):
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.controlnet
elif kind.startswith("diffusers"):
    from diffusers import ControlNetModel
else:
    from zeroconv.controlnet_model.checkpoint import load_controlnet

""" + STATUS + r"""
before = status("VmRSS")
t0 = time.perf_counter()
if kind == "zeroconv-fp16":
    model = load_controlnet(path, dtype=torch.float16).model
elif kind == "zeroconv-fp32":
    model = load_controlnet(path, dtype=torch.float32).model
elif kind == "diffusers-pretrained":
    model = ControlNetModel.from_pretrained(path, torch_dtype=torch.float16)
elif kind == "diffusers-single-file":
    model = ControlNetModel.from_single_file(path, config=config, torch_dtype=torch.float16, local_files_only=True)
else:
    model = comfy.controlnet.load_controlnet(path, model_options={"dtype": torch.float16}).control_model
with torch.no_grad():  # read every weight once: lazily mapped files count as loaded
    total = sum(float(p.sum(dtype=torch.float32)) for p in model.state_dict().values())
elapsed = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
print(json.dumps({"seconds": elapsed, "peak_rss_mib": status("VmHWM"), "rss_before_mib": before,
                  "rss_after_mib": status("VmRSS"), "params": params, "dtypes": dtypes, "checksum": total}))
"""


def machine() -> str:
    """CPU model, cores, RAM, torch and library versions: what the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    for name in ("safetensors", "diffusers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; " + ", ".join(versions)


def run_child(kind: str, path: Path, config: Path) -> dict | None:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(config)], capture_output=True, text=True)
    if out.returncode != 0:
        logger.warning("%s failed: %s", kind, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def loaders(native: Path, folder: Path) -> list[tuple[str, str, Path]]:
    rows = [("ZeroConv load_controlnet, native file, fp16", "zeroconv-fp16", native),
            ("ZeroConv load_controlnet, native fp16 file to fp32", "zeroconv-fp32", native),
            ("ZeroConv load_controlnet, diffusers folder, fp16", "zeroconv-fp16", folder),
            ("diffusers ControlNetModel.from_pretrained, same folder", "diffusers-pretrained", folder),
            ("diffusers ControlNetModel.from_single_file, native file", "diffusers-single-file", native)]
    if os.environ.get("COMFYUI_PATH"):
        rows.append(("ComfyUI comfy.controlnet.load_controlnet, native file, fp16", "comfyui", native))
    return rows


def comfyui_version() -> str:
    path = Path(os.environ.get("COMFYUI_PATH", "")) / "comfyui_version.py"
    return path.read_text().split('"')[1] if path.is_file() else "unknown version"


def comfyui_note() -> str:
    return f"; ComfyUI {comfyui_version()}" if os.environ.get("COMFYUI_PATH") else "; ComfyUI not run (no COMFYUI_PATH)"


def write_result(out: Path, stem: str, lines: list[str]) -> Path:
    """bench/results/<stem>-<machine>.md, also printed."""
    out.mkdir(parents=True, exist_ok=True)
    result = out / f"{stem}-{platform.node() or 'machine'}.md"
    result.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from zeroconv.controlnet_model import ControlNet, preset
    from zeroconv.controlnet_model.checkpoint import export_diffusers, save_controlnet

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = ControlNet(preset("sd15")).half()
        for p in model.parameters():  # zero convs are zero-initialised: give every weight data
            p.data.normal_(0, 0.02)
        native = save_controlnet(model, Path(tmp) / "control_sd15_random_fp16.safetensors")
        folder = export_diffusers(model, Path(tmp) / "diffusers")
        size_mb = native.stat().st_size / 1e6
        del model
        for label, kind, path in loaders(native, folder):
            runs = [r for r in (run_child(kind, path, folder) for _ in range(args.repeats)) if r]
            if not runs:
                rows.append(f"| {label} | failed | | | | |")
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss_mib", "rss_before_mib")}
            rows.append(f"| {label} | {med['seconds']:.2f} | {med['peak_rss_mib']:.0f} | "
                        f"{med['peak_rss_mib'] - med['rss_before_mib']:.0f} | {'/'.join(runs[0]['dtypes'])} | "
                        f"{runs[0]['params']:,} |")
            logger.info(rows[-1])
    lines = ["# ControlNet load benchmark (SD1.5, random weights, fp16 safetensors)", "",
             f"Machine: {machine()}{comfyui_note()}.",
             f"Median of {args.repeats} fresh processes per loader; the {size_mb:.0f} MB file is in the page cache "
             "(written just before). Time = load + reading every weight once. Peak RSS is the process high-water "
             "mark (interpreter and imports included); 'peak growth' is that minus the RSS just before loading.", "",
             "| loader | seconds | peak RSS (MiB) | peak growth (MiB) | dtype | parameters |",
             "| --- | --- | --- | --- | --- | --- |", *rows]
    write_result(args.out, "load", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
