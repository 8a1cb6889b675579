"""The nodes against fakes of ComfyUI's functions: loading, upscaling, progress, interrupt, errors,
and the same image as the CLI for the same settings."""

from __future__ import annotations

import shutil
from pathlib import Path

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
    image, mask = OneStepSRUpscale().upscale(handle, _image(), **UPSCALE_DEFAULTS)
    assert image.shape == (1, 96, 112, 3)
    assert comfy.loaded and comfy.loaded[-1][1] is True  # loaded through load_models_gpu, fully
    assert comfy.progress[-1][0] == comfy.progress[-1][1]


def test_node_and_cli_give_the_same_image(comfy, tmp_path, tiny_base_dir, osediff_pkl):
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    source = tmp_path / "input.png"
    Image.fromarray((_image(30, 20, seed=4)[0].numpy() * 255).round().astype(np.uint8)).save(source)
    node_input = torch.from_numpy(np.asarray(Image.open(source)).astype(np.float32) / 255.0)[None]
    node_out, _mask = OneStepSRUpscale().upscale(handle, node_input, **{**UPSCALE_DEFAULTS, "color_fix": "wavelet"})
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


def test_mask_is_upscaled_as_alpha_and_returned(comfy):
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    rgb = _image(24, 28, seed=2)
    mask = torch.zeros(1, 24, 28)
    mask[:, 6:18, 4:20] = 1.0  # a transparent window, as Load Image gives for alpha = 0
    image, out_mask = OneStepSRUpscale().upscale(handle, rgb, **UPSCALE_DEFAULTS, mask=mask)
    # the same as upscaling the RGBA image itself (the CLI's path for PNGs with alpha)
    rgba, no_mask = OneStepSRUpscale().upscale(handle, torch.cat([rgb, 1 - mask[..., None]], -1), **UPSCALE_DEFAULTS)
    assert image.shape == (1, 96, 112, 3) and out_mask.shape == (1, 96, 112)
    torch.testing.assert_close(image, rgba[..., :3], atol=0, rtol=0)
    torch.testing.assert_close(out_mask, 1 - rgba[..., 3], atol=0, rtol=0)
    assert out_mask[0, 40, 50] > 0.99 and out_mask[0, 2, 2] < 0.01
    plain, empty = OneStepSRUpscale().upscale(handle, rgb, **UPSCALE_DEFAULTS, mask=torch.zeros(1, 64, 64))
    assert empty.shape == (1, 96, 112) and not empty.any()  # Load Image's placeholder mask means no alpha
    torch.testing.assert_close(plain, image, atol=0, rtol=0)  # alpha never changes the RGB result
    with pytest.raises(ValueError, match="mask is 10x10 but the image 28x24"):
        OneStepSRUpscale().upscale(handle, rgb, **UPSCALE_DEFAULTS, mask=torch.ones(1, 10, 10))


def test_optional_limits_and_colour_strength(comfy):
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    with pytest.raises(ValueError, match="above the limit of 10000 pixels"):
        OneStepSRUpscale().upscale(handle, _image(), **UPSCALE_DEFAULTS, max_megapixels=0.01)
    settings = {**UPSCALE_DEFAULTS, "color_fix": "lab"}
    full, _ = OneStepSRUpscale().upscale(handle, _image(), **settings, tile_batch=1)
    torch.testing.assert_close(full, OneStepSRUpscale().upscale(handle, _image(), **settings)[0], atol=1e-5, rtol=0)
    raw, _ = OneStepSRUpscale().upscale(handle, _image(), **settings, color_fix_strength=0.0)
    unfixed, _ = OneStepSRUpscale().upscale(handle, _image(), **{**settings, "color_fix": "none"})
    torch.testing.assert_close(raw, unfixed, atol=0, rtol=0)  # strength 0 = no fix (the blend: test_color_fix)
    assert (full - raw).abs().max() > 1e-3


def test_ignored_degradation_warns_in_the_ui(comfy):
    (handle,) = OneStepSRLoader().load("osediff.pkl", DIFFUSERS_PREFIX + "tiny-sd21", "fp32")
    plain, _ = OneStepSRUpscale().upscale(handle, _image(), **UPSCALE_DEFAULTS)
    ignored, _ = OneStepSRUpscale().upscale(handle, _image(), **UPSCALE_DEFAULTS,
                                            degradation=torch.tensor([[0.9, 0.9]]), unique_id="3")
    torch.testing.assert_close(plain, ignored, atol=0, rtol=0)
    assert [node for node, _ in comfy.ui_text] == ["3"] and "degradation input is ignored: OSEDiff" in comfy.ui_text[0][1]


def test_node_schema_conventions(comfy):
    from onestep_sr.nodes import NODE_CLASS_MAPPINGS
    from onestep_sr.nodes.degradation_node import OneStepSRDegradationEstimator
    from onestep_sr.nodes.timestep_node import OneStepSRTimestep

    for node_id, node_class in NODE_CLASS_MAPPINGS.items():
        types = node_class.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                if name in ("seed", "noise_seed"):  # a seed that re-runs the node on every Queue surprises
                    # the control widget is declared (bool: a string would become the widget's *name* in
                    # frontend 1.2x) and web/js/onestep_sr.js sets it to "fixed" on new nodes of the pack
                    assert spec[1].get("control_after_generate") is True, f"{node_id}.{name}"
                    assert node_id.startswith("OneStepSR_")
        for kind in node_class.RETURN_TYPES:
            assert kind in ("IMAGE", "MASK", "INT", "FLOAT", "STRING") or kind.startswith("ONESTEP_SR_"), kind
        assert "(OSEDiff)" not in node_class.DESCRIPTION
    optional = OneStepSRUpscale.INPUT_TYPES()["optional"]
    assert optional["timestep"][0].split(",") == [OneStepSRTimestep.RETURN_TYPES[0], "SR_TIMESTEP"]
    assert optional["degradation"][0].split(",") == [OneStepSRDegradationEstimator.RETURN_TYPES[0], "SR_DEGRADATION"]
    assert list(optional)[-5:] == ["color_fix_strength", "tile_batch", "max_megapixels", "mask", "steps"]  # appended
    assert OneStepSRUpscale.RETURN_TYPES == ("IMAGE", "MASK")  # MASK appended after IMAGE
    import onestep_sr

    script = (Path(onestep_sr.__file__).parent / onestep_sr.WEB_DIRECTORY / "js" / "onestep_sr.js").read_text()
    assert 'PACK_PREFIX = "OneStepSR_"' in script and 'widget.value = "fixed"' in script
    loader_optional = OneStepSRLoader.INPUT_TYPES()["optional"]
    assert all(loader_optional[name][1].get("lazy") for name in ("model", "clip", "vae"))
