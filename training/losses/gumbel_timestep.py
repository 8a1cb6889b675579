"""Hero-SR's DTSM in training: straight-through Gumbel-softmax choice of one timestep per image.

The release (W-JG/Hero-SR src/model.py, `TimeAdaptive`) picks t* with
`F.gumbel_softmax(logits, tau=1, hard=True)` and `t = sum(one_hot * time_list)`. With hard=True the
forward value is the exact one-hot of argmax(logits + g), g ~ Gumbel(0, 1), i.e. a draw from
softmax(logits); the backward pass uses the gradient of the soft sample softmax((logits + g) / tau)
(straight-through). We draw g from an optional seeded torch.Generator, the same way
`models.dtsm.select_timesteps` does at inference (-log of Exponential(1), on the CPU), so a seed
gives the same t on any device and the trained module and the inference path agree.

The UNet receives t as a float (its sinusoidal embedding is differentiable in t), which is how
gradients reach the DTSM logits in the release. The x0 formula indexes alphas_cumprod at t.long(),
which carries no gradient; `alphas_cumprod_at` offers the straight-through alternative
sum(one_hot * alphas_cumprod[candidates]) (same forward value, gradient to the logits too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...models.dtsm import CANDIDATE_TIMESTEPS


@dataclass(frozen=True)
class TimestepChoice:
    """One straight-through draw: the one-hot (B, N) with soft gradients, its index (B,) and
    t (B,) float = one_hot @ candidates (forward: exactly the chosen candidate)."""

    one_hot: Tensor
    index: Tensor
    timesteps: Tensor


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise, drawn on the CPU as -log(Exponential(1)) (torch's own gumbel_softmax
    rule), from `generator` when given so that a seed fixes the draw on any device."""
    return -torch.empty(tuple(shape), dtype=torch.float32).exponential_(generator=generator).log()


def straight_through_gumbel(logits: Tensor, tau: float = 1.0, generator: torch.Generator | None = None,
                            noise: Tensor | None = None) -> Tensor:
    """Hard Gumbel-softmax: forward the one-hot of argmax(logits + g), backward d softmax((logits + g)/tau).

    Same value and gradient as `F.gumbel_softmax(logits, tau, hard=True)` for the same noise;
    `noise` (B, N) may be passed explicitly, otherwise it is drawn from `generator`.
    """
    if logits.dim() != 2:
        raise ValueError(f"DTSM logits must be (B, N), got shape {tuple(logits.shape)}")
    if tau <= 0:
        raise ValueError(f"the Gumbel-softmax temperature must be positive, got {tau}")
    if noise is None:
        noise = gumbel_noise(logits.shape, generator)
    if noise.shape != logits.shape:
        raise ValueError(f"Gumbel noise of shape {tuple(noise.shape)} for logits {tuple(logits.shape)}")
    scores = (logits + noise.to(logits.device, logits.dtype)) / tau
    soft = scores.softmax(dim=-1)
    index = scores.detach().argmax(dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, index[:, None], 1.0)
    return hard - soft.detach() + soft


def choose_timesteps(logits: Tensor, candidates: Tensor = CANDIDATE_TIMESTEPS, tau: float = 1.0,
                     generator: torch.Generator | None = None, noise: Tensor | None = None) -> TimestepChoice:
    """The DTSM's training-time choice: t = one_hot @ candidates, one per image (Hero-SR: tau = 1,
    hard, 101 candidates {1, 9, 19, ..., 999})."""
    table = candidates.reshape(-1)
    if table.numel() != logits.shape[-1]:
        raise ValueError(f"{logits.shape[-1]} logits for {table.numel()} candidate timesteps")
    one_hot = straight_through_gumbel(logits, tau=tau, generator=generator, noise=noise)
    timesteps = (one_hot * table.to(one_hot.device, one_hot.dtype)).sum(dim=-1)
    return TimestepChoice(one_hot=one_hot, index=one_hot.detach().argmax(dim=-1), timesteps=timesteps)


def alphas_cumprod_at(choice: TimestepChoice, alphas_cumprod: Tensor, candidates: Tensor = CANDIDATE_TIMESTEPS,
                      differentiable: bool = True) -> Tensor:
    """alpha-bar at each image's t*, (B,) float64 (float32 on MPS). Forward value = alphas_cumprod[t*] exactly (the
    release's `t.long()` indexing). With `differentiable`, computed as one_hot @ alphas_cumprod[candidates]
    so the x0 formula also passes gradient to the logits (our default; the release's does not)."""
    table = alphas_cumprod.detach().cpu().to(torch.float64)[candidates.reshape(-1).long().cpu()]
    device = choice.one_hot.device
    work = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    table = table.to(device, work)
    if not differentiable:
        return table[choice.index]
    return (choice.one_hot.to(work) * table).sum(dim=-1)


def one_step_x0(latent: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = (z - sqrt(1 - a) eps) / sqrt(a) with a per-image alpha-bar (B,) that may carry gradient
    (from `alphas_cumprod_at`); same value as `models.schedule.x0_from_eps` at the chosen t.
    Computed in float32 or better, like the inference path."""
    work = torch.float64 if latent.dtype == torch.float64 else torch.float32
    # The square roots in alpha-bar's own precision (float64), then cast: x0_from_eps's order, so the
    # trained forward and the inference pipeline agree to float32 rounding of the final products.
    a = alpha_bar.to(latent.device).reshape(-1, *([1] * (latent.dim() - 1)))
    return (latent.to(work) - (1 - a).sqrt().to(work) * eps.to(work)) / a.sqrt().to(work)
