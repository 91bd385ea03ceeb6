"""Union ControlNets and T2I-Adapters through our nodes and host control object (stand-ins, no ComfyUI).

A tiny Union ControlNet on the tiny U-Net's layout and a tiny T2I-Adapter run through the loader, the apply and
unit nodes and the stand-in sampler (tests/test_adapter_standins.py): union_type and core's
SetUnionControlNetType (a copy with extra_args["control_type"]) give the library's typed forward, errors come
before the first step, composed types of one file run in ONE forward equal to the multi-condition forward, and
an adapter runs once per latent size through the apply node.
"""
from __future__ import annotations

import logging

import pytest
import torch

from zeroconv.controlnet_model.accelerate import AcceleratedControlNet
from zeroconv.controlnet_model.checkpoint import save_controlnet
from zeroconv.controlnet_model.residuals import CONTROL_KINDS, merge_controls
from zeroconv.controlnet_model.t2i_adapter import AdapterConfig, AdapterKind, T2IAdapter
from zeroconv.controlnet_model.union import UnionCondition, UnionConfig, UnionControlNet
from zeroconv.nodes.apply import ZeroConvApplyControlNet
from zeroconv.nodes.compose import ZeroConvComposeControlNets, ZeroConvControlUnit
from zeroconv.nodes.host.control import ControlPart, make_control

from .conftest import randomize
from .test_adapter import apply, one_call

try:  # a diffusers ControlNetUnionModel and ours (module fixture); diffusers is a test extra
    from .test_union import promax  # noqa: F401
except pytest.skip.Exception:
    @pytest.fixture
    def promax():
        pytest.skip("the diffusers parity test needs the test extra (diffusers)")
from .test_adapter_standins import conditioning, host_model, image, one_thread, sample  # noqa: F401


@pytest.fixture
def union(tiny_controlnet) -> UnionControlNet:
    cfg = UnionConfig(num_control_types=6, type_embed_dim=8, heads=2).attach(tiny_controlnet.config)
    net = UnionControlNet(cfg)
    net.load_state_dict(tiny_controlnet.state_dict(), strict=False)
    randomize(net, seed=4, std=0.05)
    net.source = "union_tiny.safetensors"
    return net.eval()


@pytest.fixture
def adapter() -> T2IAdapter:
    return randomize(T2IAdapter(AdapterConfig(AdapterKind.FULL, channels=(32, 64), num_res_blocks=2)), 5).eval()


def ours(net, name="union_tiny.safetensors"):
    return make_control((ControlPart(net, name=name),))


def core_set_type(control, index):
    """ComfyUI's SetUnionControlNetType (comfy_extras/nodes_controlnet.py): a copy with extra_args set."""
    control = control.copy()
    control.set_extra_arg("control_type", [] if index is None else [index])
    return control


class Forwards:
    def __init__(self, net):
        self.calls = []
        self.handle = net.register_forward_hook(lambda m, a, kw, out: self.calls.append(kw.get("conditions")),
                                                with_kwargs=True)


def _direct(net, unet, conditions, sigma=3.0, seed=5):
    """The library's forward on the same inputs one_call builds (batch of cond + uncond)."""
    model = host_model(unet)
    ms = model.model_sampling
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, 32, generator=gen)
    t = torch.full((2,), sigma)
    with torch.no_grad():
        return net(ms.calculate_input(t, x), None, ms.timestep(t), context, conditions=conditions)


def test_union_and_adapter_are_registered_kinds() -> None:
    assert {UnionControlNet, T2IAdapter} <= set(CONTROL_KINDS)


def test_union_type_on_the_apply_node_equals_set_union_controlnet_type_and_the_library(tiny_unet, union) -> None:
    hint = image().movedim(-1, 1)
    by_input = one_call(apply(ours(union), strength=0.7, union_type="depth")[0][0][1]["control"], tiny_unet)
    by_core = one_call(apply(core_set_type(ours(union), 1), strength=0.7)[0][0][1]["control"], tiny_unet)
    auto = one_call(apply(ours(union), strength=0.7)[0][0][1]["control"], tiny_unet)
    direct = _direct(union, tiny_unet, [UnionCondition(1, hint, 0.7)])
    for a, b, d in zip(by_input["output"], by_core["output"], direct.down):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(by_input["output"], auto["output"])) > 1e-4
    # core's "auto" ([]) after a type: back to the plain hint path
    reset = one_call(apply(core_set_type(core_set_type(ours(union), 1), None), strength=0.7)[0][0][1]["control"],
                     tiny_unet)
    torch.testing.assert_close(reset["middle"][0], auto["middle"][0])


