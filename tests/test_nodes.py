"""The nodes headless: their ComfyUI contract, the loader's file lookup, and what apply/unit/compose produce."""
from __future__ import annotations

import logging

import pytest
import torch

import zeroconv
from zeroconv.controlnet_model import init_from_unet
from zeroconv.controlnet_model.checkpoint import read_metadata, save_controlnet
from zeroconv.nodes import apply as apply_nodes, compose as compose_nodes, loaders as loader_nodes
from zeroconv.nodes.apply import ZeroConvApplyControlNet, ZeroConvStrengthSchedule
from zeroconv.nodes.host.control import ControlPart, ZeroConvControl, make_control
from zeroconv.nodes.compose import ZeroConvComposeControlNets, ZeroConvControlUnit
from zeroconv.nodes.loaders import ZeroConvLoadControlNet

from .conftest import make_unet, randomize
from .test_adapter_standins import CoreLikeControlNet, conditioning, image, one_thread  # noqa: F401 (autouse fixture)

OUR_IDS = {"ZeroConvLoadControlNet", "ZeroConvApplyControlNet", "ZeroConvStrengthSchedule", "ZeroConvControlUnit",
           "ZeroConvComposeControlNets"}
# core ControlNetApplyAdvanced (ComfyUI 0.3.64 nodes.py ControlNetApplyAdvanced): the inputs ours shares with it
CORE_APPLY = {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                           "control_net": ("CONTROL_NET",), "image": ("IMAGE",),
                           "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                           "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                           "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})},
              "optional": {"vae": ("VAE",)}}


@pytest.fixture
def folder(tmp_path, monkeypatch, tiny_controlnet):
    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path))
    save_controlnet(tiny_controlnet, tmp_path / "sd15" / "Control-Canny.safetensors")
    other, _ = init_from_unet(make_unet("tiny"))
    save_controlnet(randomize(other, seed=9), tmp_path / "depth.safetensors")
    save_controlnet(randomize(other, seed=10), tmp_path / "control_v11p_sd15_lineart.safetensors")
    return tmp_path


def test_nodes_follow_the_v1_contract_and_are_registered() -> None:
    assert OUR_IDS <= set(zeroconv.NODE_CLASS_MAPPINGS)
    for module in (loader_nodes, apply_nodes, compose_nodes):
        for node_id, cls in module.NODE_CLASS_MAPPINGS.items():
            assert node_id.startswith("ZeroConv") and node_id in module.NODE_DISPLAY_NAME_MAPPINGS
            assert isinstance(cls.INPUT_TYPES(), dict) and isinstance(cls.RETURN_TYPES, tuple)
            assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY.startswith("ZeroConv") and cls.DESCRIPTION
            assert not hasattr(cls, "RETURN_NAMES") or len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)


def test_apply_node_has_core_apply_inputs_first_with_the_same_ranges() -> None:
    ours = ZeroConvApplyControlNet.INPUT_TYPES()
    assert list(ours["required"])[:7] == list(CORE_APPLY["required"])
    for name, spec in CORE_APPLY["required"].items():
        assert ours["required"][name][0] == spec[0]
        if len(spec) > 1:
            assert {k: ours["required"][name][1][k] for k in spec[1]} == spec[1], name
    assert ours["optional"]["vae"] == CORE_APPLY["optional"]["vae"]
    assert ours["required"]["control_mode"][0] == ["balanced", "prompt_more_important", "controlnet_more_important",
                                                   "cfg_resolution_weighting"]
    assert ZeroConvApplyControlNet.RETURN_TYPES == ("CONDITIONING", "CONDITIONING")
    assert ZeroConvApplyControlNet.RETURN_NAMES == ("positive", "negative")
    unit = ZeroConvControlUnit.INPUT_TYPES()
    assert {k: v for k, v in unit["required"].items() if k in ours["required"]} == \
        {k: v for k, v in ours["required"].items() if k in unit["required"]}


def test_loader_lists_the_folder_and_caches_per_file(folder, monkeypatch) -> None:
    names = ZeroConvLoadControlNet.INPUT_TYPES()["required"]["control_net_name"][0]
    assert names == ["control_v11p_sd15_lineart.safetensors", "depth.safetensors", "sd15/Control-Canny.safetensors",
                     "world_controlnet.safetensors"]  # the folder's files, then the demo world's shipped one
    first = ZeroConvLoadControlNet().load("depth.safetensors")[0]
    again = ZeroConvLoadControlNet().load("depth.safetensors")[0]
    assert isinstance(first, ZeroConvControl) and again.parts[0].controlnet is first.parts[0].controlnet
    monkeypatch.delenv("ZEROCONV_CONTROLNET_DIR")
    assert ZeroConvLoadControlNet.INPUT_TYPES()["required"]["control_net_name"][0] == ["world_controlnet.safetensors"]  # no folder: only the shipped one


