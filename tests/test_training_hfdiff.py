"""The HF-Diff recipe on tiny ResShift-family models: one step against a hand composition of SinSR's
terms + the INN and DINOv2-JS terms (schedule written out from its formula), only the student
learns, losses fall on a tiny overfit set, and the saved HF-Diff.pth loads through the CLI / nodes
path and reproduces the trainer's own forward; the INN checkpoint comes from `onestep-sr train-inn`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
pytest.importorskip("yaml")
pytest.importorskip("kornia")

import resshift_training_fixtures as rf  # noqa: E402

from onestep_sr.models.hf_inn import load_hf_extractor  # noqa: E402
from onestep_sr.models.resshift.sampler import RecordedNoise, upscale_lr  # noqa: E402
from onestep_sr.pipelines.model import load_onestep_model  # noqa: E402
from onestep_sr.training.config import config_from_dict  # noqa: E402
from onestep_sr.training.losses.feature_nets import dinov2_embeds  # noqa: E402
from onestep_sr.training.recipes import StepInputs, build_recipe  # noqa: E402
from onestep_sr.training.trainer import TrainingError, train  # noqa: E402

CPU = torch.device("cpu")
STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = rf.write_family(tmp_path_factory.mktemp("hfdiff"))
    rf.write_inn_with_the_command(root)
    rf.write_dino(root / "dino")
    return root


def _config(files, out, steps=3, **resshift):
    values = {"hf_inn": str(files / "inn.safetensors"), "dino": str(files / "dino"), **resshift}
    return rf.config(files, out, "hf_diff", steps, **values)


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    return rf.train_once(_config(files, tmp_path_factory.mktemp("hfdiff_run"), STEPS))


def test_one_step_matches_a_hand_composition_of_the_published_terms(files, tmp_path):
    recipe = build_recipe(config_from_dict(_config(files, tmp_path / "run")), CPU)
    model = recipe.model.eval()
    lq, gt, noise = rf.random_batch()
    with torch.no_grad():
        got = model(mode="generator", lq=lq, gt=gt, noise=noise)

    etas = [s * s for s in rf.sinsr_sqrt_etas()]
    T = len(etas)
    teacher, student, vq = model.teacher, model.student, model.vq

    def scaled(x, t):
        return x / math.sqrt(4 * etas[t] + 1)

    def at(t):
        return torch.full((2,), t, dtype=torch.long)

    with torch.no_grad():
        z_y = vq.encode(F.interpolate(lq, scale_factor=4, mode="bicubic"))
        z_gt = vq.encode(gt)
        x_T = z_y + 2 * math.sqrt(etas[-1]) * noise
        x = x_T
        for t in reversed(range(T)):  # SinSR eq. 7, eta_0 = 0
            x0 = teacher(scaled(x, t), at(t), lq)
            prev = etas[t - 1] if t else 0.0
            m, j = math.sqrt(prev / etas[t]), prev - math.sqrt(prev * etas[t])
            k = 1 - prev + math.sqrt(prev * etas[t]) - m
            x = k * x0 + m * x + j * z_y
        z_teacher = x
        pred = student(scaled(x_T, T - 1), at(T - 1), lq)
        mse = ((pred - z_teacher) ** 2).mean(dim=(1, 2, 3))
        mse_xT = ((x_T - student(scaled(z_teacher, T - 1), at(0), lq)) ** 2).mean(dim=(1, 2, 3))
        pred_gt = student(scaled(student(scaled(z_gt, T - 1), at(0), lq), T - 1), at(T - 1), lq)
        mse_gt = ((z_gt - pred_gt) ** 2).mean(dim=(1, 2, 3))
        inn = load_hf_extractor(files / "inn.safetensors")
        hf = 0.2 * ((inn(z_gt) - inn(pred_gt)) ** 2).mean(dim=(1, 2, 3))
        sr = vq.decoder(vq.post_quant_conv(vq.quantize(pred)))
        dino = model.image_losses["js"].dino
        p = dinov2_embeds(dino, gt, 28).softmax(-1)
        q = dinov2_embeds(dino, sr, 28).softmax(-1)
        mid = (p + q) / 2
        js = 0.5 * (p * (p / mid).log()).sum(-1) + 0.5 * (q * (q / mid).log()).sum(-1)
    expected = {"mse": mse.mean(), "mse_xT": mse_xT.mean(), "mse_gt": mse_gt.mean(), "hf": hf.mean(),
                "js": js.mean()}
    expected["total"] = (mse + mse_xT + mse_gt + hf).mean() + js.mean()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert float(got["hf"]) > 0 and float(got["js"]) > 0
    torch.testing.assert_close(got["sr"], sr, rtol=0, atol=1e-5)


def test_only_the_student_learns_frozen_parts_stay_bit_identical(files, tmp_path):
    recipe = build_recipe(config_from_dict(_config(files, tmp_path / "run")), CPU)
    model = recipe.model.train()
    frozen = {"teacher": model.teacher, "vq": model.vq, "inn": model.distill.hf_loss.extractor,
              "dino": model.image_losses["js"].dino}
    assert all(not m.training for m in frozen.values()) and model.student.training
    before = {name: rf.state_snapshot(m) for name, m in frozen.items()}
    student_before = rf.state_snapshot(model.student)
    (phase,) = recipe.phases
    trainable = {id(p) for _, p in phase.parameters}
    assert trainable == {id(p) for p in model.student.parameters()}
    assert all(name.startswith("student.") for name, _ in phase.parameters)
    optimizer = torch.optim.AdamW([p for _, p in phase.parameters], lr=1e-3)
    lq, gt, _ = rf.random_batch(1)
    batch = {"lr": (lq + 1) / 2, "id": torch.tensor([0, 1])}
    inputs = StepInputs(lq=F.interpolate(lq, scale_factor=4, mode="bicubic"), gt=gt, batch=batch, micro_step=0, seed=3)
    for part in recipe.micro_step(model, model, inputs):
        part.loss.backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == trainable  # every student parameter, and nothing else
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.student.parameters())
    assert nonzero >= 0.95 * len(trainable)
    optimizer.step()
    for name, module in frozen.items():
        assert rf.same_state(module, before[name]), name
    assert not rf.same_state(model.student, student_before)


def test_losses_fall_on_a_tiny_overfit_set(trained):
    _, result = trained
    history = result.history
    assert len(history) == STEPS

    def mean(key, part):
        values = [h[key] for h in (history[:5] if part == "first" else history[-5:])]
        return sum(values) / len(values)

    assert mean("total", "last") < 0.9 * mean("total", "first")
    for key in ("mse", "mse_gt", "hf"):
        assert mean(key, "last") < 0.8 * mean(key, "first"), key


def test_js_term_alone_falls(files, tmp_path):
    config = config_from_dict(_config(files, tmp_path / "run", 25, distill=0.0, learn_xT=False,
                                      finetune_use_gt=0.0, hf=0.0))
    history = train(config, progress=False).history
    assert {"js", "total"} <= set(history[0]) and "hf" not in history[0]
    first = sum(h["js"] for h in history[:5]) / 5
    last = sum(h["js"] for h in history[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_saved_file_loads_in_the_cli_and_nodes_path_and_reproduces_the_trainer(files, trained, tmp_path):
    from PIL import Image

    from onestep_sr.cli import main as cli_main
    from onestep_sr.training.checkpoints import read_state

    config, result = trained
    folder = result.checkpoint
    published = folder / "HF-Diff.pth"
    saved = torch.load(published, weights_only=True)
    layout = torch.load(files / rf.STUDENT, weights_only=True)  # the official layout, derived buffers included
    assert saved.keys() == layout.keys()
    assert all(torch.equal(saved[k], layout[k]) for k in saved if k.endswith(("attn_mask", "relative_position_index")))

    recipe = build_recipe(config, CPU)
    recipe.load_state(read_state(folder)["trainable"], folder)
    g = torch.Generator().manual_seed(7)
    lr = torch.rand(1, 3, 64, 64, generator=g)  # a multiple of 64: the pipeline pads nothing
    eps = torch.randn(1, 3, 64, 64, generator=g)
    mine = recipe.model.eval().super_resolve(lr * 2 - 1, eps)
    for name in ("HF-Diff.pth", "HF-Diff.safetensors"):
        loaded = load_onestep_model(None, folder / name, autoencoder_path=files / rf.AUTOENCODER,
                                    model_config=files / rf.YAML)
        assert loaded.method.name == "hf_diff"
        theirs = upscale_lr(loaded.unet, loaded.vq, loaded.diffusion(), lr * 2 - 1, RecordedNoise({"p0_s0": eps.numpy()}),
                            True)
        assert (theirs - mine).abs().max() < 1e-5, name

    source, out, noise = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "noise.npz"
    pixels = (lr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(source)
    np.savez(noise, p0_s0=eps.numpy())
    assert cli_main(["upscale", str(source), "-o", str(out), "--weights", str(published), "--method", "hf_diff",
                     "--model-config", str(files / rf.YAML), "--autoencoder", str(files / rf.AUTOENCODER),
                     "--noise", str(noise), "--device", "cpu", "--dtype", "fp32"]) == 0
    quantised = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]
    expected = recipe.model.super_resolve(quantised * 2 - 1, eps)
    expected = ((expected * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(np.asarray(Image.open(out)).astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize(("key", "value", "message"), [
    ("hf_inn", None, "resshift.hf_inn is not set"),
    ("hf_inn", "missing.safetensors", "HF-INN checkpoint not found: missing.safetensors"),
    ("dino", None, "resshift.dino is not set"),
    ("teacher", "nowhere.pth", "resshift.teacher not found: nowhere.pth"),
])
def test_missing_files_are_named(files, tmp_path, key, value, message):
    config = _config(files, tmp_path / "run")
    config["resshift"][key] = value
    with pytest.raises(TrainingError, match=message):
        train(config_from_dict(config), progress=False)


def test_validation_runs_the_resshift_pipeline(files, tmp_path):
    config = _config(files, tmp_path / "run", 1)
    config["data"].update(validation=str(files / "data" / "hr"), validation_lr=str(files / "data" / "lr"))
    config["train"]["validate_every"] = 1
    train(config_from_dict(config), progress=False)
    rows = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert rows[0].startswith("step,val_psnr") and len(rows) == 2
    assert len(list((tmp_path / "run" / "validation" / "step-00000001").glob("*.png"))) == 2


def test_ema_is_updated_per_optimizer_step_and_published(files, tmp_path):
    """rate 0.9, 2 micro-batches per step: EMA_k = 0.9 EMA_{k-1} + 0.1 W_k after each optimizer step
    (not each micro-batch), starting from the initial student; the published file is the EMA."""
    from onestep_sr.training.checkpoints import read_state

    config = _config(files, tmp_path / "run", 2, ema_rate=0.9, hf=0.0, js=0.0)
    config["train"].update(batch_size=1, gradient_accumulation=2, checkpoint_every=1)
    result = train(config_from_dict(config), progress=False)
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    states = [read_state(folder) for folder in folders]
    start = torch.load(files / rf.STUDENT, weights_only=True)
    previous = {k: v.float() for k, v in start.items()}
    for folder, state in zip(folders, states, strict=True):
        published = torch.load(folder / "HF-Diff.pth", weights_only=True)
        ema = state["recipe"]["ema_student"]
        for key, weight in ((k[len("student."):], v) for k, v in state["trainable"].items()):
            expected = 0.9 * previous[key] + 0.1 * weight
            torch.testing.assert_close(ema[key], expected, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(published[key], expected, rtol=1e-6, atol=1e-7)
            previous[key] = expected
    assert result.step == 2 and not torch.equal(published["out.2.weight"], states[-1]["trainable"]["student.out.2.weight"])


def test_resume_reproduces_an_uninterrupted_run(files, tmp_path):
    """Noise per (seed, step, image) and the EMA in the resume state: 2 + 1 steps == 3 steps."""
    def config(out, steps):
        values = _config(files, out, steps, ema_rate=0.9, hf=0.0, js=0.0)
        values["train"]["checkpoint_every"] = 2
        return config_from_dict(values)

    straight = train(config(tmp_path / "a", 3), progress=False)
    train(config(tmp_path / "b", 2), progress=False)
    resumed = train(config(tmp_path / "b", 3), resume=tmp_path / "b", progress=False)
    assert resumed.step == 3 and len(resumed.history) == 1
    for key in ("total", "mse", "mse_xT", "mse_gt"):
        assert resumed.history[0][key] == pytest.approx(straight.history[-1][key], rel=1e-6, abs=1e-8), key
    a = torch.load(straight.checkpoint / "HF-Diff.pth", weights_only=True)
    b = torch.load(resumed.checkpoint / "HF-Diff.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_online_degradation_feeds_the_degraded_lr(files, tmp_path, monkeypatch):
    """Without paired LR the trainer degrades the GT online; the recipe conditions on that LR itself
    (`extras["lr"]`), not on a downscale of the upscaled input."""
    from onestep_sr.training.recipes.resshift_common import ResShiftDistillRecipe

    seen = []
    original = ResShiftDistillRecipe.lr_input

    def spy(self, inputs):
        lq = original(self, inputs)
        seen.append("lr" not in inputs.batch and torch.equal(lq, inputs.extras["lr"].float() * 2 - 1)
                    and lq.shape[-1] * 4 == inputs.gt.shape[-1])
        return lq

    monkeypatch.setattr(ResShiftDistillRecipe, "lr_input", spy)
    config = _config(files, tmp_path / "run", 1, hf=0.0, js=0.0)
    del config["data"]["train_lr"]
    history = train(config_from_dict(config), progress=False).history
    assert seen == [True] and all(math.isfinite(v) for v in history[0].values())


def test_saved_file_loads_in_the_loader_node(files, trained, monkeypatch, tmp_path):
    """HF-Diff.pth from the trainer, dropped into models/onestep_sr beside the autoencoder, loads in Load
    OneStep SR as HF-Diff and runs the trainer's own forward."""
    import shutil

    from onestep_sr.nodes.loader_node import FROM_INPUTS, OneStepSRLoader
    from onestep_sr.training.checkpoints import read_state

    import fake_comfy
    import tinymodels

    config, result = trained
    tokenizer = tmp_path / "tok"
    tinymodels.write_tiny_tokenizer(tokenizer)
    state = fake_comfy.install(monkeypatch, tmp_path, tokenizer)
    folder = state.models_dir / "onestep_sr"
    folder.mkdir(parents=True)
    for source in (result.checkpoint / "HF-Diff.pth", files / rf.AUTOENCODER, files / rf.YAML):
        shutil.copy(source, folder / source.name)
    (handle,) = OneStepSRLoader().load("HF-Diff.pth", FROM_INPUTS, "fp32", model_config=rf.YAML)
    model = handle.model
    assert model.method.name == "hf_diff"
    recipe = build_recipe(config, CPU)
    recipe.load_state(read_state(result.checkpoint)["trainable"], result.checkpoint)
    g = torch.Generator().manual_seed(9)
    lr, eps = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.randn(1, 3, 64, 64, generator=g)
    theirs = upscale_lr(model.unet, model.vq, model.diffusion(), lr, RecordedNoise({"p0_s0": eps.numpy()}), True)
    assert (theirs - recipe.model.eval().super_resolve(lr, eps)).abs().max() < 1e-5
