"""TrainConfig: defaults, TOML and YAML files, overrides, unknown keys, the commented default file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from zeroconv.training.config import (PAPER_DEFAULT_PROMPT, MixedPrecision, TrainConfig, TrainMode, field_comments,
                                      parse_overrides, write_default_config)


def test_defaults_follow_the_paper() -> None:
    cfg = TrainConfig()
    assert (cfg.lr, cfg.caption_dropout, cfg.cfg_scale, cfg.sample_steps) == (1e-5, 0.5, 9.0, 20)
    assert cfg.validation_prompts == (PAPER_DEFAULT_PROMPT,)
    assert cfg.mixed_precision is MixedPrecision.NO and cfg.mode is TrainMode.STANDARD


def test_every_field_has_a_comment_and_the_default_file_reads_back(tmp_path: Path) -> None:
    comments = field_comments()
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(comments)
    path = write_default_config(tmp_path / "train.toml")
    text = path.read_text()
    for name, comment in comments.items():
        assert f"# {comment}\n{name} = " in text
    assert TrainConfig.from_file(path) == TrainConfig()


def test_toml_and_yaml_with_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('base = "sd15.safetensors"\nlr = 2e-5\nmode = "small_scale"\nvalidation_prompts = ["x", "y"]\n')
    yaml = tmp_path / "a.yaml"
    yaml.write_text("base: sd15.safetensors\nlr: 2e-5\nmode: small_scale\nvalidation_prompts: [x, y]\n")
    a, b = TrainConfig.from_file(toml), TrainConfig.from_file(yaml)  # YAML reads 2e-5 as text: coerced
    assert a == b and a.lr == 2e-5 and a.mode is TrainMode.SMALL_SCALE and a.validation_prompts == ("x", "y")
    c = TrainConfig.from_file(toml, ["batch_size=8", "mixed_precision=bf16", 'output_dir="runs/a"'])
    assert (c.batch_size, c.mixed_precision, c.output_dir) == (8, MixedPrecision.BF16, "runs/a")
    assert parse_overrides(["adam_betas=[0.9, 0.99]", "data=/x/y.jsonl"]) == {"adam_betas": [0.9, 0.99],
                                                                             "data": "/x/y.jsonl"}


@pytest.mark.parametrize("data, message", [
    ({"learning_rate": 1e-4}, "did you mean 'lr'"),
    ({"mode": "huge"}, "one of"),
    ({"resolution": 100}, "multiple of 8"),
    ({"caption_dropout": 1.5}, "caption_dropout"),
    ({"batch_size": "four"}, "batch_size"),
    ({"cache_latents": True, "crop": "random"}, "crop"),
])
def test_bad_values_are_named(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="write-default-config"):
        TrainConfig.from_file(tmp_path / "nope.toml")


def test_shipped_example_configs_parse() -> None:
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("train_*.toml"))
    assert examples
    for path in examples:
        assert TrainConfig.from_file(path).base
