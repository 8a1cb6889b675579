"""Tiled VAE with estimated GroupNorm statistics (bounded memory): the probe grid, the streamed driver
against the exact lockstep one, accuracy, memory that does not grow with the image, and auto's choice
and out-of-memory fallback."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging

import pytest
import torch

from onestep_sr.models import tiled_vae
from onestep_sr.models.tiled_vae import (
    _decoder_part,
    _encoder_part,
    decode_tiled,
    encode_tiled,
    exact_memory_bytes,
)
from onestep_sr.models.vae_tiles import probe_grid, tile_grid


def structured_image(height: int, width: int, seed: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] whose statistics differ by region (a probe sample must cover them):
    smooth gradients, a noisy right part, a dark disc."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([xx, yy, 0.5 * (xx + yy)])
    image = image + (xx > 0.6) * 0.4 * torch.randn(3, height, width, generator=gen)
    image = image * (1 - 0.7 * ((yy - 0.3) ** 2 + (xx - 0.3) ** 2 < 0.04))
    return (image.clamp(0, 1) * 2 - 1)[None]


def mean_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


# 1. The probe grid -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "core", "pad", "count", "multiple"),
    [(512, 512, 56, 11, 22, 1), (4096, 4096, 256, 32, 46, 8), (40, 56, 3, 4, 9, 1), (64, 2000, 16, 8, 30, 8),
     (24, 24, 64, 4, 5, 1), (1792, 2368, 128, 32, 35, 8)],
)
def test_probe_grid_spreads_small_tiles_over_the_image(height, width, core, pad, count, multiple):
    probes = probe_grid(height, width, core, pad, count, snap_multiple=multiple)
    assert 1 <= len(probes) <= count
    assert len({(p.window.height, p.window.width) for p in probes}) == 1  # they stack into batches
    cover = torch.zeros(height, width, dtype=torch.int32)
    for p in probes:
        w, c = p.window, p.core
        assert 0 <= w.top and 0 <= w.left and w.bottom <= height and w.right <= width
        assert w.top <= c.top < c.bottom <= w.bottom and w.left <= c.left < c.right <= w.right
        assert all(v % multiple == 0 for v in (w.top, w.bottom, w.left, w.right, c.top, c.bottom, c.left, c.right))
        assert c.height <= max(core, multiple) and c.width <= max(core, multiple)
        assert c.top == 0 or c.top - w.top >= pad
        assert c.bottom == height or w.bottom - c.bottom >= pad
        cover[c.slices()] += 1
    assert int(cover.max()) == 1  # cores never overlap: no pixel counted twice
    # Spread: the cores reach into every part of the image, not a cluster in one corner.
    rows = sorted({p.core.top for p in probes})
    cols = sorted({p.core.left for p in probes})
    assert rows[0] < height / 2 <= max(p.core.bottom for p in probes) or len(rows) == 1
    assert cols[0] < width / 2 <= max(p.core.right for p in probes) or len(cols) == 1
    if len(rows) > 1:
        assert max(p.core.bottom for p in probes) > height * (1 - 1 / len(rows)) - core


def test_probe_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 8"):
        probe_grid(100, 64, 16, 8, 4, snap_multiple=8)
    with pytest.raises(ValueError, match="count >= 1"):
        probe_grid(64, 64, 16, 8, 0)


# 2. The streamed driver is exact when given the exact statistics ------------------------------------


def test_streamed_run_with_the_exact_statistics_equals_the_lockstep_run(vae64):
    """Record the statistics the lockstep run normalises with, feed them to the streamed driver: the
    outputs must be identical (float64), for a batch of two images whose tiles share batches."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 3, 96, 160, generator=gen, dtype=torch.float64) * 2 - 1)
    z = torch.randn(2, 4, 16, 24, generator=gen, dtype=torch.float64)
    for part, inputs, tiles in (
        (_encoder_part(vae64), x, tile_grid(96, 160, 32, 16, snap_multiple=8)),
        (_decoder_part(vae64), z, tile_grid(16, 24, 8, 4)),
    ):
        recorded = []
        with torch.no_grad():
            exact = tiled_vae._run_lockstep(inputs, tiles, 5, part.run, part.scale, part.n_norms,
                                            stats_hook=lambda *stats, into=recorded: into.append(stats))
            streamed = tiled_vae._run_streamed(inputs, tiles, 5, part.run, part.scale, recorded)
        assert len(recorded) == part.n_norms
        assert torch.allclose(streamed, exact, rtol=0, atol=1e-10)


def test_streamed_run_refuses_statistics_of_another_vae(vae, tiny_base):
    part = _decoder_part(vae)
    z = torch.randn(1, 4, 16, 24)
    tiles = tile_grid(16, 24, 8, 4)
    recorded = []
    with torch.no_grad():
        tiled_vae._run_lockstep(z, tiles, 4, part.run, part.scale, part.n_norms,
                                stats_hook=lambda norm, mean, var: recorded.append((norm, mean, var)))
        other = copy.deepcopy(vae)
        with pytest.raises(RuntimeError, match="do not match"):
            tiled_vae._run_streamed(z, tiles, 4, _decoder_part(other).run, part.scale, recorded)


