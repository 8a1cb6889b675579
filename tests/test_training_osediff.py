"""OSEDiff training on the tiny SD-2-shaped base: the published trainable set, frozen base, VSD's
gradient against a hand computation, one shared base UNet (meta tensors), overfitting, checkpoint
round trip through the CLI / nodes / pipeline, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("accelerate")
pytest.importorskip("yaml")

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from onestep_sr.models.lora import LoRAAdapter, LoRAPair, merge_adapters  # noqa: E402
from onestep_sr.training.adapters import FAKE, GENERATOR, add_osediff_adapters, set_osediff_trainable  # noqa: E402
from onestep_sr.training.config import config_from_dict  # noqa: E402
from onestep_sr.training.losses.lpips import LPIPSVGG  # noqa: E402
from onestep_sr.training.osediff import (  # noqa: E402
    OSEDiffTrainModel,
    StepRandom,
    fake_parameters,
    generator_parameters,
    osediff_checkpoint,
)
from onestep_sr.training.trainer import train  # noqa: E402

import tinymodels  # noqa: E402
import training_fixtures as tf  # noqa: E402

WEIGHTS = {"mse": 1.0, "lpips": 2.0, "vsd": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return tf.write_feature_networks(tmp_path_factory.mktemp("features"))


def _model(tiny_base, features, fake_rank=4):
    unet, vae = copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae)
    lists = add_osediff_adapters(unet, vae, 4, fake_rank)
    set_osediff_trainable(unet, vae)
    return OSEDiffTrainModel(unet, vae, None, LPIPSVGG.from_folder(features), WEIGHTS), lists


def _embeds(tiny_base, prompt="a photo"):
    ids = tiny_base.tokenizer(prompt, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        return tiny_base.text_encoder(ids.input_ids)[0]


def _randomise_lora(module, adapters, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_" in name and any(f".{a}." in name for a in adapters):
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


def test_exactly_the_published_parameters_train_and_the_base_stays(tiny_base, features):
    model, lists = _model(tiny_base, features)
    _randomise_lora(model.unet, GENERATOR + FAKE, 1)
    _randomise_lora(model.vae, GENERATOR, 3)
    frozen = {k: v.clone() for k, v in {**{f"unet.{n}": p for n, p in model.unet.named_parameters()},
                                        **{f"vae.{n}": p for n, p in model.vae.named_parameters()}}.items()
              if not v.requires_grad}
    original_conv_in = model.unet.conv_in.base_layer.original_weight.clone()
    g = torch.Generator().manual_seed(0)
    lq, gt = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    embeds = _embeds(tiny_base)
    gen = dict(generator_parameters(model))
    optimizer = torch.optim.AdamW(gen.values(), lr=1e-2)
    out = model("generator", lq=lq, gt=gt, embeds=embeds, negative=_embeds(tiny_base, ""),
                random=StepRandom.make(0, 0, [0]))
    out["total"].backward()
    with_grad = {n for n, p in gen.items() if p.grad is not None}
    zero = [n for n in with_grad if float(gen[n].grad.abs().sum()) == 0]
    # only the mid-block self-attention q/k: at 1x1 latent resolution softmax over one token is constant
    assert all("mid_block" in n and ("to_q" in n or "to_k" in n) for n in zero), zero
    published = osediff_checkpoint(model, lists, 4)
    keys = {f"unet.{k}" for k in published["state_dict_unet"]} | {f"vae.{k}" for k in published["state_dict_vae"]}
    assert with_grad == keys == set(gen)  # every published tensor gets a gradient, nothing else does
    assert all(p.grad is None for _, p in fake_parameters(model))
    assert {k for k in published["state_dict_unet"] if "lora" not in k} == {"conv_in.base_layer.weight",
                                                                            "conv_in.base_layer.bias"}
    optimizer.step()
    for name, value in frozen.items():
        current = dict(model.unet.named_parameters()) if name.startswith("unet.") else dict(model.vae.named_parameters())
        assert torch.equal(current[name.split(".", 1)[1]], value), name
    assert torch.equal(model.unet.conv_in.base_layer.original_weight, original_conv_in)
    assert not torch.equal(model.unet.conv_in.base_layer.weight, original_conv_in)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base, features):
    """Checkpointed blocks are recomputed during backward, after VSD switched adapters: the generator's
    gradients must still be those of the generator's adapters (the recipe checkpoints the VAE as well)."""
    grads = []
    for checkpointing in (False, True):
        model, _ = _model(tiny_base, features)
        torch.manual_seed(0)
        _randomise_lora(model.unet, GENERATOR + FAKE, 4)
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
            model.vae.enable_gradient_checkpointing()
        model.unet.train()
        model.vae.train()
        g = torch.Generator().manual_seed(0)
        lq, gt = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        out = model("generator", lq=lq, gt=gt, embeds=_embeds(tiny_base), negative=_embeds(tiny_base, ""),
                    random=StepRandom.make(0, 0, [0]))
        out["total"].backward()
        grads.append({n: p.grad.clone() for n, p in generator_parameters(model)})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_recipe_checkpoints_the_unet_and_the_vae(tmp_path, tiny_base_dir, features):
    """At 512 px the VAE's saved activations outweigh the UNet's (docs/training.md, Memory and speed)."""
    from onestep_sr.training.recipes import build_recipe

    tf.write_images(tmp_path / "imgs", 2)
    for flag in (False, True):
        config = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", model__gradient_checkpointing=flag)
        model = build_recipe(config, torch.device("cpu")).model
        assert model.unet.is_gradient_checkpointing is flag
        assert model.vae.encoder.gradient_checkpointing is flag and model.vae.decoder.gradient_checkpointing is flag


