"""HF-Diff distribution matching: Jensen-Shannon divergence in DINOv2 space."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

from onestep_sr.training.losses.feature_nets import FeatureNetworkError, load_dinov2
from onestep_sr.training.losses.js_distribution import (
    DinoJSDistributionLoss,
    js_divergence,
    js_divergence_from_logits,
)


def test_js_closed_forms():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    disjoint_p, disjoint_q = torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.7])
    assert float(js_divergence(disjoint_p, disjoint_q)) == pytest.approx(math.log(2), rel=1e-6)
    # p = (1, 0), q = (1/2, 1/2): M = (3/4, 1/4); KL(p||M) = ln(4/3), KL(q||M) = (1/2) ln(4/3).
    value = js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert float(value) == pytest.approx(0.75 * math.log(4 / 3), rel=1e-6)
    # symmetric, and batched along the last dimension
    a, b = torch.rand(4, 7).softmax(-1), torch.rand(4, 7).softmax(-1)
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))


def test_log_space_version_agrees_and_stays_finite():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    torch.testing.assert_close(js_divergence_from_logits(x, y),
                               js_divergence(x.double().softmax(-1), y.double().softmax(-1)).float(),
                               rtol=1e-5, atol=1e-7)
    far = js_divergence_from_logits(torch.tensor([[500.0, 0.0]]), torch.tensor([[0.0, 500.0]]))
    assert float(far) == pytest.approx(math.log(2), rel=1e-6)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(5)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def _reference_embeds(model, images, size):
    """Independent preprocessing + the model's own pooler (final-LN CLS token)."""
    x = F.interpolate((images + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x).pooler_output


def test_dino_loss_matches_explicit_js_and_trains_only_the_image(dino_dir):
    model = load_dinov2(dino_dir)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    sr = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_(True)
    gt = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    loss_fn = DinoJSDistributionLoss(model, temperature=0.5, size=28, reduction="none")
    values = loss_fn(sr, gt)
    p = (_reference_embeds(model, gt, 28).double() / 0.5).softmax(-1)
    q = (_reference_embeds(model, sr.detach(), 28).double() / 0.5).softmax(-1)
    torch.testing.assert_close(values, js_divergence(p, q).float(), rtol=1e-4, atol=1e-7)
    values.sum().backward()
    assert sr.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    assert float(loss_fn(gt, gt).abs().max()) < 1e-6


def test_missing_dinov2_folder_is_named(tmp_path):
    with pytest.raises(FeatureNetworkError, match="DINOv2 model folder not found: dino"):
        load_dinov2(tmp_path / "dino")
