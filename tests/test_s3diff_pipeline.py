"""S3Diff end to end on the tiny model: an independent computation with per-image merged weights
(W + s*B*M^T*A) and two separate CFG passes, as the official code runs them; batch behaviour; the
S3Diff geometry; and its file handling."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from onestep_sr.models.base_models import load_diffusers_base
from onestep_sr.models.modulated_lora import ModulatedLoRAConv2d, ModulatedLoRALinear
from onestep_sr.models.schedule import alphas_cumprod
from onestep_sr.models.weights_io import WeightsFileError
from onestep_sr.pipelines.color_fix import wavelet_color_fix
from onestep_sr.pipelines.model import load_onestep_model
from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings


@pytest.fixture(scope="module")
def s3diff(tmp_path_factory, tiny_base, tiny_base_dir):
    from synthetic_s3diff import write_de_net, write_s3diff_pkl

    folder = tmp_path_factory.mktemp("s3diff")
    write_s3diff_pkl(tiny_base, folder / "s3diff.pkl")
    write_de_net(folder / "de_net.pth")
    model = load_onestep_model(load_diffusers_base(tiny_base_dir), folder / "s3diff.pkl")
    return OneStepPipeline(model, "cpu"), folder


def _merged_copy(model: torch.nn.Module, matrices: torch.Tensor) -> torch.nn.Module:
    """A plain copy of `model` whose modulated layers are replaced by merged per-image weights."""
    merged = copy.deepcopy(model)
    for name, layer in list(merged.named_modules()):
        if not isinstance(layer, ModulatedLoRALinear | ModulatedLoRAConv2d):
            continue
        base = copy.deepcopy(layer.base_layer)
        a = layer.lora_down.weight.float()
        b = layer.lora_up.weight.float().flatten(1)
        m = matrices[0, layer.block].float()
        delta = layer.scale * (b @ m.T @ a.flatten(1))
        with torch.no_grad():
            base.weight += delta.reshape(base.weight.shape)
        parent, _, leaf = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, leaf, base)
    return merged


def test_matches_independent_merged_computation(s3diff):
    pipeline, _ = s3diff
    model = pipeline.model
    image = torch.rand(1, 20, 28, 3)
    scores = torch.tensor([[0.3, 0.7]])
    got = pipeline(image, UpscaleSettings(degradation=scores, output_size="native"))

    unet_m, vae_m = model.modulation(scores)
    unet = _merged_copy(model.unet, unet_m)
    vae = _merged_copy(model.vae, vae_m)
    with torch.no_grad():
        lr = image.permute(0, 3, 1, 2)
        up = F.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False)
        x = up * 2 - 1
        pad_h, pad_w = (-x.shape[2]) % 64, (-x.shape[3]) % 64
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        latent = vae.encode(x).latent_dist.mean * 0.18215
        pos = model.encode_prompt(model.method.prompt, torch.device("cpu"))
        neg = model.encode_prompt(model.method.negative_prompt, torch.device("cpu"))
        eps_pos = unet(latent, 999, encoder_hidden_states=pos).sample
        eps_neg = unet(latent, 999, encoder_hidden_states=neg).sample
        eps = eps_neg + 1.07 * (eps_pos - eps_neg)
        a = alphas_cumprod()[999].float()
        z0 = (latent - (1 - a).sqrt() * eps) / a.sqrt()
        out = (vae.decode(z0 / 0.18215).sample.clamp(-1, 1) + 1) / 2
        out = out[:, :, : up.shape[2], : up.shape[3]]
        expected = wavelet_color_fix(out, up)
    assert got.shape == (1, 80, 112, 3)
    assert (got.permute(0, 3, 1, 2) - expected).abs().max() < 5e-4


def test_batch_of_two_degradations_equals_single_runs(s3diff):
    pipeline, _ = s3diff
    images = torch.rand(2, 16, 16, 3)
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    together = pipeline(images, UpscaleSettings(degradation=scores))
    for i in range(2):
        alone = pipeline(images[i : i + 1], UpscaleSettings(degradation=scores[i : i + 1]))
        assert (together[i : i + 1] - alone).abs().max() < 2e-3
    swapped = pipeline(images[:1], UpscaleSettings(degradation=scores[1:]))
    assert (swapped - together[:1]).abs().max() > 1e-3  # the scores really modulate the result


def test_estimated_scores_are_used_by_default(s3diff):
    pipeline, _ = s3diff
    image = torch.rand(1, 16, 16, 3)
    scores = pipeline.estimate_degradation(image)
    assert scores.shape == (1, 2) and 0 <= scores.min() and scores.max() <= 1
    assert torch.equal(pipeline(image), pipeline(image, UpscaleSettings(degradation=scores)))


def test_s3diff_defaults_and_exact_size(s3diff):
    pipeline, _ = s3diff
    settings = pipeline.resolve(UpscaleSettings())
    assert settings.guidance == 1.07 and settings.color_fix == "wavelet"
    assert pipeline(torch.rand(1, 9, 13, 3)).shape == (1, 36, 52, 3)  # padded to 64, cropped back


def test_missing_de_net_is_named(s3diff, tmp_path, tiny_base_dir):
    _, folder = s3diff
    shutil.copy(folder / "s3diff.pkl", tmp_path / "s3diff.pkl")
    with pytest.raises(WeightsFileError, match=rf"de_net.pth.*{tmp_path.name}"):
        load_onestep_model(load_diffusers_base(tiny_base_dir), tmp_path / "s3diff.pkl")


def test_sd21_base_is_warned(s3diff, tiny_base_dir, caplog):
    _, folder = s3diff
    with caplog.at_level("WARNING", logger="onestep_sr"):
        load_onestep_model(load_diffusers_base(tiny_base_dir), folder / "s3diff.pkl")
    assert "SD-Turbo" in caplog.text
