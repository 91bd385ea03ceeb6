"""Per-step cost of a Union ControlNet (1 and 2 types) and of a T2I-Adapter, relative to the plain ControlNet.

Random weights, fp32, batch 2 (cond + uncond), 77 text tokens, on the CPU (or CUDA with --device cuda). The
Union and the plain ControlNet share one set of SDXL ControlNet weights (the plain one is the Union without its
extra modules), so the rows differ only by what a Union adds. Variants, timed one call each in turn within every
repetition (interleaved, so drifts in machine load hit all rows alike):
  * plain ControlNet forward, hint encoded once per run (as sampling does);
  * Union, one type and two types in one forward, hint encodings cached per run (UnionCondition.encoded);
  * Union, two types, each hint encoded in every call (what diffusers' pipeline does);
  * SDXL T2I-Adapter per step: its cached features scaled for the step (AdapterCache hit), and, once per latent
    size, the adapter's own forward.
Default shapes: the full SDXL ControlNet (10-block level 3) and SDXL adapter, at a reduced 256x256 image (latent
32x32) so that it runs in minutes on 2 CPU cores; --latent 128 gives 1024x1024.

    python bench/bench_union_adapter.py [--latent 32] [--reps 7] [--device cpu] [--machine vm]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def _random(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


def build(preset_name: str, device: torch.device, dtype: torch.dtype):
    """(plain ControlNet, Union ControlNet sharing its weights, SDXL adapter)."""
    from zeroconv.controlnet_model import ControlNet, preset
    from zeroconv.controlnet_model.t2i_adapter import AdapterConfig, AdapterKind, T2IAdapter
    from zeroconv.controlnet_model.union import UnionConfig, UnionControlNet

    cfg = UnionConfig(num_control_types=8).attach(preset(preset_name))
    with torch.device("meta"):
        union = UnionControlNet(cfg)
    union = _random(union.to_empty(device=device).to(dtype)).eval()
    with torch.device("meta"):
        plain = ControlNet(preset(preset_name))
    plain.load_state_dict({k: v for k, v in union.state_dict().items() if k in plain.state_dict()}, assign=True)
    if preset_name.startswith("sdxl"):
        adapter_cfg = AdapterConfig(AdapterKind.FULL_XL)  # SDXL adapters: 320/640/1280/1280
    elif preset_name == "sd15":
        adapter_cfg = AdapterConfig(AdapterKind.FULL)
    else:  # tiny presets (smoke test): one adapter level per U-Net level
        adapter_cfg = AdapterConfig(AdapterKind.FULL, channels=cfg.channel_widths)
    adapter = _random(T2IAdapter(adapter_cfg))
    return plain.eval(), union, adapter.to(device, dtype).eval()


def measure(preset_name: str, latent: int, reps: int, device: torch.device,
            dtype: torch.dtype = torch.float32) -> dict[str, list[float]]:
    """Seconds per call of each variant, one list entry per repetition (the CPU smoke test calls this tiny)."""
    from zeroconv.controlnet_model.residuals import AdapterUnit, run_adapter
    from zeroconv.controlnet_model.union import UnionCondition

    plain, union, adapter = build(preset_name, device, dtype)
    cfg = plain.config
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, cfg.in_channels, latent, latent, generator=gen).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=gen).to(device, dtype)
    y = torch.randn(2, cfg.adm_in_channels, generator=gen).to(device, dtype) if cfg.adm_in_channels else None
    hints = [torch.rand(1, 3, latent * 8, latent * 8, generator=gen).to(device, dtype) for _ in range(2)]
    unit = AdapterUnit(adapter, hints[0], unet_config=cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        guided = [plain.encode_hint(h) for h in hints]
        one = [UnionCondition(3, None, 1.0, guided[0])]
        two = [UnionCondition(3, None, 0.8, guided[0]), UnionCondition(1, None, 0.6, guided[1])]
        two_raw = [UnionCondition(3, hints[0], 0.8), UnionCondition(1, hints[1], 0.6)]
        variants: dict[str, Callable[[], object]] = {
            "plain ControlNet (hint cached)": lambda: plain(x, None, t, ctx, y, guided_hint=guided[0]),
            "Union, 1 type (hint cached)": lambda: union(x, None, t, ctx, y, conditions=one),
            "Union, 2 types in one forward (hints cached)": lambda: union(x, None, t, ctx, y, conditions=two),
            "Union, 2 types, hints encoded per call": lambda: union(x, None, t, ctx, y, conditions=two_raw),
            "T2I-Adapter per step (features cached)": lambda: run_adapter(unit, x, 0.5),
            "T2I-Adapter forward (once per latent size)": lambda: adapter(hints[0]),
        }
        for fn in variants.values():  # warm-up: allocator, kernels, the adapter cache
            fn()
        print("warm-up done", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):
            for name, fn in variants.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
            print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    assert unit.cache.runs == 1, "the adapter ran more than once for one latent size"
    return times


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(times: dict[str, list[float]], args: argparse.Namespace, device: torch.device) -> str:
    base = statistics.median(times["plain ControlNet (hint cached)"])
    machine = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"{_cpu_name()}, {len(os.sched_getaffinity(0))} cores available, torch threads {torch.get_num_threads()}")
    px = args.latent * 8
    lines = [f"# Union ControlNet and T2I-Adapter per-step cost ({args.preset} shapes, {px}x{px}, fp32, batch 2)", "",
             f"Machine: {machine}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}.",
             f"Command: `python bench/bench_union_adapter.py --preset {args.preset} --latent {args.latent} "
             f"--reps {args.reps} --device {args.device}`. Random weights; Union with 8 types; "
             f"{'SDXL adapter (full_adapter_xl)' if args.preset.startswith('sdxl') else 'full adapter'}.",
             f"{args.reps} interleaved repetitions after one warm-up call each; median and min-max of wall-clock "
             "time per call; 'relative' is the median over the plain ControlNet's median.",
             "", "| variant | median ms | min-max ms | relative to plain |", "| --- | --- | --- | --- |"]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med * 1e3:.1f} | {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} | "
                     f"{med / base:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--machine", default="vm", help="name in the result file: union-adapter-<machine>.md")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu", file=sys.stderr)
        return 1
    times = measure(args.preset, args.latent, args.reps, device)
    text = report(times, args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"union-adapter-{args.machine}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
