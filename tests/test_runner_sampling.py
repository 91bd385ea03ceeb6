"""The offline runner's sampler (library DDIM + CFG) speaks ComfyUI's control protocol: batching, gating, cleanup."""
from __future__ import annotations

import pytest
import torch

from zeroconv.nodes.host.models import base_objects
from zeroconv.training.schedule import NoiseSchedule
from zeroconv.workflow_runner.offline import DiscreteSampling, sample

from .test_runner_support import ToyBase, ToyControl, apply_control, toy_controlnet


@pytest.fixture
def toy():
    base = ToyBase()
    _, clip, vae = base_objects(base)
    return base, clip, vae


def _conds(clip, text="a red square", negative=""):
    return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),
            clip.encode_from_tokens_scheduled(clip.tokenize(negative)))


def _latent(batch=1, size=8):
    return torch.zeros(batch, 4, size, size)


def _hint(size=64):
    image = torch.zeros(1, size, size, 3)
    image[:, 16:48, 16:48] = 1.0
    return image


def test_sigma_view_inverts_and_percent_edges() -> None:
    ms = DiscreteSampling(NoiseSchedule.scaled_linear())
    assert ms.percent_to_sigma(0.0) > 1e8 and ms.percent_to_sigma(1.0) == 0.0
    sigmas = torch.tensor([ms.sigma(t) for t in (0, 499, 999)])
    assert ms.timestep(sigmas).tolist() == [0, 499, 999]
    assert abs(ms.percent_to_sigma(0.5) - ms.sigma(499.5)) < 1e-6


def test_shared_control_batches_negative_then_positive_once_per_model_call(toy) -> None:
    base, clip, _ = toy
    positive, negative = apply_control(*_conds(clip), ToyControl(toy_controlnet(base)), _hint())
    head = positive[0][1]["control"]
    assert head is negative[0][1]["control"]
    sample(base, 1, 3, 7.0, positive, negative, _latent())
    assert len(head.calls) == 3  # one U-Net call per step with cond and uncond batched
    assert all(c["batch"] == 2 and c["batched_number"] == 2 and c["cond_or_uncond"] == [1, 0] for c in head.calls)
    assert "c_crossattn" in head.calls[0]["cond_keys"]
    assert head.pre_runs == 1 and head.cleanups == 1 and head.timestep_range is None


def test_separate_controls_run_separately_and_agree_with_batched(toy) -> None:
    base, clip, _ = toy
    positive, negative = _conds(clip)
    net = toy_controlnet(base)
    shared = apply_control(positive, negative, ToyControl(net), _hint())
    pos_only, _ = apply_control(positive, positive, ToyControl(net), _hint())
    _, neg_only = apply_control(negative, negative, ToyControl(net), _hint())
    a = sample(base, 5, 3, 7.0, *shared, _latent())
    b = sample(base, 5, 3, 7.0, pos_only, neg_only, _latent())
    assert len(pos_only[0][1]["control"].calls) == 3 and pos_only[0][1]["control"].calls[0]["batch"] == 1
    assert torch.allclose(a, b, atol=1e-5)


def test_control_changes_the_result_and_strength_zero_does_not(toy) -> None:
    base, clip, _ = toy
    positive, negative = _conds(clip)
    plain = sample(base, 2, 3, 5.0, positive, negative, _latent())
    net = toy_controlnet(base)
    with_zero = sample(base, 2, 3, 5.0, *apply_control(positive, negative, ToyControl(net), _hint(), strength=0.0),
                       _latent())
    with_full = sample(base, 2, 3, 5.0, *apply_control(positive, negative, ToyControl(net), _hint()), _latent())
    assert torch.allclose(plain, with_zero, atol=1e-6)
    assert (plain - with_full).abs().max() > 1e-3


def test_end_percent_half_gates_the_second_half_and_cfg_one_skips_uncond(toy) -> None:
    base, clip, _ = toy
    positive, negative = apply_control(*_conds(clip), ToyControl(toy_controlnet(base)), _hint(), end_percent=0.5)
    head = positive[0][1]["control"]
    sample(base, 0, 4, 1.0, positive, negative, _latent())
    assert len(head.calls) == 2  # 4 steps, end 0.5 -> steps 1-2 only
    assert all(c["cond_or_uncond"] == [0] and c["batch"] == 1 for c in head.calls)


def test_cleanup_runs_even_when_a_control_fails(toy) -> None:
    base, clip, _ = toy
    positive, negative = apply_control(*_conds(clip), ToyControl(toy_controlnet(base), fail=True), _hint())
    with pytest.raises(RuntimeError, match="on purpose"):
        sample(base, 0, 2, 7.0, positive, negative, _latent())
    assert positive[0][1]["control"].cleanups == 1


def test_chained_controls_both_contribute(toy) -> None:
    base, clip, _ = toy
    first = apply_control(*_conds(clip), ToyControl(toy_controlnet(base, seed=1)), _hint())
    second = apply_control(*first, ToyControl(toy_controlnet(base, seed=2)), _hint(), strength=0.5)
    head = second[0][0][1]["control"]
    assert head.previous_controlnet is first[0][0][1]["control"]
    sample(base, 0, 2, 7.0, *second, _latent())
    assert len(head.calls) == 2 and len(head.previous_controlnet.calls) == 2
    assert head.cleanups == 1 and head.previous_controlnet.cleanups == 1


def test_seeded_runs_repeat_and_the_vae_round_trips(toy) -> None:
    base, clip, vae = toy
    positive, negative = _conds(clip)
    runs = [sample(base, seed, 3, 7.0, positive, negative, _latent()) for seed in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    image = _hint()
    latent = vae.encode(image)
    assert latent.shape == (1, 4, 8, 8)
    decoded = vae.decode(latent)
    assert decoded.shape == (1, 64, 64, 3) and torch.allclose(decoded, image, atol=1e-6)
