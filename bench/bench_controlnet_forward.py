"""ControlNet forward time on a GPU: ZeroConv eager / compiled / CUDA-graphed vs diffusers' ControlNetModel.

Same random weights (ours exported to diffusers), fp16, batch 2 (cond + uncond), 77 tokens; SD1.5 at 512x512
(latent 64x64) and SDXL at 1024x1024 (latent 128x128, with its pooled-text/time vector). Rows:
  * diffusers ControlNetModel eager, and the same call captured as a CUDA graph;
  * ZeroConv's ControlNet eager (hint encoded per call, and cached per run as sampling does), compiled, graphed;
  * ZeroConv through the host adapter: one `get_control` per model call as ComfyUI's sampler makes it
    (sigma -> timestep, input scaling, the residual dict), with acceleration none and cuda_graph.
Reference (issue): diffusers eager 14.4 ms, CUDA-graphed 3.8 ms on an H100 (SD1.5). Needs CUDA; elsewhere it
says so and writes nothing; `--smoke` runs every row that does not need CUDA with tiny presets on the CPU.

    python bench/bench_controlnet_forward.py [--iters 100] [--presets sd15,sdxl] [--out DIR]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch


def cuda_time(fn: Callable[[], object], iters: int, warmup: int = 10) -> float:
    """Milliseconds per call, by CUDA events, after warm-up (compilation and graph capture happen there)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured as one CUDA graph (static inputs), replayed per call."""
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


class _EpsSampling:
    """What the adapter needs from ComfyUI's model_sampling (SD1.5 eps, scaled-linear betas)."""

    def __init__(self, device: torch.device):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        cumprod = torch.cumprod(1 - betas, 0)
        self.log_sigmas = ((1 - cumprod) / cumprod).sqrt().log().float().to(device)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.log_sigmas[None, :] - sigma.log()[:, None]).abs().argmin(dim=1).to(sigma.device)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma[:, None, None, None] ** 2 + 1).sqrt()

    def percent_to_sigma(self, percent: float) -> float:
        return 1e9 if percent <= 0 else 0.0 if percent >= 1 else float(self.log_sigmas[int((1 - percent) * 999)].exp())


