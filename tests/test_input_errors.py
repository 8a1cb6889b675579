"""Bad inputs outside the batch loop: one-line messages for broken weights, bases and tokenizers; NaN/inf
images and bad settings refused at the pipeline boundary and by the nodes; model-folder names confined."""

from __future__ import annotations

import os
import pickle
import types

import pytest
import torch
from safetensors.torch import save_file

from onestep_sr.models import ldm_convert as lc
from onestep_sr.models.base_models import BaseModelError, load_base, load_single_file_base, load_tokenizer
from onestep_sr.models.weights_io import WeightsFileError, read_weights_file, write_safetensors_export
from onestep_sr.nodes import comfy_adapter
from onestep_sr.nodes.degradation_node import OneStepSRDegradationEstimator
from onestep_sr.nodes.loader_node import DIFFUSERS_PREFIX, OneStepSRLoader
from onestep_sr.nodes.timestep_node import OneStepSRTimestep
from onestep_sr.nodes.upscale_node import METHOD_DEFAULT, OneStepSRUpscale
from onestep_sr.pipelines.methods import get_method
from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings

import fake_comfy
import tinymodels
from tinymodels import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG


class _RunsCode:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "weights_only" not in text
    return text


# -- weights files ---------------------------------------------------------------------------------

def test_malicious_pickle_never_runs_and_is_not_called_corrupt(tmp_path):
    marker = tmp_path / "ran"
    payload = {"state_dict_unet": {"x": _RunsCode(marker)}}
    torch.save(payload, tmp_path / "zip.pkl")
    with open(tmp_path / "plain.pkl", "wb") as handle:
        pickle.dump(payload, handle)
    for name in ("zip.pkl", "plain.pkl"):
        with pytest.raises(WeightsFileError) as info:
            read_weights_file(tmp_path / name)
        text = _one_line(info.value)
        assert "Python objects other than tensors" in text and "could run code" in text
        assert "corrupt" not in text and name in text and str(tmp_path) in text
    assert not marker.exists()
    with pytest.raises(BaseModelError) as info:  # a malicious base checkpoint gets the same message
        load_single_file_base(tmp_path / "zip.pkl")
    assert "Python objects other than tensors" in _one_line(info.value) and not marker.exists()


def test_broken_weights_files_are_described(tmp_path, osediff_pkl):
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(WeightsFileError, match=r"empty.pkl in .* is empty \(0 bytes\)") as info:
        read_weights_file(tmp_path / "empty.pkl")
    _one_line(info.value)
    (tmp_path / "random.pkl").write_bytes(os.urandom(3000))
    with pytest.raises(WeightsFileError, match="not a PyTorch weights file") as info:
        read_weights_file(tmp_path / "random.pkl")
    assert "Python objects" not in _one_line(info.value)
    (tmp_path / "folder.pkl").mkdir()
    with pytest.raises(WeightsFileError, match="folder.pkl in .* is a folder"):
        read_weights_file(tmp_path / "folder.pkl")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(osediff_pkl[0].read_bytes()[:5000])
    with pytest.raises(WeightsFileError) as info:
        read_weights_file(truncated)
    assert _one_line(info.value).endswith("corrupt or truncated (its zip archive is incomplete); download it again")


