"""The host adapter in a sampling loop: ComfyUI's control protocol with host stand-ins and the stub U-Net.

Each test samples (or makes single model calls) the way ComfyUI does: pre_run once, get_control on every model
call with cond and uncond batched, the dict fed to the U-Net, cleanup at the end.
"""
from __future__ import annotations

import gc
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch

from zeroconv.controlnet_model import init_from_unet, output_scales
from zeroconv.controlnet_model.residuals import ControlMode
from zeroconv.nodes.apply import ZeroConvApplyControlNet, ZeroConvStrengthSchedule
from zeroconv.nodes.host.control import ControlPart, ZeroConvControl, make_control
from zeroconv.nodes.compose import ZeroConvComposeControlNets, ZeroConvControlUnit

from .conftest import make_unet, randomize
from .test_adapter_standins import (CoreLikeControlNet, DiscreteEps, conditioning, core_apply, host_model, image,
                                    one_thread, sample)  # noqa: F401 (autouse fixture)


def ours(net, name: str = "canny_sd15.safetensors") -> ZeroConvControl:
    return make_control((ControlPart(net, name=name),))


def apply(control, img=None, conds=None, **kw):
    positive, negative = conds or conditioning()
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0) | kw
    return ZeroConvApplyControlNet().apply(positive, negative, control, image() if img is None else img, **args)


class Counter:
    """Forward batch sizes of a ControlNet and how often its hint encoder ran."""

    def __init__(self, net):
        self.forwards, self.encodes = [], 0
        self._hooks = [net.register_forward_hook(lambda m, args, out: self.forwards.append(args[0].shape[0])),
                       net.input_hint_block.register_forward_hook(lambda *a: self._encoded())]

    def _encoded(self):
        self.encodes += 1

    def remove(self):
        for hook in self._hooks:
            hook.remove()


@pytest.fixture
def other_controlnet(tiny_unet):
    net, _ = init_from_unet(tiny_unet)
    return randomize(net, seed=11, std=0.05).eval()


def one_call(control, unet, sigma=3.0, kinds=(0, 1), batch=1, seed=5):
    """One model call: pre_run, get_control on a cond+uncond batch, cleanup."""
    model = host_model(unet)
    control.pre_run(model, model.model_sampling.percent_to_sigma)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * len(kinds), 4, 8, 8, generator=gen)
    context = torch.randn(x.shape[0], 7, 32, generator=gen)
    try:
        with torch.no_grad():
            return control.get_control(x, torch.full((x.shape[0],), sigma), {"c_crossattn": context}, len(kinds),
                                       {"cond_or_uncond": list(kinds)})
    finally:
        control.cleanup()


def test_control_changes_the_result_and_strength_zero_runs_nothing(tiny_unet, tiny_controlnet) -> None:
    count = Counter(tiny_controlnet)
    plain = sample(tiny_unet, *conditioning())
    off = sample(tiny_unet, *apply(ours(tiny_controlnet), strength=0.0))
    assert torch.equal(off, plain) and count.forwards == []
    on = sample(tiny_unet, *apply(ours(tiny_controlnet)))
    assert (on - plain).abs().max() > 1e-3
    assert count.forwards == [2] * 4, "one forward per step, cond and uncond in one batch"
    count.remove()


def test_hint_is_encoded_once_per_run_and_nothing_runs_outside_the_range(tiny_unet, tiny_controlnet) -> None:
    ms, steps = DiscreteEps(), 6
    sigmas = ms.schedule(steps)[:-1]
    count = Counter(tiny_controlnet)
    sample(tiny_unet, *apply(ours(tiny_controlnet), end_percent=0.5), steps=steps)
    first_half = int((sigmas >= ms.percent_to_sigma(0.5)).sum())
    assert 0 < first_half < steps and len(count.forwards) == first_half and count.encodes == 1
    count.forwards, count.encodes = [], 0
    sample(tiny_unet, *apply(ours(tiny_controlnet), start_percent=0.5), steps=steps)
    assert len(count.forwards) == steps - first_half + int((sigmas == ms.percent_to_sigma(0.5)).sum())
    assert count.encodes == 1
    count.forwards, count.encodes = [], 0
    sample(tiny_unet, *apply(ours(tiny_controlnet), start_percent=0.9, end_percent=0.95), steps=steps)
    assert count.forwards == [] and count.encodes == 0, "never in range: no forward, not even the hint encoder"
    count.remove()


