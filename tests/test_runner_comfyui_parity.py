"""Parity with real ComfyUI: the same U-Net, conds and control object sampled by both hosts give the same latents.

Needs a ComfyUI checkout at COMFYUI_PATH (and COMFYUI_PYTHON, an interpreter with its requirements, if not this
one), so it is skipped by default. ComfyUI's nodes.common_ksampler runs with our tiny U-Net put in place of its
own diffusion model, so the comparison covers exactly the host: sigmas, noise, latent scaling, CFG batching,
the control protocol and the samplers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to compare hosts")]

# (sampler, scheduler, steps, cfg, denoise, control end_percent or None, start_step, last_step, force_full_denoise)
CASES = [
    ("euler", "normal", 4, 7.0, 1.0, 1.0, None, None, False),
    ("dpmpp_2m", "karras", 5, 5.0, 1.0, 0.5, None, None, False),
    ("euler_ancestral", "simple", 4, 1.0, 1.0, None, None, None, False),
    ("euler_ancestral", "karras", 4, 6.0, 1.0, 0.7, None, None, False),
    ("euler", "simple", 3, 1.0, 1.0, 1.0, None, None, False),
    ("ddim", "ddim_uniform", 3, 7.0, 0.6, 1.0, None, None, False),
    ("euler", "exponential", 6, 4.0, 1.0, 1.0, 1, 4, False),
    ("dpmpp_2m", "sgm_uniform", 4, 7.5, 1.0, 1.0, 0, 3, True),
]

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_patcher, comfy.supported_models
    import nodes as comfy_nodes

    spec = importlib.util.spec_from_file_location("zc_tests", REPO + "/tests/__init__.py",
                                                  submodule_search_locations=[REPO + "/tests"])
    sys.modules["zc_tests"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["zc_tests"])
    from zc_tests.test_runner_support import ToyBase, ToyControl, apply_control, toy_controlnet
    from zeroconv.workflow_runner.host import host_objects
    from zeroconv.workflow_runner.sampling import common_ksampler

    class ComfyToyControl(ToyControl):
        extra_hooks = None
        def get_models(self): return []
        def get_extra_hooks(self): return []
        def inference_memory_requirements(self, dtype): return 0
        def copy(self):
            new = ComfyToyControl(self.control_model)
            new.cond_hint_original, new.strength = self.cond_hint_original, self.strength
            new.timestep_percent_range = self.timestep_percent_range
            return new

    base = ToyBase(latent_scale_factor=0.18215)
    ours, clip, vae = host_objects(base)
    unet_config = {"image_size": 32, "in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1,
                   "channel_mult": [1, 2], "use_spatial_transformer": True, "transformer_depth": [1, 1],
                   "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": 32,
                   "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
                   "legacy": False, "num_head_channels": -1}
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    comfy_model = config.get_model({})
    comfy_model.diffusion_model = base.unet  # BaseModel reads its .dtype (a property of our UNetModel)
    theirs = comfy.model_patcher.ModelPatcher(comfy_model, load_device=torch.device("cpu"),
                                              offload_device=torch.device("cpu"))
    net = toy_controlnet(base)
    hint = torch.zeros(1, 64, 64, 3)
    hint[:, 16:48, 16:48] = 1.0
    text = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))
    results = []
    for sampler, scheduler, steps, cfg, denoise, end, start_step, last_step, full in CASES:
        latent = {"samples": vae.encode(hint) if denoise < 1 else torch.zeros(1, 4, 8, 8)}
        row = {}
        for name, model, control_cls in (("ours", ours, ToyControl), ("comfy", theirs, ComfyToyControl)):
            positive, negative = text("a white square"), text("blur")
            head = None
            if end is not None:
                positive, negative = apply_control(positive, negative, control_cls(net), hint, 0.8, 0.0, end)
                head = positive[0][1]["control"]
            run = comfy_nodes.common_ksampler if name == "comfy" else common_ksampler
            out = run(model, 7, steps, cfg, sampler, scheduler, positive, negative, latent, denoise=denoise,
                      start_step=start_step, last_step=last_step, force_full_denoise=full)[0]["samples"]
            calls = [(c["batch"], c["cond_or_uncond"]) for c in head.calls] if head else []
            row[name] = {"out": out, "calls": calls, "cleanups": head.cleanups if head else 0}
        results.append({"diff": float((row["ours"]["out"] - row["comfy"]["out"]).abs().max()),
                        "scale": float(row["comfy"]["out"].abs().max()),
                        "calls": [row["ours"]["calls"], row["comfy"]["calls"]],
                        "cleanups": [row["ours"]["cleanups"], row["comfy"]["cleanups"]]})
    print("RESULT " + json.dumps(results))
""")


def test_runner_matches_comfyui_sampling() -> None:
    script = f"REPO = {str(REPO)!r}\nCASES = {CASES!r}\n" + SCRIPT
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", script], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=600)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    for case, result in zip(CASES, json.loads(lines[-1][len("RESULT "):])):
        assert result["diff"] <= 1e-4 * max(1.0, result["scale"]), (case, result)
        assert result["calls"][0] == result["calls"][1], (case, result["calls"])
        assert result["cleanups"][0] == result["cleanups"][1], case


LAYOUT_SCRIPT = textwrap.dedent("""
    import json
    from comfy.cli_args import args
    args.cpu = True
    import nodes
    from zeroconv.workflow_runner.core_nodes import CORE_NODE_CLASS_MAPPINGS
    from zeroconv.workflow_runner.graph import declared_inputs, is_combo, spec_options, spec_type

    KEYS = ("default", "min", "max", "step", "round", "control_after_generate", "image_upload", "forceInput",
            "multiline", "dynamicPrompts")

    def layout(cls):
        inputs = [(name, required, "COMBO" if is_combo(spec) else spec_type(spec),
                   {k: spec_options(spec)[k] for k in KEYS if k in spec_options(spec)})
                  for name, spec, required in declared_inputs(cls)]
        return [inputs, list(cls.RETURN_TYPES), bool(getattr(cls, "OUTPUT_NODE", False)),
                cls.INPUT_TYPES().get("hidden")]

    def combos(cls):
        return {name: list(spec[0]) for name, spec, _ in declared_inputs(cls) if name in ("sampler_name", "scheduler")}

    report = {}
    for node_id, ours in CORE_NODE_CLASS_MAPPINGS.items():
        theirs = nodes.NODE_CLASS_MAPPINGS[node_id]
        report[node_id] = {"same": layout(ours) == layout(theirs),
                           "subset": all(set(v) <= set(combos(theirs)[k]) for k, v in combos(ours).items())}
    print("RESULT " + json.dumps(report))
""")


def test_core_nodes_have_comfyui_layouts() -> None:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", LAYOUT_SCRIPT], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=300)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("RESULT "):])
    assert report and all(r == {"same": True, "subset": True} for r in report.values()), report
