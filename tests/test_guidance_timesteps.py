"""Classifier-free guidance in the single pass, and per-image timesteps (method-agnostic parts)."""

from __future__ import annotations

import pytest
import torch

from onestep_sr.models.base_models import load_diffusers_base
from onestep_sr.pipelines.model import load_onestep_model
from onestep_sr.pipelines.onestep import Conditions, OneStepPipeline, UpscaleSettings


@pytest.fixture(scope="module")
def pipeline(tiny_base_dir, osediff_pkl):
    return OneStepPipeline(load_onestep_model(load_diffusers_base(tiny_base_dir), osediff_pkl[0]), "cpu")


def _conditions(pipeline, guidance, timesteps=(999, 999)):
    model = pipeline.model
    return Conditions(prompt_embeds=model.encode_prompt("sharp photo", pipeline.device),
                      negative_embeds=model.encode_prompt("blurry", pipeline.device) if guidance != 1 else None,
                      guidance=guidance, timesteps=torch.tensor(timesteps))


def _count_unet_calls(pipeline):
    calls = []
    handle = pipeline.model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_cfg_combines_both_passes_in_one_call(pipeline):
    latents = torch.randn(2, 4, 8, 8)
    index = torch.tensor([0, 1])
    positive = pipeline._eps_function(_conditions(pipeline, 1.0))(latents, index)
    negative = pipeline._eps_function(replace_prompt(_conditions(pipeline, 1.0), pipeline, "blurry"))(latents, index)
    calls, handle = _count_unet_calls(pipeline)
    guided = pipeline._eps_function(_conditions(pipeline, 1.07))(latents, index)
    handle.remove()
    assert calls == [4]  # negative and positive in one batched UNet call
    assert torch.allclose(guided, negative + 1.07 * (positive - negative), atol=1e-4)
    at_one = pipeline._eps_function(_conditions(pipeline, 1.0))(latents, index)
    assert torch.equal(at_one, positive)  # g = 1: the positive pass alone


def replace_prompt(conditions, pipeline, prompt):
    conditions.prompt_embeds = pipeline.model.encode_prompt(prompt, pipeline.device)
    return conditions


def test_guidance_one_skips_the_negative_pass(pipeline):
    calls, handle = _count_unet_calls(pipeline)
    pipeline(torch.rand(1, 16, 16, 3), UpscaleSettings(guidance=1.0, negative_prompt="blurry"))
    handle.remove()
    assert calls == [1]
    calls, handle = _count_unet_calls(pipeline)
    pipeline(torch.rand(1, 16, 16, 3), UpscaleSettings(guidance=2.0, negative_prompt="blurry"))
    handle.remove()
    assert calls == [2]


def test_per_image_timesteps_equal_single_runs(pipeline):
    images = torch.rand(2, 16, 20, 3)
    together = pipeline(images, UpscaleSettings(timesteps=torch.tensor([999, 499])))
    first = pipeline(images[:1], UpscaleSettings(timesteps=999))
    second = pipeline(images[1:], UpscaleSettings(timesteps=499))
    assert (together[:1] - first).abs().max() < 2e-3  # batched CPU kernels; x0 amplifies rounding
    assert (together[1:] - second).abs().max() < 2e-3
    assert (first - pipeline(images[:1], UpscaleSettings(timesteps=499))).abs().max() > 1e-2


def test_bad_timesteps_and_scores_are_rejected(pipeline):
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        pipeline(torch.rand(1, 8, 8, 3), UpscaleSettings(timesteps=1000))
    from onestep_sr.pipelines.onestep import check_degradation

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_degradation(torch.tensor([[0.5, 1.5]]), 1)
    with pytest.raises(ValueError, match="shape"):
        check_degradation(torch.tensor([0.1, 0.2, 0.3]), 1)
    assert check_degradation(torch.tensor([0.2, 0.3]), 3).shape == (3, 2)
