"""Flux ControlNets: per-step cost relative to the base's step, and load time / peak RAM of a full-size file.

Step: the ControlNet's forward plus adding its residuals, against one step of a Flux-shaped base (19 double +
38 single blocks of controlnet_model/dit_blocks.py, the same blocks Flux uses; a stand-in, not Flux's weights),
same tokens. On a GPU (CUDA) at full width (3072, 1024x1024 image: 4096 image + 512 text tokens, bf16); on the CPU
at reduced width (256, 2 heads of 128) with the token count scaled to keep tokens / width near Flux's at 1024 px
(320 image + 64 text tokens), fp32. Layouts: InstantX Union (5 double + 10 single), Shakker Union-Pro 2.0
(6 double), XLabs (2 double, its pixel-space hint encoder run every step, as ComfyUI does).

Load: a full-size Union-Pro 2.0 layout file (6 double blocks, 2.1 B parameters, random bf16 weights, 4.3 GB)
loaded by ZeroConv's load_controlnet and, when COMFYUI_PATH is set, by ComfyUI's comfy.controlnet.load_controlnet
(in COMFYUI_PYTHON), each in a fresh process, every weight read once. Writes bench/results/dit-<machine>.md.

    python bench/bench_dit_controlnet.py [--repeats 5] [--load-repeats 3] [--skip-load]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _machine import STATUS, comfyui_note, machine, write_table  # noqa: E402  (shared by the benchmarks)

logger = logging.getLogger("bench_dit_controlnet")
# label: (double blocks, single blocks, union modes, format)
LAYOUTS = {"InstantX Union (5 double + 10 single)": (5, 10, 7, "flux_instantx"),
           "Union-Pro 2.0 (6 double)": (6, 0, 0, "flux_instantx"), "XLabs (2 double, pixel hint)": (2, 0, 0, "flux_xlabs")}


class FluxShapedBase(nn.Module):
    """Flux's block stack (19 double, 38 single) with its embedders and last projection; residuals added as
    ComfyUI comfy/ldm/flux/model.py adds them."""

    def __init__(self, dim: int, heads: int, context: int = 4096) -> None:
        super().__init__()
        from zeroconv.controlnet_model.dit_blocks import JointBlock, MLPEmbedder, SingleBlock

        self.img_in, self.txt_in = nn.Linear(64, dim), nn.Linear(context, dim)
        self.time_in, self.vector_in, self.guidance_in = MLPEmbedder(256, dim), MLPEmbedder(768, dim), MLPEmbedder(256, dim)
        self.double_blocks = nn.ModuleList(JointBlock(dim, heads) for _ in range(19))
        self.single_blocks = nn.ModuleList(SingleBlock(dim, heads) for _ in range(38))
        self.out = nn.Linear(dim, 64)

    def forward(self, x, sigma, context, y, guidance, control=None):
        from zeroconv.controlnet_model.dit_blocks import image_ids, patchify, rope, time_embedding

        b, _, h, w = x.shape
        img, txt = self.img_in(patchify(x)), self.txt_in(context)
        vec = (time_embedding(self.time_in, sigma, img.dtype, 1000.0) + self.vector_in(y)
               + time_embedding(self.guidance_in, guidance, img.dtype, 1000.0))
        ids = torch.cat([torch.zeros(b, txt.shape[1], 3, device=x.device), image_ids(b, h // 2, w // 2, x.device)], 1)
        head = self.double_blocks[0].img_attn.qkv.weight.shape[1] // self.double_blocks[0].img_attn.heads
        pe = rope(ids, (head // 8, 7 * head // 16, 7 * head // 16), 10000)
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, pe)
            if control is not None and i < len(control.input) and control.input[i] is not None:
                img = img + control.input[i]
        joined = torch.cat([txt, img], 1)
        for i, block in enumerate(self.single_blocks):
            joined = block(joined, vec, pe)
            if control is not None and i < len(control.output) and control.output[i] is not None:
                joined = torch.cat([joined[:, :txt.shape[1]], joined[:, txt.shape[1]:] + control.output[i]], 1)
        return self.out(joined[:, txt.shape[1]:])


def _timed(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def step_rows(repeats: int) -> tuple[list[str], str]:
    """Median (min-max) seconds of the base step and of each ControlNet's forward + residual mapping."""
    from zeroconv.controlnet_model.dit_control import DiTControlUnit, run_dit_control
    from zeroconv.controlnet_model.flux_controlnet import FluxControlNet, FluxControlNetConfig, HintInput

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dim, heads, (lh, lw), txt = (3072, 24, (128, 128), 512) if cuda else (256, 2, (32, 40), 64)
    where = (f"GPU {torch.cuda.get_device_name()} , full width 3072, {lh * lw // 4} image + {txt} text tokens, bf16"
             if cuda else f"CPU ({torch.get_num_threads()} threads), reduced width {dim} ({heads} heads of 128), "
             f"{lh * lw // 4} image + {txt} text tokens, fp32")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, lh, lw, generator=gen).to(device, dtype)
    inputs = dict(sigma=torch.tensor([0.7], device=device), context=torch.randn(1, txt, 4096, generator=gen).to(device, dtype),
                  y=torch.randn(1, 768, generator=gen).to(device, dtype), guidance=torch.tensor([3.5], device=device))
    torch.manual_seed(0)
    base = FluxShapedBase(dim, heads).to(device, dtype).eval()
    with torch.no_grad():
        base_times = _timed(lambda: base(x, **inputs), repeats, sync)
    base_med = statistics.median(base_times)
    rows = [f"| base step (19 double + 38 single) | {base_med:.3f} ({min(base_times):.3f}-{max(base_times):.3f}) | 1.00 |"]
    for label, (double, single, modes, fmt) in LAYOUTS.items():
        pixels = fmt == "flux_xlabs"
        cfg = FluxControlNetConfig(depth=double, depth_single=single, hidden_size=dim, num_heads=heads,
                                   guidance_embed=True, axes_dim=(16, 56, 56), num_union_modes=modes,
                                   hint=HintInput.PIXELS if pixels else HintInput.LATENT)
        net = FluxControlNet(cfg).to(device, dtype).eval()
        hint = torch.rand(1, 3, 8 * lh, 8 * lw, generator=gen) if pixels else torch.randn(1, 16, lh, lw, generator=gen)
        unit = DiTControlUnit(net, fmt, hint.to(device, dtype), mode=2 if modes else None)
        with torch.no_grad():
            times = _timed(lambda: run_dit_control(unit, x, inputs["sigma"], inputs["context"], inputs["y"],
                                                   inputs["guidance"]), repeats, sync)
        med = statistics.median(times)
        rows.append(f"| {label} | {med:.3f} ({min(times):.3f}-{max(times):.3f}) | {med / base_med:.2f} |")
        logger.info(rows[-1])
        del net
    return rows, where


