"""Tiled VAE encode/decode for diffusers' AutoencoderKL (SD-2 structure) with shared GroupNorm statistics.

Why: the SD VAE at 2K-8K px does not fit in memory in one piece, and naive tiling (each tile
normalised with its own GroupNorm statistics) gives visible tile-to-tile colour/contrast seams,
because GroupNorm is a global operation over the whole image. Every tile runs the forward of
vae_steps, which pauses at each GroupNorm; this module decides which statistics it resumes with:

- exact: all tile batches advance in lockstep and normalise with the statistics of the whole
  stitched image (combined on the device with Chan's formula). Equal to the untiled model up to zero
  padding at tile borders and per-tile mid-block attention, but every tile's activation of the
  current layer is alive at once: memory grows with the image.
- estimated: the statistics of every GroupNorm are first measured by running a sparse grid of small
  probe tiles in lockstep (a stratified sample of the image at full resolution), then the tiles run
  one batch at a time from input to output with those statistics. Memory is bounded by the tile
  batch, whatever the image size; the cost is the probe pass (about a quarter of the tiles' work at
  most) and statistics that are estimates.
- auto (the default): untiled when the memory model (vae_memory) says the whole image fits in the
  memory the device has free (exact, and the exact tiled run never needs less: its windows overlap),
  estimated otherwise, and estimated again if the untiled run runs out of memory anyway.

Untiled means one window per image through the same generator forward: GroupNorm statistics of the
whole image, in-place SiLU and normalisation, the fused kernels on the GPU (gpu_kernels/), so it needs
less memory than diffusers' own forward and gives its numbers up to float rounding.

Everything stays on the input's device; neither driver moves tiles through host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .device_memory import TORCH_MEMORY, MemoryProvider, is_out_of_memory
from .vae_memory import forward_profile, lockstep_bytes, untiled_bytes
from .vae_steps import Partial, Steps, combine_stats, decoder_steps, encoder_steps
from .vae_tiles import Tile, TileGeometry, probe_grid, tile_grid

log = logging.getLogger("onestep_sr")

ProgressFn = Callable[[int, int], None]
InterruptFn = Callable[[], None]
# Debug hook: called at every GroupNorm with the module and the (B, G) statistics used to normalise.
StatsHook = Callable[[nn.GroupNorm, torch.Tensor, torch.Tensor], None]
# Per GroupNorm in forward order: the module and the (B, G) mean and variance to normalise with.
NormStats = list[tuple[nn.GroupNorm, torch.Tensor, torch.Tensor]]

NORM_STATS_MODES = ("auto", "exact", "estimated")
MEMORY_HEADROOM = 0.7  # share of the free memory the untiled run may plan to use
PROBE_WORK_SHARE = 0.5  # the probe pass does at most this share of the tiles' work
PROBE_MAX_WINDOWS = 4  # ... and holds at most this many tile windows' activations
PROBE_CORE_SHARE = 2  # a probe's core side is the tile size divided by this


# --------------------------------------------------------------------------------------------------
# Jobs: one batch of tiles running through one generator
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    items: list[tuple[int, Tile]]  # (image index, tile)
    steps: Steps
    image_index: torch.Tensor  # (len(items),) on the device: each tile's image
    pending: Partial | None = None
    output: torch.Tensor | None = None

    def advance(self, stats: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        try:
            self.pending = next(self.steps) if stats is None else self.steps.send(stats)
        except StopIteration as stop:
            self.pending, self.output = None, stop.value


RunFn = Callable[[torch.Tensor, TileGeometry], Steps]


def _make_job(x: torch.Tensor, items: list[tuple[int, Tile]], run: RunFn) -> _Job:
    window = items[0][1].window
    stacked = torch.stack([x[b, :, tile.window.top : tile.window.bottom, tile.window.left : tile.window.right]
                           for b, tile in items])
    geometry = TileGeometry(window.height, window.width, tuple(tile.local_core for _, tile in items))
    image_index = torch.tensor([b for b, _ in items], device=x.device)
    return _Job(items=items, steps=run(stacked, geometry), image_index=image_index)


def _batches(n_images: int, tiles: Sequence[Tile], tile_batch: int) -> list[list[tuple[int, Tile]]]:
    """(image, tile) pairs grouped by window size (one batch stacks windows of one size), in first-seen
    order, each group cut into batches of tile_batch."""
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    groups: dict[tuple[int, int], list[tuple[int, Tile]]] = {}
    for b in range(n_images):
        for tile in tiles:
            groups.setdefault((tile.window.height, tile.window.width), []).append((b, tile))
    return [items[start : start + tile_batch] for items in groups.values()
            for start in range(0, len(items), tile_batch)]


def _write_cores(result: torch.Tensor, job: _Job, scale: tuple[int, int]) -> None:
    """Write each tile's core (at output resolution) into the result; cores partition the image."""
    num, den = scale
    for output, (b, tile) in zip(job.output, job.items, strict=True):
        src_rows, src_cols = tile.local_core.scaled(num, den).slices()
        dst_rows, dst_cols = tile.core.scaled(num, den).slices()
        result[b, :, dst_rows, dst_cols] = output[:, src_rows, src_cols]


