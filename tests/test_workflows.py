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
                    "ONESTEP_SR_DEGRADATION,SR_DEGRADATION", "ONESTEP_SR_TIMESTEP,SR_TIMESTEP", "CLIP_VISION"}
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
    "Note": ["text"],
    "MarkdownNote": ["text"],
}
TITLE_HEIGHT = 30  # LiteGraph draws the title above `pos`
SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT = 20, 24, 60


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
        assert target["link"] == link_id and (link_type in target["type"].split(",") or target["type"] == "*")
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


def _notes(data: dict) -> str:
    return "\n".join(str(n["widgets_values"][0]) for n in data["nodes"] if n["type"] in ("Note", "MarkdownNote"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_widget_values_are_the_node_defaults_unless_a_note_says_why(path, comfy):
    data = json.loads(path.read_text())
    notes = _notes(data)
    for node in data["nodes"]:
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        for (name, spec), value in zip(widget_spec(NODE_CLASS_MAPPINGS[node["type"]]), node["widgets_values"],
                                       strict=True):
            options = spec[1] if len(spec) > 1 else {}
            if name == "control_after_generate":
                default = "fixed"  # what web/js/onestep_sr.js gives new nodes of the pack
            elif "default" in options:
                default = options["default"]
            elif isinstance(spec[0], list) and name not in ("weights", "base"):
                default = spec[0][0]
            else:
                continue  # file lists
            if value != default:
                assert f"`{name}`" in notes, (f"{path.name}: {node['type']}.{name} = {value!r}, default {default!r}; "
                                              f"a Note node must say why (mention `{name}`)")


def _box(node: dict) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def _min_height(node: dict) -> int:
    """What the node needs to show its sockets and widgets (core nodes only by their saved slots)."""
    if node["type"] not in NODE_CLASS_MAPPINGS:
        return 0
    node_class = NODE_CLASS_MAPPINGS[node["type"]]
    widgets = widget_spec(node_class)
    multiline = sum(1 for _, spec in widgets if len(spec) > 1 and spec[1].get("multiline"))
    sockets = sum(1 for slot in node["inputs"] if slot["type"] in CONNECTION_TYPES)
    rows = max(sockets, len(node_class.RETURN_TYPES))
    return SLOT_HEIGHT * rows + WIDGET_HEIGHT * (len(widgets) - multiline) + MULTILINE_HEIGHT * multiline


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_layout_has_no_overlaps(path, comfy):
    nodes = json.loads(path.read_text())["nodes"]
    for node in nodes:
        assert node["size"][1] >= _min_height(node), f"{path.name}: node {node['id']} ({node['type']}) is too short"
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax0, ay0, ax1, ay1 = _box(a)
            bx0, by0, bx1, by1 = _box(b)
            overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
            assert not overlap, f"{path.name}: nodes {a['id']} ({a['type']}) and {b['id']} ({b['type']}) overlap"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_models_metadata_names_the_published_files(path):
    from onestep_sr.downloads.catalog import ALL_FILES

    published = {entry.name: entry for entry in ALL_FILES}
    data = json.loads(path.read_text())
    models = data["models"]
    assert models and all(set(m) == {"name", "url", "directory"} for m in models)
    for model in models:
        assert model == published[model["name"]].as_workflow_model()
        assert model["url"].startswith("https://")
    listed = {m["name"] for m in models}
    for node in data["nodes"]:
        files = []
        if node["type"] in ("CheckpointLoaderSimple", "CLIPVisionLoader", "OneStepSR_Loader"):
            files = [node["widgets_values"][0]]
        if node["type"] == "OneStepSR_Loader" and files == ["s3diff.pkl"]:
            files.append("de_net.pth")  # read from the same folder, not named by a widget
        for name in files:  # file names in the widgets are the published names, each listed with its URL
            assert name in listed, f"{path.name}: {name} is not in the workflow's models"
            assert name in {m["name"] for m in node["properties"]["models"]}
        if node["type"] == "LoadImage":
            assert node["widgets_values"][0] == "onestep_sr_sample.png"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_thumbnail_and_sample_input(path):
    from PIL import Image

    thumb = path.with_suffix(".jpg")  # ComfyUI's template browser shows <stem>.jpg
    assert thumb.is_file() and thumb.stat().st_size < 64_000
    with Image.open(thumb) as image:
        assert image.format == "JPEG" and image.size == (256, 256)
    sample = path.parent / "onestep_sr_sample.png"
    assert sample.stat().st_size < 64_000
    with Image.open(sample) as image:
        assert image.format == "PNG" and image.mode == "RGB" and max(image.size) <= 256


def test_sample_input_is_copied_once_never_overwritten(comfy, tmp_path):
    from onestep_sr.nodes import comfy_adapter

    comfy_adapter.register_if_hosted()
    copied = tmp_path / "input" / "onestep_sr_sample.png"
    assert copied.read_bytes() == comfy_adapter.SAMPLE_INPUT.read_bytes()
    copied.write_bytes(b"the user's own file")
    comfy_adapter.register_if_hosted()
    assert copied.read_bytes() == b"the user's own file"
