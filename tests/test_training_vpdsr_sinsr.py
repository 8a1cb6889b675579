"""VPD-SR's objectives on the SinSR student (tiny models): one step against a hand composition (SinSR
terms + CLIP semantic supervision + Haar high-frequency perception), only the student learns, losses
fall, the saved file loads as SinSR through the CLI / pipeline path and reproduces the trainer's
forward, and the adversarial extension is a discriminator phase on S3Diff's DINO discriminator."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
pytest.importorskip("yaml")
pytest.importorskip("kornia")

import resshift_training_fixtures as rf  # noqa: E402

from onestep_sr.models.resshift.sampler import RecordedNoise, upscale_lr  # noqa: E402
from onestep_sr.pipelines.model import load_onestep_model  # noqa: E402
from onestep_sr.training.config import config_from_dict, load_config  # noqa: E402
from onestep_sr.training.losses.feature_nets import clip_pixels  # noqa: E402
from onestep_sr.training.recipes import StepInputs, build_recipe  # noqa: E402
from onestep_sr.training.trainer import TrainingError, train  # noqa: E402

import training_fixtures as tf  # noqa: E402

CPU = torch.device("cpu")
STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = rf.write_family(tmp_path_factory.mktemp("vpdsr"))
    tf.write_tiny_clip(root / "clip")
    return root


def _config(files, out, steps=3, gan=0.0, vpdsr=None, **resshift):
    config = rf.config(files, out, "vpdsr_sinsr", steps, **{"hf": 0.0, "js": 0.0, **resshift})
    config["vpdsr"] = {"clip": str(files / "clip"), "semantic_layers": [-1, 2], **(vpdsr or {})}
    config["loss"] = {"gan": gan}
    return config


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    return rf.train_once(_config(files, tmp_path_factory.mktemp("vpd_run"), STEPS))


def _haar_details(x):
    """Orthonormal Haar detail bands (LH, HL, HH) of 2x2 blocks, written out."""
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, [(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]


@pytest.mark.parametrize("target", ["gt", "teacher"])
def test_one_step_matches_a_hand_composition(files, tmp_path, target):
    recipe = build_recipe(config_from_dict(_config(files, tmp_path / "run", vpd_target=target)), CPU)
    model = recipe.model.eval()
    lq, gt, noise = rf.random_batch()
    with torch.no_grad():
        got = model(mode="generator", lq=lq, gt=gt, noise=noise)
        # The SinSR part is checked term by term in test_training_hfdiff; here: its sum, plus the VPD terms.
        etas = [s * s for s in rf.sinsr_sqrt_etas()]
        T, student, vq, clip = len(etas), model.student, model.vq, model.image_losses["semantic"].clip
        z_y = vq.encode(F.interpolate(lq, scale_factor=4, mode="bicubic"))
        x_T = z_y + 2 * math.sqrt(etas[-1]) * noise
        t_last = torch.full((2,), T - 1)
        pred = student(x_T / math.sqrt(4 * etas[-1] + 1), t_last, lq)
        sr = vq.decoder(vq.post_quant_conv(vq.quantize(pred)))
        if target == "teacher":
            from onestep_sr.training.losses.sinsr_distill import deterministic_sample

            z_teacher = deterministic_sample(model.teacher, model.schedule, z_y, x_T, {"lq": lq})
            reference = vq.decoder(vq.post_quant_conv(vq.quantize(z_teacher))).clamp(-1, 1)
        else:
            reference = gt

        def clip_features(images):
            out = clip.vision_model(pixel_values=clip_pixels(clip, images), output_hidden_states=True)
            return out.hidden_states, clip.visual_projection(out.pooler_output)

        (hs_sr, e_sr), (hs_t, e_t) = clip_features(sr), clip_features(reference)
        semantic = sum((1 - F.cosine_similarity(hs_sr[layer], hs_t[layer], dim=-1)).mean(dim=1) for layer in (3, 2))
        semantic = semantic + (1 - F.cosine_similarity(e_sr, e_t, dim=-1))
        hfp = torch.zeros(2)
        low_sr, low_t = sr, reference
        for _ in range(2):
            low_sr, d_sr = _haar_details(low_sr)
            low_t, d_t = _haar_details(low_t)
            hfp = hfp + torch.stack([(p - q).abs() for p, q in zip(d_sr, d_t, strict=True)], 1).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(got["semantic"], semantic.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["hfp"], hfp.mean(), rtol=1e-5, atol=1e-6)
    sinsr = got["mse"] + got["mse_xT"] + got["mse_gt"]
    torch.testing.assert_close(got["total"], sinsr + semantic.mean() + hfp.mean(), rtol=1e-5, atol=1e-6)
    assert "hf" not in got and "js" not in got


def test_only_the_student_learns_frozen_parts_stay_bit_identical(files, tmp_path):
    recipe = build_recipe(config_from_dict(_config(files, tmp_path / "run")), CPU)
    model = recipe.model.train()
    clip = model.image_losses["semantic"].clip
    frozen = {"teacher": model.teacher, "vq": model.vq, "clip": clip}
    assert all(not m.training for m in frozen.values())
    before = {name: rf.state_snapshot(m) for name, m in frozen.items()}
    (phase,) = recipe.phases
    assert {id(p) for _, p in phase.parameters} == {id(p) for p in model.student.parameters()}
    optimizer = torch.optim.AdamW([p for _, p in phase.parameters], lr=1e-3)
    lq, gt, _ = rf.random_batch(1)
    inputs = StepInputs(lq=F.interpolate(lq, scale_factor=4, mode="bicubic"), gt=gt,
                        batch={"lr": (lq + 1) / 2, "id": torch.tensor([0, 1])}, micro_step=0, seed=3)
    for part in recipe.micro_step(model, model, inputs):
        part.loss.backward()
    assert {id(p) for p in model.parameters() if p.grad is not None} == {id(p) for _, p in phase.parameters}
    optimizer.step()
    for name, module in frozen.items():
        assert rf.same_state(module, before[name]), name


def test_losses_fall_on_a_tiny_overfit_set(trained):
    history = trained[1].history
    assert len(history) == STEPS

    def mean(key, rows):
        return sum(h[key] for h in rows) / len(rows)

    # The teacher target (mse) and the GT targets (mse_gt, semantic, hfp) pull apart on random tiny
    # models, so the distillation term alone need not fall here; the objective and the GT terms must.
    for key, factor in (("total", 0.95), ("mse_gt", 0.5), ("semantic", 0.95), ("hfp", 1.0)):
        assert mean(key, history[-5:]) < factor * mean(key, history[:5]), key


def test_saved_file_loads_as_sinsr_and_reproduces_the_trainer(files, trained):
    from onestep_sr.training.checkpoints import read_state

    config, result = trained
    folder = result.checkpoint
    assert (folder / "VPD-SR_SinSR.pth").is_file() and (folder / "VPD-SR_SinSR.safetensors").is_file()
    saved = torch.load(folder / "VPD-SR_SinSR.pth", weights_only=True)
    assert saved.keys() == torch.load(files / rf.STUDENT, weights_only=True).keys()
    recipe = build_recipe(config, CPU)
    recipe.load_state(read_state(folder)["trainable"], folder)
    g = torch.Generator().manual_seed(8)
    lr, eps = torch.rand(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    mine = recipe.model.eval().super_resolve(lr * 2 - 1, eps)
    for name in ("VPD-SR_SinSR.pth", "VPD-SR_SinSR.safetensors"):
        loaded = load_onestep_model(None, folder / name, autoencoder_path=files / rf.AUTOENCODER,
                                    model_config=files / rf.YAML)
        assert loaded.method.name == "sinsr"
        theirs = upscale_lr(loaded.unet, loaded.vq, loaded.diffusion(), lr * 2 - 1,
                            RecordedNoise({"p0_s0": eps.numpy()}), True)
        assert (theirs - mine).abs().max() < 1e-5, name


def _tiny_dino_folder(folder):
    from onestep_sr.training.losses.dino_discriminator import DinoDiscriminator

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(DinoDiscriminator.tiny(dim=16, depth=8, heads=1, seed=2).backbone.state_dict(),
               folder / "dino_vitbase16_pretrain.pth")
    return folder


def test_adversarial_extension_is_a_discriminator_phase(files, tmp_path):
    from onestep_sr.training.losses.dino_discriminator import generator_adversarial_loss

    config = _config(files, tmp_path / "run", gan=0.5)
    config["model"]["feature_networks"] = str(_tiny_dino_folder(tmp_path / "features"))
    recipe = build_recipe(config_from_dict(config), CPU)
    model = recipe.model.train()
    assert [p.name for p in recipe.phases] == ["generator", "discriminator"]
    heads = {id(p) for p in model.discriminator.heads.parameters()}
    assert {id(p) for _, p in recipe.phases[1].parameters} == heads
    backbone = rf.state_snapshot(model.discriminator.backbone)
    lq, gt, _ = rf.random_batch(2)
    inputs = StepInputs(lq=F.interpolate(lq, scale_factor=4, mode="bicubic"), gt=gt,
                        batch={"lr": (lq + 1) / 2, "id": torch.tensor([0, 1])}, micro_step=0, seed=3)
    with torch.no_grad():  # the GAN term: the module's loss on the same SR with the same augmentations
        critic_copy = copy.deepcopy(model.discriminator)  # spectral norm's power iteration moves u per call
        sr = model.decode(model.student_x0(model.prior(model.condition(lq), recipe.noise(inputs, lq)), lq))
        expected = generator_adversarial_loss(critic_copy, sr, recipe.augment_generators(inputs, 2, 2))
    parts = recipe.micro_step(model, model, inputs)
    generator = next(parts)
    torch.testing.assert_close(generator.logs["gan"], expected, rtol=1e-5, atol=1e-6)
    others = generator.logs["mse"] + generator.logs["mse_xT"] + generator.logs["mse_gt"] + \
        generator.logs["semantic"] + generator.logs["hfp"]
    torch.testing.assert_close(generator.loss.detach(), others + 0.5 * expected, rtol=1e-5, atol=1e-6)
    generator.loss.backward()
    assert all(p.grad is None for p in model.discriminator.parameters())  # the heads see only their own loss
    for p in model.student.parameters():
        p.grad = None
    critic = next(parts)
    assert critic.phase == "discriminator" and float(critic.loss) > 0
    critic.loss.backward()
    assert {id(p) for p in model.parameters() if p.grad is not None} == heads
    assert rf.same_state(model.discriminator.backbone, backbone)
    with pytest.raises(StopIteration):
        next(parts)
    history = train(config_from_dict(dict(config, train={**config["train"], "max_steps": 2})), progress=False).history
    assert {"gan", "discriminator"} <= set(history[-1])


def test_adversarial_extension_names_a_missing_dino_file(files, tmp_path):
    config = _config(files, tmp_path / "run", gan=0.5)
    config["model"]["feature_networks"] = str(tmp_path / "empty")
    with pytest.raises(TrainingError, match="dino_vitbase16_pretrain.pth not found"):
        train(config_from_dict(config), progress=False)


def test_missing_clip_is_named_and_the_shipped_config_loads(files, tmp_path):
    config = _config(files, tmp_path / "run")
    config["vpdsr"]["clip"] = str(tmp_path / "no_clip")
    with pytest.raises(TrainingError, match="CLIP model folder not found: no_clip"):
        train(config_from_dict(config), progress=False)
    from pathlib import Path

    import onestep_sr

    shipped = load_config(Path(onestep_sr.__file__).parent / "training" / "configs" / "vpdsr_sinsr.yaml")
    assert shipped.method == "vpdsr_sinsr" and shipped.vpdsr.semantic > 0 and shipped.vpdsr.hfp > 0
    hf = load_config(Path(onestep_sr.__file__).parent / "training" / "configs" / "hfdiff.yaml")
    assert (hf.method, hf.optim.lr, hf.train.batch_size * hf.train.gradient_accumulation) == ("hf_diff", 2.5e-5, 32)


def test_adversarial_resume_reproduces_an_uninterrupted_run(files, tmp_path):
    """With the discriminator and the EMA: their state (heads, spectral-norm vectors, EMA) resumes."""
    features = _tiny_dino_folder(tmp_path / "features")

    def config(out, steps):
        values = _config(files, out, steps, gan=0.5, ema_rate=0.9, vpdsr={"semantic": 0.0})
        values["model"]["feature_networks"] = str(features)
        values["train"]["checkpoint_every"] = 2
        return config_from_dict(values)

    straight = train(config(tmp_path / "a", 3), progress=False)
    train(config(tmp_path / "b", 2), progress=False)
    resumed = train(config(tmp_path / "b", 3), resume=tmp_path / "b", progress=False)
    for key in ("total", "gan", "discriminator", "mse"):
        assert resumed.history[0][key] == pytest.approx(straight.history[-1][key], rel=1e-5, abs=1e-7), key
    a = torch.load(straight.checkpoint / "VPD-SR_SinSR.pth", weights_only=True)
    b = torch.load(resumed.checkpoint / "VPD-SR_SinSR.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
