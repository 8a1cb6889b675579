"""Triton kernels for the tiled VAE's GroupNorm: per-tile core statistics and normalisation with given
statistics fused with SiLU (and an optional residual add), for NCHW- or channels-last-contiguous
fp16/bf16/fp32 tensors, always accumulating in float32.

Why our own kernels: the tiled VAE normalises every tile with statistics of the whole image, which no
library GroupNorm accepts (they all compute their own). In PyTorch that costs a float32 copy of each
tile's core for the statistics, a second full pass for the affine transform and a third for SiLU; here
the statistics read each activation once and the normalisation reads it once more and writes once
(in place where the caller allows it).

Import this module only when Triton is installed (gpu_kernels/group_norm.py does it lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATS_BLOCK = 1024
APPLY_BLOCK = 1024


@triton.jit
def _core_stats_kernel(
    x_ptr, cores_ptr, count_ptr, mean_ptr, m2_ptr,
    stride_n, stride_c, stride_h, stride_w,
    groups, channels_per_group, splits,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (tile, group, split): Chan-combined (count, mean, M2) over its share of the core."""
    pid = tl.program_id(0)
    split = pid % splits
    ng = pid // splits
    group = ng % groups
    n = ng // groups
    top = tl.load(cores_ptr + n * 4 + 0)
    bottom = tl.load(cores_ptr + n * 4 + 1)
    left = tl.load(cores_ptr + n * 4 + 2)
    right = tl.load(cores_ptr + n * 4 + 3)
    core_w = right - left
    total = channels_per_group * (bottom - top) * core_w
    chunk = tl.cdiv(tl.cdiv(total, splits), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, total)
    base = x_ptr + n.to(tl.int64) * stride_n + (group * channels_per_group).to(tl.int64) * stride_c

    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for offset in range(start, end, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < end
        if CHANNELS_LAST:  # channel fastest: contiguous in memory
            c = idx % channels_per_group
            pixel = idx // channels_per_group
        else:  # column fastest
            c = idx // ((bottom - top) * core_w)
            pixel = idx % ((bottom - top) * core_w)
        y = top + pixel // core_w
        x = left + pixel % core_w
        ptrs = base + c.to(tl.int64) * stride_c + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w
        values = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        block_count = tl.sum(mask.to(tl.float32), axis=0)
        block_mean = tl.sum(values, axis=0) / tl.maximum(block_count, 1.0)
        centred = tl.where(mask, values - block_mean, 0.0)
        block_m2 = tl.sum(centred * centred, axis=0)
        # Chan et al.: merge the block into the running (count, mean, M2).
        new_count = count + block_count
        delta = block_mean - mean
        ratio = block_count / tl.maximum(new_count, 1.0)
        mean = mean + delta * ratio
        m2 = m2 + block_m2 + delta * delta * count * ratio
        count = new_count
    tl.store(count_ptr + pid, count)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, m2)


def core_stats(h: torch.Tensor, cores: torch.Tensor, groups: int, splits: int) -> tuple[torch.Tensor, ...]:
    """(count, mean, M2) of shape (N, G, splits), float32, over each tile's core box (N, 4) int32 of
    (top, bottom, left, right) in h's coordinates."""
    n, channels = h.shape[:2]
    channels_last = h.dim() == 4 and h.stride(1) == 1 and channels > 1
    out = [torch.empty(n, groups, splits, device=h.device, dtype=torch.float32) for _ in range(3)]
    _core_stats_kernel[(n * groups * splits,)](
        h, cores, *out, *h.stride(), groups, channels // groups, splits,
        CHANNELS_LAST=channels_last, BLOCK=STATS_BLOCK,
    )
    return tuple(out)


@triton.jit
def _scale_shift_kernel(
    x_ptr, out_ptr, scale_ptr, shift_ptr, residual_ptr, numel, channels, plane,
    CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = act(x * scale[n, c] + shift[n, c]) (+ residual), elementwise over a contiguous tensor."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if CHANNELS_LAST:
        c = idx % channels
        n = idx // (channels * plane)
    else:
        c = (idx // plane) % channels
        n = idx // (channels * plane)
    row = n * channels + c
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + row, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + row, mask=mask, other=0.0)
    y = x * scale + shift
    if SILU:
        y = y * tl.sigmoid(y)
    if RESIDUAL:
        y = y + tl.load(residual_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


def scale_shift(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool,
                residual: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The elementwise pass; h, out (and residual) share one contiguous memory format; scale and shift
    are (N, C) float32."""
    n, channels, height, width = h.shape
    channels_last = not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
    numel = h.numel()
    grid = (triton.cdiv(numel, APPLY_BLOCK),)
    _scale_shift_kernel[grid](
        h, out, scale.contiguous(), shift.contiguous(), residual if residual is not None else h,
        numel, channels, height * width,
        CHANNELS_LAST=channels_last, SILU=silu, RESIDUAL=residual is not None, BLOCK=APPLY_BLOCK,
    )
    return out
