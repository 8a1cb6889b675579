"""CLIP Prompt Extract: vocabulary, scoring, caching, prompt format, encoders (transformers folder,
SD-2 text tower + OpenCLIP vision pairing) and the node against fakes of ComfyUI's CLIP objects.
Tiny random models only; nothing is downloaded."""

from __future__ import annotations

import gc
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from onestep_sr.models import clip_tags
from onestep_sr.models.clip_tags import (
    ClipTagsError,
    ClipTextTower,
    TagScorer,
    clip_preprocess,
    format_prompt,
    load_clip_vision,
    load_vocabulary,
    sd2_openclip_encoders,
    transformers_clip_encoders,
)
from onestep_sr.nodes.clip_prompt_node import OneStepSRCLIPPromptExtract

import fake_comfy
import tinymodels

EMBED_DIM = 16
TEXT_HEADS = 4


@pytest.fixture(autouse=True)
def _fresh_cache_one_thread():
    """Tiny models gain nothing from threads, and on a busy machine intra-op threads make each
    small op orders of magnitude slower."""
    clip_tags.clear_text_cache()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    clip_tags.clear_text_cache()


# --------------------------------------------------------------------------------------------
# Vocabulary and format
# --------------------------------------------------------------------------------------------


def test_vocabulary_file():
    tags = load_vocabulary()
    assert len(tags) >= 2000
    assert len(set(tags)) == len(tags)
    assert all(t == t.lower() == t.strip() and t for t in tags)
    text = clip_tags.VOCABULARY_PATH.read_text(encoding="utf-8")
    text.encode("cp1252")
    headings = {line[1:].strip() for line in text.splitlines() if line.startswith("#")}
    assert {"objects", "animals", "colours", "lighting", "art & photo styles"} <= headings


