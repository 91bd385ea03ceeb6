"""Workflow JSON -> API prompt -> validated -> executed, with ComfyUI's rules (ComfyUI execution.py; the UI
format: ComfyUI_frontend src/schemas/comfyWorkflowSchema.ts).

UI-format files (what the editor saves) are converted the way the frontend's "Export (API)" does: widget values
are matched to INPUT_TYPES positionally (required then optional, link-only inputs skipped), frontend-only
values (a seed's control_after_generate, an upload button) are stepped over, links become [node_id, slot],
and Reroute, PrimitiveNode, Note, muted and bypassed nodes are resolved away.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

Registry = Mapping[str, type]
Prompt = dict[str, dict[str, Any]]

WIDGET_COERCE: dict[str, type] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
MODE_MUTED, MODE_BYPASSED = 2, 4
# Values the frontend stores right after certain widgets (they never reach the backend).
CONTROL_AFTER_GENERATE_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
SEED_WIDGET_NAMES = frozenset({"seed", "noise_seed"})  # frontend: control_after_generate ?? name in these
UPLOAD_WIDGET_VALUES = frozenset({"image", "video", "audio"})


# ---- input specs -------------------------------------------------------------------------------------------
def spec_type(spec: tuple) -> Any:
    return spec[0]


def spec_options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_combo(spec: tuple) -> bool:
    return isinstance(spec_type(spec), (list, tuple)) or spec_type(spec) == "COMBO"


def combo_options(spec: tuple) -> list:
    return list(spec_type(spec)) if spec_type(spec) != "COMBO" else list(spec_options(spec).get("options", []))


def is_widget(spec: tuple) -> bool:
    """A widget (a value in the node) rather than a socket; forceInput turns a widget into a socket."""
    if spec_options(spec).get("forceInput"):
        return False
    return is_combo(spec) or spec_type(spec) in WIDGET_COERCE


def declared_inputs(cls: type) -> list[tuple[str, tuple, bool]]:
    """(name, spec, required) for every required then optional input of a node class."""
    types = cls.INPUT_TYPES()
    return [(name, spec, section == "required") for section in ("required", "optional")
            for name, spec in types.get(section, {}).items()]


def frontend_extras(name: str, spec: tuple) -> frozenset[str]:
    """The values the frontend may store after this widget in widgets_values."""
    control = spec_options(spec).get("control_after_generate")
    if spec_type(spec) == "INT" and (control if control is not None else name in SEED_WIDGET_NAMES):
        return CONTROL_AFTER_GENERATE_VALUES
    if is_combo(spec) and any(spec_options(spec).get(k) for k in ("image_upload", "video_upload", "audio_upload")):
        return UPLOAD_WIDGET_VALUES
    return frozenset()


# ---- UI format -> API format --------------------------------------------------------------------------------
def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _link_table(links: list) -> dict[int, tuple[int, int, int, int, Any]]:
    """link id -> (origin id, origin slot, target id, target slot, type); schema 0.4 arrays or 1.0 objects."""
    table = {}
    for link in links or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        table[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link[5])
    return table


def _widget_values(node: dict, cls: type) -> dict[str, Any]:
    """widgets_values mapped onto the class's widget inputs, stepping over frontend-only values."""
    widgets = [(name, spec) for name, spec, _ in declared_inputs(cls) if is_widget(spec)]
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return {name: values[name] for name, _ in widgets if name in values}
    out, i = {}, 0
    for name, spec in widgets:
        if i >= len(values):
            if "default" in spec_options(spec):
                logger.warning("node %s (%s) has no value for %r; using its default %r", node["id"], node["type"],
                               name, spec_options(spec)["default"])
                out[name] = spec_options(spec)["default"]
            continue
        out[name] = values[i]
        i += 1
        extras = frontend_extras(name, spec)
        if extras and i < len(values) and isinstance(values[i], str) and values[i] in extras:
            i += 1
    if i < len(values):
        logger.debug("node %s (%s): %d widget values beyond its inputs ignored", node["id"], node["type"],
                     len(values) - i)
    return out


