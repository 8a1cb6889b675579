"""Hero-SR training on the tiny SD-2-shaped base with a tiny CLIP: the trainable set and a frozen base,
the straight-through Gumbel inside the recipe (one-hot forward, soft gradient to the DTSM logits),
overfitting, the saved hero_sr_model.pkl through the pipeline / CLI / nodes against the trainer's own
forward, resume with the DTSM's BatchNorm statistics, config refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from onestep_sr.training import herosr as herosr_module  # noqa: E402
from onestep_sr.training.config import ConfigError, config_from_dict  # noqa: E402
from onestep_sr.training.osediff import StepRandom  # noqa: E402
from onestep_sr.training.recipes import build_recipe  # noqa: E402
from onestep_sr.training.trainer import train  # noqa: E402

import training_fixtures as tf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hero_nets")
    return tf.write_feature_networks(root / "features"), tf.write_tiny_clip(root / "clip")


def _config(tmp_path, base_dir, nets, train_dir, **overrides):
    features, clip = nets
    overrides.setdefault("loss", {"mse": 1.0, "lpips": 2.0, "vsd": 0.0})
    overrides.setdefault("herosr", {"clip": str(clip)})
    overrides.setdefault("model", {"base": str(base_dir), "feature_networks": str(features), "rank_unet": 4,
                                   "rank_vae": 2})
    return config_from_dict(tf.tiny_config(tmp_path, base_dir, features, train_dir, method="hero_sr", **overrides))


def _randomise_lora_b(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


def _batch(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1, torch.rand(2, 3, size, size, generator=g) * 2 - 1


def test_trainable_set_frozen_base_and_the_gumbel_inside_the_recipe(tmp_path, tiny_base_dir, nets, monkeypatch):
    """Exactly UNet LoRA + conv_in, VAE-encoder LoRA and the DTSM get gradients (CLIP, LPIPS, the base do
    not, and stay bit-identical after a step); the t the UNet sees is one-hot @ candidates, and the
    DTSM logits receive the straight-through gradient d softmax((l + g)/tau) of the one-hot's gradient."""
    tf.write_images(tmp_path / "imgs", 2)
    recipe = build_recipe(_config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs"), torch.device("cpu"))
    model = recipe.model
    _randomise_lora_b(model.unet, 1)
    _randomise_lora_b(model.vae, 2)
    named = {**{f"unet.{n}": p for n, p in model.unet.named_parameters()},
             **{f"vae.{n}": p for n, p in model.vae.named_parameters()},
             **{f"dtsm.{n}": p for n, p in model.dtsm.named_parameters()}}
    everything = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in everything.items() if not p.requires_grad}
    assert any(n.startswith("text_loss.clip.") for n in before) and any(n.startswith("lpips.") for n in before)

    seen = {}
    original = herosr_module.choose_timesteps

    def recording(logits, *args, **kwargs):
        logits.retain_grad()
        choice = original(logits, *args, **kwargs)
        choice.one_hot.retain_grad()
        seen.update(logits=logits, choice=choice, noise=kwargs["noise"], tau=kwargs["tau"])
        return choice

    monkeypatch.setattr(herosr_module, "choose_timesteps", recording)
    unet_timesteps = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: unet_timesteps.append(args[1].detach().clone()))
    lq, gt = _batch()
    out = model(lq=lq, gt=gt, embeds=recipe.prompts([" "]).expand(2, -1, -1), random=StepRandom.make(3, 0, [0, 1]))
    hook.remove()
    assert set(out) == {"mse", "lpips", "text", "image", "total", "t"}
    out["total"].backward()

    # the trainable set: every phase parameter gets a gradient, and nothing else is trainable
    phase = dict(recipe.phases[0].parameters)
    assert set(phase) == {n for n, p in named.items() if p.requires_grad}
    assert {n for n, p in everything.items() if p.requires_grad} == {
        n for n, p in everything.items() if n.split(".", 1)[0] in ("unet", "vae", "dtsm") and p.requires_grad}
    published = recipe.published(model)
    saved = {f"unet.{k}" for k in published["state_dict_unet"]} | {f"vae.{k}" for k in published["state_dict_vae"]}
    assert saved == {n for n in phase if not n.startswith("dtsm.")}
    assert {k for k in published["state_dict_unet"] if "lora" not in k} == {"conv_in.weight", "conv_in.bias"}
    assert all(".lora_A.vae." in k or ".lora_B.vae." in k for k in published["state_dict_vae"])
    assert all(k.startswith("encoder.") for k in published["state_dict_vae"])
    no_grad = [n for n, p in phase.items() if p.grad is None]
    assert not no_grad, no_grad[:5]
    for part in ("dtsm.fc.2.weight", "dtsm.conv1.0.weight", "unet.conv_in.weight"):
        assert float(phase[part].grad.abs().sum()) > 0, part

    # straight-through Gumbel: forward one-hot, t = candidates[argmax(l + g)] reaches the UNet
    choice, logits = seen["choice"], seen["logits"]
    assert torch.equal(choice.one_hot.detach().sum(dim=1), torch.ones(2))
    assert set(choice.one_hot.detach().unique().tolist()) == {0.0, 1.0}
    index = (logits.detach() + seen["noise"]).argmax(dim=1)
    candidates = model.dtsm.candidates.float()
    assert torch.equal(unet_timesteps[0], candidates[index]) and torch.equal(choice.timesteps.detach(), candidates[index])
    # backward: d L / d l = J_softmax(y_soft)^T d L / d y, y_soft = softmax((l + g) / tau)
    soft = ((logits.detach() + seen["noise"]) / seen["tau"]).softmax(dim=1)
    upstream = choice.one_hot.grad
    expected = soft * (upstream - (soft * upstream).sum(dim=1, keepdim=True)) / seen["tau"]
    assert float(logits.grad.abs().max()) > 0
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-9)

    optimizer = torch.optim.AdamW([p for _, p in recipe.phases[0].parameters], lr=1e-2)
    optimizer.step()
    for name, value in before.items():
        assert torch.equal(everything[name], value), name
    assert not torch.equal(phase["unet.conv_in.weight"], before.get("unet.conv_in.weight", torch.zeros(1)))