def test_export_without_meta_is_explained(tmp_path, osediff_pkl):
    from safetensors import safe_open

    export = tmp_path / "full.safetensors"
    write_safetensors_export(read_weights_file(osediff_pkl[0]), export, "osediff")
    with safe_open(str(export), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        header = dict(handle.metadata())
    del header["meta"]
    save_file(tensors, str(tmp_path / "no_meta.safetensors"), metadata=header)
    with pytest.raises(WeightsFileError, match="lacks a readable 'meta' entry.*onestep-sr convert") as info:
        read_weights_file(tmp_path / "no_meta.safetensors")
    _one_line(info.value)


# -- bases and tokenizers ----------------------------------------------------------------------------

def test_sd2_layout_with_other_sizes_is_one_line(tmp_path, tiny_base):
    """The tiny base has SD-2's layout but not its sizes: against the shipped SD-2.1 configs it used to
    print hundreds of size-mismatch lines."""
    unet = lc.diffusers_to_ldm_unet(tiny_base.unet.state_dict(), TINY_UNET_CONFIG)
    vae = lc.diffusers_to_ldm_vae(tiny_base.vae.state_dict(), TINY_VAE_CONFIG)
    text = lc.hf_clip_to_open_clip_text(tiny_base.text_encoder.state_dict(), TINY_TEXT_CONFIG)
    path = tmp_path / "sd2_like.safetensors"
    save_file({k: v.contiguous() for k, v in lc.assemble_single_file(unet, vae, text).items()}, str(path))
    with pytest.raises(BaseModelError) as info:
        load_base(path)
    text = _one_line(info.value)
    assert "sd2_like.safetensors" in text and "not its sizes" in text and len(text) < 400


def test_garbage_tokenizer_is_one_line(tmp_path):
    (tmp_path / "vocab.json").write_text("this is not json")
    (tmp_path / "merges.txt").write_text("nor this")
    with pytest.raises(BaseModelError, match=rf"tokenizer in {tmp_path} could not be read") as info:
        load_tokenizer(tmp_path)
    _one_line(info.value)


# -- the pipeline boundary -----------------------------------------------------------------------------

def _stub_pipeline() -> OneStepPipeline:
    """Settings and images are checked before the model is touched, so a stand-in model suffices."""
    return OneStepPipeline(types.SimpleNamespace(method=get_method("osediff")))


@pytest.mark.parametrize(("settings", "message"), [
    (UpscaleSettings(latent_overlap=-8), "latent overlap must be at least 0"),
    (UpscaleSettings(latent_tile=64, latent_overlap=64), "smaller than the latent tile"),
    (UpscaleSettings(scale=float("nan")), "scale must be a finite number"),
    (UpscaleSettings(scale=float("inf")), "scale must be a finite number"),
    (UpscaleSettings(scale=0.0), "scale must be positive"),
    (UpscaleSettings(guidance=float("inf")), "guidance must be a finite number"),
    (UpscaleSettings(tile_batch=0), "tile batch must be at least 1"),
    (UpscaleSettings(vae_decoder_tile=-1), "VAE decoder tile must be at least 1"),
    (UpscaleSettings(vae_encoder_tile=2.5), "VAE encoder tile must be an integer"),
    (UpscaleSettings(vae_norm_stats="fast"), "VAE statistics mode"),
    (UpscaleSettings(max_output_pixels=0), "pixel limit must be at least 1"),
])
def test_bad_settings_are_refused_by_the_pipeline(settings, message):
    with pytest.raises(ValueError, match=message):
        _stub_pipeline()(torch.rand(1, 8, 8, 3), settings)


def test_non_finite_images_are_refused_by_the_pipeline():
    for bad in (float("nan"), float("inf"), -float("inf")):
        image = torch.rand(1, 8, 8, 3)
        image[0, 3, 4, 1] = bad
        with pytest.raises(ValueError, match=r"image has 1 NaN or infinite value\(s\)"):
            _stub_pipeline()(image)
        with pytest.raises(ValueError, match="NaN or infinite"):
            _stub_pipeline().predict_timesteps(image)
    with pytest.raises(ValueError, match="C in 1..4"):
        _stub_pipeline()(torch.rand(1, 8, 8, 5))


# -- nodes -----------------------------------------------------------------------------------------------

@pytest.fixture
def comfy(monkeypatch, tmp_path):
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    tinymodels.write_tiny_tokenizer(tokenizer)
    return fake_comfy.install(monkeypatch, tmp_path, tokenizer)


def test_nodes_refuse_nan_images_naming_the_input(comfy):
    image = torch.rand(1, 8, 8, 3)
    image[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="OneStep Upscale input 'image' has 1 NaN"):
        OneStepSRUpscale().upscale(None, image, "", 4.0, METHOD_DEFAULT, 96, 32, 1024, 224, "mean", 0)
    with pytest.raises(ValueError, match="DTSM Timestep input 'image'"):
        OneStepSRTimestep().choose(image, None, "sample", 0, 4.0, 999)
    with pytest.raises(ValueError, match="Degradation Estimator input 'image'"):
        OneStepSRDegradationEstimator().estimate(image, None, "manual", 0.5, 0.5)


def test_fake_get_full_path_cleans_names_like_comfyui(comfy):
    folder_paths = comfy.folder_paths
    (comfy.models_dir / "checkpoints").mkdir(parents=True)
    secret = comfy.models_dir / "secret.safetensors"
    secret.write_bytes(b"x")
    assert os.path.isfile(os.path.join(comfy.models_dir / "checkpoints", "../secret.safetensors"))
    assert folder_paths.get_full_path("checkpoints", "../secret.safetensors") is None
    assert folder_paths.get_full_path("checkpoints", str(secret)) is None
    assert folder_paths.get_full_path("no_such_folder", "x") is None
    with pytest.raises(FileNotFoundError, match="not found in the 'checkpoints' model folder"):
        comfy_adapter.full_path("checkpoints", "../secret.safetensors")


def test_diffusers_names_stay_inside_the_diffusers_folders(comfy, tiny_base_dir):
    import shutil

    shutil.copytree(tiny_base_dir, comfy.models_dir / "elsewhere" / "tiny")
    (comfy.models_dir / "diffusers").mkdir(parents=True)
    for name in ("../elsewhere/tiny", "tiny/../../elsewhere/tiny", str(comfy.models_dir / "elsewhere" / "tiny"),
                 "..", "."):
        with pytest.raises(ValueError, match="must name a folder inside models/diffusers"):
            comfy_adapter.diffusers_folder(name)
        with pytest.raises(ValueError, match="must name a folder inside models/diffusers"):
            OneStepSRLoader._load_base(DIFFUSERS_PREFIX + name, None, None, None)
    shutil.copytree(tiny_base_dir, comfy.models_dir / "diffusers" / "tiny")
    assert comfy_adapter.diffusers_folder("tiny") == comfy.models_dir / "diffusers" / "tiny"
