"""Writes the shipped UI-format workflows from compact specs (data below), using the node classes' own layouts.

    python workflows/build_workflows.py      # rewrites workflows/*.json listed in WORKFLOWS

Widget order, sockets and output types come from each node's INPUT_TYPES/RETURN_TYPES (our nodes and the core
ids `zeroconv run` implements with ComfyUI's layouts), so a file cannot drift from the nodes it names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zeroconv.annotators.registry import ANNOTATORS
from zeroconv.workflow_runner import default_registry
from zeroconv.workflow_runner.graph import declared_inputs, frontend_extras, is_widget, spec_options

HERE = Path(__file__).resolve().parent
PACKAGE_MODELS = HERE.parent / "models"  # the demo world's shipped files
SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
FLUX_DEV = "flux1-dev-fp8.safetensors"  # Comfy-Org/flux1-dev: Flux.1 dev with its text encoders and VAE, one file
SD35_LARGE = "sd3.5_large_fp8_scaled.safetensors"  # Comfy-Org/stable-diffusion-3.5-fp8: with CLIP-L/G, T5 and VAE
NEGATIVE = "lowres, bad anatomy, worst quality, low quality"


def _sd15_graph(controls: list[dict], prompt: str, size: int = 512, ckpt: str = SD15, compose: bool = False,
                mask_image: str | None = None, schedule: dict | None = None, negative: str = NEGATIVE,
                sampler: dict | None = None, vae: bool = False) -> dict[str, dict]:
    """Checkpoint, prompts, ControlNet(s) + apply, sampler, decode, save: the graph every workflow shares."""
    nodes: dict[str, dict] = {
        "ckpt": {"type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": ckpt}},
        "pos": {"type": "CLIPTextEncode", "widgets": {"text": prompt}, "links": {"clip": ("ckpt", 1)}},
        "neg": {"type": "CLIPTextEncode", "widgets": {"text": negative}, "links": {"clip": ("ckpt", 1)}},
        "latent": {"type": "EmptyLatentImage", "widgets": {"width": size, "height": size, "batch_size": 1}},
    }
    loader: dict[int, str] = {}  # control -> its loader node; controls of one file share one loader
    for i, control in enumerate(controls):
        nodes[f"img{i}"] = {"type": "LoadImage", "widgets": {"image": control["image"]}}
        first = next(j for j, c in enumerate(controls) if c["file"] == control["file"])
        loader[i] = f"cn{first}"
        if first == i:
            nodes[f"cn{i}"] = {"type": "ZeroConvLoadControlNet", "widgets": {"control_net_name": control["file"]}}
    apply_links = {"positive": ("pos", 0), "negative": ("neg", 0), "image": ("img0", 0)}
    if compose:
        previous = None
        for i, control in enumerate(controls):
            links = {"control_net": (loader[i], 0), "image": (f"img{i}", 0)}
            if previous:
                links["stack"] = (previous, 0)
            nodes[f"unit{i}"] = {"type": "ZeroConvControlUnit", "widgets": control.get("widgets", {}), "links": links}
            previous = f"unit{i}"
        nodes["compose"] = {"type": "ZeroConvComposeControlNets", "links": {"stack": (previous, 0)}}
        apply_links["control_net"] = ("compose", 0)
    else:
        apply_links["control_net"] = ("cn0", 0)
    if vae:  # latent-hint ControlNets (InstantX / Shakker Flux, SD3, SD3.5) encode the image with the base's VAE
        apply_links["vae"] = ("ckpt", 2)
    if mask_image:
        nodes["maskimg"] = {"type": "LoadImage", "widgets": {"image": mask_image}}
        apply_links["mask"] = ("maskimg", 1)
    if schedule:
        nodes["schedule"] = {"type": "ZeroConvStrengthSchedule", "widgets": schedule}
        apply_links["schedule"] = ("schedule", 0)
    nodes["apply"] = {"type": "ZeroConvApplyControlNet", "widgets": controls[0].get("apply", {}), "links": apply_links}
    nodes["sampler"] = {"type": "KSampler",
                        "widgets": sampler or {"seed": 12345, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0},
                        "links": {"model": ("ckpt", 0), "positive": ("apply", 0), "negative": ("apply", 1),
                                  "latent_image": ("latent", 0)}}
    nodes["decode"] = {"type": "VAEDecode", "links": {"samples": ("sampler", 0), "vae": ("ckpt", 2)}}
    nodes["save"] = {"type": "SaveImage", "widgets": {"filename_prefix": "zeroconv"}, "links": {"images": ("decode", 0)}}
    return nodes


WORKFLOWS: dict[str, dict[str, Any]] = {
    "controlnet_canny_sd15": dict(
        note="Canny edges steer SD1.5. The control image is white edges on black (make it with the Canny "
             "Edge (ZeroConv) annotator).",
        graph=_sd15_graph([{"file": "control_v11p_sd15_canny_fp16.safetensors", "image": "canny_edges.png"}],
                          "a cute bird sitting on a branch, best quality")),
    "controlnet_depth_sd15": dict(
        note="A depth map steers SD1.5; near is bright.",
        graph=_sd15_graph([{"file": "control_v11f1p_sd15_depth_fp16.safetensors", "image": "depth_map.png"}],
                          "a cozy living room, warm light")),
    "controlnet_openpose_sd15": dict(
        note="An OpenPose skeleton steers SD1.5 (draw one with OpenPose from JSON (ZeroConv) or detect it with "
             "the OpenPose annotator).",
        graph=_sd15_graph([{"file": "control_v11p_sd15_openpose_fp16.safetensors", "image": "pose.png"}],
                          "a chef in a kitchen, full body")),
    "controlnet_scribble_sd15": dict(
        note="A scribble (white strokes on black) steers SD1.5.",
        graph=_sd15_graph([{"file": "control_v11p_sd15_scribble_fp16.safetensors", "image": "scribble.png"}],
                          "a house by a lake")),
    "controlnet_compose_pose_depth_sd15": dict(
        note="Two controls composed in one pass (paper Fig. 7): openpose + depth, each with its own image and "
             "strength. For a third control, add another ControlNet Unit after the second and connect its stack.",
        graph=_sd15_graph([{"file": "control_v11p_sd15_openpose_fp16.safetensors", "image": "pose.png",
                            "widgets": {"strength": 1.0}},
                           {"file": "control_v11f1p_sd15_depth_fp16.safetensors", "image": "depth_map.png",
                            "widgets": {"strength": 0.6}}], "a dancer on a stage", compose=True)),
    "controlnet_coarse_first_half_sd15": dict(
        note="Coarse control (paper Fig. 27): the ControlNet acts only in the first half of the steps "
             "(end_percent 0.5), so it sets the layout and the prompt the details.",
        graph=_sd15_graph([{"file": "control_v11p_sd15_scribble_fp16.safetensors", "image": "scribble.png",
                            "apply": {"end_percent": 0.5}}], "a castle on a hill")),
    "controlnet_masked_sd15": dict(
        note="Masked control (paper Fig. 16): the control acts only where input/mask.png is transparent "
             "(LoadImage's MASK is 1 there); elsewhere the prompt alone decides. A mask without transparency is "
             "all zero and is refused.",
        graph=_sd15_graph([{"file": "control_v11p_sd15_canny_fp16.safetensors", "image": "canny_edges.png"}],
                          "a vase of flowers on a table", mask_image="mask.png")),
    "controlnet_canny_sdxl": dict(
        note="Canny edges steer SDXL at 1024x1024 (diffusers_xl_canny_full, or controlnet-canny-sdxl-1.0 renamed; "
             "an SD1.5 ControlNet here is refused before sampling, naming both files).",
        graph=_sd15_graph([{"file": "diffusers_xl_canny_full.safetensors", "image": "canny_edges.png"}],
                          "a futuristic city at dusk, highly detailed", size=1024, ckpt=SDXL)),
    "controlnet_union_pose_depth_sdxl": dict(
        note="One SDXL Union ControlNet (xinsir/controlnet-union-sdxl-1.0, the ProMax file "
             "diffusion_pytorch_model_promax.safetensors; the 6-type diffusion_pytorch_model.safetensors works the "
             "same) with two types composed: openpose and depth, each unit with its own image, strength and "
             "union_type. Units of one Union file with the same step range, mode and mask run in ONE forward per "
             "step (diffusers' multi-condition forward). ComfyUI's SetUnionControlNetType also works on this "
             "loader's output.",
        graph=_sd15_graph([{"file": "diffusion_pytorch_model_promax.safetensors", "image": "pose.png",
                            "widgets": {"strength": 0.9, "union_type": "openpose"}},
                           {"file": "diffusion_pytorch_model_promax.safetensors", "image": "depth_map.png",
                            "widgets": {"strength": 0.6, "union_type": "depth"}}],
                          "a dancer on a stage, dramatic light", size=1024, ckpt=SDXL, compose=True)),
    "t2i_adapter_canny_sd15": dict(
        note="A T2I-Adapter steers SD1.5 through the same loader and apply node: TencentARC's "
             "t2iadapter_canny_sd15v2.pth (TencentARC/T2I-Adapter, models/). The adapter runs once per latent "
             "size; its features are added after the U-Net's input blocks. Leave union_type at auto.",
        graph=_sd15_graph([{"file": "t2iadapter_canny_sd15v2.pth", "image": "canny_edges.png",
                            "apply": {"strength": 0.9}}], "a cute bird sitting on a branch, best quality")),
    "controlnet_strength_schedule_sd15": dict(
        note="Strength over the steps (keyframes percent:multiplier, linear): full scribble control at the start, "
             "fading to 0.2 by the middle so the prompt shapes the details.",
        graph=_sd15_graph([{"file": "control_v11p_sd15_scribble_fp16.safetensors", "image": "scribble.png"}],
                          "a lighthouse on a cliff", schedule={"keyframes": "0.0:1.0, 0.5:0.2",
                                                               "interpolation": "linear"})),
    "controlnet_union_pro_canny_flux": dict(
        note="Canny edges steer Flux.1 dev through Shakker Labs' Union-Pro 2.0 ControlNet (6 double blocks, no mode "
             "token: leave union_type at auto; it also takes soft edge, depth, pose and grey images). Files: "
             "flux1-dev-fp8.safetensors from the Hugging Face repo Comfy-Org/flux1-dev into models/checkpoints; "
             "diffusion_pytorch_model.safetensors from Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0 into "
             "models/controlnet, renamed FLUX.1-dev-ControlNet-Union-Pro-2.0.safetensors. The ControlNet encodes "
             "the image with the checkpoint's VAE (the apply node's vae input). Strength 0.7 until 80% of the steps, "
             "as its model card suggests for canny; cfg 1 with Flux's default guidance 3.5.",
        graph=_sd15_graph([{"file": "FLUX.1-dev-ControlNet-Union-Pro-2.0.safetensors", "image": "canny_edges.png",
                            "apply": {"strength": 0.7, "end_percent": 0.8}}],
                          "a futuristic city at dusk, highly detailed", size=1024, ckpt=FLUX_DEV, negative="",
                          vae=True, sampler={"seed": 12345, "steps": 28, "cfg": 1.0, "sampler_name": "euler",
                                             "scheduler": "normal", "denoise": 1.0})),
    "controlnet_canny_sd35_large": dict(
        note="Canny edges steer SD3.5 Large through Stability's canny ControlNet (it borrows the base's patch "
             "embedding; an SD1.5 or Flux ControlNet here is refused before sampling, naming both). Files: "
             "sd3.5_large_fp8_scaled.safetensors from the Hugging Face repo Comfy-Org/stable-diffusion-3.5-fp8 into "
             "models/checkpoints; sd3.5_large_controlnet_canny.safetensors from stabilityai/stable-diffusion-3.5-"
             "controlnets into models/controlnet. The ControlNet encodes the image with the checkpoint's VAE (the "
             "apply node's vae input).",
        graph=_sd15_graph([{"file": "sd3.5_large_controlnet_canny.safetensors", "image": "canny_edges.png",
                            "apply": {"strength": 0.8}}],
                          "a futuristic city at dusk, highly detailed", size=1024, ckpt=SD35_LARGE, vae=True,
                          sampler={"seed": 12345, "steps": 40, "cfg": 4.5, "sampler_name": "euler",
                                   "scheduler": "normal", "denoise": 1.0})),
}

WORKFLOWS["demo_world"] = dict(
    note="The offline demo world (as `zeroconv demo`): the world base and its ControlNet fill the outline with the "
         "caption's colours. Both models are shipped in the pack's models/ folder and the loaders find them there, "
         "so nothing is copied into models/. The outline goes into ComfyUI's input/ folder: copy "
         "workflows/inputs/world_outline.png there (`zeroconv run workflows/demo_world.json` reads it where it is). "
         "Captions name a colour, a shape (circle, square, triangle) and a background colour.",
    graph={**_sd15_graph([{"file": "world_controlnet.safetensors", "image": "world_outline.png"}],
                         "red circle with blue background", size=64, negative="",
                         sampler={"seed": 2024, "steps": 20, "cfg": 3.0, "sampler_name": "ddim",
                                  "scheduler": "ddim_uniform", "denoise": 1.0}),
           "ckpt": {"type": "ZeroConvLoadWorldBase", "widgets": {"base_name": "world_base.safetensors"}}})

for _spec in ANNOTATORS.values():
    _weights = (f"Needs the annotator weights {', '.join(_spec.weights)} (models/annotators; fetched on first use "
                "when online)." if _spec.weights else "No model files needed.")
    _outputs = {"save": {"type": "SaveImage", "widgets": {"filename_prefix": f"zeroconv_{_spec.name}"},
                         "links": {"images": ("annotate", 0)}}}
    WORKFLOWS[f"annotator_{_spec.name}"] = dict(
        note=f"{_spec.display_name}: turns input/example.png into the control map for {', '.join(_spec.control_types)} "
             f"ControlNets and saves it. {_weights} The example picture is ours, drawn by "
             f"workflows/make_example_picture.py.",
        graph={"img": {"type": "LoadImage", "widgets": {"image": "example.png"}},
               "annotate": {"type": _spec.node_id, "links": {"image": ("img", 0)}}, **_outputs})
WORKFLOWS["annotator_pose_from_json"] = dict(
    note="Draw an OpenPose skeleton from keypoint JSON (pose by hand); feeds openpose ControlNets. No files needed.",
    graph={"pose": {"type": "ZeroConvPoseFromJSON"},
           "save": {"type": "SaveImage", "widgets": {"filename_prefix": "zeroconv_pose"}, "links": {"images": ("pose", 0)}}})
WORKFLOWS["annotator_inpaint_hint"] = dict(
    note="The inpaint ControlNet's condition: input/inpaint.png with its transparent area (LoadImage's MASK) set to "
         "-1. Connect the hint to an apply node with control_v11p_sd15_inpaint; the preview shows the masked area "
         "black.",
    graph={"img": {"type": "LoadImage", "widgets": {"image": "inpaint.png"}},
           "hint": {"type": "ZeroConvInpaintHint", "links": {"image": ("img", 0), "mask": ("img", 1)}},
           "preview": {"type": "PreviewImage", "links": {"images": ("hint", 0)}}})


FILE_WIDGETS = {"ckpt_name": "models/checkpoints", "control_net_name": "models/controlnet", "image": "input"}


def _expected_files(graph: dict[str, dict]) -> list[str]:
    """Every file the graph's loader widgets name, with its folder, in graph order; for a file the pack ships, where
    it is and whether ComfyUI needs a copy (LoadImage only lists ComfyUI's input/; our ControlNet loader also looks
    in the pack's models/)."""
    found = []
    for node in graph.values():
        for name, folder in FILE_WIDGETS.items():
            value = node.get("widgets", {}).get(name)
            if not value:
                continue
            entry = f"{folder}/{value}"
            if folder == "input" and (HERE / "inputs" / value).is_file():
                entry += (f" (shipped as workflows/inputs/{value}: copy it into ComfyUI's input/ folder; "
                          f"`zeroconv run` reads it where it is)")
            elif name == "control_net_name" and (PACKAGE_MODELS / value).is_file():
                entry = f"{value} (shipped in the pack's models/ folder and found there: no copying)"
            if entry not in found:
                found.append(entry)
    return found


def _widget_values(cls: type, given: dict[str, Any]) -> list[Any]:
    values = []
    for name, spec, _ in declared_inputs(cls):
        if not is_widget(spec):
            continue
        value = given.get(name, spec_options(spec).get("default"))
        if value is None:
            options = spec[0] if isinstance(spec[0], (list, tuple)) else []
            value = options[0] if options else ""
        values.append(value)
        extras = frontend_extras(name, spec)
        if extras:
            values.append("fixed" if "fixed" in extras else "image")
    return values


def build(spec: dict[str, Any]) -> dict:
    """A schema-0.4 UI workflow from a node graph spec plus a Note node."""
    registry, graph = default_registry(), spec["graph"]
    ids = {key: i + 1 for i, key in enumerate(graph)}
    links, nodes = [], []
    for key, node in graph.items():
        cls = registry[node["type"]]
        sockets = [{"name": n, "type": s[0], "link": None} for n, s, _ in declared_inputs(cls)
                   if not is_widget(s) and n in node.get("links", {})]
        for socket in sockets:
            src, slot = node["links"][socket["name"]]
            link_id = len(links) + 1
            links.append([link_id, ids[src], slot, ids[key], sockets.index(socket), socket["type"]])
            socket["link"] = link_id
        outputs = [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(cls.RETURN_TYPES)]
        nodes.append({"id": ids[key], "type": node["type"], "pos": [40 + 320 * (len(nodes) % 5), 80 + 260 * (len(nodes) // 5)],
                      "size": [300, 120], "flags": {}, "order": len(nodes), "mode": 0, "inputs": sockets,
                      "outputs": outputs, "properties": {"Node name for S&R": node["type"]},
                      "widgets_values": _widget_values(cls, node.get("widgets", {}))})
    by_id = {n["id"]: n for n in nodes}
    for link_id, origin, slot, *_ in links:
        by_id[origin]["outputs"][slot]["links"].append(link_id)
    note_id = len(nodes) + 1
    files = _expected_files(graph)
    text = spec["note"] + (f"\n\nExpects: {', '.join(files)}." if files else "")
    nodes.append({"id": note_id, "type": "Note", "pos": [40, -160], "size": [600, 120], "flags": {}, "order": note_id - 1,
                  "mode": 0, "properties": {}, "widgets_values": [text]})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def main() -> int:
    for name, spec in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(build(spec), indent=1) + "\n")
        print(f"wrote workflows/{name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
