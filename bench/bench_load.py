"""Load time and peak RAM of a full-size SD1.5 ControlNet (random weights, fp16 safetensors), ours vs others.

Writes one native file (bare LDM keys, fp16, 723 MB) and its diffusers export (fp16), then loads them, each
loader in a fresh subprocess, `--repeats` times, the loaders interleaved (repetition r of every loader runs before
repetition r + 1 of any): ZeroConv, diffusers' ControlNetModel.from_pretrained (without and, when installed, with
accelerate's low_cpu_mem_usage, diffusers' default then) and .from_single_file (the native
file, with the exported config.json, offline), and ComfyUI's comfy.controlnet.load_controlnet when COMFYUI_PATH
names a checkout (run by COMFYUI_PYTHON when set), each kept in fp16 and cast fp16 -> fp32 as both hosts do on a
CPU. After loading, every 4 KiB page of every weight is read once (lazily mapped weights count as loaded; a
full pass over the values would add the same ~0.4 s of arithmetic to every loader and hide the loaders' own
cost). Also times ZeroConv's NaN/inf check alone (in-process, on the loaded fp16 and fp32 weights). Writes
bench/results/load-<machine>.md with the machine, versions and load averages.

    COMFYUI_PATH=<ComfyUI checkout> COMFYUI_PYTHON=<its python> python bench/bench_load.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _machine import STATUS, comfyui_note, load_average, machine, write_table  # bench/ is on sys.path when run as a script

logger = logging.getLogger("bench_load")

CHILD = r"""
import json, os, sys, time
kind, path, config, dtype = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
import torch
dtype = getattr(torch, dtype)
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
if kind == "zeroconv":
    model = load_controlnet(path, dtype=dtype).model
elif kind.startswith("diffusers-pretrained"):  # copied into new memory, or (accelerate) assigned from the map
    model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=kind.endswith("accelerate"))
elif kind == "diffusers-single-file":
    model = ControlNetModel.from_single_file(path, config=config, torch_dtype=dtype, local_files_only=True)
else:
    model = comfy.controlnet.load_controlnet(path, model_options={"dtype": dtype}).control_model
