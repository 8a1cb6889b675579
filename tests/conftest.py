"""Shared fixtures: tiny SD-2-shaped random models, built in-process (nothing is downloaded)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernel tests (test_kernels.py) run in Triton's interpreter; it must be chosen
# before anything imports Triton (diffusers does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import tinymodels  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for a test (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import training_fixtures

    with training_fixtures.one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny SD-2-structured base (UNet, VAE, text encoder, tokenizer), random but seeded."""
    return tinymodels.build_tiny_base(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tiny_base):
    """The tiny base saved as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    path = tmp_path_factory.mktemp("tiny_sd2_base")
    tinymodels.save_diffusers_folder(tiny_base, path)
    return path


@pytest.fixture(scope="session")
def osediff_pkl(tmp_path_factory, tiny_base):
    """A synthetic osediff.pkl in the published layout plus the PEFT models it came from."""
    import synthetic_weights

    path = tmp_path_factory.mktemp("osediff") / "osediff.pkl"
    peft_unet, peft_vae = synthetic_weights.write_osediff_pkl(tiny_base, path)
    return path, peft_unet, peft_vae


@pytest.fixture(scope="session")
def vae(tiny_base):
    """The tiny base's VAE (float32); tests must not modify it."""
    return tiny_base.vae


@pytest.fixture(scope="session")
def vae64(tiny_base):
    """A float64 copy of the tiny VAE, for checks that float32 rounding would blur."""
    return copy.deepcopy(tiny_base.vae).double()


@pytest.fixture
def tiny_configs(monkeypatch, tmp_path):
    """Point the shipped 'sd21_base' configs at the tiny ones."""
    import json

    from onestep_sr.models import base_models

    from tinymodels import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG

    folder = tmp_path / "configs" / "sd21_base"
    folder.mkdir(parents=True)
    for name, config in (("unet", TINY_UNET_CONFIG), ("vae", TINY_VAE_CONFIG), ("text_encoder", TINY_TEXT_CONFIG)):
        (folder / f"{name}.json").write_text(json.dumps(config))
    monkeypatch.setattr(base_models, "CONFIG_DIR", folder.parent)
    return folder
