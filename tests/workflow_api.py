"""Convert a saved UI-format ComfyUI workflow (what the editor saves, `nodes` + `links`) to the API prompt
format that POST /prompt accepts, the way the frontend does it, using the server's /object_info.

Only what our shipped workflows need is covered: plain nodes, links, widgets converted to inputs, the extra
widgets the frontend adds (control_after_generate after seeds, the upload button of LoadImage) and muted
nodes. Frontend-only nodes (Reroute, PrimitiveNode, Note) and bypassed nodes are rejected with a clear error.
"""

from __future__ import annotations

import copy
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MODE_MUTED = 2
MODE_BYPASSED = 4
NOTE_TYPES = {"Note", "MarkdownNote"}


class WorkflowConversionError(ValueError):
    """The workflow cannot be converted with the given /object_info."""


def _is_widget(spec: Any) -> bool:
    """Whether an INPUT_TYPES entry is a widget (value stored in widgets_values) rather than a socket."""
    kind = spec[0] if isinstance(spec, (list, tuple)) else spec
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _options(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def _extra_widget_values(name: str, spec: Any) -> int:
    """How many widgets_values the frontend stores after this input's own value (values of widgets that are
    not inputs): the control_after_generate combo of seeds, the upload button of file pickers."""
    kind = spec[0] if isinstance(spec, (list, tuple)) else spec
    options = _options(spec)
    extra = 0
    if options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
        extra += 1
    if any(options.get(flag) for flag in UPLOAD_FLAGS):
        extra += 1
    return extra


def _default_value(spec: Any) -> Any:
    options = _options(spec)
    if "default" in options:
        return options["default"]
    kind = spec[0] if isinstance(spec, (list, tuple)) else spec
    choices = kind if isinstance(kind, (list, tuple)) else options.get("options")
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def widget_inputs(info: dict) -> list[tuple[str, Any]]:
    """(name, spec) of a node type's widget inputs in widgets_values order: required then optional."""
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    result = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section, list(specs)):
            spec = specs[name]
            if _is_widget(spec):
                result.append((name, spec))
    return result


def widget_values_by_name(node: dict, info: dict) -> dict[str, Any]:
    """Map a UI node's widgets_values list to its widget input names."""
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some nodes save a name -> value dict already
        return dict(values)
    values = list(values or [])
    mapped: dict[str, Any] = {}
    position = 0
    required = set(info.get("input", {}).get("required") or {})
    for name, spec in widget_inputs(info):
        if position < len(values):
            mapped[name] = values[position]
            position += 1 + _extra_widget_values(name, spec)
        elif name in required:  # saved before this input existed: the frontend fills in the default
            mapped[name] = _default_value(spec)
    if position < len(values):
        raise WorkflowConversionError(
            f"node {node['id']} ({node['type']}) has {len(values)} widget values but its inputs account for "
            f"only {position}: {values[position:]!r} left over"
        )
    return mapped


def ui_to_api(workflow: dict, object_info: dict, overrides: dict[int, dict] | None = None) -> dict:
    """The API prompt ({"<id>": {"class_type", "inputs"}}) for a UI-format workflow.

    `overrides` maps a node id to {input name: value}; those values replace what the workflow holds (a link or
    a widget value) for that node.
    """
    overrides = overrides or {}
    nodes = {int(node["id"]): node for node in workflow["nodes"]}
    links = {int(link[0]): (int(link[1]), int(link[2])) for link in workflow.get("links", [])}
    for node_id in overrides:
        if node_id not in nodes:
            raise WorkflowConversionError(f"override for node {node_id}, which is not in the workflow")

    prompt: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        mode = node.get("mode", 0)
        if node["type"] in NOTE_TYPES or mode == MODE_MUTED:
            continue
        if mode == MODE_BYPASSED:
            raise WorkflowConversionError(f"node {node_id} ({node['type']}) is bypassed; not supported here")
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowConversionError(
                f"node {node_id}: type {node['type']!r} is not in /object_info (a frontend-only node, or a "
                "custom node that failed to load)"
            )
        inputs: dict[str, Any] = widget_values_by_name(node, info)
        for socket in node.get("inputs") or []:
            link_id = socket.get("link")
            if link_id is None:
                continue  # an unconnected socket; a converted widget keeps its widget value
            if int(link_id) not in links:
                raise WorkflowConversionError(f"node {node_id} input {socket['name']!r}: link {link_id} is missing")
            source, slot = links[int(link_id)]
            source_node = nodes.get(source)
            if source_node is None or source_node.get("mode", 0) == MODE_MUTED:
                continue
            inputs[socket["name"]] = [str(source), slot]
        inputs.update(copy.deepcopy(overrides.get(node_id, {})))
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def node_ids(workflow: dict, node_type: str) -> list[int]:
    """Ids of the workflow's nodes of one type, in id order."""
    return sorted(int(node["id"]) for node in workflow["nodes"] if node["type"] == node_type)
