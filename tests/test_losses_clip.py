"""CLIP objectives (Hero-SR OWMS, VPD-SR semantic supervision) and frozen feature-network loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onestep_sr.models.clip_tags import clip_preprocess
from onestep_sr.training.losses.feature_nets import FeatureNetworkError, load_clip
from onestep_sr.training.losses.owms import (
    DEFAULT_QUALITY_PAIRS,
    ImageSemanticAlignmentLoss,
    TextPerceptualAlignmentLoss,
)
from onestep_sr.training.losses.vpd_semantic import CLIPSemanticSupervisionLoss

import training_fixtures as tf


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + character-level tokenizer saved as a transformers folder."""
    return tf.write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


def _images(batch=2, size=40, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=gen) * 2 - 1
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return x.requires_grad_(grad)


def _reference_logits(model, tokenizer, images, texts):
    """transformers' own CLIPModel.forward: logits_per_image = exp(logit_scale) * cos(image, text)."""
    pixels = clip_preprocess((images + 1) / 2, size=model.config.vision_config.image_size)
    batch = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)
    return out.logits_per_image, out.image_embeds


def test_loading_is_frozen_and_in_eval(clip):
    model, tokenizer = clip
    assert tokenizer is not None and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_files_are_named_with_their_folder(tmp_path, clip_dir):
    with pytest.raises(FeatureNetworkError, match="CLIP model folder not found: nowhere"):
        load_clip(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureNetworkError, match=r"config.json not found in .*empty"):
        load_clip(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(FeatureNetworkError, match=r"model.safetensors .*not found in .*empty"):
        load_clip(tmp_path / "empty")


def test_text_alignment_cosine_mode_matches_clip_cosines(clip):
    model, tokenizer = clip
    images = _images()
    positives = [p for p, _ in DEFAULT_QUALITY_PAIRS]
    logits, _ = _reference_logits(model, tokenizer, images, positives)
    cosines = logits / model.logit_scale.exp()
    loss = TextPerceptualAlignmentLoss.from_texts(model, tokenizer, mode="cosine", reduction="none")
    torch.testing.assert_close(loss(images), (1 - cosines).mean(dim=1), rtol=1e-4, atol=1e-5)


def test_text_alignment_antonym_mode_matches_pairwise_softmax(clip):
    model, tokenizer = clip
    images = _images(seed=1)
    texts = [t for pair in DEFAULT_QUALITY_PAIRS for t in pair]  # pos0, neg0, pos1, neg1, ...
    logits, _ = _reference_logits(model, tokenizer, images, texts)
    pos, neg = logits[:, 0::2], logits[:, 1::2]
    p_good = pos.exp() / (pos.exp() + neg.exp())
    loss = TextPerceptualAlignmentLoss.from_texts(model, tokenizer, reduction="none")
    torch.testing.assert_close(loss(images), (1 - p_good).mean(dim=1), rtol=1e-4, atol=1e-5)
    # An explicit temperature replaces CLIP's logit scale.
    warm = TextPerceptualAlignmentLoss.from_texts(model, tokenizer, temperature=0.5, reduction="none")
    cos_p, cos_n = pos / model.logit_scale.exp(), neg / model.logit_scale.exp()
    expected = (1 - torch.sigmoid((cos_p - cos_n) / 0.5)).mean(dim=1)
    torch.testing.assert_close(warm(images), expected, rtol=1e-4, atol=1e-5)


def test_content_texts_add_their_cosine_term(clip):
    model, tokenizer = clip
    images = _images(seed=2)
    captions = ["a red house.", "two dogs."]
    logits, _ = _reference_logits(model, tokenizer, images, captions)
    own = torch.diagonal(logits / model.logit_scale.exp())
    plain = TextPerceptualAlignmentLoss.from_texts(model, tokenizer, mode="cosine", reduction="none")
    with_content = TextPerceptualAlignmentLoss.from_texts(model, tokenizer, mode="cosine", content_weight=0.5,
                                                          reduction="none")
    from onestep_sr.training.losses.feature_nets import clip_text_embeds

    content = clip_text_embeds(model, tokenizer, captions)
    torch.testing.assert_close(with_content(images, content) - plain(images), 0.5 * (1 - own), rtol=1e-4, atol=1e-5)


def test_image_alignment_matches_clip_embedding_cosine_and_trains_only_the_image(clip):
    model, tokenizer = clip
    sr, gt = _images(seed=3, grad=True), _images(seed=4)
    _, emb_sr = _reference_logits(model, tokenizer, sr.detach(), ["x"])
    _, emb_gt = _reference_logits(model, tokenizer, gt, ["x"])
    loss_fn = ImageSemanticAlignmentLoss(model)
    loss = loss_fn(sr, gt)
    torch.testing.assert_close(loss, (1 - (emb_sr * emb_gt).sum(-1)).mean(), rtol=1e-4, atol=1e-5)
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert float(loss_fn(gt, gt)) == pytest.approx(0.0, abs=1e-6)


def test_semantic_supervision_matches_explicit_token_cosines(clip):
    model, _ = clip
    sr, target = _images(seed=5), _images(seed=6)

    def states(images):
        pixels = clip_preprocess((images + 1) / 2, size=28)
        with torch.no_grad():
            out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
            return out.hidden_states, model.visual_projection(out.pooler_output)

    (hs_s, e_s), (hs_t, e_t) = states(sr), states(target)

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    expected = (0.5 * (1 - cos(hs_s[1], hs_t[1])).mean(1) + 2.0 * (1 - cos(hs_s[3], hs_t[3])).mean(1)
                + 0.3 * (1 - cos(e_s, e_t)))
    loss = CLIPSemanticSupervisionLoss(model, layers=(1, -1), layer_weights=(0.5, 2.0), embed_weight=0.3,
                                       reduction="none")
    torch.testing.assert_close(loss(sr, target), expected, rtol=1e-4, atol=1e-5)
    mse = CLIPSemanticSupervisionLoss(model, layers=(2,), embed_weight=0.0, distance="mse", reduction="none")
    torch.testing.assert_close(mse(sr, target), ((hs_s[2] - hs_t[2]) ** 2).mean(dim=(1, 2)), rtol=1e-4, atol=1e-6)
    assert float(loss(target, target).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="outside 1..3"):
        CLIPSemanticSupervisionLoss(model, layers=(4,))


def test_train_mode_keeps_the_feature_network_in_eval(clip):
    model, tokenizer = clip
    wrapper = torch.nn.ModuleDict({"owms": ImageSemanticAlignmentLoss(model),
                                   "ess": CLIPSemanticSupervisionLoss(model)})
    wrapper.train()
    assert wrapper["owms"].training and not model.training
