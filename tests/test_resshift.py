"""ResShift / SinSR / HF-Diff: schedule tables, key layout, sampler against hand-written loops,
chopping, noise replay, file errors, config reading, CLI/info. Tiny random models, published layouts.

Parity with the official code itself (their classes, on files like these) is checked outside the
suite; see docs/methods.md for the figures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onestep_sr.cli import main as cli_main
from onestep_sr.models.resshift import sampler as sampler_module
from onestep_sr.models.resshift.config import load_config_file, shipped_config
from onestep_sr.models.resshift.diffusion import (
    DiffusionConfig,
    ResShiftDiffusion,
    respaced_indices,
    sqrt_eta_schedule,
)
from onestep_sr.models.resshift.sampler import (
    NoiseSource,
    RecordedNoise,
    SeededNoise,
    chop_starts,
    sample_patch,
    upscale_lr,
)
from onestep_sr.models.resshift.swin_unet import shifted_window_mask
from onestep_sr.models.weights_io import WeightsFileError
from onestep_sr.pipelines.model import load_onestep_model
from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings

import synthetic_resshift as syn


# -- schedule -------------------------------------------------------------------------------------
def test_schedules_equal_the_published_tables():
    v12 = sqrt_eta_schedule(DiffusionConfig())  # METHODS.md section 6, three decimals
    table = [0.02, 0.117, 0.176, 0.234, 0.292, 0.351, 0.412, 0.476, 0.542, 0.610, 0.681, 0.754, 0.830, 0.909, 0.99]
    assert np.abs(v12 - table).max() < 5.1e-4
    assert np.array_equal(v12, sqrt_eta_schedule(DiffusionConfig(cap_sqrt_001=True)))  # the cap is inactive here
    v3 = sqrt_eta_schedule(DiffusionConfig(steps=4, min_noise_level=0.2))
    assert np.abs(v3 - [0.1, 0.52010, 0.76138, 0.99]).max() < 5e-6
    scales = 1 / np.sqrt(4 * v3**2 + 1)
    assert np.abs(scales - [0.98058, 0.69304, 0.54892, 0.45082]).max() < 5e-6
    capped = sqrt_eta_schedule(DiffusionConfig(steps=4, min_noise_level=0.2, cap_sqrt_001=True))
    assert capped[0] == pytest.approx(math.sqrt(0.001)) and capped[-1] == pytest.approx(0.99)


def test_shipped_configs_pick_the_right_schedule():
    assert shipped_config("sinsr_s15").diffusion.steps == 15
    assert shipped_config("resshift_s4").diffusion.min_noise_level == 0.2
    assert shipped_config("resshift_s15").unet.in_channels == 6


def test_respacing_follows_space_timesteps():
    assert respaced_indices(15, 15) == list(range(15))
    assert respaced_indices(15, 4) == [int(15 / 4 * x) for x in range(4)] == [0, 3, 7, 11]
    diffusion = ResShiftDiffusion(DiffusionConfig(), sample_steps=4)
    full = sqrt_eta_schedule(DiffusionConfig())
    assert np.array_equal(diffusion.sqrt_etas, full[[0, 3, 7, 11]])
    assert diffusion.model_timestep(3) == 11
    with pytest.raises(ValueError, match="1 to 15"):
        respaced_indices(15, 16)


# -- the Swin mask ----------------------------------------------------------------------------------
def _official_style_mask(h, w, ws, shift):
    """The official construction, step by step: label img[:, h, w, :] of a (1, 1, H, W) tensor,
    partition into windows, permute (0, 2, 3, 1), flatten, compare."""
    img = torch.zeros((1, 1, h, w))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    windows = img.view(1, 1, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws, ws, 1)
    flat = windows.permute(0, 2, 3, 1).reshape(-1, ws * ws)
    diff = flat.unsqueeze(1) - flat.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("h,w", [(16, 16), (24, 40), (64, 32)])
def test_shifted_window_mask_matches_the_official_construction(h, w):
    assert torch.equal(shifted_window_mask(h, w, 8, 4), _official_style_mask(h, w, 8, 4))


# -- files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resshift_files")
    unet, vq = syn.tiny_unet(), syn.tiny_vq()
    syn.write_vq(vq, folder / "autoencoder_vq_f4.pth")
    syn.write_unet(unet, folder / "SinSR_v1.pth")
    syn.write_unet(unet, folder / "HF-Diff.pth", wrap=True, prefix="module.")
    syn.write_unet(unet, folder / "resshift_realsrx4_s4_v3.pth", prefix="module.")
    syn.write_official_yaml(folder / "tiny_sinsr.yaml")
    syn.write_official_yaml(folder / "tiny_s4.yaml", steps=4, min_noise=0.2, resshift_style=True)
    return folder, unet, vq


def _load(files, name, config="tiny_sinsr.yaml", **kwargs):
    folder = files[0]
    return load_onestep_model(None, folder / name, model_config=folder / config, **kwargs)


def test_published_layout_variants_load_to_the_same_model(files):
    folder, unet, _ = files
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([5])
    expected = unet(x, t, x)
    for name in ("SinSR_v1.pth", "HF-Diff.pth"):  # plain; under 'state_dict' with 'module.'
        model = _load(files, name)
        assert torch.equal(model.unet(x, t, x), expected)
    assert _load(files, "HF-Diff.pth").method.name == "hf_diff"
    assert _load(files, "SinSR_v1.pth").method.name == "sinsr"
    v3 = _load(files, "resshift_realsrx4_s4_v3.pth", "tiny_s4.yaml")
    assert v3.method.name == "resshift_s4" and v3.diffusion().num_steps == 4


def test_key_layout_round_trip(files, tmp_path):
    folder, unet, _ = files
    model = _load(files, "SinSR_v1.pth")
    again = syn.write_unet(model.unet, tmp_path / "SinSR_v2.pth")
    saved, original = torch.load(again, weights_only=True), torch.load(folder / "SinSR_v1.pth", weights_only=True)
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)


def test_wrong_files_get_clear_errors(files, tmp_path):
    folder = files[0]
    sd_like = tmp_path / "SinSR_sd.pth"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, sd_like)
    with pytest.raises(WeightsFileError, match="Stable Diffusion base checkpoint"):
        load_onestep_model(None, sd_like)
    with pytest.raises(WeightsFileError, match="VQ-f4 autoencoder.*choose the model file"):
        load_onestep_model(None, folder / "autoencoder_vq_f4.pth")
    with pytest.raises(WeightsFileError, match=r"autoencoder_vq_f4\.pth was not found in"):
        load_onestep_model(None, folder / "SinSR_v1.pth", model_config=folder / "tiny_sinsr.yaml",
                           autoencoder_path=tmp_path / "autoencoder_vq_f4.pth")
    with pytest.raises(WeightsFileError, match="not the VQ-f4 autoencoder.*Swin UNet"):
        load_onestep_model(None, folder / "SinSR_v1.pth", model_config=folder / "tiny_sinsr.yaml",
                           autoencoder_path=folder / "HF-Diff.pth")
    renamed = tmp_path / "my_model.pth"
    renamed.write_bytes((folder / "SinSR_v1.pth").read_bytes())
    with pytest.raises(WeightsFileError, match="name does not say"):
        load_onestep_model(None, renamed)
    with pytest.raises(WeightsFileError, match="does not match the Swin UNet.*--model-config"):
        load_onestep_model(None, folder / "SinSR_v1.pth")  # tiny file, published sizes
    # the reverse: a ResShift file given as an SD method / base
    with pytest.raises(WeightsFileError, match="holds sinsr weights, but method 'osediff'"):
        load_onestep_model(None, folder / "SinSR_v1.pth", method="osediff")
    from onestep_sr.models.base_models import load_base

    with pytest.raises(Exception, match="SinSR_v1.pth"):
        load_base(folder / "SinSR_v1.pth")


def test_config_reader_resolves_references_and_resshift_channels(files):
    folder = files[0]
    sinsr, s4 = load_config_file(folder / "tiny_sinsr.yaml"), load_config_file(folder / "tiny_s4.yaml")
    assert sinsr.unet.out_channels == 3 and sinsr.unet.in_channels == 6 and s4.unet.in_channels == 6
    assert s4.diffusion.steps == 4 and s4.vq.n_embed == 64
    bad = folder / "bad.yaml"
    bad.write_text("model: {params: {image_size: 64}}\n")
    with pytest.raises(WeightsFileError, match="no autoencoder.params"):
        load_config_file(bad)


# -- the sampler ---------------------------------------------------------------------------------------
def _lr(h=64, w=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, h, w), generator=g) * 2 - 1


def test_one_step_is_the_closed_form(files):
    model = _load(files, "SinSR_v1.pth")
    unet, vq, diffusion = model.unet, model.vq, model.diffusion()
    lr = _lr(40, 56)  # padded to 64 x 64 by reflection
    eps = torch.randn(1, 3, 64, 64)
    out = sample_patch(unet, vq, diffusion, lr, RecordedNoise({"p0_s0": eps.numpy()}), 0, one_step=True)
    with torch.no_grad():
        padded = F.pad(lr, (0, 8, 0, 24), mode="reflect")
        y = vq.encode(F.interpolate(padded, scale_factor=4, mode="bicubic"))
        eta_t = 0.99**2
        x_t = y + 2 * 0.99 * eps
        x0 = unet(x_t / math.sqrt(4 * eta_t + 1), torch.tensor([14]), padded)
        image = vq.decode(x0)[..., :160, :224].clamp(-1, 1)
    assert torch.allclose(out.x_T, x_t, atol=1e-6)
    assert torch.allclose(out.x0, x0, atol=1e-5)
    assert (out.image - image).abs().max() < 1e-4


class _Recorder(NoiseSource):
    def __init__(self):
        self.names = []
        self.inner = SeededNoise(7)

    def draw(self, patch, step, shape):
        self.names.append(f"p{patch}_s{step}")
        return self.inner.draw(patch, step, shape)


def test_multi_step_equals_a_hand_written_loop(files):
    model = _load(files, "resshift_realsrx4_s4_v3.pth", "tiny_s4.yaml")
    unet, vq, diffusion = model.unet, model.vq, model.diffusion()
    lr = _lr()
    recorder = _Recorder()
    out = sample_patch(unet, vq, diffusion, lr, recorder, 0, one_step=False)
    assert recorder.names == ["p0_s0", "p0_s1", "p0_s2", "p0_s3"]  # no noise after the last step
    g = torch.Generator().manual_seed(7)
    eta = [0.1**2, 0.52010**2, 0.76138**2, 0.99**2]
    with torch.no_grad():
        y = vq.encode(F.interpolate(lr, scale_factor=4, mode="bicubic"))
        x = y + 2 * math.sqrt(eta[3]) * torch.randn(y.shape, generator=g)
        for t in (3, 2, 1, 0):
            x0 = unet(x / math.sqrt(4 * eta[t] + 1), torch.tensor([t]), lr)
            prev = eta[t - 1] if t else 0.0
            mean = prev / eta[t] * x + (eta[t] - prev) / eta[t] * x0
            x = mean + math.sqrt(4 * prev * (eta[t] - prev) / eta[t]) * torch.randn(y.shape, generator=g) if t else mean
        image = vq.decode(x).clamp(-1, 1)
    assert (out.x0 - x0).abs().max() < 1e-3  # eta from the 5-digit table
    assert (out.image - image).abs().mean() < 1e-3


def test_recorded_noise_replays_and_names_missing_draws():
    source = RecordedNoise({"p0_s0": np.ones((1, 3, 2, 2), np.float32)}, "run.npz")
    assert torch.equal(source.draw(0, 0, (1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="run.npz has no array p1_s0"):
        source.draw(1, 0, (1, 3, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        source.draw(0, 0, (1, 3, 4, 4))


# -- chopping ------------------------------------------------------------------------------------------
def test_chop_starts_follow_the_official_splitter():
    assert chop_starts(600, 512, 448) == [0, 88]
    assert chop_starts(1000, 512, 448) == [0, 448, 488]
    assert chop_starts(512, 512, 448) == [0]


def test_chopped_equals_unchopped_for_a_local_model(monkeypatch):
    """With a per-pixel model the official averaging must reproduce the unchopped result exactly.
    (With tiny random weights real chops differ a lot: per-patch GroupNorm statistics and codebook
    flips of a random VQ; that cannot bound what trained weights do, so it is not asserted here.)"""
    names = []

    def local(unet, vq, diffusion, lr, noise, patch, one_step, on_step=None):
        names.append(patch)
        return sampler_module.PatchResult(image=F.interpolate(lr.tanh(), scale_factor=4, mode="nearest"),
                                          x_T=lr, x0=lr)

    monkeypatch.setattr(sampler_module, "sample_patch", local)
    lr = _lr(150, 200)
    diffusion = ResShiftDiffusion(DiffusionConfig())
    whole = upscale_lr(None, None, diffusion, lr, SeededNoise(), True, chop_size=512)
    chopped = upscale_lr(None, None, diffusion, lr, SeededNoise(), True, chop_size=64, first_patch=10)
    assert torch.allclose(whole, chopped, atol=1e-6)
    assert names[0] == 0 and names[1:] == list(range(10, 10 + len(names) - 1))


# -- pipeline, CLI, info ---------------------------------------------------------------------------------
def test_pipeline_keeps_alpha_and_warns_about_ignored_inputs(files):
    model = _load(files, "HF-Diff.pth")
    image = torch.rand(1, 20, 24, 4)
    warnings = []
    from onestep_sr.pipelines.onestep import RunHooks

    out = OneStepPipeline(model)(image, UpscaleSettings(prompt="a cat"), RunHooks(warn=warnings.append))
    assert out.shape == (1, 80, 96, 4)
    assert any("HF-Diff has no prompt" in w for w in warnings)
    again = OneStepPipeline(model)(image, UpscaleSettings(noise_seed=12345))
    default = OneStepPipeline(model)(image, UpscaleSettings())
    assert torch.equal(again, default)  # 12345 is the default seed


def test_cli_upscale_and_info(files, tmp_path, capsys):
    from PIL import Image

    folder = files[0]
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(source)
    noise = tmp_path / "noise.npz"
    eps = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.savez(noise, p0_s0=eps)
    out = tmp_path / "out.png"
    args = ["upscale", str(source), "-o", str(out), "--weights", str(folder / "SinSR_v1.pth"), "--model-config",
            str(folder / "tiny_sinsr.yaml"), "--device", "cpu", "--dtype", "fp32"]
    assert cli_main([*args, "--noise", str(noise)]) == 0
    model = _load(files, "SinSR_v1.pth")
    lr = torch.from_numpy(np.asarray(Image.open(source)).astype(np.float32) / 255).permute(2, 0, 1)[None]
    expected = upscale_lr(model.unet, model.vq, model.diffusion(), lr * 2 - 1, RecordedNoise({"p0_s0": eps}), True)
    expected = ((expected * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(np.asarray(Image.open(out)).astype(np.float64) - expected).max() <= 1
    assert cli_main([*args, "--steps", "3", "--existing", "overwrite"]) == 1  # reported as that file's failure
    assert "one-step model" in capsys.readouterr().err
    assert cli_main(["info", str(folder / "resshift_realsrx4_s4_v3.pth")]) == 0
    assert "ResShift family" in capsys.readouterr().out and True


def test_node_and_cli_give_the_same_image(files, monkeypatch, tmp_path):
    import shutil

    from PIL import Image

    from onestep_sr.nodes.loader_node import FROM_INPUTS, OneStepSRLoader
    from onestep_sr.nodes.upscale_node import METHOD_DEFAULT, OneStepSRUpscale

    import fake_comfy
    import tinymodels

    tokenizer = tmp_path / "tok"
    tinymodels.write_tiny_tokenizer(tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    folder = state.models_dir / "onestep_sr"
    folder.mkdir(parents=True)
    for name in ("SinSR_v1.pth", "tiny_sinsr.yaml"):
        shutil.copy(files[0] / name, folder / name)
    types = OneStepSRLoader.INPUT_TYPES()
    assert types["required"]["weights"][0] == ["SinSR_v1.pth"]
    assert "tiny_sinsr.yaml" in types["optional"]["model_config"][0]
    with pytest.raises(WeightsFileError, match=r"autoencoder_vq_f4\.pth was not found in .*onestep_sr"):
        OneStepSRLoader().load("SinSR_v1.pth", FROM_INPUTS, "fp32", model_config="tiny_sinsr.yaml")
    shutil.copy(files[0] / "autoencoder_vq_f4.pth", folder / "autoencoder_vq_f4.pth")
    (handle,) = OneStepSRLoader().load("SinSR_v1.pth", FROM_INPUTS, "fp32", model_config="tiny_sinsr.yaml")
    source = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(source)
    image = torch.from_numpy(np.asarray(Image.open(source)).astype(np.float32) / 255.0)[None]
    node_out, _ = OneStepSRUpscale().upscale(handle, image, prompt="", scale=4.0, color_fix=METHOD_DEFAULT,
                                             latent_tile=96, latent_overlap=32, vae_encoder_tile=1024,
                                             vae_decoder_tile=224, latent="mean", seed=5)
    assert state.progress[-1][0] == state.progress[-1][1]
    out = tmp_path / "out.png"
    assert cli_main(["upscale", str(source), "-o", str(out), "--weights", str(folder / "SinSR_v1.pth"),
                     "--model-config", str(folder / "tiny_sinsr.yaml"), "--seed", "5", "--device", "cpu",
                     "--dtype", "fp32"]) == 0
    cli_out = np.asarray(Image.open(out)).astype(np.float32) / 255.0
    assert np.abs(cli_out - node_out[0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_fp16_torso_as_the_official_convert_to_fp16():
    unet = syn.tiny_unet()
    x, lq = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    t = torch.tensor([9])
    reference = unet(x, t, lq)
    unet.set_torso_dtype(torch.bfloat16)
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert unet.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GroupNorm stays fp32
    assert unet.time_embed[0].weight.dtype == torch.float32 and unet.out[2].weight.dtype == torch.float32
    out = unet(x, t, lq)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
