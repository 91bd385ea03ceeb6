"""Checkpoints: LDM layouts (v1.0 full / pruned / Lightning, v1.1 + yaml), native files with metadata, detection,
dtype and device, atomic writes, and one clear error for every bad file."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from zeroconv.controlnet_model import ControlNet, preset
from zeroconv.controlnet_model import keymaps as km
from zeroconv.controlnet_model.checkpoint import (LOADABLE, UNSUPPORTED, CheckpointFormat, ControlNetMetadata,
                                                  content_hash, detect_format, infer_config, load_controlnet,
                                                  read_metadata, read_state_dict, save_controlnet)
from zeroconv.controlnet_model.metadata import control_type_from_name

from .conftest import make_inputs, randomize


def tiny_net(name: str = "tiny-sd2", seed: int = 2) -> ControlNet:
    return randomize(ControlNet(preset(name)), seed=seed).eval()


def assert_same_weights(model: ControlNet, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value.to(dtype or value.dtype)), key


def assert_same_function(a: ControlNet, b: ControlNet) -> None:
    inputs = make_inputs(a.config, batch=1, size=4)
    with torch.no_grad():
        out_a = a(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"], inputs["y"])
        out_b = b(inputs["x"], inputs["hint"], inputs["timesteps"], inputs["context"], inputs["y"])
    for x, y in zip(out_a.all, out_b.all):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture
def net() -> ControlNet:
    return tiny_net()


# ---- detection and architecture -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sdxl-mid", "sdxl-small", "tiny", "tiny-sd2", "tiny-sdxl"])
def test_config_inferred_from_shapes(name: str) -> None:
    with torch.device("meta"):
        model = ControlNet(preset(name))
    inferred, reference = infer_config(model.state_dict()), preset(name)
    assert inferred.signature() == reference.signature()
    assert (inferred.transformer_depth, inferred.transformer_depth_middle) == \
        (reference.transformer_depth, reference.transformer_depth_middle)
    assert inferred.use_linear_in_transformer == reference.use_linear_in_transformer
    if not name.startswith("tiny"):  # full-size families: the heads follow from the family (SD1.x 8 heads, SD2.x/SDXL 64-wide)
        assert inferred.heads_for(640) == reference.heads_for(640) and inferred.family == reference.family


def test_every_marker_row_detects_its_own_format() -> None:
    for name, markers in km.FORMAT_MARKERS:
        assert detect_format(markers) is CheckpointFormat(name)
    assert LOADABLE | set(UNSUPPORTED) == set(CheckpointFormat) and not LOADABLE & set(UNSUPPORTED)


def test_detection_of_real_key_sets(net: ControlNet) -> None:
    state = net.state_dict()
    prefixed = {f"control_model.{k}": v for k, v in state.items()}
    assert detect_format(state) is CheckpointFormat.LDM
    assert detect_format(prefixed) is CheckpointFormat.LDM_PREFIXED
    assert detect_format({**prefixed, "model.diffusion_model.out.2.weight": 0}) is CheckpointFormat.LDM_FULL
    assert detect_format({**prefixed, "difference": 0}) is CheckpointFormat.DIFF
    assert detect_format({**state, "lora_controlnet": 0}) is CheckpointFormat.CONTROL_LORA
    with pytest.raises(ValueError, match="marker keys") as info:
        detect_format(["foo.weight"])
    assert "zero_convs.0.0.weight" in str(info.value)


# ---- LDM layouts ------------------------------------------------------------------------------------------
def _write_layout(layout: str, state: dict[str, torch.Tensor], folder) -> tuple:
    """A tiny checkpoint in one real LDM layout; returns (path, tensors as they are stored)."""
    prefixed = {f"control_model.{k}": v for k, v in state.items()}
    whole_model = {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
                   "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                   "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
                   "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(8),
                   "betas": torch.zeros(10), "alphas_cumprod": torch.zeros(10), "logvar": torch.zeros(10)}
    half = {k: v.half() for k, v in state.items()}
    files = {
        "v10_full_pth": ("control_sd21_canny.pth", {**prefixed, **whole_model}, state),
        "lightning_ckpt": ("epoch=1-step=10.ckpt", {"state_dict": {**prefixed, **whole_model}, "epoch": 1}, state),
        "pruned_prefixed_fp16": ("control_canny-fp16.safetensors", {f"control_model.{k}": v for k, v in half.items()},
                                 half),
        "pruned_bare_fp16": ("control_v11p_sd21_canny_fp16.safetensors", half, half),
        "v11_bare_pth": ("control_v11p_sd21_canny.pth", dict(state), state),
        "bf16": ("cn_bf16.safetensors", {k: v.bfloat16() for k, v in state.items()},
                 {k: v.bfloat16() for k, v in state.items()}),
        "compiled_wrapper": ("compiled.pth", {f"_orig_mod.{k}": v for k, v in state.items()}, state),
    }
    name, content, stored = files[layout]
    path = folder / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in content.items()}, path)
    else:
        torch.save(content, path)
    return path, stored


@pytest.mark.parametrize("layout", ["v10_full_pth", "lightning_ckpt", "pruned_prefixed_fp16", "pruned_bare_fp16",
                                    "v11_bare_pth", "bf16", "compiled_wrapper"])
def test_ldm_layouts_load_to_the_same_weights(net: ControlNet, tmp_path, layout: str) -> None:
    path, stored = _write_layout(layout, dict(net.state_dict()), tmp_path)
    loaded = load_controlnet(path)
    assert_same_weights(loaded.model, stored)  # default dtype: the file's
    assert loaded.model.dtype == next(iter(stored.values())).dtype
    assert loaded.config.signature() == net.config.signature()
    as_fp32 = load_controlnet(path, dtype=torch.float32)
    assert_same_weights(as_fp32.model, stored, torch.float32)
    resaved = save_controlnet(as_fp32.model, tmp_path / "native.safetensors")  # write-then-read is exact
    assert_same_weights(load_controlnet(resaved).model, {k: v.float() for k, v in stored.items()})


def test_v10_full_file_with_an_unknown_extra_key_is_refused(net: ControlNet, tmp_path) -> None:
    path, _ = _write_layout("v10_full_pth", dict(net.state_dict()), tmp_path)
    content = torch.load(path, weights_only=True)
    content["surprise.weight"] = torch.zeros(1)
    torch.save(content, path)
    with pytest.raises(KeyError, match="surprise.weight") as info:
        load_controlnet(path)
    assert path.name in str(info.value)


def test_legacy_pickle_format_loads(net: ControlNet, tmp_path) -> None:
    path = tmp_path / "control_sd21_old.pth"
    torch.save(dict(net.state_dict()), path, _use_new_zipfile_serialization=False)
    assert_same_weights(load_controlnet(path).model, dict(net.state_dict()))


def test_yaml_sidecar_gives_heads_and_pooling(tmp_path) -> None:
    """v1.1 files keep what the weights cannot say (heads, shuffle pooling) in the cldm .yaml beside them."""
    source = tiny_net("tiny-sd2")
    torch.save(dict(source.state_dict()), tmp_path / "control_v11e_sd21_shuffle_v2.pth")
    (tmp_path / "control_v11e_sd21_shuffle_v2.yaml").write_text(
        "model:\n  target: cldm.cldm.ControlLDM\n  params:\n    control_stage_config:\n"
        "      target: cldm.cldm.ControlNet\n      params:\n        num_head_channels: 16\n"
        "        global_average_pooling: True\n        use_linear_in_transformer: True\n")
    loaded = load_controlnet(tmp_path / "control_v11e_sd21_shuffle_v2.pth")
    assert loaded.config.num_head_channels == 16 and loaded.config.global_average_pooling
    assert loaded.metadata.control_type == "shuffle" and loaded.metadata.global_average_pooling
    assert_same_function(loaded.model, source)
    (tmp_path / "control_v11e_sd21_shuffle_v2.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(ValueError, match="control_stage_config") as info:
        load_controlnet(tmp_path / "control_v11e_sd21_shuffle_v2.pth")
    assert "control_v11e_sd21_shuffle_v2.yaml" in str(info.value)


def test_shuffle_is_read_from_the_name(net: ControlNet, tmp_path) -> None:
    torch.save(dict(net.state_dict()), tmp_path / "control_v11e_sd21_shuffle_fp16.pth")
    assert load_controlnet(tmp_path / "control_v11e_sd21_shuffle_fp16.pth").config.global_average_pooling
    torch.save(dict(net.state_dict()), tmp_path / "control_v11p_sd21_canny.pth")
    assert not load_controlnet(tmp_path / "control_v11p_sd21_canny.pth").config.global_average_pooling


# ---- native files -----------------------------------------------------------------------------------------
def test_native_round_trip_with_metadata(net: ControlNet, tmp_path) -> None:
    meta = ControlNetMetadata(control_type="canny", annotator="canny", resolution=512, provenance="test",
                              extra={"dataset": "fill50k"})
    path = save_controlnet(net, tmp_path / "canny.safetensors", meta)
    loaded = load_controlnet(path)
    assert loaded.format is CheckpointFormat.LDM and loaded.config == net.config
    assert loaded.config.num_head_channels == 16  # from the stored config, not the family heuristic
    assert_same_weights(loaded.model, dict(net.state_dict()))
    stored = read_metadata(path)
    assert (stored.control_type, stored.annotator, stored.resolution, stored.provenance, stored.family,
            stored.saved_as, stored.extra) == ("canny", "canny", 512, "test", "tiny SD2.x-shaped", "canny.safetensors",
                                               {"dataset": "fill50k"})
    assert stored.config == net.config.to_json() and loaded.metadata.control_type == "canny"
    assert stored.content_hash == content_hash(net) == content_hash(path) == content_hash(loaded.model)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    again = save_controlnet(loaded.model, tmp_path / "canny.safetensors", stored)
    assert read_metadata(again) == stored and again.read_bytes() == path.read_bytes()


def test_native_file_keeps_shuffle_pooling(tmp_path) -> None:
    model = ControlNet(preset("tiny", global_average_pooling=True))
    path = save_controlnet(model, tmp_path / "my_pooled_model.safetensors")
    assert read_metadata(path).global_average_pooling
    assert load_controlnet(path).config.global_average_pooling


def test_native_file_is_plain_ldm_for_other_tools(net: ControlNet, tmp_path) -> None:
    """What ComfyUI core and A1111 read: bare LDM keys, marker keys present, string metadata only."""
    path = save_controlnet(net, tmp_path / "cn.safetensors", dtype=torch.float16)
    state, strings = read_state_dict(path)
    assert set(state) == set(net.state_dict()) and all(v.dtype == torch.float16 for v in state.values())
    assert {"zero_convs.0.0.weight", "input_hint_block.0.weight"} <= set(state)
    assert all(isinstance(v, str) for v in strings.values()) and strings["zeroconv_format"] == "ldm"


def test_save_a_state_dict(net: ControlNet, tmp_path) -> None:
    state = dict(net.state_dict())
    path = save_controlnet(state, tmp_path / "from_state.safetensors", config=net.config)
    assert load_controlnet(path).config == net.config
    inferred = save_controlnet(state, tmp_path / "inferred.safetensors")  # third-party state: shapes decide
    assert load_controlnet(inferred).config.signature() == net.config.signature()
    del state["zero_convs.0.0.bias"]
    with pytest.raises(KeyError, match="zero_convs.0.0.bias"):
        save_controlnet(state, tmp_path / "broken.safetensors", config=net.config)
    assert not (tmp_path / "broken.safetensors").exists()


def test_dtype_and_device_asked_for(net: ControlNet, tmp_path) -> None:
    path = save_controlnet(net, tmp_path / "a.safetensors", dtype=torch.float16)
    assert load_controlnet(path).model.dtype == torch.float16
    for dtype in (torch.bfloat16, torch.float32):
        loaded = load_controlnet(path, dtype=dtype, device="cpu")
        assert {p.dtype for p in loaded.model.parameters()} == {dtype}
        assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_checks_come_before_any_tensor_is_read(net: ControlNet, tmp_path, monkeypatch) -> None:
    """A file that does not fit is refused before a byte of tensor data is read: nothing loads half-way."""
    from zeroconv.controlnet_model import safetensors_io

    state = dict(net.state_dict())
    state["zero_convs.1.0.weight"] = torch.zeros(7, 7, 1, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bad_shape.safetensors")
    reads = []
    original = safetensors_io.WeightFile.load
    monkeypatch.setattr(safetensors_io.WeightFile, "load", lambda self, key: reads.append(key) or original(self, key))
    with pytest.raises(ValueError, match="zero_convs.1.0.weight"):
        load_controlnet(tmp_path / "bad_shape.safetensors")
    assert reads == []


def test_metadata_strings_round_trip() -> None:
    meta = ControlNetMetadata(family="SDXL", control_type="depth", annotator="depth_midas", resolution=1024,
                              config="{}", provenance="p", content_hash="ab" * 32, global_average_pooling=True,
                              saved_as="x.safetensors", extra={"k": "v"})
    strings = meta.to_strings()
    assert all(isinstance(v, str) for v in strings.values())
    assert ControlNetMetadata.from_strings({**strings, "format": "pt"}) == meta
    with pytest.raises(ValueError, match="zeroconv_resolution"):
        ControlNetMetadata.from_strings({"zeroconv_resolution": "big"})


@pytest.mark.parametrize("name, control_type", [
    ("control_v11p_sd15_canny.pth", "canny"), ("control_v11p_sd15s2_lineart_anime", "lineart_anime"),
    ("control_v11p_sd15_lineart.pth", "lineart"), ("diffusers_xl_depth_full.safetensors", "depth"),
    ("control-lora-canny-rank256.safetensors", "canny"), ("control_v11f1e_sd15_tile", "tile"),
    ("control_v11p_sd15_normalbae", "normal"), ("my_model.safetensors", "")])
def test_control_type_from_name(name: str, control_type: str) -> None:
    assert control_type_from_name(name) == control_type


# ---- bad files --------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _bad_files(net: ControlNet, folder) -> dict[str, tuple[type, str]]:
    """Each bad file, and the error type and words its one error must carry."""
    good = save_controlnet(net, folder / "good.safetensors")
    data = good.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "header.safetensors").write_bytes(b"\xff" * 64)
    (folder / "empty.safetensors").write_bytes(b"")
    torch.save(dict(net.state_dict()), folder / "full.pth")
    (folder / "truncated.pth").write_bytes((folder / "full.pth").read_bytes()[:1000])
    (folder / "garbage.ckpt").write_bytes(b"not a checkpoint at all" * 10)
    (folder / "folder").mkdir()
    save_file({"foo.weight": torch.zeros(2)}, folder / "unknown.safetensors")
    torch.save(torch.zeros(3), folder / "tensor.pth")
    torch.save({"x": _Evil()}, folder / "evil_zip.pth")
    with open(folder / "evil_raw.pth", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    prefixed = {f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    save_file({**prefixed, "difference": torch.tensor(1.0)}, folder / "diff_control_sd15.safetensors")
    save_file({**{k: v.contiguous() for k, v in net.state_dict().items()}, "lora_controlnet": torch.tensor([])},
              folder / "control-lora-canny-rank2.safetensors")
    return {
        "truncated.safetensors": (ValueError, "truncated"), "header.safetensors": (ValueError, "corrupt"),
        "empty.safetensors": (ValueError, "empty"), "truncated.pth": (ValueError, "truncated"),
        "garbage.ckpt": (ValueError, "corrupt"), "folder": (FileNotFoundError, "without diffusers weights"),
        "unknown.safetensors": (ValueError, "not a ControlNet layout we know"),
        "tensor.pth": (ValueError, "not a dict of tensors"), "evil_zip.pth": (ValueError, "refused"),
        "evil_raw.pth": (ValueError, "refused"), "missing.safetensors": (FileNotFoundError, "models/controlnet"),
        "diff_control_sd15.safetensors": (ValueError, "give that base model"),
        "control-lora-canny-rank2.safetensors": (ValueError, "give that base model"),
    }


def test_bad_files_give_one_clear_error(net: ControlNet, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, (kind, words) in _bad_files(net, tmp_path).items():
        with pytest.raises(kind) as info:
            load_controlnet(tmp_path / name)
        message = str(info.value)
        assert type(info.value) is kind and name in message and words in message, (name, message)
    assert not (tmp_path / "pwned").exists()  # the pickles' code never ran


@pytest.mark.parametrize("markers", [m for name, m in km.FORMAT_MARKERS if CheckpointFormat(name) in UNSUPPORTED])
def test_unsupported_kinds_are_named(tmp_path, markers) -> None:
    save_file({k: torch.zeros(1) for k in markers}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not supported yet") as info:
        load_controlnet(tmp_path / "other.safetensors")
    kind = detect_format(markers)
    assert "other.safetensors" in str(info.value) and f"({kind.value})" in str(info.value)
    assert UNSUPPORTED[kind][1] in str(info.value)


def test_failed_write_keeps_the_good_file(net: ControlNet, tmp_path, monkeypatch) -> None:
    path = save_controlnet(net, tmp_path / "keep.safetensors")
    before = path.read_bytes()
    from zeroconv.controlnet_model import safetensors_io

    def broken(filename, state, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_controlnet(tiny_net(seed=5), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]
