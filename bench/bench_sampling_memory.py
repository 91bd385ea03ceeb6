"""A thousand load/apply/sample cycles in one process: memory must stay flat (nothing leaks).

Runs headless on the CPU with the tiny U-Net and the `zeroconv run` mini host (run from the repo root):

    python bench/bench_sampling_memory.py [--cycles 1000]

Writes bench/results/sampling-memory-<machine>.md with RSS after warm-up and at the end.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.test_runner_support's toy base


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from tests.test_runner_support import ToyBase, toy_controlnet
    from zeroconv.controlnet_model.checkpoint import save_controlnet
    from zeroconv.nodes.apply import ZeroConvApplyControlNet
    from zeroconv.nodes.loaders import ZeroConvLoadControlNet
    from zeroconv.workflow_runner.host import BaseModel, ModelPatcher
    from zeroconv.workflow_runner.sampling import common_ksampler

    torch.set_num_threads(2)
    base = ToyBase()
    model = ModelPatcher(BaseModel(base), load_device=torch.device("cpu"))
    folder = Path(tempfile.mkdtemp())
    save_controlnet(toy_controlnet(base), folder / "toy.safetensors")
    os.environ["ZEROCONV_CONTROLNET_DIR"] = str(folder)
    attrs_before = set(vars(base.unet))
    image = torch.rand(1, 64, 64, 3)
    samples = []
    with torch.inference_mode():
        for cycle in range(1, args.cycles + 1):
            control = ZeroConvLoadControlNet().load("toy.safetensors")[0]
            positive = [[base.encode_text(["a red circle"]).context, {}]]
            negative = [[base.encode_text([""]).context, {}]]
            pos, neg = ZeroConvApplyControlNet().apply(positive, negative, control, image, 1.0, 0.0, 1.0)
            common_ksampler(model, cycle, 2, 5.0, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)})
            if cycle in (100, args.cycles) or cycle % 250 == 0:
                gc.collect()
                samples.append((cycle, rss_mib()))
    growth = samples[-1][1] - samples[0][1]
    lines = ["# Memory over repeated load/apply/sample cycles", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
             f"Tiny SD1.x-shaped U-Net, 2 euler steps, CFG 5, batch 1 at 64x64 px; {args.cycles} cycles.", "",
             "| cycle | RSS (MiB) |", "| --- | --- |"] + [f"| {c} | {r:.1f} |" for c, r in samples]
    lines += ["", f"Growth from cycle 100 to {args.cycles}: {growth:+.1f} MiB. "
              f"U-Net attributes unchanged: {set(vars(base.unet)) == attrs_before}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sampling-memory-{platform.node() or 'machine'}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
