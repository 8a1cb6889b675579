"""S3Diff training on the tiny SD-2-shaped base (SD-Turbo has the SD-2.1 architecture): the published
trainable set, a frozen base, the discriminator kept out of the generator's gradient, alternating
G/D updates, online negative samples and GT-as-input, overfitting, and the s3diff.pkl round trip
through the inference pipeline, the CLI and the loader node."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from onestep_sr.training.config import config_from_dict  # noqa: E402
from onestep_sr.training.losses.dino_discriminator import DinoViT  # noqa: E402
from onestep_sr.training.osediff import StepRandom  # noqa: E402
from onestep_sr.training.recipes import build_recipe  # noqa: E402
from onestep_sr.training.recipes.base import StepInputs  # noqa: E402
from onestep_sr.training.s3diff import (  # noqa: E402
    discriminator_parameters,
    generator_parameters,
    negative_mask,
    published_key,
    s3diff_checkpoint,
)
from onestep_sr.training.trainer import train  # noqa: E402

import synthetic_s3diff  # noqa: E402
import training_fixtures as tf  # noqa: E402

RANKS = {"rank_unet": 4, "rank_vae": 4}
S3DIFF_NEGATIVE = "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth"
S3DIFF_POSITIVE = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural "
                   "lighting.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """LPIPS VGG + a tiny DINO ViT (12 blocks, width 32) in the published file layouts, and de_net.pth."""
    folder = tf.write_feature_networks(tmp_path_factory.mktemp("features"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = DinoViT(dim=32, depth=12, heads=1)
        for name, param in vit.named_parameters():
            if param.dim() > 1 or name in ("cls_token", "pos_embed"):
                torch.nn.init.normal_(param, std=0.2)
    torch.save(vit.state_dict(), folder / "dino_vitbase16_pretrain.pth")
    synthetic_s3diff.write_de_net(folder / "de_net.pth")
    return folder


def _config(tmp_path, base_dir, features, train_dir, **overrides):
    config = tf.tiny_config(tmp_path, base_dir, features, train_dir)
    config["method"] = "s3diff"
    config["degradation"] = {"preset": "s3diff"}
    config["model"] = {"base": str(base_dir), "feature_networks": str(features), "de_net": str(features / "de_net.pth"),
                       **RANKS}
    config["loss"] = {"mse": 2.0, "lpips": 5.0, "gan": 0.5, "vsd": 0.0, "negative_sample_prob": 0.05,
                      "negative_prompt": S3DIFF_NEGATIVE, "positive_prompt": S3DIFF_POSITIVE}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        config[section][name] = value
    return config_from_dict(config)


def _inputs(recipe, images, micro_step=0, seed=3):
    gt = images * 2 - 1
    lr = torch.nn.functional.interpolate(images, scale_factor=0.25, mode="bicubic", align_corners=False).clamp(0, 1)
    lq = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    batch = {"gt": images, "id": torch.arange(images.shape[0]), "prompt": [""] * images.shape[0]}
    return StepInputs(lq=lq, gt=gt, batch=batch, micro_step=micro_step, seed=seed, extras={"lr": lr})


def _flat_keys(data, prefix=()):
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _flat_keys(value, (*prefix, key))
        elif isinstance(value, torch.Tensor) and key != "w":
            keys.add((*prefix, key))
    return keys


def _recipe(tmp_path, tiny_base_dir, features, **overrides):
    tf.write_images(tmp_path / "imgs", 2)
    config = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", **overrides)
    return build_recipe(config, torch.device("cpu"))


def _randomise_lora_up(model, seed=1):
    """B = 0 at init makes A's and the MLPs' gradients exactly zero; a small random B shows every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in generator_parameters(model):
            if name.endswith("lora_up.weight"):
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
            if "fuse_mlp" in name and name.endswith("weight"):
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


