"""Where residuals enter and how strength, range, mask, modes and composition scale them."""
from __future__ import annotations

import pytest
import torch

from zeroconv.controlnet_model import (ControlMode, ControlSettings, ControlUnit, StrengthSchedule, compute_residuals,
                                       init_from_unet, output_scales, residuals_injected, run_control)
from zeroconv.controlnet_model.residuals import SOFT_INJECTION_BASE, ldm_unet_forward

from .conftest import make_unet, randomize


def _run(unit, inputs, percent=0.5, cond_rows=None):
    with torch.no_grad():
        return run_control(unit, inputs["x"], inputs["timesteps"], inputs["context"], None, percent, cond_rows)


def _unit(controlnet, inputs, **settings) -> ControlUnit:
    return ControlUnit(controlnet, inputs["hint"], ControlSettings(**settings))


def test_strength_zero_changes_nothing_and_skips_the_forward(tiny_controlnet, tiny_inputs) -> None:
    calls = []
    handle = tiny_controlnet.register_forward_hook(lambda *a: calls.append(1))
    assert _run(_unit(tiny_controlnet, tiny_inputs, strength=0.0), tiny_inputs) is None
    assert not calls
    handle.remove()


def test_residuals_scale_linearly_with_strength(tiny_controlnet, tiny_inputs) -> None:
    one = _run(_unit(tiny_controlnet, tiny_inputs, strength=1.0), tiny_inputs)
    half = _run(_unit(tiny_controlnet, tiny_inputs, strength=0.5), tiny_inputs)
    two = _run(_unit(tiny_controlnet, tiny_inputs, strength=2.0), tiny_inputs)
    for a, b, c in zip(one.all, half.all, two.all):
        torch.testing.assert_close(b, a * 0.5)
        torch.testing.assert_close(c, a * 2.0)
    assert any(r.abs().sum() > 0 for r in one.all)


def test_outside_the_step_range_nothing_is_added(tiny_controlnet, tiny_inputs) -> None:
    unit = _unit(tiny_controlnet, tiny_inputs, start_percent=0.2, end_percent=0.6)
    assert _run(unit, tiny_inputs, percent=0.1) is None
    assert _run(unit, tiny_inputs, percent=0.7) is None
    assert _run(unit, tiny_inputs, percent=0.4) is not None


def test_percentages_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="swap"):
        ControlSettings(start_percent=0.8, end_percent=0.2)


def test_two_controlnets_add_up(tiny_unet, tiny_controlnet, tiny_inputs) -> None:
    other, _ = init_from_unet(tiny_unet)
    randomize(other, seed=3)
    a, b = _unit(tiny_controlnet, tiny_inputs, strength=0.7), _unit(other, tiny_inputs, strength=1.3)
    with torch.no_grad():
        total = compute_residuals([a, b], tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"],
                                  percent=0.5, unet_config=tiny_unet.config)
    ra, rb = _run(a, tiny_inputs), _run(b, tiny_inputs)
    for t, x, y in zip(total.control.all, ra.all, rb.all):
        torch.testing.assert_close(t, x + y)


