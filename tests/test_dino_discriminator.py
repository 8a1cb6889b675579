"""The vision-aided DINO discriminator (training/losses/dino_discriminator.py) against independent
computations: the ViT blocks against torch's TransformerEncoderLayer, the loss against the BCE formula,
DiffAugment's translation/cutout against the official index arithmetic, head shapes, freezing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onestep_sr.training.feature_networks import FeatureNetworkMissing
from onestep_sr.training.losses.dino_discriminator import (
    DinoDiscriminator,
    DinoViT,
    _shift,
    diff_augment,
    discriminator_fake_loss,
    discriminator_loss,
    discriminator_real_loss,
    generator_adversarial_loss,
    multilevel_sigmoid_loss,
)


def _reference_intermediate(vit: DinoViT, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The same ViT through torch's own pre-norm TransformerEncoderLayer / MultiheadAttention."""
    dim = vit.norm.normalized_shape[0]
    tokens = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=vit.patch_embed.proj.stride)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + vit.pos_embed
    out = []
    for i, block in enumerate(vit.blocks):
        layer = nn.TransformerEncoderLayer(dim, block.attn.heads, block.mlp.fc1.out_features, dropout=0.0,
                                           activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
            layer.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
            layer.self_attn.out_proj.weight.copy_(block.attn.proj.weight)
            layer.self_attn.out_proj.bias.copy_(block.attn.proj.bias)
            for mine, theirs in ((block.norm1, layer.norm1), (block.norm2, layer.norm2)):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
            layer.linear1.load_state_dict(block.mlp.fc1.state_dict())
            layer.linear2.load_state_dict(block.mlp.fc2.state_dict())
        layer = layer.to(tokens.dtype).train()  # dropout 0; the slow path: plain MHA + LayerNorm
        tokens = layer(tokens)
        if len(vit.blocks) - i <= n:
            out.append(F.layer_norm(tokens, (dim,), vit.norm.weight, vit.norm.bias, 1e-6))
    return out


def test_vit_matches_torch_transformer_layers():
    vit = DinoDiscriminator.tiny(dim=32, heads=4).backbone.double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        ours, ref = vit.intermediate(x, 8), _reference_intermediate(vit, x, 8)
    assert len(ours) == 8
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_levels_and_logit_shapes_and_preprocessing():
    d = DinoDiscriminator.tiny(diffaug=False).eval()
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    feats = d.features(images)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 14, 14), (2, 16, 14, 14), (2, 16)]
    # independent: preprocess by hand, take blocks 5, 9, 12 of 12 through the final norm
    x = F.interpolate(images * 0.5 + 0.5, size=(224, 224), mode="area")
    x = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = _reference_intermediate(d.backbone, x, 12)
    torch.testing.assert_close(feats[0], ref[4][:, 1:].transpose(1, 2).reshape(2, 16, 14, 14), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[1], ref[8][:, 1:].transpose(1, 2).reshape(2, 16, 14, 14), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[2], ref[11][:, 0], rtol=1e-4, atol=1e-5)
    logits = d(images)
    # 14 -> blur (pad 2, k4) 15 -> conv3 s2 7 -> blur (pad 1, k4) 6 -> conv1 s2 3
    assert [tuple(t.shape) for t in logits] == [(2, 3, 3), (2, 3, 3), (2, 1)]


def test_blurpool_is_the_normalised_binomial_filter():
    d = DinoDiscriminator.tiny()
    blur = d.heads.maps[0][0]
    x = torch.randn(1, 16, 14, 14)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    kernel = (taps[:, None] * taps[None, :]).expand(16, 1, 4, 4)
    torch.testing.assert_close(blur(x), F.conv2d(F.pad(x, [2, 2, 2, 2]), kernel, groups=16))


