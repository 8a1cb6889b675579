"""Tile geometry for the tiled VAE: regular tile grids that partition an image, and sparse probe grids.

Why a module of its own: the drivers (exact lockstep, streamed) and the memory planner all reason about
the same windows and cores, and the geometry is pure integer arithmetic that is tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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

    Cores of all tiles partition the image exactly; windows contain their core and are clamped to the
    image (tiles whose windows have the same size stack into one batch).
    """

    window: Box
    core: Box

    @property
    def local_core(self) -> Box:
        """The core in the window's own coordinates."""
        return self.core.shifted(-self.window.top, -self.window.left)


def _axis_spans(size: int, tile: int, pad: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (window_start, window_end, core_start, core_end).

    As in the official OSEDiff hook (pkuliyi2015's tiled VAE): ceil((size - 2*pad) / tile) tiles,
    balanced cores (equal up to `multiple`) that partition the axis, and each window is its core plus
    `pad` on each side, clamped to the image. A border needs no context (the untiled model zero-pads
    there too), so border windows are shorter instead of being shifted inward: the windows add up to
    size + 2*pad*(count - 1), the least any tiling with `pad` of context can read. Windows of different
    sizes run in different batches.
    """
    if size <= tile + 2 * pad:
        return [(0, size, 0, size)]
    units = size // multiple
    count = min(units, math.ceil((size - 2 * pad) / tile))
    # floor(i * units / count + 1/2) in integers: strictly increasing since units >= count.
    bounds = [multiple * ((2 * i * units + count) // (2 * count)) for i in range(count + 1)]
    return [(max(core_start - pad, 0), min(core_end + pad, size), core_start, core_end)
            for core_start, core_end in zip(bounds[:-1], bounds[1:], strict=True)]


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


def _axis_probe_spans(size: int, count: int, core: int, pad: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """`count` probes along one axis: the axis is cut into `count` balanced cells and each probe's core
    (`core` px, or the smallest cell if that is shorter) is centred in its cell; windows add `pad` on
    each side, all the same size, clamped to the image."""
    count = max(1, min(count, size // multiple))
    units = size // multiple
    bounds = [multiple * ((2 * i * units + count) // (2 * count)) for i in range(count + 1)]
    smallest_cell = min(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    core = max(multiple, min(core, smallest_cell) // multiple * multiple)
    window = min(core + 2 * pad, size)
    spans = []
    for cell_start, cell_end in zip(bounds[:-1], bounds[1:], strict=True):
        core_start = cell_start + (cell_end - cell_start - core) // 2 // multiple * multiple
        start = min(max(core_start - pad, 0), size - window)
        spans.append((start, start + window, core_start, core_start + core))
    return spans


def probe_grid(size_h: int, size_w: int, core: int, pad: int, count: int, snap_multiple: int = 1) -> list[Tile]:
    """At most `count` small probe tiles spread evenly over the image, in row-major order.

    Why: statistics estimated from probes see every part of the image (a stratified sample) at full
    resolution, where a downscaled copy of the image would shift the activations' statistics. Cores do
    not overlap; together they cover a fraction of the image that grows with `count * core**2`.
    """
    m = snap_multiple
    if m < 1 or size_h % m or size_w % m:
        raise ValueError(f"image size {size_h}x{size_w} must be a multiple of {m}")
    if core < 1 or pad < 0 or count < 1:
        raise ValueError(f"need core >= 1, pad >= 0 and count >= 1, got core={core}, pad={pad}, count={count}")
    pad = math.ceil(pad / m) * m
    rows = max(1, min(count, round(math.sqrt(count * size_h / size_w))))
    cols = max(1, count // rows)
    return [
        Tile(window=Box(wy0, wy1, wx0, wx1), core=Box(cy0, cy1, cx0, cx1))
        for wy0, wy1, cy0, cy1 in _axis_probe_spans(size_h, rows, core, pad, m)
        for wx0, wx1, cx0, cx1 in _axis_probe_spans(size_w, cols, core, pad, m)
    ]


@dataclass(frozen=True)
class TileGeometry:
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