def test_alpha_gradient_switch_keeps_the_forward_and_changes_only_the_dtsm_gradient(tmp_path, tiny_base_dir, nets):
    """herosr.alpha_gradient: same losses either way (same t); off = the release's t.long() indexing, so
    the logits learn through the UNet's timestep embedding alone."""
    tf.write_images(tmp_path / "imgs", 2)
    grads, totals = [], []
    for flag in (True, False):
        config = _config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs",
                         herosr={"clip": str(nets[1]), "alpha_gradient": flag})
        recipe = build_recipe(config, torch.device("cpu"))
        recipe.model.dtsm.eval()
        _randomise_lora_b(recipe.model.unet, 1)
        lq, gt = _batch(1)
        out = recipe.model(lq=lq, gt=gt, embeds=recipe.prompts([" "]).expand(2, -1, -1),
                           random=StepRandom.make(3, 0, [0, 1]))
        out["total"].backward()
        totals.append(float(out["total"].detach()))
        grads.append(recipe.model.dtsm.fc[2].weight.grad.clone())
    assert totals[0] == pytest.approx(totals[1], rel=1e-6)
    assert float(grads[1].abs().sum()) > 0 and not torch.allclose(grads[0], grads[1])


def _fixed_draw_losses(model, lq, gt, embeds, draws=8):
    """Mean losses over fixed VAE/Gumbel draws with the DTSM in eval mode: the per-step log mixes in a
    new random t every step, which on a tiny model is noisier than the progress being measured."""
    was = model.training
    model.eval()
    with torch.no_grad():
        outs = [model(lq=lq, gt=gt, embeds=embeds, random=StepRandom.make(99, k, [0])) for k in range(draws)]
    model.train(was)
    return {k: float(np.mean([float(o[k]) for o in outs])) for k in outs[0]}


def _overfit(tmp_path, tiny_base, nets, monkeypatch, steps, **overrides):
    from onestep_sr.training import recipes
    from onestep_sr.training.data import read_rgb

    base, hr, lr = tf.write_reachable_pair(tmp_path, tiny_base)
    built, start = [], []
    real_build = recipes.build_recipe

    def build(*args):
        built.append(real_build(*args))
        start.append(copy.deepcopy(built[-1].model))
        return built[-1]

    monkeypatch.setattr(recipes, "build_recipe", build)
    config = _config(tmp_path, base, nets, hr, data={
        "train": str(hr), "train_lr": str(lr), "crop": 64, "workers": 0, "pin_memory": False, "flip": False},
        train__max_steps=steps, train__batch_size=1, optim__lr=1e-2, **overrides)
    train(config, progress=False)
    gt = read_rgb(hr / "a.png")[None] * 2 - 1
    lq = torch.nn.functional.interpolate(read_rgb(lr / "a.png")[None], size=(64, 64), mode="bicubic",
                                         align_corners=False).clamp(0, 1) * 2 - 1
    embeds = built[0].prompts([" "])
    return _fixed_draw_losses(start[0], lq, gt, embeds), _fixed_draw_losses(built[0].model, lq, gt, embeds)


