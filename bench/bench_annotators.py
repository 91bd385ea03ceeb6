"""Images per second of annotators at 512x512, batch 1 and 16: Canny (OpenCV on the CPU; kornia on the CPU and, where
there is one, the GPU) and learned annotators (HED soft edges, the ControlNet v1.1 network, and M-LSD large, with random
weights: throughput does not depend on the weight values, so no download is needed; M-LSD's line drawing does a
little).

    python bench/bench_annotators.py [--quick]

Everything goes through `annotators.registry.annotate` (detect resolution 512), as the nodes call it, except kornia
on the CPU, which `annotate` never picks (OpenCV is faster there) and is timed through the spec's batch function.
Writes bench/results/annotators-<machine>.md.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from zeroconv.annotators.learned.base import randomize
from zeroconv.annotators.learned.hed import ControlNetHED
from zeroconv.annotators.learned.mlsd import MLSDLarge
from zeroconv.annotators.registry import annotate, get

SIZE = 512


def _rate(fn: Callable[[], object], batch: int, repeats: int) -> float:
    fn()  # warm-up (first CUDA kernels, caches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


# Learned rows: (label, annotator, net factory); random weights in the real layout (no download needed).
LEARNED: tuple[tuple[str, str, Callable[[], torch.nn.Module]], ...] = (
    ("hed (learned, ControlNetHED)", "hed", ControlNetHED),
    ("mlsd (learned, M-LSD large)", "mlsd", MLSDLarge),
)


def _random_cache(factory: Callable[[], torch.nn.Module], device: str) -> Callable[..., torch.nn.Module]:
    net = randomize(factory()).eval().requires_grad_(False).to(device)
    return lambda spec, dev: net


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat per row (a smoke run)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    kornia_canny = get("canny").batch_fn
    rows = []
    for batch in (1, 16):
        images = rng.integers(0, 255, (batch, SIZE, SIZE, 3), dtype=np.uint8)
        repeats = 1 if args.quick else 5
        rows.append(("canny, OpenCV", "cpu", batch, _rate(lambda: annotate("canny", images, device="cpu"),
                                                           batch, repeats)))
        for device in devices:
            run = ((lambda: kornia_canny(images, device="cpu")) if device == "cpu"
                   else (lambda: annotate("canny", images, device=device)))
            rows.append(("canny, kornia", device, batch, _rate(run, batch, repeats)))
        for (label, name, factory), device in itertools.product(LEARNED, devices):
            cache = _random_cache(factory, device)
            heavy = 1 if args.quick or (device == "cpu" and batch > 1) else 3
            rows.append((label, device, batch,
                         _rate(lambda: annotate(name, images, device=device, model_cache=cache), batch, heavy)))
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    lines = [f"# Annotator throughput at {SIZE}x{SIZE}", "",
             f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores{gpu}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; random images; "
             "images/s after one warm-up call (5 repeats; learned: 3, and 1 on the CPU at batch 16).", "",
             "| annotator | device | batch | images/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {device} | {batch} | {rate:.1f} |" for name, device, batch, rate in rows]
    out = Path(__file__).parent / "results" / f"annotators-{platform.node() or 'machine'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
