"""The x0 formula against diffusers' DDPMScheduler.step, which is how OSEDiff/S3Diff compute it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from onestep_sr.models.schedule import alphas_cumprod, x0_from_eps

CONFIG = json.loads((Path(__file__).parents[1] / "models/configs/sd21_base/scheduler.json").read_text())


def _scheduler() -> DDPMScheduler:
    config = {k: v for k, v in CONFIG.items() if not k.startswith("_")}
    # The pinned diffusers of the official repos stepped from t to t - 1000 (alpha_prev = 1). Newer
    # diffusers looks the previous step up in `timesteps`; "trailing" spacing makes that list [999],
    # whose successor is again -1, so the same arithmetic runs.
    scheduler = DDPMScheduler(**config, timestep_spacing="trailing")
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    return scheduler


def test_schedule_matches_published_values():
    schedule = alphas_cumprod()
    assert schedule[999].item() == pytest.approx(0.0046601, abs=5e-8)
    assert schedule[499].item() == pytest.approx(0.27767, abs=5e-6)
    assert schedule[1].item() == pytest.approx(0.99830, abs=5e-6)
    assert torch.allclose(schedule.float(), _scheduler().alphas_cumprod, atol=1e-6)


def test_x0_formula_equals_scheduler_step_at_999():
    scheduler = _scheduler()
    # OSEDiff calls set_timesteps(1) and then steps explicitly from t=999 to t-1000 (alpha_prev = 1)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    expected = scheduler.step(eps, 999, latent, return_dict=True).prev_sample  # adds 1e-10 noise
    got = x0_from_eps(latent, eps, 999, alphas_cumprod())
    # x0 at t=999 amplifies by 1/sqrt(a) ~ 14.6, so values reach ~50: compare at float32 precision.
    assert torch.allclose(got, expected, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("t", [1, 249, 499, 999])
def test_per_image_timesteps_equal_single_runs(t):
    generator = torch.Generator().manual_seed(t)
    latent = torch.randn(3, 4, 4, 4, generator=generator)
    eps = torch.randn(3, 4, 4, 4, generator=generator)
    steps = torch.tensor([t, 999, 1])
    together = x0_from_eps(latent, eps, steps, alphas_cumprod())
    for i in range(3):
        alone = x0_from_eps(latent[i : i + 1], eps[i : i + 1], int(steps[i]), alphas_cumprod())
        assert torch.equal(together[i : i + 1], alone)


def test_bad_timesteps_are_rejected():
    latent = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="timesteps"):
        x0_from_eps(latent, latent, torch.tensor([1, 2, 3]), alphas_cumprod())
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        x0_from_eps(latent, latent, 1000, alphas_cumprod())
