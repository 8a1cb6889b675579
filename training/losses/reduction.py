"""Shared reduction rule: every loss here computes one value per image, then reduces."""

from __future__ import annotations

from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    return reduction


def reduce(per_image: Tensor, reduction: str) -> Tensor:
    """(B,) per-image values -> scalar ("mean", "sum") or unchanged ("none")."""
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch (the SinSR/ResShift `mean_flat`)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