def test_vsd_gradient_equals_hand_computation(tiny_base, features):
    """x0_fake from the base merged with the fake LoRA (by hand, original conv_in), x0_real from the
    untouched base with CFG 7.5 on eps; grad = (x0_fake - x0_real) / mean|z0 - x0_real| per sample and
    d MSE(z0, sg(z0 - grad)) / d z0 = 2 grad / numel."""
    model, _ = _model(tiny_base, features)
    _randomise_lora(model.unet, GENERATOR + FAKE, 2)
    with torch.no_grad():  # the generator's trained conv_in must not leak into the score networks
        model.unet.conv_in.base_layer.weight.add_(0.5)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([37, 801])
    embeds, negative = _embeds(tiny_base).expand(2, -1, -1), _embeds(tiny_base, "bad").expand(2, -1, -1)
    grad = model.vsd_gradient(z0, embeds, negative, t, noise)
    loss = model.vsd_loss(z0, grad)
    loss.backward()

    scheduler = DDPMScheduler(**tinymodels.SCHEDULER_CONFIG)
    z_t = scheduler.add_noise(z0.detach(), noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    base = tiny_base.unet
    with torch.no_grad():
        eps_neg = base(z_t, t, encoder_hidden_states=negative).sample
        eps_pos = base(z_t, t, encoder_hidden_states=embeds).sample
        x0_real = (z_t - (1 - a).sqrt() * (eps_neg + 7.5 * (eps_pos - eps_neg))) / a.sqrt()
        fake_unet = copy.deepcopy(base)
        state = model.unet.state_dict()
        adapters = []
        for name in FAKE:
            pairs = {k.split(".lora_A.")[0]: LoRAPair(state[k], state[k.replace("lora_A", "lora_B")])
                     for k in state if f".lora_A.{name}." in k}
            adapters.append(LoRAAdapter(name=name, rank=4, pairs=pairs))
        merge_adapters(fake_unet, adapters)
        x0_fake = (z_t - (1 - a).sqrt() * fake_unet(z_t, t, encoder_hidden_states=embeds).sample) / a.sqrt()
    weight = (z0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (x0_fake - x0_real) / weight
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z0.grad, 2 * expected / z0.numel(), atol=1e-7, rtol=1e-4)
    assert float(loss) == pytest.approx(float((expected**2).mean()), rel=1e-5)


def test_one_base_unet_shared_by_generator_real_and_fake_scores():
    """SD-2.1 sized, on meta tensors: parameter + buffer bytes are one base UNet plus the LoRA sets and a
    conv_in copy, not three UNets (the official trainer holds three)."""
    from diffusers import AutoencoderKL

    from onestep_sr.models.base_models import load_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config("sd21_base", "unet"))
        vae = AutoencoderKL(**load_config("sd21_base", "vae"))

    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    base = nbytes(unet)
    with torch.device("meta"):
        add_osediff_adapters(unet, vae, 4, 4)
    lora = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".lora_" in n)
    conv_in = unet.conv_in.base_layer.original_weight
    extra = conv_in.numel() * conv_in.element_size() + unet.conv_in.base_layer.original_bias.numel() * 4
    assert nbytes(unet) == base + lora + extra
    assert nbytes(unet) < 1.02 * base  # vs 3 x base for three UNets
    assert sum(isinstance(m, UNet2DConditionModel) for m in unet.modules()) == 1
    assert base > 3.2e9  # it really is the 865 M-parameter SD-2.1 UNet in fp32


