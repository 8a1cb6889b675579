"""SinSR's distillation objectives (Wang et al. CVPR 2024), used by SinSR and HF-Diff.

Written against a small schedule interface (`ShiftSchedule`: the ResShift eta_t table and kappa) so
it runs on a toy schedule in tests and on the ResShift schedule in the recipe. Formulas follow the
released code (wyf0912/SinSR models/gaussian_diffusion.py, `GaussianDiffusion.training_losses_distill`,
`p_mean_variance`, `ddim_sample`, `_scale_input`, `prior_sample`), x0-predicting models
(`predict_type: xstart`), plain MSE (`weighted_mse: False`), latent inputs:

- model input scaling: x / sqrt(kappa^2 eta_t + 1);
- prior: x_T = z_y + kappa sqrt(eta_T) noise;
- deterministic teacher step (SinSR eq. 7): x_{t-1} = k x0 + m x_t + j z_y with
  m = sqrt(eta_{t-1} / eta_t), j = eta_{t-1} - sqrt(eta_{t-1} eta_t),
  k = 1 - eta_{t-1} + sqrt(eta_{t-1} eta_t) - sqrt(eta_{t-1} / eta_t); eta_0 = 0 before the first
  step, so the last step returns the teacher's x0;
- with T' = T - 1 the student's (fixed) timestep:
  * vanilla distillation ("mse"):        mean_flat((f(s(x_T, T'), T') - z_teacher)^2)
  * inverse regularisation ("mse_xT", learn_xT): mean_flat((x_T - f(s(z_teacher, T'), 0))^2)
  * consistency preserving ("mse_gt", finetune_use_gt = w): with x_T^gt = f(s(z_gt, T'), 0) under
    no_grad, w * mean_flat((z_gt - f(s(x_T^gt, T'), T'))^2)
  * optionally HF-Diff's term ("hf", scaled by w like the release): hf_loss(f(s(x_T^gt, T'), T'), z_gt).
The inverse calls scale their input at T' although their time input is 0: that is the release's
rule (its own comment doubts it), kept for fidelity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .reduction import mean_flat

Model = Callable[..., Tensor]


class ShiftSchedule(Protocol):
    """What the losses need of a ResShift schedule: eta_1..eta_T as a (T,) tensor and kappa."""

    etas: Tensor
    kappa: float


@dataclass(frozen=True)
class ToySchedule:
    """A plain ShiftSchedule (any eta table); the ResShift schedule provides the same two fields."""

    etas: Tensor
    kappa: float


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] per image, broadcast to `like`, in float64 then cast to like's dtype (the release
    computes its tables in float64 and extracts as float32)."""
    picked = values.detach().cpu().to(torch.float64)[t.detach().cpu().long()]  # float64 on the CPU (MPS has none)
    return picked.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def num_timesteps(schedule: ShiftSchedule) -> int:
    return int(schedule.etas.numel())


def scale_input(schedule: ShiftSchedule, x: Tensor, t: Tensor) -> Tensor:
    """x / sqrt(kappa^2 eta_t + 1): the release's `_scale_input` (normalize_input, latent_flag)."""
    return x / torch.sqrt(_at(schedule.etas, t, x) * schedule.kappa ** 2 + 1)


def prior_sample(schedule: ShiftSchedule, z_y: Tensor, noise: Tensor) -> Tensor:
    """x_T = z_y + kappa sqrt(eta_T) noise."""
    t = torch.full((z_y.shape[0],), num_timesteps(schedule) - 1, device=z_y.device, dtype=torch.long)
    return z_y + schedule.kappa * torch.sqrt(_at(schedule.etas, t, z_y)) * noise


