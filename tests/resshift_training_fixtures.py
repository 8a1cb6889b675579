"""Tiny files for the ResShift-family recipes (HF-Diff, VPD-SR on SinSR): teacher and SinSR student in
the published Swin-UNet layout, the VQ-f4, the official-format YAML of their sizes, an INN
checkpoint written by `onestep-sr train-inn`, tiny DINOv2 / CLIP folders and paired images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import synthetic_resshift as syn
import training_fixtures as tf

TEACHER = "resshift_realsrx4_s15_v1.pth"
STUDENT = "SinSR_v1.pth"
AUTOENCODER = "autoencoder_vq_f4.pth"
YAML = "tiny_sinsr.yaml"


def write_family(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    syn.write_unet(syn.tiny_unet(1), root / TEACHER)
    syn.write_unet(syn.tiny_unet(3), root / STUDENT)  # a different start: distillation has work to do
    syn.write_vq(syn.tiny_vq(), root / AUTOENCODER)
    syn.write_official_yaml(root / YAML)
    return root


def write_inn_with_the_command(root: Path) -> Path:
    """The INN checkpoint exactly as `onestep-sr train-inn` writes it (tiny sizes, two classes)."""
    from onestep_sr.cli import main

    for index, name in enumerate(("green", "red")):
        (root / "inn_images" / name).mkdir(parents=True)
        rng = np.random.default_rng(index)
        for k in range(2):
            array = rng.integers(0, 80, size=(24, 24, 3))
            array[..., 1 - index] += 150
            Image.fromarray(array.astype(np.uint8)).save(root / "inn_images" / name / f"{k}.png")
    out = root / "inn.safetensors"
    assert main(["train-inn", str(root / "inn_images"), "-o", str(out), "--epochs", "1", "--batch-size", "2",
                 "--crop", "16", "--channels", "4", "--layers", "1", "--hidden", "4", "--workers", "0",
                 "--device", "cpu"]) == 0
    return out


def write_dino(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(5)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def config(root: Path, out: Path, method: str, steps: int = 3, **resshift) -> dict:
    hr, lr = root / "data" / "hr", root / "data" / "lr"
    if not hr.is_dir():
        tf.write_pairs(root / "data", 2, 64)
    return {
        "method": method, "output_dir": str(out), "seed": 3,
        "data": {"train": str(hr), "train_lr": str(lr), "crop": 64, "workers": 0, "pin_memory": False,
                 "flip": False},
        "degradation": {"preset": "resshift"},
        "model": {"init_weights": str(root / STUDENT)},
        "resshift": {"teacher": str(root / TEACHER), "model_config": str(root / YAML), "feature_size": 28,
                     **resshift},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 0.0},
        "train": {"batch_size": 2, "max_steps": steps, "mixed_precision": "no", "checkpoint_every": 1000,
                  "validate_every": 1000, "log_every": 1, "device": "cpu"},
    }


def sinsr_sqrt_etas(steps: int = 15, kappa: float = 2.0, min_noise: float = 0.04, end: float = 0.99,
                    power: float = 0.3) -> list[float]:
    """SinSR's exponential schedule written out from its formula (METHODS.md section 6)."""
    first = min(min_noise / kappa, min_noise, math.sqrt(0.001))
    base = (end / first) ** (1 / (steps - 1))
    return [first * base ** (((t - 1) / (steps - 1)) ** power * (steps - 1)) for t in range(1, steps + 1)]


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


def train_once(values: dict):
    """Train a config dict on one torch thread (module fixtures run before the per-test `one_thread`
    fixture; extra threads only contend on shared CPUs). Returns (TrainConfig, result)."""
    from onestep_sr.training.config import config_from_dict
    from onestep_sr.training.trainer import train

    config = config_from_dict(values)
    with tf.one_thread():
        return config, train(config, progress=False)


def random_batch(seed: int = 0, lr_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two random LR images in [-1, 1], their x4 GT, and LR-sized noise, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    lq = torch.rand(2, 3, lr_size, lr_size, generator=g) * 2 - 1
    gt = torch.rand(2, 3, lr_size * 4, lr_size * 4, generator=g) * 2 - 1
    noise = torch.randn(2, 3, lr_size, lr_size, generator=g)
    return lq, gt, noise
