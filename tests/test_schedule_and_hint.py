"""Strength schedules and fitting control images to the latent."""
from __future__ import annotations

import pytest
import torch

from zeroconv.controlnet_model import HintFit, StrengthSchedule, fit_hint, image_to_hint


def test_hold_and_linear_schedules() -> None:
    hold = StrengthSchedule.parse("0:1.0, 0.5:0.2")
    assert hold(0.0) == 1.0 and hold(0.49) == 1.0 and hold(0.5) == 0.2 and hold(1.0) == 0.2
    linear = StrengthSchedule.parse("0:1.0\n1:0.0", interpolation="linear")
    assert linear(0.25) == pytest.approx(0.75)


@pytest.mark.parametrize("text,match", [("0.5:1, 0.2:1", "increasing"), ("abc", "percent:multiplier"),
                                        ("1.5:1", "outside"), ("", "at least one")])
def test_bad_schedules_are_explained(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StrengthSchedule.parse(text)


def test_fits_keep_or_pad_content() -> None:
    image = torch.ones(1, 3, 32, 64)  # wide image
    cropped = fit_hint(image, 64, 64, HintFit.CROP_AND_RESIZE)
    stretched = fit_hint(image, 64, 64, HintFit.RESIZE)
    filled = fit_hint(image, 64, 64, HintFit.RESIZE_AND_FILL)
    assert cropped.shape == stretched.shape == filled.shape == (1, 3, 64, 64)
    assert cropped.min() == 1.0 and stretched.min() == 1.0
    assert filled[..., :16, :].max() == 0.0 and filled[..., 16:48, :].min() == 1.0  # black bars above and below


def test_grey_rgba_and_nan_images() -> None:
    grey = torch.rand(2, 16, 16, 1)
    assert image_to_hint(grey).shape == (2, 3, 16, 16)
    rgba = torch.ones(1, 16, 16, 4)
    rgba[..., 3] = 0.0
    assert image_to_hint(rgba).max() == 0.0, "transparent pixels carry no control"
    with pytest.raises(ValueError, match="channels"):
        image_to_hint(torch.rand(1, 16, 16, 2))
    bad = torch.rand(1, 16, 16, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        image_to_hint(bad)
