"""The Real-ESRGAN degradation parameter sets of METHODS.md section 7, as data.

Sources: OSEDiff `dataloaders/params_realesrgan.yml`, S3Diff `configs/sr.yaml`, ResShift
`realsr_swinunet_realesrgan256.yaml`. `blur_kernel_size2` is recorded as published, but like the
official datasets (`kernel_range = [7, 9, ..., 21]` hard-coded) every blur kernel's size is drawn
from 7..21 and zero-padded to 21.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KERNEL_LIST = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
KERNEL_RANGE = tuple(2 * v + 1 for v in range(3, 11))  # 7..21
PADDED_KERNEL = 21
ROTATION_RANGE = (-math.pi, math.pi)


@dataclass(frozen=True)
class BlurParams:
    sigma: tuple[float, float]
    betag: tuple[float, float]
    betap: tuple[float, float]
    sinc_prob: float = 0.1
    kernel_size: int = 21  # published; sizes are drawn from KERNEL_RANGE (see module docstring)
    kernel_list: tuple[str, ...] = KERNEL_LIST
    kernel_prob: tuple[float, ...] = KERNEL_PROB


@dataclass(frozen=True)
class StageParams:
    """One order of degradation: blur (with blur_prob), resize, noise, JPEG."""

    blur: BlurParams
    resize_prob: tuple[float, float, float]  # up, down, keep
    resize_range: tuple[float, float]
    noise_range: tuple[float, float]  # Gaussian sigma in 8-bit levels
    poisson_scale_range: tuple[float, float]
    jpeg_range: tuple[float, float]
    gaussian_noise_prob: float = 0.5
    gray_noise_prob: float = 0.4
    blur_prob: float = 1.0


@dataclass(frozen=True)
class DegradationParams:
    name: str
    first: StageParams
    second: StageParams
    final_sinc_prob: float = 0.8
    scale: int = 4
    gt_size: int = 512
    second_order_prob: float = 1.0  # ResShift applies the second order with p = 0.5
    no_degradation_prob: float = 0.0  # S3Diff: input = GT with p = 0.01
    resize_back: str = "random"  # "random" (OSEDiff), "bicubic" (S3Diff), "none" (ResShift)
    modes: tuple[str, ...] = field(default=("area", "bilinear", "bicubic"))


OSEDIFF = DegradationParams(
    name="osediff",
    first=StageParams(
        blur=BlurParams(sigma=(0.2, 3.0), betag=(0.5, 4.0), betap=(1.0, 2.0)),
        resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
        noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0), jpeg_range=(30.0, 95.0),
    ),
    second=StageParams(
        blur=BlurParams(sigma=(0.2, 1.5), betag=(0.5, 4.0), betap=(1.0, 2.0), kernel_size=21),
        resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5), jpeg_range=(30.0, 95.0), blur_prob=0.8,
    ),
    resize_back="random",
)

S3DIFF = DegradationParams(
    name="s3diff",
    first=StageParams(
        blur=BlurParams(sigma=(0.2, 1.5), betag=(0.5, 2.0), betap=(1.0, 1.5)),
        resize_prob=(0.2, 0.7, 0.1), resize_range=(0.3, 1.5),
        noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0),
    ),
    second=StageParams(
        blur=BlurParams(sigma=(0.2, 1.0), betag=(0.5, 2.0), betap=(1.0, 1.5), kernel_size=11),
        resize_prob=(0.3, 0.4, 0.3), resize_range=(0.6, 1.2),
        noise_range=(1.0, 12.0), poisson_scale_range=(0.05, 1.0), jpeg_range=(60.0, 100.0), blur_prob=0.5,
    ),
    no_degradation_prob=0.01,
    resize_back="bicubic",
)

RESSHIFT = DegradationParams(
    name="resshift",
    first=StageParams(
        blur=BlurParams(sigma=(0.2, 3.0), betag=(0.5, 4.0), betap=(1.0, 2.0)),
        resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
        noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0), jpeg_range=(30.0, 95.0),
    ),
    second=StageParams(
        blur=BlurParams(sigma=(0.2, 1.5), betag=(0.5, 4.0), betap=(1.0, 2.0), kernel_size=15),
        resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5), jpeg_range=(30.0, 95.0), blur_prob=0.8,
    ),
    gt_size=256,
    second_order_prob=0.5,
    resize_back="none",
)

PRESETS: dict[str, DegradationParams] = {p.name: p for p in (OSEDIFF, S3DIFF, RESSHIFT)}


def get_preset(name: str) -> DegradationParams:
    if name not in PRESETS:
        raise ValueError(f"unknown degradation preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
