"""The memory model of the VAE forward, checked on meta tensors with the full-size SD-2.1 VAE (no memory,
no weights, milliseconds): the model against the traced peak, our forward against diffusers', exact
tiling never above diffusers' untiled peak at default tiles, no float32 copy of a whole tile for the
statistics, and the window area against the official OSEDiff hook's geometry."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL

from onestep_sr.gpu_kernels import group_norm as gn
from onestep_sr.models import tiled_vae
from onestep_sr.models.base_models import load_config
from onestep_sr.models.vae_memory import MetaPeak, forward_profile, lockstep_bytes, untiled_bytes
from onestep_sr.models.vae_tiles import tile_grid


@pytest.fixture(scope="module")
def meta_vae():
    with torch.device("meta"):
        return AutoencoderKL(**load_config("sd21_base", "vae")).eval()


def traced(run) -> int:
    with torch.no_grad(), MetaPeak() as peak:
        out = run()
        del out
    return peak.peak


# Decoder at 64 latent px: on meta tensors attention takes the math path (an L x L matrix, not what
# flash / memory-efficient SDPA allocate on a GPU), negligible at this size only.
PARTS = {"decoder": (True, 4, 64, 11), "encoder": (False, 3, 512, 32)}  # decoder, channels, input side, pad


@pytest.mark.parametrize("name", list(PARTS))
def test_model_matches_the_traced_peak_and_beats_diffusers(meta_vae, name):
    decoder, channels, side, pad = PARTS[name]
    part = tiled_vae._decoder_part(meta_vae) if decoder else tiled_vae._encoder_part(meta_vae)
    x = torch.empty(1, channels, side, side, device="meta")
    diffusers_peak = traced(lambda: (meta_vae.decoder if decoder else meta_vae.encoder)(x))
    ours = traced(lambda: tiled_vae._tiled_forward(part, x, side, 0, 4, "exact", None, None, None))
    profile = forward_profile(part.module, decoder, side * side)
    planned = untiled_bytes(profile, 1, side, side, 4, torch.float32, planning=1)
    # Measured per pixel (float32 elements): decoder 512 ours vs 768 diffusers, encoder 387 vs 640: in-place SiLU and normalisation, the shortcut first, no input kept by a caller's frame,
    # the upsampler in strips.
    assert ours <= 0.7 * diffusers_peak, (ours, diffusers_peak)
    assert 0.95 * ours <= planned <= 1.1 * ours, (planned, ours)

    tiles = tile_grid(side, side, side // 2 - pad, pad, snap_multiple=part.multiple)  # forced 2x2
    exact = traced(lambda: tiled_vae._run_lockstep(x, tiles, 4, part.run, part.scale, part.n_norms))
    planned = lockstep_bytes(profile, tiled_vae._window_px(tiles, 1), tiled_vae._largest_batch_px(1, tiles, 4),
                             torch.float32, planning=1)
    assert len(tiles) == 4 and 0.95 * exact <= planned <= 1.1 * exact, (planned, exact)


def test_exact_tiling_at_default_tiles_stays_below_the_untiled_diffusers_peak(meta_vae):
    """A 2048-px decode (latent 256) at the default tiles (224 + 11): 2x2 windows of 139 latent px."""
    part = tiled_vae._decoder_part(meta_vae)
    z = torch.empty(1, 4, 256, 256, device="meta")
    tiles = tile_grid(256, 256, 224, 11)
    diffusers_peak = traced(lambda: meta_vae.decoder(z))
    exact = traced(lambda: tiled_vae._run_lockstep(z, tiles, 4, part.run, part.scale, part.n_norms))
    assert len(tiles) == 4 and exact < diffusers_peak, (exact, diffusers_peak)


def test_statistics_never_copy_a_whole_tile_to_float32():
    """A 1024-px tile of the decoder's widest stage in bf16 (2 GiB in float32). On meta tensors var_mean
    is decomposed (its temporaries count too), so the bound is a few chunks, far below one tile."""
    h = torch.empty(1, 512, 1024, 1024, device="meta", dtype=torch.bfloat16)
    with MetaPeak() as peak:
        gn.core_stats(h, [(slice(11, 1013), slice(0, 1013))], 32)
    tile_fp32 = 512 * 1024 * 1024 * 4
    assert peak.peak < tile_fp32 / 4, peak.peak


def _hook_windows(size: int, tile: int, pad: int) -> list[tuple[int, int]]:
    """Window spans along one axis of the official OSEDiff hook (my_utils/vaehook.py, split_tiles),
    re-derived here from its description: ceil((size - 2 pad) / tile) tiles of ceil((size - 2 pad) / n)
    rounded up by get_best_tile_size, each input bbox grown by pad and clamped."""
    n = max(1, math.ceil((size - 2 * pad) / tile))
    real = math.ceil((size - 2 * pad) / n)
    divider = 32
    while divider >= 2:  # get_best_tile_size(real, tile)
        if real % divider == 0:
            break
        candidate = real - real % divider + divider
        if candidate <= tile:
            real = candidate
            break
        divider //= 2
    spans = []
    for i in range(n):
        start, stop = pad + i * real, min(pad + (i + 1) * real, size)
        spans.append((max(0, start - pad), min(size, stop + pad)))
    return spans


@pytest.mark.parametrize(("size", "tile", "pad", "multiple"), [
    (2048, 1024, 32, 8), (4096, 1024, 32, 8), (2400, 1024, 32, 8), (1536, 1024, 32, 8),  # encoder, px
    (256, 224, 11, 1), (512, 224, 11, 1), (300, 224, 11, 1), (48, 24, 11, 1),  # decoder, latent px
])
def test_window_area_is_at_most_the_official_hooks(size, tile, pad, multiple):
    ours = sum(t.window.height * t.window.width for t in tile_grid(size, size, tile, pad, snap_multiple=multiple))
    spans = _hook_windows(size, tile, pad)
    hook = sum((b - a) for a, b in spans) ** 2
    assert ours <= hook, (ours, hook)