def test_the_step_gate_compares_sigmas_like_core(tiny_unet, tiny_controlnet) -> None:
    """At a step whose sigma equals the range's end sigma exactly, core acts, and so do we."""
    log: list = []
    core = CoreLikeControlNet(tiny_controlnet, log)
    count = Counter(tiny_controlnet)
    sample(tiny_unet, *apply(ours(tiny_controlnet), end_percent=0.5), steps=5)
    ours_forwards = len(count.forwards)
    count.remove()
    sample(tiny_unet, *core_apply(*conditioning(), core, image(), 1.0, 0.0, 0.5), steps=5)
    assert ours_forwards == sum(1 for e in log if isinstance(e, tuple)) == 3


@pytest.mark.parametrize("mode", ["controlnet_more_important", "cfg_resolution_weighting"])
def test_cond_only_modes_compute_only_conditional_rows(mode, tiny_unet, tiny_controlnet) -> None:
    count = Counter(tiny_controlnet)
    control = apply(ours(tiny_controlnet), control_mode=mode)[0][0][1]["control"]
    out = one_call(control, tiny_unet, batch=2)
    assert count.forwards == [2], "two conditional rows of four"
    for r in out["output"] + out["middle"]:
        assert r[:2].abs().sum() > 0 and torch.count_nonzero(r[2:]) == 0
    assert one_call(control, tiny_unet, kinds=(1,)) is None and count.forwards == [2], "uncond-only call: nothing"
    count.remove()


@pytest.mark.parametrize("mode", [m.value for m in ControlMode if m is not ControlMode.BALANCED])
def test_modes_scale_each_residual_as_the_library_says(mode, tiny_unet, tiny_controlnet) -> None:
    balanced = one_call(apply(ours(tiny_controlnet))[0][0][1]["control"], tiny_unet)
    scaled = one_call(apply(ours(tiny_controlnet), control_mode=mode)[0][0][1]["control"], tiny_unet)
    residuals = balanced["output"] + balanced["middle"]
    scales = output_scales(ControlMode(mode), [r.shape[-2] for r in residuals])
    assert len(set(scales)) > 1
    for a, b, s in zip(residuals, scaled["output"] + scaled["middle"], scales):
        torch.testing.assert_close(b[0], a[0] * s)


def test_mask_keeps_the_control_inside_it(tiny_unet, tiny_controlnet, caplog) -> None:
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    out = one_call(apply(ours(tiny_controlnet), mask=mask)[0][0][1]["control"], tiny_unet)
    for r in out["output"] + out["middle"]:
        assert torch.count_nonzero(r[..., -1]) == 0 and r[..., 0].abs().sum() > 0
    small = one_call(apply(ours(tiny_controlnet), mask=mask[:, ::4, ::4])[0][0][1]["control"], tiny_unet)
    for a, b in zip(out["output"], small["output"]):
        assert torch.count_nonzero(b[..., -1]) == 0
    with caplog.at_level(logging.WARNING):
        three = one_call(apply(ours(tiny_controlnet), mask=mask.repeat(3, 1, 1))[0][0][1]["control"], tiny_unet,
                         batch=2)
    assert "mask has a batch of 3 but there are 2 latents" in caplog.text
    assert three["output"][0].shape[0] == 4