def _images(count=2, size=64, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_published_layout_equals_peft_s3diff_layout(tmp_path, tiny_base, tiny_base_dir, features):
    """Our checkpoint's keys and shapes equal those of the file S3Diff.save_model writes from real peft
    adapters with the official target list and regex (tests/synthetic_s3diff.py), and it loads."""
    from onestep_sr.models.s3diff_weights import parse_s3diff

    recipe = _recipe(tmp_path, tiny_base_dir, features)
    ours = s3diff_checkpoint(recipe.model)
    theirs = synthetic_s3diff.make_s3diff_checkpoint(tiny_base, rank_unet=4, rank_vae=4).data

    def shapes(data):
        out = {}
        for path in _flat_keys(data):
            value = data
            for step in path:
                value = value[step]
            out[path] = tuple(value.shape)
        return out

    assert shapes(ours) == shapes(theirs)
    assert set(ours) == set(theirs)
    assert isinstance(ours["w"], torch.nn.Parameter) and ours["w"].shape == (64,)
    assert (ours["unet_lora_target_modules"], ours["vae_lora_target_modules"]) == (
        theirs["unet_lora_target_modules"], theirs["vae_lora_target_modules"])
    parse_s3diff(ours)  # the inference reader accepts it


def test_exactly_the_published_parameters_train_and_the_base_stays(tmp_path, tiny_base_dir, features):
    recipe = _recipe(tmp_path, tiny_base_dir, features)
    model = recipe.model
    _randomise_lora_up(model)
    trainable = dict(generator_parameters(model))
    published = _flat_keys(s3diff_checkpoint(model))
    assert {published_key(n) for n in trainable} == published and len(trainable) == len(published)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable
              and not n.startswith("discriminator.heads.")}
    frozen.update({f"text.{n}": p.detach().clone() for n, p in recipe.prompts.text_encoder.named_parameters()})
    assert any(n.startswith("discriminator.backbone.") for n in frozen) and any(n.startswith("de_net.") for n in frozen)
    before = {n: p.detach().clone() for n, p in trainable.items()}

    # 128 px: the mid block's self-attention sees 2 x 2 tokens (one token would give q and k zero gradient)
    parts = recipe.micro_step(model, model, _inputs(recipe, _images(size=128)))
    rec = next(parts)
    rec.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == set(trainable), sorted(set(trainable) ^ with_grad)[:5]
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    for name, param in [*model.named_parameters(), *(("text." + n, p) for n, p in
                                                     recipe.prompts.text_encoder.named_parameters())]:
        if name in frozen:
            assert torch.equal(frozen[name], param), name


def test_discriminator_is_kept_out_of_the_generator_loss_and_updates_alternate(tmp_path, tiny_base_dir, features):
    """Run the micro step as the loop does (backward, then that phase's optimiser steps): each
    generator part moves only generator weights and leaves the discriminator without gradient; each
    discriminator part moves only the discriminator's heads."""
    recipe = _recipe(tmp_path, tiny_base_dir, features)
    model = recipe.model
    _randomise_lora_up(model)
    groups = {p.name: dict(p.parameters) for p in recipe.phases}
    assert list(groups) == ["generator", "discriminator"]
    assert set(groups["discriminator"]) == {n for n, _ in discriminator_parameters(model)}
    assert groups["discriminator"] and all(n.startswith("discriminator.heads.") for n in groups["discriminator"])
    optimizers = {name: torch.optim.AdamW(list(params.values()), lr=1e-3) for name, params in groups.items()}
    order = []
    for part in recipe.micro_step(model, model, _inputs(recipe, _images())):
        snapshot = {name: {n: p.detach().clone() for n, p in params.items()} for name, params in groups.items()}
        part.loss.backward()
        other = "discriminator" if part.phase == "generator" else "generator"
        assert all(p.grad is None for p in groups[other].values()), (part.phase, list(part.logs))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[part.phase].values())
        optimizers[part.phase].step()
        optimizers[part.phase].zero_grad(set_to_none=True)
        assert all(torch.equal(snapshot[other][n], p) for n, p in groups[other].items())
        assert any(not torch.equal(snapshot[part.phase][n], p) for n, p in groups[part.phase].items())
        order.append((part.phase, next(k for k in ("rec", "gan_g", "d_real", "d_fake") if k in part.logs)))
    assert order == [("generator", "rec"), ("generator", "gan_g"), ("discriminator", "d_real"),
                     ("discriminator", "d_fake")]


