"""ResShift / SinSR / HF-Diff inference on LR images, as the official samplers run it.

Per patch: LR in [-1, 1] -> pad bottom/right to a multiple of 64 (reflection; a side too short to
reflect is reflected repeatedly, see geometry) -> y = VQ-encode(bicubic x4) -> x_T = y + kappa
sqrt(eta_T) eps -> x0 = f(x_t scaled, t, LR) -> one step (SinSR, HF-Diff): x0; several (ResShift):
posterior mean + std eps, down to t = 0 -> VQ-decode (quantised) -> crop x4 -> clamp [-1, 1].
Inputs with a side above the chop size are cut into chop x chop LR patches at the official stride
and the clamped outputs averaged where they overlap (the official `ImageSpliterTh`).

Noise: every draw has a name `p{patch}_s{step}` (patch = chop index in row-major order over the
run, step 0 = the prior noise of x_T, step k = the posterior noise after the k-th model call). A
seeded source draws them from one CPU generator in that order; a recorded source (`--noise
FILE.npz`) replays arrays by name, which is how a run of another implementation is reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...pipelines.geometry import crop_to, reflect_pad_to_multiple
from ..weights_io import WeightsFileError
from .diffusion import ResShiftDiffusion
from .swin_unet import SwinUNet
from .vq_autoencoder import VQAutoencoder

PAD_MULTIPLE = 64  # the official desired_min_size / padding_offset
DEFAULT_CHOP = 512
DEFAULT_SEED = 12345  # the official scripts' default


def chop_stride(size: int) -> int:
    """The official stride for a chop size: 512 -> 448, 256 -> 224 (7/8 of the size)."""
    return size - size // 8


class NoiseSource:
    """Gaussian noise for draw `p{patch}_s{step}` of a given shape, float32 on the CPU."""

    def draw(self, patch: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


class SeededNoise(NoiseSource):
    def __init__(self, seed: int = DEFAULT_SEED):
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def draw(self, patch: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32)


class RecordedNoise(NoiseSource):
    """Replays arrays named `p{patch}_s{step}` (an .npz file or a dict of arrays)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str = "noise"):
        self.arrays = dict(arrays)
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path) -> RecordedNoise:
        path = Path(path)
        if not path.is_file():
            raise WeightsFileError(f"noise file not found: {path.name} (looked in {path.parent})")
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls({key: data[key] for key in data.files}, path.name)
        except Exception as error:
            raise WeightsFileError(f"could not read the noise file {path.name} in {path.parent}: {error}") from error

    def draw(self, patch: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        name = f"p{patch}_s{step}"
        if name not in self.arrays:
            raise ValueError(f"{self.source} has no array {name} (patch {patch}, step {step}); it holds "
                             f"{', '.join(sorted(self.arrays)[:6])}{', ...' if len(self.arrays) > 6 else ''}")
        value = torch.from_numpy(np.asarray(self.arrays[name], dtype=np.float32))
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.source}: {name} has shape {tuple(value.shape)}, the sampler needs {tuple(shape)}")
        return value


@dataclass
class PatchResult:
    image: torch.Tensor  # (B, 3, 4h, 4w) in [-1, 1], clamped
    x_T: torch.Tensor  # the prior sample (latent, padded size)
    x0: torch.Tensor  # the last x0 prediction (latent, padded size)


