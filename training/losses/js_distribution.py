"""HF-Diff's distribution matching: Jensen-Shannon divergence between GT and SR in DINOv2 space.

Paper (HF-Diff sec. 3.2, eq. 4): JS(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q) / 2, P and
Q the distributions of the HR and SR images in the DINOv2 embedding space. Not in the released code;
how an embedding becomes a distribution is not stated. Our choice (docs/training.md): per image, the
softmax of the DINOv2 embedding over its channels at a temperature, P = softmax(f(GT) / T),
Q = softmax(f(SR) / T); natural logarithm, so 0 <= JS <= ln 2. The embedding is the CLS token
("cls", default) or the mean patch token ("mean"). The GT side carries no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .feature_nets import FrozenNetLoss, dinov2_embeds
from .reduction import check_reduction, reduce

LN2 = math.log(2.0)


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """JS divergence (nats) of probability vectors along `dim`; 0 log 0 = 0, so disjoint supports give ln 2."""
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=dim)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=dim)
    return (kl_pm + kl_qm) / 2


def js_divergence_from_logits(logits_p: Tensor, logits_q: Tensor, dim: int = -1) -> Tensor:
    """JS of softmax(logits_p) and softmax(logits_q), computed in log space (stable for large logits)."""
    log_p = logits_p.log_softmax(dim=dim)
    log_q = logits_q.log_softmax(dim=dim)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - LN2
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=dim)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=dim)
    return (kl_pm + kl_qm) / 2


class DinoJSDistributionLoss(FrozenNetLoss):
    """JS(softmax(f(GT)/T) || softmax(f(SR)/T)) per image, f the frozen DINOv2 embedding."""

    frozen_names = ("dino",)

    def __init__(self, dino_model: Any, temperature: float = 1.0, tokens: str = "cls", size: int = 224,
                 reduction: str = "mean") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        if tokens not in ("cls", "mean"):
            raise ValueError(f"unknown DINOv2 token choice {tokens!r}; use 'cls' or 'mean'")
        self.dino = dino_model
        self.temperature = float(temperature)
        self.tokens = tokens
        self.size = int(size)
        self.reduction = check_reduction(reduction)

    def per_image(self, sr_embeds: Tensor, gt_embeds: Tensor) -> Tensor:
        return js_divergence_from_logits(gt_embeds.detach().float() / self.temperature,
                                         sr_embeds.float() / self.temperature)

    def forward(self, sr: Tensor, gt: Tensor) -> Tensor:
        """`sr`, `gt`: (B, 3, H, W) in [-1, 1]."""
        with torch.no_grad():
            target = dinov2_embeds(self.dino, gt, self.size, self.tokens)
        return reduce(self.per_image(dinov2_embeds(self.dino, sr, self.size, self.tokens), target), self.reduction)
