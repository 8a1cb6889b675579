"""Resizing filters (bit-exact Pillow paths) and the official OSEDiff/Hero-SR/S3Diff geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from onestep_sr.pipelines.geometry import (
    ResizePlan,
    apply_resize_plan,
    crop_to,
    plan_resize,
    reflect_pad_to_multiple,
)
from onestep_sr.pipelines.resize import FILTERS, resize_image

PIL_RESAMPLE = {
    "pil_bicubic": Image.Resampling.BICUBIC,
    "pil_lanczos": Image.Resampling.LANCZOS,
    "pil_bilinear": Image.Resampling.BILINEAR,
}
SIZES_HW = [(148, 212), (20, 30), (61, 40), (37, 53)]


def _random_uint8(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_uint8(h: int = 37, w: int = 53) -> np.ndarray:
    """A smooth image (no overshoot when upscaled), quantised to 8 bits."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.5 + 0.4 * np.cos(5 * yy), 0.1 + 0.8 * xx], -1)
    return (img * 255).round().astype(np.uint8)


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("filt", list(PIL_RESAMPLE))
@pytest.mark.parametrize("size_hw", SIZES_HW)
def test_pil_filters_bit_exact_on_8bit_rgb(filt: str, size_hw: tuple[int, int]) -> None:
    a = _random_uint8()
    expected = np.asarray(Image.fromarray(a).resize((size_hw[1], size_hw[0]), PIL_RESAMPLE[filt]))
    out = resize_image(_to_tensor(a), size_hw, filt)
    assert out.shape == (1, 3, *size_hw) and out.dtype == torch.float32
    np.testing.assert_array_equal(_to_uint8(out), expected)
    # the result is itself exactly on the 1/255 grid
    assert torch.equal(out, (out * 255).round() / 255)


@pytest.mark.parametrize("channels", [1, 4])
def test_pil_uint8_path_other_channel_counts(channels: int) -> None:
    a = np.random.default_rng(1).integers(0, 256, (2, channels, 19, 23), dtype=np.uint8)
    out = resize_image(torch.from_numpy(a).float() / 255, (50, 41), "pil_lanczos")
    for b in range(2):
        for c in range(channels):
            ref = np.asarray(Image.fromarray(a[b, c]).resize((41, 50), Image.Resampling.LANCZOS))
            np.testing.assert_array_equal((out[b, c] * 255).round().to(torch.uint8).numpy(), ref)


def test_pil_float_path_does_not_quantise_and_matches_pillow_f() -> None:
    t = _to_tensor(_smooth_uint8())
    shift = 0.3 / 255  # puts every value off the 1/255 grid -> Pillow "F" path
    for filt, resample in PIL_RESAMPLE.items():
        for size_hw in SIZES_HW:
            f_out = resize_image(t + shift, size_hw, filt)
            # not quantised: most values are far from the 1/255 grid
            frac = (f_out * 255 - (f_out * 255).round()).abs()
            assert (frac > 1e-3).float().mean() > 0.9
            # exactly Pillow's mode-F resize of each channel
            for c in range(3):
                ch = Image.fromarray((t + shift)[0, c].numpy())
                ref = np.asarray(ch.resize((size_hw[1], size_hw[0]), resample))
                np.testing.assert_array_equal(f_out[0, c].numpy(), ref)
            # close to the 8-bit path on smooth 8-bit data. Pillow's uint8 path rounds after each
            # of its two passes, so the gap slightly exceeds 1/255 (measured max 1.19/255, lanczos).
            u_out = resize_image(t, size_hw, filt)
            assert (f_out - shift - u_out).abs().max() * 255 < 1.5


def test_pil_uint8_and_float_paths_differ_on_overshooting_noise() -> None:
    """Documented difference: Pillow's 8-bit path clips its intermediate (horizontal-pass) image."""
    t = _to_tensor(_random_uint8())
    u_out = resize_image(t, (148, 212), "pil_bicubic")
    f_out = resize_image(t.double() + 1e-3, (148, 212), "pil_bicubic").float().clamp(0, 1) - 1e-3
    assert (f_out - u_out).abs().max() * 255 > 5


