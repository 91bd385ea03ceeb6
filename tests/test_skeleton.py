"""skeleton(): meta-device builds skip random initialisation, and only for meta tensors."""
import torch
from torch import nn

from zeroconv.controlnet_model.skeleton import skeleton


def test_skeleton_builds_on_meta_and_restores_the_initialisers():
    before = nn.init.kaiming_uniform_
    net = skeleton(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 4)))
    assert all(p.is_meta for p in net.parameters())
    assert nn.init.kaiming_uniform_ is before


def test_real_tensors_built_inside_a_skeleton_are_still_initialised():
    real = []

    def factory():
        real.append(nn.Linear(16, 16, device="cpu"))  # e.g. another thread's module, built meanwhile
        return nn.Linear(16, 16)

    skeleton(factory)
    weight = real[0].weight
    assert not weight.is_meta and weight.abs().sum() > 0 and weight.std() > 0.01


def test_a_skeleton_loads_by_assignment():
    source = nn.Linear(4, 2)
    net = skeleton(lambda: nn.Linear(4, 2))
    net.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(3, 4)
    assert torch.equal(net(x), source(x))


def test_a_skeleton_built_inside_a_skeleton():
    before = nn.init.kaiming_uniform_
    net = skeleton(lambda: nn.Sequential(skeleton(lambda: nn.Linear(2, 2)), nn.Linear(2, 2)))
    assert all(p.is_meta for p in net.parameters())
    assert nn.init.kaiming_uniform_ is before
