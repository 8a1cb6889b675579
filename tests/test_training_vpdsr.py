"""VPD-SR on the SD one-step student (method vpdsr_sd), on the tiny SD-2-shaped base with a tiny CLIP and
a tiny DINO discriminator backbone: the three phases' parameter sets and a frozen base, the terms the
recipe adds against the loss modules evaluated on its output, overfitting, the saved osediff.pkl
through pipeline / CLI / nodes against the trainer's own forward, refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from onestep_sr.training.config import config_from_dict  # noqa: E402
from onestep_sr.training.losses.dino_discriminator import DinoViT  # noqa: E402
from onestep_sr.training.losses.high_frequency import HighFrequencyPerceptionLoss  # noqa: E402
from onestep_sr.training.losses.vpd_semantic import CLIPSemanticSupervisionLoss  # noqa: E402
from onestep_sr.training.osediff import StepRandom  # noqa: E402
from onestep_sr.training.recipes import build_recipe  # noqa: E402
from onestep_sr.training.trainer import train  # noqa: E402

import training_fixtures as tf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """LPIPS/VGG files plus a tiny DINO ViT in the facebookresearch/dino layout, and a tiny CLIP."""
    root = tmp_path_factory.mktemp("vpd_nets")
    features = tf.write_feature_networks(root / "features")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        torch.save(DinoViT(32, 12, 1).state_dict(), features / "dino_vitbase16_pretrain.pth")
    return features, tf.write_tiny_clip(root / "clip")


def _config(tmp_path, base_dir, nets, train_dir, **overrides):
    features, clip = nets
    overrides.setdefault("loss", {"mse": 1.0, "lpips": 2.0, "vsd": 1.0, "gan": 0.5})
    overrides.setdefault("vpdsr", {"clip": str(clip), "semantic_layers": [-1, 2]})
    return config_from_dict(tf.tiny_config(tmp_path, base_dir, features, train_dir, method="vpdsr_sd", **overrides))


def _embeds(recipe, prompt="a photo"):
    return recipe.prompts([prompt])


def test_phases_train_their_own_parameters_and_the_terms_match_the_loss_modules(tmp_path, tiny_base_dir, nets):
    tf.write_images(tmp_path / "imgs", 2)
    recipe = build_recipe(_config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs"), torch.device("cpu"))
    model = recipe.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
    assert [p.name for p in recipe.phases] == ["generator", "fake", "discriminator"]
    phases = {p.name: dict(p.parameters) for p in recipe.phases}
    everything = dict(model.named_parameters())
    trainable = {n for n, p in everything.items() if p.requires_grad}
    assert trainable == set().union(*phases.values())
    assert all(n.startswith("discriminator.heads.") for n in phases["discriminator"])
    assert not any(n.startswith(("semantic.", "lpips.", "discriminator.backbone.")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in everything.items() if not p.requires_grad}
    published = recipe.published(model)
    saved = {f"unet.{k}" for k in published["state_dict_unet"]} | {f"vae.{k}" for k in published["state_dict_vae"]}
    assert saved == set(phases["generator"])  # the student's published osediff.pkl set, nothing more

    lq = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    gt = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    random = StepRandom.make(3, 0, [0, 1])
    embeds = _embeds(recipe).expand(2, -1, -1)
    out = model(mode="generator", lq=lq, gt=gt, embeds=embeds, negative=recipe.negative.expand(2, -1, -1),
                random=random)
    image = out.pop("image")
    out.pop("z0")
    assert set(out) == {"mse", "lpips", "semantic", "hfp", "gan", "vsd", "total"}
    # the recipe's terms are the loss modules on the student's image against the GT, weighted
    v = recipe.config.vpdsr
    with torch.no_grad():
        semantic = CLIPSemanticSupervisionLoss(model.semantic.clip, layers=[-1, 2])(image, gt)
        hfp = HighFrequencyPerceptionLoss(levels=2)(image, gt)
    values = {k: float(t.detach()) for k, t in out.items()}
    assert values["semantic"] == pytest.approx(v.semantic * float(semantic), rel=1e-5)
    assert values["hfp"] == pytest.approx(v.hfp * float(hfp), rel=1e-5)
    assert values["total"] == pytest.approx(sum(values[k] for k in values if k != "total"), rel=1e-6)

    out["total"].backward()
    assert all(p.grad is not None for p in phases["generator"].values())
    assert all(p.grad is None for n, p in everything.items() if n not in phases["generator"])
    for p in phases["generator"].values():
        p.grad = None
    disc = model(mode="discriminator", real=gt, fake=image, random=random)["disc"]
    disc.backward()
    with_grad = {n for n, p in everything.items() if p.grad is not None}
    assert with_grad == set(phases["discriminator"]) and float(disc.detach()) > 0

    for phase in recipe.phases:
        torch.optim.AdamW([p for _, p in phase.parameters], lr=1e-2).step()
    for name, value in frozen.items():
        assert torch.equal(everything[name], value), name


def test_losses_fall_on_a_tiny_overfit_set(tmp_path, tiny_base, nets):
    """The student's terms (MSE, LPIPS, ESS, HFP) fall; with the GAN on, the discriminator's loss falls
    as it learns to tell the (fixed) GT from the student's output."""
    base, hr, lr = tf.write_reachable_pair(tmp_path, tiny_base)
    data = {"train": str(hr), "train_lr": str(lr), "crop": 64, "workers": 0, "pin_memory": False, "flip": False}
    history = train(_config(tmp_path / "a", base, nets, hr, data=data, train__max_steps=16, train__batch_size=1,
                            optim__lr=5e-3, loss={"mse": 1.0, "lpips": 2.0, "vsd": 0.0, "gan": 0.0}),
                    progress=False).history
    first = {k: float(np.mean([h[k] for h in history[:4]])) for k in history[0]}
    last = {k: float(np.mean([h[k] for h in history[-4:]])) for k in history[0]}
    print("student terms: first", first, "\nlast", last)
    for key in ("total", "lpips", "semantic", "hfp"):
        assert last[key] < 0.95 * first[key], (key, first, last)
    assert last["mse"] < first["mse"], (first, last)
    history = train(_config(tmp_path / "b", base, nets, hr, data=data, train__max_steps=10, train__batch_size=1,
                            optim__lr=5e-3, loss={"mse": 1.0, "lpips": 2.0, "vsd": 0.0, "gan": 0.5}),
                    progress=False).history
    disc = [h["disc"] for h in history]
    print("discriminator", disc)
    assert np.mean(disc[-3:]) < 0.9 * np.mean(disc[:3]), disc


