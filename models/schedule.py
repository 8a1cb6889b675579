"""The SD noise schedule and the one-step x0 formula.

All three methods load the base's scheduler as a DDPMScheduler (scaled_linear, 0.00085..0.012,
1000 steps, epsilon prediction) and take one step from t to "t-1000", which returns the x0
prediction. We compute that directly: z0 = (z - sqrt(1 - a_t) * eps) / sqrt(a_t).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(
    beta_start: float = BETA_START, beta_end: float = BETA_END, steps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """Cumulative product of (1 - beta) for the scaled_linear schedule, in float64 (as Hero-SR)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def x0_from_eps(
    latent: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor | int, schedule: torch.Tensor
) -> torch.Tensor:
    """One-step x0 prediction, per image when `timesteps` has one entry per batch element.

    The coefficients are taken from the float64 schedule and the arithmetic is done in float32
    or better, whatever the latent dtype, so fp16 UNet outputs do not lose the 1/sqrt(a_999) ~ 14.6
    amplification precision.
    """
    t = torch.as_tensor(timesteps, device=schedule.device).long().reshape(-1)
    if t.numel() not in (1, latent.shape[0]):
        raise ValueError(f"got {t.numel()} timesteps for a batch of {latent.shape[0]} latents")
    if int(t.min()) < 0 or int(t.max()) >= schedule.numel():
        raise ValueError(f"timesteps must lie in [0, {schedule.numel() - 1}], got {t.tolist()}")
    a_t = schedule[t].to(latent.device)
    sqrt_a = a_t.sqrt().reshape(-1, 1, 1, 1)
    sqrt_one_minus_a = (1.0 - a_t).sqrt().reshape(-1, 1, 1, 1)
    work_dtype = torch.float64 if latent.dtype == torch.float64 else torch.float32
    if latent.device.type == "mps":
        work_dtype = torch.float32
    z = latent.to(work_dtype)
    e = eps.to(work_dtype)
    z0 = (z - sqrt_one_minus_a.to(work_dtype) * e) / sqrt_a.to(work_dtype)
    return z0
