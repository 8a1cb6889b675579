"""VPD-SR's High-Frequency Perception (HFP) loss: compare the high-frequency content of the student's
output and the target, on top of the distillation/reconstruction loss.

Only the abstract of VPD-SR is available (no code); it names an HFP loss "to provide high-frequency
perception". Our formula (docs/training.md, "VPD-SR: high-frequency perception"): the orthonormal
2-D Haar wavelet transform, repeated `levels` times on the low band; the loss is the per-image
mean |difference| ("l1", default) or squared difference ("mse") of the three detail bands (LH, HL,
HH) at every level, summed over levels with `level_weights`:

    L = sum_j w_j * mean over (band, c, y, x) of |H_j(SR) - H_j(target)|

Why Haar: exact, parameter-free and cheap, and it isolates exactly the content a smooth (blurry)
output lacks; low-frequency differences are left to the reconstruction loss. Works on images or
latents (any channel count). Odd sizes are padded by one replicated row/column before each level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reduction import check_reduction, reduce

NORMS = ("l1", "mse")


def haar_level(x: Tensor) -> tuple[Tensor, Tensor]:
    """One orthonormal Haar level of (B, C, H, W): (low band (B, C, H/2, W/2), details (B, 3, C, H/2, W/2)).

    For each 2x2 block [[a, b], [c, d]]: LL = (a+b+c+d)/2, LH = (a+b-c-d)/2, HL = (a-b+c-d)/2,
    HH = (a-b-c+d)/2."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    low = (a + b + c + d) / 2
    details = torch.stack([(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], dim=1)
    return low, details


def haar_details(x: Tensor, levels: int) -> list[Tensor]:
    """The detail bands of each level, finest first."""
    out = []
    for _ in range(levels):
        x, details = haar_level(x)
        out.append(details)
    return out


class HighFrequencyPerceptionLoss(nn.Module):
    """Haar detail-band distance between the student's output and the target."""

    def __init__(self, levels: int = 2, level_weights: Sequence[float] | None = None, norm: str = "l1",
                 reduction: str = "mean") -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        weights = [1.0] * levels if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != levels:
            raise ValueError(f"{len(weights)} level weights for {levels} levels")
        self.levels, self.level_weights, self.norm = levels, tuple(weights), norm
        self.reduction = check_reduction(reduction)

    def forward(self, sr: Tensor, target: Tensor) -> Tensor:
        if sr.shape != target.shape:
            raise ValueError(f"shapes differ: {tuple(sr.shape)} vs {tuple(target.shape)}")
        loss = sr.new_zeros(sr.shape[0], dtype=torch.float32)
        pairs = zip(haar_details(sr.float(), self.levels), haar_details(target.float().detach(), self.levels),
                    strict=True)
        for weight, (ds, dt) in zip(self.level_weights, pairs, strict=True):
            diff = ds - dt
            per_image = diff.abs() if self.norm == "l1" else diff ** 2
            loss = loss + weight * per_image.reshape(diff.shape[0], -1).mean(dim=1)
        return reduce(loss, self.reduction)
