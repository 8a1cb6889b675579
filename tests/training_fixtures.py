"""Tiny training fixtures: random feature networks in the real file layouts, small image folders and
configs pointing at the tiny SD-2-shaped base. Nothing here is used at run time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TINY_WIDTHS = (4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8)  # real VGG16: 64,64,128,128,256x3,512x6


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for the block: tiny models only gain contention from threads on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_feature_networks(folder: Path, seed: int = 0) -> Path:
    """vgg16-397923af.pth (torchvision `features.N` keys) and lpips_vgg.pth (`linK.model.1.weight`)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state, channels = {}, 3
    for index, width in zip(VGG_CONVS, TINY_WIDTHS, strict=True):
        state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3, generator=g) * (2 / (9 * channels)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(width, generator=g) * 0.01
        channels = width
    torch.save(state, folder / "vgg16-397923af.pth")
    taps = (TINY_WIDTHS[1], TINY_WIDTHS[3], TINY_WIDTHS[6], TINY_WIDTHS[9], TINY_WIDTHS[12])
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(taps)}
    torch.save(lins, folder / "lpips_vgg.pth")
    return folder


def write_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> list[Path]:
    """Smooth random RGB images (low-frequency noise upsampled), PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        low = torch.rand(1, 3, size[0] // 8, size[1] // 8, generator=g)
        image = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def write_pairs(root: Path, count: int, size: int = 64, scale: int = 4, seed: int = 0) -> tuple[Path, Path]:
    hr = write_images(root / "hr", count, (size, size), seed)
    (root / "lr").mkdir(parents=True, exist_ok=True)
    for path in hr:
        with Image.open(path) as image:
            image.resize((size // scale, size // scale), Image.BICUBIC).save(root / "lr" / path.name)
    return root / "hr", root / "lr"


def tiny_config(tmp: Path, base_dir: Path, features: Path, train: Path, **overrides) -> dict:
    config = {
        "method": "osediff",
        "output_dir": str(tmp / "run"),
        "seed": 3,
        "data": {"train": str(train), "crop": 64, "workers": 0, "pin_memory": False, "flip": True},
        "degradation": {"preset": "osediff"},
        "model": {"base": str(base_dir), "feature_networks": str(features), "lora_rank": 4, "fake_lora_rank": 4},
        "loss": {"mse": 1.0, "lpips": 2.0, "vsd": 1.0},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 2, "max_steps": 3, "mixed_precision": "no", "checkpoint_every": 1000,
                  "validate_every": 1000, "log_every": 1, "device": "cpu"},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return config


def write_tiny_clip(folder: Path, seed: int = 4) -> Path:
    """A tiny random transformers CLIPModel (28 px, 14 px patches, 3 vision layers) + tokenizer folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    import tinymodels

    tinymodels.write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                           image_size=28, patch_size=14, hidden_act="gelu"),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    return folder


def assert_cli_upscales(tmp_path: Path, image: Path, base_dir: Path, weights: Path) -> None:
    """`onestep-sr upscale` on one copied LR image with the trained weights writes its output."""
    import shutil

    from onestep_sr.cli import main as cli_main

    source = tmp_path / "lr.png"
    shutil.copy(image, source)
    code = cli_main(["upscale", str(source), "-o", str(tmp_path / "out.png"), "--base", str(base_dir),
                     "--weights", str(weights), "--dtype", "fp32", "--device", "cpu"])
    assert code == 0 and (tmp_path / "out.png").is_file()


def load_with_the_loader_node(monkeypatch, tmp_path: Path, base_dir: Path, files: list[Path]):
    """The loader node on a fake ComfyUI models folder holding `files` (the first is the weights file
    chosen) and the base under diffusers/tiny; returns the node's model handle."""
    import shutil

    from onestep_sr.nodes.loader_node import DIFFUSERS_PREFIX, OneStepSRLoader

    import fake_comfy
    import tinymodels

    tokenizer = tmp_path / "comfy" / "tok"
    tinymodels.write_tiny_tokenizer(tokenizer)
    comfy = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    (comfy.models_dir / "onestep_sr").mkdir(parents=True)
    for path in files:
        shutil.copy(path, comfy.models_dir / "onestep_sr" / path.name)
    shutil.copytree(base_dir, comfy.models_dir / "diffusers" / "tiny")
    (handle,) = OneStepSRLoader().load(files[0].name, DIFFUSERS_PREFIX + "tiny", "fp32")
    return handle


def assert_resume_matches_an_uninterrupted_run(config) -> tuple:
    """`config(folder, max_steps)` -> TrainConfig. Trains 4 steps in folder a, and 2 then 2 resumed in
    folder b; every logged loss of the resumed pair matches the straight run. Returns (full, resumed,
    combined history)."""
    from onestep_sr.training.trainer import train

    full = train(config("a", 4), progress=False)
    first = train(config("b", 2), progress=False)
    resumed = train(config("b", 4), resume=first.checkpoint, progress=False)
    combined = first.history + resumed.history
    assert len(combined) == 4
    for a, b in zip(full.history, combined, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    return full, resumed, combined


def write_reachable_pair(tmp_path: Path, tiny_base) -> tuple[Path, Path, Path]:
    """A base whose VAE posterior is nearly deterministic (as SD's is; the random tiny VAE's std is ~1),
    an HR image its frozen decoder can produce, and the bicubic LR: overfitting has somewhere to go.
    Returns (base folder, hr folder, lr folder)."""
    import copy

    import tinymodels

    base = copy.deepcopy(tiny_base)
    with torch.no_grad():
        base.vae.quant_conv.weight[4:] = 0
        base.vae.quant_conv.bias[4:] = -12  # log-variance channels
    tinymodels.save_diffusers_folder(base, tmp_path / "base")
    g = torch.Generator().manual_seed(11)
    latent = torch.nn.functional.interpolate(torch.randn(1, 4, 2, 2, generator=g), size=(8, 8), mode="bilinear")
    with torch.no_grad():
        image = (base.vae.decode(latent * 3).sample.clamp(-1, 1) + 1) / 2
    array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for folder in ("hr", "lr"):
        (tmp_path / folder).mkdir()
    Image.fromarray(array).save(tmp_path / "hr" / "a.png")
    Image.fromarray(array).resize((16, 16), Image.BICUBIC).save(tmp_path / "lr" / "a.png")
    return tmp_path / "base", tmp_path / "hr", tmp_path / "lr"
