"""The CLI for S3Diff and Hero-SR: estimate, timestep, upscale flags, and their input errors; and the
Degradation Estimator / DTSM Timestep nodes against comfy fakes (same numbers as the CLI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.cli import main as cli_main
from onestep_sr.nodes.degradation_node import OneStepSRDegradationEstimator
from onestep_sr.nodes.loader_node import DIFFUSERS_PREFIX, OneStepSRLoader
from onestep_sr.nodes.timestep_node import OneStepSRTimestep

import fake_comfy


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_base):
    from synthetic_hero import write_hero_pkl
    from synthetic_s3diff import write_de_net, write_s3diff_pkl

    folder = tmp_path_factory.mktemp("method_weights")
    write_s3diff_pkl(tiny_base, folder / "s3diff.pkl")
    write_de_net(folder / "de_net.pth")
    write_hero_pkl(tiny_base, folder / "hero_sr_model.pkl")
    image = folder / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    return folder


def test_estimate_prints_scores(weights, capsys):
    assert cli_main(["estimate", str(weights / "in.png"), "--weights", str(weights / "s3diff.pkl"), "--json",
                     "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and 0 <= rows[0]["blur"] <= 1 and 0 <= rows[0]["noise"] <= 1


def test_timestep_prints_t_and_logits(weights, tiny_base_dir, capsys):
    args = ["timestep", str(weights / "in.png"), "--base", str(tiny_base_dir), "--weights",
            str(weights / "hero_sr_model.pkl"), "--seed", "3", "--json", "--device", "cpu"]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli_main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first == second and len(first[0]["logits"]) == 101 and 0 <= first[0]["timestep"] <= 999


def test_upscale_flags_and_errors(weights, tiny_base_dir, tmp_path, capsys):
    base = ["upscale", str(weights / "in.png"), "--base", str(tiny_base_dir), "--device", "cpu"]
    out = tmp_path / "s3.png"
    assert cli_main([*base, "-o", str(out), "--weights", str(weights / "s3diff.pkl"), "--degradation", "0.2,0.4",
                     "--guidance", "1"]) == 0
    assert Image.open(out).size == (96, 80)
    assert cli_main([*base, "-o", str(out), "--weights", str(weights / "s3diff.pkl"), "--degradation", "0.2,1.4"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    hero = tmp_path / "hero.png"
    assert cli_main([*base, "-o", str(hero), "--weights", str(weights / "hero_sr_model.pkl"), "--timestep", "499"]) == 0
    assert cli_main([*base, "-o", str(hero), "--weights", str(weights / "hero_sr_model.pkl"), "--timestep", "1000"]) == 2
    assert "0..999" in capsys.readouterr().err


def test_nodes_match_the_cli(weights, tiny_base_dir, monkeypatch, tmp_path, capsys):
    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    shutil.copytree(tiny_base_dir / "tokenizer", tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    shutil.copytree(weights, state.models_dir / "onestep_sr")
    shutil.copytree(tiny_base_dir, state.models_dir / "diffusers" / "tiny-turbo")
    image = torch.from_numpy(np.asarray(Image.open(weights / "in.png")).astype(np.float32) / 255)[None]

    (s3,) = OneStepSRLoader().load("s3diff.pkl", DIFFUSERS_PREFIX + "tiny-turbo", "fp32")
    scores, blur, noise = OneStepSRDegradationEstimator().estimate(image, s3, "estimated", 0.5, 0.5)
    cli_main(["estimate", str(weights / "in.png"), "--weights", str(weights / "s3diff.pkl"), "--json",
              "--device", "cpu"])
    row = json.loads(capsys.readouterr().out)[0]
    assert abs(blur - row["blur"]) < 1e-6 and abs(noise - row["noise"]) < 1e-6
    manual, blur, noise = OneStepSRDegradationEstimator().estimate(image, s3, "manual", 0.25, 0.75)
    assert manual.tolist() == [[0.25, 0.75]] and (blur, noise) == (0.25, 0.75)

    (hero,) = OneStepSRLoader().load("hero_sr_model.pkl", DIFFUSERS_PREFIX + "tiny-turbo", "fp32")
    timestep, t = OneStepSRTimestep().choose(image, hero, "sample", 3, 4.0, 999)
    cli_main(["timestep", str(weights / "in.png"), "--base", str(tiny_base_dir), "--weights",
              str(weights / "hero_sr_model.pkl"), "--seed", "3", "--json", "--device", "cpu"])
    assert t == json.loads(capsys.readouterr().out)[0]["timestep"]
    _, fixed = OneStepSRTimestep().choose(image, hero, "fixed", 0, 4.0, 123)
    assert fixed == 123
    with pytest.raises(ValueError, match="Hero-SR"):
        OneStepSRTimestep().choose(image, s3, "sample", 0, 4.0, 999)


def test_upscale_node_checks_the_conditions_it_gets(weights, tiny_base_dir, monkeypatch, tmp_path):
    """The DTSM's scale travels with its timesteps; inputs a method does not use are dropped with a UI warning."""
    from onestep_sr.nodes.upscale_node import OneStepSRUpscale

    tokenizer = tmp_path / "comfy" / "sd1_tokenizer"
    shutil.copytree(tiny_base_dir / "tokenizer", tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    shutil.copytree(weights, state.models_dir / "onestep_sr")
    shutil.copytree(tiny_base_dir, state.models_dir / "diffusers" / "tiny-turbo")
    image = torch.from_numpy(np.asarray(Image.open(weights / "in.png")).astype(np.float32) / 255)[None]
    settings = dict(prompt="", color_fix="method default", latent_tile=96, latent_overlap=32, vae_encoder_tile=1024,
                    vae_decoder_tile=224, latent="mean", seed=0)

    (hero,) = OneStepSRLoader().load("hero_sr_model.pkl", DIFFUSERS_PREFIX + "tiny-turbo", "fp32")
    timestep, _ = OneStepSRTimestep().choose(image, hero, "fixed", 0, 4.0, 250)
    assert timestep["scale"] == 4.0
    with pytest.raises(ValueError, match="scale 4 but this node upscales x2; set the same scale"):
        OneStepSRUpscale().upscale(hero, image, scale=2.0, timestep=timestep, **settings)

    (s3,) = OneStepSRLoader().load("s3diff.pkl", DIFFUSERS_PREFIX + "tiny-turbo", "fp32")
    state.ui_text.clear()
    plain, _ = OneStepSRUpscale().upscale(s3, image, scale=2.0, guidance=1.0, **settings, unique_id="9")
    ignored, _ = OneStepSRUpscale().upscale(s3, image, scale=2.0, guidance=1.0, timestep=timestep, **settings,
                                            unique_id="9")
    assert torch.equal(plain, ignored)
    assert state.ui_text == [("9", "Warning: the timestep input is ignored: S3Diff uses its fixed timestep (only "
                                   "Hero-SR uses DTSM timesteps)")]