def ddim_coefficients(schedule: ShiftSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k, m, j) of the deterministic step x_{t-1} = k x0 + m x_t + j y at timestep index t."""
    etas = schedule.etas.to(torch.float64)
    etas_prev = torch.cat([etas.new_zeros(1), etas[:-1]])
    eta, eta_prev = _at(etas, t, like), _at(etas_prev, t, like)
    m = torch.sqrt(eta_prev / eta)
    j = eta_prev - torch.sqrt(eta_prev * eta)
    k = 1 - eta_prev + torch.sqrt(eta_prev * eta) - m
    return k, m, j


@torch.no_grad()
def deterministic_sample(teacher: Model, schedule: ShiftSchedule, z_y: Tensor, x_T: Tensor,
                         model_kwargs: Mapping[str, Any] | None = None) -> Tensor:
    """The teacher's deterministic T-step trajectory from x_T; returns its final x0 (the distillation
    target). x0 is not clipped (latent mode)."""
    kwargs = dict(model_kwargs or {})
    x = x_T
    for index in reversed(range(num_timesteps(schedule))):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        x0 = teacher(scale_input(schedule, x, t), t, **kwargs)
        k, m, j = ddim_coefficients(schedule, t, x)
        x = k * x0 + m * x + j * z_y
    return x


class SinSRDistillationLoss(nn.Module):
    """The per-image SinSR terms (and their weighted sum, "loss") for one batch.

    `hf_loss`, when given, is HF-Diff's INN loss (a module returning per-image values, i.e. built with
    reduction="none"), added as in the release: on the consistency branch, times finetune_use_gt.
    """

    def __init__(self, schedule: ShiftSchedule, learn_xT: bool = True, finetune_use_gt: float = 1.0,
                 distill_weight: float = 1.0, hf_loss: nn.Module | None = None) -> None:
        super().__init__()
        if num_timesteps(schedule) < 1:
            raise ValueError("the schedule has no timesteps")
        self.schedule = schedule
        self.learn_xT = bool(learn_xT)
        self.finetune_use_gt = float(finetune_use_gt)
        self.distill_weight = float(distill_weight)
        self.hf_loss = hf_loss

    def forward(self, student: Model, x_T: Tensor, z_teacher: Tensor, z_gt: Tensor | None = None,
                model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """`x_T`: the prior sample the teacher started from; `z_teacher`: `deterministic_sample`'s
        result for it; `z_gt`: the GT's latent (needed when finetune_use_gt > 0).

        Returns per-image terms ("mse", "mse_xT", "mse_gt", "hf", their weighted sum "loss") and the
        student's x0 from x_T ("prediction" with gradient, "pred_zstart" detached)."""
        kwargs = dict(model_kwargs or {})
        schedule = self.schedule
        last = torch.full((x_T.shape[0],), num_timesteps(schedule) - 1, device=x_T.device, dtype=torch.long)
        zero = torch.zeros_like(last)
        terms: dict[str, Tensor] = {}
        prediction = student(scale_input(schedule, x_T, last), last, **kwargs)
        terms["mse"] = mean_flat((z_teacher.detach() - prediction) ** 2)
        loss = self.distill_weight * terms["mse"]
        if self.learn_xT:
            predicted_xT = student(scale_input(schedule, z_teacher.detach(), last), zero, **kwargs)
            terms["mse_xT"] = mean_flat((x_T.detach() - predicted_xT) ** 2)
            loss = loss + terms["mse_xT"]
        if self.finetune_use_gt:
            if z_gt is None:
                raise ValueError("finetune_use_gt needs the GT latent z_gt")
            with torch.no_grad():
                xT_from_gt = student(scale_input(schedule, z_gt, last), zero, **kwargs)
            prediction_gt = student(scale_input(schedule, xT_from_gt.detach(), last), last, **kwargs)
            terms["mse_gt"] = mean_flat((z_gt - prediction_gt) ** 2)
            loss = loss + self.finetune_use_gt * terms["mse_gt"]
            if self.hf_loss is not None:
                terms["hf"] = self.hf_loss(prediction_gt, z_gt)
                if terms["hf"].dim() != 1:
                    raise ValueError("hf_loss must return one value per image (build it with reduction='none')")
                loss = loss + self.finetune_use_gt * terms["hf"]
        terms["loss"] = loss
        terms["prediction"] = prediction  # the student's x0 from x_T, with gradient (for image-space terms)
        terms["pred_zstart"] = prediction.detach()  # the release's returned value
        return terms
