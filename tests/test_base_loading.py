"""Building the base offline: from a single-file checkpoint, from ComfyUI-style state dicts, and
the errors for wrong or broken files. Tiny configs stand in for the shipped SD-2 ones."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from onestep_sr.models import base_models
from onestep_sr.models import ldm_convert as lc
from onestep_sr.models.base_models import BaseModelError, load_base, load_single_file_base
from onestep_sr.nodes.loader_node import FROM_INPUTS, OneStepSRLoader
from onestep_sr.nodes.upscale_node import OneStepSRUpscale
from onestep_sr.pipelines.model import load_onestep_model
from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings

import fake_comfy
from tinymodels import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_base):
    unet = lc.diffusers_to_ldm_unet(tiny_base.unet.state_dict(), TINY_UNET_CONFIG)
    vae = lc.diffusers_to_ldm_vae(tiny_base.vae.state_dict(), TINY_VAE_CONFIG)
    text = lc.hf_clip_to_open_clip_text(tiny_base.text_encoder.state_dict(), TINY_TEXT_CONFIG)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd21.safetensors"
    save_file({k: v.contiguous() for k, v in lc.assemble_single_file(unet, vae, text).items()}, str(path))
    return path


def test_shipped_configs_build_sd21_shapes():
    assert base_models.load_config("sd21_base", "unet")["cross_attention_dim"] == 1024
    assert base_models.load_config("sd_turbo", "text_encoder")["num_hidden_layers"] == 23


def test_single_file_equals_diffusers_folder(tiny_configs, single_file, tiny_base_dir, osediff_pkl):
    tokenizer = tiny_base_dir / "tokenizer"
    from_file = load_onestep_model(load_single_file_base(single_file, tokenizer), osediff_pkl[0])
    from_folder = load_onestep_model(load_base(tiny_base_dir), osediff_pkl[0])
    image = torch.rand(1, 20, 24, 3)
    a = OneStepPipeline(from_file)(image, UpscaleSettings(prompt="tree"))
    b = OneStepPipeline(from_folder)(image, UpscaleSettings(prompt="tree"))
    assert (a - b).abs().max() < 1e-5  # same weights; module construction paths may pick other kernels


def test_loader_from_comfy_inputs(monkeypatch, tmp_path, tiny_configs, tiny_base, tiny_base_dir, osediff_pkl):
    """MODEL/CLIP/VAE as ComfyUI holds them: LDM UNet/VAE, HF CLIP under clip_h.transformer with an
    extra (unused) last layer; result equals the diffusers-folder model."""
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    shutil.copytree(tiny_base_dir / "tokenizer", tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    (state.models_dir / "onestep_sr").mkdir(parents=True)
    shutil.copy(osediff_pkl[0], state.models_dir / "onestep_sr" / "osediff.pkl")

    class Holder:
        def __init__(self, **parts):
            self.__dict__.update(parts)

    unet_ldm = lc.diffusers_to_ldm_unet(tiny_base.unet.state_dict(), TINY_UNET_CONFIG)
    vae_ldm = lc.diffusers_to_ldm_vae(tiny_base.vae.state_dict(), TINY_VAE_CONFIG)
    clip_state = {f"clip_h.transformer.{k}": v
                  for k, v in lc.canonical_clip_keys(tiny_base.text_encoder.state_dict()).items()}
    clip_state["clip_h.logit_scale"] = torch.tensor(4.6)
    model = Holder(model=Holder(diffusion_model=torch.nn.Module()))
    model.model.diffusion_model.state_dict = lambda: unet_ldm
    vae = Holder(first_stage_model=Holder(state_dict=lambda: vae_ldm))
    clip = Holder(cond_stage_model=Holder(state_dict=lambda: clip_state))
    (handle,) = OneStepSRLoader().load("osediff.pkl", FROM_INPUTS, "fp32", model=model, clip=clip, vae=vae)
    image = torch.rand(1, 20, 24, 3)
    kwargs = dict(prompt="tree", scale=4.0, color_fix="adain", latent_tile=96, latent_overlap=32,
                  vae_encoder_tile=1024, vae_decoder_tile=224, latent="mean", seed=0)
    got, _mask = OneStepSRUpscale().upscale(handle, image, **kwargs)
    reference = OneStepPipeline(load_onestep_model(load_base(tiny_base_dir), osediff_pkl[0]))
    assert (got - reference(image, UpscaleSettings(prompt="tree", color_fix="adain"))).abs().max() < 1e-5
    assert torch.equal(tiny_base.unet.conv_in.weight, lc.convert_ldm_unet(unet_ldm, TINY_UNET_CONFIG)["conv_in.weight"])


def test_wrong_base_kinds_are_named(tmp_path):
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd15 = tmp_path / "sd15.safetensors"
    save_file({key: torch.zeros(320, 768), "cond_stage_model.transformer.x": torch.zeros(1)}, str(sd15))
    with pytest.raises(BaseModelError, match="sd15.safetensors is an SD-1.x checkpoint"):
        load_single_file_base(sd15)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.x": torch.zeros(1), key: torch.zeros(320, 2048)}, str(sdxl))
    with pytest.raises(BaseModelError, match="SDXL"):
        load_single_file_base(sdxl)


def test_missing_and_corrupt_base(tmp_path, single_file):
    with pytest.raises(BaseModelError, match=rf"nothere.safetensors \(looked in {tmp_path}"):
        load_base(tmp_path / "nothere.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(single_file.read_bytes()[:1000])
    with pytest.raises(BaseModelError, match="corrupt or truncated"):
        load_base(broken)
    folder = tmp_path / "half_diffusers"
    (folder / "unet").mkdir(parents=True)
    with pytest.raises(BaseModelError, match="no vae/ subfolder"):
        load_base(folder)


def test_single_file_without_tokenizer_explains(tiny_configs, single_file, osediff_pkl):
    model = load_onestep_model(load_single_file_base(single_file), osediff_pkl[0])
    with pytest.raises(ValueError, match="tokenizer"):
        OneStepPipeline(model)(torch.rand(1, 8, 8, 3))
