"""The training loop's step guards: the base stays locked and the optimiser holds ControlNet weights only.
(Loss falling, a bit-identical base and 50 % caption dropout are in test_train_loop.py.)"""
from __future__ import annotations

import pytest
import torch

from zeroconv.controlnet_model import init_from_unet
from zeroconv.training.loop import check_trainable

from .conftest import make_unet


def test_unlocked_base_or_foreign_parameters_are_refused() -> None:
    unet = make_unet("tiny").requires_grad_(False)
    controlnet, _ = init_from_unet(unet)
    check_trainable(controlnet, unet, torch.optim.AdamW(controlnet.parameters()), [])
    with pytest.raises(ValueError, match="optimiser holds"):
        check_trainable(controlnet, unet, torch.optim.AdamW([*controlnet.parameters(), torch.nn.Parameter(torch.zeros(1))]),
                        [])
    unet.requires_grad_(True)
    with pytest.raises(ValueError, match="locked"):
        check_trainable(controlnet, unet, torch.optim.AdamW(controlnet.parameters()), [])
