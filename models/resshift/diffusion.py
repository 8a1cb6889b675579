"""ResShift's residual-shifting diffusion: the eta schedule, prior, model-input scaling, posterior.

q(x_t | x_0, y) = N(x_0 + eta_t (y - x_0), kappa^2 eta_t I), y the latent of the bicubic-upsampled
LR. Schedule values are computed in float64 and cast to float32 where they meet tensors, as the
official `_extract_into_tensor` does, so the sampler reproduces the official numbers to round-off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class DiffusionConfig:
    """`diffusion.params` of the official YAML (exponential schedule, x0 prediction, latent mode)."""

    steps: int = 15
    kappa: float = 2.0
    min_noise_level: float = 0.04
    etas_end: float = 0.99
    power: float = 0.3
    sf: int = 4
    scale_factor: float = 1.0
    normalize_input: bool = True
    # SinSR's copy caps sqrt(eta_1) at sqrt(0.001); ResShift's own code has the cap commented out.
    cap_sqrt_001: bool = False
    extra: dict = field(default_factory=dict, compare=False)  # keys we read but do not use


def sqrt_eta_schedule(config: DiffusionConfig) -> np.ndarray:
    """sqrt(eta_t), t = 1..T: sqrt(eta_1) * b^(((t-1)/(T-1))^p (T-1)), b = (etas_end/sqrt(eta_1))^(1/(T-1))."""
    steps = config.steps
    start = min(config.min_noise_level / config.kappa, config.min_noise_level)
    if config.cap_sqrt_001:
        start = min(start, math.sqrt(0.001))
    if steps == 1:
        return np.array([start])
    increaser = math.exp(1 / (steps - 1) * math.log(config.etas_end / start))
    exponent = np.linspace(0, 1, steps, endpoint=True) ** config.power * (steps - 1)
    return np.power(np.full(steps, increaser), exponent) * start


def respaced_indices(steps: int, sample_steps: int) -> list[int]:
    """The official `space_timesteps`: which of the T trained steps an N-step sampler visits."""
    if not 1 <= sample_steps <= steps:
        raise ValueError(f"the sampler can take 1 to {steps} steps, got {sample_steps}")
    return sorted({int((steps / sample_steps) * x) for x in range(sample_steps)})


class ResShiftDiffusion:
    """The (possibly respaced) schedule and its per-step coefficients, float64."""

    def __init__(self, config: DiffusionConfig, sample_steps: int | None = None):
        self.config = config
        self.kappa = config.kappa
        full = sqrt_eta_schedule(config)
        self.timestep_map = respaced_indices(config.steps, sample_steps or config.steps)
        self.sqrt_etas = full[self.timestep_map]
        self.etas = self.sqrt_etas**2
        self.etas_prev = np.append(0.0, self.etas[:-1])
        self.alpha = self.etas - self.etas_prev
        self.posterior_variance = self.kappa**2 * self.etas_prev / self.etas * self.alpha
        clipped = np.append(self.posterior_variance[1] if len(self.etas) > 1 else 0.0, self.posterior_variance[1:])
        with np.errstate(divide="ignore"):
            self.posterior_log_variance = np.log(clipped)
        self.mean_coef1 = self.etas_prev / self.etas
        self.mean_coef2 = self.alpha / self.etas

    @property
    def num_steps(self) -> int:
        return len(self.etas)

    @staticmethod
    def _at(values: np.ndarray, index: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(values[index]), dtype=torch.float64).float().to(like.device)

    def model_timestep(self, index: int) -> int:
        """The trained step index the network sees at sampler step `index` (0 = least noisy)."""
        return self.timestep_map[index]

    def prior(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y + kappa sqrt(eta_T) noise."""
        return y + self._at(self.kappa * self.sqrt_etas, self.num_steps - 1, y) * noise

    def scale_input(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The network sees x_t / sqrt(kappa^2 eta_t + 1)."""
        if not self.config.normalize_input:
            return x
        return x / torch.sqrt(self._at(self.etas, index, x) * self.kappa**2 + 1)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, index: int) -> torch.Tensor:
        return self._at(self.mean_coef1, index, x_t) * x_t + self._at(self.mean_coef2, index, x_t) * x0

    def posterior_std(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """exp(0.5 log variance), the official form (log variance clipped at the first step)."""
        return torch.exp(0.5 * self._at(self.posterior_log_variance, index, like))
