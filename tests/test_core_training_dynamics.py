"""Eq. 6-8: how gradients switch on through zero convolutions, and that the locked U-Net never changes."""
from __future__ import annotations

import torch

from zeroconv.controlnet_model import init_from_unet

from .conftest import make_inputs, make_unet

ZERO_PREFIXES = ("zero_convs.", "middle_block_out.")


def _step(unet, controlnet, opt, inputs) -> dict[str, torch.Tensor]:
    out = controlnet(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"])
    pred = unet(inputs["x"], inputs["timesteps"], inputs["context"], control=out)
    loss = torch.nn.functional.mse_loss(pred, torch.randn_like(pred, generator=None))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in controlnet.named_parameters()}
    opt.step()
    return grads


def test_first_step_only_zero_convs_learn_then_everything_moves() -> None:
    torch.manual_seed(0)
    unet = make_unet("tiny").requires_grad_(False)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    controlnet, _ = init_from_unet(unet)
    controlnet.train()
    start = {n: p.detach().clone() for n, p in controlnet.named_parameters()}
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    inputs = make_inputs(unet.config)

    grads = _step(unet, controlnet, opt, inputs)
    nonzero = {n for n, g in grads.items() if torch.count_nonzero(g) > 0}
    assert nonzero == {n for n in grads if n.startswith(ZERO_PREFIXES)}

    for _ in range(2):
        grads = _step(unet, controlnet, opt, inputs)
    assert all(torch.count_nonzero(g) > 0 for g in grads.values()), "every parameter has a gradient by step 3"
    moved = [n for n, p in controlnet.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start), "after a few steps every parameter has moved"
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in unet_before.items()), "the locked U-Net is untouched"
    assert all(p.grad is None for p in unet.parameters())


def test_optimizer_over_controlnet_only_leaves_unet_out() -> None:
    unet = make_unet("tiny").requires_grad_(False)
    controlnet, _ = init_from_unet(unet)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held.isdisjoint({id(p) for p in unet.parameters()})
