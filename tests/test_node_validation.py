"""Apply-time validation: every numeric, image and mask input of the apply, unit and schedule nodes is checked
before any work, and the error names the input."""
from __future__ import annotations

import math

import pytest
import torch

from zeroconv.controlnet_model import init_from_unet
from zeroconv.nodes.apply import ZeroConvApplyControlNet, ZeroConvStrengthSchedule
from zeroconv.nodes.compose import ZeroConvControlUnit
from zeroconv.nodes.host.control import ControlPart, make_control

from .conftest import make_unet

GOOD = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}
BAD = [
    ({"strength": math.nan}, "strength is nan"), ({"strength": -0.5}, "strength is -0.5"),
    ({"strength": 11.0}, r"strength is 11.0; give a number from 0.0 to 10.0"),
    ({"start_percent": math.nan}, "start_percent is nan"), ({"end_percent": 1.5}, "end_percent is 1.5"),
    ({"start_percent": -0.1}, "start_percent is -0.1"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent 0.8 is after end_percent 0.2"),
    ({"image": torch.zeros(1, 0, 0, 3)}, r"image has shape \(1, 0, 0, 3\)"),
    ({"image": torch.zeros(1, 8, 8, 2)}, r"image has shape \(1, 8, 8, 2\)"),
    ({"mask": torch.zeros(1, 0, 0)}, "mask is empty"), ({"mask": torch.zeros(1, 8, 8)}, "mask is all zero"),
]


@pytest.fixture(scope="module")
def control():
    controlnet, _ = init_from_unet(make_unet("tiny"))
    return make_control((ControlPart(controlnet, name="tiny"),))


def _conditioning():
    return [[torch.zeros(1, 4, 32), {}]]


@pytest.mark.parametrize("changes, message", BAD)
def test_apply_node_names_the_bad_input(control, changes, message) -> None:
    inputs = {"image": torch.zeros(1, 8, 8, 3), **GOOD, **changes}
    with pytest.raises(ValueError, match=message):
        ZeroConvApplyControlNet().apply(_conditioning(), _conditioning(), control, **inputs)


@pytest.mark.parametrize("changes, message", BAD)
def test_unit_node_names_the_bad_input(control, changes, message) -> None:
    inputs = {"image": torch.zeros(1, 8, 8, 3), **GOOD, **changes}
    with pytest.raises(ValueError, match=message):
        ZeroConvControlUnit().add(control, **inputs)


def test_strength_zero_is_still_checked_and_a_good_apply_passes(control) -> None:
    with pytest.raises(ValueError, match="end_percent is nan"):
        ZeroConvApplyControlNet().apply(_conditioning(), _conditioning(), control, torch.zeros(1, 8, 8, 3), 0.0,
                                        0.0, math.nan)
    positive, _ = ZeroConvApplyControlNet().apply(_conditioning(), _conditioning(), control,
                                                  torch.zeros(1, 8, 8, 3), **GOOD)
    assert positive[0][1]["control"] is not None


@pytest.mark.parametrize("text", ["0.0:nan", "0.0:inf", "nan:1.0", "0.0:-1"])
def test_schedule_refuses_non_finite_or_negative_keyframes(text) -> None:
    with pytest.raises(ValueError, match="keyframes: keyframe"):
        ZeroConvStrengthSchedule().build(text, "hold")
