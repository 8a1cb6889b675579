"""Channel handling around the RGB-only model: grayscale and alpha inputs.

The methods see RGB. Grayscale is replicated to RGB and the result turned back into one channel;
alpha is upscaled on its own with a plain resize and re-attached, so nothing of the input is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SplitChannels:
    rgb: torch.Tensor  # (B, 3, H, W)
    alpha: torch.Tensor | None  # (B, 1, H, W)
    grayscale: bool


def split_channels(image: torch.Tensor) -> SplitChannels:
    """(B, C, H, W) with C in 1..4 -> RGB + optional alpha."""
    channels = image.shape[1]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"images must have 1 to 4 channels (gray, gray+alpha, RGB, RGBA), got {channels}")
    color = image[:, : 1 if channels <= 2 else 3]
    alpha = image[:, -1:] if channels in (2, 4) else None
    grayscale = channels <= 2
    rgb = color.expand(-1, 3, -1, -1) if grayscale else color
    return SplitChannels(rgb=rgb.contiguous(), alpha=alpha, grayscale=grayscale)


def merge_channels(rgb: torch.Tensor, alpha: torch.Tensor | None, grayscale: bool) -> torch.Tensor:
    """Inverse of split_channels at the output size (gray = ITU-R 601 luma of the result)."""
    color = rgb
    if grayscale:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        color = (rgb * weights).sum(dim=1, keepdim=True)
    if alpha is not None:
        color = torch.cat([color, alpha.to(color)], dim=1)
    return color.clamp(0, 1)