def measure(device: torch.device, timer: Callable[[Callable[[], object], int], float], iters: int,
            preset_name: str = "sd15", size: int = 64, tokens: int = 77, dtype: torch.dtype = torch.float16,
            with_diffusers: bool = True, graphs: bool = True, adapter: bool = True) -> list[tuple[str, float]]:
    """(variant, ms per forward) rows; the CPU smoke test calls this with a tiny preset and a wall-clock timer."""
    from zeroconv.controlnet_model import ControlNet, preset
    from zeroconv.controlnet_model.accelerate import accelerate
    from zeroconv.controlnet_model.checkpoint import export_diffusers
    from zeroconv.nodes.apply import ZeroConvApplyControlNet
    from zeroconv.nodes.host.control import ControlPart, make_control

    torch.manual_seed(0)
    ours = ControlNet(preset(preset_name)).eval()
    with torch.no_grad():
        for p in ours.parameters():  # random everywhere, zero convs included: the same work as trained weights
            p.normal_(0.0, 0.02)
    rows = []
    cfg = ours.config
    x = torch.randn(2, cfg.in_channels, size, size, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    ctx = torch.randn(2, tokens, cfg.context_dim, device=device, dtype=dtype)
    hint = torch.rand(2, 3, size * 8, size * 8, device=device, dtype=dtype)
    y, extra = None, {}
    if cfg.adm_in_channels:  # SDXL: our y vector; diffusers' the pooled text and the six size/crop numbers
        y = torch.randn(2, cfg.adm_in_channels, device=device, dtype=dtype)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
                                       "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}}
    with torch.no_grad():
        if with_diffusers:
            from diffusers import ControlNetModel

            with tempfile.TemporaryDirectory() as tmp:
                export_diffusers(ours, tmp)
                theirs = ControlNetModel.from_pretrained(tmp, torch_dtype=dtype).to(device).eval()
            rows.append(("diffusers ControlNetModel eager",
                         timer(lambda: theirs(x, t, ctx, hint, return_dict=False, **extra), iters)))
            if graphs:
                rows.append(("diffusers ControlNetModel CUDA graph",
                             timer(graphed(lambda: theirs(x, t, ctx, hint, return_dict=False, **extra)), iters)))
            del theirs
        ours = ours.to(device, dtype)
        guided = ours.encode_hint(hint)
        rows.append(("ZeroConv eager (hint encoded per call)", timer(lambda: ours(x, hint, t, ctx, y), iters)))
        rows.append(("ZeroConv eager (hint cached per run)",
                     timer(lambda: ours(x, None, t, ctx, y, guided_hint=guided), iters)))
        for mode in ("compile", "cuda_graph") if graphs else ():
            fast = accelerate(ours, mode)
            rows.append((f"ZeroConv {mode} (hint cached)",
                         timer(lambda: fast(x, None, t, ctx, y, guided_hint=guided), iters)))
            if mode == "cuda_graph":  # the replayed result is the eager one
                eager, replayed = ours(x, None, t, ctx, y, guided_hint=guided), fast(x, None, t, ctx, y,
                                                                                     guided_hint=guided)
                err = max(float((a - b).abs().max()) for a, b in zip(eager.all, replayed.all))
                rows.append(("ZeroConv cuda_graph vs eager, max abs difference (not ms)", err))
        if not adapter:
            return rows
        ms = _EpsSampling(device)
        model = SimpleNamespace(model_sampling=ms, latent_format=SimpleNamespace(latent_channels=cfg.in_channels),
                                diffusion_model=SimpleNamespace(config=cfg))
        sigma = torch.full((2,), 3.0, device=device)
        image = torch.rand(1, size * 8, size * 8, 3)
        cond = {"c_crossattn": ctx}
        for mode in ("none", "cuda_graph") if graphs else ("none",):
            positive, _ = ZeroConvApplyControlNet().apply([[ctx[:1], {}]], [[ctx[1:], {}]],
                                                         make_control((ControlPart(ours, name="bench"),)), image,
                                                         1.0, 0.0, 1.0, accelerate=mode)
            control = positive[0][1]["control"]
            control.pre_run(model, ms.percent_to_sigma)
            try:
                rows.append((f"ZeroConv via the ComfyUI adapter, get_control per model call ({mode})",
                             timer(lambda: control.get_control(x, sigma, cond, 2, {"cond_or_uncond": [0, 1]}),
                                   iters)))
            finally:
                control.cleanup()
    return rows


def wall_time(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Milliseconds per call by wall clock (the CPU smoke path)."""
    import time

    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) * 1000 / iters


SIZES = {"sd15": 64, "sdxl": 128}  # latent sides: 512x512 and 1024x1024 images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--presets", default="sd15,sdxl")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny presets on the CPU, eager rows only; writes nothing")
    args = parser.parse_args()
    if args.smoke:
        for name in ("tiny", "tiny-sdxl"):
            for row in measure(torch.device("cpu"), wall_time, 2, name, size=8, dtype=torch.float32, graphs=False,
                               with_diffusers=name == "tiny", adapter=name == "tiny"):
                print(f"smoke {name}: {row[0]}: {row[1]:.2f}")
        return 0
    if not torch.cuda.is_available():
        print("bench_controlnet_forward needs a CUDA device; nothing measured, nothing written", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    lines = [f"# ControlNet forward (fp16, batch 2), {device}", "",
             f"torch {torch.__version__}; host {platform.node()}; {args.iters} iterations after warm-up, CUDA events.",
             "Reference (issue, H100, SD1.5): diffusers eager 14.4 ms, diffusers CUDA graph 3.8 ms.", ""]
    for name in args.presets.split(","):
        rows = measure(torch.device("cuda"), cuda_time, args.iters, name, size=SIZES[name], adapter=name == "sd15")
        base = next((ms for n, ms in rows if n == "diffusers ControlNetModel eager"), None)
        side = SIZES[name] * 8
        lines += [f"## {name} ({side}x{side})", "", "| variant | ms per forward | / diffusers eager |", "| --- | --- | --- |"]
        lines += [f"| {n} | {ms:.3g} | {ms / base:.2f} |" if base and "not ms" not in n else f"| {n} | {ms:.3g} | |"
                  for n, ms in rows]
        lines.append("")
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"forward-{device.replace(' ', '_')}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
