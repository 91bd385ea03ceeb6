"""Condition fidelity of the demo ControlNet against training steps (the paper's 'sudden convergence', Zhang et
al. 2023 §4.3, Fig. 21), read from the checkpoints of the standard `zeroconv train` run.

    python -m zeroconv.demo.world --out data/world --count 10000 --size 64 --seed 1
    zeroconv train examples/world_controlnet.toml          # writes output/world_controlnet/checkpoints/
    pip install -e ".[bench]"                              # matplotlib, for the plot
    python bench/convergence/measure.py --run output/world_controlnet --count 32 --steps 10
    # early/: the same config with max_steps = 600, save_every = 20, output_dir = "output/world_controlnet_early"
    # (deterministic: the same losses as the full run), measured with --run that folder --out bench/convergence/early

Every saved checkpoint generates the same held-out outlines with their captions (DDIM and CFG of the run's
validation); the IoU of the generated shape with the outline's filled area is plotted with the run's own
validation fidelity (edge F1 of Canny on the samples) and its loss, into curve.png and curve.json here.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch

from zeroconv.controlnet_model.checkpoint import load_controlnet
from zeroconv.controlnet_model.from_unet import init_from_unet
from zeroconv.demo.run import BASE_FILE, generate, score, validation_settings
from zeroconv.training.base import load_base
from zeroconv.demo.world import random_specs, render_outline

logger = logging.getLogger("convergence")
HERE = Path(__file__).resolve().parent
HELD_OUT_SEED = 77  # outlines no training row or demo uses


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, native weights file) of every checkpoint the run kept, in step order."""
    found = [(int(re.search(r"step(\d+)", p.stem).group(1)), p)
             for p in (run / "checkpoints").glob("controlnet-step*.safetensors")]
    if not found:
        raise FileNotFoundError(f"no checkpoints in {run / 'checkpoints'}; run `zeroconv train` with save_every > 0")
    return sorted(found)


def measure(base, controlnet, specs, cfg_scale: float, steps: int, seed: int) -> tuple[float, float]:
    """Mean IoU and colour accuracy of `controlnet` on the outlines of `specs`."""
    outlines = np.stack([render_outline(s, base.image_size) for s in specs])
    hints = torch.from_numpy(outlines).permute(0, 3, 1, 2).float() / 255.0
    captions = [s.caption for s in specs]
    images = generate(base, captions, hints, controlnet, cfg_scale, steps, seed)
    scores = score(specs, images, images)
    return float(np.mean([s.iou_with for s in scores])), float(np.mean([s.colours_with for s in scores]))


def sudden_convergence(points: list[tuple[int, float]]) -> dict[str, float | int | None]:
    """Where the IoU rise happens: steps at 10 %, 50 % and 90 % of the way from the first value to the last plateau."""
    steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    start, end = values[0], float(np.median(values[-3:]))
    if end - start < 0.2:
        return {"start": float(start), "end": end, "step10": None, "step50": None, "step90": None}

    def first_at(share: float) -> int:
        return int(steps[np.argmax(values >= start + share * (end - start))])

    return {"start": float(start), "end": end, "step10": first_at(0.1), "step50": first_at(0.5),
            "step90": first_at(0.9)}


def plot(points: list[tuple[int, float]], history: dict, found: dict, count: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot(*zip(*points), "o-", color="C3", label=f"IoU, generated shape vs filled outline ({count} held-out)")
    if history.get("fidelity"):
        ax1.plot(*zip(*history["fidelity"]), ".-", color="C0", alpha=0.7, label="edge F1, Canny of samples (validation)")
    if found["step50"] is not None:
        ax1.axvline(found["step50"], color="gray", ls="--", lw=1)
        ax1.text(found["step50"], 0.02, f" 50% of the rise: step {found['step50']}", color="gray")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("condition fidelity")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("Demo-world ControlNet: condition fidelity during training")
    losses = np.array(history.get("losses", []))
    if losses.size:
        window = min(50, losses.size)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax2.plot(np.arange(window, losses.size + 1), smooth, color="k", lw=1)
    ax2.set_ylabel(f"loss ({min(50, max(1, losses.size))}-step mean)")
    ax2.set_xlabel("optimizer step (batch 16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="output/world_controlnet", help="output_dir of the zeroconv train run")
    parser.add_argument("--base", default=str(BASE_FILE), help="the world base the run trained against")
    parser.add_argument("--count", type=int, default=16, help="held-out outlines per checkpoint")
    parser.add_argument("--out", default=str(HERE), help="folder for curve.png and curve.json")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's validation)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    history = json.loads((run / "history.json").read_text())
    kept = checkpoints(run)
    cfg_scale, steps = validation_settings(kept[-1][1])
    steps = args.steps or steps
    base = load_base(args.base)
    specs = random_specs(args.count, HELD_OUT_SEED)
    fresh, _ = init_from_unet(base.unet)  # step 0: zero convs at zero, the base alone
    points, colours = [], []
    start = time.time()
    for step, path in [(0, None), *kept]:
        controlnet = fresh if path is None else load_controlnet(path, dtype=torch.float32).model
        value, colour = measure(base, controlnet.eval(), specs, cfg_scale, steps, HELD_OUT_SEED)
        points.append((step, value))
        colours.append((step, colour))
        logger.info("step %5d  IoU %.3f  colour accuracy %.2f  (%.0f s)", step, value, colour, time.time() - start)
    found = sudden_convergence(points)
    out = Path(args.out)
    (out / "curve.json").write_text(json.dumps({"iou": points, "colour_accuracy": colours, "edge_f1":
                                                history.get("fidelity", []), "transition": found,
                                                "cfg_scale": cfg_scale, "sample_steps": steps,
                                                "held_out_seed": HELD_OUT_SEED, "count": args.count}, indent=1))
    plot(points, history, found, args.count, out / "curve.png")
    logger.info("IoU %.3f -> %.3f; 10/50/90 %% of the rise at steps %s / %s / %s", found["start"], found["end"],
                found["step10"], found["step50"], found["step90"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
