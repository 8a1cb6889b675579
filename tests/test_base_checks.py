"""Wrong bases are refused with one line on every path: ComfyUI's MODEL/CLIP/VAE (Load Checkpoint's
outputs, faked), a single file and a diffusers folder; v-prediction SD-2.x too. LoRA patches on the MODEL
and CLIP (LoraLoader) are applied to the one-step model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from onestep_sr.models import base_models
from onestep_sr.models.base_models import BaseModelError, load_diffusers_base, load_single_file_base
from onestep_sr.nodes.loader_node import FROM_INPUTS, OneStepSRLoader

import fake_comfy

ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CLI_TAIL = "the one-step SR methods need an SD-2.x base (SD-2.1-base for OSEDiff, SD-Turbo for S3Diff/Hero-SR)"


@pytest.fixture
def comfy(monkeypatch, tmp_path, tiny_base_dir, osediff_pkl):
    return fake_comfy.install_with_osediff(monkeypatch, tmp_path, tiny_base_dir, osediff_pkl[0])




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
    outputs = fake_comfy.checkpoint_outputs(*fake_comfy.tiny_comfy_states(tiny_base), model_type="V_PREDICTION")
    with pytest.raises(BaseModelError) as error:
        _load_from_inputs(outputs)
    message = _one_line(error)
    assert "is a v-prediction model" in message
    assert message.endswith("SD-2.1-base (v2-1_512-ema-pruned.safetensors)")  # osediff.pkl needs SD-2.1-base


def test_lora_patches_on_the_model_and_clip_count(comfy, tiny_configs, tiny_base):
    """LoraLoader's patches (here "diff" patches) on the MODEL and CLIP are applied to our modules at load
    time, on the weights built from those very tensors; no warning."""
    unet, vae, clip = fake_comfy.tiny_comfy_states(tiny_base)
    unet_key = "input_blocks.1.1.norm.weight"  # not an OSEDiff LoRA target
    clip_key = next(k for k in clip if k.endswith("layers.0.self_attn.q_proj.weight"))
    unet_diff = torch.full_like(unet[unet_key], 0.25)
    clip_diff = torch.full_like(clip[clip_key], -0.5)
    outputs = fake_comfy.checkpoint_outputs(
        unet, vae, clip, model_patches={"diffusion_model." + unet_key: [(1.0, ("diff", (unet_diff,)), 1.0, None, None)]},
        clip_patches={clip_key: [(2.0, ("diff", (clip_diff,)), 1.0, None, None)]})
    (handle,) = _load_from_inputs(outputs)
    assert comfy.ui_text == []
    norm = handle.model.unet.down_blocks[0].attentions[0].norm
    assert norm.weight.data_ptr() == unet[unet_key].data_ptr()  # shared until loaded
    handle.pipeline()  # loads the main patcher: LoRA patches applied
    torch.testing.assert_close(norm.weight, unet[unet_key] + unet_diff, rtol=0, atol=0)
    q_name = next(n for n, _ in handle.model.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    q_proj = handle.model.text_encoder.get_submodule(q_name)
    with handle.model.text_encoder_placement():
        torch.testing.assert_close(q_proj.weight, clip[clip_key] + 2.0 * clip_diff, rtol=0, atol=0)
    assert q_proj.weight.data_ptr() == clip[clip_key].data_ptr()  # unloaded: the shared tensor again


def test_unpatched_model_gives_no_warning(comfy, tiny_configs, tiny_base):
    _load_from_inputs(fake_comfy.checkpoint_outputs(*fake_comfy.tiny_comfy_states(tiny_base)))
    assert comfy.ui_text == []


def test_lazy_inputs_are_requested_only_for_an_inputs_base():
    loader = OneStepSRLoader()
    assert loader.check_lazy_status("osediff.pkl", "sd21.safetensors", "auto") == []
    # linked but not run yet: None (ComfyUI's convention); run already: a value
    assert loader.check_lazy_status("osediff.pkl", FROM_INPUTS, "auto", model=None, clip=object(),
                                    vae=None) == ["model", "vae"]
    # unlinked inputs are not passed at all, and must not be asked for (ComfyUI raises NodeInputError):
    # a base-free method (HF-Diff) leaves them unlinked
    assert loader.check_lazy_status("HF-Diff.pth", FROM_INPUTS, "auto") == []


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