called = time.perf_counter() - t0
with torch.no_grad():  # touch every 4 KiB page of every weight: lazily mapped files count as loaded
    total = sum(float(p.reshape(-1)[::max(1, 4096 // p.element_size())].sum(dtype=torch.float32))
                for p in model.state_dict().values())
elapsed = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
print(json.dumps({"seconds": elapsed, "call_seconds": called, "peak_rss_mib": status("VmHWM"),
                  "rss_before_mib": before, "rss_after_mib": status("VmRSS"), "params": params, "dtypes": dtypes,
                  "checksum": total}))
"""


def run_child(kind: str, path: Path, config: Path, dtype: str, cache: Path) -> dict | None:
    """One load in a fresh process. ZeroConv remembers files it found finite under $ZEROCONV_CACHE_DIR: the
    "first load" rows give each run a new, empty one, so their check runs every time."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable) if kind == "comfyui" else sys.executable
    env = dict(os.environ, ZEROCONV_CACHE_DIR=str(cache))
    if kind == "zeroconv-first":
        env["ZEROCONV_CACHE_DIR"] = tempfile.mkdtemp(dir=cache)
        kind = "zeroconv"
    out = subprocess.run([python, "-c", CHILD, kind, str(path), str(config), dtype], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        logger.warning("%s failed: %s", kind, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def loaders(native: Path, folder: Path) -> list[tuple[str, str, Path, str]]:
    """(label, child kind, path, dtype): every loader kept in fp16, then cast to fp32."""
    rows = []
    for dtype, how in (("float16", "fp16 kept"), ("float32", "fp16 cast to fp32")):
        rows += [(f"ZeroConv load_controlnet, native file, {how}, first load (NaN/inf check runs)", "zeroconv-first",
                  native, dtype),
                 (f"ZeroConv load_controlnet, native file, {how}, file checked before", "zeroconv", native, dtype),
                 (f"ZeroConv load_controlnet, diffusers folder, {how}", "zeroconv", folder, dtype),
                 (f"diffusers ControlNetModel.from_pretrained, same folder, {how}", "diffusers-pretrained", folder,
                  dtype)]
        if importlib.util.find_spec("accelerate") is not None:  # diffusers' default whenever accelerate is there
            rows.append((f"diffusers ControlNetModel.from_pretrained with accelerate (low_cpu_mem_usage), same folder,"
                         f" {how}", "diffusers-pretrained-accelerate", folder, dtype))
        rows.append((f"diffusers ControlNetModel.from_single_file, native file, {how}", "diffusers-single-file",
                     native, dtype))
        if os.environ.get("COMFYUI_PATH"):
            rows.append((f"ComfyUI comfy.controlnet.load_controlnet, native file, {how}", "comfyui", native, dtype))
    return rows


def check_cost(native: Path, repeats: int) -> list[str]:
    """ms of ZeroConv's NaN/inf check alone on the loaded weights (fp16 kept, fp32 cast): median (min-max)."""
    import time

    from zeroconv.controlnet_model.safetensors_io import open_weights, refuse_non_finite

    weights, rows = open_weights(native), []
    for dtype in (torch.float16, torch.float32):
        tensors = {k: weights.load(k).to(dtype) for k in weights.keys()}
        refuse_non_finite(tensors, native)  # pages in the mapped file, as the load does before it checks
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            refuse_non_finite(tensors, native)
            times.append((time.perf_counter() - start) * 1000)
        size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
        rows.append(f"| NaN/inf check, {str(dtype).removeprefix('torch.')} weights ({size:.0f} MB) | "
                    f"{statistics.median(times):.0f} | {min(times):.0f}-{max(times):.0f} |")
        del tensors
    return rows


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
        table = loaders(native, folder)
        runs: dict[str, list[dict]] = {label: [] for label, *_ in table}
        loads = [load_average()]
        for _ in range(args.repeats):  # interleaved: a burst of load from elsewhere hits every loader alike
            for label, kind, path, dtype in table:
                result = run_child(kind, path, folder, dtype, Path(tmp))
                if result:
                    runs[label].append(result)
        loads.append(load_average())
        for label, *_ in table:
            done = runs[label]
            if not done:
                rows.append(f"| {label} | failed | | | | | |")
                continue
            secs, calls = [r["seconds"] for r in done], [r["call_seconds"] for r in done]
            med = {k: statistics.median(r[k] for r in done) for k in ("peak_rss_mib", "rss_before_mib")}
            rows.append(f"| {label} | {statistics.median(secs):.2f} | {min(secs):.2f}-{max(secs):.2f} | "
                        f"{statistics.median(calls):.2f} ({min(calls):.2f}-{max(calls):.2f}) | "
                        f"{med['peak_rss_mib']:.0f} | {med['peak_rss_mib'] - med['rss_before_mib']:.0f} | "
                        f"{'/'.join(done[0]['dtypes'])} | {done[0]['params']:,} |")
            logger.info(rows[-1])
        checks = check_cost(native, max(args.repeats, 5))
    lines = ["# ControlNet load benchmark (SD1.5, random weights, fp16 safetensors)", "",
             f"Machine: {machine()}{comfyui_note()}.",
             f"Median and range of {args.repeats} fresh processes per loader, loaders interleaved; the "
             f"{size_mb:.0f} MB file is in the page cache (written just before). Time = load + reading every page of "
             "every weight once; 'call' = the load call alone. Peak RSS is the process high-water mark (interpreter "
             "and imports included); 'peak growth' is that minus the RSS just before loading. Load averages "
             "(1/5/15 min) before and after: "
             f"{loads[0]} and {loads[1]}.", "",
             "| loader | seconds (median) | range | call s, median (range) | peak RSS (MiB) | peak growth (MiB) | "
             "dtype | parameters |", "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
             "ZeroConv checks a file for NaN/inf weights on its first load in a dtype and remembers it by (path, size, "
             "mtime, dtype): 'first load' rows run with an empty record, the others after the first repetition "
             "recorded the file. The check alone, in-process on the loaded weights:",
             "", "| check | ms (median) | range |", "| --- | --- | --- |", *checks]
    write_table(args.out, "load", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
