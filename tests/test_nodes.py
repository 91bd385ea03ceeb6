"""Nodes headless: loader, apply, compose, schedule, with stand-ins for the host and the tiny U-Net."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from zeroconv.controlnet_model import ControlSettings, ControlUnit, compute_residuals, init_from_unet
from zeroconv.controlnet_model.checkpoint import save_controlnet
from zeroconv.nodes.apply import ZeroConvApplyControlNet, ZeroConvStrengthSchedule
from zeroconv.nodes.comfy_adapter import ZeroConvControl
from zeroconv.nodes.compose import ZeroConvComposeControlNets, ZeroConvControlUnit
from zeroconv.nodes.loaders import ZeroConvLoadControlNet
from zeroconv.training.schedule import NoiseSchedule
from zeroconv.workflow_runner.host import ModelSamplingDiscrete

from .conftest import make_unet, randomize


@pytest.fixture
def folder(tmp_path, monkeypatch, tiny_controlnet):
    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path))
    save_controlnet(tiny_controlnet, tmp_path / "sd15" / "Control-Canny.safetensors")
    other, _ = init_from_unet(make_unet("tiny"))
    save_controlnet(randomize(other, seed=9), tmp_path / "depth.safetensors")
    return tmp_path


def _model(unet):
    ms = ModelSamplingDiscrete(NoiseSchedule.scaled_linear().alphas_cumprod)
    return SimpleNamespace(model_sampling=ms, diffusion_model=unet)


def _conds(seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 7, 32, generator=gen), {}]], [[torch.randn(batch, 7, 32, generator=gen), {}]]


def _image(seed=3, channels=3):
    return torch.rand(1, 64, 64, channels, generator=torch.Generator().manual_seed(seed))


def _sample_call(control, unet, sigma=3.0, cond_or_uncond=(0, 1)):
    """One model call as ComfyUI's sampler makes it: pre_run, get_control on a cond+uncond batch, cleanup."""
    model = _model(unet)
    control.pre_run(model, model.model_sampling.percent_to_sigma)
    x = torch.randn(len(cond_or_uncond), 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.full((x.shape[0],), sigma)
    cond = {"c_crossattn": torch.randn(x.shape[0], 7, 32, generator=torch.Generator().manual_seed(6))}
    try:
        return control.get_control(x, t, cond, len(cond_or_uncond), {"cond_or_uncond": list(cond_or_uncond)}), (x, t, cond)
    finally:
        control.cleanup()


def _apply(control_net, image=None, **kw):
    positive, negative = _conds()
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0)
    args.update(kw)
    return ZeroConvApplyControlNet().apply(positive, negative, control_net, image if image is not None else _image(), **args)


def test_loader_lists_and_resolves_renamed_files(folder) -> None:
    assert "sd15/Control-Canny.safetensors" in ZeroConvLoadControlNet.INPUT_TYPES()["required"]["control_net_name"][0]
    control = ZeroConvLoadControlNet().load("sd15\\Control-Canny.safetensors")[0]
    assert isinstance(control, ZeroConvControl)
    again = ZeroConvLoadControlNet().load("control_canny.safetensors")[0]
    assert again.parts[0].controlnet is control.parts[0].controlnet, "cached per file"
    (folder / "depth.safetensors").rename(folder / "renamed by user.safetensors")
    by_metadata = ZeroConvLoadControlNet().load("old/depth.safetensors")[0]
    assert by_metadata.parts[0].name == "renamed by user.safetensors"
    from zeroconv.controlnet_model.checkpoint import read_metadata

    digest = read_metadata(folder / "renamed by user.safetensors").content_hash
    assert ZeroConvLoadControlNet().load(f"{digest[:12]}.safetensors")[0].parts[0].name == "renamed by user.safetensors"
    with pytest.raises(FileNotFoundError, match="not found"):
        ZeroConvLoadControlNet().load("missing.safetensors")