# 3. Accuracy of the estimate --------------------------------------------------------------------------

# Measured on the structured image (tiny random VAE, mean |err| against untiled, windows = core + pad
# clamped as in the official hook): encoder (tile 96, pad 32) exact 0.034, estimated 0.042, naive
# per-tile 0.147; decoder (tile 16, pad 8) exact 0.030, estimated 0.093, naive 0.184 (output std 0.39);
# tile 12: 0.033 / 0.100 / 0.192. The same at tile_batch 1 and 4: the probes are set by the image.
ENC_EST_TOL, DEC_EST_TOL = 0.06, 0.14


@pytest.fixture(scope="module")
def structured():
    return structured_image(320, 448, seed=0)


def test_estimated_statistics_are_close_to_untiled_and_far_better_than_naive(vae, structured):
    with torch.no_grad():
        reference = vae.encode(structured).latent_dist.parameters
        estimated = encode_tiled(vae, structured, tile_px=96, pad_px=32, norm_stats="estimated")
        tiles = tile_grid(320, 448, 96, 32, snap_multiple=8)
        naive = tiled_vae._encode_lockstep(vae, structured, tiles, shared_stats=False)
        enc_est, enc_naive = mean_error(estimated, reference), mean_error(naive, reference)

        z = reference[:, :4]
        decoded = vae.decode(z).sample
        estimated = decode_tiled(vae, z, tile_latent=16, pad_latent=8, norm_stats="estimated")
        naive = tiled_vae._decode_lockstep(vae, z, tile_grid(40, 56, 16, 8), shared_stats=False)
        dec_est, dec_naive = mean_error(estimated, decoded), mean_error(naive, decoded)
    assert len(tiles) == 12
    assert enc_est < ENC_EST_TOL and enc_est < enc_naive / 3, (enc_est, enc_naive)
    assert dec_est < DEC_EST_TOL and dec_est < dec_naive / 1.8, (dec_est, dec_naive)


def test_probe_coverage_is_set_by_the_image_not_the_tile_batch(vae, structured):
    """tile_batch only decides how many tiles run at once: the probes (and so the statistics and the
    output) are the same at tile_batch 1 and 4 (before, one batch of probes at tile_batch=1 measured
    31 dB on the full-size VAE). float32 is enough: other probes would move the output by about the
    estimate's error (mean 0.08 from exact here), while float32 kernels chosen per batch size measured a
    max difference of 3.5e-5."""
    z = structured[:, :, :320:8, :448:8].mean(1, keepdim=True).expand(1, 4, 40, 56).contiguous()
    tiles = tile_grid(40, 56, 12, 8)
    assert len(tiles) == 8
    with torch.no_grad():
        one, four = (decode_tiled(vae, z, tile_latent=12, pad_latent=8, tile_batch=b, norm_stats="estimated")
                     for b in (1, 4))
    assert torch.allclose(one, four, rtol=0, atol=1e-3)


