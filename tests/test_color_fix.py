"""AdaIN and wavelet colour correction against hand computations and a naive reimplementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onestep_sr.pipelines.color_fix import (
    COLOR_FIX_METHODS,
    adain_color_fix,
    color_fix,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decomposition,
)

# ------------------------------------------------------------------------------------------ adain


def test_adain_hand_computed() -> None:
    out = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    ref = torch.tensor([[[[0.5, 0.5], [0.7, 0.7]]]])
    # output: mean 0.25, squared deviations .0225 .0025 .0025 .0225 -> unbiased var 0.05/3
    # reference: mean 0.6, squared deviations all .01 -> unbiased var 0.04/3
    std_out = math.sqrt(0.05 / 3 + 1e-5)
    std_ref = math.sqrt(0.04 / 3 + 1e-5)
    expected = [(v - 0.25) / std_out * std_ref + 0.6 for v in (0.1, 0.2, 0.3, 0.4)]
    result = adain_color_fix(out, ref)
    torch.testing.assert_close(result.flatten(), torch.tensor(expected), atol=1e-6, rtol=0)


def test_adain_clamps() -> None:
    out = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    ref = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])  # std 0.577: stretched output leaves [0, 1]
    result = adain_color_fix(out, ref)
    assert result.min() == 0.0 and result.max() == 1.0
    assert 0 < result[0, 0, 0, 1] < result[0, 0, 1, 0] < 1


def test_adain_matches_reference_statistics() -> None:
    out = 0.3 + 0.4 * torch.rand(2, 3, 24, 20)
    ref = 0.35 + 0.3 * torch.rand(2, 3, 24, 20)
    result = adain_color_fix(out, ref)
    assert 0 < result.min() and result.max() < 1  # nothing clamped
    torch.testing.assert_close(result.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-6, rtol=0)
    var_o = out.flatten(2).var(dim=2)
    var_r = ref.flatten(2).var(dim=2)
    exact = var_o.sqrt() / (var_o + 1e-5).sqrt() * (var_r + 1e-5).sqrt()  # eps makes it inexact
    torch.testing.assert_close(result.flatten(2).std(dim=2), exact, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.flatten(2).std(dim=2), var_r.sqrt(), atol=0, rtol=2e-3)


def test_adain_single_pixel_and_broadcast_reference() -> None:
    result = adain_color_fix(torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), 0.7))
    torch.testing.assert_close(result, torch.full((1, 3, 1, 1), 0.7))
    out = torch.rand(3, 3, 8, 8)
    ref = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(adain_color_fix(out, ref)[2:], adain_color_fix(out[2:], ref))


# ---------------------------------------------------------------------------------------- wavelet


def test_constant_image_has_no_high_frequency() -> None:
    high, low = wavelet_decomposition(torch.full((1, 3, 20, 17), 0.3))
    assert high.abs().max() < 1e-7
    torch.testing.assert_close(low, torch.full((1, 3, 20, 17), 0.3))


def test_high_plus_low_reconstructs() -> None:
    x = torch.rand(2, 3, 33, 47)
    high, low = wavelet_decomposition(x)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
def test_blur_of_delta_is_dilated_kernel(dilation: int) -> None:
    x = torch.zeros(1, 1, 41, 41)
    x[0, 0, 20, 20] = 1.0
    expected = torch.zeros(1, 1, 41, 41)
    weights = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    for i in range(3):
        for j in range(3):
            expected[0, 0, 20 + (i - 1) * dilation, 20 + (j - 1) * dilation] = weights[i][j] / 16
    assert torch.equal(wavelet_blur(x, dilation), expected)


@pytest.mark.parametrize("hw", [(1, 1), (4, 4), (2, 5)])
def test_blur_replicate_padding_tiny_images(hw: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *hw)
    assert wavelet_blur(x, 16).shape == x.shape
    assert wavelet_color_fix(x, x).shape == x.shape
    if hw == (1, 1):
        torch.testing.assert_close(wavelet_blur(x, 16), x)


def test_wavelet_fix_of_identical_images_is_identity() -> None:
    x = torch.rand(2, 3, 29, 31)
    torch.testing.assert_close(color_fix(x, x, "wavelet"), x, atol=1e-6, rtol=0)


def _naive_blur(img: np.ndarray, d: int) -> np.ndarray:
    """(C, H, W) float64: replicate-pad by d, then the 3x3 binomial kernel with taps d apart."""
    k = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16
    c, h, w = img.shape
    out = np.zeros_like(img)
    for ch in range(c):
        p = np.pad(img[ch], d, mode="edge")
        for y in range(h):
            for x in range(w):
                acc = 0.0
                for i in range(3):
                    for j in range(3):
                        acc += k[i, j] * p[y + i * d, x + j * d]
                out[ch, y, x] = acc
    return out


def _naive_wavelet_fix(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    def decompose(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        high = np.zeros_like(img)
        for level in range(5):
            low = _naive_blur(img, 2**level)
            high += img - low
            img = low
        return high, low

    high, _ = decompose(content)
    _, low = decompose(style)
    return np.clip(high + low, 0, 1)


def test_wavelet_matches_naive_loops() -> None:
    gen = torch.Generator().manual_seed(5)
    out = torch.rand(1, 3, 9, 7, generator=gen)
    ref = torch.rand(1, 3, 9, 7, generator=gen) * 0.5 + 0.2
    expected = _naive_wavelet_fix(out[0].double().numpy(), ref[0].double().numpy())
    result = wavelet_color_fix(out, ref)
    np.testing.assert_allclose(result[0].numpy(), expected, atol=1e-6, rtol=0)
    result64 = wavelet_color_fix(out.double(), ref.double())
    assert result64.dtype == torch.float64
    np.testing.assert_allclose(result64[0].numpy(), expected, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------- dispatch


def test_dispatch_and_dtypes() -> None:
    assert COLOR_FIX_METHODS == ("adain", "wavelet", "none")
    x = torch.rand(1, 3, 16, 16) * 1.4 - 0.2
    ref = torch.rand(1, 3, 16, 16)
    assert torch.equal(color_fix(x, ref, "none"), x.clamp(0, 1))
    assert torch.equal(color_fix(x, ref, "adain"), adain_color_fix(x, ref))
    assert torch.equal(color_fix(x, ref, "wavelet"), wavelet_color_fix(x, ref))
    for method in COLOR_FIX_METHODS:
        assert color_fix(x.half(), ref.half(), method).dtype == torch.float16
    with pytest.raises(ValueError, match="wavelet"):
        color_fix(x, ref, "histogram")
    with pytest.raises(ValueError):
        wavelet_color_fix(x, ref[..., :8])