def test_online_negative_samples(tmp_path, tiny_base_dir, features):
    """p = 1: every sample gets the negative prompt and its own degraded input as the target (checked
    against the loss computed by hand); the per-sample draw has the configured rate and is seeded."""
    import torch.nn.functional as F

    recipe = _recipe(tmp_path, tiny_base_dir, features, loss__negative_sample_prob=1.0, loss__gan=0.0)
    model = recipe.model.eval()
    inputs = _inputs(recipe, _images())
    parts = list(recipe.micro_step(model, model, inputs))
    assert [p.phase for p in parts] == ["generator"]  # no GAN weight: no adversarial or D parts
    logs = parts[0].logs
    assert float(logs["negative"]) == 1.0
    random = StepRandom.make(inputs.seed, inputs.micro_step, [0, 1])
    from onestep_sr.training.s3diff import RECON_NOISE

    with torch.no_grad():
        noise = model._latent_noise(inputs.lq, random.stream(RECON_NOISE))
        scores = model.degradation_scores(inputs.extras["lr"])
        image = model.generate(inputs.lq, recipe.negative.expand(2, -1, -1), scores, noise)
        mse = F.mse_loss(image, inputs.lq) * 2
        lpips = model.lpips(image, inputs.lq).mean() * 5
    torch.testing.assert_close(logs["mse"].detach(), mse)
    torch.testing.assert_close(logs["lpips"].detach(), lpips)

    ids = list(range(4000))
    rate = float(negative_mask(StepRandom.make(3, 7, ids), 0.05, torch.device("cpu")).float().mean())
    assert 0.04 < rate < 0.06, rate
    assert torch.equal(negative_mask(StepRandom.make(3, 7, ids[:8]), 0.5, torch.device("cpu")),
                       negative_mask(StepRandom.make(3, 7, ids), 0.5, torch.device("cpu"))[:8])
    assert not negative_mask(StepRandom.make(3, 7, ids), 0.0, torch.device("cpu")).any()


def test_gt_as_input_reaches_the_generator(tmp_path, tiny_base_dir, features):
    """degradation.no_degradation_prob = 1 (S3Diff's p = 0.01, forced): the generator's input is the GT
    while de_net still gets an LR; the config value overrides the preset, and empty keeps the preset's."""
    from onestep_sr.training.degradations import RealESRGANDegrader
    from onestep_sr.training.trainer import _prepare_inputs, degradation_params

    tf.write_images(tmp_path / "imgs", 2)
    config = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", degradation__no_degradation_prob=1.0)
    params = degradation_params(config)
    assert params.no_degradation_prob == 1.0 and params.resize_back == "bicubic"
    default = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs")
    assert degradation_params(default).no_degradation_prob == 0.01
    gt = _images()
    lq, gt_out, lr = _prepare_inputs({"gt": gt}, config, RealESRGANDegrader(params), 0, 0, torch.device("cpu"))
    assert torch.equal(lq, gt_out) and lr.shape == (2, 3, 16, 16)
    result = train(config, progress=False)
    assert result.step == 3 and all(np.isfinite(list(h.values())).all() for h in result.history)


def test_losses_fall_on_a_tiny_overfit_set(tmp_path, tiny_base, features):
    """2 MSE + 5 LPIPS falls on one reachable image with the GAN term on (LPIPS x5 dominates; MSE may
    trade off against it); the discriminator (target 0.8 for the fixed GT, 0 for the output) learns:
    its summed loss falls too. The published init is slow to start (B = 0 and M ~ 1e-5: LoRA grows
    only as Adam moves both), hence 32 steps."""

    base, hr, lr = tf.write_reachable_pair(tmp_path, tiny_base)
    config = _config(tmp_path, base, features, hr, train__max_steps=32, train__batch_size=1, optim__lr=1e-3,
                     loss__negative_sample_prob=0.0)
    config.data.train_lr, config.data.flip = str(lr), False
    history = train(config, progress=False).history
    first = {k: float(np.mean([h[k] for h in history[:4]])) for k in history[0]}
    last = {k: float(np.mean([h[k] for h in history[-4:]])) for k in history[0]}
    print("first", first, "last", last)
    assert last["rec"] < 0.95 * first["rec"], (first, last)
    assert last["d_real"] + last["d_fake"] < first["d_real"] + first["d_fake"], (first, last)