def test_apply_shares_one_control_and_leaves_inputs_alone(folder) -> None:
    control_net = ZeroConvLoadControlNet().load("depth.safetensors")[0]
    positive, negative = _conds()
    pos, neg = ZeroConvApplyControlNet().apply(positive, negative, control_net, _image(), 1.0, 0.0, 1.0)
    assert pos[0][1]["control"] is neg[0][1]["control"]
    assert pos[0][1]["control_apply_to_uncond"] is False
    assert "control" not in positive[0][1] and control_net.parts[0].image is None
    assert ZeroConvApplyControlNet().apply(positive, negative, control_net, _image(), 0.0, 0.0, 1.0) == (positive, negative)


def test_get_control_equals_the_library(tiny_unet, tiny_controlnet) -> None:
    from zeroconv.nodes.comfy_adapter import ControlPart, make_control

    control = make_control((ControlPart(tiny_controlnet),))
    pos, _ = _apply(control, strength=0.8)
    out, (x, t, cond) = _sample_call(pos[0][1]["control"], tiny_unet)
    ms = _model(tiny_unet).model_sampling
    hint = _image().movedim(-1, 1)
    ref = compute_residuals([ControlUnit(tiny_controlnet, hint, ControlSettings(strength=0.8))],
                            ms.calculate_input(t, x), ms.timestep(t), cond["c_crossattn"], percent=0.5)
    assert len(out["output"]) == 4 and out["input"] == []
    for a, b in zip(out["output"] + out["middle"], ref.all):
        torch.testing.assert_close(a, b)


def test_step_range_and_cond_only_modes(tiny_unet, tiny_controlnet) -> None:
    from zeroconv.nodes.comfy_adapter import ControlPart, make_control

    control = make_control((ControlPart(tiny_controlnet),))
    late, _ = _apply(control, start_percent=0.5, end_percent=1.0)
    assert _sample_call(late[0][1]["control"], tiny_unet, sigma=14.0)[0] is None, "early step outside the range"
    assert _sample_call(late[0][1]["control"], tiny_unet, sigma=0.1)[0] is not None
    cond_only, _ = _apply(control, control_mode="controlnet_more_important")
    out = _sample_call(cond_only[0][1]["control"], tiny_unet)[0]
    assert all(torch.count_nonzero(r[1]) == 0 and r[0].abs().sum() > 0 for r in out["output"])


def test_compose_equals_chained_apply_nodes(folder, tiny_unet) -> None:
    canny = ZeroConvLoadControlNet().load("sd15/Control-Canny.safetensors")[0]
    depth = ZeroConvLoadControlNet().load("depth.safetensors")[0]
    img_a, img_b = _image(1), _image(2)
    schedule = ZeroConvStrengthSchedule().build("0:1.0, 0.5:0.5", "hold")[0]
    stack = ZeroConvControlUnit().add(canny, img_a, 0.7, 0.0, 1.0)[0]
    stack = ZeroConvControlUnit().add(depth, img_b, 1.2, 0.0, 1.0, schedule=schedule, stack=stack)[0]
    composed = ZeroConvComposeControlNets().compose(stack)[0]
    single, _ = _apply(composed, image=_image(9))
    chained_pos, chained_neg = _apply(canny, image=img_a, strength=0.7)
    chained_pos, _ = ZeroConvApplyControlNet().apply(chained_pos, chained_neg, depth, img_b, 1.2, 0.0, 1.0,
                                                     schedule=schedule)
    a = _sample_call(single[0][1]["control"], tiny_unet)[0]
    b = _sample_call(chained_pos[0][1]["control"], tiny_unet)[0]
    for x, y in zip(a["output"] + a["middle"], b["output"] + b["middle"]):
        torch.testing.assert_close(x, y)