def test_mask_confines_the_effect(tiny_unet, tiny_controlnet, tiny_inputs) -> None:
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0  # left half only
    out = _run(_unit(tiny_controlnet, tiny_inputs, mask=mask), tiny_inputs)
    for r in out.all:
        w = r.shape[-1]
        if w >= 2:
            assert torch.count_nonzero(r[..., w // 2 + 1:]) == 0
            assert r[..., : w // 2 - 1].abs().sum() > 0
    with torch.no_grad():
        plain = tiny_unet(tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"])
        masked = tiny_unet(tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"], control=out)
    assert not torch.equal(plain, masked)


def test_mask_of_another_batch_is_explained(tiny_controlnet, tiny_inputs) -> None:
    with pytest.raises(ValueError, match="mask has a batch of 3"):
        _run(_unit(tiny_controlnet, tiny_inputs, mask=torch.ones(3, 16, 16)), tiny_inputs)
    small = _run(_unit(tiny_controlnet, tiny_inputs, mask=torch.ones(1, 5, 7)), tiny_inputs)  # any size: resized
    assert small is not None


def test_mode_scales_are_the_documented_ones() -> None:
    sd15_heights = [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8]
    soft = output_scales(ControlMode.PROMPT_MORE_IMPORTANT, sd15_heights)
    expected = [0.0994, 0.1205, 0.1461, 0.1770, 0.2146, 0.2601, 0.3153, 0.3822, 0.4633, 0.5615, 0.6806, 0.825, 1.0]
    assert soft == pytest.approx(expected, abs=5e-5)
    assert output_scales(ControlMode.BALANCED, sd15_heights) == [1.0] * 13
    assert output_scales(ControlMode.CFG_RESOLUTION_WEIGHTING, sd15_heights) == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8]
    sdxl = output_scales(ControlMode.CONTROLNET_MORE_IMPORTANT, [128] * 3 + [64] * 3 + [32] * 3 + [32])
    assert sdxl[0] == pytest.approx(SOFT_INJECTION_BASE**9) and sdxl[-1] == 1.0


@pytest.mark.parametrize("mode", list(ControlMode))
def test_each_mode_applies_its_scales_and_rows(mode, tiny_controlnet, tiny_inputs) -> None:
    cond_rows = torch.tensor([True, False])
    base = _run(_unit(tiny_controlnet, tiny_inputs), tiny_inputs, cond_rows=cond_rows)
    out = _run(_unit(tiny_controlnet, tiny_inputs, mode=mode), tiny_inputs, cond_rows=cond_rows)
    scales = output_scales(mode, [r.shape[-2] for r in base.all])
    cond_only = mode in (ControlMode.CONTROLNET_MORE_IMPORTANT, ControlMode.CFG_RESOLUTION_WEIGHTING)
    for r, b, s in zip(out.all, base.all, scales):
        torch.testing.assert_close(r[0], b[0] * s, rtol=1e-4, atol=1e-6)
        if cond_only:
            assert torch.count_nonzero(r[1]) == 0
        else:
            torch.testing.assert_close(r[1], b[1] * s, rtol=1e-4, atol=1e-6)


def test_cond_only_modes_run_the_controlnet_on_conditional_rows_only(tiny_controlnet, tiny_inputs) -> None:
    batches = []
    handle = tiny_controlnet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    _run(_unit(tiny_controlnet, tiny_inputs, mode="controlnet_more_important"), tiny_inputs,
         cond_rows=torch.tensor([True, False]))
    handle.remove()
    assert batches == [1]


def test_global_average_pooling_flattens_each_residual(tiny_unet, tiny_inputs) -> None:
    from zeroconv.controlnet_model import ControlNet

    shuffle = ControlNet(tiny_unet.config.replace(global_average_pooling=True))
    randomize(shuffle, seed=5)
    out = _run(ControlUnit(shuffle, tiny_inputs["hint"]), tiny_inputs, cond_rows=torch.tensor([True, False]))
    for r in out.all:
        assert torch.allclose(r[0], r[0].mean(dim=(1, 2), keepdim=True).expand_as(r[0]))
        assert torch.count_nonzero(r[1]) == 0, "shuffle-type models steer the conditional side only"


def test_schedule_multiplies_strength(tiny_controlnet, tiny_inputs) -> None:
    schedule = StrengthSchedule(((0.0, 1.0), (0.5, 0.25)))
    early = _run(_unit(tiny_controlnet, tiny_inputs, schedule=schedule), tiny_inputs, percent=0.2)
    late = _run(_unit(tiny_controlnet, tiny_inputs, schedule=schedule), tiny_inputs, percent=0.7)
    for a, b in zip(early.all, late.all):
        torch.testing.assert_close(b, a * 0.25)


def test_patched_forward_adds_residuals_and_is_restored_after_an_exception(tiny_unet, tiny_controlnet, tiny_inputs):
    class SeamlessUNet(type(tiny_unet)):
        """An A1111-style U-Net whose forward has no residual argument."""

        def forward(self, x, timesteps=None, context=None, y=None):
            return ldm_unet_forward(self, x, timesteps, context, y)

    unet = SeamlessUNet(tiny_unet.config)
    unet.load_state_dict(tiny_unet.state_dict())
    out = _run(_unit(tiny_controlnet, tiny_inputs), tiny_inputs)
    attributes = set(vars(unet))
    with torch.no_grad():
        with residuals_injected(unet, out):
            patched = unet(tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"])
        seamed = tiny_unet(tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"], control=out)
    torch.testing.assert_close(patched, seamed)
    with pytest.raises(RuntimeError, match="boom"):
        with residuals_injected(unet, out):
            raise RuntimeError("boom")
    assert set(vars(unet)) == attributes and "forward" not in vars(unet)
    assert type(unet).forward is SeamlessUNet.forward


def test_host_style_control_dict_gives_the_same_result(tiny_unet, tiny_controlnet, tiny_inputs) -> None:
    out = _run(_unit(tiny_controlnet, tiny_inputs), tiny_inputs)
    host = {"input": [], "middle": [out.mid], "output": list(out.down)}
    with torch.no_grad():
        a = tiny_unet(tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"], control=out)
        b = tiny_unet(tiny_inputs["x"], tiny_inputs["timesteps"], tiny_inputs["context"], control=host)
    assert torch.equal(a, b)
    assert len(host["output"]) == len(out.down), "the caller's lists are not consumed"
