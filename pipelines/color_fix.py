"""Colour correction of the SR output towards the (upscaled) input, as in the official code.

OSEDiff, Hero-SR and S3Diff share the same two functions (from StableSR): AdaIN per-channel
mean/std matching, and a 5-level a-trous "wavelet" split that keeps the output's high frequencies
and takes the reference's low frequencies. Matching them exactly matters because the colour fix
sets the final colours of every published result.

Note: the official scripts apply the fix to PIL images (the model output already truncated to
8 bits by ToPILImage) and truncate again afterwards; that quantisation belongs to the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_METHODS: tuple[str, ...] = ("adain", "wavelet", "none")

_ADAIN_EPS = 1e-5
_WAVELET_LEVELS = 5
_BLUR_KERNEL = (
    (0.0625, 0.125, 0.0625),
    (0.125, 0.25, 0.125),
    (0.0625, 0.125, 0.0625),
)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input already is (MPS has no float64)."""
    if x.dtype == torch.float64 and x.device.type != "mps":
        return torch.float64
    return torch.float32


def _check_pair(output: torch.Tensor, reference: torch.Tensor, same_size: bool) -> torch.Tensor:
    """Validate shapes; return the reference expanded to the output's batch when it has one image."""
    if output.dim() != 4 or reference.dim() != 4:
        raise ValueError(
            f"expected (B, C, H, W) tensors, got {tuple(output.shape)} and {tuple(reference.shape)}"
        )
    if output.shape[1] != reference.shape[1]:
        raise ValueError(f"channel mismatch: {output.shape[1]} vs {reference.shape[1]}")
    if reference.shape[0] not in (1, output.shape[0]):
        raise ValueError(
            f"reference batch {reference.shape[0]} does not match output batch {output.shape[0]}"
        )
    if same_size and output.shape[-2:] != reference.shape[-2:]:
        raise ValueError(
            f"output {tuple(output.shape[-2:])} and reference {tuple(reference.shape[-2:])} sizes differ"
        )
    return reference.expand(output.shape[0], *reference.shape[1:])


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and sqrt(unbiased var + eps), as the official calc_mean_std.

    A single-pixel image has no unbiased variance (NaN in the official code); we use 0 there, so
    the result degenerates to the reference colour instead of NaN.
    """
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    correction = 1 if flat.shape[-1] > 1 else 0
    var = flat.var(dim=2, correction=correction) + _ADAIN_EPS
    return flat.mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)


def adain_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give each channel of `output` the mean and std of the same channel of `reference`."""
    reference = _check_pair(output, reference, same_size=False)
    dtype = _work_dtype(output)
    out = output.to(dtype)
    mean_out, std_out = _mean_std(out)
    mean_ref, std_ref = _mean_std(reference.to(device=output.device, dtype=dtype))
    result = (out - mean_out) / std_out * std_ref + mean_ref
    return result.clamp(0.0, 1.0).to(output.dtype)


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with the given dilation, depthwise, on replicate-padded edges.

    Replicate padding works for any size >= 1 (a 1x1 image padded by 16 is constant), unlike
    reflect padding.
    """
    c = x.shape[1]
    kernel = torch.tensor(_BLUR_KERNEL, dtype=x.dtype, device=x.device)[None, None].repeat(c, 1, 1, 1)
    padded = F.pad(x, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, kernel, groups=c, dilation=dilation)


def wavelet_decomposition(
    x: torch.Tensor, levels: int = _WAVELET_LEVELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (high, low) with dilations 1, 2, 4, ...; high + low == x up to rounding."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        low = wavelet_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, low


def wavelet_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of `output` plus the coarsest low frequencies of `reference` (same size)."""
    reference = _check_pair(output, reference, same_size=True)
    dtype = _work_dtype(output)
    high, _ = wavelet_decomposition(output.to(dtype))
    _, low = wavelet_decomposition(reference.to(device=output.device, dtype=dtype))
    return (high + low).clamp(0.0, 1.0).to(output.dtype)


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch to one of `COLOR_FIX_METHODS`; "none" only clamps to [0, 1]."""
    if method == "adain":
        return adain_color_fix(output, reference)
    if method == "wavelet":
        return wavelet_color_fix(output, reference)
    if method == "none":
        return output.clamp(0.0, 1.0)
    raise ValueError(f"unknown colour fix {method!r}; valid methods: {', '.join(COLOR_FIX_METHODS)}")
