"""Pillow's resampling (Resample.c) on the tensor's own device, bit for bit.

Why our own: the official OSEDiff / S3Diff / Hero-SR code resizes with Pillow, and reproducing their
numbers needs Pillow's exact arithmetic. Calling Pillow itself means copying every full-resolution image
to the host and back; this module does the same computation on the device instead:

- the filter weights are Pillow's: per output pixel, a window [xmin, xmin + n) of source pixels with
  weights filter((x + xmin - center + 0.5) / filterscale), normalised to sum 1 (computed on the host in
  float64 as Pillow does; they are small: one row of taps per output column or row);
- 8-bit images: weights in 22-bit fixed point (rounded half away from zero), a sum started at half a unit,
  shifted and clipped to 0..255 after each pass, horizontal pass first (Pillow's order);
- float images (Pillow's "F" mode): float64 sums of float32 pixels, stored as float32 after each pass.

Images are (B, C, H, W); `resize_uint8` takes integer values 0..255 (any integer dtype) and returns
uint8, `resize_float` takes float32 and returns float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Resample.c


def _bicubic(x: float) -> float:
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x  # the C library's sin, as Pillow's


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    return 1.0 - x if x < 1.0 else 0.0


FILTERS = {"bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0), "bilinear": (_bilinear, 1.0)}


def coefficients(in_size: int, out_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(xmin per output pixel, float64 weights (out, ksize)) exactly as precompute_coeffs."""
    function, support = FILTERS[name]
    scale = filterscale = in_size / out_size
    filterscale = max(filterscale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    reciprocal = 1.0 / filterscale
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    starts = np.zeros(out_size, dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero, as int() does
        count = min(int(center + support + 0.5), in_size) - xmin
        taps = [function((x + xmin - center + 0.5) * reciprocal) for x in range(count)]
        total = 0.0
        for w in taps:  # summed in order, as the C loop
            total += w
        weights[xx, :count] = [w / total for w in taps] if total != 0.0 else taps
        starts[xx] = xmin
    return starts, weights


def _fixed_point(weights: np.ndarray) -> np.ndarray:
    scaled = weights * (1 << PRECISION_BITS)
    return np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)


CHUNK_ELEMENTS = 1 << 25  # gathered taps held at once per pass (bounds the temporary, ~256 MiB in int64)


def _pass(x: torch.Tensor, dim: int, out_size: int, name: str, fixed: bool) -> torch.Tensor:
    """One 1-D pass along `dim` (-1: width, -2: height), in chunks of output positions."""
    in_size = x.shape[dim]
    starts, weights = coefficients(in_size, out_size, name)
    index = torch.from_numpy(np.minimum(starts[:, None] + np.arange(weights.shape[1])[None, :], in_size - 1))
    index = index.to(x.device)  # taps past the end are clamped; their weights are 0
    if fixed:
        kernel = torch.from_numpy(_fixed_point(weights)).to(x.device)
    else:
        kernel = torch.from_numpy(weights).to(x.device)
    moved = x.movedim(dim, -1)  # (..., in)
    out = torch.empty((*moved.shape[:-1], out_size), dtype=torch.uint8 if fixed else torch.float32, device=x.device)
    step = max(1, CHUNK_ELEMENTS // max(1, moved[..., :1].numel() * weights.shape[1]))
    for first in range(0, out_size, step):
        rows = slice(first, min(first + step, out_size))
        gathered = moved[..., index[rows]]  # (..., chunk, ksize)
        if fixed:
            total = (gathered.to(torch.int64) * kernel[rows]).sum(-1) + (1 << (PRECISION_BITS - 1))
            out[..., rows] = (total >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)
        else:  # summed tap by tap in float64, in Pillow's order: a tree sum rounds differently now and then
            products = gathered.to(torch.float64) * kernel[rows]
            total = products[..., 0].clone()
            for tap in range(1, products.shape[-1]):
                total += products[..., tap]
            out[..., rows] = total.to(torch.float32)
    return out.movedim(-1, dim)


def _resize(x: torch.Tensor, size_hw: tuple[int, int], name: str, fixed: bool) -> torch.Tensor:
    height, width = size_hw
    if x.shape[-1] != width:  # Pillow: horizontal pass first, then vertical
        x = _pass(x, -1, width, name, fixed)
    if x.shape[-2] != height:
        x = _pass(x, -2, height, name, fixed)
    return x


def resize_uint8(x: torch.Tensor, size_hw: tuple[int, int], name: str) -> torch.Tensor:
    """Pillow's 8-bit resize (mode L or RGB: channels are independent) on the device."""
    return _resize(x, size_hw, name, fixed=True).to(torch.uint8)


def supports_float(device: torch.device) -> bool:
    """The float path sums in float64, which MPS lacks."""
    return device.type != "mps"


def resize_float(x: torch.Tensor, size_hw: tuple[int, int], name: str) -> torch.Tensor:
    """Pillow's "F" (float32) resize on the device."""
    return _resize(x.to(torch.float32), size_hw, name, fixed=False)
