"""Memory model of the VAE forward in vae_steps (untiled, exact lockstep, estimated/streamed), and a
meta-tensor tracer that measures what a forward really holds, to check the model against.

Why a model and not a trial run: `auto` must choose untiled / exact / estimated before allocating
anything, on any device. The model counts activation elements per input pixel of the encoder or
decoder at its widest stage, from the module structure alone:

- held: what one window keeps while paused at a GroupNorm (a resnet's input or shortcut plus the
  tensor being normalised). In a lockstep run every window of every image holds this at once.
- peak: what one window has alive at once while it runs (a resnet's input, shortcut and convolution
  outputs, an upsampler's output and one strip of its nearest-upsampled input, the attention's q/k/v).

Peak of a lockstep run = held x (pixels of the windows not running) + peak x (the running batch's).
The untiled forward is the lockstep run with one window per image; the streamed run holds one batch.
The tracer (MetaPeak) runs a forward on meta tensors and tracks every storage an op creates until it
is freed: exact counts of what PyTorch allocates, without allocator slack or workspaces.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Measured with MetaPeak on the full-size SD-2.1 and the tiny test VAEs (tests/test_vae_memory.py):
# the model is within 0.8-1.0x of the traced peak; on real devices allocator slack and convolution
# workspaces add up to ~1.3x (CPU, measured with mallinfo). Plan with the upper end.
PLANNING_FACTOR = 1.5


@dataclass(frozen=True)
class ForwardProfile:
    """Elements per input pixel of the part (encoder: image px; decoder: latent px) of one window."""

    held: float  # kept while paused at a GroupNorm (the most, over all GroupNorms)
    peak: float  # alive at once while the window runs (the most, over all operations)


def _resnet_profile(resnet: nn.Module) -> tuple[float, float]:
    """(held, peak) channels of vae_steps._resnet: with a conv shortcut, the shortcut is made first and
    the input normalised in place; without one, the input is the shortcut and stays."""
    cin, cout = resnet.in_channels, resnet.out_channels or resnet.in_channels
    if resnet.conv_shortcut is not None:
        return cin + cout, max(cin + 2 * cout, 3 * cout)  # at norm1 (h + shortcut); conv1; conv2
    return 2 * cin, 3 * cin  # at norm2 (h + conv1); conv1 (h + normed + conv1)


def _upsampler_peak(sampler: nn.Module, input_elements: int) -> float:
    """Channels x input area alive in Upsample2D: input + output (4x) + the nearest copy and the conv
    output of one strip (vae_steps.upsample_in_strips), or of the whole output for small tensors."""
    from .vae_steps import UPSAMPLE_MIN_ELEMENTS, UPSAMPLE_STRIPS, _strippable

    if _strippable(sampler) and 4 * input_elements >= UPSAMPLE_MIN_ELEMENTS:
        return 1 + 4 + 2 * 4 / UPSAMPLE_STRIPS
    return 1 + 4 + 4


def forward_profile(part: nn.Module, decoder: bool, input_px: int = 1) -> ForwardProfile:
    """Held and peak elements per input pixel of vae_steps' forward on one window of input_px pixels
    (in-place SiLU and normalisation, inputs freed as soon as they are used; input_px decides only
    whether the upsamplers run in strips)."""
    blocks = [part.mid_block, *part.up_blocks] if decoder else [*part.down_blocks, part.mid_block]
    area = 1.0
    conv_in = getattr(part.conv_in, "base_layer", part.conv_in)  # LoRA wrappers keep the conv as base_layer
    in_channels = conv_in.in_channels
    held, peak = float(in_channels), float(in_channels + conv_in.out_channels)
    for block in blocks:
        for resnet in block.resnets:
            h, p = _resnet_profile(resnet)
            held, peak = max(held, h * area), max(peak, p * area)
        for attn in getattr(block, "attentions", None) or ():
            if attn is not None:  # residual + normalised + q, k, v + attention output
                channels = block.resnets[0].out_channels
                held, peak = max(held, channels * area), max(peak, 6 * channels * area)
        for sampler in getattr(block, "upsamplers", None) or ():
            peak = max(peak, _upsampler_peak(sampler, int(sampler.channels * area * input_px)) * sampler.channels * area)
            area *= 4
        for sampler in getattr(block, "downsamplers", None) or ():
            peak = max(peak, 2.25 * sampler.channels * area)  # input + its padded copy + the strided output
            area /= 4
    return ForwardProfile(held + in_channels, peak + in_channels)


def lockstep_bytes(profile: ForwardProfile, window_px: Iterable[int], batch_px: int, dtype: torch.dtype,
                   planning: float = PLANNING_FACTOR) -> int:
    """Planned peak of a lockstep run: every window held at a GroupNorm, one batch at its peak.
    window_px: the pixel count of every window of every image; batch_px: the largest batch's."""
    total = sum(window_px)
    elements = profile.held * max(0, total - batch_px) + profile.peak * batch_px
    return int(planning * elements * torch.empty((), dtype=dtype).element_size())


def untiled_bytes(profile: ForwardProfile, n_images: int, height: int, width: int, tile_batch: int,
                  dtype: torch.dtype, planning: float = PLANNING_FACTOR) -> int:
    """The whole image as one window per image (images run tile_batch at a time, in lockstep)."""
    px = height * width
    return lockstep_bytes(profile, [px] * n_images, px * min(n_images, tile_batch), dtype, planning)


def streamed_bytes(profile: ForwardProfile, batch_px: int, probe_px: Iterable[int], probe_batch_px: int,
                   dtype: torch.dtype, planning: float = PLANNING_FACTOR) -> int:
    """Estimated mode: the larger of the probe pass (lockstep over the probes) and one streamed batch."""
    probes = lockstep_bytes(profile, probe_px, probe_batch_px, dtype, planning)
    stream = lockstep_bytes(profile, [batch_px], batch_px, dtype, planning)
    return max(probes, stream)


class MetaPeak(TorchDispatchMode):
    """Peak bytes of the tensors created inside the context (views count once per storage). Run the
    forward on meta tensors to measure a full-size model at any resolution in milliseconds."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage id -> [bytes, tensors referencing it]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            entry = self._live.get(key)
            if entry is None and key in inputs:
                continue  # a view of (or in-place on) a tensor made before the context: not new memory
            if entry is None:
                entry = self._live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out