def test_loader_finds_a_file_not_found_as_written_and_says_which(folder, caplog) -> None:
    def loaded_name(name: str) -> str:
        return ZeroConvLoadControlNet().load(name)[0].parts[0].name

    with caplog.at_level(logging.WARNING):
        assert loaded_name("sd15\\Control-Canny.safetensors") == "Control-Canny.safetensors"  # Windows separators
        assert loaded_name("control_canny.pth") == "Control-Canny.safetensors"  # normalised name
        assert loaded_name("control_v11p_sd15_lineart_fp16.safetensors") == "control_v11p_sd15_lineart.safetensors"
        assert "other precision" in caplog.text and "control_v11p_sd15_lineart.safetensors" in caplog.text
        (folder / "depth.safetensors").rename(folder / "renamed by user.safetensors")
        assert loaded_name("old/depth.safetensors") == "renamed by user.safetensors"  # name in its metadata
        digest = read_metadata(folder / "renamed by user.safetensors").content_hash
        assert loaded_name(f"{digest[:12]}.safetensors") == "renamed by user.safetensors"  # content hash
    assert "its metadata records that name or hash" in caplog.text
    with pytest.raises(FileNotFoundError, match="'missing.safetensors' was not found"):
        ZeroConvLoadControlNet().load("missing.safetensors")
    # ComfyUI checks combo values at queue time unless VALIDATE_INPUTS names the input: ours resolves instead
    assert ZeroConvLoadControlNet.VALIDATE_INPUTS("control_canny.pth") is True
    assert "was not found" in ZeroConvLoadControlNet.VALIDATE_INPUTS("missing.safetensors")


def test_loader_suggests_the_annotator_from_metadata(tmp_path, monkeypatch, tiny_controlnet, caplog) -> None:
    from zeroconv.controlnet_model.checkpoint import ControlNetMetadata

    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path))
    save_controlnet(tiny_controlnet, tmp_path / "mine.safetensors", ControlNetMetadata(control_type="mlsd"))
    with caplog.at_level(logging.INFO):
        ZeroConvLoadControlNet().load("mine.safetensors")
    assert "mlsd ControlNet" in caplog.text and "the mlsd annotator" in caplog.text  # the one named like the type


def test_apply_shares_one_control_and_leaves_its_inputs_alone(folder) -> None:
    control_net = ZeroConvLoadControlNet().load("depth.safetensors")[0]
    positive, negative = conditioning()
    pos, neg = ZeroConvApplyControlNet().apply(positive, negative, control_net, image(), 1.0, 0.0, 1.0)
    assert pos[0][1]["control"] is neg[0][1]["control"] and pos[0][1]["control_apply_to_uncond"] is False
    assert "control" not in positive[0][1] and control_net.parts[0].image is None
    assert ZeroConvApplyControlNet().apply(positive, negative, control_net, image(), 0.0, 0.0, 1.0) == (positive,
                                                                                                     negative)
    again, _ = ZeroConvApplyControlNet().apply(pos, neg, control_net, image(), 1.0, 0.0, 1.0)
    assert again[0][1]["control"].previous_controlnet is pos[0][1]["control"], "chains after the control already there"


def test_units_stack_in_order_and_compose_into_one_control(tiny_controlnet) -> None:
    stack = ()
    for i, strength in enumerate((0.5, 1.0, 1.5)):
        control = CoreLikeControlNet(tiny_controlnet) if i == 2 else make_control((ControlPart(tiny_controlnet),))
        stack = ZeroConvControlUnit().add(control, image(i), strength, 0.1 * i, 1.0, stack=stack)[0]
    assert [p.settings.strength for p in stack] == [0.5, 1.0, 1.5] and all(p.composed for p in stack)
    assert [p.settings.start_percent for p in stack] == [0.0, 0.1, 0.2] and stack[2].host is not None
    composed = ZeroConvComposeControlNets().compose(stack)[0]
    pos, _ = ZeroConvApplyControlNet().apply(*conditioning(), composed, image(9), 0.5, 0.15, 0.9)
    parts = pos[0][1]["control"].parts
    assert [p.settings.strength for p in parts] == [0.25, 0.5, 0.75], "the apply node's strength multiplies"
    assert [(p.settings.start_percent, p.settings.end_percent) for p in parts] == [(0.15, 0.9), (0.15, 0.9),
                                                                                  (0.2, 0.9)], "and narrows"
    assert all(torch.equal(p.image, image(i).movedim(-1, 1)) for i, p in enumerate(parts)), "own images kept"
    with pytest.raises(ValueError, match="set control_mode, mask and schedule on each"):
        ZeroConvApplyControlNet().apply(*conditioning(), composed, image(), 1.0, 0.0, 1.0,
                                        control_mode="prompt_more_important")
    with pytest.raises(ValueError, match="stack is empty"):
        ZeroConvComposeControlNets().compose(())


def test_bad_inputs_are_explained_before_sampling(tiny_controlnet) -> None:
    control = make_control((ControlPart(tiny_controlnet),))

    def apply(**kw):
        args = dict(strength=1.0, start_percent=0.0, end_percent=1.0) | kw
        img = args.pop("img", image())
        return ZeroConvApplyControlNet().apply(*conditioning(), control, img, **args)

    with pytest.raises(ValueError, match="swap them"):
        apply(start_percent=0.9, end_percent=0.1)
    with pytest.raises(ValueError, match="mask is all zero"):
        apply(mask=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="mask must be"):
        apply(mask=torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        apply(img=torch.full((1, 64, 64, 3), float("nan")))
    with pytest.raises(ValueError, match="5 channels"):
        apply(img=torch.rand(1, 64, 64, 5))
    with pytest.raises(ValueError, match="not a CONTROL_NET"):
        ZeroConvApplyControlNet().apply(*conditioning(), object(), image(), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="cannot read keyframe"):
        ZeroConvStrengthSchedule().build("0.5 -> 1", "hold")
    with pytest.raises(ValueError, match="strictly increasing"):
        ZeroConvStrengthSchedule().build("0.5:1, 0.2:0.3", "linear")