def test_torch_bicubic_close_to_pil_bicubic_on_smooth_upscaling() -> None:
    # measured: 3e-5/255 vs Pillow's float path (same a=-0.5 kernel), 1.05/255 vs its uint8 path
    t = _to_tensor(_smooth_uint8(64, 48))
    for size_hw in [(256, 192), (128, 96), (200, 150)]:
        fast = resize_image(t, size_hw, "bicubic")
        assert (fast - resize_image(t, size_hw, "pil_bicubic")).abs().max() * 255 < 1.5
        pil_f = resize_image(t + 0.3 / 255, size_hw, "pil_bicubic") - 0.3 / 255
        assert (fast - pil_f).abs().max() < 1e-5
    noisy = resize_image(torch.rand(1, 3, 16, 16) * 4 - 1.5, (40, 40), "bicubic")
    assert noisy.min() >= 0 and noisy.max() <= 1


def test_bilinear_and_nearest_are_plain_interpolate() -> None:
    x = torch.rand(2, 3, 13, 17)
    out = resize_image(x, (52, 68), "bilinear")
    assert torch.equal(out, F.interpolate(x, size=(52, 68), mode="bilinear", align_corners=False))
    out = resize_image(x, (26, 9), "nearest")
    assert torch.equal(out, F.interpolate(x, size=(26, 9), mode="nearest"))


