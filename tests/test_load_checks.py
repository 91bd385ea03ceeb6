"""Loading refuses weights that would sample black images, and damaged or non-weight files, with one clear error."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zeroconv.controlnet_model import ControlNet, preset
from zeroconv.controlnet_model.checkpoint import load_controlnet, save_controlnet

from .conftest import randomize


@pytest.fixture
def saved(tmp_path) -> tuple:
    net = randomize(ControlNet(preset("tiny")), seed=3).eval()
    return net, save_controlnet(net, tmp_path / "good.safetensors")


def _rewrite(src, dst, change, dtype=None) -> str:
    """A copy of a saved file with one tensor changed (metadata kept); returns that tensor's key."""
    with safe_open(str(src), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = sorted(k for k in state if k.endswith("weight") and state[k].numel() > 4)[3]
    state = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in state.items()}
    state[key] = change(state[key].clone())
    save_file(state, str(dst), metadata=meta)
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_weights_are_refused_naming_file_and_tensor(saved, tmp_path, value, dtype) -> None:
    _, good = saved
    bad = tmp_path / "diverged.safetensors"
    key = _rewrite(good, bad, lambda t: t.view(-1).index_fill_(0, torch.tensor([1]), value).view(t.shape), dtype)
    with pytest.raises(ValueError) as info:
        load_controlnet(bad, dtype=torch.float32)
    message = str(info.value)
    assert str(bad) in message and key in message and "NaN or infinite" in message and "1 of" in message


def test_an_overflow_of_the_cast_is_refused_too(saved, tmp_path) -> None:
    _, good = saved
    bad = tmp_path / "huge.safetensors"
    key = _rewrite(good, bad, lambda t: t.fill_(1e6))  # finite in fp32, inf in fp16
    load_controlnet(bad, dtype=torch.float32)
    with pytest.raises(ValueError, match=key):
        load_controlnet(bad, dtype=torch.float16)


def test_large_finite_fp16_weights_whose_sum_overflows_load(saved, tmp_path) -> None:
    _, good = saved
    big = tmp_path / "big.safetensors"
    key = _rewrite(good, big, lambda t: t.fill_(60000.0), torch.float16)  # sum > fp16 max, every value finite
    loaded = load_controlnet(big)
    assert loaded.model.state_dict()[key].dtype == torch.float16
    assert float(loaded.model.state_dict()[key].float().max()) == 60000.0


def test_loaded_weights_are_unchanged(saved) -> None:
    net, good = saved
    loaded = load_controlnet(good).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("name", ["model.safetensors", "model.pth", "model.ckpt", "model.bin"])
@pytest.mark.parametrize("text,words", [
    ("<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not a weight file but text"),
    ("a", "not a weight file but text"),
    ("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 722597120\n", "Git LFS pointer"),
])
def test_a_text_file_under_a_weight_name_says_so(tmp_path, name, text, words) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_controlnet(path)
    message = str(info.value)
    assert str(path) in message and words in message and "download" in message
    assert "pop from empty list" not in message and "run code" not in message


@pytest.mark.parametrize("keep", [8, 100, 0.5, -1])
def test_a_truncated_safetensors_file_is_damaged(saved, tmp_path, keep) -> None:
    _, good = saved
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError) as info:
        load_controlnet(cut)
    assert str(cut) in str(info.value) and "damaged" in str(info.value) and "again" in str(info.value)


def test_a_file_is_checked_once_per_dtype_then_remembered(saved, monkeypatch) -> None:
    from zeroconv.controlnet_model import safetensors_io

    _, good = saved
    calls = []
    real = safetensors_io.refuse_non_finite
    monkeypatch.setattr(safetensors_io, "refuse_non_finite", lambda *a: calls.append(a[1]) or real(*a))
    load_controlnet(good)
    load_controlnet(good)
    assert calls == [good]
    safetensors_io._FINITE.clear()  # a new process: the record on disk still holds
    load_controlnet(good)
    load_controlnet(good, dtype=torch.float16)  # another dtype is checked again (a cast can overflow)
    assert calls == [good, good]
    good.write_bytes(good.read_bytes())  # rewritten: a new mtime, checked again
    load_controlnet(good)
    assert len(calls) == 3