def test_vocabulary_rejects_duplicates(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# a\ndog\n\ncat\ndog\n")
    with pytest.raises(ClipTagsError, match="line 5 duplicates line 2"):
        load_vocabulary(path)
    path.write_text("# only comments\n\n")
    with pytest.raises(ClipTagsError, match="no tags"):
        load_vocabulary(path)


def test_format_prompt_is_osediffs():
    assert format_prompt(["dog", "grass", "blue sky"], "a cute dog") == "dog, grass, blue sky, a cute dog,"
    assert format_prompt(["dog", "grass"]) == "dog, grass, ,"
    assert format_prompt(["dog"], "") == "dog, ,"
    assert format_prompt([], "sharp") == ", sharp,"
    assert format_prompt([]) == ", ,"


# --------------------------------------------------------------------------------------------
# Scoring with fake encoders
# --------------------------------------------------------------------------------------------

VOCAB = [f"tag {i}" for i in range(60)]


class FakeTextEncoder:
    """Each tag has a random direction; templates add a small shared offset. Counts calls."""

    def __init__(self, vocabulary=VOCAB, templates=clip_tags.DEFAULT_TEMPLATES, dim=EMBED_DIM):
        gen = torch.Generator().manual_seed(1)
        self.base = torch.randn(len(vocabulary), dim, generator=gen)
        self.offsets = 0.2 * torch.randn(len(templates), dim, generator=gen)
        self.lookup = {t.format(tag): (i, j) for j, t in enumerate(templates) for i, tag in enumerate(vocabulary)}
        self.calls = 0
        self.texts = 0

    def __call__(self, texts):
        self.calls += 1
        self.texts += len(texts)
        rows = [self.base[i] + self.offsets[j] for i, j in (self.lookup[t] for t in texts)]
        return torch.stack(rows)


def fake_images(*mixtures):
    """Images whose pixel [0, 0, 0] carries their index into `mixtures` (read by the fake)."""
    images = torch.zeros(len(mixtures), 3, 8, 8)
    images[:, 0, 0, 0] = torch.arange(len(mixtures), dtype=torch.float32)
    return images


def fake_image_encoder(text: FakeTextEncoder, mixtures):
    def encode(images):
        rows = []
        for b in range(images.shape[0]):
            weights = mixtures[int(images[b, 0, 0, 0])]
            rows.append(sum(w * F.normalize(text.base[i], dim=0) for i, w in weights.items()))
        return torch.stack(rows)

    return encode


def test_planted_tag_ranks_first_and_is_deterministic():
    text = FakeTextEncoder()
    mixtures = [{17: 1.0}, {42: 1.0, 5: 0.6}]
    scorer = TagScorer(fake_image_encoder(text, mixtures), text, VOCAB)
    images = fake_images(*mixtures)
    per_image = scorer.top_tags(images, top_k=3, threshold=0.0)
    assert per_image[0][0].tag == "tag 17"
    assert [t.tag for t in per_image[1][:2]] == ["tag 42", "tag 5"]
    assert per_image[0][0].score > 3.0  # a planted tag stands out by several standard deviations
    first = format_prompt([t.tag for t in scorer.batch_tags(images[:1])], "x")
    again = TagScorer(fake_image_encoder(text, mixtures), text, VOCAB).batch_tags(images[:1])
    assert first == format_prompt([t.tag for t in again], "x")
    assert first.startswith("tag 17, ") and first.endswith(", x,")


def test_ties_break_in_vocabulary_order():
    text = FakeTextEncoder()
    text.base[30] = text.base[8]  # two tags with one embedding
    scorer = TagScorer(fake_image_encoder(text, [{30: 1.0}]), text, VOCAB)
    tags = scorer.top_tags(fake_images({}), top_k=2, threshold=0.0)[0]
    assert [t.tag for t in tags] == ["tag 8", "tag 30"]


def test_top_k_and_threshold_are_respected():
    text = FakeTextEncoder()
    mixtures = [{1: 1.0, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6}]
    scorer = TagScorer(fake_image_encoder(text, mixtures), text, VOCAB)
    images = fake_images(*mixtures)
    assert len(scorer.top_tags(images, top_k=3, threshold=-100.0)[0]) == 3
    everything = scorer.top_tags(images, top_k=100, threshold=-100.0)[0]
    assert len(everything) == len(VOCAB)
    assert [t.score for t in everything] == sorted((t.score for t in everything), reverse=True)
    threshold = everything[4].score - 1e-3
    kept = scorer.top_tags(images, top_k=100, threshold=threshold)[0]
    assert len(kept) == 5 and all(t.score >= threshold for t in kept)
    assert scorer.top_tags(images, top_k=8, threshold=1e6)[0] == []
    assert format_prompt([t.tag for t in scorer.batch_tags(images, threshold=1e6)], "u") == ", u,"


def test_batch_prompt_ranks_by_mean_score():
    text = FakeTextEncoder()
    mixtures = [{10: 1.0, 11: 0.5}, {11: 1.0, 12: 0.5}]
    scorer = TagScorer(fake_image_encoder(text, mixtures), text, VOCAB)
    images = fake_images(*mixtures)
    scores = scorer.scores(images)
    tags = scorer.batch_tags(images, top_k=3, threshold=0.0)
    assert tags[0].tag == "tag 11"
    expected = scores.score.mean(0)
    assert [t.tag for t in tags] == [VOCAB[i] for i in expected.argsort(descending=True)[:3].tolist()]
    assert [t.tag for t in scorer.batch_tags(images[1:])] == [t.tag for t in scorer.top_tags(images[1:])[0]]


def test_text_embeddings_are_computed_once_per_encoder():
    text = FakeTextEncoder()
    mixtures = [{3: 1.0}]
    first = TagScorer(fake_image_encoder(text, mixtures), text, VOCAB, text_batch=50)
    first.top_tags(fake_images(*mixtures))
    calls = text.calls
    assert calls == 3 and text.texts == 2 * len(VOCAB)  # 120 texts in batches of 50
    first.top_tags(fake_images(*mixtures))
    second = TagScorer(fake_image_encoder(text, mixtures), text, VOCAB)
    second.batch_tags(fake_images(*mixtures))
    assert text.calls == calls
    # another vocabulary or version tag is another cache entry
    TagScorer(None, text, VOCAB[:30]).text_embeddings()
    TagScorer(None, text, VOCAB, cache_tag="lora").text_embeddings()
    assert text.calls == calls + 2


def test_cache_entries_die_with_their_encoder():
    text = FakeTextEncoder()
    TagScorer(None, text, VOCAB).text_embeddings()
    assert len(clip_tags._TEXT_CACHE) == 1
    del text
    gc.collect()
    assert not clip_tags._TEXT_CACHE


def test_broken_encoders_are_reported():
    text = FakeTextEncoder()
    with pytest.raises(ClipTagsError, match="zero or non-finite"):
        TagScorer(None, lambda texts: torch.zeros(len(texts), 4), VOCAB).text_embeddings()
    scorer = TagScorer(lambda images: torch.ones(images.shape[0], EMBED_DIM + 1), text, VOCAB)
    with pytest.raises(ClipTagsError, match="not one CLIP model"):
        scorer.top_tags(fake_images({}))


# --------------------------------------------------------------------------------------------
# Tiny CLIP models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    tinymodels.write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tokenizer_dir):
    """A tiny CLIPModel: OpenCLIP-style (gelu, pre-LN), 3 text layers, both projections 16-d."""
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=TEXT_HEADS,
                         num_hidden_layers=3, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                           image_size=28, patch_size=14, hidden_act="gelu"),
        projection_dim=EMBED_DIM,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # random init leaves norms at 1/0; perturb so a skipped norm is caught
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model, tokenizer


