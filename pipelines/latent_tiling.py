"""Latent tiling of the single UNet pass, with the Gaussian blending the official code uses.

Grid and weights follow OSEDiff/S3Diff/Hero-SR: square tiles of side min(tile, h, w), stride
tile - overlap, the last row/column snapped to the border; each tile's noise prediction is weighted
by a separable Gaussian (var 0.01 on coordinates normalised by the tile size; the x centre is
(T-1)/2 but the y centre is T/2 - an upstream quirk we keep so results match), and the weighted sum
is normalised. Tiling only happens when h*w > tile^2. Unlike upstream, tiles run in batches so the
UNet weights are read once per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps(latent_tiles, image_index) -> noise prediction; image_index says which image each tile is from."""


@dataclass(frozen=True)
class LatentTile:
    y: int
    x: int
    size: int


def gaussian_tile_weights(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(size, size) blending weights, exactly the official `_gaussian_weights` for a square tile."""
    var = 0.01
    coords = torch.arange(size, dtype=torch.float64)

    def profile(midpoint: float) -> torch.Tensor:
        return torch.exp(-((coords - midpoint) ** 2) / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)

    weights = torch.outer(profile(size / 2), profile((size - 1) / 2))  # rows use H/2, columns (W-1)/2
    return weights.to(dtype=dtype, device=device)


def _offsets(length: int, size: int, overlap: int) -> list[int]:
    count = 0
    end = 0
    while end < length:
        end = max(count * size - overlap * count, 0) + size
        count += 1
    offsets = [max(i * size - overlap * i, 0) for i in range(count)]
    offsets[-1] = length - size
    return offsets


def latent_tile_grid(height: int, width: int, tile: int, overlap: int) -> list[LatentTile]:
    """The official grid; a single full tile when h*w <= tile^2 (no tiling)."""
    if height * width <= tile * tile:
        return []
    size = min(tile, height, width)
    if overlap >= size:
        raise ValueError(f"latent tile overlap {overlap} must be smaller than the tile size {size}")
    return [LatentTile(y, x, size) for x in _offsets(width, size, overlap) for y in _offsets(height, size, overlap)]


def tiled_eps(
    latent: torch.Tensor,
    eps_fn: EpsFn,
    tile: int = 96,
    overlap: int = 32,
    tile_batch: int = 4,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Noise prediction for the whole latent, tiled with Gaussian blending when it is large.

    `on_tile(done, total)` is called after each batch of tiles (progress and interrupt checks).
    """
    batch, _, height, width = latent.shape
    grid = latent_tile_grid(height, width, tile, overlap)
    indices = torch.arange(batch, device=latent.device)
    if not grid:
        eps = eps_fn(latent, indices)
        if on_tile:
            on_tile(1, 1)
        return eps
    size = grid[0].size
    weights = gaussian_tile_weights(size, torch.float32, latent.device)
    total = torch.zeros(latent.shape, dtype=torch.float32, device=latent.device)
    norm = torch.zeros((1, 1, height, width), dtype=torch.float32, device=latent.device)
    jobs = [(image, t) for image in range(batch) for t in grid]
    per_batch = max(1, tile_batch)
    for start in range(0, len(jobs), per_batch):
        chunk = jobs[start : start + per_batch]
        tiles = torch.cat([latent[i : i + 1, :, t.y : t.y + size, t.x : t.x + size] for i, t in chunk])
        eps = eps_fn(tiles, indices[[i for i, _ in chunk]]).float()
        for (image, t), tile_eps in zip(chunk, eps, strict=True):
            total[image, :, t.y : t.y + size, t.x : t.x + size] += tile_eps * weights
        if on_tile:
            on_tile(min(start + per_batch, len(jobs)), len(jobs))
    for t in grid:
        norm[..., t.y : t.y + size, t.x : t.x + size] += weights
    return (total / norm).to(latent.dtype)
