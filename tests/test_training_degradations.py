"""Real-ESRGAN degradation: kernels vs closed forms, sinc vs J1 by quadrature, JPEG vs Pillow,
noise statistics, seeded reproducibility and the METHODS.md section 7 parameter sets."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")

from onestep_sr.training.degradations import RealESRGANDegrader, get_preset  # noqa: E402
from onestep_sr.training.degradations import kernels as K  # noqa: E402
from onestep_sr.training.degradations.pipeline import gaussian_noise, jpeg, poisson_noise  # noqa: E402


def _rotated_form(size, sx, sy, theta):
    """x^T S^-1 x written as the sum of squares of rotated coordinates (independent of kernels.py)."""
    half = size // 2
    out = torch.zeros(size, size, dtype=torch.float64)
    for row in range(size):
        for col in range(size):
            x, y = col - half, row - half
            u = x * math.cos(theta) + y * math.sin(theta)
            v = -x * math.sin(theta) + y * math.cos(theta)
            out[row, col] = u * u / sx**2 + v * v / sy**2
    return out


@pytest.mark.parametrize("kind,beta", [("aniso", 1.0), ("generalized_aniso", 0.7), ("plateau_aniso", 1.6)])
def test_kernels_match_closed_forms(kind, beta):
    size, sx, sy, theta = 15, 2.5, 0.8, 0.6
    q = _rotated_form(size, sx, sy, theta)
    expected = {"aniso": torch.exp(-q / 2), "generalized_aniso": torch.exp(-(q**beta) / 2),
                "plateau_aniso": 1 / (q**beta + 1)}[kind]
    expected = expected / expected.sum()
    kernel = K.make_kernel(kind, size, sx, sy, theta, beta)
    assert kernel.shape == (size, size)
    assert abs(float(kernel.sum()) - 1) < 1e-6
    torch.testing.assert_close(kernel.double(), expected, atol=1e-7, rtol=1e-5)


def test_gaussian_moments_and_isotropy():
    """A wide iso kernel has covariance sigma^2 I; an aniso one has the rotated diag(sx^2, sy^2)."""
    size = 41
    xy = K.grid(size)
    iso = K.make_kernel("iso", size, 2.0, 9.0, 1.0).double()  # iso ignores sigma_y and theta
    second = torch.einsum("hw,hwi,hwj->ij", iso, xy, xy)
    torch.testing.assert_close(second, 4.0 * torch.eye(2, dtype=torch.float64), atol=1e-4, rtol=0)
    aniso = K.make_kernel("aniso", size, 3.0, 1.5, math.pi / 6).double()
    second = torch.einsum("hw,hwi,hwj->ij", aniso, xy, xy)
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    torch.testing.assert_close(second, rot @ torch.diag(torch.tensor([9.0, 2.25], dtype=torch.float64)) @ rot.T,
                               atol=2e-3, rtol=0)


def _j1_quadrature(x: float) -> float:
    tau = np.linspace(0, math.pi, 20001)
    return float(np.trapezoid(np.cos(tau - x * np.sin(tau)), tau) / math.pi)


def test_sinc_matches_its_formula():
    size, cutoff = 13, 2.1
    kernel = K.sinc_kernel(size, cutoff, pad_to=21)
    assert kernel.shape == (21, 21) and kernel[:4].abs().sum() == 0
    inner = kernel[4:17, 4:17].double()
    expected = torch.zeros(size, size, dtype=torch.float64)
    for row in range(size):
        for col in range(size):
            r = math.hypot(row - 6, col - 6)
            expected[row, col] = cutoff**2 / (4 * math.pi) if r == 0 else cutoff * _j1_quadrature(cutoff * r) / (
                2 * math.pi * r)
    torch.testing.assert_close(inner, expected / expected.sum(), atol=1e-7, rtol=1e-5)


def test_jpeg_close_to_pillow():
    """kornia's DiffJPEG vs Pillow (4:2:0, same quality). Tolerance: mean |diff| under 6 of 255 levels
    and under 40 % of Pillow's own compression error; both codecs lose about the same."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(64, 64), mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    x = (x * 255).round() / 255
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for quality in (30, 60, 95):
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format="JPEG", quality=quality, subsampling=2)
        reference = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255
        ours = jpeg(x, torch.tensor([float(quality)]))[0]
        diff = float((ours - reference).abs().mean()) * 255
        pillow_error = float((x[0] - reference).abs().mean()) * 255
        ours_error = float((x[0] - ours).abs().mean()) * 255
        assert diff < 6 and diff < 0.4 * pillow_error, (quality, diff, pillow_error)
        assert abs(ours_error - pillow_error) < 0.25 * pillow_error