class CoreLikeControl:
    """A stand-in for a core ControlBase: constant residuals, same protocol."""

    def __init__(self, value: float):
        self.value, self.previous_controlnet, self.calls = value, None, []

    def copy(self):
        return self

    def set_cond_hint(self, hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=None):
        self.strength = strength
        return self

    def set_previous_controlnet(self, c):
        self.previous_controlnet = c
        return self

    def pre_run(self, model, fn):
        self.calls.append("pre_run")

    def get_control(self, x, t, cond, batched_number, transformer_options):
        shapes = [(x.shape[0], c, x.shape[2] // f, x.shape[3] // f) for c, f in make_unet().config.skip_layout()]
        return {"input": [], "middle": [torch.full((x.shape[0], 64, 4, 4), self.value)],
                "output": [torch.full(s, self.value) for s in shapes]}

    def cleanup(self):
        self.calls.append("cleanup")


def test_chains_with_a_core_control(tiny_unet, tiny_controlnet) -> None:
    from zeroconv.nodes.comfy_adapter import ControlPart, make_control

    ours = make_control((ControlPart(tiny_controlnet),))
    core = CoreLikeControl(0.5)
    alone = _sample_call(_apply(ours)[0][0][1]["control"], tiny_unet)[0]
    positive, negative = _conds()
    positive[0][1]["control"] = negative[0][1]["control"] = core
    pos, _ = ZeroConvApplyControlNet().apply(positive, negative, ours, _image(), 1.0, 0.0, 1.0)
    chained = _sample_call(pos[0][1]["control"], tiny_unet)[0]
    for a, b in zip(chained["output"], alone["output"]):
        torch.testing.assert_close(a, b + 0.5)
    assert core.calls == ["pre_run", "cleanup"]
    used_by_core, _ = ZeroConvApplyControlNet().apply(*_conds(), core, _image(), 0.3, 0.0, 1.0)
    assert used_by_core[0][1]["control"].strength == 0.3
    with pytest.raises(ValueError, match="ZeroConv's loader"):
        ZeroConvApplyControlNet().apply(*_conds(), core, _image(), 1.0, 0.0, 1.0, control_mode="prompt_more_important")


def test_wrong_family_is_refused_before_sampling(tiny_controlnet) -> None:
    from zeroconv.nodes.comfy_adapter import ControlPart, make_control

    pos, _ = _apply(make_control((ControlPart(tiny_controlnet, name="canny.safetensors"),)))
    sdxl_unet = make_unet("tiny-sdxl")
    with pytest.raises(ValueError, match=r"canny\.safetensors is tiny SD1\.x-shaped.*tiny SDXL-shaped"):
        pos[0][1]["control"].pre_run(_model(sdxl_unet), lambda p: 1.0)


def test_bad_inputs_are_explained(tiny_unet, tiny_controlnet) -> None:
    from zeroconv.nodes.comfy_adapter import ControlPart, make_control

    control = make_control((ControlPart(tiny_controlnet),))
    with pytest.raises(ValueError, match="swap"):
        _apply(control, start_percent=0.9, end_percent=0.1)
    for image in (_image(channels=1), _image(channels=4), torch.rand(1, 40, 100, 3)):
        pos, _ = _apply(control, image=image)
        assert _sample_call(pos[0][1]["control"], tiny_unet)[0] is not None
    with pytest.raises(ValueError, match="mask"):
        _apply(control, mask=torch.rand(2, 3, 8, 8))


def test_cleanup_leaves_no_state(tiny_unet, tiny_controlnet) -> None:
    from zeroconv.nodes.comfy_adapter import ControlPart, make_control

    control = _apply(make_control((ControlPart(tiny_controlnet),)))[0][0][1]["control"]
    before = set(vars(tiny_unet))
    for _ in range(20):
        _sample_call(control, tiny_unet)
    assert control._units == {} and control._model_sampling is None and set(vars(tiny_unet)) == before


def test_loader_suggests_the_annotator_from_metadata(tmp_path, monkeypatch, tiny_controlnet, caplog) -> None:
    import logging

    from zeroconv.controlnet_model.checkpoint import ControlNetMetadata

    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path))
    save_controlnet(tiny_controlnet, tmp_path / "mine.safetensors", ControlNetMetadata(control_type="mlsd"))
    with caplog.at_level(logging.INFO):
        ZeroConvLoadControlNet().load("mine.safetensors")
    assert "mlsd ControlNet" in caplog.text and "lines annotator" in caplog.text
