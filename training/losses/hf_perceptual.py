"""HF-Diff's high-frequency perceptual loss: weight * MSE between INN features of target and prediction.

Released code (shoaib-sami/Multi-Granular-High-Frequency-Perceptual-Loss-MGHF-, gaussian_diffusion.py
`training_losses_distill`): `0.2 * mean_flat((F(z_gt) - F(z_pred)) ** 2)`, F the pretrained INN
`feature_extractor`, applied to the VQ latents of the GT and of the student's x0 prediction from
its own predicted x_T of the GT; the term is then scaled by `finetune_use_gt`. Paper eq. 6 writes
it on images; the code's latent placement is what the published weights were trained with, so the
recipe uses latents (the module itself accepts any (B, C, H, W) the extractor accepts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...models.hf_inn import HFFeatureExtractor
from .feature_nets import FrozenNetLoss
from .reduction import check_reduction, mean_flat, reduce

HF_LOSS_WEIGHT = 0.2  # the released code's factor


class HighFrequencyPerceptualLoss(FrozenNetLoss):
    """weight * mean over (N, H, W) of (F(target) - F(pred))^2 per image; F frozen, target without gradient."""

    frozen_names = ("extractor",)

    def __init__(self, extractor: HFFeatureExtractor, weight: float = HF_LOSS_WEIGHT, reduction: str = "mean") -> None:
        super().__init__()
        self.extractor = extractor.eval().requires_grad_(False)
        self.weight = float(weight)
        self.reduction = check_reduction(reduction)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        dtype = next(self.extractor.parameters()).dtype
        with torch.no_grad():
            target_features = self.extractor(target.to(dtype)).float()
        features = self.extractor(pred.to(dtype)).float()
        return reduce(self.weight * mean_flat((target_features - features) ** 2), self.reduction)