def hf_text_features(model, tokenizer, texts, layer=None):
    """Reference: transformers' own EOT pooling (final layer, final LN) and projection; with
    `layer`, that hidden state instead (to show SD's penultimate layer is a different space)."""
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = model.text_model(input_ids=ids, output_hidden_states=True)
            if layer is None:
                pooled = out.pooler_output
            else:
                hidden = model.text_model.final_layer_norm(out.hidden_states[layer])
                pooled = hidden[:, ids.shape[1] - 1]
            rows.append(model.text_projection(pooled)[0])
    return torch.stack(rows)


def hf_image_features(model, pixels):
    with torch.no_grad():
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def _images(batch=2, height=40, width=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 4, width // 4, generator=gen)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


TEXTS = ["a photo of lighthouse.", "lighthouse", "red", "a photo of wooden floor."]


def test_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    images = _images(1, 50, 80)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    array = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    reference = torch.as_tensor(np.asarray(processor(images=[array], return_tensors="np")["pixel_values"]))
    ours = clip_preprocess(images)
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    assert (ours - reference).abs().mean() < 0.03  # PIL vs torch bicubic + 8-bit rounding


def test_transformers_folder_encoders(tmp_path, tiny_clip, tokenizer_dir):
    model, tokenizer = tiny_clip
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    with pytest.raises(ClipTagsError, match="tokenizer files"):
        transformers_clip_encoders(folder)
    tokenizer.save_pretrained(folder)
    encoders = transformers_clip_encoders(folder)
    expected = hf_text_features(model, tokenizer, TEXTS)
    torch.testing.assert_close(encoders.encode_texts(TEXTS), expected, atol=1e-5, rtol=1e-4)
    images = _images()
    torch.testing.assert_close(encoders.encode_images(images), hf_image_features(model, clip_preprocess(images, 28)),
                               atol=1e-5, rtol=1e-4)
    scorer = encoders.scorer(vocabulary=["lighthouse", "red", "wooden floor", "cat"])
    assert len(scorer.top_tags(images, top_k=2, threshold=-10)[0]) == 2


def test_transformers_folder_missing_files_name_the_folder(tmp_path):
    with pytest.raises(ClipTagsError, match="not found"):
        transformers_clip_encoders(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipTagsError, match=r"empty lacks config\.json, model\.safetensors"):
        transformers_clip_encoders(tmp_path / "empty")


def _open_clip_text_state(model) -> dict[str, torch.Tensor]:
    """The text tower in OpenCLIP keys, as an SD-2.x checkpoint stores it under cond_stage_model.model."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if k.startswith("text_model.")}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": model.text_projection.weight.T.contiguous(), "logit_scale": model.logit_scale}
    layers = model.config.text_config.num_hidden_layers
    for i in range(layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{part}"] = torch.cat([sd[f"{hf}self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[f"{oc}attn.out_proj.{part}"] = sd[f"{hf}self_attn.out_proj.{part}"]
            out[f"{oc}ln_1.{part}"] = sd[f"{hf}layer_norm1.{part}"]
            out[f"{oc}ln_2.{part}"] = sd[f"{hf}layer_norm2.{part}"]
            out[f"{oc}mlp.c_fc.{part}"] = sd[f"{hf}mlp.fc1.{part}"]
            out[f"{oc}mlp.c_proj.{part}"] = sd[f"{hf}mlp.fc2.{part}"]
    return out


def _comfy_text_state(model) -> dict[str, torch.Tensor]:
    """ComfyUI's SD-2 CLIP state: transformers keys under clip_h.transformer., all layers."""
    state = {f"clip_h.transformer.{k}": v for k, v in model.state_dict().items() if k.startswith("text_model.")}
    state["clip_h.transformer.text_projection.weight"] = model.text_projection.weight
    state["clip_h.logit_scale"] = model.logit_scale
    return state


@pytest.fixture(scope="module")
def vision_file(tmp_path_factory, tiny_clip):
    """The image tower as a single transformers-layout file, like models/clip_vision/*.safetensors."""
    model, _ = tiny_clip
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k.startswith(("vision_model.", "visual_projection."))}
    path = tmp_path_factory.mktemp("clip_vision") / "tiny-vit.safetensors"
    save_file(state, str(path))
    return path


