"""The Real-ESRGAN second-order degradation, batched on the device and seeded.

Follows Real-ESRGAN's `feed_data` (as vendored in OSEDiff `dataloaders/realesrgan.py` and S3Diff
`src/my_utils/training_utils.py`): blur -> random resize -> Gaussian or Poisson noise (gray with
p = 0.4) -> JPEG, twice, then the final stage (resize to GT/scale + sinc, JPEG) in random order,
then 8-bit quantisation. Per-sample draws (kernels, sigmas, gray flags, JPEG qualities) vary within
a batch; the choices that change tensor sizes or code paths (resize direction/scale/mode, noise
type, second blur, final order) are drawn per batch, exactly as Real-ESRGAN's batched version does
(OSEDiff's per-image loader is the batch-of-one case).

kornia does the filtering (`filter2d`, per-sample kernels, reflect border, correlation - the same
as BasicSR's filter2D), the JPEG round trip (`jpeg_codec_differentiable`, the Real-ESRGAN DiffJPEG
design) and the grayscale conversion. Kernels and noise are written here (see kernels.py).

All parameter draws come from one CPU `torch.Generator` seeded per call, and noise from a device
generator seeded from it, so a seed gives the same LR images on a given device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import make_kernel, pad_kernel, pulse, sinc_kernel
from .params import KERNEL_RANGE, PADDED_KERNEL, ROTATION_RANGE, BlurParams, DegradationParams, StageParams


class Draw:
    """Seeded scalar draws on the CPU (uniform, choice, bernoulli)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def uniform(self, low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=self.generator, dtype=torch.float64))

    def chance(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.generator, dtype=torch.float64) < p)

    def choice(self, options, weights=None):
        if weights is None:
            weights = [1.0] * len(options)
        index = int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=self.generator))
        return options[index]

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self.generator))


def random_blur_kernel(draw: Draw, blur: BlurParams) -> torch.Tensor:
    """One 21x21 kernel: sinc with p = sinc_prob, else a mixed Gaussian-family kernel (BasicSR)."""
    size = draw.choice(KERNEL_RANGE)
    if draw.chance(blur.sinc_prob):
        cutoff = draw.uniform(math.pi / 3, math.pi) if size < 13 else draw.uniform(math.pi / 5, math.pi)
        kernel = sinc_kernel(size, cutoff)
    else:
        kind = draw.choice(blur.kernel_list, blur.kernel_prob)
        sigma_x = draw.uniform(*blur.sigma)
        sigma_y, theta, beta = sigma_x, 0.0, 1.0
        if "aniso" in kind:
            sigma_y = draw.uniform(*blur.sigma)
            theta = draw.uniform(*ROTATION_RANGE)
        if kind.startswith(("generalized", "plateau")):
            beta_range = blur.betag if kind.startswith("generalized") else blur.betap
            beta = draw.uniform(beta_range[0], 1.0) if draw.chance(0.5) else draw.uniform(1.0, beta_range[1])
        kernel = make_kernel(kind, size, sigma_x, sigma_y, theta, beta)
    return pad_kernel(kernel, PADDED_KERNEL)


def final_sinc_kernel(draw: Draw, probability: float) -> torch.Tensor:
    if draw.chance(probability):
        size = draw.choice(KERNEL_RANGE)
        return sinc_kernel(size, draw.uniform(math.pi / 3, math.pi), pad_to=PADDED_KERNEL)
    return pulse(PADDED_KERNEL)


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample correlation with reflect padding (BasicSR filter2D) via kornia. Images no larger than
    half the kernel cannot be reflect-padded (BasicSR fails there); they are replicate-padded instead."""
    from kornia.filters import filter2d as kornia_filter2d

    border = "reflect" if min(images.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return kornia_filter2d(images, kernels.to(images), border_type=border, normalized=False)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG encode/decode at per-sample quality (kornia's DiffJPEG), input clamped to [0, 1]."""
    from kornia.enhance import jpeg_codec_differentiable

    return jpeg_codec_differentiable(images.clamp(0, 1), quality.to(images))


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    from kornia.color import rgb_to_grayscale

    return rgb_to_grayscale(images)