def test_checkpoint_round_trip_pipeline_cli_and_node(tmp_path, tiny_base, tiny_base_dir, features, monkeypatch):
    """Fine-tune from a published-layout s3diff.pkl (random LoRA and MLPs: M far from 0), save, and
    run the saved file through the inference pipeline (guidance 1: the trainer's single pass), the
    CLI and the loader node. The trainer's own forward on the same input matches to < 1e-5."""
    from onestep_sr.models.base_models import load_base
    from onestep_sr.pipelines.model import load_onestep_model
    from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings, upscale_input

    synthetic_s3diff.write_s3diff_pkl(tiny_base, tmp_path / "published.pkl", **RANKS)
    images = tf.write_images(tmp_path / "imgs", 2)
    tf.write_images(tmp_path / "val", 1, (64, 64), seed=9)
    config = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", train__max_steps=2, optim__lr=1e-4,
                     model__init_weights=str(tmp_path / "published.pkl"), train__validate_every=2,
                     data__validation=str(tmp_path / "val"))
    folder = train(config, progress=False).checkpoint
    for name in ("s3diff.pkl", "s3diff.safetensors", "de_net.pth"):
        assert (folder / name).is_file(), name
    # validation ran through the inference pipeline (de_net, CFG 1.07) on the saved weights
    assert (tmp_path / "run" / "validation" / "step-00000002" / "img000.png").is_file()
    rows = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert rows[0] == "step,val_psnr,val_lpips" and 0 < float(rows[1].split(",")[1]) < 60

    recipe = build_recipe(config, torch.device("cpu"))
    recipe.load_state(torch.load(folder / "training_state.pt", weights_only=False)["trainable"], folder)
    model = recipe.model.eval()
    lr_image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(5))
    method = load_onestep_model(load_base(tiny_base_dir), folder / "s3diff.pkl").method
    x = upscale_input(method, lr_image, 4.0, torch.device("cpu"))
    embeds = recipe.prompts([S3DIFF_POSITIVE])
    with torch.no_grad():
        scores = model.degradation_scores(lr_image.permute(0, 3, 1, 2))
        ours = (model.generate(x * 2 - 1, embeds, scores) + 1) / 2
        other = (model.generate(x * 2 - 1, embeds, 1 - scores) + 1) / 2
    assert float((ours - other).abs().max()) > 1e-3  # the modulation matters at this size of weights
    for weights in ("s3diff.pkl", "s3diff.safetensors"):
        loaded = load_onestep_model(load_base(tiny_base_dir), folder / weights)
        out = OneStepPipeline(loaded)(lr_image, UpscaleSettings(scale=4.0, color_fix="none", guidance=1.0,
                                                                output_size="native"))
        diff = float((out.permute(0, 3, 1, 2) - ours).abs().max())
        print(f"trainer forward vs pipeline ({weights}): max |difference| {diff:.2e}")
        assert diff < 1e-5, (weights, diff)

    tf.assert_cli_upscales(tmp_path, images[0], tiny_base_dir, folder / "s3diff.pkl")

    handle = tf.load_with_the_loader_node(monkeypatch, tmp_path, tiny_base_dir,
                                          [folder / "s3diff.pkl", folder / "de_net.pth"])
    assert handle.model.method.name == "s3diff" and handle.model.degradation_estimator is not None


def test_shipped_config_matches_the_published_setup():
    """training/configs/s3diff.yaml against METHODS.md section 2 and the inference method's prompts."""
    from pathlib import Path

    import onestep_sr.training as package
    from onestep_sr.pipelines.methods import S3DIFF
    from onestep_sr.training.config import load_config
    from onestep_sr.training.trainer import degradation_params

    c = load_config(Path(package.__file__).parent / "configs" / "s3diff.yaml")
    assert c.method == "s3diff"
    assert (c.loss.mse, c.loss.lpips, c.loss.gan, c.loss.vsd, c.loss.negative_sample_prob) == (2, 5, 0.5, 0, 0.05)
    assert (c.loss.positive_prompt, c.loss.negative_prompt) == (S3DIFF.prompt, S3DIFF.negative_prompt)
    assert (c.optim.lr, c.optim.lr_fake, c.optim.weight_decay, c.optim.grad_clip, c.optim.scheduler) == (
        2e-5, 2e-5, 1e-2, 1.0, "constant")
    assert (c.train.batch_size, c.train.gradient_accumulation, c.train.max_steps, c.train.mixed_precision) == (
        4, 4, 50000, "no")
    assert (c.model.rank_unet, c.model.rank_vae, c.data.crop, c.data.scale) == (32, 16, 512, 4)
    params = degradation_params(c)
    assert (params.name, params.no_degradation_prob, params.resize_back) == ("s3diff", 0.01, "bicubic")


class _FakeTagger:
    """Stands in for the CLIP scorer: 'bright' or 'dark' by the whole image's mean, and counts calls."""

    def __init__(self):
        self.calls = 0

    def top_tags(self, images, top_k, threshold):
        from types import SimpleNamespace

        self.calls += images.shape[0]
        return [[SimpleNamespace(tag="bright" if float(i.mean()) > 0.5 else "dark"), SimpleNamespace(tag="photo")]
                for i in images]


