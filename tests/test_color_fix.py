"""Colour correction against hand computations, naive reimplementations and independent libraries
(skimage's CIELAB, the standard library's colorsys HSV)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from onestep_sr.pipelines.color_fix import (
    COLOR_FIX_METHODS,
    adain_color_fix,
    color_fix,
    hsv_color_fix,
    hsv_to_rgb,
    lab_color_fix,
    lab_to_rgb,
    rgb_to_hsv,
    rgb_to_lab,
    wavelet_adaptive_color_fix,
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
    assert COLOR_FIX_METHODS[:3] == ("adain", "wavelet", "none")  # appended only (saved workflows)
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
    with pytest.raises(ValueError, match="strength"):
        color_fix(x, ref, "adain", strength=1.5)
    with pytest.raises(ValueError, match="RGB"):
        color_fix(x[:, :1], ref[:, :1], "lab")


# ------------------------------------------------------------------------------------ lab / hsv


def _pair(seed: int, h: int = 11, w: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = torch.rand(2, 3, h, w, generator=gen, dtype=torch.float64)
    ref = (torch.rand(2, 3, h, w, generator=gen, dtype=torch.float64) * 0.6 + 0.3) * torch.tensor(
        [1.0, 0.7, 0.4], dtype=torch.float64).view(1, 3, 1, 1)  # a warm cast
    return out, ref


def test_lab_conversion_matches_skimage() -> None:
    color = pytest.importorskip("skimage.color")
    out, _ = _pair(0)
    ours = rgb_to_lab(out)
    expected = color.rgb2lab(out.permute(0, 2, 3, 1).numpy())
    # skimage rounds the CIE constants of the dark branch (0.008856, 7.787 for (6/29)^3, 841/108): that
    # moves very dark pixels by < 1e-3 Lab units; elsewhere the two agree to float64 rounding.
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), expected, atol=1e-3, rtol=0)
    bright = out.amin(1) > 0.1
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy()[bright.numpy()], expected[bright.numpy()],
                               atol=1e-9, rtol=0)
    back = color.lab2rgb(expected[0])  # skimage's inverse, on in-gamut colours
    np.testing.assert_allclose(lab_to_rgb(ours)[0].permute(1, 2, 0).numpy(), back, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lab_to_rgb(ours).numpy(), out.numpy(), atol=1e-9, rtol=0)  # round trip


def test_lab_fix_matches_skimage_computation() -> None:
    color = pytest.importorskip("skimage.color")
    out, ref = _pair(1)
    result = lab_color_fix(out, ref)
    for i in range(2):
        lab_out = color.rgb2lab(out[i].permute(1, 2, 0).numpy())
        lab_ref = color.rgb2lab(ref[i].permute(1, 2, 0).numpy())
        pixels = lab_out.shape[0] * lab_out.shape[1]
        std_out = np.sqrt(lab_out.reshape(pixels, 3).var(axis=0, ddof=1) + 1e-5)
        std_ref = np.sqrt(lab_ref.reshape(pixels, 3).var(axis=0, ddof=1) + 1e-5)
        moved = (lab_out - lab_out.mean((0, 1))) / std_out * std_ref + lab_ref.mean((0, 1))
        expected = np.clip(color.lab2rgb(moved), 0, 1)
        np.testing.assert_allclose(result[i].permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)
    # the cast moves: the result's mean colour is the reference's, not the output's
    assert (result.mean((2, 3)) - ref.mean((2, 3))).abs().max() < 0.05


def test_hsv_conversion_matches_colorsys() -> None:
    out, _ = _pair(2, 6, 7)
    out[0, :, 0, 0] = 0.5  # gray: hue and saturation 0
    out[0, :, 0, 1] = 0.0  # black
    hsv = rgb_to_hsv(out)
    pixels = out.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    np.testing.assert_allclose(hsv.permute(0, 2, 3, 1).reshape(-1, 3).numpy(), expected, atol=1e-12, rtol=0)
    rgb_back = np.array([colorsys.hsv_to_rgb(*p) for p in expected])
    np.testing.assert_allclose(hsv_to_rgb(hsv).permute(0, 2, 3, 1).reshape(-1, 3).numpy(), rgb_back, atol=1e-12)


def test_hsv_fix_matches_colorsys_per_pixel() -> None:
    out, ref = _pair(3, 5, 6)
    result = hsv_color_fix(out, ref)
    expected = []
    for o, r in zip(out.permute(0, 2, 3, 1).reshape(-1, 3).tolist(), ref.permute(0, 2, 3, 1).reshape(-1, 3).tolist(),
                    strict=True):
        h, s, _ = colorsys.rgb_to_hsv(*r)
        expected.append(colorsys.hsv_to_rgb(h, s, colorsys.rgb_to_hsv(*o)[2]))
    np.testing.assert_allclose(result.permute(0, 2, 3, 1).reshape(-1, 3).numpy(), np.array(expected), atol=1e-9)


# --------------------------------------------------------------------------- adaptive / strength


def test_wavelet_adaptive_matches_naive_loops() -> None:
    gen = torch.Generator().manual_seed(6)
    out = torch.rand(1, 3, 40, 18, generator=gen, dtype=torch.float64) * 0.6 + 0.1
    ref = out.clone()  # the same colours at the bottom ...
    ref[..., :16, :] += 0.3  # ... a colour shift at the top

    def decompose(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        high = np.zeros_like(img)
        for level in range(5):
            low = _naive_blur(img, 2**level)
            high += img - low
            img = low
        return high, low

    high, low_out = decompose(out[0].numpy())
    _, low_ref = decompose(ref[0].numpy())
    weight = np.minimum(np.sqrt(((low_ref - low_out) ** 2).sum(axis=0)) / 0.1, 1.0)
    expected = np.clip(high + low_out + weight * (low_ref - low_out), 0, 1)
    np.testing.assert_allclose(wavelet_adaptive_color_fix(out, ref)[0].numpy(), expected, atol=1e-12, rtol=0)
    assert 0 < weight.min() < 1 and weight.max() == 1.0  # both regimes are exercised


@pytest.mark.parametrize("method", ["adain", "wavelet", "lab", "hsv", "wavelet_adaptive"])
def test_strength_blends_linearly(method: str) -> None:
    out, ref = _pair(4)
    out = out * 1.2 - 0.1  # outside [0, 1]: the unfixed side of the blend is clamped
    full = color_fix(out, ref, method)
    assert torch.equal(color_fix(out, ref, method, strength=1.0), full)
    assert torch.equal(color_fix(out, ref, method, strength=0.0), out.clamp(0, 1))
    np.testing.assert_allclose(color_fix(out, ref, method, strength=0.3).numpy(),
                               (0.7 * out.clamp(0, 1) + 0.3 * full).numpy(), atol=1e-12, rtol=0)