def _config(tmp_path, tiny_base_dir, features, train_dir, **overrides):
    return config_from_dict(tf.tiny_config(tmp_path, tiny_base_dir, features, train_dir, **overrides))


def _overfit(tmp_path, base, features, hr, lr, losses, steps=16):
    config = _config(tmp_path, base, features, hr, data={
        "train": str(hr), "train_lr": str(lr), "crop": 64, "workers": 0, "pin_memory": False, "flip": False},
        train__max_steps=steps, train__batch_size=1, optim__lr=5e-3, loss=losses)
    history = train(config, progress=False).history
    first = {k: float(np.mean([h[k] for h in history[:4]])) for k in history[0]}
    last = {k: float(np.mean([h[k] for h in history[-4:]])) for k in history[0]}
    return first, last


def test_losses_fall_on_a_tiny_overfit_set(tmp_path, tiny_base, features):
    """Reconstruction (MSE + LPIPS x2) falls; with VSD on, the fake score's eps-MSE falls as it tracks
    the generator. (VSD itself measures the distance to a random tiny 'real' UNet: no target to reach.)"""
    base, hr, lr = tf.write_reachable_pair(tmp_path, tiny_base)
    first, last = _overfit(tmp_path / "rec", base, features, hr, lr, {"mse": 1.0, "lpips": 2.0, "vsd": 0.0})
    assert last["total"] < 0.95 * first["total"] and last["lpips"] < 0.95 * first["lpips"], (first, last)
    assert last["mse"] < first["mse"], (first, last)
    first, last = _overfit(tmp_path / "vsd", base, features, hr, lr, {"mse": 1.0, "lpips": 2.0, "vsd": 1.0})
    assert last["fake"] < 0.95 * first["fake"], (first, last)