def _resolve_link(link_id: int, nodes: dict[int, dict], links: dict, depth: int = 0) -> tuple[str, Any] | None:
    """('link', [id, slot]) or ('value', v) behind a UI link, through reroutes, primitives and bypassed nodes;
    None behind a muted node. A link that is not in the table or starts at no node raises KeyError."""
    if link_id not in links:
        raise KeyError(f"link {link_id} is not in the workflow's links")
    if depth > len(nodes):
        return None
    origin_id, origin_slot, _, _, link_type = links[link_id]
    origin = nodes.get(origin_id)
    if origin is None:
        raise KeyError(f"link {link_id} comes from node {origin_id}, which is not in the workflow")
    if origin.get("mode", 0) == MODE_MUTED:
        return None
    upstream = [i for i in origin.get("inputs", []) if i.get("link") is not None]
    if origin["type"] == "Reroute":
        return _resolve_link(upstream[0]["link"], nodes, links, depth + 1) if upstream else None
    if origin["type"] == "PrimitiveNode":
        return "value", (origin.get("widgets_values") or [None])[0]
    if origin.get("mode", 0) == MODE_BYPASSED:  # the frontend passes a same-typed input through
        sockets = origin.get("inputs", [])
        preferred = sockets[origin_slot:origin_slot + 1]
        for socket in preferred + upstream:
            if socket.get("link") is not None and socket.get("type") == link_type:
                return _resolve_link(socket["link"], nodes, links, depth + 1)
        return None
    return "link", [str(origin_id), origin_slot]


def ui_to_api(workflow: dict, registry: Registry) -> Prompt:
    """A UI-format workflow as the API prompt the frontend would queue."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ValueError("this workflow uses subgraphs, which zeroconv run cannot flatten; in ComfyUI, unpack "
                         "them (right click > Unpack Subgraph) and save again")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = _link_table(workflow.get("links"))
    prompt: Prompt = {}
    for node_id in sorted(nodes):
        node = nodes[node_id]
        if node["type"] in FRONTEND_ONLY_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        cls = registry.get(node["type"])
        if cls is None:
            raise ValueError(f"node {node_id}: node type {node['type']!r} does not exist here; zeroconv run knows "
                             f"{sorted(registry)}")
        inputs = _widget_values(node, cls)
        for socket in node.get("inputs", []):
            if socket.get("link") is None:
                continue
            try:
                source = _resolve_link(socket["link"], nodes, links)
            except KeyError as exc:
                raise ValueError(f"node {node_id} ({node['type']}): input {socket['name']!r} is connected to a "
                                 f"missing node ({exc.args[0]}); reconnect it in ComfyUI and save again") from exc
            if source is not None:
                inputs[socket["name"]] = source[1]
            elif socket["name"] not in inputs:
                logger.warning("node %s (%s): input %r is connected to a muted node",
                               node_id, node["type"], socket["name"])
        title = node.get("title") or (node.get("properties") or {}).get("Node name for S&R") or node["type"]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return prompt


def load_workflow(path: str | Path, registry: Registry) -> tuple[Prompt, dict | None]:
    """(API prompt, UI workflow or None) from a workflow file in either format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); save the workflow from ComfyUI again") from exc
    if is_ui_format(data):
        return ui_to_api(data, registry), data
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved POST /prompt body
    if not isinstance(data, dict) or not data or not all(isinstance(n, dict) and "class_type" in n
                                                         for n in data.values()):
        raise ValueError(f"{path} is neither a UI workflow (nodes, links) nor an API prompt ({{id: {{class_type, "
                         "inputs}}}}); in ComfyUI use Save or Export (API)")
    return {str(k): v for k, v in data.items()}, None


def apply_overrides(prompt: Prompt, overrides: list[str]) -> Prompt:
    """NODE.INPUT=VALUE assignments; NODE is an id, a title or a class_type naming one node; VALUE is JSON or text."""
    prompt = json.loads(json.dumps(prompt))
    for item in overrides:
        target, sep, raw = item.partition("=")
        ref, dot, name = target.rpartition(".")
        if not sep or not dot or not ref or not name:
            raise ValueError(f"--set {item!r}: write NODE.INPUT=VALUE, e.g. --set 3.seed=7 or --set KSampler.steps=4")
        matches = [i for i, n in prompt.items() if i == ref] or \
                  [i for i, n in prompt.items() if ref in ((n.get("_meta") or {}).get("title"), n["class_type"])]
        if len(matches) != 1:
            found = "no node" if not matches else f"nodes {matches}"
            raise ValueError(f"--set {item!r}: {ref!r} matches {found}; use the node id")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[matches[0]]["inputs"][name] = value
    return prompt


