"""Hero-SR end to end on the tiny model: DTSM-chosen per-image t, reproducible seeds, and the
official computation (PEFT adapters, float64 x0 at the chosen t, LANCZOS enlargement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.models.base_models import load_diffusers_base
from onestep_sr.models.schedule import alphas_cumprod
from onestep_sr.pipelines.color_fix import adain_color_fix
from onestep_sr.pipelines.model import load_onestep_model
from onestep_sr.pipelines.onestep import OneStepPipeline, UpscaleSettings


@pytest.fixture(scope="module")
def hero(tmp_path_factory, tiny_base, tiny_base_dir):
    from synthetic_hero import write_hero_pkl

    path = tmp_path_factory.mktemp("hero") / "hero_sr_model.pkl"
    peft_unet, peft_vae, _ = write_hero_pkl(tiny_base, path)
    model = load_onestep_model(load_diffusers_base(tiny_base_dir), path)
    return OneStepPipeline(model, "cpu"), peft_unet, peft_vae


def test_method_is_detected_with_its_defaults(hero):
    pipeline, _, _ = hero
    assert pipeline.model.method.name == "hero_sr" and pipeline.model.dtsm is not None
    settings = pipeline.resolve(UpscaleSettings())
    assert settings.prompt == " " and settings.color_fix == "adain" and settings.guidance == 1.0


def test_matches_official_computation_at_the_dtsm_timestep(hero, tiny_base):
    pipeline, peft_unet, peft_vae = hero
    rng = np.random.default_rng(0)
    image_u8 = np.asarray(Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((48, 36)))
    pil = Image.fromarray(image_u8)
    w, h = pil.size
    s = 128 / min(w, h)
    pil = pil.resize((int(s * w), int(s * h)), Image.LANCZOS)  # Hero-SR enlarges with LANCZOS
    pil = pil.resize((pil.size[0] * 4, pil.size[1] * 4))
    pil = pil.resize((pil.width - pil.width % 8, pil.height - pil.height % 8), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255).permute(2, 0, 1)[None]
    t, _ = pipeline.model.predict_timesteps(x, mode="sample", seed=0)
    with torch.no_grad():
        ids = tiny_base.tokenizer(" ", max_length=77, padding="max_length", truncation=True,
                                  return_tensors="pt").input_ids
        embeds = tiny_base.text_encoder(ids)[0]
        latent = peft_vae.encode(x * 2 - 1).latent_dist.mean * 0.18215
        eps = peft_unet(latent, t.float(), encoder_hidden_states=embeds).sample
        a = alphas_cumprod()[t.long()].view(-1, 1, 1, 1)
        z0 = ((latent.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).float()
        out = (peft_vae.decode(z0 / 0.18215).sample.clamp(-1, 1) + 1) / 2
    expected = adain_color_fix(out, x)
    got = pipeline(torch.from_numpy(image_u8 / 255.0).float()[None], UpscaleSettings(output_size="native"))
    assert (got.permute(0, 3, 1, 2) - expected).abs().max() < 2e-4


def test_seeded_dtsm_is_reproducible_and_per_image(hero):
    pipeline, _, _ = hero
    images = torch.rand(2, 3, 64, 64)
    t1, logits = pipeline.model.predict_timesteps(images, "sample", seed=3)
    t2, _ = pipeline.model.predict_timesteps(images, "sample", seed=3)
    assert torch.equal(t1, t2) and t1.shape == (2,) and logits.shape == (2, 101)
    t_max, _ = pipeline.model.predict_timesteps(images, "argmax")
    assert torch.equal(t_max, torch.tensor([1] + [9 + 10 * k for k in range(100)])[logits.argmax(1)])
    image = torch.rand(1, 16, 16, 3)
    a = pipeline(image, UpscaleSettings(timestep_seed=1))  # the DTSM picks t itself, seeded
    b = pipeline(image, UpscaleSettings(timestep_seed=1))
    assert torch.equal(a, b)


def test_osediff_model_has_no_dtsm(tiny_base_dir, osediff_pkl):
    model = load_onestep_model(load_diffusers_base(tiny_base_dir), osediff_pkl[0])
    with pytest.raises(ValueError, match="Hero-SR"):
        model.predict_timesteps(torch.rand(1, 3, 64, 64))
