"""The diffusers VAE encoder/decoder forward as generators that pause at every GroupNorm.

Why: GroupNorm is a global operation over the whole image, so a tile cannot normalise with its own
statistics without visible seams. Each generator yields the partial statistics of its tiles (count,
mean, variance per tile and group, over each tile's core only) and resumes with the statistics to
normalise with; the drivers in tiled_vae decide where those come from (all tiles of the image in
lockstep, or an estimate made beforehand).

The re-implementation follows diffusers' Encoder/Decoder forward (diffusers 0.42.1: ResnetBlock2D,
Attention with AttnProcessor2_0, Downsample2D, Upsample2D, UNetMidBlock2D) but calls the submodules
(`resnet.conv1(h)`, `attn.to_q(x)`, ...) so that wrapped modules (e.g. LoRA layers) run their own
forward. Only the GroupNorms are evaluated here.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..gpu_kernels import core_stats, group_norm_apply
from .vae_tiles import TileGeometry


@dataclass
class Partial:
    """Per-tile statistics of one GroupNorm input, over each tile's core: shapes (N,), (N, G), (N, G)."""

    norm: nn.GroupNorm
    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


# A generator forward: yields Partial at each GroupNorm, receives (mean, var) of shape (N, G).
Steps = Generator[Partial, tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def _partial_stats(norm: nn.GroupNorm, h: torch.Tensor, geometry: TileGeometry) -> Partial:
    """Mean and (biased) variance per tile and group over the core only, accumulated in float32 (or
    better) without a float32 copy of the tile (kernels.core_stats: Triton on the GPU, a few groups
    at a time in PyTorch).

    Mean/variance rather than sum/sum-of-squares: combining them with Chan's parallel formula does
    not suffer the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std.
    """
    count, mean, m2 = core_stats(h, geometry.cores_at(h), norm.num_groups)
    return Partial(norm, count, mean, m2 / count[:, None])


def _is_silu(module: nn.Module | None) -> bool:
    return isinstance(module, nn.SiLU)


def _group_norm(norm: nn.Module, h: torch.Tensor, geometry: TileGeometry, activation: nn.Module | None = None,
                inplace: bool = False) -> Steps:
    """GroupNorm with the statistics sent back by the driver, then `activation` (fused when it is SiLU).
    inplace: h is not needed afterwards, normalise it in place (no new tile-sized tensor)."""
    if not isinstance(norm, nn.GroupNorm):
        raise NotImplementedError(f"tiled VAE supports GroupNorm only, got {type(norm).__name__}")
    mean, var = yield _partial_stats(norm, h, geometry)
    fused = _is_silu(activation)
    out = group_norm_apply(h, mean, var, norm.eps, norm.weight if norm.affine else None,
                           norm.bias if norm.affine else None, silu=fused, inplace=inplace)
    return out if fused or activation is None else activation(out)


def combine_stats(
    count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, n_images: int,
    image_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image statistics from per-tile ones (Chan et al.).

    count (T,), mean/var (T, G); image_index (T,) says which image each tile belongs to (None: tiles are
    ordered image-major, T = n_images * tiles_per_image) -> mean/var (n_images, G).
    """
    if image_index is None:
        image_index = torch.arange(n_images, device=count.device).repeat_interleave(count.shape[0] // n_images)
    # Sums per image as a product with a one-hot (images x tiles) matrix: tiny, and (unlike index_add_,
    # measured 0.1 s per call on a busy CPU) as fast as any other small op on every device.
    one_hot = (image_index[None, :] == torch.arange(n_images, device=count.device)[:, None]).to(mean.dtype)
    weighted = one_hot * count.to(mean.dtype)[None, :]
    total = weighted.sum(1, keepdim=True)
    global_mean = (weighted @ mean) / total
    spread = var + (mean - global_mean.index_select(0, image_index)) ** 2
    global_var = (weighted @ spread) / total
    return global_mean, global_var


# --------------------------------------------------------------------------------------------------
# Generator re-implementation of the diffusers forward
# --------------------------------------------------------------------------------------------------

# A one-element list handing a tensor to a sub-generator. `h = yield from f(h)` would keep the input
# alive in the caller's frame until f returns (a whole resnet or block later); callers hold their
# activation only in a box (`box = [(yield from f(box))]`), the callee pops it and the tensor is freed as
# soon as the callee is done with it (the widest stage drops a tile-sized tensor).
Box = list




def _resnet(block: nn.Module, box: Box, geometry: TileGeometry) -> Steps:
    """diffusers ResnetBlock2D.forward with temb=None (VAE blocks have no time embedding).

    With a 1x1 conv shortcut (channels change), the shortcut is computed first so that h is free to be
    normalised in place: the same numbers with one tile-sized tensor fewer at the widest stage.
    """
    # With temb=None every time_embedding_norm except scale_shift is a plain norm2.
    if block.upsample is not None or block.downsample is not None or block.time_embedding_norm == "scale_shift":
        raise NotImplementedError("tiled VAE supports plain ResnetBlock2D (no up/down, no scale_shift)")
    h = box.pop()
    shortcut = block.conv_shortcut(h) if block.conv_shortcut is not None else h
    x = yield from _group_norm(block.norm1, h, geometry, block.nonlinearity, inplace=shortcut is not h)
    del h
    x = block.conv1(x)
    x = yield from _group_norm(block.norm2, x, geometry, block.nonlinearity, inplace=True)
    x = block.dropout(x)
    x = block.conv2(x)
    # In place on conv2's output (ours): no third tile-sized tensor. The sum cannot be fused into the
    # next GroupNorm: it is both that norm's input and the next block's shortcut.
    x = x.add_(shortcut)
    return x if block.output_scale_factor == 1 else x.div_(block.output_scale_factor)


def _attention(attn: nn.Module, box: Box, geometry: TileGeometry) -> Steps:
    """diffusers Attention + AttnProcessor2_0 for the VAE mid-block (self-attention over one tile).

    The attention itself is per batch element, i.e. per tile: the one approximation besides
    zero padding at tile borders. Softmax upcasting is implicit in scaled_dot_product_attention.
    """
    if attn.spatial_norm is not None or attn.norm_cross:
        raise NotImplementedError("tiled VAE does not support spatial-norm or cross attention")
    h = box.pop()
    residual = h
    n, channels, height, width = h.shape
    if attn.group_norm is not None:
        h = yield from _group_norm(attn.group_norm, h, geometry)
    x = h.view(n, channels, height * width).transpose(1, 2)
    query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(n, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    x = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    x = x.transpose(1, 2).reshape(n, -1, attn.heads * head_dim).to(query.dtype)
    x = attn.to_out[0](x)
    x = attn.to_out[1](x)
    x = x.transpose(-1, -2).reshape(n, channels, height, width)
    if attn.residual_connection:
        x = x.add_(residual)
    return x if attn.rescale_output_factor == 1 else x.div_(attn.rescale_output_factor)


def _mid_block(mid: nn.Module, box: Box, geometry: TileGeometry) -> Steps:
    """diffusers UNetMidBlock2D.forward: resnet, then (attention, resnet) pairs."""
    box = [(yield from _resnet(mid.resnets[0], box, geometry))]
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            box = [(yield from _attention(attn, box, geometry))]
        box = [(yield from _resnet(resnet, box, geometry))]
    return box.pop()


def _resnet_block_group(block: nn.Module, box: Box, geometry: TileGeometry) -> Steps:
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then the resampler modules as they are.

    Downsample2D (zero pad (0,1,0,1), stride-2 conv) and Upsample2D (nearest x2, conv) have no
    GroupNorm, so they are called whole; on a tile their zero pad lands at the tile border.
    """
    if getattr(block, "attentions", None):
        raise NotImplementedError(f"tiled VAE does not support {type(block).__name__}")
    for resnet in block.resnets:
        box = [(yield from _resnet(resnet, box, geometry))]
    h = box.pop()
    for resampler in getattr(block, "downsamplers", None) or ():
        h = resampler(h)
    for resampler in getattr(block, "upsamplers", None) or ():
        h = upsample_in_strips(resampler, h) if _strippable(resampler) else resampler(h)
    return h


# The upsampler runs in UPSAMPLE_STRIPS strips when its output has at least UPSAMPLE_MIN_ELEMENTS
# elements (smaller tensors are not worth the extra launches).
UPSAMPLE_STRIPS = 8
UPSAMPLE_MIN_ELEMENTS = 2**22


def _strippable(sampler: nn.Module) -> bool:
    """diffusers Upsample2D as the VAE uses it: nearest x2, then a 3x3 stride-1 conv with padding 1."""
    conv = getattr(sampler, "conv", None)
    base = getattr(conv, "base_layer", conv)  # a PEFT LoRA wrapper keeps the conv as base_layer
    return (type(sampler).__name__ == "Upsample2D" and getattr(sampler, "interpolate", False)
            and getattr(sampler, "use_conv", False) and not getattr(sampler, "use_conv_transpose", True)
            and getattr(sampler, "norm", None) is None and getattr(sampler, "name", "conv") == "conv"
            and isinstance(base, nn.Conv2d) and base.kernel_size == (3, 3) and base.stride == (1, 1)
            and base.padding == (1, 1) and base.dilation == (1, 1))


def upsample_in_strips(sampler: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Upsample2D(h) computed in horizontal strips: the x2 nearest-upsampled copy (4x the input, the
    largest temporary of the decoder) exists one strip at a time. Each strip of output rows is convolved
    with 2 upsampled rows of real context on each side (zero padding only at the image border, as in the
    whole-tensor conv) and cropped, so the result is the same as sampler(h)."""
    n, _, height, width = h.shape
    rows = -(-height // UPSAMPLE_STRIPS)  # input rows per strip
    if 4 * h.numel() < UPSAMPLE_MIN_ELEMENTS or rows >= height:
        return sampler(h)
    out = None
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        lo, hi = max(0, start - 1), min(height, stop + 1)  # one input row = two upsampled rows of context
        up = F.interpolate(h[:, :, lo:hi], scale_factor=2.0, mode="nearest")
        strip = sampler.conv(up)[:, :, 2 * (start - lo) : 2 * (start - lo) + 2 * (stop - start)]
        if out is None:
            out = torch.empty(n, strip.shape[1], 2 * height, 2 * width, dtype=strip.dtype, device=strip.device,
                              memory_format=_memory_format(h))
        out[:, :, 2 * start : 2 * stop] = strip
    return out


def _memory_format(h: torch.Tensor) -> torch.memory_format:
    channels_last = not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def encoder_steps(encoder: nn.Module, x: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers Encoder.forward as a generator."""
    box = [encoder.conv_in(x)]
    for block in encoder.down_blocks:
        box = [(yield from _resnet_block_group(block, box, geometry))]
    h = yield from _mid_block(encoder.mid_block, box, geometry)
    h = yield from _group_norm(encoder.conv_norm_out, h, geometry, encoder.conv_act, inplace=True)
    return encoder.conv_out(h)


def decoder_steps(decoder: nn.Module, z: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers Decoder.forward (latent_embeds=None) as a generator."""
    h = yield from _mid_block(decoder.mid_block, [decoder.conv_in(z)], geometry)
    # Older diffusers cast to the up blocks' dtype here (a no-op when the decoder has one dtype).
    box = [h.to(next(iter(decoder.up_blocks.parameters())).dtype)]
    del h
    for block in decoder.up_blocks:
        box = [(yield from _resnet_block_group(block, box, geometry))]
    h = box.pop()
    h = yield from _group_norm(decoder.conv_norm_out, h, geometry, decoder.conv_act, inplace=True)
    return decoder.conv_out(h)

