"""GroupNorm with externally supplied statistics, for the tiled VAE: the per-tile statistics and the
normalisation (fused with SiLU and an optional residual add), each with a Triton kernel and a
pure-PyTorch path that gives the same numbers within float32 rounding.

Which path runs: the Triton kernels on CUDA/ROCm tensors when Triton is installed, PyTorch elsewhere
(CPU, MPS) or when disabled (`set_kernels("off")`, or ONESTEP_SR_KERNELS=0). `set_kernels("on")` forces
the kernels even on CPU tensors, which works only under Triton's interpreter (TRITON_INTERPRET=1):
that is how the tests compare both paths without a GPU.

Statistics are (count, mean, M2) per tile and group, accumulated in float32 (float64 stays float64 on
the PyTorch path) and combined with Chan's formula, never as sum and sum of squares (cancellation when
|mean| >> std).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

KERNEL_MODES = ("auto", "on", "off")
_mode = os.environ.get("ONESTEP_SR_KERNELS", "auto").lower().replace("1", "auto").replace("0", "off")
# Bytes of float32 the PyTorch statistics path may copy at once (a few groups of one tile at a time).
STATS_CHUNK_BYTES = 32 * 2**20
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def set_kernels(mode: str) -> str:
    """'auto' (Triton on CUDA/ROCm when installed), 'on' (always: CPU needs TRITON_INTERPRET=1) or 'off'.
    Returns the previous mode."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


@functools.cache
def triton_available() -> bool:
    try:
        from . import triton_group_norm  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot initialise on this machine
        return False
    return True


def kernels_used(h: torch.Tensor) -> bool:
    """Whether the Triton path runs for this tensor."""
    if _mode == "off" or h.dtype not in _KERNEL_DTYPES or h.dim() != 4:
        return False
    if _mode == "on":
        return triton_available()
    return h.is_cuda and triton_available()


def _memory_format_contiguous(h: torch.Tensor) -> bool:
    return h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)


def _torch_core_stats(h: torch.Tensor, cores: Sequence[tuple[slice, slice]], groups: int):
    """PyTorch path: per tile, a few groups at a time, so a float16/bfloat16 input is never copied to
    float32 whole (STATS_CHUNK_BYTES at a time)."""
    dtype = _compute_dtype(h)
    counts, means, m2s = [], [], []
    for i, (rows, cols) in enumerate(cores):
        core = h[i, :, rows, cols].unflatten(0, (groups, -1))  # (G, C/G, h, w), a view
        per_group = core[0].numel()
        step = groups if core.dtype == dtype else max(1, STATS_CHUNK_BYTES // (4 * max(per_group, 1)))
        tile_means, tile_vars = [], []
        for g in range(0, groups, step):
            var, mean = torch.var_mean(core[g : g + step].to(dtype), dim=(1, 2, 3), correction=0)
            tile_means.append(mean)
            tile_vars.append(var)
        mean, var = torch.cat(tile_means), torch.cat(tile_vars)
        # new_full is a device-side fill: no host-to-device copy, no synchronisation.
        count = mean.new_full((), float(per_group))
        counts.append(count)
        means.append(mean)
        m2s.append(var * count)
    return torch.stack(counts), torch.stack(means), torch.stack(m2s)


def _splits(h: torch.Tensor, n_tiles: int, groups: int) -> int:
    """Programs per (tile, group): enough for a few waves on a large GPU, each with >= 64K elements."""
    per_group = h[0].numel() // groups
    return max(1, min(512 // max(1, n_tiles * groups) + 1, per_group // 65536 + 1))


def _kernel_core_stats(h: torch.Tensor, cores: Sequence[tuple[slice, slice]], groups: int):
    from . import triton_group_norm

    boxes = torch.tensor([(r.start, r.stop, c.start, c.stop) for r, c in cores], dtype=torch.int32)
    count, mean, m2 = triton_group_norm.core_stats(h, boxes.to(h.device), groups, _splits(h, len(cores), groups))
    return chan_reduce(count, mean, m2, dim=-1)


def chan_reduce(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, dim: int):
    """Chan et al.'s combination of (count, mean, M2) along `dim` (exact, no E[x^2] - E[x]^2)."""
    total = count.sum(dim)
    safe = total.clamp_min(1)
    combined_mean = (count * mean).sum(dim) / safe
    combined_m2 = (m2 + count * (mean - combined_mean.unsqueeze(dim)) ** 2).sum(dim)
    return total, combined_mean, combined_m2


def core_stats(h: torch.Tensor, cores: Sequence[tuple[slice, slice]], groups: int):
    """Per tile i and group: (count (N,), mean (N, G), M2 (N, G)) of h[i] over the core cores[i] only.

    count is the number of elements per group (the same for every group of a tile).
    """
    if h.shape[1] % groups:
        raise ValueError(f"{h.shape[1]} channels do not split into {groups} groups")
    if kernels_used(h):
        count, mean, m2 = _kernel_core_stats(h, cores, groups)
        return count[:, 0], mean, m2
    return _torch_core_stats(h, cores, groups)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def scale_and_shift(mean: torch.Tensor, var: torch.Tensor, channels: int, eps: float,
                    weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) scale and shift such that GroupNorm(x) = x * scale + shift, in float32 (or better)."""
    per_group = channels // mean.shape[1]
    scale = torch.rsqrt(var + eps).repeat_interleave(per_group, dim=1)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        w = weight.to(scale.dtype)
        shift = shift * w + (bias.to(scale.dtype) if bias is not None else 0)
        scale = scale * w
    return scale, shift


def group_norm_apply(h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, silu: bool = False,
                     residual: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """act(GroupNorm(h) with the given (N, G) mean and biased variance) (+ residual), in h's dtype and
    memory format; computed in float32. inplace=True overwrites h (the caller no longer needs it)."""
    scale, shift = scale_and_shift(mean, var, h.shape[1], eps, weight, bias)
    if kernels_used(h) and _memory_format_contiguous(h) and (
            residual is None or residual.stride() == h.stride()):
        from . import triton_group_norm

        out = h if inplace else torch.empty_like(h)
        return triton_group_norm.scale_shift(h, scale.float(), shift.float(), silu, residual, out)
    # Mixed-dtype addcmul computes in float32 (float64) and casts on write: no float32 copy of h.
    out = h if inplace else torch.empty_like(h)
    torch.addcmul(shift[:, :, None, None], h, scale[:, :, None, None], out=out)
    if silu:
        torch.nn.functional.silu(out, inplace=True)
    if residual is not None:
        out.add_(residual)
    return out
