"""Latent tiling: official grid/weights, batching invariance, and tiled vs untiled UNet."""

from __future__ import annotations

import math

import torch

from onestep_sr.pipelines.latent_tiling import gaussian_tile_weights, latent_tile_grid, tiled_eps


def test_weights_match_the_official_formula_by_hand():
    size = 4
    weights = gaussian_tile_weights(size, torch.float64)
    var = 0.01

    def g(v, mid):
        return math.exp(-((v - mid) ** 2) / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)

    for y in range(size):
        for x in range(size):
            assert math.isclose(weights[y, x].item(), g(y, size / 2) * g(x, (size - 1) / 2), rel_tol=1e-12)
    assert torch.equal(weights[:, 0], weights[:, 3])  # x centre (T-1)/2: symmetric across the tile
    assert not torch.equal(weights[0], weights[3])  # y centre T/2: the upstream asymmetry


def test_grid_matches_official_layout():
    assert latent_tile_grid(96, 96, 96, 32) == []  # fits: no tiling
    grid = latent_tile_grid(100, 200, 96, 32)
    xs = sorted({t.x for t in grid})
    ys = sorted({t.y for t in grid})
    assert xs == [0, 64, 104]  # stride 64, last snapped to 200 - 96
    assert ys == [0, 4]
    assert all(t.size == 96 for t in grid)
    thin = latent_tile_grid(40, 400, 96, 32)
    assert {t.size for t in thin} == {40}  # tile side shrinks to the short side


def test_tiled_equals_untiled_for_a_pointwise_model():
    """With an eps that is pointwise in the latent, blending must reproduce it exactly."""
    latent = torch.randn(2, 4, 50, 70)

    def pointwise(x, _index):
        return torch.tanh(x) * 3

    tiled = tiled_eps(latent, pointwise, tile=24, overlap=8, tile_batch=5)
    assert torch.allclose(tiled, pointwise(latent, None), atol=1e-6)


def test_tile_batch_does_not_change_result_and_indices_are_passed():
    latent = torch.randn(2, 4, 40, 56)
    seen = []

    def eps(x, index):
        seen.extend(index.tolist())
        return x * (index.float() + 1).view(-1, 1, 1, 1)

    one = tiled_eps(latent, eps, tile=16, overlap=4, tile_batch=1)
    assert sorted(set(seen)) == [0, 1]
    many = tiled_eps(latent, eps, tile=16, overlap=4, tile_batch=7)
    assert torch.allclose(one, many, atol=1e-6)
    assert torch.allclose(one[1], 2 * latent[1], atol=1e-5)


def test_tiled_unet_close_to_untiled(tiny_base):
    """The real (tiny) UNet: tiling is an approximation near seams; state the tolerance."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 48, 64, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)

    def eps(x, index):
        with torch.no_grad():
            return tiny_base.unet(x, 999, encoder_hidden_states=text[index]).sample

    full = eps(latent, torch.tensor([0]))
    tiled = tiled_eps(latent, eps, tile=32, overlap=16, tile_batch=3)
    relative = (tiled - full).norm() / full.norm()
    # A UNet's receptive field spans the tile, so seams differ; with half-tile overlap the
    # Gaussian blend keeps the global error small. The tiny random UNet measures 0.089.
    assert relative < 0.15, relative
