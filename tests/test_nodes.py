"""The nodes against fakes of ComfyUI's functions: loading, upscaling, progress, interrupt, errors,
and the same image as the CLI for the same settings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.cli import main as cli_main
from onestep_sr.nodes.loader_node import DIFFUSERS_PREFIX, FROM_INPUTS, OneStepSRLoader
from onestep_sr.nodes.upscale_node import METHOD_DEFAULT, OneStepSRUpscale

import fake_comfy
import tinymodels

UPSCALE_DEFAULTS = dict(prompt="a photo", scale=4.0, color_fix=METHOD_DEFAULT, latent_tile=96, latent_overlap=32,
                        vae_encoder_tile=1024, vae_decoder_tile=224, latent="mean", seed=0)


@pytest.fixture
def comfy(monkeypatch, tmp_path, tiny_base_dir, osediff_pkl):
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    tinymodels.write_tiny_tokenizer(tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    (state.models_dir / "onestep_sr").mkdir(parents=True)
    shutil.copy(osediff_pkl[0], state.models_dir / "onestep_sr" / "osediff.pkl")
    shutil.copytree(tiny_base_dir, state.models_dir / "diffusers" / "tiny-sd21")
    return state


def _image(h=24, w=28, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (1, h, w, 3)).astype(np.float32) / 255.0)


def test_loader_lists_files_and_loads_from_diffusers_folder(comfy):
    types = OneStepSRLoader.INPUT_TYPES()
    assert types["required"]["weights"][0] == ["osediff.pkl"]
    assert DIFFUSERS_PREFIX + "tiny-sd21" in types["required"]["base"][0]
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    assert handle.model.method.name == "osediff"
    (image,) = OneStepSRUpscale().upscale(handle, _image(), **UPSCALE_DEFAULTS)
    assert image.shape == (1, 96, 112, 3)
    assert comfy.loaded and comfy.loaded[-1][1] is True  # loaded through load_models_gpu, fully
    assert comfy.progress[-1][0] == comfy.progress[-1][1]


def test_node_and_cli_give_the_same_image(comfy, tmp_path, tiny_base_dir, osediff_pkl):
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    source = tmp_path / "input.png"
    Image.fromarray((_image(30, 20, seed=4)[0].numpy() * 255).round().astype(np.uint8)).save(source)
    node_input = torch.from_numpy(np.asarray(Image.open(source)).astype(np.float32) / 255.0)[None]
    (node_out,) = OneStepSRUpscale().upscale(handle, node_input, **{**UPSCALE_DEFAULTS, "color_fix": "wavelet"})
    out = tmp_path / "out.png"
    code = cli_main(["upscale", str(source), "-o", str(out), "--base", str(tiny_base_dir), "--weights",
                     str(osediff_pkl[0]), "--prompt", "a photo", "--color-fix", "wavelet", "--dtype", "fp32",
                     "--device", "cpu"])
    assert code == 0
    cli_out = np.asarray(Image.open(out)).astype(np.float32) / 255.0
    assert cli_out.shape == node_out[0].shape
    assert np.abs(cli_out - node_out[0].numpy()).max() <= 0.5 / 255 + 1e-6  # the PNG's rounding only


def test_missing_weights_names_file_and_folder(comfy):
    with pytest.raises(FileNotFoundError, match=r"missing\.pkl.*onestep_sr"):
        OneStepSRLoader().load("missing.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")


def test_base_from_inputs_requires_all_three(comfy):
    with pytest.raises(ValueError, match="connect clip, vae"):
        OneStepSRLoader().load("osediff.pkl", FROM_INPUTS, "fp32", model=object())


def test_interrupt_is_checked_per_tile(comfy):
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    comfy.interrupted = True
    with pytest.raises(fake_comfy.InterruptProcessingException):
        OneStepSRUpscale().upscale(handle, _image(), **UPSCALE_DEFAULTS)
