"""The runner's sampler follows ComfyUI: sigmas, schedules, noise, samplers, CFG batching and the control protocol."""
from __future__ import annotations

import pytest
import torch

from zeroconv.workflow_runner.host import ModelSamplingDiscrete, host_objects
from zeroconv.workflow_runner.sampling import (SAMPLERS, SCHEDULERS, calculate_sigmas, common_ksampler, prepare_noise,
                                               trim_sigmas)
from zeroconv.training.schedule import NoiseSchedule

from .test_runner_support import ToyBase, ToyControl, apply_control, toy_controlnet


@pytest.fixture(scope="module")
def ms() -> ModelSamplingDiscrete:
    return ModelSamplingDiscrete(NoiseSchedule.scaled_linear().alphas_cumprod)


@pytest.fixture
def toy():
    base = ToyBase()
    model, clip, vae = host_objects(base)
    return base, model, clip, vae


def _conds(clip, text="a red square", negative=""):
    return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),
            clip.encode_from_tokens_scheduled(clip.tokenize(negative)))


def _latent(batch=1, size=8):
    return {"samples": torch.zeros(batch, 4, size, size)}


def _hint(size=64):
    image = torch.zeros(1, size, size, 3)
    image[:, 16:48, 16:48] = 1.0
    return image


def test_sd_sigma_table_and_percent_edges(ms) -> None:
    assert float(ms.sigma_max) == pytest.approx(14.614641, abs=1e-5)  # ComfyUI's SD1.x values
    assert float(ms.sigma_min) == pytest.approx(0.0291672, abs=1e-6)
    assert ms.percent_to_sigma(0.0) == 999999999.9 and ms.percent_to_sigma(-1) == 999999999.9
    assert ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(float(ms.sigma(torch.tensor(499.5))))
    t = torch.tensor([0, 250, 999])
    assert torch.equal(ms.timestep(ms.sigma(t)), t)
    x = torch.ones(2, 4, 2, 2)
    sigma = torch.tensor([1.0, 3.0])
    assert torch.allclose(ms.calculate_input(sigma, x)[1], x[1] / (10.0**0.5))


def test_schedules_match_comfyui(ms) -> None:
    expected = {"normal": [14.6146, 10.7468, 8.0815, 6.2049, 4.8557, 3.8654],
                "karras": [14.6146, 11.7254, 9.3402, 7.3836, 5.7894, 4.4998]}
    for name, head in expected.items():
        sigmas = SCHEDULERS[name](ms, 20)
        assert len(sigmas) == 21 and sigmas[-1] == 0
        assert sigmas[:6].tolist() == pytest.approx(head, abs=1e-3)
    simple = SCHEDULERS["simple"](ms, 4)
    assert simple[0] == pytest.approx(float(ms.sigma_max)) and len(simple) == 5
    short = calculate_sigmas(ms, "normal", 4, denoise=0.5)
    assert torch.equal(short, calculate_sigmas(ms, "normal", 8)[-5:])
    assert calculate_sigmas(ms, "normal", 4, denoise=0.0).numel() == 0
    window = trim_sigmas(calculate_sigmas(ms, "normal", 10), 2, 6, force_full_denoise=True)
    assert len(window) == 5 and window[-1] == 0
    assert trim_sigmas(calculate_sigmas(ms, "normal", 4), 4, None, False) is None