def test_saved_osediff_pkl_reproduces_the_trainers_forward_in_pipeline_cli_and_nodes(
        tmp_path, tiny_base_dir, nets, monkeypatch):
    from onestep_sr.models.base_models import load_base
    from onestep_sr.pipelines.model import load_onestep_model
    from onestep_sr.pipelines.onestep import OneStepPipeline, RunHooks, UpscaleSettings, upscale_input
    from onestep_sr.training import recipes

    built = []
    real_build = recipes.build_recipe
    monkeypatch.setattr(recipes, "build_recipe", lambda *a: built.append(real_build(*a)) or built[-1])
    images = tf.write_images(tmp_path / "imgs", 2)
    tf.write_images(tmp_path / "val", 1, (64, 64), seed=9)
    config = _config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs", train__max_steps=2, train__validate_every=2,
                     data={"train": str(tmp_path / "imgs"), "validation": str(tmp_path / "val"), "crop": 64,
                           "workers": 0, "pin_memory": False})
    folder = train(config, progress=False).checkpoint
    assert (folder / "osediff.pkl").is_file() and (folder / "osediff.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "step-00000002" / "img000.png").is_file()
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0]
    assert header.startswith("step,mse,lpips,semantic,hfp,gan,vsd,total,fake,disc"), header

    trainer_model = built[0].model.eval()
    lr_image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(5))
    model = load_onestep_model(load_base(tiny_base_dir), folder / "osediff.pkl")
    assert model.method.name == "osediff"
    x = upscale_input(model.method, lr_image, 4.0, torch.device("cpu"))
    with torch.no_grad():
        ours, _ = trainer_model.generate(x * 2 - 1, _embeds(built[0], ""), noise=None)
    pipeline = OneStepPipeline(model)
    settings = UpscaleSettings(scale=4.0, color_fix="none", prompt="", output_size="native")
    diff = float((pipeline(lr_image, settings).permute(0, 3, 1, 2) - (ours + 1) / 2).abs().max())
    # float32: merged (pipeline) vs side-added (trainer) LoRA rounding, amplified by the tiny random
    # decoder; float64 (restore() on a 64 px input) shows the computations are the same.
    trainer_model.double()
    model.to(dtype=torch.float64)
    small = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    resolved = pipeline.resolve(settings)
    with torch.no_grad():
        ours64, _ = trainer_model.generate(small * 2 - 1, _embeds(built[0], "").double(), noise=None)
        restored = pipeline.restore(small, resolved, pipeline.conditions(small, small, resolved), RunHooks())
    diff64 = float((restored.double() - (ours64 + 1) / 2).abs().max())
    print(f"trainer forward vs pipeline (vpdsr_sd -> osediff.pkl): max |difference| float32 {diff:.2e}, "
          f"float64 {diff64:.2e}")
    assert diff64 < 1e-5 and diff < 1e-4, (diff64, diff)

    tf.assert_cli_upscales(tmp_path, images[0], tiny_base_dir, folder / "osediff.safetensors")

    handle = tf.load_with_the_loader_node(monkeypatch, tmp_path, tiny_base_dir, [folder / "osediff.pkl"])
    assert handle.model.method.name == "osediff"


