"""S3Diff training on the tiny SD-2-shaped base (SD-Turbo has the SD-2.1 architecture): the published
trainable set, a frozen base, the discriminator kept out of the generator's gradient, alternating
G/D updates, online negative samples and GT-as-input, overfitting, and the s3diff.pkl round trip
through the inference pipeline, the CLI and the loader node."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from onestep_sr.models.degradation_estimator import load_degradation_estimator  # noqa: E402
from onestep_sr.training.config import config_from_dict  # noqa: E402
from onestep_sr.training.losses.dino_discriminator import DinoViT  # noqa: E402
from onestep_sr.training.osediff import StepRandom  # noqa: E402
from onestep_sr.training.recipes import build_recipe  # noqa: E402
from onestep_sr.training.recipes.base import StepInputs  # noqa: E402
from onestep_sr.training.s3diff import (  # noqa: E402
    discriminator_parameters,
    generator_parameters,
    negative_mask,
    published_key,
    s3diff_checkpoint,
)
from onestep_sr.training.trainer import train  # noqa: E402

import synthetic_s3diff  # noqa: E402
import training_fixtures as tf  # noqa: E402

RANKS = {"rank_unet": 4, "rank_vae": 4}
S3DIFF_NEGATIVE = "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth"
S3DIFF_POSITIVE = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural "
                   "lighting.")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """LPIPS VGG + a tiny DINO ViT (12 blocks, width 32) in the published file layouts, and de_net.pth."""
    folder = tf.write_feature_networks(tmp_path_factory.mktemp("features"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = DinoViT(dim=32, depth=12, heads=1)
        for name, param in vit.named_parameters():
            if param.dim() > 1 or name in ("cls_token", "pos_embed"):
                torch.nn.init.normal_(param, std=0.2)
    torch.save(vit.state_dict(), folder / "dino_vitbase16_pretrain.pth")
    synthetic_s3diff.write_de_net(folder / "de_net.pth")
    return folder


def _config(tmp_path, base_dir, features, train_dir, **overrides):
    config = tf.tiny_config(tmp_path, base_dir, features, train_dir)
    config["method"] = "s3diff"
    config["degradation"] = {"preset": "s3diff"}
    config["model"] = {"base": str(base_dir), "feature_networks": str(features), "de_net": str(features / "de_net.pth"),
                       **RANKS}
    config["loss"] = {"mse": 2.0, "lpips": 5.0, "gan": 0.5, "vsd": 0.0, "negative_sample_prob": 0.05,
                      "negative_prompt": S3DIFF_NEGATIVE, "positive_prompt": S3DIFF_POSITIVE}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        config[section][name] = value
    return config_from_dict(config)


def _inputs(recipe, images, micro_step=0, seed=3):
    gt = images * 2 - 1
    lr = torch.nn.functional.interpolate(images, scale_factor=0.25, mode="bicubic", align_corners=False).clamp(0, 1)
    lq = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    batch = {"gt": images, "id": torch.arange(images.shape[0]), "prompt": [""] * images.shape[0]}
    return StepInputs(lq=lq, gt=gt, batch=batch, micro_step=micro_step, seed=seed, extras={"lr": lr})


def _flat_keys(data, prefix=()):
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _flat_keys(value, (*prefix, key))
        elif isinstance(value, torch.Tensor) and key != "w":
            keys.add((*prefix, key))
    return keys