def test_missing_type_plain_controlnet_and_adapter_are_refused_before_sampling(tiny_controlnet, union,
                                                                               adapter, tiny_unet) -> None:
    with pytest.raises(ValueError, match=r"tile \(6\) is not in union_tiny.safetensors, which has 6 types"):
        apply(ours(union), union_type="tile")
    with pytest.raises(ValueError, match="unknown Union control type 'cany'"):
        apply(ours(union), union_type="cany")
    with pytest.raises(ValueError, match="plain ControlNet"):
        apply(ours(tiny_controlnet, "canny.safetensors"), union_type="canny")
    with pytest.raises(ValueError, match="T2I-Adapter, which has no control types"):
        apply(ours(adapter, "t2iadapter_canny.pth"), union_type="canny")
    control = apply(core_set_type(ours(union), 7))[0][0][1]["control"]  # core's node does not check: pre_run does
    count = Forwards(union)
    with pytest.raises(ValueError, match="repaint .* which has 6 types"):
        one_call(control, tiny_unet)
    assert count.calls == []


def test_two_composed_types_of_one_file_run_in_one_forward_with_per_type_strengths(tiny_unet, union) -> None:
    hint_a, hint_b = image(3), image(4)
    stack = ZeroConvControlUnit().add(ours(union), hint_a, 0.6, 0.0, 1.0, union_type="depth")[0]
    stack = ZeroConvControlUnit().add(ours(union), hint_b, 1.3, 0.0, 1.0, stack=stack, union_type="canny")[0]
    composed = ZeroConvComposeControlNets().compose(stack)[0]
    count = Forwards(union)
    out = one_call(apply(composed, strength=1.0)[0][0][1]["control"], tiny_unet)
    assert len(count.calls) == 1 and len(count.calls[0]) == 2, "both types in ONE forward"
    direct = _direct(union, tiny_unet, [UnionCondition(1, hint_a.movedim(-1, 1), 0.6),
                                        UnionCondition(3, hint_b.movedim(-1, 1), 1.3)])
    for a, d in zip((*out["output"], out["middle"][0]), direct.all):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)
    # other step ranges: not compatible, two forwards (one type each)
    stack = ZeroConvControlUnit().add(ours(union), hint_a, 0.6, 0.0, 0.5, union_type="depth")[0]
    stack = ZeroConvControlUnit().add(ours(union), hint_b, 1.3, 0.0, 1.0, stack=stack, union_type="canny")[0]
    count.calls.clear()
    one_call(apply(ZeroConvComposeControlNets().compose(stack)[0])[0][0][1]["control"], tiny_unet)
    assert [len(c) for c in count.calls] == [1, 1]


def test_composed_union_runs_in_one_forward_per_step_while_sampling(tiny_unet, union) -> None:
    stack = ZeroConvControlUnit().add(ours(union), image(3), 0.6, 0.0, 1.0, union_type="openpose")[0]
    stack = ZeroConvControlUnit().add(ours(union), image(4), 0.9, 0.0, 1.0, stack=stack, union_type="segment")[0]
    count = Forwards(union)
    sample(tiny_unet, *apply(ZeroConvComposeControlNets().compose(stack)[0]), steps=3)
    assert len(count.calls) == 3


def test_union_under_acceleration_falls_back_on_cpu_with_the_same_result(tiny_unet, union, caplog) -> None:
    plain = one_call(apply(ours(union), union_type="normal")[0][0][1]["control"], tiny_unet)
    with caplog.at_level(logging.WARNING):
        for mode in ("compile", "cuda_graph"):
            fast = one_call(apply(ours(union), union_type="normal", accelerate=mode)[0][0][1]["control"], tiny_unet)
            torch.testing.assert_close(fast["middle"][0], plain["middle"][0])
    assert "falls back to the eager forward" in caplog.text
    wrapped = AcceleratedControlNet(union, "none")
    with torch.no_grad():
        hint = torch.rand(1, 3, 64, 64)
        args = (torch.randn(1, 4, 8, 8), None, torch.tensor([10.0]), torch.randn(1, 7, 32))
        torch.testing.assert_close(wrapped(*args, conditions=[(2, hint, 0.5)]).mid,
                                   union(*args, conditions=[(2, hint, 0.5)]).mid)


def test_adapter_through_the_apply_node_runs_once_per_latent_size(tiny_unet, adapter) -> None:
    calls = []
    adapter.register_forward_hook(lambda *a: calls.append(1))
    control = apply(ours(adapter, "t2iadapter_tiny.pth"), strength=0.8)[0][0][1]["control"]
    out = one_call(control, tiny_unet)
    assert out["output"] == [] and out["middle"] == []
    placed = [i for i, f in enumerate(reversed(out["input"])) if f is not None]
    assert placed == [1, 3]  # after input blocks 1 and 3 of the tiny U-Net (ComfyUI pops 'input' from the end)
    plain = sample(tiny_unet, *conditioning())
    calls.clear()
    steered = sample(tiny_unet, *apply(ours(adapter, "t2iadapter_tiny.pth"), strength=0.8), steps=4)
    assert calls == [1], "one adapter run for the whole run (features cached across steps)"
    assert (steered - plain).abs().max() > 1e-4


