"""Every shipped workflow (workflows/*.json, UI format) would load in ComfyUI with our pack.

Node ids are ours (zeroconv.NODE_CLASS_MAPPINGS) or core ids whose inputs and outputs are written below as data
(ComfyUI 0.3.64 nodes.py / comfy_extras). Checked: the UI schema (0.4), every node id exists,
sockets and outputs match the classes, every link joins an output to an input of the same type, required links
are connected, widget values are in range and in the frontend's positional order, and the note names every model
file the workflow loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import zeroconv
from zeroconv.nodes import annotators as annotator_nodes

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
FILE_INPUTS = {"ckpt_name", "control_net_name", "image", "unet_name", "vae_name"}  # combos over files on disk
FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp")
SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
            "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
            "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
            "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
            "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
            "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]
FILES = ["<files>"]
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})
SIZE = ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8})
STRENGTH = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})
PERCENT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})


def _core(required: dict, returns: tuple, optional: dict | None = None) -> type:
    return type("Core", (), {"INPUT_TYPES": classmethod(lambda cls: {"required": required, "optional": optional or {}}),
                             "RETURN_TYPES": returns})


CORE = {
    "CheckpointLoaderSimple": _core({"ckpt_name": (FILES,)}, ("MODEL", "CLIP", "VAE")),
    "CLIPTextEncode": _core({"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)},
                            ("CONDITIONING",)),
    "ControlNetLoader": _core({"control_net_name": (FILES,)}, ("CONTROL_NET",)),
    "DiffControlNetLoader": _core({"model": ("MODEL",), "control_net_name": (FILES,)}, ("CONTROL_NET",)),
    "ControlNetApply": _core({"conditioning": ("CONDITIONING",), "control_net": ("CONTROL_NET",), "image": ("IMAGE",),
                              "strength": STRENGTH}, ("CONDITIONING",)),
    "ControlNetApplyAdvanced": _core({"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                                      "control_net": ("CONTROL_NET",), "image": ("IMAGE",), "strength": STRENGTH,
                                      "start_percent": PERCENT,
                                      "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})},
                                     ("CONDITIONING", "CONDITIONING"), {"vae": ("VAE",)}),
    "EmptyLatentImage": _core({"width": SIZE, "height": SIZE, "batch_size": ("INT", {"default": 1, "min": 1,
                                                                                    "max": 4096})}, ("LATENT",)),
    "KSampler": _core({"model": ("MODEL",), "seed": SEED, "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                       "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                       "sampler_name": (SAMPLERS,), "scheduler": (SCHEDULERS,), "positive": ("CONDITIONING",),
                       "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                       "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}, ("LATENT",)),
    "KSamplerAdvanced": _core({"model": ("MODEL",), "add_noise": (["enable", "disable"],), "noise_seed": SEED,
                               "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                               "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
                               "sampler_name": (SAMPLERS,), "scheduler": (SCHEDULERS,),
                               "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                               "latent_image": ("LATENT",), "start_at_step": ("INT", {"default": 0, "min": 0,
                                                                                      "max": 10000}),
                               "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                               "return_with_leftover_noise": (["disable", "enable"],)}, ("LATENT",)),
    "VAEEncode": _core({"pixels": ("IMAGE",), "vae": ("VAE",)}, ("LATENT",)),
    "VAEDecode": _core({"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",)),
    "LoadImage": _core({"image": (FILES, {"image_upload": True})}, ("IMAGE", "MASK")),
    "SaveImage": _core({"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}, ()),
    "PreviewImage": _core({"images": ("IMAGE",)}, ()),
    "EmptyImage": _core({"width": ("INT", {"default": 512, "min": 1, "max": 16384}),
                         "height": ("INT", {"default": 512, "min": 1, "max": 16384}),
                         "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                         "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF})}, ("IMAGE",)),
    "Canny": _core({"image": ("IMAGE",), "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99}),
                    "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99})}, ("IMAGE",)),
}
CONTROLNET_WORKFLOWS = {  # issue: which workflows ship, and what each must show
    "controlnet_canny_sd15", "controlnet_depth_sd15", "controlnet_openpose_sd15", "controlnet_scribble_sd15",
    "controlnet_compose_pose_depth_sd15", "controlnet_coarse_first_half_sd15", "controlnet_masked_sd15",
    "controlnet_canny_sdxl",
}


def node_class(node_type: str) -> type:
    if node_type in zeroconv.NODE_CLASS_MAPPINGS:
        return zeroconv.NODE_CLASS_MAPPINGS[node_type]
    if node_type in CORE:
        return CORE[node_type]
    raise AssertionError(f"node type {node_type!r} is neither a ZeroConv node nor a core node this test knows")


def declared(cls: type) -> dict[str, tuple]:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def is_widget(spec: tuple) -> bool:
    return isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")


def options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 else {}


def widget_values(cls: type, values: list) -> dict[str, object]:
    """Positional widgets_values to {input: value}, skipping the values the frontend adds after some widgets."""
    out, values = {}, list(values)
    for name, spec in declared(cls).items():
        if not is_widget(spec):
            continue
        assert values, f"{cls.__name__} lacks a value for widget {name}"
        out[name] = values.pop(0)
        if spec[0] == "INT" and options(spec).get("control_after_generate", name in ("seed", "noise_seed")):
            # the frontend's rule: the option, else any INT widget named seed or noise_seed
            assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), name
        if options(spec).get("image_upload"):
            assert values.pop(0) == "image", name
    assert not values, f"{len(values)} widget values more than {cls.__name__} has widgets"
    return out


def check_value(name: str, spec: tuple, value: object) -> None:
    kind, opts = spec[0], options(spec)
    if isinstance(kind, list):
        if name in FILE_INPUTS:
            assert isinstance(value, str) and value.lower().endswith(FILE_SUFFIXES), (name, value)
        else:
            assert value in kind, (name, value, kind)
        return
    python_type = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, python_type) and not (kind != "BOOLEAN" and isinstance(value, bool)), (name, value)
    if kind in ("INT", "FLOAT"):
        assert opts.get("min", value) <= value <= opts.get("max", value), (name, value, opts)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_loads_with_our_nodes_and_core_nodes(path: Path) -> None:
    workflow = load(path)
    assert workflow.get("version") == 0.4 and isinstance(workflow["links"], list) and workflow["nodes"]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max((link[0] for link in workflow["links"]), default=0)
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY:
            continue
        cls, specs = node_class(node["type"]), None
        specs = declared(cls)
        for socket in node.get("inputs", []):
            assert socket["name"] in specs, (node["id"], socket["name"])
            assert socket["type"] == specs[socket["name"]][0] or is_widget(specs[socket["name"]]), socket
        connected = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        required = cls.INPUT_TYPES()["required"]
        missing = [n for n, spec in required.items() if not is_widget(spec) and n not in connected]
        assert not missing, f"node {node['id']} ({node['type']}) has unconnected required inputs {missing}"
        assert [o["type"] for o in node.get("outputs", [])] == list(cls.RETURN_TYPES), node["id"]
        for name, value in widget_values(cls, node.get("widgets_values", [])).items():
            if name not in connected:
                check_value(name, specs[name], value)
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        output, socket = nodes[origin]["outputs"][slot], nodes[target]["inputs"][target_slot]
        assert output["type"] == socket["type"] == kind, f"link {link_id}: {output['type']} -> {socket['type']}"
        assert link_id in output["links"] and socket["link"] == link_id, link_id


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_note_names_the_files_it_expects(path: Path) -> None:
    workflow = load(path)
    notes = " ".join(str(v) for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")
                     for v in n.get("widgets_values", []))
    assert notes, "every workflow carries a note saying what it expects"
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        values = widget_values(node_class(node["type"]), node.get("widgets_values", []))
        for name in ("ckpt_name", "control_net_name"):
            if name in values:
                assert str(values[name]) in notes, f"the note does not name {values[name]}"


def test_the_issue_s_workflows_ship_and_show_what_they_claim() -> None:
    by_name = {p.stem: load(p) for p in WORKFLOWS}
    assert CONTROLNET_WORKFLOWS <= set(by_name)

    def nodes_of(name: str, node_type: str) -> list[dict]:
        return [n for n in by_name[name]["nodes"] if n["type"] == node_type]

    def apply_values(name: str) -> dict:
        node = nodes_of(name, "ZeroConvApplyControlNet")[0]
        return widget_values(zeroconv.NODE_CLASS_MAPPINGS[node["type"]], node["widgets_values"])

    assert apply_values("controlnet_coarse_first_half_sd15")["end_percent"] == 0.5
    assert len(nodes_of("controlnet_compose_pose_depth_sd15", "ZeroConvControlUnit")) == 2
    assert any(s["name"] == "mask" and s["link"] for s in nodes_of("controlnet_masked_sd15",
                                                                   "ZeroConvApplyControlNet")[0]["inputs"])
    assert nodes_of("controlnet_canny_sdxl", "EmptyLatentImage")[0]["widgets_values"][:2] == [1024, 1024]


def test_one_workflow_per_annotator_node() -> None:
    used = {n["type"] for p in WORKFLOWS for n in load(p)["nodes"]}
    missing = sorted(set(annotator_nodes.NODE_CLASS_MAPPINGS) - used)
    assert not missing, f"no workflow shows the annotator nodes {missing}"
