"""Single-file (LDM) <-> diffusers conversion, checked against diffusers' own converters."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as reference
from transformers import CLIPTextConfig, CLIPTextModel

from onestep_sr.models import ldm_convert as lc

from tinymodels import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG


@pytest.fixture(scope="module")
def ldm(tiny_base):
    unet = lc.diffusers_to_ldm_unet(tiny_base.unet.state_dict(), TINY_UNET_CONFIG)
    vae = lc.diffusers_to_ldm_vae(tiny_base.vae.state_dict(), TINY_VAE_CONFIG)
    text = lc.hf_clip_to_open_clip_text(tiny_base.text_encoder.state_dict(), TINY_TEXT_CONFIG)
    return unet, vae, text


def _text_state(module) -> dict:
    """The CLIP text state in the file layout (`text_model.*`), whatever transformers version."""
    return {k: v for k, v in lc.canonical_clip_keys(module.state_dict()).items() if "position_ids" not in k}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_is_exact(tiny_base, ldm):
    unet, vae, text = ldm
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in unet
    assert vae["encoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 conv in LDM
    _assert_same(lc.convert_ldm_unet(unet, TINY_UNET_CONFIG), tiny_base.unet.state_dict())
    _assert_same(lc.convert_ldm_vae(vae, TINY_VAE_CONFIG), tiny_base.vae.state_dict())
    expected_text = _text_state(tiny_base.text_encoder)
    _assert_same(lc.convert_open_clip_text(text, TINY_TEXT_CONFIG), expected_text)


def test_equals_diffusers_converters(ldm):
    unet, vae, text = ldm
    full = lc.assemble_single_file(unet, vae, text)
    ours_unet = lc.convert_ldm_unet(unet, TINY_UNET_CONFIG)
    _assert_same(ours_unet, reference.convert_ldm_unet_checkpoint(full, dict(TINY_UNET_CONFIG)))
    ours_vae = lc.convert_ldm_vae(vae, TINY_VAE_CONFIG)
    _assert_same(ours_vae, reference.convert_ldm_vae_checkpoint(full, dict(TINY_VAE_CONFIG)))
    text_model = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    theirs = reference.convert_open_clip_checkpoint(text_model, full)
    keep = TINY_TEXT_CONFIG["num_hidden_layers"]
    extra = f"text_model.encoder.layers.{keep}."  # their list of ignored keys names the 24th block only
    theirs = {k: v for k, v in lc.canonical_clip_keys(theirs).items()
              if not k.startswith(extra) and "position_ids" not in k}
    _assert_same(lc.convert_open_clip_text(text, TINY_TEXT_CONFIG), theirs)


def test_converted_modules_run_like_the_originals(tiny_base, ldm):
    unet_state, vae_state, text_state = ldm
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    unet.load_state_dict(lc.convert_ldm_unet(unet_state, TINY_UNET_CONFIG), strict=True)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    vae.load_state_dict(lc.convert_ldm_vae(vae_state, TINY_VAE_CONFIG), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)).eval()
    converted = lc.convert_open_clip_text(text_state, TINY_TEXT_CONFIG)
    missing, unexpected = text.load_state_dict(lc.clip_keys_for(set(text.state_dict()), converted), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    latent, embeds, image = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.rand(1, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 500, (1, 77))
    with torch.no_grad():
        assert torch.equal(unet(latent, 999, encoder_hidden_states=embeds).sample,
                           tiny_base.unet(latent, 999, encoder_hidden_states=embeds).sample)
        assert torch.equal(vae.decode(latent).sample, tiny_base.vae.decode(latent).sample)
        assert torch.equal(vae.encode(image).latent_dist.mean, tiny_base.vae.encode(image).latent_dist.mean)
        assert torch.equal(text(ids)[0], tiny_base.text_encoder(ids)[0])


def test_comfy_style_hf_clip_with_prefix(tiny_base):
    state = {f"clip_h.transformer.{k}": v for k, v in _text_state(tiny_base.text_encoder).items()}
    extra = copy.deepcopy(tiny_base.text_encoder.get_submodule("text_model.encoder.layers.1")
                          if hasattr(tiny_base.text_encoder, "text_model")
                          else tiny_base.text_encoder.get_submodule("encoder.layers.1")).state_dict()
    state.update({f"clip_h.transformer.text_model.encoder.layers.2.{k}": v for k, v in extra.items()})
    state["clip_h.logit_scale"] = torch.tensor(4.6)
    state["clip_h.transformer.text_projection.weight"] = torch.randn(32, 32)
    converted = lc.convert_hf_clip_text(state, TINY_TEXT_CONFIG, "clip_h.transformer.")
    _assert_same(converted, _text_state(tiny_base.text_encoder))
    with pytest.raises(lc.ConversionError, match="prefix"):
        lc.convert_hf_clip_text(state, TINY_TEXT_CONFIG, "clip_l.transformer.")


def test_detect_base_and_split(ldm):
    unet, vae, text = ldm
    full = lc.assemble_single_file(unet, vae, text)
    assert lc.detect_base(full) == "sd2"
    parts = lc.split_single_file(full)
    assert parts.text_format == "open_clip" and parts.unet.keys() == unet.keys() and parts.vae.keys() == vae.keys()
    key = lc.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert lc.detect_base({key: torch.zeros(320, 768), lc.HF_CLIP_PREFIX + "x": torch.zeros(1)}) == "sd1"
    assert lc.detect_base({key: torch.zeros(320, 1024)}) == "sd2"
    assert lc.detect_base({"conditioner.embedders.0.transformer.x": torch.zeros(1)}) == "sdxl"
    assert lc.detect_base({"foo": torch.zeros(1)}) == "unknown"
    with pytest.raises(lc.ConversionError, match="unexpected UNet key"):
        lc.convert_ldm_unet({"input_blocks.99.0.in_layers.0.weight": torch.zeros(1)}, TINY_UNET_CONFIG)
