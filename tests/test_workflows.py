"""The shipped workflows are valid ComfyUI UI-format graphs whose node types and widget values match
the pack's nodes (and the core nodes they use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onestep_sr.nodes import NODE_CLASS_MAPPINGS

import fake_comfy
import tinymodels

WORKFLOWS = sorted((Path(__file__).parents[1] / "workflows").glob("*.json"))
CONNECTION_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "LATENT", "CONDITIONING", "ONESTEP_SR_MODEL",
                    "SR_DEGRADATION", "SR_TIMESTEP", "CLIP_VISION"}
# widget names of the core nodes the workflows use (ComfyUI's INPUT_TYPES order)
CORE_WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "LoadImage": ["image", "upload"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "PrimitiveStringMultiline": ["value"],
    "PrimitiveFloat": ["value"],
    "PreviewAny": [],
    "CLIPVisionLoader": ["clip_name"],
}


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    tinymodels.write_tiny_tokenizer(tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    weights = state.models_dir / "onestep_sr"
    weights.mkdir(parents=True)
    (weights / "osediff.pkl").write_bytes(b"")
    return state


def widget_spec(node_class) -> list[tuple[str, object]]:
    """(name, spec) of each widget in the order ComfyUI stores widgets_values."""
    types = node_class.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0]
            if isinstance(kind, str) and kind in CONNECTION_TYPES:
                continue
            widgets.append((name, spec))
            if name in ("seed", "noise_seed"):
                widgets.append(("control_after_generate", (["fixed", "increment", "decrement", "randomize"],)))
    return widgets


def check_value(node_type, name, spec, value):
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        if name in ("weights", "base"):  # file lists depend on the user's folders
            assert isinstance(value, str)
        else:
            assert value in kind, f"{node_type}.{name}: {value!r} not in {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and options.get("min", value) <= value <= options.get("max", value)
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get("max", value)
    elif kind == "STRING":
        assert isinstance(value, str)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_nodes(path, comfy):
    data = json.loads(path.read_text())
    nodes = {node["id"]: node for node in data["nodes"]}
    ours = [n for n in nodes.values() if n["type"] in NODE_CLASS_MAPPINGS]
    assert ours, "each workflow uses the pack's nodes"
    for node in nodes.values():
        if node["type"] in NODE_CLASS_MAPPINGS:
            spec = widget_spec(NODE_CLASS_MAPPINGS[node["type"]])
            assert len(node["widgets_values"]) == len(spec), node["type"]
            for (name, widget), value in zip(spec, node["widgets_values"], strict=True):
                check_value(node["type"], name, widget, value)
            declared = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
            names = {**declared["required"], **declared.get("optional", {})}
            for slot in node["inputs"]:
                assert slot["name"] in names, f"{node['type']} has no input {slot['name']}"
        else:
            assert node["type"] in CORE_WIDGETS, f"unknown node type {node['type']}"
            assert len(node["widgets_values"]) == len(CORE_WIDGETS[node["type"]]), node["type"]
    for link_id, src, src_slot, dst, dst_slot, link_type in data["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] in (link_type, "*")
        assert nodes[src]["outputs"][src_slot]["type"] == link_type
    for node in ours:
        for slot in node["inputs"]:
            if slot["type"] in CONNECTION_TYPES and slot["name"] in ("onestep_model", "image"):
                assert slot["link"] is not None, f"{node['type']}.{slot['name']} is not connected"


def test_node_ids_and_display_names_are_stable():
    from onestep_sr.nodes import NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_DISPLAY_NAME_MAPPINGS["OneStepSR_Loader"] == "Load OneStep SR"
    assert NODE_DISPLAY_NAME_MAPPINGS["OneStepSR_Upscale"] == "OneStep Upscale"
    assert all(node_id.startswith("OneStepSR_") for node_id in NODE_CLASS_MAPPINGS)


def test_every_input_has_a_tooltip(comfy):
    for node_id, node_class in NODE_CLASS_MAPPINGS.items():
        for section in ("required", "optional"):
            for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
