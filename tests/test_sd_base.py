"""The locked SD base from single files: tiny random checkpoints in the real key layouts of SD1.x, SD2.x, SDXL."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zeroconv.controlnet_model.blocks import timestep_embedding
from zeroconv.controlnet_model.config import PredictionType, preset
from zeroconv.controlnet_model.unet import UNetModel
from zeroconv.training.base import load_base
from zeroconv.training.sd_base import infer_unet_config, load_sd_base
from zeroconv.training.text_encoders import (EOT_TOKEN, TEXT_ENCODERS, FrozenTextEncoder, build_text_encoder,
                                             hf_to_open_clip, tokenize)
from .tiny_base import TINY_VAE, open_clip_to_hf, write_tiny_sd_checkpoint

CONTEXT = {"SD1.x": 32, "SD2.x": 48, "SDXL": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-off costs more than it gains on a busy CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {f: write_tiny_sd_checkpoint(root / f"{f}.safetensors", f, seed=1,
                                        prediction_type="v_prediction" if f == "SD2.x" else "epsilon")
            for f in CONTEXT}


@pytest.mark.parametrize("family", list(CONTEXT))
def test_each_family_loads_with_its_text_context_and_schedule(family: str, tiny_files: dict[str, Path]) -> None:
    base = load_base(tiny_files[family])
    assert base.family == family and not any(p.requires_grad for p in base.parameters())
    text = base.encode_text(["a red circle", ""])
    assert text.context.shape == (2, 77, CONTEXT[family])
    assert (text.y is not None) == (family == "SDXL")
    expected = PredictionType.V_PREDICTION if family == "SD2.x" else PredictionType.EPSILON
    assert base.schedule.prediction_type is expected  # SD2.x: parameterization "v" in the .yaml beside the file
    latents = base.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert latents.shape == (1, 4, 4, 4) and base.decode_latents(latents).shape == (1, 3, 32, 32)
    file = load_file(str(tiny_files[family]))
    unet = base.unet.state_dict()
    assert all(torch.equal(unet[k[len("model.diffusion_model."):]], v) for k, v in file.items()
               if k.startswith("model.diffusion_model."))


def test_sdxl_adm_vector_is_pooled_text_then_fourier_sizes(tiny_files: dict[str, Path]) -> None:
    base = load_sd_base(tiny_files["SDXL"])
    sizes = torch.tensor([[64.0, 96.0, 8.0, 0.0, 64.0, 64.0]])
    text = base.encode_text(["x"], size_cond=sizes)
    pooled = base.text[1](["x"])[1]
    assert text.y.shape == (1, 40) and torch.equal(text.y[:, :16], pooled)
    assert torch.allclose(text.y[:, 16:], timestep_embedding(sizes.flatten(), 4).reshape(1, 24))


def test_hf_layout_maps_one_to_one_and_matches_open_clip(tiny_files: dict[str, Path]) -> None:
    spec = TEXT_ENCODERS["SD1.x"][0]
    hf = {k[len(spec.prefix):]: v for k, v in load_file(str(tiny_files["SD1.x"])).items() if k.startswith(spec.prefix)}
    mapped = hf_to_open_clip(hf)
    assert "transformer.resblocks.0.attn.in_proj_weight" in mapped and "embeddings.position_ids" in hf
    back = open_clip_to_hf(mapped)
    assert set(back) == set(hf) - {"embeddings.position_ids"} and all(torch.equal(back[k], hf[k]) for k in back)
    with pytest.raises(KeyError, match="no open_clip name"):
        hf_to_open_clip({**hf, "encoder.layers.0.extra.weight": torch.zeros(1)})
    # last layer + final norm + pooled through our walk equals open_clip's own TextTransformer forward
    ours = build_text_encoder(spec.__class__(**{**spec.__dict__, "pooled": True}), hf, heads=2)
    ours.tower.output_tokens = True
    reference_pooled, reference_tokens = ours.tower(tokenize(["a red circle"], 77, EOT_TOKEN))
    context, pooled = ours(["a red circle"])
    assert torch.allclose(context, reference_tokens, atol=1e-6) and torch.allclose(pooled, reference_pooled, atol=1e-6)


def test_padding_follows_each_tokenizer() -> None:
    hf, oc = tokenize(["a cat"], 77, EOT_TOKEN), tokenize(["a cat"], 77, 0)
    assert hf[0, :4].tolist() == oc[0, :4].tolist() and oc[0, 3] == EOT_TOKEN
    assert set(hf[0, 4:].tolist()) == {EOT_TOKEN} and set(oc[0, 4:].tolist()) == {0}
    assert tokenize(["word " * 200], 77, 0)[0, -1] == EOT_TOKEN  # truncated, still ends with the end token


def test_vae_matches_diffusers_autoencoder(tiny_files: dict[str, Path]) -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[TINY_VAE.ch] * 4,
                  layers_per_block=TINY_VAE.num_res_blocks, latent_channels=4, norm_num_groups=32)
    ref = diffusers.AutoencoderKL(**config).eval()
    file = load_file(str(tiny_files["SD1.x"]))
    ref.load_state_dict(convert_ldm_vae_checkpoint(file, config), strict=True)
    base = load_sd_base(tiny_files["SD1.x"])
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(pixels).latent_dist
        mean, logvar = base.encode_moments(pixels).chunk(2, dim=1)
        assert torch.allclose(mean, dist.mean, atol=1e-5) and torch.allclose(logvar, dist.logvar, atol=1e-5)
        assert torch.allclose(base.vae.decode(mean), ref.decode(mean).sample, atol=1e-5)


@pytest.mark.parametrize("name, family", [("sd15", "SD1.x"), ("sd21", "SD2.x"), ("sdxl", "SDXL")])
def test_full_size_unet_configs_are_read_from_shapes(name: str, family: str) -> None:
    with torch.device("meta"):
        unet = UNetModel(preset(name))
    inferred = infer_unet_config(unet.state_dict(), family)
    assert inferred.replace(family=preset(name).family) == preset(name)


def test_legacy_sd1_text_keys_and_non_sd_files(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    file = load_file(str(tiny_files["SD1.x"]))
    legacy = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
              for k, v in file.items()}
    from safetensors import safe_open

    with safe_open(str(tiny_files["SD1.x"]), "pt") as f:
        meta = f.metadata()
    save_file(legacy, str(tmp_path / "legacy.safetensors"), metadata=meta)
    assert load_sd_base(tmp_path / "legacy.safetensors").encode_text(["x"]).context.shape == (1, 77, 32)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(ValueError, match="not an SD1.x, SD2.x or SDXL single-file checkpoint"):
        load_base(tmp_path / "unet_only.safetensors")
    assert isinstance(load_sd_base(tiny_files["SD2.x"]).text[0], FrozenTextEncoder)