def test_gaussian_noise_statistics():
    g = torch.Generator().manual_seed(1)
    images = torch.full((2, 3, 128, 128), 0.5)
    noise = gaussian_noise(images, torch.tensor([10.0, 20.0]), torch.tensor([0.0, 1.0]), g)
    assert abs(float(noise[0].std()) * 255 - 10) < 0.3 and abs(float(noise[0].mean()) * 255) < 0.3
    assert abs(float(noise[1].std()) * 255 - 20) < 0.6
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 1], noise[1, 2])  # gray
    assert not torch.equal(noise[0, 0], noise[0, 1])


def test_poisson_noise_statistics():
    """levels = 2^ceil(log2(#distinct 8-bit values)); Poisson(x * L) / L - x has variance x / L."""
    g = torch.Generator().manual_seed(2)
    values = torch.tensor([0.2, 0.6]).repeat(128 * 64)  # two distinct values -> L = 2
    images = values.reshape(1, 1, 128, 128).expand(1, 3, 128, 128).contiguous()
    noise = poisson_noise(images, torch.tensor([1.5]), torch.tensor([0.0]), g)
    quantised = (images * 255).round() / 255
    for value in (0.2, 0.6):
        level = float((torch.tensor(value) * 255).round() / 255)
        picked = noise[quantised == level] / 1.5
        assert abs(float(picked.mean())) < 0.02
        assert abs(float(picked.var()) - level / 2) < 0.03 * level / 2 + 0.005


def test_seeded_run_reproducible_and_seed_sensitive():
    degrader = RealESRGANDegrader(get_preset("osediff"))
    gt = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    a, b, c = degrader(gt, seed=7), degrader(gt, seed=7), degrader(gt, seed=8)
    assert a.lr.shape == (2, 3, 16, 16) and a.lr_upscaled.shape == (2, 3, 64, 64)
    assert torch.equal(a.lr, b.lr) and torch.equal(a.lr_upscaled, b.lr_upscaled)
    assert not torch.equal(a.lr, c.lr)
    assert torch.equal((a.lr * 255).round(), a.lr * 255)  # 8-bit quantised
    assert get_preset("resshift").resize_back == "none" and RealESRGANDegrader(get_preset("resshift"))(
        gt, 1).lr_upscaled is None


def test_parameter_sets_equal_methods_section_7():
    """Transcribed from METHODS.md section 7 (OSEDiff / S3Diff / ResShift columns)."""
    o, s, r = get_preset("osediff"), get_preset("s3diff"), get_preset("resshift")
    for p in (o, s, r):
        assert p.first.blur.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and p.first.blur.sinc_prob == 0.1
        assert p.first.resize_prob == (0.2, 0.7, 0.1) and p.second.resize_prob == (0.3, 0.4, 0.3)
        assert p.first.gaussian_noise_prob == 0.5 and p.first.gray_noise_prob == 0.4 and p.final_sinc_prob == 0.8
    assert (o.first.blur.sigma, o.first.blur.betag, o.first.blur.betap) == ((0.2, 3), (0.5, 4), (1, 2))
    assert (s.first.blur.sigma, s.first.blur.betag, s.first.blur.betap) == ((0.2, 1.5), (0.5, 2), (1, 1.5))
    assert (o.first.resize_range, s.first.resize_range, r.first.resize_range) == ((0.15, 1.5), (0.3, 1.5), (0.15, 1.5))
    assert (o.first.noise_range, o.first.poisson_scale_range, o.first.jpeg_range) == ((1, 30), (0.05, 3), (30, 95))
    assert (s.first.noise_range, s.first.poisson_scale_range, s.first.jpeg_range) == ((1, 15), (0.05, 2), (60, 95))
    assert (o.second.blur_prob, o.second.blur.kernel_size, o.second.blur.sigma) == (0.8, 21, (0.2, 1.5))
    assert (s.second.blur_prob, s.second.blur.kernel_size, s.second.blur.sigma) == (0.5, 11, (0.2, 1.0))
    assert (r.second.blur_prob, r.second.blur.kernel_size, r.second.blur.sigma) == (0.8, 15, (0.2, 1.5))
    assert (o.second.resize_range, s.second.resize_range) == ((0.3, 1.2), (0.6, 1.2))
    assert (o.second.noise_range, o.second.poisson_scale_range) == ((1, 25), (0.05, 2.5))
    assert (s.second.noise_range, s.second.poisson_scale_range) == ((1, 12), (0.05, 1.0))
    assert (o.second.jpeg_range, s.second.jpeg_range, r.second.jpeg_range) == ((30, 95), (60, 100), (30, 95))
    assert (o.no_degradation_prob, s.no_degradation_prob) == (0.0, 0.01)
    assert (r.gt_size, r.second_order_prob, o.gt_size) == (256, 0.5, 512)