def test_checkpoint_round_trip_cli_nodes_and_pipeline(tmp_path, tiny_base_dir, tiny_base, features, monkeypatch):
    from onestep_sr.models.base_models import load_base
    from onestep_sr.pipelines.model import load_onestep_model
    from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings, upscale_input
    from onestep_sr.training.osediff import OSEDiffTrainModel

    images = tf.write_images(tmp_path / "imgs", 2)
    tf.write_images(tmp_path / "val", 1, (64, 64), seed=9)
    config = _config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", train__max_steps=2,
                     train__validate_every=2, data={**tf.tiny_config(tmp_path, tiny_base_dir, features,
                                                                     tmp_path / "imgs")["data"],
                                                    "validation": str(tmp_path / "val")})
    result = train(config, progress=False)
    folder = result.checkpoint
    assert (folder / "osediff.pkl").is_file() and (folder / "osediff.safetensors").is_file()
    # validation ran through the inference pipeline on the saved weights: images and metrics logged
    assert (tmp_path / "run" / "validation" / "step-00000002" / "img000.png").is_file()
    rows = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert rows[0] == "step,val_psnr,val_lpips" and rows[1].startswith("2,")
    assert 0 < float(rows[1].split(",")[1]) < 60
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[0].startswith("step,mse,lpips,vsd,total,fake")

    # the trainer's own one-step forward, rebuilt from the saved trainable weights
    unet, vae = copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae)
    add_osediff_adapters(unet, vae, 4, 4)
    state = torch.load(folder / "training_state.pt", weights_only=False)["trainable"]
    with torch.no_grad():
        for name, param in [*(("unet." + n, p) for n, p in unet.named_parameters()),
                            *(("vae." + n, p) for n, p in vae.named_parameters())]:
            if name in state:
                param.copy_(state[name])
    trainer_model = OSEDiffTrainModel(unet, vae, None, None, WEIGHTS).eval()
    # OSEDiff's preprocessing enlarges inputs below 128 px first; 128 px in gives the plain x4 path
    lr_image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(5))
    x = upscale_input(load_onestep_model(load_base(tiny_base_dir), folder / "osediff.pkl").method, lr_image, 4.0,
                      torch.device("cpu"))
    with torch.no_grad():
        ours, _ = trainer_model.generate(x * 2 - 1, _embeds(tiny_base, ""), noise=None)
    for weights in ("osediff.pkl",):  # the safetensors export goes through the CLI below
        model = load_onestep_model(load_base(tiny_base_dir), folder / weights)
        out = OneStepPipeline(model)(lr_image, UpscaleSettings(scale=4.0, color_fix="none", prompt="",
                                                                  output_size="native"))
        diff = float((out.permute(0, 3, 1, 2) - (ours + 1) / 2).abs().max())
        print(f"trainer forward vs pipeline ({weights}): max |difference| {diff:.2e}")
        assert diff < 1e-5, (weights, diff)

    tf.assert_cli_upscales(tmp_path, images[0], tiny_base_dir, folder / "osediff.safetensors")

    handle = tf.load_with_the_loader_node(monkeypatch, tmp_path, tiny_base_dir, [folder / "osediff.pkl"])
    assert handle.model.method.name == "osediff"


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_base_dir, features):
    tf.write_images(tmp_path / "imgs", 3)
    tf.assert_resume_matches_an_uninterrupted_run(
        lambda folder, steps: _config(tmp_path / folder, tiny_base_dir, features, tmp_path / "imgs",
                                      train__max_steps=steps))
    with pytest.raises(ValueError, match="optim.lr"):
        train(_config(tmp_path / "b", tiny_base_dir, features, tmp_path / "imgs", train__max_steps=5,
                      optim__lr=1e-4), resume=tmp_path / "b" / "run", progress=False)


def test_sigint_saves_a_checkpoint_and_stops(tmp_path, tiny_base_dir, features, monkeypatch):
    import os
    import signal

    from onestep_sr.training import trainer

    tf.write_images(tmp_path / "imgs", 2)
    original = trainer.Logger.write

    def write_then_interrupt(self, step, values):
        original(self, step, values)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer.Logger, "write", write_then_interrupt)
    result = train(_config(tmp_path, tiny_base_dir, features, tmp_path / "imgs", train__max_steps=5), progress=False)
    assert result.interrupted and result.step == 1
    assert (result.checkpoint / "osediff.pkl").is_file() and result.checkpoint.name == "step-00000001"
    assert not list(result.checkpoint.parent.glob("*.partial"))


def test_out_of_memory_suggests_what_to_change(tmp_path, tiny_base_dir, features, monkeypatch):
    tf.write_images(tmp_path / "imgs", 2)

    def oom(self, **inputs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(OSEDiffTrainModel, "generator_losses", oom)
    with pytest.raises(ValueError, match="out of memory at step 0 .*batch_size.*gradient_accumulation.*"
                                         "gradient_checkpointing"):
        train(_config(tmp_path, tiny_base_dir, features, tmp_path / "imgs"), progress=False)
