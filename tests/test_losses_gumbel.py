"""Hero-SR DTSM training: straight-through Gumbel-softmax timestep choice."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from onestep_sr.models.dtsm import CANDIDATE_TIMESTEPS, select_timesteps
from onestep_sr.models.schedule import alphas_cumprod
from onestep_sr.training.losses.gumbel_timestep import (
    alphas_cumprod_at,
    choose_timesteps,
    straight_through_gumbel,
)


def _logits(batch=4, seed=0):
    return torch.randn(batch, 101, generator=torch.Generator().manual_seed(seed)) * 2


def test_forward_is_one_hot_and_t_is_the_chosen_candidate():
    choice = choose_timesteps(_logits(), generator=torch.Generator().manual_seed(1))
    hard = choice.one_hot.detach()
    assert torch.equal(hard, F.one_hot(choice.index, 101).float())
    assert torch.equal(choice.timesteps.detach(), CANDIDATE_TIMESTEPS[choice.index].float())


def test_same_value_and_gradient_as_torch_gumbel_softmax_for_the_same_seed():
    # Independent reference: torch's own F.gumbel_softmax(hard=True) under the same seeded CPU stream.
    logits = _logits(seed=3).requires_grad_(True)
    weights = torch.randn(4, 101, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(21)
    reference = F.gumbel_softmax(logits, tau=1.0, hard=True)
    (reference * weights).sum().backward()
    ref_grad, logits.grad = logits.grad.clone(), None
    ours = straight_through_gumbel(logits, tau=1.0, generator=torch.Generator().manual_seed(21))
    (ours * weights).sum().backward()
    assert torch.equal(ours.detach(), reference.detach())
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_gradients_reach_the_logits_through_t_and_alpha():
    logits = _logits().requires_grad_(True)
    choice = choose_timesteps(logits, generator=torch.Generator().manual_seed(0))
    choice.timesteps.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    logits.grad = None
    table = alphas_cumprod()
    choice = choose_timesteps(logits, generator=torch.Generator().manual_seed(0))
    alpha = alphas_cumprod_at(choice, table)
    torch.testing.assert_close(alpha.detach(), table.double()[CANDIDATE_TIMESTEPS[choice.index]])
    alpha.sum().backward()
    assert logits.grad.abs().sum() > 0
    plain = alphas_cumprod_at(choice, table, differentiable=False)
    assert not plain.requires_grad and torch.equal(plain, alpha.detach())


def test_seeded_choice_matches_the_inference_sampler():
    logits = _logits(batch=16, seed=5)
    trained = choose_timesteps(logits, generator=torch.Generator().manual_seed(77)).timesteps.long()
    assert torch.equal(trained, select_timesteps(logits, "sample", seed=77))


def _chi2_threshold(dof: int, z: float = 3.0902) -> float:
    """Wilson-Hilferty approximation of the chi-square 0.999 quantile (z = Phi^-1(0.999))."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> tuple[float, int]:
    expected = probs * draws
    big = expected >= 5
    observed, expected_kept = counts[big], expected[big]
    if (~big).any():  # pool the rare candidates into one bin
        observed = torch.cat([observed, counts[~big].sum()[None]])
        expected_kept = torch.cat([expected_kept, expected[~big].sum()[None]])
    return float(((observed - expected_kept) ** 2 / expected_kept).sum()), observed.numel() - 1


def test_chosen_t_follows_softmax_of_the_logits():
    """Pearson chi-square over 40,000 seeded draws; rejection level 0.001 (a correct sampler fails with
    probability 1e-3 for a random seed; the seed is fixed, so the test is deterministic). Bins with
    fewer than 5 expected draws are pooled."""
    draws = 40000
    logits = torch.randn(101, generator=torch.Generator().manual_seed(12)) * 1.5
    probs = logits.double().softmax(-1)
    choice = choose_timesteps(logits.expand(draws, 101), generator=torch.Generator().manual_seed(2024))
    counts = torch.bincount(choice.index, minlength=101).double()
    chi2, dof = _chi2(counts, probs, draws)
    assert chi2 < _chi2_threshold(dof), chi2
    # The same statistic rejects a wrong distribution (the test can fail).
    wrong, dof_w = _chi2(counts, (logits.double() / 1.3).softmax(-1), draws)
    assert wrong > _chi2_threshold(dof_w)


def test_bad_inputs():
    with pytest.raises(ValueError, match="101 candidate"):
        choose_timesteps(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="temperature"):
        straight_through_gumbel(torch.zeros(2, 101), tau=0)


def test_one_step_x0_matches_inference_and_passes_gradient():
    from onestep_sr.models.schedule import x0_from_eps
    from onestep_sr.training.losses.gumbel_timestep import one_step_x0

    gen = torch.Generator().manual_seed(8)
    latent, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    logits = _logits(batch=3, seed=8).requires_grad_(True)
    choice = choose_timesteps(logits, generator=torch.Generator().manual_seed(4))
    table = alphas_cumprod()
    z0 = one_step_x0(latent, eps, alphas_cumprod_at(choice, table))
    torch.testing.assert_close(z0.detach(), x0_from_eps(latent, eps, CANDIDATE_TIMESTEPS[choice.index], table), rtol=1e-6, atol=1e-6)
    z0.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gradient_reaches_the_dtsm_through_the_unet(tiny_base):
    """Hero-SR's path: DTSM logits -> straight-through t* (float) -> UNet timestep embedding."""
    from onestep_sr.models.dtsm import TimeStepSelector, dtsm_input

    torch.manual_seed(0)
    dtsm = TimeStepSelector().train()
    unet = copy.deepcopy(tiny_base.unet).requires_grad_(False)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    choice = choose_timesteps(dtsm(dtsm_input(images)), generator=torch.Generator().manual_seed(1))
    latent = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    eps = unet(latent, choice.timesteps, encoder_hidden_states=context).sample
    eps.pow(2).mean().backward()
    grads = [p.grad for p in dtsm.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_straight_through_gradients_train_the_selector_towards_a_better_t():
    """Toy objective on t* alone: loss = (t*/1000 - 0.4)^2. Fifty Adam steps on free logits must move
    softmax(logits) towards candidates near 400 (expected t from ~499 to within 25 of 400)."""
    logits = torch.zeros(1, 101, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        choice = choose_timesteps(logits.expand(64, 101), generator=generator)
        loss = ((choice.timesteps / 1000 - 0.4) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected_t = float(logits.detach().softmax(-1)[0] @ CANDIDATE_TIMESTEPS.float())
    assert float(CANDIDATE_TIMESTEPS.float().mean()) > 495  # where uniform logits start
    assert abs(expected_t - 400) < 25, expected_t
