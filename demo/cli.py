"""`zeroconv demo`: see ZeroConv work end to end, offline, in well under a minute on a CPU."""
from __future__ import annotations

import argparse

from .run import DEFAULT_SEED


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="generate the demo world with and without its ControlNet, measured",
                                   description=__doc__)
    parser.add_argument("--out", default="zeroconv_demo.png", help="PNG grid to write (condition | without | with)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the outlines, captions and noise")
    parser.add_argument("--count", type=int, default=6, help="number of outlines")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the ControlNet's validation)")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the ControlNet's validation)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .run import run_demo

    result = run_demo(args.out, seed=args.seed, count=args.count, cfg_scale=args.cfg, steps=args.steps,
                      threads=args.threads)
    print(f"{'caption':<40} {'IoU with':>9} {'IoU without':>12} {'colours with/without':>21}")
    for s in result.samples:
        print(f"{s.caption:<40} {s.iou_with:>9.3f} {s.iou_without:>12.3f} "
              f"{'yes' if s.colours_with else 'no':>11}/{'yes' if s.colours_without else 'no'}")
    print(f"mean IoU with the ControlNet {result.iou_with:.3f}, without {result.iou_without:.3f}")
    print(f"colour accuracy with {result.colour_accuracy_with:.2f}, without {result.colour_accuracy_without:.2f}")
    print(f"DDIM {result.steps} steps, CFG {result.cfg_scale:g}; wrote {result.grid} in {result.wall_s:.1f} s")
    return 0