def _to(x: torch.Tensor, like: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    dtype = like.dtype if isinstance(like, torch.Tensor) else next(like.parameters()).dtype
    device = like.device if isinstance(like, torch.Tensor) else next(like.parameters()).device
    return x.to(device=device, dtype=dtype)


@torch.no_grad()
def sample_patch(unet: SwinUNet, vq: VQAutoencoder, diffusion: ResShiftDiffusion, lr: torch.Tensor,
                 noise: NoiseSource, patch: int, one_step: bool,
                 on_step: Callable[[], None] | None = None) -> PatchResult:
    """One LR patch (B, 3, h, w) in [-1, 1] (float32, on the model's device) -> x4 image in [-1, 1]."""
    sf = diffusion.config.sf
    multiple = math.lcm(PAD_MULTIPLE, unet.size_multiple)
    height, width = lr.shape[-2:]
    lr, _ = reflect_pad_to_multiple(lr, multiple)
    upsampled = F.interpolate(lr, scale_factor=sf, mode="bicubic")
    y = vq.encode(_to(upsampled, vq)).float() * diffusion.config.scale_factor
    if on_step:
        on_step()
    x = diffusion.prior(y, noise.draw(patch, 0, tuple(y.shape)).to(y.device))
    x_T = x
    x0 = x
    steps = diffusion.num_steps
    for k, index in enumerate(reversed(range(steps)), start=1):
        t = torch.full((lr.shape[0],), diffusion.model_timestep(index), device=lr.device, dtype=torch.long)
        x0 = unet(diffusion.scale_input(x, index), t, lr).float()
        if on_step:
            on_step()
        if one_step:
            x = x0
            break
        mean = diffusion.posterior_mean(x0, x, index)
        if index > 0:
            x = mean + diffusion.posterior_std(index, mean) * noise.draw(patch, k, tuple(mean.shape)).to(mean.device)
        else:
            x = mean
    decoded = vq.decode(_to(x / diffusion.config.scale_factor, vq)).float()
    if on_step:
        on_step()
    image = crop_to(decoded, (height * sf, width * sf)).clamp(-1.0, 1.0)
    return PatchResult(image=image, x_T=x_T, x0=x0)


def chop_starts(length: int, size: int, stride: int) -> list[int]:
    """Patch starts along one side, as the official `ImageSpliterTh.extract_starts`."""
    if length <= size:
        return [0]
    starts = [min(start, length - size) for start in range(0, length, stride)]
    return list(dict.fromkeys(starts))


def chop_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Patch starts (row-major), or a single full-size patch when no side exceeds the chop size."""
    if height <= size and width <= size:
        return [(0, 0)]
    return [(top, left) for top in chop_starts(height, size, stride) for left in chop_starts(width, size, stride)]


@torch.no_grad()
def upscale_lr(unet: SwinUNet, vq: VQAutoencoder, diffusion: ResShiftDiffusion, lr: torch.Tensor,
               noise: NoiseSource, one_step: bool, chop_size: int = DEFAULT_CHOP, first_patch: int = 0,
               on_step: Callable[[], None] | None = None,
               record: list[PatchResult] | None = None) -> torch.Tensor:
    """LR batch (B, 3, H, W) in [-1, 1] -> (B, 3, sf H, sf W) in [-1, 1], chopped as the official code.

    Patch indices for the noise names start at `first_patch` (a run over several images continues).
    """
    sf = diffusion.config.sf
    height, width = lr.shape[-2:]
    grid = chop_grid(height, width, chop_size, chop_stride(chop_size))
    if len(grid) == 1:
        result = sample_patch(unet, vq, diffusion, lr, noise, first_patch, one_step, on_step)
        if record is not None:
            record.append(result)
        return result.image
    total = torch.zeros(lr.shape[0], 3, height * sf, width * sf, device=lr.device)
    count = torch.zeros_like(total)
    for offset, (top, left) in enumerate(grid):
        piece = lr[..., top : top + chop_size, left : left + chop_size]
        result = sample_patch(unet, vq, diffusion, piece, noise, first_patch + offset, one_step, on_step)
        if record is not None:
            record.append(result)
        rows = slice(top * sf, (top + piece.shape[-2]) * sf)
        cols = slice(left * sf, (left + piece.shape[-1]) * sf)
        total[..., rows, cols] += result.image
        count[..., rows, cols] += 1
    return total / count


def patch_count(height: int, width: int, chop_size: int = DEFAULT_CHOP) -> int:
    return len(chop_grid(height, width, chop_size, chop_stride(chop_size)))
