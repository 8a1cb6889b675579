"""Validation through the real inference pipeline: the checkpoint as published, applied to a freshly
loaded base exactly as `onestep-sr upscale` and the nodes do, on a held-out folder.

HR-only folders are degraded with the run's preset at a fixed seed (the same LR every time); with
`data.validation_lr` the LR partners are used. Reports PSNR (RGB, [0, 1]) and, when the LPIPS
network is available, LPIPS(VGG); writes the restored images under validation/step-N/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..batch.images import save_image
from .config import TrainConfig

log = logging.getLogger("onestep_sr.training")
VALIDATION_SEED = 12345


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@torch.no_grad()
def validate(config: TrainConfig, published: dict, step: int, device: torch.device) -> dict[str, float]:
    from ..models.base_models import load_base
    from ..pipelines.model import apply_method_weights
    from ..pipelines.onestep import OneStepPipeline, UpscaleSettings
    from .data import TrainImages, read_rgb
    from .degradations import RealESRGANDegrader
    from .trainer import degradation_params

    base = load_base(config.model.base, config.model.tokenizer)
    model = apply_method_weights(base, published, config.method, f"{config.method}.pkl",
                                 de_net_path=config.model.de_net).to(device, torch.float32)
    pipeline = OneStepPipeline(model, device)
    data = TrainImages(config.data.validation, config.data.crop, config.data.scale, flip=False,
                       small_images="pad", lr_folder=config.data.validation_lr, what="validation")
    degrader = RealESRGANDegrader(degradation_params(config))
    lpips = None
    if config.loss.lpips:
        from .losses.lpips import LPIPSVGG

        lpips = LPIPSVGG.from_folder(config.model.feature_networks).to(device)
    folder = Path(config.output_dir) / "validation" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    scores: dict[str, list[float]] = {"val_psnr": [], "val_lpips": []}
    for index, sample in enumerate(data.samples[: config.data.validation_count]):
        hr = read_rgb(sample.path)
        h, w = (hr.shape[-2] // (8 * config.data.scale)) * 8 * config.data.scale, \
            (hr.shape[-1] // (8 * config.data.scale)) * 8 * config.data.scale
        hr = hr[:, :h, :w]
        if sample.lr_path is not None:
            lr = read_rgb(sample.lr_path)[:, : h // config.data.scale, : w // config.data.scale]
        else:
            lr = degrader(hr[None].to(device), seed=VALIDATION_SEED + index).lr[0].cpu()
        out = pipeline(lr.permute(1, 2, 0)[None], UpscaleSettings(scale=config.data.scale))[0]
        save_image(out, folder / f"{sample.path.stem}.png")
        restored = out.permute(2, 0, 1)
        scores["val_psnr"].append(psnr(restored, hr))
        if lpips is not None:
            scores["val_lpips"].append(float(lpips(restored[None].to(device) * 2 - 1, hr[None].to(device) * 2 - 1)))
    metrics = {k: sum(v) / len(v) for k, v in scores.items() if v}
    log.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
