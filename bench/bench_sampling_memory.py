"""A thousand load/apply/compose/sample cycles in one process: memory must stay flat (nothing leaks).

Runs headless on the CPU with the tiny U-Net and the `zeroconv run` mini host (run from the repo root):

    python bench/bench_sampling_memory.py [--cycles 1000]

Each cycle: our loader (cached per file), our apply node with a mask and a schedule, a second control composed
from two units, then the host's KSampler (2 euler steps, CFG). Writes bench/results/sampling-memory-<machine>.md
with RSS after warm-up and at the end, and checks that every cycle's control objects are freed, that the loader
cache holds one entry per file, and that the U-Net and the ControlNet are unchanged.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
import weakref
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
    from zeroconv.controlnet_model.checkpoint import _cached, save_controlnet
    from zeroconv.nodes.apply import ZeroConvApplyControlNet, ZeroConvStrengthSchedule
    from zeroconv.nodes.compose import ZeroConvComposeControlNets, ZeroConvControlUnit
    from zeroconv.nodes.loaders import ZeroConvLoadControlNet
    from zeroconv.workflow_runner.offline import sample

    torch.set_num_threads(1)
    base = ToyBase()
    folder = Path(tempfile.mkdtemp())
    save_controlnet(toy_controlnet(base), folder / "toy.safetensors")
    save_controlnet(toy_controlnet(base, seed=8), folder / "toy2.safetensors")
    os.environ["ZEROCONV_CONTROLNET_DIR"] = str(folder)
    unet_attrs = set(vars(base.unet))
    image, image2 = torch.rand(1, 64, 64, 3), torch.rand(1, 48, 80, 3)
    mask = torch.ones(1, 64, 64)
    mask[:, :, :16] = 0.0
    schedule = ZeroConvStrengthSchedule().build("0:1.0, 0.5:0.5", "linear")[0]
    samples, made, loaded_weights, start = [], [], None, time.perf_counter()
    with torch.inference_mode():
        for cycle in range(1, args.cycles + 1):
            control = ZeroConvLoadControlNet().load("toy.safetensors")[0]
            other = ZeroConvLoadControlNet().load("toy2.safetensors")[0]
            if loaded_weights is None:
                net = control.parts[0].controlnet
                loaded_weights = {k: v.clone() for k, v in net.state_dict().items()}
            stack = ZeroConvControlUnit().add(other, image2, 0.6, 0.0, 0.8)[0]
            stack = ZeroConvControlUnit().add(control, image, 0.4, 0.2, 1.0, stack=stack)[0]
            composed = ZeroConvComposeControlNets().compose(stack)[0]
            positive = [[base.encode_text(["a red circle"]).context, {}]]
            negative = [[base.encode_text([""]).context, {}]]
            pos, neg = ZeroConvApplyControlNet().apply(positive, negative, control, image, 1.0, 0.0, 1.0, mask=mask,
                                                       schedule=schedule)
            pos, neg = ZeroConvApplyControlNet().apply(pos, neg, composed, image, 1.0, 0.0, 1.0)
            sample(base, cycle, 2, 5.0, pos, neg, torch.zeros(1, 4, 8, 8))
            made.append(weakref.ref(pos[0][1]["control"]))
            del control, other, stack, composed, pos, neg
            if cycle in (100, args.cycles) or cycle % 250 == 0:
                gc.collect()
                samples.append((cycle, rss_mib()))
    gc.collect()
    seconds = time.perf_counter() - start
    freed = sum(ref() is None for ref in made)
    unchanged = all(torch.equal(v, loaded_weights[k]) for k, v in
                    ZeroConvLoadControlNet().load("toy.safetensors")[0].parts[0].controlnet.state_dict().items())
    growth = samples[-1][1] - samples[0][1]
    lines = ["# Memory over repeated load/apply/compose/sample cycles", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
             f"Tiny SD1.x-shaped U-Net; per cycle: 2 loads (cached), apply with mask + schedule, a composition of two "
             f"units applied after it, KSampler 2 euler steps, CFG 5, batch 1 at 64x64 px; {args.cycles} cycles in "
             f"{seconds:.0f} s.", "",
             "| cycle | RSS (MiB) |", "| --- | --- |"] + [f"| {c} | {r:.1f} |" for c, r in samples]
    lines += ["", f"Growth from cycle 100 to {args.cycles}: {growth:+.1f} MiB. "
              f"Control objects freed: {freed} of {len(made)}. Loader cache entries: {_cached.cache_info().currsize}. "
              f"U-Net attributes unchanged: {set(vars(base.unet)) == unet_attrs}. ControlNet weights unchanged: "
              f"{unchanged}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sampling-memory-{platform.node() or 'machine'}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if growth < 8.0 and freed == len(made) and unchanged else 1


if __name__ == "__main__":
    raise SystemExit(main())