def test_multilevel_sigmoid_s_against_the_bce_formula():
    logits = [torch.randn(3, 3, 3), torch.randn(3, 3, 3), torch.randn(3, 1)]

    def bce(z, t):
        return -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))

    for target in (0.8, 0.0):
        expected = sum(bce(z, target).reshape(3, -1).mean(1) for z in logits)
        torch.testing.assert_close(multilevel_sigmoid_loss(logits, target), expected, rtol=1e-5, atol=1e-6)


def test_losses_use_the_published_targets():
    d = DinoDiscriminator.tiny(diffaug=False)
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d.eval()  # spectral norm's power iteration is frozen in eval: the three calls see one weight
    with torch.no_grad():
        lr, lf, lg = (multilevel_sigmoid_loss(d(real), 0.8).mean(), multilevel_sigmoid_loss(d(fake), 0.0).mean(),
                      multilevel_sigmoid_loss(d(fake), 0.8).mean())
        torch.testing.assert_close(discriminator_real_loss(d, real), lr)
        torch.testing.assert_close(discriminator_fake_loss(d, fake), lf)
        torch.testing.assert_close(discriminator_loss(d, real, fake), lr + lf)
    torch.testing.assert_close(generator_adversarial_loss(d, fake).detach(), lg)


def test_generator_loss_reaches_the_image_but_not_the_discriminator():
    d = DinoDiscriminator.tiny()
    fake = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    generator_adversarial_loss(d, fake, [torch.Generator().manual_seed(i) for i in range(2)]).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    heads = [p for p in d.heads.parameters()]
    assert heads and all(p.requires_grad for p in heads)  # restored afterwards
    assert not any(p.requires_grad for p in d.backbone.parameters())
    discriminator_real_loss(d, fake).backward()
    assert all(p.grad is not None for p in heads)
    assert all(p.grad is None for p in d.backbone.parameters())


def test_backbone_stays_in_eval_mode():
    d = DinoDiscriminator.tiny().train()
    assert d.heads.training and not d.backbone.training


def test_diff_augment_geometry_against_the_official_indexing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 12, generator=g)
    for dy, dx in ((0, 0), (2, -1), (-3, 4), (9, 0)):
        # rand_translation: pad by one zero, index clamp(i + t + 1, 0, H + 1)
        padded = F.pad(x, [1, 1, 1, 1])
        rows = torch.clamp(torch.arange(10) + dy + 1, 0, 11)
        cols = torch.clamp(torch.arange(12) + dx + 1, 0, 13)
        expected = padded[:, rows][:, :, cols]
        torch.testing.assert_close(_shift(x, dy, dx), expected)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    a = diff_augment(images, gens)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    assert torch.equal(a, diff_augment(images, gens))
    one = diff_augment(images[1:], [torch.Generator().manual_seed(6)])
    torch.testing.assert_close(a[1:], one)  # per-sample draws: a split batch draws the same
    zero_rows = (a == 0).all(dim=1)  # the cutout (half the size) zeroes at least a quarter-size block
    assert zero_rows.flatten(1).sum(1).min() >= 4 * 4


def test_missing_dino_file_names_it_and_the_folder(tmp_path):
    with pytest.raises(FeatureNetworkMissing, match=r"dino_vitbase16_pretrain\.pth.*" + str(tmp_path.name)):
        DinoDiscriminator.from_folder(tmp_path)


def test_loads_the_published_key_layout(tmp_path):
    source = DinoViT(dim=64, depth=12, heads=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.11.mlp.fc2.bias", "norm.weight"} <= set(state)
    torch.save(state, tmp_path / "dino_vitbase16_pretrain.pth")
    d = DinoDiscriminator.from_folder(tmp_path)
    assert d.backbone.blocks[0].attn.heads == 1 and len(d.backbone.blocks) == 12
    assert all(torch.equal(d.backbone.state_dict()[k], v) for k, v in state.items())
    assert not d.backbone.training and not any(p.requires_grad for p in d.backbone.parameters())
    assert math.isfinite(float(discriminator_loss(d, torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)).detach()))
