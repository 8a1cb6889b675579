"""SinSR distillation losses on a toy schedule, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from onestep_sr.models.hf_inn import HFFeatureExtractor, HFInnConfig
from onestep_sr.training.losses.hf_perceptual import HighFrequencyPerceptualLoss
from onestep_sr.training.losses.sinsr_distill import (
    SinSRDistillationLoss,
    ToySchedule,
    ddim_coefficients,
    deterministic_sample,
    prior_sample,
    scale_input,
)

ETAS = [0.04, 0.25, 0.81]  # sqrt: 0.2, 0.5, 0.9
KAPPA = 2.0
SCHEDULE = ToySchedule(etas=torch.tensor(ETAS, dtype=torch.float64), kappa=KAPPA)


class LinearStudent(nn.Module):
    """f(x, t) = a * x + b * t: simple enough to differentiate by hand."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, t):
        return self.a * x + self.b * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor([[[[value]]]])


def test_scaling_and_prior_by_hand():
    t = torch.tensor([2])
    assert float(scale_input(SCHEDULE, _scalar(3.0), t)) == pytest.approx(3.0 / math.sqrt(4 * 0.81 + 1))
    assert float(prior_sample(SCHEDULE, _scalar(0.5), _scalar(-1.0))) == pytest.approx(0.5 - 2 * 0.9)


def test_deterministic_step_keeps_the_forward_marginal():
    # If the teacher's x0 is exact, x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps maps to the same
    # marginal one step earlier with the same eps (SinSR's derivation of eq. 7).
    gen = torch.Generator().manual_seed(0)
    x0, y, eps = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for index in (1, 2):
        t = torch.full((2,), index)
        x_t = x0 + ETAS[index] * (y - x0) + KAPPA * math.sqrt(ETAS[index]) * eps
        k, m, j = ddim_coefficients(SCHEDULE, t, x_t)
        expected = x0 + ETAS[index - 1] * (y - x0) + KAPPA * math.sqrt(ETAS[index - 1]) * eps
        torch.testing.assert_close(k * x0 + m * x_t + j * y, expected)
    oracle = deterministic_sample(lambda x, t: x0, SCHEDULE, y, x0 + 0.81 * (y - x0) + 1.8 * eps)
    torch.testing.assert_close(oracle, x0)


def test_teacher_trajectory_by_hand():
    # teacher f(x, t) = 0.5 x on scalars; x_{t-1} = k f(s_t x_t) + m x_t + j y, written out.
    y, x = 0.3, 1.7
    for index in (2, 1, 0):
        eta, prev = ETAS[index], (ETAS[index - 1] if index else 0.0)
        x0 = 0.5 * x / math.sqrt(KAPPA ** 2 * eta + 1)
        m, j = math.sqrt(prev / eta), prev - math.sqrt(prev * eta)
        k = 1 - prev + math.sqrt(prev * eta) - math.sqrt(prev / eta)
        x = k * x0 + m * x + j * y
    got = deterministic_sample(lambda inp, t: 0.5 * inp, SCHEDULE, _scalar(0.3), _scalar(1.7))
    assert float(got) == pytest.approx(x, rel=1e-6)


def test_distillation_terms_and_gradients_by_hand():
    a, b, w = 0.8, 0.05, 0.7
    x_T, z_teacher, z_gt = 1.2, 0.4, -0.3
    s = 1 / math.sqrt(KAPPA ** 2 * 0.81 + 1)  # scaling at t = T - 1 = 2
    student = LinearStudent(a, b)
    loss_fn = SinSRDistillationLoss(SCHEDULE, learn_xT=True, finetune_use_gt=w)
    terms = loss_fn(student, _scalar(x_T), _scalar(z_teacher), _scalar(z_gt))
    mse = (z_teacher - (a * s * x_T + 2 * b)) ** 2                     # vanilla distillation
    mse_xT = (x_T - a * s * z_teacher) ** 2                            # inverse regularisation (t = 0)
    xT_gt = a * s * z_gt                                               # the student's x_T of the GT (no grad)
    pred_gt = a * s * xT_gt + 2 * b
    mse_gt = (z_gt - pred_gt) ** 2                                     # consistency preserving
    terms_now = {k: float(v.detach()) for k, v in terms.items() if "pred" not in k}
    assert terms_now["mse"] == pytest.approx(mse, rel=1e-5)
    assert terms_now["mse_xT"] == pytest.approx(mse_xT, rel=1e-5)
    assert terms_now["mse_gt"] == pytest.approx(mse_gt, rel=1e-5)
    assert terms_now["loss"] == pytest.approx(mse + mse_xT + w * mse_gt, rel=1e-5)
    terms["loss"].sum().backward()
    # d/da and d/db, with x_T of the GT held constant (computed under no_grad in the release)
    grad_a = (-2 * (z_teacher - (a * s * x_T + 2 * b)) * s * x_T - 2 * (x_T - a * s * z_teacher) * s * z_teacher
              - 2 * w * (z_gt - pred_gt) * s * xT_gt)
    grad_b = -2 * (z_teacher - (a * s * x_T + 2 * b)) * 2 - 2 * w * (z_gt - pred_gt) * 2
    assert float(student.a.grad) == pytest.approx(grad_a, rel=1e-5)
    assert float(student.b.grad) == pytest.approx(grad_b, rel=1e-5)


def test_switches_and_the_hf_term():
    student = LinearStudent(0.9, 0.0)
    only = SinSRDistillationLoss(SCHEDULE, learn_xT=False, finetune_use_gt=0.0)
    terms = only(student, _scalar(1.0), _scalar(0.2))
    assert set(terms) == {"mse", "loss", "prediction", "pred_zstart"}
    assert terms["prediction"].requires_grad and not terms["pred_zstart"].requires_grad
    torch.manual_seed(0)
    extractor = HFFeatureExtractor(HFInnConfig(channels=4, num_layers=1, hidden_channels=4)).eval()
    hf = HighFrequencyPerceptualLoss(extractor, reduction="none")
    gen = torch.Generator().manual_seed(1)
    x_T, z_t, z_gt = (torch.randn(2, 3, 6, 6, generator=gen) for _ in range(3))
    full = SinSRDistillationLoss(SCHEDULE, finetune_use_gt=0.5, hf_loss=hf)
    terms = full(student, x_T, z_t, z_gt)
    s = 1 / math.sqrt(KAPPA ** 2 * 0.81 + 1)
    pred_gt = 0.9 * s * (0.9 * s * z_gt)
    with torch.no_grad():
        expected_hf = 0.2 * ((extractor(z_gt) - extractor(pred_gt)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["hf"], expected_hf, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["mse_xT"] + 0.5 * (terms["mse_gt"] + terms["hf"]))
    with pytest.raises(ValueError, match="GT latent"):
        full(student, x_T, z_t)
