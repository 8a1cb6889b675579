"""HF-Diff's INN feature extractor, its checkpoint, its pretraining command and the HF perceptual loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.cli import main
from onestep_sr.models.hf_inn import (
    HFFeatureExtractor,
    HFInnConfig,
    HFInnFormatError,
    load_hf_extractor,
    save_hf_inn,
)
from onestep_sr.models.hf_inn_pretrain import PretrainSettings, pretrain
from onestep_sr.training.losses.hf_perceptual import HighFrequencyPerceptualLoss

TINY = HFInnConfig(channels=8, num_layers=3, hidden_channels=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _extractor(seed=0, config=TINY):
    torch.manual_seed(seed)
    return HFFeatureExtractor(config).eval()


def test_invertible_part_inverts_to_1e_5():
    net = _extractor()
    h = torch.randn(2, 8, 16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = net.inn_forward(h)
        back = net.inn_inverse(z)
    assert (z - h).abs().mean() > 0.1  # not the identity
    assert float((back - h).abs().max()) < 1e-5


def test_features_keep_the_spatial_size():
    net = _extractor()
    assert net(torch.zeros(1, 3, 20, 28)).shape == (1, 8, 20, 28)
    with pytest.raises(ValueError, match="even channel count"):
        HFInnConfig(channels=7)


def test_hf_loss_is_zero_for_identical_inputs_and_matches_its_formula():
    net = _extractor()
    loss_fn = HighFrequencyPerceptualLoss(net, reduction="none")
    gen = torch.Generator().manual_seed(2)
    target, pred = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    assert float(loss_fn(target, target).abs().max()) == 0.0
    with torch.no_grad():
        expected = 0.2 * ((net(target) - net(pred)) ** 2).mean(dim=(1, 2, 3))
    pred.requires_grad_(True)
    values = loss_fn(pred, target)
    torch.testing.assert_close(values, expected)
    values.sum().backward()
    assert pred.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


def test_checkpoint_round_trip_and_errors(tmp_path):
    net = _extractor(seed=3)
    path = save_hf_inn(tmp_path / "inn.safetensors", net)
    loaded = load_hf_extractor(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="inn.safetensors already exists"):
        save_hf_inn(path, net)
    with pytest.raises(FileNotFoundError, match=r"not found: missing.safetensors \(looked in"):
        load_hf_extractor(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HFInnFormatError, match="not an HF-INN checkpoint"):
        load_hf_extractor(tmp_path / "other.safetensors")


def _write_folder(root, per_class=6, size=40):
    """Two separable classes: reddish vs greenish noise images."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(["green", "red"]):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            array = rng.integers(0, 80, size=(size, size, 3))
            array[..., 1 - index] += 150
            Image.fromarray(array.astype(np.uint8)).save(root / name / f"{k}.png")
    (root / "red" / "broken.png").write_bytes(b"not an image")


def test_pretraining_learns_and_its_checkpoint_feeds_the_hf_loss(tmp_path):
    _write_folder(tmp_path / "images")
    out = tmp_path / "inn.safetensors"
    settings = PretrainSettings(epochs=30, batch_size=6, lr=2e-3, crop=16, workers=0, log_every=1000)
    config = HFInnConfig(channels=8, num_layers=2, hidden_channels=8)
    result = pretrain(tmp_path / "images", out, settings, config)
    assert result["last_loss"] < 0.5 * result["first_loss"], result
    loss_fn = HighFrequencyPerceptualLoss(load_hf_extractor(out))
    latents = torch.randn(2, 3, 8, 8)
    assert float(loss_fn(latents, latents)) == 0.0 and float(loss_fn(latents, latents.flip(-1))) > 0


def test_train_inn_command(tmp_path, capsys):
    _write_folder(tmp_path / "images", per_class=2)
    out = tmp_path / "inn.safetensors"
    args = ["train-inn", str(tmp_path / "images"), "-o", str(out), "--epochs", "1", "--batch-size", "2",
            "--crop", "16", "--channels", "4", "--layers", "1", "--hidden", "4", "--workers", "0", "--device", "cpu"]
    assert main(args) == 0
    assert "steps" in capsys.readouterr().out
    assert load_hf_extractor(out).config == HFInnConfig(channels=4, num_layers=1, hidden_channels=4)
    assert main(args) == 2  # never overwrites silently
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    assert main(["train-inn", str(tmp_path / "flat"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "one sub-folder per class" in capsys.readouterr().err