def gaussian_noise(images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Noise with per-sample sigma (8-bit levels); gray samples get one channel repeated."""
    b, c, h, w = images.shape
    sigma = sigma.to(images).view(b, 1, 1, 1) / 255.0
    color = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    mono = torch.randn((b, 1, h, w), generator=generator, device=images.device, dtype=images.dtype)
    g = gray.to(images).view(b, 1, 1, 1)
    return (color * (1 - g) + mono.expand(b, c, h, w) * g) * sigma


def _poisson(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    quantised = torch.clamp((images * 255.0).round(), 0, 255) / 255.0
    values = [2 ** math.ceil(math.log2(len(torch.unique(sample)))) for sample in quantised]
    vals = quantised.new_tensor(values).view(-1, 1, 1, 1)
    return torch.poisson(quantised * vals, generator=generator) / vals - quantised


def poisson_noise(images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """BasicSR `generate_poisson_noise_pt`: levels = next power of two of the distinct 8-bit values."""
    b, c, h, w = images.shape
    color = _poisson(images, generator)
    mono = _poisson(rgb_to_gray(images), generator).expand(b, c, h, w)
    g = gray.to(images).view(b, 1, 1, 1)
    return (color * (1 - g) + mono * g) * scale.to(images).view(b, 1, 1, 1)


@dataclass
class DegradedBatch:
    lr: torch.Tensor  # (B, 3, H/scale, W/scale) in [0, 1], 8-bit quantised
    lr_upscaled: torch.Tensor | None  # (B, 3, H, W) resized back (OSEDiff / S3Diff inputs), quantised
    kept_gt: torch.Tensor  # (B,) bool: the input is the GT itself (no_degradation_prob)


class RealESRGANDegrader:
    """Batched second-order degradation with one parameter set (params.py)."""

    def __init__(self, params: DegradationParams) -> None:
        self.params = params

    def _stage(self, x: torch.Tensor, stage: StageParams, draw: Draw, noise_gen: torch.Generator,
               size: tuple[int, int] | None, blur: bool) -> torch.Tensor:
        b = x.shape[0]
        if blur:
            kernels = torch.stack([random_blur_kernel(draw, stage.blur) for _ in range(b)])
            x = filter2d(x, kernels)
        direction = draw.choice(("up", "down", "keep"), stage.resize_prob)
        scale = {"up": lambda: draw.uniform(1.0, stage.resize_range[1]),
                 "down": lambda: draw.uniform(stage.resize_range[0], 1.0), "keep": lambda: 1.0}[direction]()
        mode = draw.choice(self.params.modes)
        if size is None:
            x = _interpolate(x, scale_factor=scale, mode=mode)
        else:
            x = _interpolate(x, size=(int(size[0] * scale), int(size[1] * scale)), mode=mode)
        gray = torch.tensor([draw.chance(stage.gray_noise_prob) for _ in range(b)], dtype=torch.float32)
        if draw.chance(stage.gaussian_noise_prob):
            sigma = torch.tensor([draw.uniform(*stage.noise_range) for _ in range(b)])
            x = x + gaussian_noise(x, sigma, gray, noise_gen)
        else:
            amount = torch.tensor([draw.uniform(*stage.poisson_scale_range) for _ in range(b)])
            x = x + poisson_noise(x, amount, gray, noise_gen)
        return x.clamp(0, 1)

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, seed: int) -> DegradedBatch:
        """Degrade a GT batch (B, 3, H, W) in [0, 1] (H, W multiples of the scale)."""
        p = self.params
        draw = Draw(seed)
        noise_gen = torch.Generator(device=gt.device).manual_seed(draw.seed())
        b, _, h, w = gt.shape
        lr_size = (h // p.scale, w // p.scale)
        x = gt.float()

        x = self._stage(x, p.first, draw, noise_gen, None, blur=True)
        x = jpeg(x, torch.tensor([draw.uniform(*p.first.jpeg_range) for _ in range(b)]))
        sinc = torch.stack([final_sinc_kernel(draw, p.final_sinc_prob) for _ in range(b)])
        if draw.chance(p.second_order_prob):
            x = self._stage(x, p.second, draw, noise_gen, lr_size, blur=draw.chance(p.second.blur_prob))
        quality = torch.tensor([draw.uniform(*p.second.jpeg_range) for _ in range(b)])
        mode = draw.choice(p.modes)
        if draw.chance(0.5):
            x = filter2d(_interpolate(x, size=lr_size, mode=mode), sinc)
            x = jpeg(x, quality)
        else:
            x = jpeg(x, quality)
            x = filter2d(_interpolate(x, size=lr_size, mode=mode), sinc)
        lr = quantise(x)

        kept = torch.tensor([draw.chance(p.no_degradation_prob) for _ in range(b)])
        if kept.any():
            down = quantise(_interpolate(gt.float(), size=lr_size, mode="bicubic"))
            lr = torch.where(kept.to(lr.device).view(b, 1, 1, 1), down, lr)
        upscaled = None
        if p.resize_back != "none":
            back_mode = draw.choice(p.modes) if p.resize_back == "random" else "bicubic"
            upscaled = quantise(_interpolate(lr, size=(h, w), mode=back_mode))
            if kept.any():
                upscaled = torch.where(kept.to(lr.device).view(b, 1, 1, 1), gt.float(), upscaled)
        return DegradedBatch(lr=lr, lr_upscaled=upscaled, kept_gt=kept)


def quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x * 255.0).round(), 0, 255) / 255.0


def _interpolate(x: torch.Tensor, size=None, scale_factor=None, mode: str = "bicubic") -> torch.Tensor:
    if mode == "area":
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="area")
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=False)
