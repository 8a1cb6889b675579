"""Image resizing with the filters the official OSEDiff / S3Diff / Hero-SR code paths use.

The official test scripts resize PIL images (8-bit RGB) with Pillow, while S3Diff upsamples a
tensor with `F.interpolate(mode="bilinear")`. Reproducing their outputs bit for bit means using
the very same filters, so the "pil_*" filters compute exactly what Pillow computes: on 8-bit data
Pillow's uint8 path (its fixed-point arithmetic and rounding included), on data that is not on the
1/255 grid Pillow's float32 ("F") path, which applies the same kernels without quantising. Both run
on the tensor's device (pipelines/pil_resample.py, checked against Pillow itself), so full-resolution
images never travel to the host; MPS, which has no float64, sends float data to Pillow. The plain
names are fast torch paths.

Images are float tensors (B, C, H, W) in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import pil_resample

PIL_FILTERS: dict[str, Image.Resampling] = {
    "pil_bicubic": Image.Resampling.BICUBIC,
    "pil_lanczos": Image.Resampling.LANCZOS,
    "pil_bilinear": Image.Resampling.BILINEAR,
}
TORCH_FILTERS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")
FILTERS: tuple[str, ...] = (*PIL_FILTERS, *TORCH_FILTERS)

# How far from k/255 a value may lie and still count as 8-bit data. 1e-4 (in units of 1/255) for
# float32/64; float16 cannot hold k/255 that closely (its spacing near 1 is 2**-11), but its
# rounding error stays well under half a grid step, so it gets a matching tolerance. bfloat16's
# spacing (2**-8) equals the grid step, so its values cannot be mapped back reliably: strict.
_GRID_TOL = 1e-4


def _grid_tolerance(dtype: torch.dtype) -> float:
    """Tolerance (in 1/255 units) for deciding whether a tensor holds 8-bit values."""
    if dtype == torch.float16:
        return 255.0 * float(torch.finfo(dtype).eps)  # ~0.25 > max rounding error ~0.125
    return _GRID_TOL


def _as_uint8(x: torch.Tensor) -> torch.Tensor | None:
    """The (B, C, H, W) uint8 tensor (on x's device) when every value is k/255 (within tolerance), else None.
    Checked in float32 (float64 input: float64): k/255 in float32, times 255, lies within 3e-5 of k."""
    scaled = x.detach().to(torch.promote_types(x.dtype, torch.float32)) * 255.0
    rounded = scaled.round()
    tol = _grid_tolerance(x.dtype)
    on_grid = ((scaled - rounded).abs() <= tol).all() & (rounded >= 0).all() & (rounded <= 255).all()
    if not bool(on_grid):  # False if any NaN; the one value that crosses to the host
        return None
    return rounded.to(torch.uint8)


def _resize_pil_float(x: torch.Tensor, size_hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize each channel as a Pillow "F" (float32) image with Pillow itself (devices without float64)."""
    h, w = size_hw
    arr = x.detach().to(torch.float32).cpu().numpy()
    b, c = arr.shape[:2]
    out = np.empty((b, c, h, w), dtype=np.float32)
    for i in range(b):
        for j in range(c):
            img = Image.fromarray(np.ascontiguousarray(arr[i, j]))  # mode F
            out[i, j] = np.asarray(img.resize((w, h), resample))
    return out


def _check_size(size_hw: tuple[int, int]) -> tuple[int, int]:
    """Validate a target size and return it as plain ints."""
    if len(size_hw) != 2:
        raise ValueError(f"size_hw must be (height, width), got {size_hw!r}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"target size must be at least 1x1, got {h}x{w}")
    return h, w


def resize_image(x: torch.Tensor, size_hw: tuple[int, int], filter: str) -> torch.Tensor:
    """Resize a (B, C, H, W) image to `size_hw` with one of `FILTERS`.

    The result has the input's device and dtype. "pil_*" filters are bit-exact with Pillow on
    8-bit data (the official code path); "bilinear" is S3Diff's un-antialiased upsampling.
    """
    if filter not in FILTERS:
        raise ValueError(f"unknown resize filter {filter!r}; valid filters: {', '.join(FILTERS)}")
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = _check_size(size_hw)
    if x.shape[0] == 0 or x.shape[1] == 0:
        return x.new_empty((x.shape[0], x.shape[1], h, w))

    if filter in PIL_FILTERS:
        resample = PIL_FILTERS[filter]
        if tuple(x.shape[-2:]) == (h, w):
            return x.clone()  # Pillow returns an unchanged copy for a same-size resize
        name = filter.removeprefix("pil_")
        x8 = _as_uint8(x)
        if x8 is not None:
            out = pil_resample.resize_uint8(x8, (h, w), name).to(torch.float32).div_(255.0)
        elif pil_resample.supports_float(x.device):
            out = pil_resample.resize_float(x, (h, w), name)
        else:
            out = torch.from_numpy(_resize_pil_float(x, (h, w), resample))
        return out.to(device=x.device, dtype=x.dtype)

    # torch paths: interpolate needs a floating dtype; half on CPU may be unsupported, so widen.
    work = x if x.is_floating_point() else x.to(torch.float32)
    if work.device.type == "cpu" and work.dtype in (torch.float16, torch.bfloat16):
        work = work.to(torch.float32)
    if filter == "bicubic":
        out = F.interpolate(work, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0.0, 1.0)  # bicubic overshoots near edges
    elif filter == "bilinear":
        # Exactly S3Diff's x4 upsampling: no antialias, no clamp (bilinear cannot overshoot).
        out = F.interpolate(work, size=(h, w), mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(work, size=(h, w), mode="nearest")
    return out.to(dtype=x.dtype)
