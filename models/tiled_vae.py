"""Tiled VAE encode/decode for diffusers' AutoencoderKL (SD-2 structure) with shared GroupNorm statistics.

Why: the SD VAE at 2K-8K px does not fit in GPU memory in one piece, and naive tiling (each tile
normalised with its own GroupNorm statistics) gives visible tile-to-tile colour/contrast seams,
because GroupNorm is a *global* operation over the whole image. Here every tile runs the encoder or
decoder forward as a Python generator that stops at each GroupNorm, hands over its partial
statistics (count, mean, variance per tile and group, over the tile's core region only), and
resumes with the statistics of the whole stitched image. All tile batches advance in lockstep, so
each GroupNorm normalises with exactly the statistics the untiled model would compute for the
same activations.

The result differs from the untiled model only by two approximations:
- zero padding at tile borders (a tile sees `pad` px of context beyond its core; activations near
  the core edge that depend on data further away differ a little), and
- the mid-block self-attention runs per tile: each tile attends only within its padded window.

The generator forward re-implements diffusers' Encoder/Decoder forward (diffusers 0.42.1:
ResnetBlock2D, Attention with AttnProcessor2_0, Downsample2D, Upsample2D, UNetMidBlock2D) but calls
the submodules (`resnet.conv1(h)`, `attn.to_q(x)`, ...) so that wrapped modules (e.g. LoRA layers)
run their own forward. Only the GroupNorms are evaluated by us. Everything stays on the input's
device; the lockstep loop has no host round-trips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ProgressFn = Callable[[int, int], None]
InterruptFn = Callable[[], None]
# Debug hook: called at every GroupNorm with the module and the (B, G) statistics used to normalise.
StatsHook = Callable[[nn.GroupNorm, torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------------------------------
# Tile geometry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Half-open pixel rectangle [top, bottom) x [left, right)."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def shifted(self, dy: int, dx: int) -> Box:
        return Box(self.top + dy, self.bottom + dy, self.left + dx, self.right + dx)

    def scaled(self, num: int, den: int) -> Box:
        """Coordinates times num/den; they must stay integers (tiles are aligned to the stride)."""
        coords = (self.top, self.bottom, self.left, self.right)
        if any((c * num) % den for c in coords):
            raise ValueError(f"{self} is not aligned to a multiple of {den}")
        return Box(*(c * num // den for c in coords))


@dataclass(frozen=True)
class Tile:
    """One tile: the padded input window it reads and the core region it writes.

    Cores of all tiles partition the image exactly; windows contain their core, are clamped to the
    image and all have the same size (so tiles can be stacked into one batch).
    """

    window: Box
    core: Box

    @property
    def local_core(self) -> Box:
        """The core in the window's own coordinates."""
        return self.core.shifted(-self.window.top, -self.window.left)