def _new_result(first: torch.Tensor, n_images: int, size: Sequence[int], scale: tuple[int, int]) -> torch.Tensor:
    num, den = scale
    return first.new_empty(n_images, first.shape[1], size[0] * num // den, size[1] * num // den)


# --------------------------------------------------------------------------------------------------
# Exact statistics: all jobs in lockstep
# --------------------------------------------------------------------------------------------------


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


def _exchange_stats(
    jobs: list[_Job], n_images: int, shared: bool, stats_hook: StatsHook | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The statistics each job normalises with: per image over all its tiles, or per tile."""
    partials = [job.pending for job in jobs]
    norm = partials[0].norm
    if any(p.norm is not norm for p in partials):
        raise RuntimeError("tile generators fell out of lockstep")
    if not shared:  # negative control for tests: naive per-tile normalisation
        return ((p.mean, p.var) for p in partials)
    mean, var = combine_stats(torch.cat([p.count for p in partials]), torch.cat([p.mean for p in partials]),
                              torch.cat([p.var for p in partials]), n_images,
                              torch.cat([job.image_index for job in jobs]))
    if stats_hook is not None:
        stats_hook(norm, mean, var)
    return ((mean.index_select(0, job.image_index), var.index_select(0, job.image_index)) for job in jobs)


def _drive_lockstep(jobs: list[_Job], n_images: int, counter: _Progress, check_interrupt: InterruptFn | None,
                    shared_stats: bool, stats_hook: StatsHook | None) -> None:
    """Advance every job to its next GroupNorm, exchange statistics, repeat until all have finished."""
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
                return
            if any(finished):
                raise RuntimeError("tile generators fell out of lockstep")
            stats = list(_exchange_stats(jobs, n_images, shared_stats, stats_hook))
    finally:
        for job in jobs:
            job.steps.close()


def _run_lockstep(
    x: torch.Tensor,
    tiles: Sequence[Tile],
    tile_batch: int,
    run: RunFn,
    scale: tuple[int, int],
    n_norms: int,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
    shared_stats: bool = True,
    stats_hook: StatsHook | None = None,
) -> torch.Tensor:
    """Run all tile batches in lockstep and assemble their core regions (scaled by num/den)."""
    n_images = x.shape[0]
    jobs = [_make_job(x, items, run) for items in _batches(n_images, tiles, tile_batch)]
    counter = _Progress(progress, n_images * len(tiles), n_norms + 1)
    _drive_lockstep(jobs, n_images, counter, check_interrupt, shared_stats, stats_hook)
    counter.report(counter.total)
    result = _new_result(jobs[0].output, n_images, x.shape[-2:], scale)
    for job in jobs:
        _write_cores(result, job, scale)
    return result


# --------------------------------------------------------------------------------------------------
# Estimated statistics: probes in lockstep, then tiles streamed one batch at a time
# --------------------------------------------------------------------------------------------------


def _estimate_stats(x: torch.Tensor, probes: Sequence[Tile], tile_batch: int, run: RunFn,
                    check_interrupt: InterruptFn | None = None) -> NormStats:
    """Per-image statistics of every GroupNorm, measured on the probe tiles in lockstep."""
    recorded: NormStats = []
    jobs = [_make_job(x, items, run) for items in _batches(x.shape[0], probes, tile_batch)]
    _drive_lockstep(jobs, x.shape[0], _Progress(None, 1, 1), check_interrupt, shared_stats=True,
                    stats_hook=lambda norm, mean, var: recorded.append((norm, mean, var)))
    return recorded


def _run_streamed(
    x: torch.Tensor,
    tiles: Sequence[Tile],
    tile_batch: int,
    run: RunFn,
    scale: tuple[int, int],
    stats: NormStats,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
) -> torch.Tensor:
    """Run each tile batch from input to output with the given statistics, then drop it."""
    n_images = x.shape[0]
    total, done = n_images * len(tiles), 0
    result = None
    for items in _batches(n_images, tiles, tile_batch):
        if check_interrupt is not None:
            check_interrupt()
        job = _make_job(x, items, run)
        index = job.image_index
        try:
            job.advance(None)
            for norm, mean, var in stats:
                if job.pending is None or job.pending.norm is not norm:
                    raise RuntimeError("the estimated statistics do not match this VAE's GroupNorms")
                job.advance((mean.index_select(0, index), var.index_select(0, index)))
            if job.pending is not None:
                raise RuntimeError("the estimated statistics do not match this VAE's GroupNorms")
        finally:
            job.steps.close()
        if result is None:
            result = _new_result(job.output, n_images, x.shape[-2:], scale)
        _write_cores(result, job, scale)
        done += len(items)
        if progress is not None:
            progress(done, total)
    return result


def _probe_tiles(height: int, width: int, tiles: Sequence[Tile], tile: int, pad: int,
                 multiple: int) -> list[Tile]:
    """The probe grid for one image. Its coverage is set by the image, not by tile_batch: the probe
    windows add up to PROBE_WORK_SHARE of the tiles' windows, capped at PROBE_MAX_WINDOWS of the largest
    tile window (so memory stays bounded for any image size)."""
    windows = [t.window.height * t.window.width for t in tiles]
    budget = min(PROBE_WORK_SHARE * sum(windows), PROBE_MAX_WINDOWS * max(windows))
    core = max(multiple, tile // PROBE_CORE_SHARE // multiple * multiple)
    probe_window = min(core + 2 * pad, height) * min(core + 2 * pad, width)
    return probe_grid(height, width, core, pad, count=max(1, int(budget // probe_window)), snap_multiple=multiple)


# --------------------------------------------------------------------------------------------------
# Memory planning (models/vae_memory.py)
# --------------------------------------------------------------------------------------------------


def _window_px(tiles: Sequence[Tile], n_images: int) -> list[int]:
    return [t.window.height * t.window.width for t in tiles] * n_images


def _largest_batch_px(n_images: int, tiles: Sequence[Tile], tile_batch: int) -> int:
    return max(sum(t.window.height * t.window.width for _, t in items)
               for items in _batches(n_images, tiles, tile_batch))


def exact_memory_bytes(part: nn.Module, decoder: bool, tiles: Sequence[Tile], n_images: int,
                       tile_batch: int, dtype: torch.dtype) -> int:
    """Planned peak of the exact lockstep run: every tile's held activations plus one batch's
    temporaries. An estimate for choosing the mode, not a promise (see vae_memory)."""
    window = max(t.window.height * t.window.width for t in tiles)
    return lockstep_bytes(forward_profile(part, decoder, window), _window_px(tiles, n_images),
                          _largest_batch_px(n_images, tiles, tile_batch), dtype)


def untiled_memory_bytes(part: nn.Module, decoder: bool, n_images: int, height: int, width: int,
                         tile_batch: int, dtype: torch.dtype) -> int:
    """Planned peak of the untiled forward (one window per image, images tile_batch at a time)."""
    return untiled_bytes(forward_profile(part, decoder, height * width), n_images, height, width, tile_batch,
                         dtype)


def _choose_mode(mode: str, part: nn.Module, decoder: bool, x: torch.Tensor, tile_batch: int,
                 memory_budget: int | None, memory: MemoryProvider = TORCH_MEMORY) -> str:
    """auto: untiled when the model says it fits in the budget (it is exact and, holding no window
    overlap, never needs more than the exact tiled run), else estimated."""
    if mode not in NORM_STATS_MODES:
        raise ValueError(f"norm_stats must be one of {', '.join(NORM_STATS_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    needed = untiled_memory_bytes(part, decoder, x.shape[0], *x.shape[-2:], tile_batch, x.dtype)
    if memory_budget is None:
        memory.make_room(x.device, int(needed / MEMORY_HEADROOM))
        free = memory.available(x.device)
        if free is None:
            return "untiled"
        memory_budget = int(free * MEMORY_HEADROOM)
    return "untiled" if needed <= memory_budget else "estimated"


# --------------------------------------------------------------------------------------------------
# Encoder/decoder plumbing
# --------------------------------------------------------------------------------------------------


def _count_group_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.GroupNorm) for m in module.modules())


def _encoder_factor(vae: nn.Module) -> int:
    return 2 ** sum(1 for block in vae.encoder.down_blocks if getattr(block, "downsamplers", None))


def _decoder_factor(vae: nn.Module) -> int:
    return 2 ** sum(1 for block in vae.decoder.up_blocks if getattr(block, "upsamplers", None))


def _quant(vae: nn.Module, moments: torch.Tensor) -> torch.Tensor:
    quant_conv = getattr(vae, "quant_conv", None)
    return quant_conv(moments) if quant_conv is not None else moments


def _post_quant(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    post_quant_conv = getattr(vae, "post_quant_conv", None)
    return post_quant_conv(z) if post_quant_conv is not None else z  # 1x1 conv: exact on the whole latent


@dataclass(frozen=True)
class _Part:
    """The encoder or the decoder, seen by the drivers."""

    module: nn.Module
    decoder: bool
    scale: tuple[int, int]  # output px per input px, as num/den
    multiple: int  # tiles are aligned to this

    def run(self, tiles: torch.Tensor, geometry: TileGeometry) -> Steps:
        return (decoder_steps if self.decoder else encoder_steps)(self.module, tiles, geometry)

    @property
    def n_norms(self) -> int:
        return _count_group_norms(self.module)


def _encoder_part(vae: nn.Module) -> _Part:
    factor = _encoder_factor(vae)
    return _Part(vae.encoder, decoder=False, scale=(1, factor), multiple=factor)


def _decoder_part(vae: nn.Module) -> _Part:
    return _Part(vae.decoder, decoder=True, scale=(_decoder_factor(vae), 1), multiple=1)


def _tiled_forward(part: _Part, x: torch.Tensor, tile: int, pad: int, tile_batch: int, norm_stats: str,
                   memory_budget: int | None, progress: ProgressFn | None,
                   check_interrupt: InterruptFn | None, memory: MemoryProvider | None = None) -> torch.Tensor:
    """The part's output for x: untiled (one window per image) when x fits in one tile or auto finds
    the memory for it, else tiled with exact or estimated statistics."""
    height, width = x.shape[-2:]
    tiles = tile_grid(height, width, tile, pad, snap_multiple=part.multiple)
    memory = memory or TORCH_MEMORY
    mode = _choose_mode(norm_stats, part.module, part.decoder, x, tile_batch, memory_budget, memory)
    if len(tiles) == 1:
        mode = "untiled"
    elif mode == "estimated" and x.shape[0] * len(tiles) <= max(tile_batch, PROBE_MAX_WINDOWS):
        mode = "exact"  # no more windows than one batch or the probe pass may hold: exact costs no more
    if mode in ("untiled", "exact"):
        try:
            if mode == "exact":
                return _run_lockstep(x, tiles, tile_batch, part.run, part.scale, part.n_norms, progress,
                                     check_interrupt)
            whole = tile_grid(height, width, max(height, width), 0, snap_multiple=part.multiple)
            per_image = len(tiles)  # progress in the caller's unit: tiles of its grid
            scaled = None if progress is None else (lambda done, total: progress(done * per_image, total * per_image))
            return _run_lockstep(x, whole, tile_batch, part.run, part.scale, part.n_norms, scaled, check_interrupt)
        except Exception as error:  # retried below, outside the handler, so the failed run's tensors are freed
            if norm_stats != "auto" or len(tiles) == 1 or not is_out_of_memory(error):
                raise
        memory.free_cached(x.device)
        log.warning("tiled VAE: out of memory untiled; retrying with estimated GroupNorm statistics, tiled")
        if x.shape[0] * len(tiles) <= max(tile_batch, PROBE_MAX_WINDOWS):
            return _run_lockstep(x, tiles, tile_batch, part.run, part.scale, part.n_norms, progress,
                                 check_interrupt)
    probes = _probe_tiles(height, width, tiles, tile, pad, part.multiple)
    stats = _estimate_stats(x, probes, tile_batch, part.run, check_interrupt)
    return _run_streamed(x, tiles, tile_batch, part.run, part.scale, stats, progress, check_interrupt)


def _encode_lockstep(vae: nn.Module, x: torch.Tensor, tiles: Sequence[Tile], tile_batch: int = 4,
                     **options) -> torch.Tensor:
    """Encoder moments through the exact lockstep path (options: see _run_lockstep); used by tests."""
    part = _encoder_part(vae)
    return _quant(vae, _run_lockstep(x, tiles, tile_batch, part.run, part.scale, part.n_norms, **options))


def _decode_lockstep(vae: nn.Module, z: torch.Tensor, tiles: Sequence[Tile], tile_batch: int = 4,
                     **options) -> torch.Tensor:
    """Decoded image through the exact lockstep path (options: see _run_lockstep); used by tests."""
    part = _decoder_part(vae)
    return _run_lockstep(_post_quant(vae, z), tiles, tile_batch, part.run, part.scale, part.n_norms, **options)


def _prepare_input(t: torch.Tensor, module: nn.Module, what: str) -> torch.Tensor:
    """Check the rank and cast to the module's dtype (from its parameters: conv_in may be a LoRA wrapper)."""
    if t.dim() != 4:
        raise ValueError(f"{what} must have shape (B, C, H, W), got {tuple(t.shape)}")
    return t.to(next(module.parameters()).dtype)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_tiled(
    vae: nn.Module,
    x: torch.Tensor,
    tile_px: int = 1024,
    pad_px: int = 32,
    tile_batch: int = 4,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
    norm_stats: str = "auto",
    memory_budget: int | None = None,
    memory: MemoryProvider | None = None,
) -> torch.Tensor:
    """Encode images in [-1, 1] (B, 3, H, W) to the encoder MOMENTS (B, 2*latent, H/8, W/8).

    Returns quant_conv's output (mean and logvar concatenated) so the caller picks mean or sample.
    H and W must be multiples of the VAE's downsampling factor (8). An image no larger than
    tile_px + 2*pad_px runs untiled (one window per image: the diffusers encoder's numbers up to float
    rounding, with less memory); larger ones follow `norm_stats` ("auto": untiled when the memory model
    says it fits, else "estimated"; "exact"; "estimated"; see the module docstring);
    memory_budget (bytes) replaces the device's free memory in auto's choice; `memory` is where free
    memory and cache release come from (default: PyTorch; ComfyUI injects its own). progress(done, total)
    counts tiles; check_interrupt() is called between steps and may raise.
    """
    part = _encoder_part(vae)
    x = _prepare_input(x, vae.encoder, "encoder input")
    height, width = x.shape[-2:]
    if height % part.multiple or width % part.multiple:
        raise ValueError(f"encoder input {height}x{width} must have H and W divisible by {part.multiple}; "
                         "pad or crop it")
    return _quant(vae, _tiled_forward(part, x, tile_px, pad_px, tile_batch, norm_stats, memory_budget,
                                      progress, check_interrupt, memory))


@torch.no_grad()
def decode_tiled(
    vae: nn.Module,
    z: torch.Tensor,
    tile_latent: int = 224,
    pad_latent: int = 11,
    tile_batch: int = 4,
    progress: ProgressFn | None = None,
    check_interrupt: InterruptFn | None = None,
    norm_stats: str = "auto",
    memory_budget: int | None = None,
    memory: MemoryProvider | None = None,
) -> torch.Tensor:
    """Decode UNSCALED latents (already divided by the scaling factor) to images in [-1, 1].

    The output is not clamped (the caller clamps). A latent no larger than tile_latent +
    2*pad_latent runs untiled; larger ones follow `norm_stats` as in encode_tiled.
    """
    part = _decoder_part(vae)
    z = _prepare_input(z, vae.decoder, "latent")
    return _tiled_forward(part, _post_quant(vae, z), tile_latent, pad_latent, tile_batch, norm_stats,
                          memory_budget, progress, check_interrupt, memory)