def test_resize_keeps_dtype_and_rejects_bad_arguments() -> None:
    a = _random_uint8(9, 11)
    t = _to_tensor(a)
    for filt in FILTERS:
        for dtype in (torch.float16, torch.float64):
            out = resize_image(t.to(dtype), (20, 25), filt)
            assert out.dtype == dtype and out.shape == (1, 3, 20, 25)
    # float16 8-bit data still takes the exact uint8 path
    ref = np.asarray(Image.fromarray(a).resize((25, 20), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(_to_uint8(resize_image(t.half(), (20, 25), "pil_bicubic").float()), ref)
    with pytest.raises(ValueError, match="pil_bicubic"):
        resize_image(t, (20, 25), "area")
    with pytest.raises(ValueError):
        resize_image(t, (0, 25), "bicubic")


# -------------------------------------------------------------------------------------- geometry

OSEDIFF = {"enlarge_filter": "pil_bicubic", "upscale_filter": "pil_bicubic", "snap_filter": "pil_lanczos"}


def _osediff_plan(h: int, w: int, scale: float = 4, process_size: int = 512) -> ResizePlan:
    return plan_resize((h, w), scale, int(process_size // scale), 8, **OSEDIFF)


def test_plan_enlarges_small_input() -> None:
    plan = _osediff_plan(75, 100)  # W=100, H=75
    assert plan.enlarged and plan.enlarged_hw == (128, 170)  # int(128/75*100) = 170
    assert plan.upscaled_hw == (512, 680)
    assert plan.model_hw == (512, 680)
    assert plan.target_hw == (300, 400)


def test_plan_snaps_without_enlarging() -> None:
    plan = _osediff_plan(131, 129)  # W=129, H=131
    assert not plan.enlarged and plan.enlarged_hw is None
    assert plan.upscaled_hw == (524, 516)
    assert plan.model_hw == (520, 512)
    assert plan.target_hw == (524, 516)


def test_plan_extreme_inputs() -> None:
    plan = _osediff_plan(1, 1)
    assert plan.enlarged_hw == (128, 128) and plan.model_hw == (512, 512) and plan.target_hw == (4, 4)
    plan = _osediff_plan(1, 300)
    assert plan.enlarged_hw == (128, 38400) and plan.model_hw == (512, 153600)
    assert plan.target_hw == (4, 1200)
    plan = _osediff_plan(300, 1)
    assert plan.enlarged_hw == (38400, 128) and plan.target_hw == (1200, 4)


def test_plan_keeps_official_float_quirk() -> None:
    # int(128/49*49) == 127 in IEEE doubles: the official script enlarges a 49 px side to 127
    plan = _osediff_plan(49, 200)
    assert plan.enlarged_hw == (127, int(128 / 49 * 200))
    assert plan.upscaled_hw[0] == 508 and plan.model_hw[0] == 504


def test_plan_other_scales_and_no_snap() -> None:
    plan = plan_resize((75, 100), 2, 128, 8, **OSEDIFF)
    assert plan.upscaled_hw == (256, 340) and plan.model_hw == (256, 336) and plan.target_hw == (150, 200)
    plan = plan_resize((75, 100), 1.5, 128, 8, **OSEDIFF)
    assert plan.upscaled_hw == (192, 255) and plan.model_hw == (192, 248) and plan.target_hw == (112, 150)
    plan = plan_resize((131, 129), 4, 0, 1, **OSEDIFF)  # S3Diff-like: no enlargement, no snap
    assert plan.enlarged_hw is None and plan.model_hw == plan.upscaled_hw == (524, 516)
    plan = plan_resize((1, 1), 4, 0, 8, **OSEDIFF)  # too small to snap down: snapped up to 8
    assert plan.upscaled_hw == (4, 4) and plan.model_hw == (8, 8)
    for h, w, s in [(7, 300, 4), (333, 17, 2), (64, 65, 1.5), (10, 10, 3)]:
        plan = plan_resize((h, w), s, 64, 8, **OSEDIFF)
        assert plan.target_hw == (int(s * h), int(s * w))
    with pytest.raises(ValueError):
        plan_resize((10, 10), 4, 128, 0, **OSEDIFF)
    with pytest.raises(ValueError):
        plan_resize((10, 10), 4, 128, 8, "pil_bicubic", "cubic", "pil_lanczos")


def test_apply_plan_matches_official_pillow_chain() -> None:
    a = _random_uint8(75, 100, seed=3)  # H=75, W=100
    img = Image.fromarray(a)
    w0, h0 = img.size
    s = (512 // 4) / min(w0, h0)
    img = img.resize((int(s * w0), int(s * h0)))  # Pillow's default filter (BICUBIC)
    img = img.resize((img.size[0] * 4, img.size[1] * 4), Image.Resampling.BICUBIC)
    img = img.resize((img.width - img.width % 8, img.height - img.height % 8), Image.Resampling.LANCZOS)
    out = apply_resize_plan(_to_tensor(a), _osediff_plan(75, 100))
    np.testing.assert_array_equal(_to_uint8(out), np.asarray(img))


@pytest.mark.parametrize("hw,scale", [((1, 1), 4), ((131, 129), 4), ((30, 7), 2), ((75, 100), 1.5)])
def test_apply_plan_sizes(hw: tuple[int, int], scale: float) -> None:
    plan = plan_resize(hw, scale, 32, 8, "bicubic", "bicubic", "bicubic")
    out = apply_resize_plan(torch.rand(1, 3, *hw), plan)
    assert out.shape[-2:] == plan.model_hw
    with pytest.raises(ValueError):
        apply_resize_plan(torch.rand(1, 3, hw[0] + 1, hw[1]), plan)


@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (130, 65), (5, 3), (1, 1), (1, 70), (40, 2)])
def test_reflect_pad_then_crop_restores(hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw) * 2 - 1
    padded, (pad_h, pad_w) = reflect_pad_to_multiple(x, 64)
    assert padded.shape[-2] % 64 == 0 and padded.shape[-1] % 64 == 0
    assert padded.shape[-2:] == (hw[0] + pad_h, hw[1] + pad_w)
    assert torch.equal(crop_to(padded, hw), x)
    # torch reflect where it works, repeated reflection (numpy's "reflect") beyond
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    np.testing.assert_array_equal(padded.numpy(), ref)


def test_reflect_pad_index_fallback_agrees_with_torch() -> None:
    x = torch.arange(37 * 53).reshape(1, 1, 37, 53)  # integer tensor -> index path
    padded, pads = reflect_pad_to_multiple(x, 64)
    assert torch.equal(padded.float(), F.pad(x.float(), (0, pads[1], 0, pads[0]), mode="reflect"))
    with pytest.raises(ValueError):
        crop_to(x, (38, 10))