def test_losses_fall_on_a_tiny_overfit_set(tmp_path, tiny_base, nets, monkeypatch):
    """MSE + LPIPS x2 + OWMS: the total, the reconstruction terms and the image-domain term fall over 30
    steps; the text-domain term (x0.5, small next to the tiny random LPIPS) is checked on its own."""
    first, last = _overfit(tmp_path / "all", tiny_base, nets, monkeypatch, 30)
    print("all terms: first", first, "\nlast", last)
    for key in ("total", "lpips", "image"):
        assert last[key] < 0.95 * first[key], (key, first, last)
    assert last["mse"] < first["mse"], (first, last)
    first, last = _overfit(tmp_path / "text", tiny_base, nets, monkeypatch, 12, loss={"mse": 0.0, "lpips": 0.0, "vsd": 0.0},
                           herosr={"clip": str(nets[1]), "text_weight": 1.0, "image_weight": 0.0})
    print("text only: first", first, "\nlast", last)
    assert last["text"] < 0.9 * first["text"], (first, last)


def test_saved_file_reproduces_the_trainers_forward_in_pipeline_cli_and_nodes(tmp_path, tiny_base_dir, tiny_base,
                                                                            nets, monkeypatch):
    from onestep_sr.models.base_models import load_base
    from onestep_sr.models.dtsm import select_timesteps
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
    result = train(config, progress=False)
    folder = result.checkpoint
    assert (folder / "hero_sr_model.pkl").is_file() and (folder / "hero_sr_model.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "step-00000002" / "img000.png").is_file()
    assert "total" in (tmp_path / "run" / "log.csv").read_text().splitlines()[0]

    trainer_model = built[0].model.eval()  # the trainer's own model, in its final (saved) state
    lr_image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(5))
    model = load_onestep_model(load_base(tiny_base_dir), folder / "hero_sr_model.pkl")
    assert model.method.name == "hero_sr"
    x = upscale_input(model.method, lr_image, 4.0, torch.device("cpu"))
    seed = 21
    with torch.no_grad():
        ours, _, choice = trainer_model.generate(x * 2 - 1, built[0].prompts([" "]),
                                                 generator=torch.Generator().manual_seed(seed))
    pipeline = OneStepPipeline(model)
    timesteps, logits = pipeline.predict_timesteps(lr_image, scale=4.0, mode="sample", seed=seed)
    with torch.no_grad():
        trainer_logits = trainer_model.dtsm(torch.nn.functional.interpolate(x * 2 - 1, size=(128, 128)))
    torch.testing.assert_close(logits, trainer_logits, atol=1e-5, rtol=1e-5)
    assert int(timesteps) == int(choice.timesteps) == int(select_timesteps(trainer_logits, "sample", seed=seed))
    settings = UpscaleSettings(scale=4.0, color_fix="none", output_size="native", timestep_seed=seed)
    diff = float((pipeline(lr_image, settings).permute(0, 3, 1, 2) - (ours + 1) / 2).abs().max())
    # float32: the pipeline merges the LoRA into the weights, the trainer adds B A x on the side; the
    # rounding (eps ~3e-6) is amplified ~20x by the tiny random decoder. In float64 (the pipeline's
    # restore() on a 64 px input: DTSM choice, tiled encode, UNet, x0, tiled decode) the two agree.
    trainer_model.double()
    model.to(dtype=torch.float64)
    small = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    resolved = pipeline.resolve(settings)
    conditions = pipeline.conditions(small, small, resolved)
    with torch.no_grad():
        ours64, _, choice64 = trainer_model.generate(small * 2 - 1, built[0].prompts([" "]).double(),
                                                     generator=torch.Generator().manual_seed(seed))
        restored = pipeline.restore(small, resolved, conditions, RunHooks())
    assert int(choice64.timesteps) == int(conditions.timesteps)
    diff64 = float((restored.double() - (ours64 + 1) / 2).abs().max())
    print(f"trainer forward vs pipeline (hero_sr_model.pkl): max |difference| float32 {diff:.2e} (t={int(timesteps)}), "
          f"float64 {diff64:.2e} (t={int(conditions.timesteps)})")
    assert diff64 < 1e-5 and diff < 1e-4, (diff64, diff)

    tf.assert_cli_upscales(tmp_path, images[0], tiny_base_dir, folder / "hero_sr_model.safetensors")

    handle = tf.load_with_the_loader_node(monkeypatch, tmp_path, tiny_base_dir, [folder / "hero_sr_model.pkl"])
    assert handle.model.method.name == "hero_sr" and handle.model.dtsm is not None