def check_structure(prompt: Prompt) -> None:
    """Every node is an object with a class_type and an `inputs` object; every link names an existing node."""
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise ValueError(f"node {node_id}: expected an object with a 'class_type' string, got {node!r:.80}")
        inputs = node.setdefault("inputs", {})
        if not isinstance(inputs, dict):
            raise ValueError(f"node {node_id} ({node['class_type']}): 'inputs' must be an object of name: value, "
                             f"got {type(inputs).__name__}; export the workflow from ComfyUI again")
        for name, value in inputs.items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                raise ValueError(f"node {node_id} ({node['class_type']}): input {name!r} links to node "
                                 f"{value[0]}, which is not in the workflow; reconnect it and save again")


# ---- validation (execution.py validate_prompt / validate_inputs) ---------------------------------------------
class PromptValidationError(ValueError):
    """The prompt failed validation; node_errors is shaped like ComfyUI's /prompt 400 answer."""

    def __init__(self, message: str, node_errors: dict[str, dict] | None = None):
        self.node_errors = node_errors or {}
        lines = [message] + [f"  node {nid} ({info['class_type']}): {e['message']}"
                             + (f" [{e['details']}]" if e.get("details") else "")
                             for nid, info in self.node_errors.items() for e in info["errors"]]
        super().__init__("\n".join(lines))


def _error(kind: str, message: str, name: str, details: str = "", **extra: Any) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": {"input_name": name, **extra}}


def _check_constant(name: str, spec: tuple, value: Any, skip_builtin: bool) -> tuple[Any, dict | None]:
    """Coerce a widget value and check min/max and list membership (skipped for inputs VALIDATE_INPUTS names)."""
    kind, opts = spec_type(spec), spec_options(spec)
    if isinstance(kind, str) and kind in WIDGET_COERCE:
        try:
            value = WIDGET_COERCE[kind](value)
        except (TypeError, ValueError):
            return value, _error("invalid_input_type", f"Failed to convert an input value to a {kind} value", name,
                                 f"{name}, {value!r}", received_value=value)
    elif not is_combo(spec):
        return value, _error("invalid_input_type", f"input {name!r} takes a link from a node giving {kind}, "
                             f"not the value {value!r}", name)
    if skip_builtin:
        return value, None
    if opts.get("min") is not None and value < opts["min"]:
        return value, _error("value_smaller_than_min", f"Value {value} smaller than min of {opts['min']}", name, name)
    if opts.get("max") is not None and value > opts["max"]:
        return value, _error("value_bigger_than_max", f"Value {value} bigger than max of {opts['max']}", name, name)
    if is_combo(spec) and value not in combo_options(spec):
        return value, _error("value_not_in_list", "Value not in list", name,
                             f"{name}: {value!r} not in {combo_options(spec)[:20]}", received_value=value)
    return value, None


def _node_errors(node_id: str, prompt: Prompt, registry: Registry) -> list[dict]:
    """One node's input errors: missing required inputs, bad links, bad widget values, then VALIDATE_INPUTS
    (called with the inputs its signature names, linked ones as None, as ComfyUI does)."""
    cls = registry[prompt[node_id]["class_type"]]
    inputs = prompt[node_id].setdefault("inputs", {})
    custom = inspect.signature(cls.VALIDATE_INPUTS).parameters if hasattr(cls, "VALIDATE_INPUTS") else {}
    errors: list[dict] = []
    for name, spec, required in declared_inputs(cls):
        value = inputs.get(name)
        if name not in inputs:
            errors += [_error("required_input_missing", "Required input is missing", name, name)] if required else []
        elif isinstance(value, list):
            source, slot = (prompt.get(str(value[0])), value[1]) if len(value) == 2 else (None, None)
            outputs = getattr(registry[source["class_type"]], "RETURN_TYPES", ()) if source else ()
            if not isinstance(slot, int) or not 0 <= slot < len(outputs):
                errors.append(_error("bad_linked_input", "Bad linked input, must be [node_id, slot_index] naming an "
                                     "output of a node in the workflow", name, f"{name}, {value!r}"))
        else:
            inputs[name], error = _check_constant(name, spec, value, skip_builtin=name in custom)
            errors += [error] if error else []
    if custom and not errors:
        result = cls.VALIDATE_INPUTS(**{k: None if isinstance(v, list) else v for k, v in inputs.items()
                                        if k in custom})
        if result is not True:
            errors.append(_error("custom_validation_failed", "Custom validation failed for node", "", str(result)))
    return errors


def _upstream(prompt: Prompt, node_id: str) -> list[str]:
    """A node and every node it links from, each once (cycles tolerated; execution_order reports them)."""
    seen, todo = {}, [node_id]
    while todo:
        current = todo.pop()
        if current not in seen and current in prompt:
            seen[current] = None
            todo += [str(v[0]) for v in prompt[current].get("inputs", {}).values() if isinstance(v, list) and v]
    return list(seen)


