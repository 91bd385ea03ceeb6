"""Sampling step time in a real ComfyUI on the CPU: no ControlNet, ComfyUI core's ControlNet, ours, two of each.

SD1.5 full-size U-Net and ControlNets with random weights (no download), fp32 on the CPU, a 256x256 image (latent
32x32), euler, CFG 7 (the U-Net and each ControlNet run on a batch of 2, cond + uncond). Both ControlNets are the
same fp16 files, loaded by core's ControlNetLoader and by our ZeroConvLoadControlNet. Scenarios:
  * none: the uncontrolled step;
  * core / ours: one ControlNet through core's ControlNetApplyAdvanced / our ZeroConvApplyControlNet;
  * core chain / ours composed: two ControlNets, two core apply nodes chained vs our Compose node in one apply.
Each repetition runs every scenario once (interleaved, so a burst of load from elsewhere hits all alike), each a
`common_ksampler` call of `--steps` steps; the step time is that call's wall time / steps (setup per run, e.g. the
hint encoded once, included). The ControlNets' own share is timed in the same runs: the outermost `get_control`
per model call (their forward plus the residual merge). Also checked: ours vs core's final latents (same file).
Writes bench/results/comfyui-step-<machine>.md with medians, ranges, machine, versions and load averages.

    COMFYUI_PATH=<ComfyUI checkout> COMFYUI_PYTHON=<its python> python bench/bench_comfyui_step.py \\
        [--repeats 5] [--steps 1] [--threads 2]

On 2 cores an uncontrolled step takes ~4 s: the default (5 repetitions x 5 scenarios x 1 step) takes ~3-4 min.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from _machine import comfyui_version, load_average, machine, write_table  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]

BODY = textwrap.dedent("""
    import json, sys, tempfile, threading, time
    from pathlib import Path
    repeats, steps, threads, side = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    modes = sys.argv[5].split(",")
    torch.set_num_threads(threads)
    import comfy.controlnet, comfy.model_management as mm, comfy.supported_models, folder_paths, nodes
    from comfy.model_patcher import ModelPatcher
    from zeroconv_pack.controlnet_model import ControlNet, preset
    from zeroconv_pack.controlnet_model.checkpoint import save_controlnet
    from zeroconv_pack.nodes.host.control import ZeroConvControl
    N = pack.NODE_CLASS_MAPPINGS

    def randomised(module, std, seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, std, generator=gen)
        return module

    unet_config = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                       channel_mult=[1, 2, 4, 4], use_spatial_transformer=True,
                       transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                       context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                       adm_in_channels=None, use_temporal_attention=False, legacy=False)
    conf = comfy.supported_models.SD15(unet_config)
    cuda = torch.cuda.is_available() and not args.cpu
    conf.set_inference_dtype(torch.float16 if cuda else torch.float32, None)
    base = conf.get_model({})
    randomised(base.diffusion_model, 0.02, 0)
    model = ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    folder = Path(tempfile.mkdtemp())
    for seed, name in ((1, "cn_a.safetensors"), (2, "cn_b.safetensors")):
        save_controlnet(randomised(ControlNet(preset("sd15")), 0.02, seed).half(), folder / name)
    folder_paths.add_model_folder_path("controlnet", str(folder))
    core_a = nodes.ControlNetLoader().load_controlnet("cn_a.safetensors")[0]
    core_b = nodes.ControlNetLoader().load_controlnet("cn_b.safetensors")[0]
    ours_a = N["ZeroConvLoadControlNet"]().load("cn_a.safetensors")[0]
    ours_b = N["ZeroConvLoadControlNet"]().load("cn_b.safetensors")[0]

    gen = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 768, generator=gen), {}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    image_a, image_b = torch.rand(1, side, side, 3, generator=gen), torch.rand(1, side, side, 3, generator=gen)
    latent = {"samples": torch.zeros(1, 4, side // 8, side // 8)}
    core_apply, our_apply = nodes.ControlNetApplyAdvanced().apply_controlnet, N["ZeroConvApplyControlNet"]().apply
    unit = N["ZeroConvControlUnit"]().add

    def composed(mode):
        first = unit(ours_a, image_a, 1.0, 0.0, 1.0, accelerate=mode)[0]
        return N["ZeroConvComposeControlNets"]().compose(unit(ours_b, image_b, 0.7, 0.0, 1.0, accelerate=mode,
                                                              stack=first)[0])[0]

    scenarios = {
        "none": (pos, neg),
        "core": core_apply(pos, neg, core_a, image_a, 1.0, 0.0, 1.0),
        "core chain": core_apply(*core_apply(pos, neg, core_a, image_a, 1.0, 0.0, 1.0), core_b, image_b, 0.7, 0.0,
                                 1.0),
    }
    for mode in modes:
        tag = "" if mode == "none" else f" [{mode}]"
        scenarios["ours" + tag] = our_apply(pos, neg, ours_a, image_a, 1.0, 0.0, 1.0, accelerate=mode)
        scenarios["ours composed" + tag] = our_apply(pos, neg, composed(mode), image_a, 1.0, 0.0, 1.0,
                                                     accelerate=mode)

    control_times, depth = [], threading.local()
    def timed(fn):
        def wrapper(*args, **kwargs):
            outer = not getattr(depth, "n", 0)
            depth.n = getattr(depth, "n", 0) + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n -= 1
                if outer and cuda:
                    torch.cuda.synchronize()  # GPU work is asynchronous: time it to its end
                if outer:
                    control_times.append(time.perf_counter() - start)
        return wrapper
    comfy.controlnet.ControlNet.get_control = timed(comfy.controlnet.ControlNet.get_control)
    ZeroConvControl.get_control = timed(ZeroConvControl.get_control)

    def sample(p, n):
        return nodes.common_ksampler(model, 42, steps, 7.0, "euler", "normal", p, n, latent)[0]["samples"]

    for p, n in scenarios.values():  # warm-up: allocations, the U-Net placed, compilation and graph capture
        sample(p, n)
    step = {k: [] for k in scenarios}
    control = {k: [] for k in scenarios}
    out = {}
    for _ in range(repeats):
        for name, (p, n) in scenarios.items():
            control_times.clear()
            start = time.perf_counter()
            out[name] = sample(p, n)
            step[name].append((time.perf_counter() - start) / steps)
            if control_times:
                control[name].append(statistics.median(control_times))
    # the two ControlNet forwards alone, same weights and inputs as one CFG model call (batch 2), interleaved: core's
    # runs its hint block at every call (comfy/cldm/cldm.py), ours takes the hint encoded once per run
    ours_net, core_net = ours_a.parts[0].controlnet, core_a.control_model
    gen = torch.Generator().manual_seed(2)
    fx, ft = torch.randn(2, 4, side // 8, side // 8, generator=gen), torch.full((2,), 500.0)
    fctx, fhint = torch.randn(2, 77, 768, generator=gen), image_a.movedim(-1, 1).expand(2, -1, -1, -1)
    forward = {"core": [], "ours": [], "ours + encode": []}

    def on(net, *tensors):  # the inputs where the net's weights are now, in their dtype
        w = next(net.parameters())
        return [v.to(w.device, w.dtype) for v in tensors]

    cx, ct, cctx, chint = on(core_net, fx, ft, fctx, fhint)
    ox, ot, octx, ohint = on(ours_net, fx, ft, fctx, fhint)
    with torch.no_grad():
        encoded = ours_net.encode_hint(ohint[:1])
        runs = {"core": lambda: core_net(x=cx, hint=chint, timesteps=ct, context=cctx, y=None),
                "ours": lambda: ours_net(ox, None, ot, octx, guided_hint=encoded.expand(2, -1, -1, -1)),
                "ours + encode": lambda: ours_net(ox, None, ot, octx, guided_hint=ours_net.encode_hint(
                    ohint[:1]).expand(2, -1, -1, -1))}
        for run in runs.values():
            run()
        for _ in range(3 * repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                forward[name].append(time.perf_counter() - start)
    scale = out["core"].abs().max().item()
    print(json.dumps({"step": step, "control": control, "forward": forward, "scale": scale,
                      "device": str(mm.get_torch_device()),
                      "gpu": torch.cuda.get_device_name() if cuda else "",
                      "ours_vs_core": (out["ours"] - out["core"]).abs().max().item(),
                      "composed_vs_chain": (out["ours composed"] - out["core chain"]).abs().max().item(),
                      "control_effect": (out["core"] - out["none"]).abs().max().item()}))
""")


def prelude(cpu: bool) -> str:
    """ComfyUI (on the CPU if asked), then our pack imported by path as ComfyUI loads custom nodes (`zeroconv_pack`)."""
    return "\n".join([
        "import importlib.util, statistics, sys",
        f"sys.path.insert(0, {os.environ['COMFYUI_PATH']!r})",
        "from comfy.cli_args import args",
        f"args.cpu = {cpu}",
        "import torch",
        f"spec = importlib.util.spec_from_file_location('zeroconv_pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])",
        "pack = importlib.util.module_from_spec(spec); sys.modules['zeroconv_pack'] = pack; "
        "spec.loader.exec_module(pack)", "",
    ])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="sampling steps per run (the step time is run / steps)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: fp16 on the GPU")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--accelerate", default="none", help="our modes to run, e.g. none,compile,cuda_graph")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        print("bench_comfyui_step needs COMFYUI_PATH (a ComfyUI checkout; COMFYUI_PYTHON its interpreter); "
              "nothing measured", file=sys.stderr)
        return 1
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    before = load_average()
    done = subprocess.run([python, "-c", prelude(args.device == "cpu") + BODY, str(args.repeats), str(args.steps),
                           str(args.threads), str(args.size), args.accelerate],
                          cwd=os.environ["COMFYUI_PATH"], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    after = load_average()
    report = json.loads(done.stdout.strip().splitlines()[-1])
    step, control = report["step"], report["control"]
    none = statistics.median(step["none"])
    rows = []
    for name, times in step.items():
        ratio = statistics.median(times) / none
        own = spread(control[name]) if control.get(name) else "- | -"
        rows.append(f"| {name} | {spread(times)} | {ratio:.2f} | {own} |")
    pairs = [(ours, core) for ours in step if ours.startswith("ours")
             for core in ["core chain" if "composed" in ours else "core"]]
    ratios = []
    for ours, core in pairs:  # per repetition, then the median: the two ran back to back in each repetition
        per_rep = [a / b for a, b in zip(step[ours], step[core])]
        per_fwd = [a / b for a, b in zip(control[ours], control[core])]
        ratios.append(f"| {ours} / {core} | {statistics.median(per_rep):.3f} ({min(per_rep):.3f}-{max(per_rep):.3f}) "
                      f"| {statistics.median(per_fwd):.3f} ({min(per_fwd):.3f}-{max(per_fwd):.3f}) |")
    forward, forward_rows = report["forward"], []
    for name, times in forward.items():
        per_rep = [a / b for a, b in zip(times, forward["core"])]
        forward_rows.append(f"| {name} | {spread(times)} | {statistics.median(per_rep):.3f} ({min(per_rep):.3f}-"
                            f"{max(per_rep):.3f}) |")
    where = f"{report['gpu']}, fp16" if report["gpu"] else "CPU, fp32"
    lines = [f"# Sampling step in a real ComfyUI, {where} (SD1.5 full size, random weights, {args.size}x{args.size}, "
             "euler, CFG 7)", "", f"Machine: {machine()}; ComfyUI {comfyui_version()}; {args.threads} torch threads; "
             f"device {report['device']}.",
             f"{args.repeats} interleaved repetitions of every scenario, each one `common_ksampler` call of "
             f"{args.steps} step(s), after one warm-up run; step = wall time / steps. 'ControlNet per step' is the "
             "outermost get_control per model call (forward + residual merge), measured in the same runs. "
             f"Load averages (1/5/15 min) before and after: {before} and {after}.", "",
             "| scenario | step s (median) | range | / uncontrolled | ControlNet per step s (median) | range |",
             "| --- | --- | --- | --- | --- | --- |", *rows, "",
             "Ratios per repetition (same repetition, back to back), median (range):", "",
             "| pair | step | ControlNet per step |", "| --- | --- | --- |", *ratios, "",
             f"The ControlNet forward alone on one CFG batch (same weights and inputs), {3 * args.repeats} interleaved "
             "repetitions in the same process: core's runs its hint block at every call (comfy/cldm/cldm.py); ours "
             "takes the hint encoded once per run, and '+ encode' encodes it as at a run's first step:", "",
             "| forward | s (median) | range | / core per repetition, median (range) |", "| --- | --- | --- | --- |",
             *forward_rows, "",
             f"Same file, same arithmetic: final latents ours vs core differ by {report['ours_vs_core']:.2e}, "
             f"composed vs chain by {report['composed_vs_chain']:.2e} (latent scale {report['scale']:.2f}; the "
             f"control changes the latent by {report['control_effect']:.2e})."]
    write_table(args.out, f"comfyui-step-{args.device}", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
