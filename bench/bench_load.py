"""Load time and peak RAM of a full-size SD1.5 ControlNet (random weights, fp16 safetensors).

Each loader runs in a fresh subprocess on the same files: ours on the native LDM file and on a diffusers
folder, diffusers' ControlNetModel.from_pretrained on that folder. Writes bench/results/load-<machine>.md.

    python bench/bench_load.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time, torch
kind, path = sys.argv[1], sys.argv[2]
if kind == "diffusers":
    from diffusers import ControlNetModel
else:
    from zeroconv.controlnet_model.checkpoint import load_controlnet
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
base_rss = rss()
t0 = time.perf_counter()
if kind == "diffusers":
    from diffusers import ControlNetModel
    model = ControlNetModel.from_pretrained(path, torch_dtype=torch.float16)
else:
    from zeroconv.controlnet_model.checkpoint import load_controlnet
    model = load_controlnet(path, dtype=torch.float16).model
with torch.no_grad():  # touch every weight, so lazily mapped files count as loaded
    for p in model.parameters():
        p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
elapsed = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": elapsed, "peak_rss_mib": rss(), "load_rss_mib": rss() - base_rss, "params": params}))
"""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def _run(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from zeroconv.controlnet_model import ControlNet, preset
    from zeroconv.controlnet_model.checkpoint import export_diffusers, save_controlnet

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = ControlNet(preset("sd15")).half()
        native = save_controlnet(model, Path(tmp) / "control_sd15_random_fp16.safetensors")
        folder = export_diffusers(model, Path(tmp) / "diffusers")
        del model
        rows = []
        for label, kind, path in (("ZeroConv, native LDM file", "ours", native),
                                  ("ZeroConv, diffusers folder", "ours", folder),
                                  ("diffusers from_pretrained, same folder", "diffusers", folder)):
            runs = [_run(kind, path) for _ in range(args.repeats)]
            rows.append((label, statistics.median(r["seconds"] for r in runs),
                         statistics.median(r["peak_rss_mib"] for r in runs),
                         statistics.median(r["load_rss_mib"] for r in runs), runs[0]["params"]))
    lines = [f"# ControlNet load benchmark (SD1.5, random weights, fp16 safetensors)", "",
             f"Machine: {_machine()}", f"Median of {args.repeats} fresh processes each, time includes reading every weight once; RSS includes the "
             "Python interpreter and imports; 'growth' is the RSS the loaded model adds (file is 723 MB).", "",
             "| loader | seconds | RSS after (MiB) | growth during load (MiB) | parameters |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {label} | {sec:.2f} | {rss:.0f} | {grow:.0f} | {params:,} |" for label, sec, rss, grow, params in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / f"load-{platform.node() or 'machine'}.md"
    result.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
