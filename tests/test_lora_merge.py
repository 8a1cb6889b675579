"""OSEDiff weights: the PEFT adapter path (how the official code runs) equals our merged weights."""

from __future__ import annotations

import copy

import pytest
import torch

from onestep_sr.models.lora import LoRAFormatError, merge_adapters, replace_parameters
from onestep_sr.models.method_weights import detect_method, parse_osediff
from onestep_sr.models.weights_io import WeightsFileError, read_weights_file, write_safetensors_export


def _merged_copies(tiny_base, weights):
    unet = copy.deepcopy(tiny_base.unet)
    vae = copy.deepcopy(tiny_base.vae)
    replace_parameters(unet, weights.unet_trained)
    merge_adapters(unet, weights.unet_adapters)
    merge_adapters(vae, weights.vae_adapters, what="VAE")
    return unet, vae


def test_published_layout_is_read(osediff_pkl):
    path, _, _ = osediff_pkl
    data = read_weights_file(path)
    assert detect_method(data) == "osediff"
    weights = parse_osediff(data)
    assert [a.name for a in weights.unet_adapters] == ["default_encoder", "default_decoder", "default_others"]
    assert all(a.scale == 2.0 for a in weights.unet_adapters + weights.vae_adapters)  # alpha 8 / r 4
    assert set(weights.unet_trained) == {"conv_in.weight", "conv_in.bias"}
    assert "conv_in" in weights.unet_adapters[0].pairs  # conv_in is also a LoRA target
    assert "quant_conv" in weights.vae_adapters[0].pairs


def test_peft_adapters_equal_merged_weights(tiny_base, osediff_pkl):
    path, peft_unet, peft_vae = osediff_pkl
    unet, vae = _merged_copies(tiny_base, parse_osediff(read_weights_file(path)))
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 4, 16, 24, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    image = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = peft_unet(latent, 999, encoder_hidden_states=text).sample
        got = unet(latent, 999, encoder_hidden_states=text).sample
        expected_moments = peft_vae.encode(image).latent_dist.mean
        got_moments = vae.encode(image).latent_dist.mean
        base = tiny_base.unet(latent, 999, encoder_hidden_states=text).sample
    assert (expected - base).abs().max() > 1e-2  # the adapters really change the output
    assert (got - expected).abs().max() < 1e-5
    assert (got_moments - expected_moments).abs().max() < 1e-5


def test_merge_does_not_touch_shared_base_tensors(tiny_base, osediff_pkl):
    """ComfyUI's checkpoint tensors are shared with our modules: merging must replace, not mutate."""
    path, _, _ = osediff_pkl
    unet = copy.deepcopy(tiny_base.unet)
    shared = unet.down_blocks[0].resnets[0].conv1.weight
    before = shared.detach().clone()
    merge_adapters(unet, parse_osediff(read_weights_file(path)).unet_adapters)
    assert torch.equal(shared, before)
    assert not torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, before)


def test_safetensors_export_round_trip(tmp_path, osediff_pkl):
    path, _, _ = osediff_pkl
    data = read_weights_file(path)
    out = tmp_path / "osediff.safetensors"
    write_safetensors_export(data, out, method="osediff")
    back = read_weights_file(out)
    assert detect_method(back) == "osediff"
    assert back["rank_unet"] == data["rank_unet"]
    assert back["vae_lora_encoder_modules"] == data["vae_lora_encoder_modules"]
    assert back["state_dict_unet"].keys() == data["state_dict_unet"].keys()
    for key, value in data["state_dict_unet"].items():
        assert torch.equal(back["state_dict_unet"][key], value)


def test_truncated_file_is_reported(tmp_path, osediff_pkl):
    path, _, _ = osediff_pkl
    broken = tmp_path / "osediff.pkl"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsFileError, match="corrupt or truncated"):
        read_weights_file(broken)


def test_missing_file_names_file_and_folder(tmp_path):
    with pytest.raises(WeightsFileError, match=rf"osediff.pkl.*{tmp_path.name}"):
        read_weights_file(tmp_path / "osediff.pkl")


def test_arbitrary_pickle_is_refused(tmp_path):
    import datetime
    import pickle

    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as handle:
        pickle.dump({"x": datetime.date(2024, 1, 1)}, handle)
    with pytest.raises(WeightsFileError, match="Python objects"):
        read_weights_file(evil)


