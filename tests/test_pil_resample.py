"""Pillow's resampling on the device (pipelines/pil_resample.py) against Pillow itself: bit-exact on
8-bit RGB and on float32 ("F") images, upscaling and downscaling, odd sizes, every filter the methods use."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.pipelines import pil_resample
from onestep_sr.pipelines.resize import resize_image

PILLOW = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
          "bilinear": Image.Resampling.BILINEAR}
SIZES = [((23, 31), (92, 124)), ((40, 52), (17, 29)), ((37, 19), (37, 60)), ((64, 48), (255, 77)), ((5, 9), (1, 2))]


@pytest.mark.parametrize("name", list(PILLOW))
@pytest.mark.parametrize(("size", "target"), SIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZES])
def test_equals_pillow(name, size, target):
    rng = np.random.default_rng(zlib.crc32(f"{name}{size}".encode()))  # str hash() changes per process
    (h, w), (oh, ow) = size, target
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).resize((ow, oh), PILLOW[name]))
    got = pil_resample.resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None], (oh, ow), name)
    assert np.array_equal(got[0].permute(1, 2, 0).numpy(), expected)
    plane = rng.random((h, w)).astype(np.float32) * 1.4 - 0.2  # off the 8-bit grid, outside [0, 1] too
    expected_float = np.asarray(Image.fromarray(plane).resize((ow, oh), PILLOW[name]))
    got_float = pil_resample.resize_float(torch.from_numpy(plane)[None, None], (oh, ow), name)
    assert np.array_equal(got_float[0, 0].numpy(), expected_float)


def test_resize_image_stays_on_the_device_path(monkeypatch):
    """resize_image's pil_* filters no longer call Pillow on devices with float64 (the CPU here)."""
    from onestep_sr.pipelines import resize

    def no_pillow(*args, **kwargs):
        raise AssertionError("Pillow was called")

    monkeypatch.setattr(resize, "_resize_pil_float", no_pillow)
    monkeypatch.setattr(Image.Image, "resize", no_pillow)
    x = torch.rand(2, 3, 13, 17)
    assert resize_image(x, (52, 68), "pil_bicubic").shape == (2, 3, 52, 68)
    assert resize_image((x * 255).round() / 255, (6, 9), "pil_lanczos").shape == (2, 3, 6, 9)