def test_estimated_statistics_are_per_image(vae):
    x = torch.cat([structured_image(160, 224, 1), 0.3 * structured_image(160, 224, 2) + 0.5])
    options = dict(tile_px=64, pad_px=32, tile_batch=5, norm_stats="estimated")
    with torch.no_grad():
        both = encode_tiled(vae, x, **options)
        alone = torch.cat([encode_tiled(vae, x[i : i + 1], **options) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)


# 4. Memory does not grow with the image -----------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use():
    """glibc's bytes in use (heap + mmapped blocks): what PyTorch's CPU allocator holds right now."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to read the heap in use")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def _peak_while(vae, in_use, run) -> int:
    """Peak heap in use above the starting point, sampled after every convolution of the VAE."""
    start = in_use()
    peak = [start]

    def sample(*_):
        peak[0] = max(peak[0], in_use())

    handles = [m.register_forward_hook(sample) for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            output = run()
    finally:
        for handle in handles:
            handle.remove()
    return peak[0] - start - output.numel() * output.element_size()


def test_estimated_decode_memory_does_not_grow_with_the_image(vae):
    """Decoding 4x the area: the exact run's peak grows with it (measured x3.6, the negative control);
    the estimated run's peak, beyond the output tensor itself, stays within 15%. The planner's estimate
    of the exact run covers what it actually used."""
    in_use = _heap_in_use()
    gen = torch.Generator().manual_seed(0)
    small, large = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 4, 64, 64, generator=gen)
    options = dict(tile_latent=8, pad_latent=2, tile_batch=4)  # 4x4 / 8x8 tiles: full batches in both
    # (measured peaks: exact 30 -> 107 MB, estimated 11.6 -> 10.7 MB)
    peaks = {(mode, z.shape[-1]): _peak_while(vae, in_use, lambda z=z, mode=mode: decode_tiled(
        vae, z, norm_stats=mode, **options)) for mode in ("exact", "estimated") for z in (small, large)}
    assert peaks["exact", 64] > 2.5 * peaks["exact", 32], peaks
    assert peaks["estimated", 64] < 1.15 * peaks["estimated", 32], peaks
    assert peaks["estimated", 64] < peaks["exact", 64] / 4, peaks
    planned = exact_memory_bytes(vae.decoder, True, tile_grid(64, 64, 8, 2), 1, 4, torch.float32)
    assert peaks["exact", 64] <= planned, (peaks, planned)


def test_estimated_encode_memory_does_not_grow_with_the_image(vae):
    in_use = _heap_in_use()
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    large = torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1
    options = dict(tile_px=64, pad_px=16, tile_batch=4)  # 4x4 / 8x8 tiles
    # (measured peaks: exact 20 -> 78 MB, estimated 12.5 -> 7.5 MB)
    peaks = {(mode, x.shape[-1]): _peak_while(vae, in_use, lambda x=x, mode=mode: encode_tiled(
        vae, x, norm_stats=mode, **options)) for mode in ("exact", "estimated") for x in (small, large)}
    assert peaks["exact", 512] > 2.5 * peaks["exact", 256], peaks
    assert peaks["estimated", 512] < 1.15 * peaks["estimated", 256], peaks
    planned = exact_memory_bytes(vae.encoder, False, tile_grid(512, 512, 64, 16, 8), 1, 4, torch.float32)
    assert peaks["exact", 512] <= planned, (peaks, planned)


# 5. auto: the choice, the out-of-memory fallback, progress and interrupts -----------------------------


def test_auto_is_untiled_when_it_fits_and_estimated_when_it_does_not(vae, structured):
    options = dict(tile_px=96, pad_px=32)
    with torch.no_grad():
        untiled = vae.encode(structured).latent_dist.parameters
        estimated = encode_tiled(vae, structured, norm_stats="estimated", **options)
        roomy = encode_tiled(vae, structured, memory_budget=2**40, **options)
        tight = encode_tiled(vae, structured, memory_budget=2**20, **options)
    assert (roomy - untiled).abs().max() <= 1e-5 * untiled.abs().max()
    assert torch.equal(tight, estimated)


def test_auto_retries_with_estimated_statistics_after_out_of_memory(vae, monkeypatch, caplog):
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(5))
    options = dict(tile_latent=12, pad_latent=4, tile_batch=1)  # 6 tiles: more than one batch
    with torch.no_grad():
        estimated = decode_tiled(vae, z, norm_stats="estimated", **options)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tiled_vae, "_run_lockstep", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="onestep_sr"), torch.no_grad():
        retried = decode_tiled(vae, z, memory_budget=2**40, **options)
    assert torch.equal(retried, estimated)
    assert "retrying with estimated" in caplog.text
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        decode_tiled(vae, z, norm_stats="exact", **options)  # asked for exact: no silent change


def test_estimated_runs_exact_when_all_tiles_fit_in_one_batch(vae):
    """Streaming would hold tile_batch windows anyway (and the probe pass up to PROBE_MAX_WINDOWS): the
    exact statistics cost nothing more."""
    assert tiled_vae.PROBE_MAX_WINDOWS < 6
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(7))
    options = dict(tile_latent=12, pad_latent=4)  # 6 tiles
    with torch.no_grad():
        exact = decode_tiled(vae, z, tile_batch=6, norm_stats="exact", **options)
        one_batch = decode_tiled(vae, z, tile_batch=6, norm_stats="estimated", **options)
        streamed = decode_tiled(vae, z, tile_batch=2, norm_stats="estimated", **options)
    assert torch.equal(one_batch, exact) and not torch.equal(streamed, exact)


def test_unknown_mode_is_refused(vae):
    with pytest.raises(ValueError, match="norm_stats must be one of auto, exact, estimated"):
        decode_tiled(vae, torch.zeros(1, 4, 24, 40), tile_latent=16, pad_latent=4, norm_stats="fast")


def test_streamed_progress_and_interrupt(vae):
    z = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(6))
    total = 2 * len(tile_grid(24, 40, 12, 4))
    calls = []
    with torch.no_grad():
        decode_tiled(vae, z, tile_latent=12, pad_latent=4, tile_batch=2, norm_stats="estimated",
                     progress=lambda done, of: calls.append((done, of)))
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == total // 2  # one report per finished batch

    class Interrupted(Exception):
        pass

    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:
            raise Interrupted

    with pytest.raises(Interrupted), torch.no_grad():
        decode_tiled(vae, z, tile_latent=12, pad_latent=4, norm_stats="estimated", check_interrupt=check)
