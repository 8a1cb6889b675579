"""Validation of the ResShift-family recipes through the inference pipeline: the published Swin-UNet
state dict, built exactly as Load OneStep SR / `onestep-sr upscale` build it, run by `OneStepPipeline`
(chop, padding, seeded noise) on the held-out folder. The SD recipes' `validation.py` loads an SD
base; this family needs only the VQ-f4 the recipe already holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..batch.images import save_image
from .config import TrainConfig
from .validation import VALIDATION_SEED, psnr

log = logging.getLogger("onestep_sr.training")


@torch.no_grad()
def validate_resshift(config: TrainConfig, published: dict, method: str, model_config, vq: nn.Module, step: int,
                      device: torch.device) -> dict[str, float]:
    import copy

    from ..models.resshift.weights import build_unet
    from ..pipelines.methods import get_method
    from ..pipelines.onestep import OneStepPipeline, UpscaleSettings
    from ..pipelines.resshift import ResShiftModel
    from .data import TrainImages, read_rgb
    from .degradations import RealESRGANDegrader, get_preset

    unet = build_unet(published, model_config.unet, f"{method} (step {step})")
    model = ResShiftModel(method=get_method(method), unet=unet, vq=copy.deepcopy(vq).float(), config=model_config)
    model.to(device, torch.float32)
    pipeline = OneStepPipeline(model, device)
    data = TrainImages(config.data.validation, config.data.crop, config.data.scale, flip=False,
                       small_images="pad", lr_folder=config.data.validation_lr, what="validation")
    degrader = RealESRGANDegrader(get_preset(config.degradation.preset))
    folder = Path(config.output_dir) / "validation" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    sf = config.data.scale
    scores: list[float] = []
    for index, sample in enumerate(data.samples[: config.data.validation_count]):
        hr = read_rgb(sample.path)
        h, w = (hr.shape[-2] // sf) * sf, (hr.shape[-1] // sf) * sf
        hr = hr[:, :h, :w]
        if sample.lr_path is not None:
            lr = read_rgb(sample.lr_path)[:, : h // sf, : w // sf]
        else:
            lr = degrader(hr[None].to(device), seed=VALIDATION_SEED + index).lr[0].cpu()
        settings = UpscaleSettings(scale=float(sf), noise_seed=VALIDATION_SEED + index)
        out = pipeline(lr.permute(1, 2, 0)[None], settings)[0]
        save_image(out, folder / f"{sample.path.stem}.png")
        scores.append(psnr(out.permute(2, 0, 1)[:, :h, :w], hr))
    metrics = {"val_psnr": sum(scores) / len(scores)} if scores else {}
    log.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