def test_sd2_text_tower_with_openclip_vision_pairs_like_one_clip_model(tiny_clip, tokenizer_dir, vision_file):
    """SD-2's text encoder (OpenCLIP layout in the checkpoint, or ComfyUI's layout) with the
    OpenCLIP image tower gives exactly the CLIP model's own text/image features."""
    model, tokenizer = tiny_clip
    checkpoint = {f"cond_stage_model.model.{k}": v for k, v in _open_clip_text_state(model).items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    checkpoint["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    expected_text = hf_text_features(model, tokenizer, TEXTS)
    images = _images()
    expected_image = hf_image_features(model, clip_preprocess(images, 28))

    vision = load_clip_vision(vision_file, num_attention_heads=4)
    assert vision.image_size == 28 and vision.embed_dim == EMBED_DIM
    for state in (checkpoint, _comfy_text_state(model)):
        pair = sd2_openclip_encoders(state, vision, tokenizer_dir, num_heads=TEXT_HEADS)
        assert pair.encode_texts.num_layers == 3  # every layer, not SD's penultimate cut
        torch.testing.assert_close(pair.encode_texts(TEXTS), expected_text, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pair.encode_images(images), expected_image, atol=1e-5, rtol=1e-4)
    penultimate = hf_text_features(model, tokenizer, TEXTS, layer=-2)
    assert not torch.allclose(penultimate, expected_text, atol=1e-2)

    # a vision path works too, and a pair from different models is refused
    pair = sd2_openclip_encoders(checkpoint, vision_file, tokenizer_dir, num_heads=TEXT_HEADS)
    assert pair.encode_images(images).shape == (2, EMBED_DIM)
    small = dict(checkpoint)
    small["cond_stage_model.model.text_projection"] = checkpoint["cond_stage_model.model.text_projection"][:, :8]
    with pytest.raises(ClipTagsError, match="8 dims but the vision model to 16"):
        sd2_openclip_encoders(small, vision, tokenizer_dir, num_heads=TEXT_HEADS)


def test_text_tower_refuses_missing_or_placeholder_projection(tiny_clip, tokenizer_dir):
    model, _ = tiny_clip
    state = _open_clip_text_state(model)
    without = {k: v for k, v in state.items() if k != "text_projection"}
    with pytest.raises(ClipTagsError, match="no CLIP text tower with a text projection"):
        ClipTextTower(without, tokenizer_dir)
    identity = {**state, "text_projection": torch.eye(32)}
    with pytest.raises(ClipTagsError, match="identity placeholder"):
        ClipTextTower(identity, tokenizer_dir, num_heads=TEXT_HEADS)


def test_text_tower_casts_half_weights_on_cpu(tiny_clip, tokenizer_dir):
    model, tokenizer = tiny_clip
    half = {k: v.half() for k, v in _comfy_text_state(model).items()}
    tower = ClipTextTower(half, tokenizer_dir, num_heads=TEXT_HEADS)
    assert tower.dtype == torch.float32
    torch.testing.assert_close(tower(TEXTS), hf_text_features(model, tokenizer, TEXTS), atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------
# The node, against fakes of CLIP_VISION and CLIP
# --------------------------------------------------------------------------------------------


class FakeComfyTextModel(torch.nn.Module):
    """Holds the tiny HF text model where ComfyUI's SD-2 CLIP keeps clip_h.transformer, with the
    attributes ComfyUI's layers expose (self_attn.heads, mlp.activation)."""

    def __init__(self, model):
        super().__init__()
        from transformers import CLIPTextModelWithProjection

        config = model.config.text_config.__class__(**model.config.text_config.to_dict())
        config.projection_dim = model.config.projection_dim
        text = CLIPTextModelWithProjection(config)
        text.text_model.load_state_dict(model.text_model.state_dict())
        text.text_projection.load_state_dict(model.text_projection.state_dict())
        for layer in text.text_model.encoder.layers:
            layer.self_attn.heads = TEXT_HEADS
            layer.mlp.activation = F.gelu
        self.clip_h = torch.nn.Module()
        self.clip_h.transformer = text.eval()


class FakeCLIP:
    def __init__(self, model, tokenizer, extra_state=None):
        self.cond_stage_model = FakeComfyTextModel(model)
        self.patcher = types.SimpleNamespace(patches_uuid="u1")
        self.tokenizer = tokenizer
        self.loads = 0
        self.pooled_calls = 0
        self.extra_state = extra_state or {}
        self._reference = model

    def load_model(self):
        self.loads += 1
        if self.extra_state:  # e.g. scaled-fp8 markers: the node must fall back to encode_from_tokens
            original = self.cond_stage_model.state_dict
            self.cond_stage_model.state_dict = lambda: {**original(), **self.extra_state}

    def tokenize(self, text):
        return {"h": text}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.pooled_calls += 1
        return None, hf_text_features(self._reference, self.tokenizer, [tokens["h"]])


class FakeCLIPVision:
    def __init__(self, embeds):
        self.embeds = embeds
        self.seen = []

    def encode_image(self, image, crop=True):
        self.seen.append(image.shape)
        return {"image_embeds": self.embeds[: image.shape[0]], "last_hidden_state": None}


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    tinymodels.write_tiny_tokenizer(tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    clip_model = types.ModuleType("comfy.clip_model")
    clip_model.ACTIVATIONS = {"quick_gelu": lambda a: a * torch.sigmoid(1.702 * a), "gelu": F.gelu}
    monkeypatch.setitem(sys.modules, "comfy.clip_model", clip_model)
    monkeypatch.setattr(sys.modules["comfy"], "clip_model", clip_model, raising=False)
    return state


def _planted_embedding(model, tokenizer, tag, vocabulary):
    """The template-ensembled text embedding of `tag`, computed independently of the node."""
    texts = [t.format(tag) for t in clip_tags.DEFAULT_TEMPLATES]
    rows = F.normalize(hf_text_features(model, tokenizer, texts), dim=-1)
    return F.normalize(rows.mean(0), dim=0)


NODE_ARGS = dict(top_k=5, threshold=0.0, user_prompt="my words")


def test_node_returns_the_planted_tag(comfy, tiny_clip, monkeypatch):
    model, tokenizer = tiny_clip
    vocabulary = load_vocabulary()[::8]  # every 8th tag keeps the test fast (the node reads the shipped file)
    if "lighthouse" not in vocabulary:
        vocabulary.append("lighthouse")
    monkeypatch.setattr("onestep_sr.nodes.clip_prompt_node.load_vocabulary", lambda: list(vocabulary))
    planted = _planted_embedding(model, tokenizer, "lighthouse", vocabulary)
    clip = FakeCLIP(model, tokenizer)
    vision = FakeCLIPVision(planted.expand(2, -1))
    image = torch.rand(2, 20, 24, 4)  # RGBA batch: alpha is dropped before CLIP_VISION
    with torch.inference_mode():  # as ComfyUI runs nodes
        (prompt,) = OneStepSRCLIPPromptExtract().extract(image, vision, clip, **NODE_ARGS)
    assert prompt.startswith("lighthouse, ") and prompt.endswith(", my words,")
    assert len(prompt.split(", ")) == 6
    assert vision.seen == [(2, 20, 24, 3)]
    assert clip.loads == 1 and clip.pooled_calls == 0
    assert comfy.progress and comfy.progress[-1][0] == comfy.progress[-1][1]
    # second run: cached vocabulary embeddings, the text encoder is not even loaded
    (again,) = OneStepSRCLIPPromptExtract().extract(image[:1, ..., :1], vision, clip, **NODE_ARGS)
    assert again == prompt and clip.loads == 1
    # a LoRA'd clone (new patches) is another cache entry
    clip.patcher.patches_uuid = "u2"
    OneStepSRCLIPPromptExtract().extract(image[:1], vision, clip, **NODE_ARGS)
    assert clip.loads == 2


def test_node_caches_vocabulary_embeddings_on_disk_per_clip_weights(comfy, tiny_clip, monkeypatch, tmp_path):
    from onestep_sr.nodes import clip_prompt_node

    model, tokenizer = tiny_clip
    vocabulary = load_vocabulary()[::16]
    monkeypatch.setattr(clip_prompt_node, "load_vocabulary", lambda: list(vocabulary))
    planted = _planted_embedding(model, tokenizer, vocabulary[3], vocabulary)
    vision = FakeCLIPVision(planted[None])
    image = torch.rand(1, 8, 8, 3)
    (first,) = OneStepSRCLIPPromptExtract().extract(image, vision, FakeCLIP(model, tokenizer), 3, 0.0, "")
    assert first.startswith(vocabulary[3] + ",") and not first.endswith(", ,")  # no dangling empty part
    assert len(list((tmp_path / "user" / "onestep_sr_cache").glob("clip_tags_*.safetensors"))) == 1

    def must_not_encode(*args, **kwargs):
        def encode(texts):
            raise AssertionError("the vocabulary was encoded again")
        return encode

    clip_tags.clear_text_cache()  # a new ComfyUI session: only the disk cache is left
    monkeypatch.setattr(clip_prompt_node, "comfy_text_encoder", must_not_encode)
    (again,) = OneStepSRCLIPPromptExtract().extract(image, vision, FakeCLIP(model, tokenizer), 3, 0.0, "")
    assert again == first
    other = FakeCLIP(model, tokenizer)  # other weights (e.g. a LoRA merged in): another cache file
    with torch.no_grad():
        other.cond_stage_model.clip_h.transformer.text_projection.weight.mul_(1.01)
    with pytest.raises(AssertionError, match="encoded again"):
        OneStepSRCLIPPromptExtract().extract(image, vision, other, 3, 0.0, "")


def test_prompt_format_without_empty_parts():
    assert clip_tags.format_prompt(["a", "b"], "") == "a, b, ,"  # OSEDiff verbatim (the CLI)
    assert clip_tags.format_prompt(["a", "b"], "", drop_empty=True) == "a, b,"
    assert clip_tags.format_prompt(["a"], " words ", drop_empty=True) == "a, words,"
    assert clip_tags.format_prompt([], "", drop_empty=True) == ""


def test_node_falls_back_to_comfy_pooled_output(comfy, tiny_clip):
    model, tokenizer = tiny_clip
    vocabulary = [f"thing {i}" for i in range(20)] + ["lighthouse"]
    from onestep_sr.nodes.clip_prompt_node import extract_prompt

    planted = _planted_embedding(model, tokenizer, "lighthouse", vocabulary)
    clip = FakeCLIP(model, tokenizer, extra_state={"clip_h.transformer.text_projection.scale_weight": torch.ones(())})
    prompt = extract_prompt(torch.rand(1, 8, 8, 3), FakeCLIPVision(planted[None]), clip, 3, 0.0, "", vocabulary)
    assert prompt.startswith("lighthouse, ") and prompt.endswith(",") and not prompt.endswith(", ,")
    assert clip.pooled_calls == 2 * len(vocabulary)


def test_node_refuses_a_mismatched_pair(comfy, tiny_clip):
    model, tokenizer = tiny_clip
    vision = FakeCLIPVision(torch.randn(1, 7))
    with pytest.raises(ClipTagsError, match="16 dims but the CLIP Vision model to 7"):
        OneStepSRCLIPPromptExtract().extract(torch.rand(1, 8, 8, 3), vision, FakeCLIP(model, tokenizer), **NODE_ARGS)


def test_node_interface():
    types_ = OneStepSRCLIPPromptExtract.INPUT_TYPES()["required"]
    assert list(types_) == ["image", "clip_vision", "clip", "top_k", "threshold", "user_prompt"]
    assert all("tooltip" in spec[1] for spec in types_.values())
    assert types_["top_k"][1]["default"] == 8 and types_["user_prompt"][1]["default"] == ""
    assert OneStepSRCLIPPromptExtract.RETURN_TYPES == ("STRING",)
    assert len(OneStepSRCLIPPromptExtract.OUTPUT_TOOLTIPS) == 1
    assert OneStepSRCLIPPromptExtract.CATEGORY == "image/upscaling/OneStep SR"
    source = Path(clip_tags.__file__).read_text(encoding="utf-8")
    assert "import comfy" not in source and "folder_paths" not in source