def test_clip_tag_prompts_are_cached_per_image(tmp_path):
    import os

    from PIL import Image

    from onestep_sr.training.prompts import ClipTagPrompts

    paths = [str(p) for p in tf.write_images(tmp_path / "imgs", 3)]
    expected = []
    for path in paths:
        with Image.open(path) as image:
            mean = np.asarray(image, dtype=np.float64).mean() / 255
        expected.append(("bright" if mean > 0.5 else "dark") + ", photo")
    scorer = _FakeTagger()
    tags = ClipTagPrompts("unused", torch.device("cpu"), tmp_path / "clip_tags.json", scorer=scorer)
    assert tags(paths) == expected and scorer.calls == 3
    assert tags(paths[::-1]) == expected[::-1] and scorer.calls == 3  # memory cache
    again = ClipTagPrompts("unused", torch.device("cpu"), tmp_path / "clip_tags.json", scorer=_FakeTagger())
    assert again(paths) == expected and again.scorer.calls == 0  # disk cache
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited image is tagged again
    assert again(paths[:1]) == expected[:1] and again.scorer.calls == 1


def test_clip_tags_reach_the_prompts_of_a_run(tmp_path, tiny_base_dir, features, monkeypatch):
    import onestep_sr.models.clip_tags as clip_tags
    from onestep_sr.training import prompts as prompts_module

    scorer = _FakeTagger()
    monkeypatch.setattr(clip_tags, "transformers_clip_encoders",
                        lambda folder, device=None: type("E", (), {"scorer": lambda self: scorer})())
    seen = []
    original = prompts_module.PromptEncoder.__call__
    monkeypatch.setattr(prompts_module.PromptEncoder, "__call__", lambda self, p: seen.extend(p) or original(self, p))
    tf.write_images(tmp_path / "imgs", 2)
    config = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", train__max_steps=1, loss__gan=0.0,
                     data__prompts="clip_tags", data__clip_tagger=str(tmp_path / "clip"))
    train(config, progress=False)
    assert scorer.calls == 2 and (tmp_path / "run" / "clip_tags.json").is_file()
    tagged = [p for p in seen if p.endswith(S3DIFF_POSITIVE) and p != S3DIFF_POSITIVE]
    assert len(tagged) == 2 and all(p.split(", ")[0] in ("bright", "dark") for p in tagged), seen


def _saved_bytes(fn, exclude):
    """Bytes autograd saves for backward while fn runs (parameters excluded; views counted once)."""
    seen = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in exclude and id(base) not in exclude:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_gradient_checkpointing_same_gradients_fewer_saved_activations(tmp_path, tiny_base_dir, features):
    grads, saved = [], []
    for checkpointing in (False, True):
        recipe = _recipe(tmp_path / str(checkpointing), tiny_base_dir, features,
                         model__gradient_checkpointing=checkpointing, loss__gan=0.0)
        model = recipe.model.train()
        _randomise_lora_up(model)
        exclude = {id(t) for t in [*model.parameters(), *model.buffers()]}
        inputs = _inputs(recipe, _images())
        parts = recipe.micro_step(model, model, inputs)
        size, part = _saved_bytes(lambda parts=parts: next(parts), exclude)
        part.loss.backward()
        saved.append(size)
        grads.append({n: p.grad.clone() for n, p in generator_parameters(model)})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert saved[1] < 0.7 * saved[0], saved


def test_trainable_parameters_on_sd_turbo_are_the_published_34_5_million():
    """SD-Turbo sized on meta tensors: UNet rank 32 + VAE-encoder rank 16 LoRA, conv_in, MLPs and tables =
    34.5 M parameters (METHODS.md section 2: 34.5 M trainable, the 138 MB fp32 s3diff.pkl)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from onestep_sr.models.base_models import load_config
    from onestep_sr.training.s3diff import (
        S3DiffTrainModel,
        add_s3diff_lora,
        new_modulator,
        set_s3diff_trainable,
    )

    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config("sd_turbo", "unet"))
        vae = AutoencoderKL(**load_config("sd_turbo", "vae"))
    add_s3diff_lora(unet, vae, 32, 16, seed=0)
    modulator = new_modulator(32, 16, seed=0)
    set_s3diff_trainable(unet, vae, modulator)
    model = S3DiffTrainModel(unet, vae, modulator, None, None, None, {})
    count = sum(p.numel() for _, p in generator_parameters(model))
    assert 34.4e6 < count < 34.6e6, count
    assert 137e6 < 4 * (count + 64) < 139e6  # + w: the fp32 pkl's tensor bytes


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_base_dir, features):
    """Both optimisers, the discriminator's spectral-norm vectors and every per-sample draw resume."""
    tf.write_images(tmp_path / "imgs", 3)

    def config(folder, steps):
        return _config(tmp_path / folder, tiny_base_dir, features, tmp_path / "imgs", train__max_steps=steps,
                       loss__negative_sample_prob=0.5)

    _, _, combined = tf.assert_resume_matches_an_uninterrupted_run(config)
    assert any(h["negative"] > 0 for h in combined)
