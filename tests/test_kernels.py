"""The Triton GroupNorm kernels against independent float64 references: per-tile statistics (count,
mean, M2) against a two-pass float64 computation and Chan's combination against the whole image;
normalisation with given statistics fused with SiLU and a residual add; odd shapes (group sizes not a
power of two, 1-px cores at a tile border), NCHW and channels-last, fp16/bf16/fp32; and the tiled VAE
with the kernels against the tiled VAE without them.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before Triton
compiles anything) on CPU tensors; on a CUDA/ROCm machine they run compiled on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from onestep_sr.gpu_kernels import group_norm as gn  # noqa: E402
from onestep_sr.models.tiled_vae import decode_tiled, encode_tiled  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One unit in the last place of each dtype (relative): the kernels round once, on the final write.
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.fixture
def kernels_on():
    if not gn.triton_available():
        pytest.skip("Triton cannot run here")
    previous = gn.set_kernels("on")
    yield
    gn.set_kernels(previous)


def _cores(h: torch.Tensor) -> list[tuple[slice, slice]]:
    """Cores of different sizes per batch element, including a 1-px core in the last row/column."""
    n, _, height, width = h.shape
    choices = [(slice(1, height - 1), slice(0, width)), (slice(height - 1, height), slice(width - 1, width)),
               (slice(0, height), slice(min(2, width - 1), width)), (slice(0, 1), slice(0, width))]
    return [choices[i % len(choices)] for i in range(n)]


def _reference_stats(h: torch.Tensor, cores, groups: int):
    """Two-pass float64 count, mean and M2 per tile and group."""
    counts, means, m2s = [], [], []
    for i, (rows, cols) in enumerate(cores):
        core = h[i, :, rows, cols].double().unflatten(0, (groups, -1)).flatten(1)
        mean = core.mean(1)
        counts.append(float(core.shape[1]))
        means.append(mean)
        m2s.append(((core - mean[:, None]) ** 2).sum(1))
    return torch.tensor(counts, dtype=torch.float64), torch.stack(means), torch.stack(m2s)


SHAPES = [  # (N, C, H, W, groups): channels per group 3 and 5 (not powers of two), odd sizes
    (4, 12, 9, 7, 4),
    (2, 96, 5, 3, 32),
    (3, 40, 17, 1, 8),
    (1, 64, 33, 35, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_core_stats_match_float64_two_pass(kernels_on, shape, dtype, channels_last):
    n, c, height, width, groups = shape
    gen = torch.Generator().manual_seed(sum(shape))
    h = (torch.randn(n, c, height, width, generator=gen) * 3 + 40).to(dtype)  # |mean| >> std
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    h = h.to(DEVICE)
    cores = _cores(h)
    count, mean, m2 = gn.core_stats(h, cores, groups)
    ref_count, ref_mean, ref_m2 = _reference_stats(h.cpu(), cores, groups)
    assert count.dtype == mean.dtype == m2.dtype == torch.float32
    assert torch.equal(count.cpu().double(), ref_count)
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=1e-6, atol=1e-6)
    # M2 in float32 over up to ~3000 values with |mean|/std ~ 13: relative error well under 1e-4.
    torch.testing.assert_close(m2.cpu().double(), ref_m2, rtol=1e-4, atol=1e-4)


def test_core_stats_split_into_many_programs_combine_exactly(kernels_on, monkeypatch):
    """Several programs per (tile, group), merged with Chan's formula, against float64 Welford."""
    monkeypatch.setattr(gn, "_splits", lambda *args: 7)
    gen = torch.Generator().manual_seed(3)
    h = (torch.rand(2, 6, 40, 31, generator=gen) * 5 - 100).to(DEVICE)
    cores = [(slice(0, 40), slice(0, 31)), (slice(3, 38), slice(1, 30))]
    count, mean, m2 = gn.core_stats(h, cores, 2)
    for i, (rows, cols) in enumerate(cores):  # sequential Welford in float64, element by element
        for g in range(2):
            values = h[i, 3 * g : 3 * g + 3, rows, cols].cpu().double().flatten().tolist()
            k, mu, s = 0, 0.0, 0.0
            for v in values:
                k += 1
                delta = v - mu
                mu += delta / k
                s += delta * (v - mu)
            assert count[i].item() == k
            assert abs(mean[i, g].item() - mu) <= 1e-5 * abs(mu)
            assert abs(m2[i, g].item() - s) <= 1e-4 * s


def test_chan_combination_of_tiles_equals_the_whole_image():
    """Per-tile (count, mean, M2) of a partition, combined: the whole image's statistics."""
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(1, 8, 30, 22, generator=gen, dtype=torch.float64) * 2 + 7
    rows = [slice(0, 11), slice(11, 30)]
    cols = [slice(0, 1), slice(1, 22)]  # a 1-px-wide strip
    parts = [gn._torch_core_stats(image[:, :, r, c], [(slice(None), slice(None))], 4) for r in rows for c in cols]
    count, mean, m2 = (torch.stack([p[k][0] for p in parts]) for k in range(3))
    total, combined_mean, combined_m2 = gn.chan_reduce(count[:, None].expand_as(mean), mean, m2, dim=0)
    grouped = image[0].unflatten(0, (4, -1)).flatten(1)
    torch.testing.assert_close(combined_mean, grouped.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(combined_m2 / total, grouped.var(1, correction=0), rtol=1e-12, atol=1e-12)


def _reference_apply(h, mean, var, eps, weight, bias, residual):
    per_group = h.shape[1] // mean.shape[1]
    m = mean.double().repeat_interleave(per_group, 1)[:, :, None, None]
    v = var.double().repeat_interleave(per_group, 1)[:, :, None, None]
    y = (h.double() - m) / torch.sqrt(v + eps) * weight.double()[:, None, None] + bias.double()[:, None, None]
    y = y * torch.sigmoid(y)
    return y + residual.double() if residual is not None else y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("channels_last", "with_residual", "inplace"),
                         [(False, False, False), (True, False, True), (False, True, True), (True, True, False)])
