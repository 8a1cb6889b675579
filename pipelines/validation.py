"""Checks at the pipeline boundary, so the Python API, the nodes and the CLI all refuse settings and
images that would otherwise give black or NaN results (a negative tile overlap, a NaN scale, a NaN
pixel that spreads through the VAE's GroupNorm to the whole image) with a one-line message.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from ..models.tiled_vae import NORM_STATS_MODES

OUTPUT_SIZES = ("exact", "native")
RANGE_TOLERANCE = 1e-3  # values this far outside [0, 1] are rounding, not a wrong convention


def check_images(images: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A (B, H, W, C) batch with 1..4 channels and finite values; `name` says where it came from."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (B, H, W, C), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{name} must be an image batch (B, H, W, C) with C in 1..4, got shape {tuple(images.shape)}")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{name} has no pixels (shape {tuple(images.shape)})")
    if images.is_floating_point():
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"{name} has {bad} NaN or infinite value(s) out of {images.numel()}; "
                             "fix the step that produced it (one NaN would turn the whole result NaN)")
    return images


def clamp_to_unit_range(images: torch.Tensor, name: str, warn) -> torch.Tensor:
    """Values in [0, 1]; a tensor clearly outside is clamped with a warning (0..255 data, HDR)."""
    low, high = float(images.min()), float(images.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        warn(f"{name} has values in [{low:g}, {high:g}], outside [0, 1]; clamped to [0, 1]")
    return images.clamp(0, 1)


def _integer(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_scale(scale) -> float:
    value = _finite(scale, "scale")
    if value <= 0:
        raise ValueError(f"scale must be positive, got {value:g}")
    return value


def validate_settings(settings) -> None:
    """Every numeric and named setting of resolved `UpscaleSettings` (method defaults filled in)."""
    check_scale(settings.scale)
    _integer(settings.latent_tile, "latent tile", 8)
    _integer(settings.latent_overlap, "latent overlap", 0)
    if settings.latent_overlap >= settings.latent_tile:
        raise ValueError(f"latent overlap ({settings.latent_overlap}) must be smaller than the latent tile "
                         f"({settings.latent_tile})")
    _integer(settings.vae_encoder_tile, "VAE encoder tile", 8)
    _integer(settings.vae_decoder_tile, "VAE decoder tile", 1)
    _integer(settings.tile_batch, "tile batch", 1)
    _integer(settings.max_output_pixels, "pixel limit", 1)
    _finite(settings.guidance, "guidance")
    if settings.seed is not None:
        _integer(settings.seed, "seed", 0)
    _integer(settings.timestep_seed, "timestep seed", 0)
    if settings.vae_norm_stats not in NORM_STATS_MODES:
        raise ValueError(f"VAE statistics mode must be one of {', '.join(NORM_STATS_MODES)}, got {settings.vae_norm_stats!r}")
    if settings.output_size not in OUTPUT_SIZES:
        raise ValueError(f"output size must be one of {', '.join(OUTPUT_SIZES)}, got {settings.output_size!r}")
