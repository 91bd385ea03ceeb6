"""Union ControlNet (xinsir ControlNet++): diffusers parity, core's single-type and auto paths, type table, save.

A random diffusers ControlNetUnionModel (tiny SDXL shape, the released files' hint widths 16/32/96/256 rather than
diffusers' class default) is saved as users download it (a lone diffusers-keyed file, or a folder with
config.json), loaded by ZeroConv, and run on the same inputs.
"""
from __future__ import annotations

import torch
import pytest
from safetensors.torch import load_file

from zeroconv.controlnet_model import ControlNet, ControlSettings, ControlUnit, run_control
from zeroconv.controlnet_model.checkpoint import (CheckpointFormat, load_control, load_controlnet, read_metadata,
                                                  save_controlnet)
from zeroconv.controlnet_model.safetensors_io import open_weights
from zeroconv.controlnet_model.union import (UNION_TYPES, UnionCondition, UnionControlNet, union_type_index)

from .conftest import randomize
from .test_diffusers_parity import TOLERANCE, _inputs, _sdxl_y

diffusers = pytest.importorskip("diffusers", reason="the Union parity tests need the test extra")

HINT_WIDTHS = (16, 32, 96, 256)  # as in the released files (diffusers' class default is (48, 96, 192, 384))
# head counts (1, 2, 2) for widths (32, 64, 64): 32-wide heads, which is what a lone file without config.json
# implies for this shape (min(64, model_channels))
ARGS = dict(in_channels=4, conditioning_channels=3, layers_per_block=1, norm_num_groups=32,
            conditioning_embedding_out_channels=HINT_WIDTHS, block_out_channels=(32, 64, 64), cross_attention_dim=64,
            attention_head_dim=(1, 2, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=40, transformer_layers_per_block=(0, 1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            num_trans_channel=32, num_proj_channel=32)


def _theirs(types: int = 6, seed: int = 3):
    torch.manual_seed(seed)
    return randomize(diffusers.ControlNetUnionModel(**ARGS, num_control_type=types), seed).eval()


@pytest.fixture(scope="module")
def promax(tmp_path_factory):
    """(diffusers model, our loaded model) for an 8-type file, saved as a lone file without config.json."""
    theirs = _theirs(8)
    folder = tmp_path_factory.mktemp("union")
    theirs.save_pretrained(folder / "repo")
    lone = folder / "diffusion_pytorch_model_promax.safetensors"
    lone.write_bytes((folder / "repo" / "diffusion_pytorch_model.safetensors").read_bytes())
    loaded = load_controlnet(lone)
    return theirs, loaded


def _rel(mine, down, mid) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(mine.all, (*down, mid)))


def _theirs_out(theirs, types, idx, scales, hints, seed=0):
    x, t, context, _, added = _inputs("sdxl", seed)
    hot = torch.zeros(1, types)
    hot[0, idx] = 1.0
    with torch.no_grad():
        return theirs(x, t, context, hints, hot.expand(x.shape[0], -1), idx, scales, added_cond_kwargs=added,
                      return_dict=False)


def test_lone_file_loads_as_union_with_sizes_from_the_tensors(promax) -> None:
    _, loaded = promax
    assert loaded.format is CheckpointFormat.UNION
    assert isinstance(loaded.model, UnionControlNet)
    assert loaded.model.num_control_types == 8
    assert loaded.config.hint_block_channels == HINT_WIDTHS
    assert loaded.model.union.type_embed_dim == 4  # control_add_embedding.linear_1 in (32) / 8 types


def test_single_type_matches_diffusers(promax) -> None:
    theirs, loaded = promax
    x, t, context, hint, added = _inputs("sdxl")  # the two rows have different hints
    down, mid = _theirs_out(theirs, 8, [3], 0.7, [hint])
    with torch.no_grad():
        mine = loaded.model(x, None, t, context, _sdxl_y(added), conditions=[(3, hint, 0.7)])
    assert _rel(mine, down, mid) < TOLERANCE


def test_two_types_in_one_forward_match_diffusers_multi_condition(promax) -> None:
    theirs, loaded = promax
    x, t, context, hint, added = _inputs("sdxl")
    other = torch.rand(hint.shape, generator=torch.Generator().manual_seed(5))
    down, mid = _theirs_out(theirs, 8, [1, 6], [0.6, 1.3], [hint, other])
    with torch.no_grad():
        mine = loaded.model(x, None, t, context, _sdxl_y(added),
                            conditions=[UnionCondition(1, hint, 0.6), UnionCondition(6, other, 1.3)])
        encoded = [loaded.model.encode_hint(h) for h in (hint, other)]  # cached encodings give the same
        cached = loaded.model(x, None, t, context, _sdxl_y(added),
                              conditions=[UnionCondition(1, None, 0.6, encoded[0]), UnionCondition(6, None, 1.3, encoded[1])])
    assert _rel(mine, down, mid) < TOLERANCE
    assert _rel(cached, down, mid) < 1e-6


def test_folder_with_config_json(tmp_path) -> None:
    theirs = _theirs(6, seed=8)
    theirs.save_pretrained(tmp_path / "union")
    loaded = load_control(tmp_path / "union")
    assert isinstance(loaded.model, UnionControlNet) and loaded.model.num_control_types == 6
    x, t, context, hint, added = _inputs("sdxl", seed=1)
    down, mid = _theirs_out(theirs, 6, [0], 1.0, [hint], seed=1)
    with torch.no_grad():
        mine = loaded.model(x, None, t, context, _sdxl_y(added), conditions=[(0, hint, 1.0)])
    assert _rel(mine, down, mid) < TOLERANCE


def _core_single_type(model: UnionControlNet, x, t, context, y, hint, index: int):
    """ComfyUI core's one-type path (comfy/cldm/cldm.py union_controlnet_merge), written out: one token per row,
    attention over that one token (softmax of one score = 1, so the output is out_proj(V)), no sample token."""
    mha = model.transformer_layes[0].attn
    c = model.encode_hint(hint)
    tok = c.mean(dim=(2, 3)) + model.task_embedding[index]
    block = model.transformer_layes[0]
    dim = tok.shape[-1]
    v = torch.nn.functional.linear(block.ln_1(tok), mha.in_proj_weight[2 * dim:], mha.in_proj_bias[2 * dim:])
    tok = tok + mha.out_proj(v)
    tok = tok + block.mlp(block.ln_2(tok))
    guided = c + model.spatial_ch_projs(tok)[..., None, None]
    emb = model.embed_time(t, y, model.dtype) + model.control_add_embedding([index], model.dtype, x.device)
    return model.run_copy(x, guided, emb, context)


def test_single_type_equals_core_when_rows_share_the_hint(promax) -> None:
    _, loaded = promax
    x, t, context, hint, added = _inputs("sdxl")
    shared = hint[:1].expand_as(hint)  # one control image for the batch (cond and uncond rows), as in ComfyUI
    with torch.no_grad():
        mine = loaded.model(x, None, t, context, _sdxl_y(added), conditions=[(5, shared, 1.0)])
        core = _core_single_type(loaded.model, x, t, context, _sdxl_y(added), shared, 5)
    for a, b in zip(mine.all, core.all):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_is_the_plain_hint_path_with_the_zero_type_vector(promax) -> None:
    """Core's auto: input_hint_block(hint) after conv_in, control_add_embedding(zeros) added to the time embedding.
    With that embedding's last layer zeroed the Union's auto output is the plain ControlNet's of the same weights."""
    _, loaded = promax
    model = loaded.model
    x, t, context, hint, added = _inputs("sdxl")
    y = _sdxl_y(added)
    assert model.control_add_embedding([], model.dtype, x.device).abs().sum() > 0  # cos(0) = 1: zeros embed to non-zero
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["control_add_embedding.linear_2.weight"].zero_()
    state["control_add_embedding.linear_2.bias"].zero_()
    union = UnionControlNet(model.config)
    union.load_state_dict(state)
    plain = ControlNet(model.config)
    plain.load_state_dict({k: v for k, v in state.items() if k in plain.state_dict()})
    with torch.no_grad():
        auto = union(x, hint, t, context, y)
        auto_condition = union(x, None, t, context, y, conditions=[(None, hint, 1.0)])
        reference = plain(x, hint, t, context, y)
    for a, b, c in zip(auto.all, auto_condition.all, reference.all):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def test_type_table_and_out_of_range_error(promax, tmp_path) -> None:
    assert [name for name, _ in UNION_TYPES][:2] == ["openpose", "depth"]
    assert union_type_index("canny", 6) == union_type_index("canny/lineart/anime_lineart/mlsd", 6) == 3
    assert union_type_index("auto", 6) is None and union_type_index(None, 8) is None
    with pytest.raises(ValueError, match="unknown Union control type 'sketchy'"):
        union_type_index("sketchy", 8)
    theirs = _theirs(6, seed=2)
    theirs.save_pretrained(tmp_path / "v1")
    lone = tmp_path / "controlnet-union-sdxl-1.0.safetensors"
    lone.write_bytes((tmp_path / "v1" / "diffusion_pytorch_model.safetensors").read_bytes())
    model = load_controlnet(lone).model
    x, t, context, hint, added = _inputs("sdxl")
    with pytest.raises(ValueError, match=r"tile \(6\) is not in controlnet-union-sdxl-1.0.safetensors, which has 6 types"):
        model(x, None, t, context, _sdxl_y(added), conditions=[("tile", hint, 1.0)])


def test_native_save_keeps_a_union_and_reloads(promax, tmp_path) -> None:
    _, loaded = promax
    path = save_controlnet(loaded.model, tmp_path / "union_native.safetensors")
    assert load_file(path).keys() == loaded.model.state_dict().keys()
    stored = read_metadata(path)
    assert "union" in stored.config and open_weights(path).metadata["zeroconv_network"] == "union"
    back = load_controlnet(path)
    assert isinstance(back.model, UnionControlNet) and back.model.num_control_types == 8
    for (k, a), b in zip(back.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_training_export_of_a_union_stays_a_union(promax) -> None:
    """Training from a Union file (controlnet_init) writes its checkpoints through export_controlnet."""
    from types import SimpleNamespace

    from zeroconv.training.loop import export_controlnet

    _, loaded = promax
    exported = export_controlnet(SimpleNamespace(controlnet=loaded.model), dict(loaded.model.state_dict()))
    assert isinstance(exported, UnionControlNet) and exported.num_control_types == 8
    assert exported.state_dict().keys() == loaded.model.state_dict().keys()


def test_a_unit_with_types_runs_them_in_one_forward_with_strength(promax) -> None:
    _, loaded = promax
    x, t, context, hint, added = _inputs("sdxl")
    y = _sdxl_y(added)
    conditions = (UnionCondition(0, hint, 0.8), UnionCondition(2, hint.flip(-1), 1.1))
    calls = []
    handle = loaded.model.register_forward_hook(lambda *a: calls.append(1))
    unit = ControlUnit(loaded.model, hint, ControlSettings(strength=0.5), conditions=conditions)
    with torch.no_grad():
        out = run_control(unit, x, t, context, y, percent=0.5)
        direct = loaded.model(x, None, t, context, y, conditions=conditions)
    handle.remove()
    assert len(calls) == 2  # one forward for both types
    for a, b in zip(out.all, direct.all):
        torch.testing.assert_close(a, b * 0.5)


def test_types_on_a_plain_controlnet_are_refused(tiny_controlnet, tiny_inputs) -> None:
    with pytest.raises(ValueError, match="Union ControlNet only"):
        ControlUnit(tiny_controlnet, tiny_inputs["hint"], conditions=(UnionCondition(0, tiny_inputs["hint"]),))


def test_export_diffusers_loads_in_diffusers_as_controlnet_union_model(promax, tmp_path) -> None:
    from zeroconv.controlnet_model.checkpoint import export_diffusers

    theirs, loaded = promax
    export_diffusers(loaded.model, tmp_path / "export")
    back = diffusers.ControlNetUnionModel.from_pretrained(tmp_path / "export").eval()
    assert back.config.num_control_type == 8
    x, t, context, hint, added = _inputs("sdxl", seed=3)
    down, mid = _theirs_out(back, 8, [2], 1.0, [hint], seed=3)
    with torch.no_grad():
        mine = loaded.model(x, None, t, context, _sdxl_y(added), conditions=[(2, hint, 1.0)])
    assert _rel(mine, down, mid) < TOLERANCE
