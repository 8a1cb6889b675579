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

from ..kernels import core_stats, group_norm_apply
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
    groups = mean.shape[-1]
    c = count[:, None].to(mean.dtype).expand(-1, groups)
    total = mean.new_zeros(n_images, groups).index_add_(0, image_index, c)
    global_mean = mean.new_zeros(n_images, groups).index_add_(0, image_index, c * mean) / total
    spread = c * (var + (mean - global_mean.index_select(0, image_index)) ** 2)
    global_var = mean.new_zeros(n_images, groups).index_add_(0, image_index, spread) / total
    return global_mean, global_var


# --------------------------------------------------------------------------------------------------
# Generator re-implementation of the diffusers forward
# --------------------------------------------------------------------------------------------------


def _resnet(block: nn.Module, h: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers ResnetBlock2D.forward with temb=None (VAE blocks have no time embedding)."""
    # With temb=None every time_embedding_norm except scale_shift is a plain norm2.
    if block.upsample is not None or block.downsample is not None or block.time_embedding_norm == "scale_shift":
        raise NotImplementedError("tiled VAE supports plain ResnetBlock2D (no up/down, no scale_shift)")
    x = yield from _group_norm(block.norm1, h, geometry, block.nonlinearity)  # h is the shortcut: kept
    x = block.conv1(x)
    x = yield from _group_norm(block.norm2, x, geometry, block.nonlinearity, inplace=True)
    x = block.dropout(x)
    x = block.conv2(x)
    shortcut = block.conv_shortcut(h) if block.conv_shortcut is not None else h
    # In place on conv2's output (ours): no third tile-sized tensor. The sum cannot be fused into the
    # next GroupNorm: it is both that norm's input and the next block's shortcut.
    x = x.add_(shortcut)
    return x if block.output_scale_factor == 1 else x.div_(block.output_scale_factor)


def _attention(attn: nn.Module, h: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers Attention + AttnProcessor2_0 for the VAE mid-block (self-attention over one tile).

    The attention itself is per batch element, i.e. per tile: the one approximation besides
    zero padding at tile borders. Softmax upcasting is implicit in scaled_dot_product_attention.
    """
    if attn.spatial_norm is not None or attn.norm_cross:
        raise NotImplementedError("tiled VAE does not support spatial-norm or cross attention")
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


def _mid_block(mid: nn.Module, h: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers UNetMidBlock2D.forward: resnet, then (attention, resnet) pairs."""
    h = yield from _resnet(mid.resnets[0], h, geometry)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            h = yield from _attention(attn, h, geometry)
        h = yield from _resnet(resnet, h, geometry)
    return h


def _resnet_block_group(block: nn.Module, h: torch.Tensor, geometry: TileGeometry) -> Steps:
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then the resampler modules as they are.

    Downsample2D (zero pad (0,1,0,1), stride-2 conv) and Upsample2D (nearest x2, conv) have no
    GroupNorm, so they are called whole; on a tile their zero pad lands at the tile border.
    """
    if getattr(block, "attentions", None):
        raise NotImplementedError(f"tiled VAE does not support {type(block).__name__}")
    for resnet in block.resnets:
        h = yield from _resnet(resnet, h, geometry)
    for resampler in getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or ():
        h = resampler(h)
    return h


def encoder_steps(encoder: nn.Module, x: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers Encoder.forward as a generator."""
    h = encoder.conv_in(x)
    for block in encoder.down_blocks:
        h = yield from _resnet_block_group(block, h, geometry)
    h = yield from _mid_block(encoder.mid_block, h, geometry)
    h = yield from _group_norm(encoder.conv_norm_out, h, geometry, encoder.conv_act, inplace=True)
    return encoder.conv_out(h)


def decoder_steps(decoder: nn.Module, z: torch.Tensor, geometry: TileGeometry) -> Steps:
    """diffusers Decoder.forward (latent_embeds=None) as a generator."""
    h = decoder.conv_in(z)
    h = yield from _mid_block(decoder.mid_block, h, geometry)
    # Older diffusers cast to the up blocks' dtype here (a no-op when the decoder has one dtype).
    h = h.to(next(iter(decoder.up_blocks.parameters())).dtype)
    for block in decoder.up_blocks:
        h = yield from _resnet_block_group(block, h, geometry)
    h = yield from _group_norm(decoder.conv_norm_out, h, geometry, decoder.conv_act, inplace=True)
    return decoder.conv_out(h)

