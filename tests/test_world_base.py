"""The world base: vocabulary and tokenizer, the patch autoencoder, file round trip, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroconv.controlnet_model import init_from_unet, preset
from zeroconv.training.base import detect_base_kind, load_base
from zeroconv.demo.world import random_specs
from zeroconv.demo.world_base import (WorldBase, WorldTokenizer, build_world_base, load_world_base,
                                          save_world_base, world_vocabulary)

SMALL = preset("world", in_channels=24, out_channels=24, model_channels=32, channel_mult=(1,), transformer_depth=(1,), context_dim=32, num_heads=2,
               hint_block_channels=(16, 16, 32, 32))


def test_vocabulary_covers_every_caption_and_unknown_words_become_unk(caplog) -> None:
    vocab = world_vocabulary()
    tok = WorldTokenizer(vocab, max_tokens=8)
    for spec in random_specs(100, seed=0):
        ids = tok([spec.caption])[0]
        assert vocab.index("<unk>") not in ids.tolist()
        assert [vocab[i] for i in ids.tolist() if vocab[i] not in ("<bos>", "<eos>", "<pad>")] == spec.caption.split()
    empty, odd = tok(["", "A purple Unicorn!"])
    assert [vocab[i] for i in empty.tolist()[:3]] == ["<bos>", "<eos>", "<pad>"]
    assert [vocab[i] for i in odd.tolist()[:5]] == ["<bos>", "<unk>", "purple", "<unk>", "<eos>"]
    assert "unicorn" in caplog.text


def test_patch_autoencoder_keeps_the_shapes_with_8x_smaller_latents() -> None:
    from zeroconv.training.fidelity import iou
    from zeroconv.demo.world import render_target, segment_shape, shape_mask

    base = build_world_base(seed=0)  # the real size: 48 components fitted on 512 pictures from seed 0
    specs = random_specs(32, seed=11)  # held out
    pictures = np.stack([render_target(s, 64) for s in specs])
    pixels = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = base.encode_images(pixels)
    assert latents.shape == (32, 48, 8, 8)
    assert 0.8 < float(latents.std()) < 1.25  # the latent scale makes them about unit variance
    per_component = latents.std(dim=(0, 2, 3))  # whitened: every component, not just the whole, about unit variance
    assert float(per_component.min()) > 0.5 and float(per_component.max()) < 1.6
    scale = base.autoencoder.scale
    assert float(scale[0] / scale[-1]) > 20, "the first component varies far more than the last: hence whitening"
    basis = base.autoencoder.basis
    assert torch.allclose(basis @ basis.T, torch.eye(48), atol=1e-5)  # orthonormal: decoding is the transpose
    decoded = ((base.decode_latents(latents) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    ious = [iou(segment_shape(d, s), shape_mask(s, 64)) for d, s in zip(decoded, specs)]
    assert np.mean(ious) > 0.97 and min(ious) > 0.9
    assert float((base.decode_latents(latents) - pixels).abs().mean()) < 0.03
    with pytest.raises(ValueError, match="multiples of 8"):
        base.encode_images(torch.zeros(1, 3, 60, 64))


def test_file_round_trip_is_detected_as_world_and_gives_the_same_outputs(tmp_path) -> None:
    base = build_world_base(SMALL, seed=3).lock()
    path = save_world_base(base, tmp_path / "world.safetensors", {"seed": 3}, dtype=torch.float32)
    assert detect_base_kind(path) == "world"
    loaded = load_base(path)
    assert isinstance(loaded, WorldBase) and loaded.family == "ZeroConv world"
    assert not any(p.requires_grad for m in loaded.modules().values() for p in m.parameters())
    captions = ["red circle with blue background", ""]
    with torch.no_grad():
        ctx_a, ctx_b = base.encode_text(captions).context, loaded.encode_text(captions).context
        x, t = torch.randn(2, 24, 8, 8), torch.tensor([10, 900])
        assert torch.equal(ctx_a, ctx_b)
        assert torch.equal(base.unet(x, t, ctx_a), loaded.unet(x, t, ctx_b))
    assert torch.equal(loaded.schedule.alphas_cumprod, base.schedule.alphas_cumprod)
    controlnet, fresh = init_from_unet(loaded.unet)  # a ControlNet can be made for it
    assert fresh and controlnet.config.in_channels == 24
    assert torch.equal(loaded.autoencoder.basis, base.autoencoder.basis)
    assert torch.equal(loaded.autoencoder.scale, base.autoencoder.scale)


def test_a_base_from_before_whitening_loads_unwhitened(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_world_base(build_world_base(SMALL, seed=3), tmp_path / "world.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = {k: v for k, v in load_file(str(path)).items() if k != "autoencoder.scale"}
    save_file(state, str(path), metadata)
    loaded = load_world_base(path)
    assert torch.equal(loaded.autoencoder.scale, torch.ones(24)), "no stored scale: coefficients as they are"


def test_loader_refuses_other_files_with_the_fix(tmp_path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="train_world_base"):
        load_world_base(other)
    with pytest.raises(FileNotFoundError):
        load_world_base(tmp_path / "missing.safetensors")


def test_training_script_runs_and_writes_a_loadable_base(tmp_path, monkeypatch) -> None:
    from zeroconv.demo import train_world_base as script

    monkeypatch.setattr(script, "build_world_base", lambda **kw: build_world_base(SMALL, **kw))
    out = tmp_path / "base.safetensors"
    assert script.main(["--out", str(out), "--steps", "3", "--pool", "8", "--batch-size", "4", "--warmup", "1",
                        "--log-every", "1"]) == 0
    loaded = load_world_base(out)
    assert loaded.metadata["zeroconv_provenance"].count("train_world_base") == 1
    assert 0.2 < loaded.latent_scale_factor < 3.0  # 1 / std of the latents of the (here 8) pictures
    again = tmp_path / "continued.safetensors"
    assert script.main(["--out", str(again), "--init", str(out), "--steps", "2", "--pool", "8", "--batch-size", "4",
                        "--warmup", "1", "--log-every", "1"]) == 0
    continued = load_world_base(again)
    assert torch.equal(continued.autoencoder.basis, loaded.autoencoder.basis), "the autoencoder is kept, not refitted"
    assert continued.latent_scale_factor == loaded.latent_scale_factor
    assert f"--init {out}" in continued.metadata["zeroconv_provenance"]
    weights = [(a, b) for a, b in zip(continued.unet.parameters(), loaded.unet.parameters())]
    assert any(not torch.equal(a, b) for a, b in weights), "training went on from the file's weights"
