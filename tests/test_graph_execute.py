"""API prompts are validated and executed with ComfyUI's rules (ComfyUI execution.py validate_inputs, execute)."""
from __future__ import annotations

import pytest
import torch

from zeroconv.workflow_runner.graph import (NodeExecutionError, PromptValidationError, execute_prompt,
                                            execution_order, validate_prompt)

CALLS: list[str] = []


class Number:
    """Source node: an INT widget with a range, a combo and a BOOLEAN."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 10}), "kind": (["a", "b"],)},
                "optional": {"flag": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "make"

    def make(self, value, kind, flag=False):
        CALLS.append(f"make{value}")
        return (torch.tensor(float(value)),)


class Add:
    """Adds two NUMBERs; records whether it ran under inference_mode and its hidden inputs."""

    seen: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("NUMBER",), "b": ("NUMBER,FLOAT",)},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "add"

    def add(self, a, b, unique_id=None, prompt=None):
        CALLS.append("add")
        Add.seen = {"inference": torch.is_inference_mode_enabled(), "id": unique_id, "has_prompt": prompt is not None}
        return (a + b,)


class Show:
    """Output node returning a ui dict."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",)}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    def show(self, x):
        CALLS.append("show")
        return {"ui": {"values": [float(x)]}}


class Checked:
    """VALIDATE_INPUTS names `value`: its built-in max check is skipped, its own rule applies."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 5}), "x": ("NUMBER",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, value, x):
        assert x is None  # linked inputs arrive as None, as in ComfyUI
        return True if value != 13 else "13 is unlucky"

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "run"

    def run(self, value, x):
        return (x + value,)


class Broken:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",)}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, x):
        raise ZeroDivisionError("boom")


class BareReturn(Broken):
    def run(self, x):
        return x


REGISTRY = {"Number": Number, "Add": Add, "Show": Show, "Checked": Checked, "Broken": Broken, "BareReturn": BareReturn}


def _prompt():
    return {"1": {"class_type": "Number", "inputs": {"value": "3", "kind": "a"}},
            "2": {"class_type": "Number", "inputs": {"value": 4, "kind": "b", "flag": 1}},
            "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
            "4": {"class_type": "Show", "inputs": {"x": ["3", 0]}},
            "5": {"class_type": "Number", "inputs": {"value": 9, "kind": "a"}}}  # not needed by any output


def _errors(prompt):
    with pytest.raises(PromptValidationError) as info:
        validate_prompt(prompt, REGISTRY)
    return info.value


def test_validation_coerces_and_finds_outputs() -> None:
    prompt = _prompt()
    assert validate_prompt(prompt, REGISTRY) == ["4"]
    assert prompt["1"]["inputs"]["value"] == 3 and prompt["2"]["inputs"]["flag"] is True


@pytest.mark.parametrize("node, name, value, kind", [
    ("1", "value", 11, "value_bigger_than_max"), ("1", "value", -1, "value_smaller_than_min"),
    ("1", "kind", "c", "value_not_in_list"), ("1", "value", "three", "invalid_input_type"),
    ("3", "a", ["4", 0], "bad_linked_input"), ("3", "a", ["9", 0], "bad_linked_input"),
    ("3", "a", 5, "invalid_input_type")])
def test_validation_errors_name_node_input_and_kind(node, name, value, kind) -> None:
    prompt = _prompt()
    prompt[node]["inputs"][name] = value
    error = _errors(prompt)
    errors = error.node_errors[node]["errors"]
    assert [e["type"] for e in errors] == [kind] and errors[0]["extra_info"]["input_name"] == name
    assert error.node_errors[node]["dependent_outputs"] == ["4"]
    assert f"node {node} ({prompt[node]['class_type']})" in str(error)


def test_missing_input_type_mismatch_unknown_class_and_no_outputs() -> None:
    prompt = _prompt()
    del prompt["3"]["inputs"]["b"]
    assert _errors(prompt).node_errors["3"]["errors"][0]["type"] == "required_input_missing"
    prompt = _prompt()
    prompt["6"] = {"class_type": "Show", "inputs": {"x": ["4", 0]}}
    assert "bad_linked_input" in str(_errors(prompt).node_errors["6"]["errors"])
    prompt = _prompt()
    prompt["7"] = {"class_type": "Nope", "inputs": {}}
    assert "Cannot execute because node 'Nope'" in str(_errors(prompt))
    assert "no outputs" in str(_errors({"1": _prompt()["1"]}))


def test_validate_inputs_replaces_builtin_checks_for_the_inputs_it_names() -> None:
    prompt = _prompt()
    prompt["6"] = {"class_type": "Checked", "inputs": {"value": 99, "x": ["1", 0]}}
    prompt["7"] = {"class_type": "Show", "inputs": {"x": ["6", 0]}}
    assert validate_prompt(prompt, REGISTRY) == ["4", "7"]
    prompt["6"]["inputs"]["value"] = 13
    errors = _errors(prompt).node_errors["6"]["errors"]
    assert {e["type"] for e in errors} == {"custom_validation_failed"} and "13 is unlucky" in errors[0]["details"]


def test_execution_runs_needed_nodes_once_in_order_with_hidden_inputs() -> None:
    CALLS.clear()
    prompt = _prompt()
    outputs = validate_prompt(prompt, REGISTRY)
    result = execute_prompt(prompt, REGISTRY, outputs)
    assert CALLS == ["make3", "make4", "add", "show"]
    assert result.ui == {"4": {"values": [7.0]}} and float(result.outputs["3"][0]) == 7.0
    assert Add.seen == {"inference": True, "id": "3", "has_prompt": True}


def test_runtime_errors_and_bad_returns_name_the_node() -> None:
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1, "kind": "a"}},
              "2": {"class_type": "Broken", "inputs": {"x": ["1", 0]}}}
    with pytest.raises(NodeExecutionError, match=r"node 2 \(Broken\) failed: ZeroDivisionError: boom"):
        execute_prompt(prompt, REGISTRY, ["2"])
    prompt["2"]["class_type"] = "BareReturn"
    with pytest.raises(ValueError, match="must return a tuple"):
        execute_prompt(prompt, REGISTRY, ["2"])


def test_cycles_are_reported() -> None:
    prompt = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["2", 0]}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}
    with pytest.raises(ValueError, match="cycle"):
        execution_order(prompt, ["3"])
