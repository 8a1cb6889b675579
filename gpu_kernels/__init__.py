"""Fused GPU kernels for the performance-critical pass (Triton, optional), each with a PyTorch path."""

from .group_norm import (
    KERNEL_MODES,
    chan_reduce,
    core_stats,
    group_norm_apply,
    kernels_used,
    set_kernels,
    triton_available,
)

__all__ = ["KERNEL_MODES", "chan_reduce", "core_stats", "group_norm_apply", "kernels_used", "set_kernels",
           "triton_available"]
