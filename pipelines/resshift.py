"""The ResShift backbone (ResShift, SinSR, HF-Diff) behind the pipeline's backbone interface.

The SD backbone upsamples the input and runs one UNet pass on VAE latents; this one works on the
LR image itself (the VQ-f4 encoder sees its bicubic x4 upsample) and samples 1 or N steps per
chop patch (models/resshift/sampler.py). What the two share lives in OneStepPipeline: channels,
colour fix, the resize to the requested scale, progress, interrupts and the OOM fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..models.resshift.config import ResShiftConfig, load_config_file, shipped_config
from ..models.resshift.diffusion import ResShiftDiffusion
from ..models.resshift.sampler import (
    DEFAULT_CHOP,
    DEFAULT_SEED,
    NoiseSource,
    RecordedNoise,
    SeededNoise,
    patch_count,
    upscale_lr,
)
from ..models.resshift.swin_unet import SwinUNet
from ..models.resshift.vq_autoencoder import VQAutoencoder
from ..models.resshift.weights import build_unet, load_autoencoder
from ..models.weights_io import WeightsFileError
from .geometry import ResizePlan
from .methods import MethodSpec, get_method

AUTOENCODER_FILE = "autoencoder_vq_f4.pth"
MIN_CHOP = 128


@dataclass
class ResShiftModel:
    method: MethodSpec
    unet: SwinUNet
    vq: VQAutoencoder
    config: ResShiftConfig
    weights_name: str = ""

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vq": self.vq}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ResShiftModel:
        """fp16/bf16 as the official code: the UNet torso and the whole VQ (models/resshift/swin_unet.py)."""
        self.unet.to(device=device)
        self.vq.to(device=device, dtype=dtype)
        if dtype is not None:
            self.unet.set_torso_dtype(dtype)
        return self

    def diffusion(self, steps: int | None = None) -> ResShiftDiffusion:
        """The schedule, respaced to `steps` (the official `timestep_respacing`) when given."""
        config = replace(self.config.diffusion, cap_sqrt_001=self.method.cap_sqrt_001)
        if self.method.one_step and steps not in (None, 1):
            raise ValueError(f"{self.method.display_name} is a one-step model; it takes no step count (got {steps})")
        return ResShiftDiffusion(config, None if self.method.one_step else (steps or self.method.sampler_steps))

    @property
    def default_steps(self) -> int:
        return 1 if self.method.one_step else self.method.sampler_steps


def load_resshift_model(weights_path: str | Path, data: dict, method_name: str,
                        autoencoder_path: str | Path | None = None,
                        model_config: str | Path | None = None) -> ResShiftModel:
    """Build the Swin UNet from `data` (the read weights file) and the VQ-f4 from its file."""
    method = get_method(method_name)
    path = Path(weights_path)
    config = load_config_file(model_config) if model_config else shipped_config(method.model_config)
    if not method.one_step and model_config:
        method = replace(method, sampler_steps=config.diffusion.steps)
    unet = build_unet(data, config.unet, path.name)
    vq = load_autoencoder(Path(autoencoder_path) if autoencoder_path else path.parent / AUTOENCODER_FILE, config.vq)
    return ResShiftModel(method=method, unet=unet, vq=vq, config=config, weights_name=path.name)


class ResShiftBackbone:
    """plan / prepare / restore / smaller for the pipeline; images (B, 3, H, W) in [0, 1]."""

    def __init__(self, model: ResShiftModel, device: torch.device, memory=None):
        from ..models.device_memory import TORCH_MEMORY

        self.model = model
        self.device = device
        self.memory = memory or TORCH_MEMORY

    def plan(self, height: int, width: int, settings) -> ResizePlan:
        sf = self.model.config.diffusion.sf
        model_hw = (height * sf, width * sf)
        target_hw = (int(settings.scale * height), int(settings.scale * width))
        if min(target_hw) < 1:
            raise ValueError(f"scale {settings.scale} shrinks a {height}x{width} input to nothing")
        return ResizePlan(input_hw=(height, width), enlarged_hw=None, upscaled_hw=model_hw, model_hw=model_hw,
                          target_hw=target_hw, scale=float(settings.scale), enlarge_filter="bicubic",
                          upscale_filter="bicubic", snap_filter="bicubic")

    def prepare(self, rgb: torch.Tensor, plan: ResizePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input = the LR itself, colour-fix reference = its bicubic x4 upsample)."""
        from .resize import resize_image

        x = rgb.to(self.device)
        return x, resize_image(x, plan.model_hw, "bicubic").clamp(0, 1)

    def noise(self, settings) -> NoiseSource:
        if settings.noise is not None:
            return settings.noise if isinstance(settings.noise, NoiseSource) else RecordedNoise.from_file(settings.noise)
        return SeededNoise(DEFAULT_SEED if settings.noise_seed is None else settings.noise_seed)

    def total_ticks(self, x: torch.Tensor, settings) -> int:
        steps = 1 if self.model.method.one_step else (settings.steps or self.model.method.sampler_steps)
        return x.shape[0] * patch_count(*x.shape[-2:], settings.chop_size or DEFAULT_CHOP) * (steps + 2)

    def restore(self, x: torch.Tensor, settings, hooks) -> torch.Tensor:
        model = self.model
        diffusion = model.diffusion(settings.steps)
        noise = self.noise(settings)
        chop = settings.chop_size or DEFAULT_CHOP
        total = self.total_ticks(x, settings)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if hooks.check_interrupt:
                hooks.check_interrupt()
            if hooks.progress:
                hooks.progress(min(done, total), total)

        outputs = []
        patches = patch_count(*x.shape[-2:], chop)
        for index in range(x.shape[0]):  # images one by one: each patch draws its own noise
            lr = x[index : index + 1].float() * 2 - 1
            out = upscale_lr(model.unet, model.vq, diffusion, lr, noise, model.method.one_step, chop,
                             first_patch=index * patches, on_step=tick)
            outputs.append(out * 0.5 + 0.5)
        return torch.cat(outputs)

    def run(self, original: torch.Tensor, x: torch.Tensor, settings, hooks) -> torch.Tensor:
        """restore(), retried with half the chop size after out-of-memory (as the SD path halves tiles)."""
        from ..models.device_memory import is_out_of_memory

        ignored = [name for name, value in (("prompt", settings.prompt), ("negative prompt", settings.negative_prompt),
                                            ("degradation", settings.degradation), ("timestep", settings.timesteps))
                   if value not in (None, "")]
        if settings.guidance not in (None, 1.0):
            ignored.append("guidance")
        if ignored:
            hooks.warn(f"{self.model.method.display_name} has no {', '.join(ignored)} input; ignored")
        while True:
            try:
                return self.restore(x, settings, hooks)
            except Exception as error:
                smaller = self.smaller(settings) if is_out_of_memory(error) else None
                if smaller is None:
                    raise
                self.memory.free_cached(self.device)
                hooks.warn(f"out of memory; retrying with {smaller.chop_size}-px LR patches")
                settings = smaller

    @staticmethod
    def smaller(settings):
        """After out-of-memory: halve the chop size (512 -> 256 -> 128, strides 7/8 of it)."""
        chop = settings.chop_size or DEFAULT_CHOP
        if chop <= MIN_CHOP:
            return None
        return replace(settings, chop_size=chop // 2)


def require_autoencoder(folder: Path) -> Path:
    path = folder / AUTOENCODER_FILE
    if not path.is_file():
        raise WeightsFileError(f"the VQ autoencoder {AUTOENCODER_FILE} is missing from {folder}: download it "
                               "(ResShift release v2.0) and put it there")
    return path