def test_images_of_any_size_channels_and_batch_are_fitted(tiny_unet, tiny_controlnet, caplog) -> None:
    """A 40x100 image is centre-cropped and resized like core does it; grey and RGBA are accepted."""
    for img in (image(size=(40, 100)), image(channels=1), image(channels=4)):
        assert one_call(apply(ours(tiny_controlnet), img=img)[0][0][1]["control"], tiny_unet) is not None
    wide = image(size=(40, 100))
    core = CoreLikeControlNet(tiny_controlnet)
    a = one_call(apply(ours(tiny_controlnet), img=wide)[0][0][1]["control"], tiny_unet)
    b = one_call(core_apply(*conditioning(), core, wide, 1.0)[0][0][1]["control"], tiny_unet)
    for x, y in zip(a["output"] + a["middle"], b["output"] + b["middle"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    stretched = one_call(apply(ours(tiny_controlnet), img=wide, fit="resize")[0][0][1]["control"], tiny_unet)
    assert not torch.allclose(stretched["output"][0], a["output"][0])
    with caplog.at_level(logging.WARNING):
        one_call(apply(ours(tiny_controlnet), img=image(batch=3))[0][0][1]["control"], tiny_unet, batch=2)
    assert "control image has a batch of 3 but there are 2 latents" in caplog.text


def test_an_inpaint_hint_keeps_its_minus_one_pixels(tiny_unet, tiny_controlnet) -> None:
    """The inpaint ControlNet's hint marks masked pixels -1; like core's apply, ours passes them through."""
    seen = []
    hook = tiny_controlnet.input_hint_block.register_forward_hook(lambda m, args, out: seen.append(args[0].min()))
    hint = image()
    hint[:, :16] = -1.0
    one_call(apply(ours(tiny_controlnet), img=hint)[0][0][1]["control"], tiny_unet)
    hook.remove()
    assert seen == [-1.0]


def test_a_controlnet_of_another_family_is_refused_before_sampling(tiny_controlnet) -> None:
    control = apply(ours(tiny_controlnet, "canny_sd15.safetensors"))[0][0][1]["control"]
    control.model_names = ("sd_xl_base.safetensors",)
    sdxl = host_model(make_unet("tiny-sdxl"))
    with pytest.raises(ValueError, match=r"canny_sd15\.safetensors is tiny SD1\.x-shaped.*sd_xl_base\.safetensors is "
                                         r"tiny SDXL-shaped"):
        control.pre_run(sdxl, sdxl.model_sampling.percent_to_sigma)
    comfy_sdxl = SimpleNamespace(model_sampling=DiscreteEps(), latent_format=SimpleNamespace(latent_channels=4),
                                 model_config=SimpleNamespace(unet_config=dict(
                                     in_channels=4, model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                                     transformer_depth=[0, 0, 2, 2, 10, 10], context_dim=2048, adm_in_channels=2816)))
    with pytest.raises(ValueError, match=r"canny_sd15\.safetensors is tiny SD1\.x-shaped.* is SDXL \(context 2048"):
        control.pre_run(comfy_sdxl, DiscreteEps().percent_to_sigma)
    flux = SimpleNamespace(model_sampling=DiscreteEps(), model_config=SimpleNamespace(unet_config={"image_model": "flux"}))
    with pytest.raises(ValueError, match=r"canny_sd15\.safetensors is a tiny SD1\.x-shaped ControlNet but .* is Flux\.1"):
        control.pre_run(flux, DiscreteEps().percent_to_sigma)


def test_an_inpainting_model_of_the_same_family_is_accepted(tiny_unet, tiny_controlnet) -> None:
    """A 9-channel inpainting U-Net takes the usual 4-channel ControlNets (the check uses latent channels)."""
    config = tiny_unet.config.to_dict() | {"in_channels": 9, "transformer_depth": [1, 1], "channel_mult": [1, 2]}
    inpaint = SimpleNamespace(model_sampling=DiscreteEps(), latent_format=SimpleNamespace(latent_channels=4),
                              model_config=SimpleNamespace(unet_config=config))
    control = apply(ours(tiny_controlnet))[0][0][1]["control"]
    control.pre_run(inpaint, DiscreteEps().percent_to_sigma)
    control.cleanup()


def test_compose_equals_chained_apply_nodes(tiny_unet, tiny_controlnet, other_controlnet) -> None:
    """Three ControlNets (two ours, one core) with their own images, strengths, ranges, mask and schedule."""
    third = CoreLikeControlNet(randomize(init_from_unet(tiny_unet)[0], seed=21, std=0.05).eval())
    mask = torch.ones(1, 16, 16)
    mask[:, :8] = 0.0
    schedule = ZeroConvStrengthSchedule().build("0:1.0, 0.5:0.25", "linear")[0]
    units = [dict(control_net=ours(tiny_controlnet), image=image(1), strength=0.7, start_percent=0.0, end_percent=1.0,
                  mask=mask),
             dict(control_net=ours(other_controlnet, "depth.safetensors"), image=image(2), strength=1.2,
                  start_percent=0.0, end_percent=0.6, schedule=schedule, control_mode="prompt_more_important"),
             dict(control_net=third, image=image(3), strength=0.5, start_percent=0.2, end_percent=1.0)]
    stack = ()
    for unit in units:
        stack = ZeroConvControlUnit().add(stack=stack, **unit)[0]
    composed = ZeroConvComposeControlNets().compose(stack)[0]
    single = sample(tiny_unet, *apply(composed, img=image(9)))
    conds = conditioning()
    for unit in units:
        unit = dict(unit)
        conds = apply(unit.pop("control_net"), img=unit.pop("image"), conds=conds, **unit)
    chained = sample(tiny_unet, *conds)
    torch.testing.assert_close(single, chained, rtol=1e-5, atol=1e-5)
    in_core_apply = sample(tiny_unet, *core_apply(*conditioning(), composed, image(9), 1.0))
    torch.testing.assert_close(in_core_apply, chained, rtol=1e-5, atol=1e-5)
    assert (single - sample(tiny_unet, *conditioning())).abs().max() > 1e-3


@pytest.mark.parametrize("options", [dict(), dict(control_mode="controlnet_more_important"),
                                     dict(control_mode="cfg_resolution_weighting", start_percent=0.3),
                                     dict(control_mode="prompt_more_important", strength=0.6),
                                     dict(mask=torch.tril(torch.ones(1, 64, 64)), schedule="0:1, 0.5:0")])
def test_a_core_controlnet_in_our_apply_node_equals_ours_on_the_same_weights(options, tiny_unet,
                                                                             tiny_controlnet) -> None:
    options = dict(options)
    if "schedule" in options:
        options["schedule"] = ZeroConvStrengthSchedule().build(options["schedule"], "hold")[0]
    log: list = []
    core = CoreLikeControlNet(tiny_controlnet, log)
    a = sample(tiny_unet, *apply(ours(tiny_controlnet), **options))
    b = sample(tiny_unet, *apply(core, **options))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if "control_mode" in options and options["control_mode"] != "prompt_more_important":
        assert all(e[1] == 1 for e in log if isinstance(e, tuple)), "core ControlNet ran on the cond rows only"
    assert log[0] == "pre_run" and log[-1] == "cleanup"


def test_ours_works_in_core_apply_and_chains_with_core_controls(tiny_unet, tiny_controlnet, other_controlnet) -> None:
    ours_in_ours = sample(tiny_unet, *apply(ours(tiny_controlnet), strength=0.8, end_percent=0.7))
    ours_in_core = sample(tiny_unet, *core_apply(*conditioning(), ours(tiny_controlnet), image(), 0.8, 0.0, 0.7))
    torch.testing.assert_close(ours_in_ours, ours_in_core, rtol=1e-6, atol=1e-6)
    log: list = []
    core = CoreLikeControlNet(other_controlnet, log)
    core_first = apply(ours(tiny_controlnet), conds=core_apply(*conditioning(), core, image(2), 0.5))
    ours_first = core_apply(*apply(ours(tiny_controlnet)), core, image(2), 0.5)
    head = core_first[0][0][1]["control"]
    assert head is core_first[1][0][1]["control"] and head.previous_controlnet.previous_controlnet is None
    assert ("core patcher", id(other_controlnet)) in head.get_models()
    torch.testing.assert_close(sample(tiny_unet, *core_first), sample(tiny_unet, *ours_first), rtol=1e-5, atol=1e-5)
    assert log.count("pre_run") == log.count("cleanup") == 2


def test_sampling_leaves_no_trace_over_fifty_cycles(tiny_unet, tiny_controlnet) -> None:
    unet_attrs, net_attrs = set(vars(tiny_unet)), set(vars(tiny_controlnet))
    weights = {k: v.clone() for k, v in tiny_controlnet.state_dict().items()}
    loaded = ours(tiny_controlnet)
    made = []
    for cycle in range(50):
        positive, negative = apply(loaded, strength=0.5 + cycle / 100)
        sample(tiny_unet, positive, negative, steps=2)
        assert positive[0][1]["control"]._run is None
        made.append(weakref.ref(positive[0][1]["control"]))
    del positive, negative
    gc.collect()
    assert all(ref() is None for ref in made), "every cycle's control objects are freed"
    assert set(vars(tiny_unet)) == unet_attrs and set(vars(tiny_controlnet)) == net_attrs
    assert all(torch.equal(v, weights[k]) for k, v in tiny_controlnet.state_dict().items())
    assert loaded._run is None and loaded.parts[0].shared.accelerated == {} and loaded.parts[0].image is None


def test_acceleration_falls_back_on_cpu_and_says_so(tiny_unet, tiny_controlnet, caplog) -> None:
    plain = sample(tiny_unet, *apply(ours(tiny_controlnet)))
    with caplog.at_level(logging.WARNING):
        fast = sample(tiny_unet, *apply(ours(tiny_controlnet), accelerate="cuda_graph"))
    torch.testing.assert_close(fast, plain)
    assert "falls back to the eager forward" in caplog.text


def test_get_control_before_pre_run_is_explained(tiny_controlnet) -> None:
    control = apply(ours(tiny_controlnet))[0][0][1]["control"]
    with pytest.raises(RuntimeError, match="before pre_run"):
        control.get_control(torch.zeros(2, 4, 8, 8), torch.ones(2), {"c_crossattn": torch.zeros(2, 7, 32)}, 2,
                            {"cond_or_uncond": [0, 1]})