def _axis_spans(size: int, tile: int, pad: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (window_start, window_end, core_start, core_end).

    Cores are balanced (equal up to `multiple`) rather than `tile, tile, ..., remainder`, and each
    window is centred on its core then shifted inside the image: same count of tiles as a regular
    grid, but every core gets at least `pad` context on each side that is not an image border, and
    the last tile is snapped to the border instead of shrinking.
    """
    window = min(tile + 2 * pad, size)
    if size <= tile + 2 * pad:
        return [(0, size, 0, size)]
    count = math.ceil(size / tile)
    units = size // multiple
    # floor(i * units / count + 1/2) in integers: strictly increasing since units >= count.
    bounds = [multiple * ((2 * i * units + count) // (2 * count)) for i in range(count + 1)]
    spans = []
    for core_start, core_end in zip(bounds[:-1], bounds[1:], strict=True):
        slack = (window - (core_end - core_start)) // 2 // multiple * multiple
        start = min(max(core_start - slack, 0), size - window)
        spans.append((start, start + window, core_start, core_end))
    return spans


def tile_grid(size_h: int, size_w: int, tile: int, pad: int, snap_multiple: int = 1) -> list[Tile]:
    """The tiles for an image of size_h x size_w, in row-major order.

    `tile` is the nominal core size and `pad` the context on each side. All positions and sizes
    are multiples of `snap_multiple` (tile is rounded down, pad up, to a multiple of it) so that a
    tile's feature maps align with the global ones at every downsampled resolution. An axis no
    longer than tile + 2*pad gets a single span covering it, so an image that fits gives one tile.
    """
    m = snap_multiple
    if m < 1 or size_h % m or size_w % m:
        raise ValueError(f"image size {size_h}x{size_w} must be a multiple of {m}")
    if tile < 1 or pad < 0:
        raise ValueError(f"need tile >= 1 and pad >= 0, got tile={tile}, pad={pad}")
    tile = max(m, tile // m * m)
    pad = math.ceil(pad / m) * m
    rows = _axis_spans(size_h, tile, pad, m)
    cols = _axis_spans(size_w, tile, pad, m)
    return [
        Tile(window=Box(wy0, wy1, wx0, wx1), core=Box(cy0, cy1, cx0, cx1))
        for wy0, wy1, cy0, cy1 in rows
        for wx0, wx1, cx0, cx1 in cols
    ]


@dataclass(frozen=True)
class _TileGeometry:
    """What a generator needs to know about its batch: the window size and each element's core."""

    window_h: int
    window_w: int
    local_cores: tuple[Box, ...]

    def cores_at(self, h: torch.Tensor) -> list[tuple[slice, slice]]:
        """Each batch element's core as slices into a feature map of h's resolution."""
        height, width = h.shape[-2:]
        if height * self.window_w != width * self.window_h:
            raise RuntimeError(f"feature map {height}x{width} does not match window {self.window_h}x{self.window_w}")
        if height >= self.window_h:  # upsampled (decoder): integer factor
            num, den = height // self.window_h, 1
        else:  # downsampled (encoder): exact because windows are aligned
            num, den = 1, self.window_h // height
        return [core.scaled(num, den).slices() for core in self.local_cores]


# --------------------------------------------------------------------------------------------------
# GroupNorm with statistics supplied from outside
# --------------------------------------------------------------------------------------------------


@dataclass
class _Partial:
    """Per-tile statistics of one GroupNorm input, over each tile's core: shapes (N,), (N, G), (N, G)."""

    norm: nn.GroupNorm
    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


# A generator forward: yields _Partial at each GroupNorm, receives (mean, var) of shape (N, G).
_Steps = Generator[_Partial, tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """float32 for fp16/bf16/fp32 activations, float64 stays float64."""
    return torch.promote_types(h.dtype, torch.float32)


def _partial_stats(norm: nn.GroupNorm, h: torch.Tensor, geometry: _TileGeometry) -> _Partial:
    """Mean and (biased) variance per tile and group over the core only, in float32 (or better).

    Mean/variance rather than sum/sum-of-squares: combining them with Chan's parallel formula does
    not suffer the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std.
    """
    groups = norm.num_groups
    means, variances, counts = [], [], []
    for i, (rows, cols) in enumerate(geometry.cores_at(h)):
        core = h[i, :, rows, cols].unflatten(0, (groups, -1)).to(_compute_dtype(h))
        var, mean = torch.var_mean(core, dim=(1, 2, 3), correction=0)
        means.append(mean)
        variances.append(var)
        # new_full is a device-side fill: no host-to-device copy, no synchronisation.
        counts.append(mean.new_full((), float(core[0].numel())))
    return _Partial(norm, torch.stack(counts), torch.stack(means), torch.stack(variances))


def _normalize(norm: nn.GroupNorm, h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of h with given (N, G) statistics; computed in float32 (or better), returned in h's dtype."""
    channels_per_group = h.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(channels_per_group, dim=1)  # (N, C)
    shift = -mean.repeat_interleave(channels_per_group, dim=1) * scale
    if norm.affine:
        weight = norm.weight.to(scale.dtype)
        shift = shift * weight + norm.bias.to(scale.dtype)
        scale = scale * weight
    # Mixed-dtype addcmul computes in float32 (float64) and casts on write: no float32 copy of h.
    out = torch.empty_like(h)
    return torch.addcmul(shift[:, :, None, None], h, scale[:, :, None, None], out=out)


def _group_norm(norm: nn.Module, h: torch.Tensor, geometry: _TileGeometry) -> _Steps:
    if not isinstance(norm, nn.GroupNorm):
        raise NotImplementedError(f"tiled VAE supports GroupNorm only, got {type(norm).__name__}")
    mean, var = yield _partial_stats(norm, h, geometry)
    return _normalize(norm, h, mean, var)


def _combine_stats(
    count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image statistics from per-tile ones (Chan et al.); tiles are ordered image-major.

    count (T,), mean/var (T, G) with T = n_images * tiles_per_image -> mean/var (n_images, G).
    """
    groups = mean.shape[-1]
    c = count.view(n_images, -1, 1)
    m = mean.view(n_images, -1, groups)
    v = var.view(n_images, -1, groups)
    total = c.sum(dim=1)
    global_mean = (c * m).sum(dim=1) / total
    global_var = (c * (v + (m - global_mean[:, None]) ** 2)).sum(dim=1) / total
    return global_mean, global_var


# --------------------------------------------------------------------------------------------------
# Generator re-implementation of the diffusers forward
# --------------------------------------------------------------------------------------------------


def _resnet(block: nn.Module, h: torch.Tensor, geometry: _TileGeometry) -> _Steps:
    """diffusers ResnetBlock2D.forward with temb=None (VAE blocks have no time embedding)."""
    # With temb=None every time_embedding_norm except scale_shift is a plain norm2.
    if block.upsample is not None or block.downsample is not None or block.time_embedding_norm == "scale_shift":
        raise NotImplementedError("tiled VAE supports plain ResnetBlock2D (no up/down, no scale_shift)")
    x = yield from _group_norm(block.norm1, h, geometry)
    x = block.nonlinearity(x)
    x = block.conv1(x)
    x = yield from _group_norm(block.norm2, x, geometry)
    x = block.nonlinearity(x)
    x = block.dropout(x)
    x = block.conv2(x)
    shortcut = block.conv_shortcut(h) if block.conv_shortcut is not None else h
    return (shortcut + x) / block.output_scale_factor


def _attention(attn: nn.Module, h: torch.Tensor, geometry: _TileGeometry) -> _Steps:
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
        x = x + residual
    return x / attn.rescale_output_factor


def _mid_block(mid: nn.Module, h: torch.Tensor, geometry: _TileGeometry) -> _Steps:
    """diffusers UNetMidBlock2D.forward: resnet, then (attention, resnet) pairs."""
    h = yield from _resnet(mid.resnets[0], h, geometry)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            h = yield from _attention(attn, h, geometry)
        h = yield from _resnet(resnet, h, geometry)
    return h


def _resnet_block_group(block: nn.Module, h: torch.Tensor, geometry: _TileGeometry) -> _Steps:
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


def _encoder_steps(encoder: nn.Module, x: torch.Tensor, geometry: _TileGeometry) -> _Steps:
    """diffusers Encoder.forward as a generator."""
    h = encoder.conv_in(x)
    for block in encoder.down_blocks:
        h = yield from _resnet_block_group(block, h, geometry)
    h = yield from _mid_block(encoder.mid_block, h, geometry)
    h = yield from _group_norm(encoder.conv_norm_out, h, geometry)
    h = encoder.conv_act(h)
    return encoder.conv_out(h)


def _decoder_steps(decoder: nn.Module, z: torch.Tensor, geometry: _TileGeometry) -> _Steps:
    """diffusers Decoder.forward (latent_embeds=None) as a generator."""
    h = decoder.conv_in(z)
    h = yield from _mid_block(decoder.mid_block, h, geometry)
    # Older diffusers cast to the up blocks' dtype here (a no-op when the decoder has one dtype).
    h = h.to(next(iter(decoder.up_blocks.parameters())).dtype)
    for block in decoder.up_blocks:
        h = yield from _resnet_block_group(block, h, geometry)
    h = yield from _group_norm(decoder.conv_norm_out, h, geometry)
    h = decoder.conv_act(h)
    return decoder.conv_out(h)


# --------------------------------------------------------------------------------------------------
# Lockstep driver
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One batch of tiles running through one generator."""

    items: list[tuple[int, Tile]]  # (image index, tile)
    steps: _Steps
    pending: _Partial | None = None
    output: torch.Tensor | None = None

    def advance(self, stats: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        try:
            self.pending = next(self.steps) if stats is None else self.steps.send(stats)
        except StopIteration as stop:
            self.pending, self.output = None, stop.value


class _Progress:
    """Reports tile-equivalents of work: tiles complete together at the end of a lockstep run, so
    progress is the fraction of (tile, segment) units done, expressed in tiles."""

    def __init__(self, callback: ProgressFn | None, total_tiles: int, segments: int):
        self.callback, self.total, self.segments = callback, total_tiles, segments
        self.units, self.reported = 0, -1

    def add(self, tiles: int) -> None:
        self.units += tiles
        self.report(min(self.total, self.units // self.segments))

    def report(self, done: int) -> None:
        if self.callback is not None and done != self.reported:
            self.reported = done
            self.callback(done, self.total)


def _make_jobs(
    x: torch.Tensor, tiles: Sequence[Tile], tile_batch: int, run: Callable[[torch.Tensor, _TileGeometry], _Steps]
) -> list[_Job]:
    items = [(b, tile) for b in range(x.shape[0]) for tile in tiles]  # image-major: see _combine_stats
    jobs = []
    for start in range(0, len(items), tile_batch):
        chunk = items[start : start + tile_batch]
        window = chunk[0][1].window
        stacked = torch.stack([x[b, :, tile.window.top : tile.window.bottom, tile.window.left : tile.window.right]
                               for b, tile in chunk])
        geometry = _TileGeometry(window.height, window.width, tuple(tile.local_core for _, tile in chunk))
        jobs.append(_Job(items=chunk, steps=run(stacked, geometry)))
    return jobs


def _exchange_stats(
    partials: list[_Partial], n_images: int, shared: bool, stats_hook: StatsHook | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The statistics each job normalises with: per image over all its tiles, or per tile."""
    norm = partials[0].norm
    if any(p.norm is not norm for p in partials):
        raise RuntimeError("tile generators fell out of lockstep")
    if not shared:  # negative control for tests: naive per-tile normalisation
        return ((p.mean, p.var) for p in partials)
    mean, var = _combine_stats(torch.cat([p.count for p in partials]), torch.cat([p.mean for p in partials]),
                               torch.cat([p.var for p in partials]), n_images)
    if stats_hook is not None:
        stats_hook(norm, mean, var)
    tiles_per_image = sum(len(p.count) for p in partials) // n_images
    mean_tiles = mean.repeat_interleave(tiles_per_image, dim=0)
    var_tiles = var.repeat_interleave(tiles_per_image, dim=0)
    sizes = [len(p.count) for p in partials]
    return zip(mean_tiles.split(sizes), var_tiles.split(sizes), strict=True)


def _run_lockstep(
    x: torch.Tensor,
    tiles: Sequence[Tile],
    tile_batch: int,
    run: Callable[[torch.Tensor, _TileGeometry], _Steps],
    scale: tuple[int, int],
    n_norms: int,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
    shared_stats: bool = True,
    stats_hook: StatsHook | None = None,
) -> torch.Tensor:
    """Run all tile batches in lockstep and assemble their core regions (scaled by num/den)."""
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    jobs = _make_jobs(x, tiles, tile_batch, run)
    counter = _Progress(progress, x.shape[0] * len(tiles), n_norms + 1)
    try:
        stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(jobs)
        while True:
            if check_interrupt is not None:
                check_interrupt()
            for job, job_stats in zip(jobs, stats, strict=True):
                job.advance(job_stats)
                counter.add(len(job.items))
            finished = [job.pending is None for job in jobs]
            if all(finished):
                break
            if any(finished):
                raise RuntimeError("tile generators fell out of lockstep")
            stats = list(_exchange_stats([job.pending for job in jobs], x.shape[0], shared_stats, stats_hook))
    finally:
        for job in jobs:
            job.steps.close()
    counter.report(counter.total)
    return _assemble(jobs, x.shape[0], x.shape[-2:], scale)


def _assemble(jobs: list[_Job], n_images: int, size: Sequence[int], scale: tuple[int, int]) -> torch.Tensor:
    """Write each tile's core (at output resolution) into the result; cores partition the image."""
    num, den = scale
    first = jobs[0].output
    result = first.new_empty(n_images, first.shape[1], size[0] * num // den, size[1] * num // den)
    for job in jobs:
        for output, (b, tile) in zip(job.output, job.items, strict=True):
            src_rows, src_cols = tile.local_core.scaled(num, den).slices()
            dst_rows, dst_cols = tile.core.scaled(num, den).slices()
            result[b, :, dst_rows, dst_cols] = output[:, src_rows, src_cols]
    return result


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _count_group_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.GroupNorm) for m in module.modules())


def _encoder_factor(vae: nn.Module) -> int:
    return 2 ** sum(1 for block in vae.encoder.down_blocks if getattr(block, "downsamplers", None))


def _decoder_factor(vae: nn.Module) -> int:
    return 2 ** sum(1 for block in vae.decoder.up_blocks if getattr(block, "upsamplers", None))


def _plain_encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """vae.encode(x).latent_dist.parameters without diffusers' own tiling/slicing."""
    moments = vae.encoder(x)
    quant_conv = getattr(vae, "quant_conv", None)
    return quant_conv(moments) if quant_conv is not None else moments


def _encode_lockstep(vae: nn.Module, x: torch.Tensor, tiles: Sequence[Tile], tile_batch: int = 4,
                     **options) -> torch.Tensor:
    """Encoder moments through the lockstep path (options: see _run_lockstep); used by tests."""
    factor = _encoder_factor(vae)
    moments = _run_lockstep(x, tiles, tile_batch, lambda t, g: _encoder_steps(vae.encoder, t, g),
                            (1, factor), _count_group_norms(vae.encoder), **options)
    quant_conv = getattr(vae, "quant_conv", None)
    return quant_conv(moments) if quant_conv is not None else moments


def _decode_lockstep(vae: nn.Module, z: torch.Tensor, tiles: Sequence[Tile], tile_batch: int = 4,
                     **options) -> torch.Tensor:
    """Decoded image through the lockstep path (options: see _run_lockstep); used by tests."""
    post_quant_conv = getattr(vae, "post_quant_conv", None)
    if post_quant_conv is not None:
        z = post_quant_conv(z)  # 1x1 conv: exact on the whole latent
    return _run_lockstep(z, tiles, tile_batch, lambda t, g: _decoder_steps(vae.decoder, t, g),
                         (_decoder_factor(vae), 1), _count_group_norms(vae.decoder), **options)


def _prepare_input(t: torch.Tensor, module: nn.Module, what: str) -> torch.Tensor:
    """Check the rank and cast to the module's dtype (from its parameters: conv_in may be a LoRA wrapper)."""
    if t.dim() != 4:
        raise ValueError(f"{what} must have shape (B, C, H, W), got {tuple(t.shape)}")
    return t.to(next(module.parameters()).dtype)


@torch.no_grad()
def encode_tiled(
    vae: nn.Module,
    x: torch.Tensor,
    tile_px: int = 1024,
    pad_px: int = 32,
    tile_batch: int = 4,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
) -> torch.Tensor:
    """Encode images in [-1, 1] (B, 3, H, W) to the encoder MOMENTS (B, 2*latent, H/8, W/8).

    Returns quant_conv's output (mean and logvar concatenated) so the caller picks mean or sample.
    H and W must be multiples of the VAE's downsampling factor (8). An image no larger than
    tile_px + 2*pad_px runs the plain diffusers encoder (exact); larger ones are tiled with shared
    GroupNorm statistics. progress(done, total) counts tiles (tile-equivalents of work while the
    lockstep run is in flight); check_interrupt() is called between lockstep steps and may raise.
    """
    factor = _encoder_factor(vae)
    x = _prepare_input(x, vae.encoder, "encoder input")
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"encoder input {height}x{width} must have H and W divisible by {factor}; pad or crop it")
    tiles = tile_grid(height, width, tile_px, pad_px, snap_multiple=factor)
    if len(tiles) == 1:
        if check_interrupt is not None:
            check_interrupt()
        moments = _plain_encode(vae, x)
        if progress is not None:
            progress(x.shape[0], x.shape[0])
        return moments
    return _encode_lockstep(vae, x, tiles, tile_batch, progress=progress, check_interrupt=check_interrupt)


@torch.no_grad()
def decode_tiled(
    vae: nn.Module,
    z: torch.Tensor,
    tile_latent: int = 224,
    pad_latent: int = 11,
    tile_batch: int = 4,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
) -> torch.Tensor:
    """Decode UNSCALED latents (already divided by the scaling factor) to images in [-1, 1].

    The output is not clamped (the caller clamps). A latent no larger than tile_latent +
    2*pad_latent runs the plain diffusers decoder (exact); larger ones are tiled with shared
    GroupNorm statistics. progress/check_interrupt as in encode_tiled.
    """
    z = _prepare_input(z, vae.decoder, "latent")
    tiles = tile_grid(z.shape[-2], z.shape[-1], tile_latent, pad_latent)
    if len(tiles) == 1:
        if check_interrupt is not None:
            check_interrupt()
        post_quant_conv = getattr(vae, "post_quant_conv", None)
        image = vae.decoder(post_quant_conv(z) if post_quant_conv is not None else z)
        if progress is not None:
            progress(z.shape[0], z.shape[0])
        return image
    return _decode_lockstep(vae, z, tiles, tile_batch, progress=progress, check_interrupt=check_interrupt)
