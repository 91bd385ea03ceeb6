"""ControlNet forward time on a GPU: ZeroConv eager / compiled / CUDA-graphed vs diffusers eager / graphed.

Same random SD1.5 weights (ours exported to diffusers), fp16, batch 2, 512x512 (latent 64x64), 77 tokens.
Reference (issue): diffusers eager 14.4 ms, CUDA-graphed 3.8 ms on an H100. Needs CUDA; elsewhere it says so
and writes nothing.

    python bench/bench_controlnet_forward.py [--iters 100]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch


def _time(fn: Callable[[], object], iters: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_controlnet_forward needs a CUDA device; nothing measured, nothing written", file=sys.stderr)
        return 1
    from diffusers import ControlNetModel

    from zeroconv.controlnet_model import ControlNet, preset
    from zeroconv.controlnet_model.accelerate import accelerate
    from zeroconv.controlnet_model.checkpoint import export_diffusers

    torch.manual_seed(0)
    ours = ControlNet(preset("sd15")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_diffusers(ours, tmp)
        theirs = ControlNetModel.from_pretrained(tmp, torch_dtype=torch.float16).cuda().eval()
    ours = ours.half().cuda()
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = torch.tensor([500, 500], device="cuda")
    ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    hint = torch.rand(2, 3, 512, 512, device="cuda", dtype=torch.float16)
    rows = []
    with torch.no_grad():
        guided = ours.encode_hint(hint)
        rows.append(("diffusers eager", _time(lambda: theirs(x, t, ctx, hint, return_dict=False), args.iters)))
        rows.append(("diffusers CUDA graph", _time(_graphed(lambda: theirs(x, t, ctx, hint, return_dict=False)),
                                                   args.iters)))
        rows.append(("ZeroConv eager (hint encoded per call)", _time(lambda: ours(x, hint, t, ctx), args.iters)))
        rows.append(("ZeroConv eager (hint cached per run)", _time(lambda: ours(x, None, t, ctx, guided_hint=guided),
                                                                   args.iters)))
        for mode in ("compile", "cuda_graph"):
            fast = accelerate(ours, mode)
            rows.append((f"ZeroConv {mode} (hint cached)",
                         _time(lambda: fast(x, None, t, ctx, guided_hint=guided), args.iters)))
    device = torch.cuda.get_device_name()
    lines = ["# ControlNet forward (SD1.5 shapes, fp16, batch 2, 512x512)", "",
             f"Device: {device}; torch {torch.__version__}; host {platform.node()}; {args.iters} iterations, CUDA events.",
             "", "| variant | ms per forward |", "| --- | --- |"] + [f"| {n} | {ms:.2f} |" for n, ms in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"forward-{device.replace(' ', '_')}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
