"""Images per second of annotators at 512x512: OpenCV Canny, kornia Canny (CPU, and GPU where there is one).

    python bench/bench_annotators.py

Learned annotators are not in this build yet; their rows are added when they land. Writes
bench/results/annotators-<machine>.md.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from zeroconv.annotators.registry import annotate, annotate_on_device


def _rate(fn, batch: int, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> int:
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 16):
        images = rng.integers(0, 255, (batch, 512, 512, 3), dtype=np.uint8)
        rows.append(("canny, OpenCV", "cpu", batch, _rate(lambda: annotate("canny", images, 0), batch)))
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            rows.append(("canny, kornia", device, batch,
                         _rate(lambda: annotate_on_device("canny", images, device), batch)))
    lines = ["# Annotator throughput at 512x512", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}; random images; mean over 5 repeats after a warm-up.", "",
             "| annotator | device | batch | images/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {device} | {batch} | {rate:.1f} |" for name, device, batch, rate in rows]
    out = Path(__file__).parent / "results" / f"annotators-{platform.node() or 'machine'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