CHILD = r"""
import json, os, sys, time
kind, path = sys.argv[1], sys.argv[2]
import torch
if kind == "comfyui":
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.controlnet
else:
    from zeroconv.controlnet_model.checkpoint import load_controlnet

""" + STATUS + r"""
before = status("VmRSS")
t0 = time.perf_counter()
if kind == "comfyui":
    model = comfy.controlnet.load_controlnet(path, model_options={"dtype": torch.bfloat16}).control_model
else:
    model = load_controlnet(path, dtype=torch.bfloat16).model
with torch.no_grad():  # read every weight once: lazily mapped files count as loaded
    total = sum(float(p.float().sum()) for p in model.state_dict().values())
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_rss_mib": status("VmHWM"), "rss_before_mib": before,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def write_union_pro_file(path: Path) -> int:
    """Union-Pro 2.0's layout (diffusers names, 6 double blocks, no single blocks, no modes), random bf16."""
    from diffusers import FluxControlNetModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = FluxControlNetModel(num_layers=6, num_single_layers=0, guidance_embeds=True).state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
             for k, v in shapes.items()}
    save_file(state, path)
    return sum(v.numel() for v in state.values())


def load_rows(repeats: int, tmp: Path) -> tuple[list[str], str]:
    file = tmp / "union_pro2_layout_random_bf16.safetensors"
    params = write_union_pro_file(file)
    size = file.stat().st_size / 1e9
    kinds = [("ZeroConv load_controlnet, bf16", "zeroconv", sys.executable)]
    if os.environ.get("COMFYUI_PATH"):
        kinds.append(("ComfyUI comfy.controlnet.load_controlnet, bf16", "comfyui",
                      os.environ.get("COMFYUI_PYTHON", sys.executable)))
    rows = []
    for label, kind, python in kinds:
        runs = []
        for _ in range(repeats):
            out = subprocess.run([python, "-c", CHILD, kind, str(file)], capture_output=True, text=True)
            if out.returncode:
                logger.warning("%s failed: %s", kind, out.stderr.strip()[-500:])
                break
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not runs:
            rows.append(f"| {label} | failed | | | |")
            continue
        sec = [r["seconds"] for r in runs]
        peak = [r["peak_rss_mib"] - r["rss_before_mib"] for r in runs]
        rows.append(f"| {label} | {statistics.median(sec):.2f} ({min(sec):.2f}-{max(sec):.2f}) | "
                    f"{statistics.median(r['peak_rss_mib'] for r in runs):.0f} | {statistics.median(peak):.0f} | "
                    f"{runs[0]['params']:,} |")
        logger.info(rows[-1])
    return rows, f"{params:,} parameters, {size:.2f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    step, where = step_rows(args.repeats)
    lines = ["# Flux ControlNet benchmark", "", f"Machine: {machine()}{comfyui_note()}.", "",
             f"## Per-step cost ({where})", "",
             f"Median (min-max) of {args.repeats} runs after one warm-up. ControlNet = its forward + spreading its "
             "residuals over the host blocks + strength; the base is a Flux-shaped stand-in with random weights.", "",
             "| what | seconds per step | relative to the base step |", "| --- | --- | --- |", *step]
    if not args.skip_load:
        with tempfile.TemporaryDirectory() as tmp:
            load, size = load_rows(args.load_repeats, Path(tmp))
        lines += ["", f"## Load of a full-size file (Union-Pro 2.0 layout, {size}, random weights)", "",
                  f"Median (min-max) of {args.load_repeats} fresh processes; the file was written just before "
                  "(whether it stays in the page cache depends on free RAM). Time = load + reading every weight "
                  "once. Peak RSS includes the interpreter and imports; 'peak growth' is that minus the RSS just "
                  "before loading.", "",
                  "| loader | seconds | peak RSS (MiB) | peak growth (MiB) | parameters |",
                  "| --- | --- | --- | --- | --- |", *load]
    write_table(args.out, "dit", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