def validate_prompt(prompt: Prompt, registry: Registry) -> list[str]:
    """Check and coerce the prompt in place; return the output node ids to run, or raise PromptValidationError."""
    for node_id, node in prompt.items():
        if node.get("class_type") not in registry:
            raise PromptValidationError(f"Cannot execute because node {node.get('class_type')!r} (node {node_id}) "
                                        f"does not exist; zeroconv run knows {sorted(registry)}")
    outputs = [i for i, n in prompt.items() if getattr(registry[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise PromptValidationError("Prompt has no outputs: add an output node such as SaveImage or PreviewImage")
    needs = {o: _upstream(prompt, o) for o in outputs}
    node_errors = {nid: {"errors": errs, "class_type": prompt[nid]["class_type"],
                         "dependent_outputs": [o for o in outputs if nid in needs[o]]}
                   for nid in dict.fromkeys(n for o in outputs for n in needs[o])
                   if (errs := _node_errors(nid, prompt, registry))}
    if node_errors:
        raise PromptValidationError("Prompt outputs failed validation:", node_errors)
    return outputs


# ---- execution -------------------------------------------------------------------------------------------
class NodeExecutionError(RuntimeError):
    """A node raised while running; names the node like ComfyUI's execution_error event."""

    def __init__(self, node_id: str, class_type: str, exc: BaseException):
        self.node_id, self.class_type, self.exception = node_id, class_type, exc
        super().__init__(f"node {node_id} ({class_type}) failed: {type(exc).__name__}: {exc}")


@dataclass
class ExecutionResult:
    """What a run produced: each output node's ui dict and every executed node's outputs."""

    ui: dict[str, dict]
    outputs: dict[str, tuple]


def execution_order(prompt: Prompt, outputs: list[str]) -> list[str]:
    """Nodes the outputs depend on, each after its inputs; raises on a cycle."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_id: str, path: list[str]) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "open":
            raise ValueError(f"the workflow has a cycle through nodes {path[path.index(node_id):] + [node_id]}")
        state[node_id] = "open"
        for value in prompt[node_id].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                visit(str(value[0]), path + [node_id])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in outputs:
        visit(node_id, [])
    return order


def _call_inputs(node_id: str, cls: type, prompt: Prompt, results: dict[str, tuple],
                 extra_pnginfo: dict | None) -> dict[str, Any]:
    """Declared inputs (links replaced by the linked outputs) and the hidden PROMPT, EXTRA_PNGINFO, UNIQUE_ID."""
    declared = {name for name, _, _ in declared_inputs(cls)}
    kwargs = {k: results[str(v[0])][v[1]] if isinstance(v, list) else v
              for k, v in prompt[node_id].get("inputs", {}).items() if k in declared}
    hidden = {"PROMPT": prompt, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": node_id}
    return {**kwargs, **{name: hidden.get(kind) for name, kind in cls.INPUT_TYPES().get("hidden", {}).items()}}


def execute_prompt(prompt: Prompt, registry: Registry, outputs: list[str],
                   extra_pnginfo: dict | None = None) -> ExecutionResult:
    """Run the nodes the outputs need, once each, with keyword inputs, under torch.inference_mode()."""
    results: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    with torch.inference_mode():
        for node_id in execution_order(prompt, outputs):
            cls = registry[prompt[node_id]["class_type"]]
            logger.info("running node %s (%s)", node_id, prompt[node_id]["class_type"])
            try:
                value = getattr(cls(), cls.FUNCTION)(**_call_inputs(node_id, cls, prompt, results, extra_pnginfo))
            except Exception as exc:
                raise NodeExecutionError(node_id, prompt[node_id]["class_type"], exc) from exc
            if isinstance(value, dict):  # {'ui': ..., 'result': ...}
                value, ui[node_id] = value.get("result", ()), value.get("ui")
            value = () if value is None else value
            if not isinstance(value, (tuple, list)) or len(value) != len(cls.RETURN_TYPES):
                raise ValueError(f"node {node_id} ({cls.__name__}) must return a tuple of {len(cls.RETURN_TYPES)} "
                                 f"values ({cls.RETURN_TYPES}), got {type(value).__name__}")
            results[node_id] = tuple(value)
    return ExecutionResult({k: v for k, v in ui.items() if v}, results)
