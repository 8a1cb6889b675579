"""Wrong bases are refused with one line on every path: ComfyUI's MODEL/CLIP/VAE (Load Checkpoint's
outputs, faked), a single file and a diffusers folder; v-prediction SD-2.x too. LoRA patches on the MODEL
(LoraLoader) give a warning shown in the UI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from onestep_sr.models import base_models
from onestep_sr.models import ldm_convert as lc
from onestep_sr.models.base_models import BaseModelError, load_diffusers_base, load_single_file_base
from onestep_sr.nodes.loader_node import FROM_INPUTS, OneStepSRLoader

import fake_comfy
from tinymodels import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG

ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CLI_TAIL = "the one-step SR methods need an SD-2.x base (SD-2.1-base for OSEDiff, SD-Turbo for S3Diff/Hero-SR)"


@pytest.fixture
def comfy(monkeypatch, tmp_path, tiny_base_dir, osediff_pkl):
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    shutil.copytree(tiny_base_dir / "tokenizer", tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    (state.models_dir / "onestep_sr").mkdir(parents=True)
    shutil.copy(osediff_pkl[0], state.models_dir / "onestep_sr" / "osediff.pkl")
    return state


@pytest.fixture
def tiny_configs(monkeypatch, tmp_path):
    folder = tmp_path / "configs" / "sd21_base"
    folder.mkdir(parents=True)
    for name, config in (("unet", TINY_UNET_CONFIG), ("vae", TINY_VAE_CONFIG), ("text_encoder", TINY_TEXT_CONFIG)):
        (folder / f"{name}.json").write_text(json.dumps(config))
    monkeypatch.setattr(base_models, "CONFIG_DIR", folder.parent)


def _tiny_comfy_states(tiny_base) -> tuple[dict, dict, dict]:
    unet = lc.diffusers_to_ldm_unet(tiny_base.unet.state_dict(), TINY_UNET_CONFIG)
    vae = lc.diffusers_to_ldm_vae(tiny_base.vae.state_dict(), TINY_VAE_CONFIG)
    clip = {f"clip_h.transformer.{k}": v for k, v in lc.canonical_clip_keys(tiny_base.text_encoder.state_dict()).items()}
    return unet, vae, clip


def _load_from_inputs(outputs):
    model, clip, vae = outputs
    return OneStepSRLoader().load("osediff.pkl", FROM_INPUTS, "fp32", model=model, clip=clip, vae=vae, unique_id="7")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "size mismatch" not in message and len(message) < 400
    return message


def test_sd15_model_from_load_checkpoint_gives_the_cli_message(comfy, tmp_path):
    sd15_unet = {ATTN2_K: torch.zeros(320, 768), "label_free.bias": torch.zeros(1)}
    outputs = fake_comfy.checkpoint_outputs(sd15_unet, {}, {"clip_l.transformer.x": torch.zeros(1)})
    with pytest.raises(BaseModelError) as node_error:
        _load_from_inputs(outputs)
    assert _one_line(node_error).endswith("is an SD-1.x checkpoint; " + CLI_TAIL)

    sd15_file = tmp_path / "sd15.safetensors"  # the CLI/single-file path on the same UNet says the same
    save_file({"model.diffusion_model." + ATTN2_K: torch.zeros(320, 768)}, str(sd15_file))
    with pytest.raises(BaseModelError) as file_error:
        load_single_file_base(sd15_file)
    assert str(file_error.value) == str(node_error.value).replace(
        "the MODEL input (from Load Checkpoint)", "sd15.safetensors")


@pytest.mark.parametrize(("unet", "clip", "expected"), [
    ({ATTN2_K: torch.zeros(320, 2048), "label_emb.0.0.weight": torch.zeros(1)}, "clip_g", "is an SDXL checkpoint"),
    ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "t5xxl", "is not a Stable Diffusion 2.x checkpoint"),
], ids=["sdxl", "flux-like"])
def test_other_families_from_load_checkpoint(comfy, unet, clip, expected):
    outputs = fake_comfy.checkpoint_outputs(unet, {}, {f"{clip}.transformer.x": torch.zeros(1)})
    with pytest.raises(BaseModelError) as error:
        _load_from_inputs(outputs)
    assert expected in _one_line(error)


def test_v_prediction_model_is_refused_naming_the_file(comfy, tiny_base):
    outputs = fake_comfy.checkpoint_outputs(*_tiny_comfy_states(tiny_base), model_type="V_PREDICTION")
    with pytest.raises(BaseModelError) as error:
        _load_from_inputs(outputs)
    message = _one_line(error)
    assert "is a v-prediction model" in message
    assert message.endswith("SD-2.1-base (v2-1_512-ema-pruned.safetensors)")  # osediff.pkl needs SD-2.1-base


def test_epsilon_model_with_lora_patches_loads_and_warns_in_the_ui(comfy, tiny_configs, tiny_base):
    patches = {"diffusion_model.input_blocks.1.1.proj_in.weight": [("lora", 1.0)]}
    outputs = fake_comfy.checkpoint_outputs(*_tiny_comfy_states(tiny_base), model_patches=patches)
    (handle,) = _load_from_inputs(outputs)
    assert handle.model.method.name == "osediff"
    assert comfy.ui_text, "the warning reaches the node's UI text"
    node_id, text = comfy.ui_text[-1]
    assert node_id == "7" and "the MODEL (1 patched weights)" in text and "not applied" in text


def test_unpatched_model_gives_no_warning(comfy, tiny_configs, tiny_base):
    _load_from_inputs(fake_comfy.checkpoint_outputs(*_tiny_comfy_states(tiny_base)))
    assert comfy.ui_text == []


def test_lazy_inputs_are_requested_only_for_an_inputs_base():
    loader = OneStepSRLoader()
    assert loader.check_lazy_status("osediff.pkl", "sd21.safetensors", "auto") == []
    assert loader.check_lazy_status("osediff.pkl", FROM_INPUTS, "auto", clip=object()) == ["model", "vae"]
    optional = OneStepSRLoader.INPUT_TYPES.__func__  # noqa: F841 (schema checked in test_node_schema)


def _probe_state(std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"model.diffusion_model." + ATTN2_K: torch.zeros(320, 1024),
            "model.diffusion_model." + base_models.V_PRED_PROBE_KEY: torch.randn(320, generator=generator) * std}


@pytest.mark.parametrize("std", [0.0, 0.02, 0.2, 0.5])
def test_v_prediction_heuristic_matches_a_numpy_std(std):
    state = _probe_state(std)
    bias = state["model.diffusion_model." + base_models.V_PRED_PROBE_KEY].numpy().astype(np.float64)
    expected = "v_prediction" if np.sqrt(np.mean((bias - bias.mean()) ** 2)) > 0.09 else "epsilon"
    assert base_models.prediction_from_state(state) == expected
    assert base_models.prediction_from_state({"v_pred": torch.zeros(1), **state}) == "v_prediction"


def test_v_prediction_single_file_is_refused(tmp_path):
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    save_file(_probe_state(0.3), str(path))
    with pytest.raises(BaseModelError) as error:
        load_single_file_base(path, needs="sd_turbo")
    assert _one_line(error) == (
        "v2-1_768-ema-pruned.safetensors is a v-prediction model (like SD-2.1 768-v); the one-step SR methods "
        "need an epsilon-prediction base: SD-Turbo (sd_turbo.safetensors)")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_diffusers_folder_checks(tmp_path, tiny_base_dir):
    v_folder = tmp_path / "sd21-768-v"
    shutil.copytree(tiny_base_dir, v_folder)
    _edit_json(v_folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    with pytest.raises(BaseModelError) as error:
        load_diffusers_base(v_folder, needs="sd21_base")
    assert _one_line(error).startswith("diffusers folder sd21-768-v is a v-prediction model")

    sd15_folder = tmp_path / "sd15"
    shutil.copytree(tiny_base_dir, sd15_folder)
    _edit_json(sd15_folder / "unet" / "config.json", cross_attention_dim=768)
    with pytest.raises(BaseModelError) as error:
        load_diffusers_base(sd15_folder)
    assert _one_line(error) == "diffusers folder sd15 is an SD-1.x checkpoint; " + CLI_TAIL