def test_resume_restores_the_dtsm_statistics(tmp_path, tiny_base_dir, nets):
    tf.write_images(tmp_path / "imgs", 3)
    full, resumed, _ = tf.assert_resume_matches_an_uninterrupted_run(
        lambda folder, steps: _config(tmp_path / folder, tiny_base_dir, nets, tmp_path / "imgs",
                                      train__max_steps=steps))
    final = torch.load(full.checkpoint / "hero_sr_model.pkl", weights_only=False)["state_dict_time_adaptive"]
    again = torch.load(resumed.checkpoint / "hero_sr_model.pkl", weights_only=False)["state_dict_time_adaptive"]
    for key in ("conv1.1.running_mean", "conv1.1.running_var", "conv1.1.num_batches_tracked"):
        torch.testing.assert_close(again[key], final[key], rtol=1e-5, atol=1e-6)
    assert int(final["conv1.1.num_batches_tracked"]) == 4


def test_config_refusals(tmp_path, tiny_base_dir, nets):
    from onestep_sr.training.trainer import TrainingError

    tf.write_images(tmp_path / "imgs", 2)
    with pytest.raises(ConfigError, match="loss.vsd and loss.gan are not Hero-SR losses"):
        _config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs", loss={"vsd": 1.0})
    with pytest.raises(ConfigError, match=r"herosr.quality_pairs must be a list of \[positive, negative\]"):
        _config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs",
                herosr={"clip": str(nets[1]), "quality_pairs": [["Sharp photo."]]})
    with pytest.raises(TrainingError, match=r"herosr.clip: CLIP model folder not found: nowhere"):
        train(_config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs",
                      herosr={"clip": str(tmp_path / "nowhere")}), progress=False)


def test_shipped_config():
    from pathlib import Path

    import onestep_sr.training as package
    from onestep_sr.training.config import load_config

    config = load_config(Path(package.__file__).parent / "configs" / "herosr.yaml")
    assert config.method == "hero_sr" and config.herosr.gumbel_tau == 1.0 and config.herosr.prompt == " "
    assert (config.loss.vsd, config.loss.gan, config.model.rank_unet, config.model.rank_vae) == (0, 0, 32, 16)


def test_fine_tuning_starts_from_a_published_file_with_its_own_layout(tmp_path, tiny_base, tiny_base_dir, nets):
    """model.init_weights: the file's ranks and target lists (here PEFT suffix lists with conv_in a LoRA
    target, unlike ours) are used, and the recipe's published dict right after loading is the file."""
    import synthetic_hero

    path = tmp_path / "hero_sr_model.pkl"
    synthetic_hero.write_hero_pkl(tiny_base, path)
    source = torch.load(path, weights_only=False)
    tf.write_images(tmp_path / "imgs", 2)
    config = _config(tmp_path, tiny_base_dir, nets, tmp_path / "imgs",
                     model={"base": str(tiny_base_dir), "feature_networks": str(nets[0]), "init_weights": str(path)})
    recipe = build_recipe(config, torch.device("cpu"))
    published = recipe.published(recipe.model)
    assert published["rank_unet"] == source["rank_unet"] and published["rank_vae"] == source["rank_vae"]
    assert published["unet_lora_target_modules"] == source["unet_lora_target_modules"]
    for key in ("state_dict_unet", "state_dict_vae", "state_dict_time_adaptive"):
        assert set(published[key]) == set(source[key]), key
        for name, value in source[key].items():
            assert torch.equal(published[key][name], value.to(published[key][name].dtype)), (key, name)
    with pytest.raises(ValueError, match="is not Hero-SR weights"):
        from onestep_sr.training.recipes.herosr import HeroSRRecipe

        torch.save({"unet_lora_encoder_modules": [], "state_dict_unet": {}}, tmp_path / "osediff.pkl")
        HeroSRRecipe.read_published(str(tmp_path / "osediff.pkl"))


def test_a_run_saved_before_the_recipe_sections_existed_still_resumes():
    from onestep_sr.training.config import config_differences

    current = config_from_dict({}).to_dict()
    saved = {k: v for k, v in current.items() if k not in ("herosr", "vpdsr")}
    assert config_differences(saved, current) == []
    changed = config_from_dict({"herosr": {"text_weight": 0.25}}).to_dict()
    assert config_differences(saved, changed) == ["herosr.text_weight"]
