"""Training config schema, data loading and bad input: unknown/out-of-range keys, unreadable and small
images, missing feature networks, step-seeded sampling, the CLI entry points, lazy imports."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

pytest.importorskip("yaml")

from onestep_sr.training.config import ConfigError, config_differences, config_from_dict, load_config  # noqa: E402
from onestep_sr.training.data import DatasetError, StepBatchSampler, TrainImages  # noqa: E402
from onestep_sr.training.feature_networks import FeatureNetworkMissing  # noqa: E402

import training_fixtures as tf  # noqa: E402


def test_unknown_keys_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optim.learning_rate; known keys in optim: lr, lr_fake"):
        config_from_dict({"optim": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError, match="unknown key.*trainer.*known keys: method"):
        config_from_dict({"trainer": {}})


@pytest.mark.parametrize("data,match", [
    ({"optim": {"lr": -1.0}}, r"optim.lr = -1.0 is out of range"),
    ({"train": {"batch_size": 0}}, r"train.batch_size = 0 is out of range"),
    ({"train": {"mixed_precision": "fp8"}}, "must be one of no, fp16, bf16"),
    ({"data": {"crop": 100}}, "multiple of 8 x scale"),
    ({"train": {"batch_size": 2.5}}, "must be an integer"),
    ({"method": "osediff", "loss": {"gan": 0.5}}, "S3Diff's loss"),
    ({"loss": {"vsd_t_min": 900, "vsd_t_max": 100}}, "vsd_t_min must be below"),
])
def test_out_of_range_and_wrong_types(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_shipped_configs_load_and_match_the_papers():
    from pathlib import Path

    import onestep_sr.training as package

    folder = Path(package.__file__).parent / "configs"
    osediff = load_config(folder / "osediff.yaml")
    assert (osediff.loss.mse, osediff.loss.lpips, osediff.loss.vsd, osediff.loss.vsd_guidance) == (1, 2, 1, 7.5)
    assert (osediff.optim.lr, osediff.optim.weight_decay, osediff.optim.grad_clip) == (5e-5, 1e-2, 1.0)
    assert (osediff.train.batch_size, osediff.model.lora_rank, osediff.data.crop) == (4, 4, 512)
    assert osediff.degradation.preset == "osediff" and osediff.train.max_steps == 100000


def test_resume_differences_name_recipe_keys_only():
    a = config_from_dict({}).to_dict()
    b = config_from_dict({"optim": {"lr": 1e-4}, "train": {"max_steps": 5}, "output_dir": "elsewhere"}).to_dict()
    assert config_differences(a, b) == ["optim.lr"]


def test_unreadable_and_small_images_are_counted_and_named(tmp_path, caplog):
    tf.write_images(tmp_path, 2, (64, 64))
    tf.write_images(tmp_path / "sub", 1, (40, 48))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="onestep_sr.training"):
        data = TrainImages(tmp_path, crop=64)
    assert len(data) == 3
    assert "skipped 1 of 4 file(s) that cannot be read as images: broken.png" in caplog.text
    assert "1 image(s) smaller than the 64 px crop were reflect-padded up to 64 px: img000.png" in caplog.text
    item = data[(2, 5, 0)]
    assert item["gt"].shape == (3, 64, 64)
    assert len(TrainImages(tmp_path, crop=64, small_images="skip")) == 2
    with pytest.raises(DatasetError, match="no usable training images in .*: 1 found, 1 unreadable"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
        TrainImages(tmp_path / "bad", crop=64)
    with pytest.raises(DatasetError, match="no images in"):
        (tmp_path / "empty").mkdir()
        TrainImages(tmp_path / "empty", crop=64)


def test_a_file_that_fails_to_decode_is_replaced_and_reported(tmp_path, caplog):
    paths = tf.write_images(tmp_path, 2, (64, 64))
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 3])  # the header survives, the pixels do not
    dataset = TrainImages(tmp_path, crop=64)
    assert len(dataset) == 2
    with caplog.at_level(logging.WARNING, logger="onestep_sr.training"):
        item = dataset[(0, 1, 0)]
    assert item["gt"].shape == (3, 64, 64)
    assert "cannot decode" in caplog.text and "img000.png" in caplog.text


def test_paired_crops_align_and_list_files_work(tmp_path):
    hr, lr = tf.write_pairs(tmp_path, 2, size=64)
    listing = tmp_path / "list.txt"
    listing.write_text("hr/img000.png\nhr/img001.png\n")
    data = TrainImages(listing, crop=32, lr_folder=lr)
    item = data[(0, 3, 0)]
    assert item["gt"].shape == (3, 32, 32) and item["lr"].shape == (3, 8, 8)
    down = torch.nn.functional.avg_pool2d(item["gt"][None], 4)[0]
    assert float((down - item["lr"]).abs().mean()) < 0.08  # the same region, not a random one


def test_step_sampler_splits_the_global_batch_across_processes():
    one = list(StepBatchSampler(10, 4, seed=1, start_step=0, max_steps=5))
    two = [list(StepBatchSampler(10, 2, seed=1, start_step=0, max_steps=5, rank=r, world=2)) for r in (0, 1)]
    for step in range(5):
        assert one[step] == two[0][step] + two[1][step]
    resumed = list(StepBatchSampler(10, 4, seed=1, start_step=3, max_steps=5))
    assert resumed == one[3:]


def test_missing_feature_network_names_file_and_folder(tmp_path):
    from onestep_sr.training.losses.lpips import LPIPSVGG

    with pytest.raises(FeatureNetworkMissing, match=r"vgg16-397923af.pth not found in .*features"):
        LPIPSVGG.from_folder(tmp_path / "features")


def test_lpips_matches_an_explicit_computation(tmp_path):
    from onestep_sr.training.losses.lpips import LPIPSVGG

    folder = tf.write_feature_networks(tmp_path)
    net = LPIPSVGG.from_folder(folder)
    vgg = torch.load(folder / "vgg16-397923af.pth")
    lins = torch.load(folder / "lpips_vgg.pth")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1

    def feats(x):
        x = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(
            1, 3, 1, 1)
        out = []
        for block in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)):
            if out:
                x = torch.nn.functional.max_pool2d(x, 2)
            for i in block:
                x = torch.relu(torch.nn.functional.conv2d(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"],
                                                          padding=1))
            out.append(x)
        return out

    expected = 0
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b), strict=True)):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        expected = expected + ((na - nb) ** 2 * lins[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    torch.testing.assert_close(net(a, b).flatten(), expected, atol=1e-6, rtol=1e-5)
    assert float(net(a, a).abs().max()) == 0


def test_cli_help_and_module_entry_point():
    from onestep_sr.cli import build_parser

    help_text = build_parser().parse_args.__self__.format_help()
    assert "train" in help_text
    out = subprocess.run([sys.executable, "-m", "onestep_sr.training", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--resume" in out.stdout and "accelerate launch" in out.stdout


def test_node_runtime_does_not_import_training_dependencies():
    code = ("import sys, onestep_sr, onestep_sr.cli, onestep_sr.pipelines.onestep; "
            "bad = [m for m in ('accelerate', 'kornia', 'yaml', 'onestep_sr.training.trainer') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