def test_adapter_input_lists_merge_aligned_at_block_zero() -> None:
    a, b = torch.ones(1), torch.full((1,), 2.0)
    merged = merge_controls({"input": [None, a, a]}, {"input": [b, b]})  # core's SDXL list has one extra entry
    assert merged["input"][0] is None and all(torch.equal(x, a + b) for x in merged["input"][1:])


def test_loader_node_reads_union_and_adapter_files_itself(tmp_path, monkeypatch, union, adapter) -> None:
    from safetensors.torch import save_file

    from zeroconv.nodes.loaders import ZeroConvLoadControlNet

    save_controlnet(union, tmp_path / "union_native.safetensors")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()},
              str(tmp_path / "t2iadapter_tiny.safetensors"))
    monkeypatch.setenv("ZEROCONV_CONTROLNET_DIR", str(tmp_path))
    loaded = ZeroConvLoadControlNet().load("union_native.safetensors")[0]
    assert isinstance(loaded.parts[0].controlnet, UnionControlNet) and loaded.parts[0].host is None
    assert loaded.parts[0].controlnet.num_control_types == 6
    with pytest.raises(ValueError, match="which has 6 types"):
        apply(loaded, union_type="tile")
    t2i = ZeroConvLoadControlNet().load("t2iadapter_tiny.safetensors")[0]
    assert isinstance(t2i.parts[0].controlnet, T2IAdapter) and t2i.parts[0].host is None


def test_composed_types_through_the_host_equal_diffusers_multi_condition_forward(promax) -> None:
    """Two units of one Union file, composed, through the host control object = diffusers' ControlNetUnionModel
    with both conditions and their conditioning scales (the host's model sampling is the identity here)."""
    from types import SimpleNamespace

    from .test_diffusers_parity import TOLERANCE, _inputs, _sdxl_y
    from .test_union import _rel, _theirs_out

    theirs, loaded = promax
    x, t, context, hint, added = _inputs("sdxl")
    other = torch.rand(hint.shape, generator=torch.Generator().manual_seed(5))
    down, mid = _theirs_out(theirs, 8, [1, 6], [0.6, 1.3], [hint, other])
    control = make_control((ControlPart(loaded.model, name="diffusion_pytorch_model_promax.safetensors"),))
    stack = ZeroConvControlUnit().add(control, hint.movedim(1, -1), 0.6, 0.0, 1.0, union_type="depth")[0]
    stack = ZeroConvControlUnit().add(control, other.movedim(1, -1), 1.3, 0.0, 1.0, stack=stack,
                                      union_type="tile")[0]
    composed = ZeroConvComposeControlNets().compose(stack)[0].copy()
    sampling = SimpleNamespace(calculate_input=lambda sigma, latent: latent, timestep=lambda sigma: sigma)
    composed.pre_run(SimpleNamespace(model_sampling=sampling), lambda p: 1000.0 * (1.0 - p))
    count = Forwards(loaded.model)
    with torch.no_grad():
        out = composed.get_control(x, t.float(), {"c_crossattn": context, "y": _sdxl_y(added)}, 1,
                                   {"cond_or_uncond": [0]})
    composed.cleanup()
    count.handle.remove()
    assert len(count.calls) == 1
    mine = SimpleNamespace(all=(*out["output"], out["middle"][0]))
    assert _rel(mine, down, mid) < TOLERANCE


def test_an_adapter_of_another_family_is_refused_before_the_first_step(adapter) -> None:
    from types import SimpleNamespace

    from zeroconv.controlnet_model.config import preset

    from .test_adapter_standins import DiscreteEps

    sdxl = SimpleNamespace(model_sampling=DiscreteEps(), diffusion_model=SimpleNamespace(config=preset("sdxl")),
                           latent_format=SimpleNamespace(latent_channels=4))
    control = apply(ours(adapter, "t2iadapter_tiny.pth"))[0][0][1]["control"]
    with pytest.raises(ValueError, match="T2I-Adapter t2iadapter_tiny.pth does not fit the sampled model"):
        control.pre_run(sdxl, sdxl.model_sampling.percent_to_sigma)


def test_core_apply_keeps_a_union_type_and_a_composition_refuses_one_on_the_apply_node(tiny_unet, union) -> None:
    from .test_adapter_standins import core_apply

    positive = core_apply(*conditioning(), core_set_type(ours(union), 4), image(), 0.7)[0]
    by_core_apply = one_call(positive[0][1]["control"], tiny_unet)
    by_ours = one_call(apply(ours(union), strength=0.7, union_type="normal")[0][0][1]["control"], tiny_unet)
    torch.testing.assert_close(by_core_apply["middle"][0], by_ours["middle"][0])
    stack = ZeroConvControlUnit().add(ours(union), image(3), 0.6, 0.0, 1.0, union_type="depth")[0]
    with pytest.raises(ValueError, match="set union_type on each ZeroConv ControlNet Unit"):
        apply(ZeroConvComposeControlNets().compose(stack)[0], union_type="canny")