def test_refusals_and_the_gan_switch(tmp_path, tiny_base_dir, nets):
    from onestep_sr.training.config import ConfigError, load_config
    from onestep_sr.training.trainer import TrainingError

    tf.write_images(tmp_path / "imgs", 2)
    features, clip = nets
    with pytest.raises(ConfigError, match="vpdsr.semantic_layer_weights needs one number per layer"):
        _config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs",
                vpdsr={"clip": str(clip), "semantic_layers": [-1, 2], "semantic_layer_weights": [1.0]})
    no_dino = tmp_path / "no_dino"
    shutil.copytree(features, no_dino, ignore=shutil.ignore_patterns("dino_*"))
    with pytest.raises(TrainingError, match=r"loss.gan > 0 needs the DINO discriminator backbone: .*"
                                            r"dino_vitbase16_pretrain\.pth not found in .*no_dino"):
        train(_config(tmp_path, tiny_base_dir, (no_dino, clip), tmp_path / "imgs"), progress=False)
    recipe = build_recipe(_config(tmp_path, tiny_base_dir, (no_dino, clip), tmp_path / "imgs",
                                  loss={"mse": 1.0, "lpips": 2.0, "vsd": 1.0, "gan": 0.0}), torch.device("cpu"))
    assert [p.name for p in recipe.phases] == ["generator", "fake"] and recipe.model.discriminator is None
    with pytest.raises(TrainingError, match=r"vpdsr.clip: CLIP model folder not found: nowhere"):
        train(_config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs", vpdsr={"clip": str(tmp_path / "nowhere")}),
              progress=False)

    from pathlib import Path

    import onestep_sr.training as package

    shipped = load_config(Path(package.__file__).parent / "configs" / "vpdsr_sd.yaml")
    assert shipped.method == "vpdsr_sd" and shipped.loss.vsd == 1.0 and shipped.loss.gan > 0
    assert (shipped.model.lora_rank, shipped.optim.lr) == (4, 5e-5)


def test_resume_reproduces_an_uninterrupted_run_with_the_discriminator(tmp_path, tiny_base_dir, nets):
    """Spectral norm's power-iteration vectors (buffers of the discriminator heads) travel in the resume state."""
    tf.write_images(tmp_path / "imgs", 3)
    full, _, _ = tf.assert_resume_matches_an_uninterrupted_run(
        lambda folder, steps: _config(tmp_path / folder, tiny_base_dir, nets, tmp_path / "imgs",
                                      train__max_steps=steps))
    assert "disc" in full.history[-1]
