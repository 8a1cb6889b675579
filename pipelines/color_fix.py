"""Colour correction of the SR output towards the (upscaled) input, as in the official code.

OSEDiff, Hero-SR and S3Diff share the same two functions (from StableSR): AdaIN per-channel
mean/std matching, and a 5-level a-trous "wavelet" split that keeps the output's high frequencies
and takes the reference's low frequencies. Matching them exactly matters because the colour fix
sets the final colours of every published result.

Note: the official scripts apply the fix to PIL images (the model output already truncated to
8 bits by ToPILImage) and truncate again afterwards; that quantisation belongs to the caller.

Beyond the official two (users of other upscaler packs expect these; when each helps is in the README):
- lab: AdaIN in CIELAB (Reinhard-style colour transfer): matches lightness and the two chroma axes
  separately, so a global cast is removed without the hue shifts per-RGB-channel matching can give.
- hsv: per pixel, hue and saturation of the reference, value (brightness, where the detail lives) of the
  output; the strongest colour fidelity, for outputs whose colours drifted locally.
- wavelet_adaptive: the wavelet fix applied only where the output's coarse colour departs from the
  reference's (weight grows with the difference), keeping the model's own coarse contrast elsewhere.
- strength: any fix blended with the uncorrected output (0 = no fix, 1 = full fix).
The colour-space conversions are plain torch (sRGB D65, the formulas skimage/colorsys use) rather than
kornia, to keep the node runtime's dependencies to torch; tests check them against skimage and colorsys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_METHODS: tuple[str, ...] = ("adain", "wavelet", "none", "lab", "hsv", "wavelet_adaptive")

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


# sRGB (D65) <-> XYZ, as in skimage.color (and the sRGB standard).
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_EPSILON = (6.0 / 29.0) ** 3
ADAPTIVE_THRESHOLD = 0.1  # coarse colour difference (RGB distance, 0-1 scale) at which wavelet_adaptive is fully on


def _require_rgb(x: torch.Tensor, method: str) -> None:
    if x.shape[1] != 3:
        raise ValueError(f"colour fix {method!r} needs RGB (3 channels), got {x.shape[1]}")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIELAB (L in 0..100), D65 white."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    f = torch.where(xyz > _LAB_EPSILON, xyz.clamp_min(0) ** (1.0 / 3.0), xyz * (841.0 / 108.0) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_lab` (not clamped: out-of-gamut colours are clamped by the caller)."""
    big_l, a, b = lab.unbind(1)
    fy = (big_l + 16.0) / 116.0
    f = torch.stack((fy + a / 500.0, fy, fy - b / 200.0), dim=1)
    xyz = torch.where(f > 6.0 / 29.0, f**3, (f - 4.0 / 29.0) * (108.0 / 841.0))
    white = torch.tensor(_D65_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = torch.einsum("ij,bjhw->bihw", inverse, xyz * white)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0) ** (1.0 / 2.4) - 0.055, linear * 12.92)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1), as colorsys.rgb_to_hsv."""
    r, g, b = rgb.unbind(1)
    value, arg = rgb.max(dim=1)
    delta = value - rgb.min(dim=1).values
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = delta.clamp_min(1e-12)
    hue = torch.where(arg == 0, (g - b) / safe, torch.where(arg == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv` (colorsys.hsv_to_rgb's sector formula)."""
    hue, saturation, value = hsv.unbind(1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * frac)
    t = value * (1.0 - saturation * (1.0 - frac))
    sector = sector.long() % 6
    choices = ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))
    channels = []
    for c in range(3):
        out = torch.zeros_like(value)
        for index, choice in enumerate(choices):
            out = torch.where(sector == index, choice[c], out)
        channels.append(out)
    return torch.stack(channels, dim=1)


def lab_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image mean/std of L, a and b of `reference` given to `output` (AdaIN in CIELAB)."""
    reference = _check_pair(output, reference, same_size=False)
    _require_rgb(output, "lab")
    dtype = _work_dtype(output)
    out_lab = rgb_to_lab(output.to(dtype).clamp(0.0, 1.0))
    ref_lab = rgb_to_lab(reference.to(device=output.device, dtype=dtype).clamp(0.0, 1.0))
    mean_out, std_out = _mean_std(out_lab)
    mean_ref, std_ref = _mean_std(ref_lab)
    result = lab_to_rgb((out_lab - mean_out) / std_out * std_ref + mean_ref)
    return result.clamp(0.0, 1.0).to(output.dtype)


def hsv_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Hue and saturation of `reference`, value of `output`, per pixel (same size)."""
    reference = _check_pair(output, reference, same_size=True)
    _require_rgb(output, "hsv")
    dtype = _work_dtype(output)
    out_hsv = rgb_to_hsv(output.to(dtype).clamp(0.0, 1.0))
    ref_hsv = rgb_to_hsv(reference.to(device=output.device, dtype=dtype).clamp(0.0, 1.0))
    merged = torch.stack((ref_hsv[:, 0], ref_hsv[:, 1], out_hsv[:, 2]), dim=1)
    return hsv_to_rgb(merged).clamp(0.0, 1.0).to(output.dtype)


def wavelet_adaptive_color_fix(output: torch.Tensor, reference: torch.Tensor,
                               threshold: float = ADAPTIVE_THRESHOLD) -> torch.Tensor:
    """The wavelet fix weighted per pixel by how far the coarse colours are apart: weight
    min(1, |low_ref - low_out| / threshold) (RGB distance), so small departures are kept."""
    reference = _check_pair(output, reference, same_size=True)
    dtype = _work_dtype(output)
    high, low_out = wavelet_decomposition(output.to(dtype))
    _, low_ref = wavelet_decomposition(reference.to(device=output.device, dtype=dtype))
    difference = low_ref - low_out
    weight = (difference.norm(dim=1, keepdim=True) / threshold).clamp(max=1.0)
    return (high + low_out + weight * difference).clamp(0.0, 1.0).to(output.dtype)


_FIXES = {
    "adain": adain_color_fix,
    "wavelet": wavelet_color_fix,
    "lab": lab_color_fix,
    "hsv": hsv_color_fix,
    "wavelet_adaptive": wavelet_adaptive_color_fix,
}


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str, strength: float = 1.0) -> torch.Tensor:
    """Dispatch to one of `COLOR_FIX_METHODS`, blended with the unfixed output by `strength` in [0, 1];
    "none" only clamps to [0, 1]."""
    if method != "none" and method not in _FIXES:
        raise ValueError(f"unknown colour fix {method!r}; valid methods: {', '.join(COLOR_FIX_METHODS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour fix strength must be in [0, 1], got {strength}")
    clamped = output.clamp(0.0, 1.0)
    if method == "none" or strength == 0.0:
        return clamped
    fixed = _FIXES[method](output, reference)
    if strength == 1.0:
        return fixed
    return torch.lerp(clamped.to(fixed.dtype), fixed, strength)