def test_wrong_base_is_named(osediff_pkl):
    """An SD-1.5/SDXL-shaped UNet: the cross-attention width differs, so the mismatch is named."""
    from diffusers import UNet2DConditionModel

    from tinymodels import TINY_UNET_CONFIG

    path, _, _ = osediff_pkl
    weights = parse_osediff(read_weights_file(path))
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 48})
    with pytest.raises(LoRAFormatError, match="attn2.to_k.*different base"):
        merge_adapters(other, weights.unet_adapters)
    fewer = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "layers_per_block": 1})
    with pytest.raises(LoRAFormatError, match="do not exist in the base model"):
        merge_adapters(fewer, weights.unet_adapters)


def test_incomplete_file_is_reported(osediff_pkl):
    path, _, _ = osediff_pkl
    data = read_weights_file(path)
    first = next(k for k in data["state_dict_unet"] if "lora_B" in k)
    broken = {**data, "state_dict_unet": {k: v for k, v in data["state_dict_unet"].items() if k != first}}
    with pytest.raises(LoRAFormatError, match="no lora_B"):
        parse_osediff(broken)
    with pytest.raises(WeightsFileError, match="rank_unet"):
        parse_osediff({k: v for k, v in data.items() if k != "rank_unet"})


def test_merge_keeps_float32_for_half_bases(tiny_base, osediff_pkl):
    """An fp16-stored base must merge in fp32, so --dtype fp32 gives the same weights whatever
    precision the checkpoint file had (the model is cast once, afterwards)."""
    path, _, _ = osediff_pkl
    weights = parse_osediff(read_weights_file(path))
    half = copy.deepcopy(tiny_base.unet).half()
    full = copy.deepcopy(tiny_base.unet).half().float()
    for unet in (half, full):
        replace_parameters(unet, weights.unet_trained)
        merge_adapters(unet, weights.unet_adapters)
    layer = "down_blocks.0.resnets.0.conv1.weight"
    assert dict(half.named_parameters())[layer].dtype == torch.float32
    assert torch.equal(dict(half.named_parameters())[layer], dict(full.named_parameters())[layer])
    assert half.conv_in.weight.dtype == torch.float32


def test_prompt_pads_to_the_text_encoders_length(tiny_base_dir, osediff_pkl):
    """ComfyUI's tokenizer config claims 8192 tokens; CLIP has 77 positions."""
    from onestep_sr.models.base_models import load_diffusers_base
    from onestep_sr.pipelines.model import load_onestep_model

    model = load_onestep_model(load_diffusers_base(tiny_base_dir), osediff_pkl[0])
    model.tokenizer.model_max_length = 8192
    assert model.encode_prompt("a long prompt", torch.device("cpu")).shape[1] == 77


def test_deferred_patches_merge_to_the_same_weights(tiny_base, osediff_pkl, hero_pkl_for_lora):
    """defer_lora keeps the static LoRA as weight patches (for ComfyUI's ModelPatcher); merging them later
    gives bit-for-bit the weights of loading merged, for OSEDiff and Hero-SR, and leaves the base tensors
    untouched until then."""
    from onestep_sr.models.base_models import BaseModels
    from onestep_sr.pipelines.model import apply_method_weights

    for path, method in ((osediff_pkl[0], "osediff"), (hero_pkl_for_lora, "hero_sr")):
        data = read_weights_file(path)
        merged, deferred = (apply_method_weights(
            BaseModels(copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae), None, None), data, method,
            path.name, defer_lora=defer) for defer in (False, True))
        assert merged.weight_patches == {} and deferred.weight_patches
        assert {key.split(".")[0] for key in deferred.weight_patches} == {"unet", "vae"}
        lora_weight = next(k for k in deferred.weight_patches if k != "unet.conv_in.weight")
        _, _, name = lora_weight.partition(".")
        part = deferred.unet if lora_weight.startswith("unet.") else deferred.vae
        base_part = tiny_base.unet if lora_weight.startswith("unet.") else tiny_base.vae
        assert torch.equal(part.get_parameter(name), base_part.get_parameter(name))  # not merged yet
        deferred.merge_weight_patches()
        for ours, theirs in ((deferred.unet, merged.unet), (deferred.vae, merged.vae)):
            for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
                assert torch.equal(a, b), f"{method}: {name}"


@pytest.fixture(scope="module")
def hero_pkl_for_lora(tmp_path_factory, tiny_base):
    import synthetic_hero

    path = tmp_path_factory.mktemp("hero_lora") / "hero_sr_model.pkl"
    synthetic_hero.write_hero_pkl(tiny_base, path)
    return path