def test_noise_is_torch_manual_seed_on_cpu() -> None:
    latent = torch.zeros(2, 4, 3, 3)
    expected = torch.randn(latent.size(), generator=torch.manual_seed(42))
    assert torch.equal(prepare_noise(latent, 42), expected)
    generator = torch.manual_seed(42)
    singles = [torch.randn((1, 4, 3, 3), generator=generator) for _ in range(2)]
    rows = prepare_noise(latent, 42, batch_index=[1, 1])  # rows drawn one by one up to the largest index
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[:1], singles[1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_reach_x0_of_a_perfect_denoiser(ms, name) -> None:
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = calculate_sigmas(ms, "karras", 6)
    x = x0 + torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    out = SAMPLERS[name](lambda x, sigma: x0.expand_as(x), x, sigmas, seed=3)
    assert torch.allclose(out, x0, atol=1e-4)


def test_shared_control_batches_negative_then_positive_once_per_model_call(toy) -> None:
    base, model, clip, _ = toy
    positive, negative = _conds(clip)
    control = ToyControl(toy_controlnet(base))
    positive, negative = apply_control(positive, negative, control, _hint())
    head = positive[0][1]["control"]
    assert head is negative[0][1]["control"]
    common_ksampler(model, 1, 3, 7.0, "euler", "normal", positive, negative, _latent())
    assert len(head.calls) == 3  # one U-Net call per step with cond and uncond batched
    assert all(c["batch"] == 2 and c["batched_number"] == 2 and c["cond_or_uncond"] == [1, 0] for c in head.calls)
    assert set(head.calls[0]["options"]) >= {"cond_or_uncond", "uuids", "sigmas", "sample_sigmas"}
    assert "c_crossattn" in head.calls[0]["cond_keys"] and "transformer_options" in head.calls[0]["cond_keys"]
    assert head.pre_runs == 2 and head.cleanups == 1 and head.timestep_range is None


def test_separate_controls_run_separately_and_agree_with_batched(toy) -> None:
    base, model, clip, _ = toy
    positive, negative = _conds(clip)
    net = toy_controlnet(base)
    shared = apply_control(positive, negative, ToyControl(net), _hint())
    pos_only, _ = apply_control(positive, positive, ToyControl(net), _hint())
    _, neg_only = apply_control(negative, negative, ToyControl(net), _hint())
    a = common_ksampler(model, 5, 3, 7.0, "euler", "normal", *shared, _latent())[0]["samples"]
    b = common_ksampler(model, 5, 3, 7.0, "euler", "normal", pos_only, neg_only, _latent())[0]["samples"]
    assert len(pos_only[0][1]["control"].calls) == 3 and pos_only[0][1]["control"].calls[0]["batch"] == 1
    assert torch.allclose(a, b, atol=1e-5)


def test_control_changes_the_result_and_strength_zero_does_not(toy) -> None:
    base, model, clip, _ = toy
    positive, negative = _conds(clip)
    plain = common_ksampler(model, 2, 3, 5.0, "dpmpp_2m", "karras", positive, negative, _latent())[0]["samples"]
    net = toy_controlnet(base)
    zero = apply_control(positive, negative, ToyControl(net), _hint(), strength=0.0)
    full = apply_control(positive, negative, ToyControl(net), _hint(), strength=1.0)
    with_zero = common_ksampler(model, 2, 3, 5.0, "dpmpp_2m", "karras", *zero, _latent())[0]["samples"]
    with_full = common_ksampler(model, 2, 3, 5.0, "dpmpp_2m", "karras", *full, _latent())[0]["samples"]
    assert torch.allclose(plain, with_zero, atol=1e-6)
    assert (plain - with_full).abs().max() > 1e-3


def test_end_percent_half_gates_the_second_half_and_cfg_one_skips_uncond(toy) -> None:
    base, model, clip, _ = toy
    positive, negative = apply_control(*_conds(clip), ToyControl(toy_controlnet(base)), _hint(), end_percent=0.5)
    head = positive[0][1]["control"]
    common_ksampler(model, 0, 4, 1.0, "euler", "normal", positive, negative, _latent())
    assert len(head.calls) == 2  # reference §5.3: 4 steps, normal, end 0.5 -> steps 1-2 only
    assert all(c["cond_or_uncond"] == [0] and c["batch"] == 1 for c in head.calls)


def test_cleanup_runs_even_when_a_control_fails(toy) -> None:
    base, model, clip, _ = toy
    positive, negative = apply_control(*_conds(clip), ToyControl(toy_controlnet(base), fail=True), _hint())
    with pytest.raises(RuntimeError, match="on purpose"):
        common_ksampler(model, 0, 2, 7.0, "euler", "normal", positive, negative, _latent())
    assert positive[0][1]["control"].cleanups == 1


def test_chained_controls_both_contribute(toy) -> None:
    base, model, clip, _ = toy
    positive, negative = _conds(clip)
    first = apply_control(positive, negative, ToyControl(toy_controlnet(base, seed=1)), _hint())
    second = apply_control(*first, ToyControl(toy_controlnet(base, seed=2)), _hint(), strength=0.5)
    head = second[0][0][1]["control"]
    assert head.previous_controlnet is first[0][0][1]["control"]
    common_ksampler(model, 0, 2, 7.0, "euler_ancestral", "simple", *second, _latent())
    assert len(head.calls) == 2 and len(head.previous_controlnet.calls) == 2
    assert head.cleanups == 1 and head.previous_controlnet.cleanups == 1


def test_seeded_runs_repeat_and_img2img_keeps_structure(toy) -> None:
    base, model, clip, vae = toy
    positive, negative = _conds(clip)
    runs = [common_ksampler(model, seed, 3, 7.0, "euler_ancestral", "normal", positive, negative, _latent())[0]
            for seed in (11, 11, 12)]
    assert torch.equal(runs[0]["samples"], runs[1]["samples"])
    assert not torch.equal(runs[0]["samples"], runs[2]["samples"])
    image = _hint()
    latent = {"samples": vae.encode(image)}
    assert latent["samples"].shape == (1, 4, 8, 8)
    kept = common_ksampler(model, 0, 4, 7.0, "euler", "normal", positive, negative, latent, denoise=0.0)[0]
    assert torch.equal(kept["samples"], latent["samples"])
    decoded = vae.decode(latent["samples"])
    assert decoded.shape == (1, 64, 64, 3) and torch.allclose(decoded, image, atol=1e-6)