def test_group_norm_silu_with_given_statistics(kernels_on, shape, dtype, channels_last, with_residual, inplace):
    n, c, height, width, groups = shape
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    h = (torch.randn(n, c, height, width, generator=gen) * 2 + 1).to(dtype)
    residual = torch.randn(n, c, height, width, generator=gen).to(dtype) if with_residual else None
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
        residual = residual.contiguous(memory_format=torch.channels_last) if residual is not None else None
    mean = torch.randn(n, groups, generator=gen) + 1
    var = torch.rand(n, groups, generator=gen) * 4 + 0.1
    weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    expected = _reference_apply(h, mean, var, 1e-6, weight, bias, residual)
    h, mean, var, weight, bias = (t.to(DEVICE) for t in (h, mean, var, weight, bias))
    residual = residual.to(DEVICE) if residual is not None else None
    out = gn.group_norm_apply(h, mean, var, 1e-6, weight, bias, silu=True, residual=residual, inplace=inplace)
    assert out.dtype == dtype and (out.data_ptr() == h.data_ptr()) == inplace
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # One rounding of a float32 result: within 1 ulp of the output (plus float32 noise near zero).
    error = (out.cpu().double() - expected).abs()
    assert bool((error <= ULP[dtype] * expected.abs() + 1e-5 * (1 + expected.abs())).all()), error.max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pytorch_path_matches_the_reference_too(dtype):
    """The fallback (kernels off): computed in float32, SiLU and the residual rounded to dtype in between,
    so within a few ulps."""
    previous = gn.set_kernels("off")
    try:
        gen = torch.Generator().manual_seed(9)
        h = (torch.randn(2, 12, 9, 7, generator=gen) * 2).to(dtype)
        mean, var = torch.randn(2, 4, generator=gen), torch.rand(2, 4, generator=gen) + 0.5
        weight, bias = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
        out = gn.group_norm_apply(h, mean, var, 1e-6, weight, bias, silu=True)
        expected = _reference_apply(h, mean, var, 1e-6, weight, bias, None)
        assert bool(((out.double() - expected).abs() <= 3 * ULP[dtype] * expected.abs() + 1e-5).all())
        count, m, m2 = gn.core_stats(h, [(slice(0, 9), slice(0, 7))] * 2, 4)
        ref_count, ref_mean, ref_m2 = _reference_stats(h, [(slice(0, 9), slice(0, 7))] * 2, 4)
        torch.testing.assert_close(m.double(), ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m2.double(), ref_m2, rtol=1e-5, atol=1e-5)
    finally:
        gn.set_kernels(previous)


def test_which_path_runs():
    previous = gn.set_kernels("auto")
    try:
        assert not gn.kernels_used(torch.zeros(1, 4, 2, 2))  # CPU: PyTorch unless forced
        if ON_GPU:
            assert gn.kernels_used(torch.zeros(1, 4, 2, 2, device="cuda"))
        gn.set_kernels("off")
        assert not gn.kernels_used(torch.zeros(1, 4, 2, 2, device=DEVICE))
        with pytest.raises(ValueError, match="kernels must be one of"):
            gn.set_kernels("fast")
    finally:
        gn.set_kernels(previous)


def _tiled_runs(vae, x, z, **options):
    with torch.no_grad():
        return (encode_tiled(vae, x, tile_px=24, pad_px=8, **options),
                decode_tiled(vae, z, tile_latent=5, pad_latent=2, **options))


@pytest.mark.parametrize("mode", ["exact", "estimated"])
def test_tiled_vae_with_kernels_equals_without(vae, mode):
    """Both tiled modes, kernels on vs off (fp32). Tolerance: float32 summation order only, measured
    max relative difference ~1e-6; allowed 1e-4 of the output's range."""
    if not gn.triton_available():
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(11)
    x = (torch.rand(1, 3, 48, 40, generator=gen) * 2 - 1).to(DEVICE)
    z = torch.randn(1, 4, 12, 11, generator=gen).to(DEVICE)
    vae = vae.to(DEVICE)
    options = dict(norm_stats=mode, tile_batch=2)
    previous = gn.set_kernels("off")
    try:
        enc_ref, dec_ref = _tiled_runs(vae, x, z, **options)
        gn.set_kernels("on")
        enc, dec = _tiled_runs(vae, x, z, **options)
    finally:
        gn.set_kernels(previous)
        vae.to("cpu")
    for got, ref in ((enc, enc_ref), (dec, dec_ref)):
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA/ROCm GPU")
def test_gpu_bf16_kernels_match_the_pytorch_path():
    """Compiled kernels on the GPU in bf16 at a realistic tile size, against the float64 reference."""
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(2, 128, 256, 256, generator=gen).to("cuda", torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    cores = [(slice(11, 245), slice(0, 245)), (slice(0, 256), slice(11, 256))]
    previous = gn.set_kernels("auto")
    try:
        count, mean, m2 = gn.core_stats(h, cores, 32)
    finally:
        gn.set_kernels(previous)
    _, ref_mean, ref_m2 = _reference_stats(h.cpu(), cores, 32)
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2.cpu().double(), ref_m2, rtol=1e-4, atol=1e-3)
